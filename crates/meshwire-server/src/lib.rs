//! Embedded AgentMesh relay and registry.
