//! Golden vectors for AgentMesh (schema `agentmesh-golden/1`): a general
//! interpreter that replays any x3dh, ratchet, identity or mesh-session
//! file against meshwire, and the generator of meshwire's own vectors
//! (`mesh_generate` records two meshwire clients through a scripted relay).
//!
//! The interpreter is driven only by what a file records: it feeds each
//! party the recorded private keys and nonces through a scripted RNG and
//! compares every recorded output, so it checks cases it has never seen.
//!
//! # Verifying vectors
//!
//! [`verify_path`] takes one file, or a directory that it searches
//! recursively for `*.json`; [`verify_document`] takes the JSON text of one
//! file. Both return one [`CaseResult`] per case: a case that differs from
//! what meshwire computes is a [`CaseOutcome::Failed`] naming the field,
//! while a file that is not an `agentmesh-golden/1` document, or cannot be
//! read, is a [`VerifyError`].
//!
//! ```
//! use meshwire_vectors::{verify_document, verify_path, CaseOutcome, VerifyError};
//! use std::path::Path;
//!
//! // meshwire's own vectors, at the repository root.
//! let vectors = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../vectors");
//!
//! // One file (pass `&vectors` to verify the whole directory).
//! let results = verify_path(&vectors.join("x3dh-spec.json"))?;
//! for result in &results {
//!     println!("{result}"); // e.g. "PASS vectors/x3dh-spec.json x3dh x3dh-otk"
//! }
//! assert!(!results.is_empty());
//! assert!(results.iter().all(|r| r.outcome == CaseOutcome::Passed));
//!
//! // A document of another schema is refused as a whole.
//! let other = r#"{"schema": "other/1", "kind": "x3dh", "cases": []}"#;
//! assert!(matches!(
//!     verify_document(other, "inline"),
//!     Err(VerifyError::Schema { .. })
//! ));
//! # Ok::<(), VerifyError>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod generate;
pub mod mesh_generate;
pub mod mesh_session;
pub mod rng;
pub mod schema;
pub mod verify;

pub use verify::{verify_document, verify_path, CaseOutcome, CaseResult, VerifyError};
