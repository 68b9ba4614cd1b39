use super::{AeadError, CryptoProvider, NONCE_LEN, TAG_LEN};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroize;

/// HKDF-SHA256 with RustCrypto's SHA-256 (SHA-NI where the CPU has it).
pub(super) fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(salt), ikm);
    // Only fails for out.len() > 255 * 32, which no caller requests.
    if hk.expand(info, out).is_err() {
        out.zeroize();
    }
}

/// Both HMACs of a chain step from one keyed state.
pub(super) fn chain_step(chain_key: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
    // A 32-byte key is always accepted by HMAC.
    let Ok(keyed) = <Hmac<Sha256> as Mac>::new_from_slice(chain_key) else {
        return ([0; 32], [0; 32]);
    };
    let mut a = keyed.clone();
    a.update(&[0x01]);
    let mut b = keyed;
    b.update(&[0x02]);
    (a.finalize().into_bytes().into(), b.finalize().into_bytes().into())
}

/// Pure-Rust provider: x25519-dalek, chacha20poly1305, hkdf and hmac.
#[derive(Debug, Clone, Copy)]
pub struct RustCrypto;

impl CryptoProvider for RustCrypto {
    const NAME: &'static str = "rustcrypto";

    type PreparedSecret = x25519_dalek::StaticSecret;

    fn prepare(secret: &[u8; 32]) -> Self::PreparedSecret {
        x25519_dalek::StaticSecret::from(*secret)
    }

    // StaticSecret -> PublicKey uses the precomputed Edwards base-point
    // table, several times faster than a ladder with the base point.
    fn prepared_public(secret: &Self::PreparedSecret) -> [u8; 32] {
        x25519_dalek::PublicKey::from(secret).to_bytes()
    }

    fn prepared_x25519(secret: &Self::PreparedSecret, public: &[u8; 32]) -> [u8; 32] {
        secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(*public))
            .to_bytes()
    }

    fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) {
        hkdf_sha256(salt, ikm, info, out)
    }

    fn chain_step(chain_key: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
        chain_step(chain_key)
    }

    fn seal(key: &[u8; 32], nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
        let start = out.len();
        out.reserve(plaintext.len() + TAG_LEN);
        out.extend_from_slice(plaintext);
        let body = out.get_mut(start..).unwrap_or_default();
        // Only fails for messages over 256 GiB.
        match cipher.encrypt_in_place_detached(Nonce::from_slice(nonce), aad, body) {
            Ok(tag) => out.extend_from_slice(&tag),
            Err(_) => out.truncate(start),
        }
    }

    fn open(
        key: &[u8; 32],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Vec<u8>, AeadError> {
        let split = ciphertext_and_tag.len().checked_sub(TAG_LEN).ok_or(AeadError)?;
        let (ciphertext, tag) = ciphertext_and_tag.split_at(split);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
        let mut buf = ciphertext.to_vec();
        cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, &mut buf, Tag::from_slice(tag))
            .map_err(|_| AeadError)?;
        Ok(buf)
    }
}
