//! meshwire: AgentMesh end-to-end encrypted agent-to-agent messaging.

pub mod registry;
