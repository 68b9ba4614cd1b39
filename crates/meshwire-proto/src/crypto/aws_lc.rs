use super::{AeadError, CryptoProvider, NONCE_LEN, TAG_LEN};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use aws_lc_rs::agreement;

/// aws-lc-rs provider: AWS-LC's assembly X25519 and ChaCha20-Poly1305.
#[derive(Debug, Clone, Copy)]
pub struct AwsLc;

impl CryptoProvider for AwsLc {
    const NAME: &'static str = "aws-lc-rs";

    type PreparedSecret = Option<agreement::PrivateKey>;

    fn prepare(secret: &[u8; 32]) -> Self::PreparedSecret {
        agreement::PrivateKey::from_private_key(&agreement::X25519, secret).ok()
    }

    fn prepared_public(secret: &Self::PreparedSecret) -> [u8; 32] {
        let mut out = [0u8; 32];
        if let Some(public) = secret.as_ref().and_then(|s| s.compute_public_key().ok()) {
            if public.as_ref().len() == 32 {
                out.copy_from_slice(public.as_ref());
            }
        }
        out
    }

    fn prepared_x25519(secret: &Self::PreparedSecret, public: &[u8; 32]) -> [u8; 32] {
        let mut out = [0u8; 32];
        let Some(private) = secret else { return out };
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, public);
        // AWS-LC refuses low-order points: the all-zero result reports it.
        let _ = agreement::agree(private, peer, (), |shared| {
            if shared.len() == 32 {
                out.copy_from_slice(shared);
            }
            Ok(())
        });
        out
    }

    // HMAC and HKDF over SHA-256 stay on RustCrypto: with SHA-NI it is 2.3x
    // faster here than aws-lc-rs's per-call HMAC context set-up for the
    // 1-byte HMACs of the chain step (measured by the `primitive` benches).
    fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) {
        super::rust_crypto::hkdf_sha256(salt, ikm, info, out)
    }

    fn chain_step(chain_key: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
        super::rust_crypto::chain_step(chain_key)
    }

    fn seal(key: &[u8; 32], nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let Ok(unbound) = UnboundKey::new(&CHACHA20_POLY1305, key) else {
            return;
        };
        let key = LessSafeKey::new(unbound);
        let start = out.len();
        out.reserve(plaintext.len() + TAG_LEN);
        out.extend_from_slice(plaintext);
        let body = out.get_mut(start..).unwrap_or_default();
        match key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), body) {
            Ok(tag) => out.extend_from_slice(tag.as_ref()),
            Err(_) => out.truncate(start),
        }
    }

    fn open(
        key: &[u8; 32],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Vec<u8>, AeadError> {
        if ciphertext_and_tag.len() < TAG_LEN {
            return Err(AeadError);
        }
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, key).map_err(|_| AeadError)?;
        let key = LessSafeKey::new(unbound);
        let mut buf = ciphertext_and_tag.to_vec();
        let len = key
            .open_in_place(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), &mut buf)
            .map_err(|_| AeadError)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}
