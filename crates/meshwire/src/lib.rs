//! meshwire: AgentMesh end-to-end encrypted agent-to-agent messaging for
//! tokio applications.
//!
//! [`MeshClient`] registers an agent (proof of possession), publishes its
//! pre-keys, joins the relay and then sends and receives JSON payloads end
//! to end encrypted, opening sessions (X3DH + KNOCK) on demand. It speaks
//! the frames of the TypeScript SDK and works against the AGT relay and
//! registry as well as meshwire's own embedded server. The protocol logic
//! lives in [`meshwire_proto`]; this crate adds the network and persistence.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod persist;
pub mod registry;
pub mod relay_connect;
pub mod store;

pub use client::{
    knock_policy, ClientConfig, ClientError, ClientEvent, ClientStats, FrameCounters, KnockInfo, KnockPolicy,
    MeshClient, MeshClientBuilder, Message, Payload,
};
pub use meshwire_proto as proto;
pub use meshwire_proto::{Did, Identity, KdfDialect};
pub use persist::{MemoryPersistence, Persistence, SqliteStore};
pub use registry::{RegistryClient, RegistryError, RegistryOptions};
pub use store::{load_identity, load_or_create_identity, save_identity, FileStore, MemoryStore, SessionStore};
