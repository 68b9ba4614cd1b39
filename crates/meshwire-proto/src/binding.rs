//! Binding keys to the DID they speak for.
//!
//! A `did:mesh` DID is `did:mesh:` followed by the first 32 hex characters
//! of sha256(Ed25519 public key), and the agent's X25519 identity key is the
//! Montgomery image of that Ed25519 key (the clamped lower half of
//! sha512(seed), as libsodium's `crypto_sign_ed25519_sk_to_curve25519`
//! computes it). Every identity of the reference runtimes (TypeScript main,
//! npm 4.0.0, Python `agentmesh` 5.0.0) is built that way, so a DID has
//! exactly one pair of identity keys and every key that claims to be a DID's
//! can be checked:
//!
//! - with both keys (a pre-key bundle): the DID must derive from the Ed25519
//!   key and the X25519 key must be its Montgomery image;
//! - with the X25519 key alone (a KNOCK's establishment): one of its two
//!   Edwards preimages (the Montgomery form drops the sign of x) must derive
//!   the DID.
//!
//! ```
//! use meshwire_proto::binding::{check_identity_keys, check_x25519_identity, BindingError};
//! use meshwire_proto::Identity;
//!
//! let alice = Identity::from_seed(&[1; 32]);
//! let mallory = Identity::from_seed(&[2; 32]);
//! check_identity_keys(alice.did(), &alice.ed25519_public(), alice.x25519_public()).unwrap();
//! assert_eq!(check_x25519_identity(alice.did(), alice.x25519_public()).unwrap(), alice.ed25519_public());
//! assert_eq!(
//!     check_x25519_identity(alice.did(), mallory.x25519_public()),
//!     Err(BindingError::DidMismatch)
//! );
//! ```

use crate::identity::Did;
use crate::keys::{Ed25519PublicKey, X25519PublicKey};
use curve25519_dalek::edwards::CompressedEdwardsY;
use curve25519_dalek::montgomery::MontgomeryPoint;

/// A key does not belong to the DID it was presented for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// The Ed25519 key is not a valid curve point.
    #[error("the Ed25519 identity key is not a valid curve point")]
    InvalidEd25519Key,
    /// The DID is not the one the Ed25519 key derives (sha256 prefix).
    #[error("the identity key does not derive the DID (sha256 mismatch)")]
    DidMismatch,
    /// The X25519 identity key is not the Montgomery image of the Ed25519 key.
    #[error("the X25519 identity key is not the Ed25519 key's Montgomery image")]
    IdentityKeyMismatch,
}

/// The X25519 key an Ed25519 public key maps to (its Montgomery image).
pub fn montgomery_image(key: &Ed25519PublicKey) -> Result<X25519PublicKey, BindingError> {
    let point = CompressedEdwardsY(*key.as_bytes())
        .decompress()
        .ok_or(BindingError::InvalidEd25519Key)?;
    Ok(X25519PublicKey::from_bytes(point.to_montgomery().to_bytes()))
}

/// Checks that `ed` derives `did` and that `x` is `ed`'s Montgomery image.
pub fn check_identity_keys(did: &Did, ed: &Ed25519PublicKey, x: &X25519PublicKey) -> Result<(), BindingError> {
    if !did.is_derived_from(ed) {
        return Err(BindingError::DidMismatch);
    }
    if montgomery_image(ed)? != *x {
        return Err(BindingError::IdentityKeyMismatch);
    }
    Ok(())
}

/// Checks that the X25519 identity key `x` belongs to `did`: one of its two
/// Edwards preimages derives the DID. Returns that Ed25519 key.
pub fn check_x25519_identity(did: &Did, x: &X25519PublicKey) -> Result<Ed25519PublicKey, BindingError> {
    // A non-canonical u (>= 2^255 - 19, or the top bit set) is another
    // encoding of a canonical one: it is not the key a DID's Ed25519 key maps
    // to, whatever it reduces to.
    if !is_canonical_field_element(x.as_bytes()) {
        return Err(BindingError::DidMismatch);
    }
    // The two preimages differ only in the sign of x, which is the top bit of
    // the compressed encoding: one conversion finds both.
    let edwards = MontgomeryPoint(*x.as_bytes())
        .to_edwards(0)
        .ok_or(BindingError::DidMismatch)?;
    let mut encoding = edwards.compress().to_bytes();
    for _ in 0..2 {
        let ed = Ed25519PublicKey::from_bytes(encoding);
        if did.is_derived_from(&ed) {
            return Ok(ed);
        }
        encoding[31] ^= 0x80;
    }
    Err(BindingError::DidMismatch)
}

/// Whether 32 little-endian bytes are a field element below 2^255 - 19.
fn is_canonical_field_element(bytes: &[u8; 32]) -> bool {
    if bytes[31] & 0x80 != 0 {
        return false;
    }
    // Values in [2^255 - 19, 2^255) are 0x7f ff .. ff followed by a low
    // byte of 0xed or more.
    let top_is_max = bytes[31] == 0x7f && bytes[1..31].iter().all(|b| *b == 0xff);
    !(top_is_max && bytes[0] >= 0xed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    #[test]
    fn both_sign_bits_are_tried() {
        // Seeds until both signs of x were seen, to exercise both preimages.
        let mut signs = [false; 2];
        for seed in 0u8..64 {
            let id = Identity::from_seed(&[seed; 32]);
            let sign = usize::from(id.ed25519_public().as_bytes()[31] >> 7);
            signs[sign] = true;
            assert_eq!(montgomery_image(&id.ed25519_public()).unwrap(), *id.x25519_public());
            assert_eq!(
                check_x25519_identity(id.did(), id.x25519_public()).unwrap(),
                id.ed25519_public()
            );
            check_identity_keys(id.did(), &id.ed25519_public(), id.x25519_public()).unwrap();
        }
        assert_eq!(signs, [true, true]);
    }

    #[test]
    fn other_keys_are_refused() {
        let alice = Identity::from_seed(&[1; 32]);
        let mallory = Identity::from_seed(&[2; 32]);
        assert_eq!(
            check_identity_keys(alice.did(), &mallory.ed25519_public(), mallory.x25519_public()),
            Err(BindingError::DidMismatch)
        );
        assert_eq!(
            check_identity_keys(alice.did(), &alice.ed25519_public(), mallory.x25519_public()),
            Err(BindingError::IdentityKeyMismatch)
        );
        assert_eq!(
            check_x25519_identity(alice.did(), mallory.x25519_public()),
            Err(BindingError::DidMismatch)
        );
        // A DID a registry assigned (not a key hash) binds no key at all.
        let named = Did::parse("did:mesh:alice").unwrap();
        assert_eq!(
            check_x25519_identity(&named, alice.x25519_public()),
            Err(BindingError::DidMismatch)
        );
        // Low-order and non-canonical u values have no usable preimage; a
        // non-canonical encoding of Alice's own key is not her key either.
        let mut non_canonical = *alice.x25519_public().as_bytes();
        non_canonical[31] |= 0x80;
        let mut p_plus_1 = [0xffu8; 32];
        p_plus_1[0] = 0xee;
        p_plus_1[31] = 0x7f;
        assert!(!is_canonical_field_element(&p_plus_1));
        p_plus_1[0] = 0xec;
        assert!(is_canonical_field_element(&p_plus_1));
        for bad in [[0u8; 32], [0xff; 32], non_canonical] {
            assert_eq!(
                check_x25519_identity(alice.did(), &X25519PublicKey::from_bytes(bad)),
                Err(BindingError::DidMismatch)
            );
        }
        // About half of all y values are not on the curve.
        let not_a_point = (2u8..=255)
            .map(|y| {
                let mut bytes = [0u8; 32];
                bytes[0] = y;
                Ed25519PublicKey::from_bytes(bytes)
            })
            .find(|key| montgomery_image(key).is_err())
            .unwrap();
        assert_eq!(montgomery_image(&not_a_point), Err(BindingError::InvalidEd25519Key));
        let named_did = Did::from_public_key(&not_a_point);
        assert_eq!(
            check_identity_keys(&named_did, &not_a_point, alice.x25519_public()),
            Err(BindingError::InvalidEd25519Key)
        );
    }
}
