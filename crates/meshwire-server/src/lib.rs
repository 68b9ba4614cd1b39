//! An embedded AgentMesh relay and registry that speaks the HTTP and
//! WebSocket protocol of the reference Python servers of AGT 5.0.0
//! (`agentmesh.relay`, `agentmesh.registry`), for examples, tests and
//! `meshwire serve`. Its offline mailboxes, agent records, pre-keys and
//! proof memory live in a [`storage::Storage`] chosen by
//! [`ServerConfig::storage`]: in memory (the default), SQLite in a data
//! directory (durable), or NATS JetStream (several instances sharing one
//! state). [`start`] one on a free local port, point clients at
//! [`RunningServer::relay_url`] and [`RunningServer::registry_url`], and
//! [`RunningServer::shutdown`] it when done. It is stricter than the
//! reference 5.0.0 where it is exploitable, as AGT main is since: the relay
//! stamps `from` with the connection's proven DID, only a recipient may
//! acknowledge its mail, message ids are deduplicated per recipient; frames
//! whose `from` is already right are forwarded byte for byte.
//!
//! ```no_run
//! # async fn demo() -> Result<(), meshwire_server::ServerError> {
//! let server = meshwire_server::start(meshwire_server::ServerConfig::default()).await?;
//! println!("relay {}/ws, registry {}", server.relay_url(), server.registry_url());
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod challenge;
mod config;
#[doc(hidden)]
pub mod fuzzing;
mod http;
mod metrics;
mod ops;
mod ratelimit;
mod registry;
mod relay;
pub mod replay;
mod server;
pub mod storage;
mod tls;
mod util;

pub use config::{ChallengeSecret, ChallengeSecretError, Clock, ManualClock, ServerConfig, SystemClock};
pub use relay::close_code;
pub use replay::{ClaimError, MemoryLedger, ProofLedger, DEFAULT_MAX_LIVE_PROOFS, DEFAULT_MAX_LIVE_PROOFS_PER_DID};
pub use server::{serve, serve_with_shutdown, start, start_split, RunningServer, Server, ServerError, Stats};
pub use tls::{TlsConfig, TlsError};
