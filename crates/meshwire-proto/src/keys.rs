//! Typed key material. Secrets zeroize on drop and never print.

use crate::crypto::{Active, CryptoProvider};
use rand_core::CryptoRngCore;
use std::fmt;
use std::sync::OnceLock;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A key or key-like value had the wrong length or encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("expected {expected} bytes, got {actual}")]
    /// The input had the wrong length.
    InvalidLength {
        /// The length required.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    #[error("invalid encoding")]
    /// Not valid text encoding.
    InvalidEncoding,
    #[error("Diffie-Hellman with a low-order public key")]
    /// A Diffie-Hellman with a low-order point (all-zero output).
    NonContributory,
    #[error("invalid Ed25519 public key")]
    /// Not a valid Ed25519 point.
    InvalidEd25519Key,
}

pub(crate) fn array32(bytes: &[u8]) -> Result<[u8; 32], KeyError> {
    bytes.try_into().map_err(|_| KeyError::InvalidLength {
        expected: 32,
        actual: bytes.len(),
    })
}

macro_rules! public_key_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Wraps 32 raw bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// Parses a slice that must be exactly 32 bytes long.
            pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
                array32(bytes).map(Self)
            }

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Lowercase hex.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), hex::encode(self.0))
            }
        }
    };
}

macro_rules! secret_key_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Wraps 32 raw secret bytes.
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// Parses a slice that must be exactly 32 bytes long.
            pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
                array32(bytes).map(Self)
            }

            /// The raw secret bytes: handle with care.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.0.ct_eq(&other.0).into()
            }
        }

        impl Eq for $name {}

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

public_key_type!(
    /// An X25519 public key.
    X25519PublicKey
);
public_key_type!(
    /// An Ed25519 public (verifying) key, as raw bytes.
    Ed25519PublicKey
);
secret_key_type!(
    /// The 32-byte secret X3DH agrees on.
    SharedSecret
);
secret_key_type!(
    /// A Double Ratchet root key.
    RootKey
);
secret_key_type!(
    /// A Double Ratchet chain key.
    ChainKey
);
secret_key_type!(
    /// A single-message key.
    MessageKey
);

/// An X25519 private key, stored as drawn (X25519 clamps when it uses it),
/// with the provider's parsed form made on first use.
pub struct X25519Secret {
    bytes: [u8; 32],
    prepared: OnceLock<<Active as CryptoProvider>::PreparedSecret>,
}

impl Clone for X25519Secret {
    fn clone(&self) -> Self {
        Self::from_bytes(self.bytes)
    }
}

impl Drop for X25519Secret {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl PartialEq for X25519Secret {
    fn eq(&self, other: &Self) -> bool {
        self.bytes.ct_eq(&other.bytes).into()
    }
}

impl Eq for X25519Secret {}

impl fmt::Debug for X25519Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("X25519Secret(<redacted>)")
    }
}

impl X25519Secret {
    /// Wraps 32 raw secret bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self {
            bytes,
            prepared: OnceLock::new(),
        }
    }

    /// Parses a slice that must be exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        array32(bytes).map(Self::from_bytes)
    }

    /// The raw secret bytes: handle with care.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Draws 32 bytes from `rng`.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        let secret = Self::from_bytes(bytes);
        bytes.zeroize();
        secret
    }

    fn prepared(&self) -> &<Active as CryptoProvider>::PreparedSecret {
        self.prepared.get_or_init(|| Active::prepare(&self.bytes))
    }

    /// The matching public key.
    pub fn public_key(&self) -> X25519PublicKey {
        X25519PublicKey(Active::prepared_public(self.prepared()))
    }

    /// X25519 with `public`; refuses a low-order `public` (all-zero output),
    /// as libsodium and OpenSSL do for the reference runtimes.
    pub fn diffie_hellman(&self, public: &X25519PublicKey) -> Result<SharedDh, KeyError> {
        let out = SharedDh(Active::prepared_x25519(self.prepared(), &public.0));
        if bool::from(out.0.ct_eq(&[0u8; 32])) {
            return Err(KeyError::NonContributory);
        }
        Ok(out)
    }
}

/// The output of one X25519 operation.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SharedDh(pub(crate) [u8; 32]);

impl SharedDh {
    /// The raw output bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SharedDh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedDh(<redacted>)")
    }
}

/// An X25519 key pair.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    secret: X25519Secret,
    public: X25519PublicKey,
}

impl KeyPair {
    /// Draws a fresh pair from `rng` (32 bytes, as every reference runtime does).
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        Self::from_secret(X25519Secret::generate(rng))
    }

    /// The pair of a known secret.
    pub fn from_secret(secret: X25519Secret) -> Self {
        let public = secret.public_key();
        Self { secret, public }
    }

    pub(crate) fn from_parts(secret: X25519Secret, public: X25519PublicKey) -> Self {
        Self { secret, public }
    }

    /// The secret half (never printed).
    pub fn secret(&self) -> &X25519Secret {
        &self.secret
    }

    /// The public half.
    pub fn public(&self) -> &X25519PublicKey {
        &self.public
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_secret_bytes() {
        let bytes = [0xabu8; 32];
        let secret = X25519Secret::from_bytes(bytes);
        let pair = KeyPair::from_secret(secret.clone());
        for text in [
            format!("{secret:?}"),
            format!("{pair:?}"),
            format!("{:?}", RootKey::from_bytes(bytes)),
            format!("{:?}", ChainKey::from_bytes(bytes)),
            format!("{:?}", MessageKey::from_bytes(bytes)),
            format!("{:?}", SharedSecret::from_bytes(bytes)),
        ] {
            assert!(!text.contains("abab"), "{text}");
            assert!(!text.contains("171, 171"), "{text}");
        }
        assert!(format!("{pair:?}").contains(&pair.public().to_hex()));
    }

    #[test]
    fn low_order_public_is_refused() {
        let secret = X25519Secret::from_bytes([1u8; 32]);
        assert_eq!(
            secret
                .diffie_hellman(&X25519PublicKey::from_bytes([0u8; 32]))
                .unwrap_err(),
            KeyError::NonContributory
        );
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(secret.diffie_hellman(&X25519PublicKey::from_bytes(one)).is_err());
    }

    #[test]
    fn lengths_are_checked() {
        assert_eq!(
            X25519PublicKey::from_slice(&[0u8; 31]).unwrap_err(),
            KeyError::InvalidLength {
                expected: 32,
                actual: 31
            }
        );
        assert!(X25519Secret::from_slice(&[0u8; 33]).is_err());
    }
}
