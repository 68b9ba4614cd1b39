//! Sans-I/O core of meshwire, a Rust implementation of the AgentMesh
//! end-to-end encrypted agent-to-agent messaging protocol.
//!
//! The crate holds everything that decides bytes on the wire and nothing that
//! touches a socket, a file or a clock: Ed25519 identities and DIDs, pre-key
//! bundles, X3DH key agreement (in the `spec` and `legacy-ff-salt` KDF
//! dialects), the Double Ratchet and the secure channel built from them.
//! Randomness is always a [`rand_core::CryptoRngCore`] parameter so that
//! callers can replay recorded inputs; production code passes
//! [`rand_core::OsRng`].
//!
//! Every operation that consumes untrusted input returns a typed error and
//! leaves the state it was called on untouched. In particular
//! [`DoubleRatchet::decrypt`] builds the next ratchet state aside and commits
//! it only after the AEAD tag verified.
//!
//! ```
//! use meshwire_proto::{Identity, PreKeys, SecureChannel, KdfDialect};
//! use rand_core::OsRng;
//!
//! let alice = Identity::generate(&mut OsRng);
//! let bob = Identity::generate(&mut OsRng);
//! let mut bob_keys = PreKeys::generate(&mut OsRng, &bob);
//! let otks = bob_keys.generate_one_time_keys(&mut OsRng, 1).unwrap();
//! let bundle = bob_keys.bundle(&bob, Some(otks[0]));
//!
//! let (mut to_bob, establishment) =
//!     SecureChannel::initiate(&mut OsRng, &alice, bob.did(), &bundle, KdfDialect::Spec).unwrap();
//! let first = to_bob.encrypt(&mut OsRng, b"hello bob").unwrap();
//!
//! let (mut to_alice, plaintext) = SecureChannel::accept(
//!     &mut OsRng, &bob, &mut bob_keys, alice.did(), &establishment, &first, KdfDialect::Spec,
//! ).unwrap();
//! assert_eq!(plaintext, b"hello bob");
//! let reply = to_alice.encrypt(&mut OsRng, b"hi alice").unwrap();
//! assert_eq!(to_bob.decrypt(&mut OsRng, &reply).unwrap(), b"hi alice");
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)
)]

pub mod auth;
pub mod binding;
pub mod channel;
pub mod crypto;
pub mod encoding;
pub mod frames;
pub mod identity;
pub mod keys;
pub mod mesh;
pub mod prekeys;
pub mod ratchet;
pub mod registry_wire;
pub mod state;
pub mod time;
pub mod x3dh;

pub use binding::BindingError;
pub use channel::{AcceptError, Establishment, SecureChannel};
pub use identity::{Did, DidError, Identity};
pub use keys::{Ed25519PublicKey, KeyError, KeyPair, SharedSecret, X25519PublicKey, X25519Secret};
pub use prekeys::{BundleError, OneTimeKeyId, PreKeyBundle, PreKeyError, PreKeys};
pub use ratchet::{
    DecryptError, DoubleRatchet, EncryptError, EncryptedMessage, Header, HeaderError, MAX_SKIP, MAX_SKIPPED_KEYS,
};
pub use state::StateError;
pub use x3dh::{KdfDialect, X3dhError, X3dhOutput};
