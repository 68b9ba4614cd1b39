//! The symmetric and Diffie-Hellman primitives the protocol needs, behind a
//! provider chosen at build time (as rustls does it).
//!
//! Two providers implement [`CryptoProvider`]: [`RustCrypto`] (x25519-dalek,
//! chacha20poly1305, hkdf/hmac) is the default, `AwsLc` (aws-lc-rs) is
//! enabled by the `aws-lc-rs` cargo feature and then becomes [`Active`].
//! Ed25519 stays on ed25519-dalek in both.

mod rust_crypto;
pub use rust_crypto::RustCrypto;

#[cfg(feature = "aws-lc-rs")]
mod aws_lc;
#[cfg(feature = "aws-lc-rs")]
pub use aws_lc::AwsLc;

/// The provider this build uses.
#[cfg(not(feature = "aws-lc-rs"))]
pub type Active = RustCrypto;
/// The provider this build uses.
#[cfg(feature = "aws-lc-rs")]
pub type Active = AwsLc;

/// Length of a ChaCha20-Poly1305 nonce.
pub const NONCE_LEN: usize = 12;
/// Length of a ChaCha20-Poly1305 tag.
pub const TAG_LEN: usize = 16;

/// The AEAD tag did not verify (or the ciphertext was shorter than a tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AeadError;

/// Primitives, as associated functions so that the active provider is
/// resolved statically and costs nothing at run time.
pub trait CryptoProvider {
    /// Human-readable provider name, reported by benchmarks and the CLI.
    const NAME: &'static str;

    /// A private key parsed once for repeated Diffie-Hellman (aws-lc keeps
    /// the key object and its public half; re-parsing costs a base-point
    /// multiplication per operation).
    type PreparedSecret: Send + Sync;

    /// Parses a raw (unclamped) X25519 private key.
    fn prepare(secret: &[u8; 32]) -> Self::PreparedSecret;

    /// The public key of a prepared secret.
    fn prepared_public(secret: &Self::PreparedSecret) -> [u8; 32];

    /// X25519 with a prepared secret; all zeros for low-order points.
    fn prepared_x25519(secret: &Self::PreparedSecret, public: &[u8; 32]) -> [u8; 32];

    /// Raw X25519 (RFC 7748): clamps `secret`, multiplies `public`. The result
    /// may be all zeros for low-order points; callers reject that.
    fn x25519(secret: &[u8; 32], public: &[u8; 32]) -> [u8; 32] {
        Self::prepared_x25519(&Self::prepare(secret), public)
    }

    /// X25519 with the base point: the public key of `secret`.
    fn x25519_base(secret: &[u8; 32]) -> [u8; 32] {
        Self::prepared_public(&Self::prepare(secret))
    }

    /// HKDF-SHA256 extract-and-expand into `out` (at most 255 * 32 bytes).
    fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]);

    /// The symmetric-key ratchet step:
    /// `(HMAC-SHA256(chain_key, 0x01), HMAC-SHA256(chain_key, 0x02))`.
    fn chain_step(chain_key: &[u8; 32]) -> ([u8; 32], [u8; 32]);

    /// ChaCha20-Poly1305 seal; appends `ciphertext || tag` to `out`.
    fn seal(key: &[u8; 32], nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>);

    /// ChaCha20-Poly1305 open of `ciphertext || tag`.
    fn open(
        key: &[u8; 32],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Vec<u8>, AeadError>;
}

/// Name of the provider compiled into this build.
pub fn active_provider_name() -> &'static str {
    <Active as CryptoProvider>::NAME
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7748 section 5.2, first test vector.
    #[test]
    fn x25519_rfc7748() {
        let scalar = hex::decode("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4").unwrap();
        let point = hex::decode("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c").unwrap();
        let out = Active::x25519(&scalar.try_into().unwrap(), &point.try_into().unwrap());
        assert_eq!(
            hex::encode(out),
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
        );
    }

    // RFC 8439 section 2.8.2.
    #[test]
    fn chacha20poly1305_rfc8439() {
        let key: [u8; 32] = hex::decode("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
            .unwrap()
            .try_into()
            .unwrap();
        let nonce: [u8; 12] = hex::decode("070000004041424344454647").unwrap().try_into().unwrap();
        let aad = hex::decode("50515253c0c1c2c3c4c5c6c7").unwrap();
        let pt = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let mut out = Vec::new();
        Active::seal(&key, &nonce, &aad, pt, &mut out);
        assert_eq!(hex::encode(&out[pt.len()..]), "1ae10b594f09e26a7e902ecbd0600691");
        assert_eq!(&hex::encode(&out[..16]), "d31a8d34648e60db7b86afbc53ef7ec2");
        assert_eq!(Active::open(&key, &nonce, &aad, &out).unwrap(), pt);
        let mut bad = out.clone();
        bad[3] ^= 1;
        assert_eq!(Active::open(&key, &nonce, &aad, &bad), Err(AeadError));
        assert_eq!(Active::open(&key, &nonce, &aad, &out[..15]), Err(AeadError));
    }

    // RFC 5869 test case 1.
    #[test]
    fn hkdf_rfc5869() {
        let ikm = [0x0bu8; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let mut okm = [0u8; 42];
        Active::hkdf_sha256(&salt, &ikm, &info, &mut okm);
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn chain_step_is_hmac_01_02() {
        use hmac::Mac;
        let ck = [7u8; 32];
        let (mk, next) = Active::chain_step(&ck);
        let mac = |b: u8| {
            let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&ck).unwrap();
            m.update(&[b]);
            m.finalize().into_bytes().to_vec()
        };
        assert_eq!(mk.to_vec(), mac(1));
        assert_eq!(next.to_vec(), mac(2));
    }
}
