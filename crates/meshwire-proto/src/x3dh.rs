//! X3DH key agreement as AgentMesh runs it.

use crate::crypto::{Active, CryptoProvider};
use crate::identity::Identity;
use crate::keys::{KeyError, KeyPair, SharedDh, SharedSecret, X25519PublicKey};
use crate::prekeys::{BundleError, OneTimeKeyId, PreKeyBundle, PreKeys, SignedPreKey};
use rand_core::CryptoRngCore;
use std::fmt;
use std::str::FromStr;
use zeroize::Zeroizing;

const X3DH_INFO: &[u8] = b"AgentMesh_X3DH_v1";

/// How the X3DH shared secret is derived from the DH outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KdfDialect {
    /// HKDF-SHA256 with salt 0x00*32 over 0xFF*32 || DH1..DH4 (Signal's
    /// X3DH; TypeScript main and Python 5.0.0).
    #[default]
    Spec,
    /// HKDF-SHA256 with salt 0xFF*32 over DH1..DH4 (npm SDK 4.0.0 and older
    /// Python).
    LegacyFfSalt,
}

impl KdfDialect {
    /// The name vector files and registry metadata use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Spec => "spec",
            Self::LegacyFfSalt => "legacy-ff-salt",
        }
    }
}

impl fmt::Display for KdfDialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name is neither `spec` nor `legacy-ff-salt`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown KDF dialect {0:?}")]
pub struct UnknownDialect(pub String);

impl FromStr for KdfDialect {
    type Err = UnknownDialect;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spec" => Ok(Self::Spec),
            "legacy-ff-salt" => Ok(Self::LegacyFfSalt),
            other => Err(UnknownDialect(other.to_owned())),
        }
    }
}

/// X3DH failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X3dhError {
    #[error("pre-key bundle: {0}")]
    /// The bundle did not verify.
    Bundle(#[from] BundleError),
    #[error("a public key is of low order")]
    /// A public key is of low order.
    NonContributory,
    #[error("one-time pre-key {0} is unknown or already consumed")]
    /// The establishment names a one-time key not held.
    UnknownOneTimeKey(OneTimeKeyId),
    /// The initiator's X25519 identity key is not the key of the DID it
    /// claims (see [`crate::binding`]).
    #[error("the establishment's identity key does not belong to {did}: {reason}")]
    NotTheInitiatorsKey {
        /// The DID the establishment claimed to come from.
        did: String,
        /// Which check failed.
        reason: crate::binding::BindingError,
    },
}

impl From<KeyError> for X3dhError {
    fn from(_: KeyError) -> Self {
        Self::NonContributory
    }
}

/// The agreed secret with everything a transcript check needs.
pub struct X3dhOutput {
    /// The agreed secret (zeroized on drop).
    pub shared_secret: SharedSecret,
    /// `IK_initiator || IK_responder`.
    pub associated_data: [u8; 64],
    /// DH1..DH3, and DH4 when a one-time key was used, in order.
    pub dh_outputs: Vec<SharedDh>,
}

impl fmt::Debug for X3dhOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X3dhOutput")
            .field("associated_data", &hex::encode(self.associated_data))
            .finish_non_exhaustive()
    }
}

/// What the initiator sends so the responder can run its side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initiation {
    /// The initiator's X25519 identity key (`ik`).
    pub identity_key: X25519PublicKey,
    /// The initiator's ephemeral key (`ek`).
    pub ephemeral_key: X25519PublicKey,
    /// The one-time pre-key it used (`otk`), if any.
    pub one_time_key_id: Option<OneTimeKeyId>,
}

fn derive(
    dialect: KdfDialect,
    dhs: &[SharedDh],
    initiator: &X25519PublicKey,
    responder: &X25519PublicKey,
) -> X3dhOutput {
    let mut ikm = Zeroizing::new(Vec::with_capacity(32 * 5));
    let salt = match dialect {
        KdfDialect::Spec => {
            ikm.extend_from_slice(&[0xff; 32]);
            [0x00; 32]
        }
        KdfDialect::LegacyFfSalt => [0xff; 32],
    };
    for dh in dhs {
        ikm.extend_from_slice(dh.as_bytes());
    }
    let mut secret = Zeroizing::new([0u8; 32]);
    Active::hkdf_sha256(&salt, &ikm, X3DH_INFO, secret.as_mut());
    let mut associated_data = [0u8; 64];
    associated_data[..32].copy_from_slice(initiator.as_bytes());
    associated_data[32..].copy_from_slice(responder.as_bytes());
    X3dhOutput {
        shared_secret: SharedSecret::from_bytes(*secret),
        associated_data,
        dh_outputs: dhs.to_vec(),
    }
}

/// The initiator's side: verifies `bundle`, draws the ephemeral key (32 bytes
/// of `rng`) and agrees on a secret.
pub fn initiate(
    rng: &mut impl CryptoRngCore,
    identity: &Identity,
    bundle: &PreKeyBundle,
    dialect: KdfDialect,
) -> Result<(X3dhOutput, Initiation), X3dhError> {
    bundle.verify()?;
    let ephemeral = KeyPair::generate(rng);
    initiate_with_ephemeral(identity, bundle, &ephemeral, dialect)
}

/// [`initiate`] with a given ephemeral key (bundle not re-verified).
pub fn initiate_with_ephemeral(
    identity: &Identity,
    bundle: &PreKeyBundle,
    ephemeral: &KeyPair,
    dialect: KdfDialect,
) -> Result<(X3dhOutput, Initiation), X3dhError> {
    let ik = identity.x25519_secret();
    let ek = ephemeral.secret();
    let mut dhs = vec![
        ik.diffie_hellman(&bundle.signed_pre_key)?,
        ek.diffie_hellman(&bundle.identity_key)?,
        ek.diffie_hellman(&bundle.signed_pre_key)?,
    ];
    if let Some((_, otk)) = &bundle.one_time_pre_key {
        dhs.push(ek.diffie_hellman(otk)?);
    }
    let output = derive(dialect, &dhs, identity.x25519_public(), &bundle.identity_key);
    let initiation = Initiation {
        identity_key: *identity.x25519_public(),
        ephemeral_key: *ephemeral.public(),
        one_time_key_id: bundle.one_time_pre_key.map(|(id, _)| id),
    };
    Ok((output, initiation))
}

/// The responder's side. Reads, but does not remove, the one-time key: the
/// caller removes it once the first message decrypted.
pub fn respond(
    identity: &Identity,
    prekeys: &PreKeys,
    initiation: &Initiation,
    dialect: KdfDialect,
) -> Result<X3dhOutput, X3dhError> {
    respond_with(identity, prekeys.signed_pre_key(), prekeys, initiation, dialect)
}

/// [`respond`] with a given signed pre-key (the current one or, while it is
/// kept after a rotation, the previous one: an establishment does not name
/// the signed pre-key it used).
pub fn respond_with(
    identity: &Identity,
    spk: &SignedPreKey,
    prekeys: &PreKeys,
    initiation: &Initiation,
    dialect: KdfDialect,
) -> Result<X3dhOutput, X3dhError> {
    let spk_secret = spk.pair.secret();
    let mut dhs = vec![
        spk_secret.diffie_hellman(&initiation.identity_key)?,
        identity.x25519_secret().diffie_hellman(&initiation.ephemeral_key)?,
        spk_secret.diffie_hellman(&initiation.ephemeral_key)?,
    ];
    if let Some(id) = initiation.one_time_key_id {
        let otk = prekeys.one_time_key(id).ok_or(X3dhError::UnknownOneTimeKey(id))?;
        dhs.push(otk.secret().diffie_hellman(&initiation.ephemeral_key)?);
    }
    Ok(derive(
        dialect,
        &dhs,
        &initiation.identity_key,
        identity.x25519_public(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    #[test]
    fn both_sides_agree_in_both_dialects_and_dialects_differ() {
        let alice = Identity::generate(&mut OsRng);
        let bob = Identity::generate(&mut OsRng);
        let mut keys = PreKeys::generate(&mut OsRng, &bob);
        let ids = keys.generate_one_time_keys(&mut OsRng, 1).unwrap();
        for otk in [None, Some(ids[0])] {
            let bundle = keys.bundle(&bob, otk);
            let ek = KeyPair::generate(&mut OsRng);
            let mut secrets = Vec::new();
            for dialect in [KdfDialect::Spec, KdfDialect::LegacyFfSalt] {
                let (a, init) = initiate_with_ephemeral(&alice, &bundle, &ek, dialect).unwrap();
                let b = respond(&bob, &keys, &init, dialect).unwrap();
                assert_eq!(a.shared_secret, b.shared_secret);
                assert_eq!(a.associated_data, b.associated_data);
                assert_eq!(a.dh_outputs.len(), if otk.is_some() { 4 } else { 3 });
                secrets.push(a.shared_secret);
            }
            assert_ne!(secrets[0], secrets[1]);
        }
    }

    #[test]
    fn forged_bundle_and_unknown_otk_are_rejected() {
        let alice = Identity::generate(&mut OsRng);
        let bob = Identity::generate(&mut OsRng);
        let keys = PreKeys::generate(&mut OsRng, &bob);
        let mut bundle = keys.bundle(&bob, None);
        bundle.signed_pre_key_signature[10] ^= 0x40;
        assert_eq!(
            initiate(&mut OsRng, &alice, &bundle, KdfDialect::Spec).unwrap_err(),
            X3dhError::Bundle(BundleError::BadSignature)
        );
        let init = Initiation {
            identity_key: *alice.x25519_public(),
            ephemeral_key: *alice.x25519_public(),
            one_time_key_id: Some(5),
        };
        assert_eq!(
            respond(&bob, &keys, &init, KdfDialect::Spec).unwrap_err(),
            X3dhError::UnknownOneTimeKey(5)
        );
        let low_order = Initiation {
            ephemeral_key: X25519PublicKey::from_bytes([0; 32]),
            one_time_key_id: None,
            ..init
        };
        assert_eq!(
            respond(&bob, &keys, &low_order, KdfDialect::Spec).unwrap_err(),
            X3dhError::NonContributory
        );
    }
}
