//! Golden vectors for AgentMesh (schema `agentmesh-golden/1`): a general
//! interpreter that replays any x3dh, ratchet or identity file against
//! meshwire, and the generator of meshwire's own vectors.
//!
//! The interpreter is driven only by what a file records: it feeds each
//! party the recorded private keys and nonces through a scripted RNG and
//! compares every recorded output, so it checks cases it has never seen.
#![forbid(unsafe_code)]

pub mod generate;
pub mod mesh_session;
pub mod rng;
pub mod schema;
pub mod verify;

pub use verify::{verify_document, verify_path, CaseOutcome, CaseResult, VerifyError};
