//! The secure channel: X3DH plus a Double Ratchet bound to both agents' DIDs.

use crate::identity::{Did, Identity};
use crate::keys::{KeyPair, X25519PublicKey};
use crate::prekeys::{PreKeyBundle, PreKeys, SignedPreKey};
use crate::ratchet::{DecryptError, DoubleRatchet, EncryptError, EncryptedMessage};
use crate::x3dh::{self, KdfDialect, X3dhError};
use rand_core::CryptoRngCore;
use std::fmt;

/// What the initiator sends in its KNOCK: `{ik, ek, otk}`.
pub type Establishment = x3dh::Initiation;

/// Accepting an inbound session failed; the pre-keys are unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    #[error(transparent)]
    /// The X3DH step failed.
    X3dh(#[from] X3dhError),
    #[error("first message: {0}")]
    /// The first message did not decrypt.
    Decrypt(#[from] DecryptError),
}

/// `utf8(initiator_did + "|" + responder_did) || IK_initiator || IK_responder`.
pub fn mesh_associated_data(initiator: &Did, responder: &Did, x3dh_associated_data: &[u8; 64]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(initiator.as_str().len() + 1 + responder.as_str().len() + 64);
    ad.extend_from_slice(initiator.as_str().as_bytes());
    ad.push(b'|');
    ad.extend_from_slice(responder.as_str().as_bytes());
    ad.extend_from_slice(x3dh_associated_data);
    ad
}

/// Checks that the establishment's X25519 identity key is `initiator`'s.
fn check_initiator(initiator: &Did, establishment: &Establishment) -> Result<(), X3dhError> {
    crate::binding::check_x25519_identity(initiator, &establishment.identity_key)
        .map(drop)
        .map_err(|reason| X3dhError::NotTheInitiatorsKey {
            did: initiator.to_string(),
            reason,
        })
}

/// An end-to-end encrypted session with one peer.
///
/// The initiator opens it from the responder's [`PreKeyBundle`]
/// ([`SecureChannel::initiate`]) and sends the [`Establishment`] with its
/// first message; the responder opens its side from both
/// ([`SecureChannel::accept`]). A message that does not decrypt (forged,
/// replayed, out of window) is an error that leaves the channel as it was.
///
/// ```
/// use meshwire_proto::{DecryptError, Identity, KdfDialect, PreKeys, SecureChannel};
/// use rand_core::OsRng;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let alice = Identity::generate(&mut OsRng);
/// let bob = Identity::generate(&mut OsRng);
/// let mut bob_keys = PreKeys::generate(&mut OsRng, &bob);
/// let otk = bob_keys.generate_one_time_keys(&mut OsRng, 1)?[0];
/// let bundle = bob_keys.bundle(&bob, Some(otk));
///
/// let (mut to_bob, establishment) =
///     SecureChannel::initiate(&mut OsRng, &alice, bob.did(), &bundle, KdfDialect::Spec)?;
/// let first = to_bob.encrypt(&mut OsRng, b"hello bob")?;
///
/// let (mut to_alice, text) = SecureChannel::accept(
///     &mut OsRng, &bob, &mut bob_keys, alice.did(), &establishment, &first, KdfDialect::Spec,
/// )?;
/// assert_eq!(text, b"hello bob");
/// assert_eq!(bob_keys.one_time_key_count(), 0); // used up once the first message decrypted
///
/// let reply = to_alice.encrypt(&mut OsRng, b"hi alice")?;
/// assert_eq!(to_bob.decrypt(&mut OsRng, &reply)?, b"hi alice");
/// // A replay is refused, and the channel still works afterwards.
/// assert!(matches!(
///     to_bob.decrypt(&mut OsRng, &reply),
///     Err(DecryptError::DuplicateOrExpired { n: 0 })
/// ));
/// let next = to_alice.encrypt(&mut OsRng, b"still here")?;
/// assert_eq!(to_bob.decrypt(&mut OsRng, &next)?, b"still here");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct SecureChannel {
    ratchet: DoubleRatchet,
    associated_data: Vec<u8>,
    local_identity_key: X25519PublicKey,
    remote_identity_key: X25519PublicKey,
    dialect: KdfDialect,
}

impl fmt::Debug for SecureChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureChannel")
            .field("remote_identity_key", &self.remote_identity_key)
            .field("dialect", &self.dialect)
            .field("ratchet", &self.ratchet)
            .finish_non_exhaustive()
    }
}

impl SecureChannel {
    /// Opens a session to `responder` from its `bundle`: checks that the
    /// bundle's identity keys are `responder`'s (see [`crate::binding`]) and
    /// that its signed pre-key verifies under them, runs
    /// X3DH (the ephemeral key is 32 bytes of `rng`), then draws the first
    /// ratchet key (32 more). Send the [`Establishment`] with the first
    /// message.
    pub fn initiate(
        rng: &mut impl CryptoRngCore,
        identity: &Identity,
        responder: &Did,
        bundle: &PreKeyBundle,
        dialect: KdfDialect,
    ) -> Result<(Self, Establishment), X3dhError> {
        // The bundle must speak for `responder`: a bundle of another
        // identity's keys would hand the session to whoever holds them.
        bundle.verify_for(responder)?;
        let ephemeral = KeyPair::generate(rng);
        let (x3dh, establishment) = x3dh::initiate_with_ephemeral(identity, bundle, &ephemeral, dialect)?;
        let ratchet = DoubleRatchet::init_sender(rng, &x3dh.shared_secret, &bundle.signed_pre_key)?;
        let associated_data = mesh_associated_data(identity.did(), responder, &x3dh.associated_data);
        Ok((
            Self::from_parts(
                ratchet,
                associated_data,
                *identity.x25519_public(),
                bundle.identity_key,
                dialect,
            ),
            establishment,
        ))
    }

    /// Accepts an inbound session from its first message. The one-time
    /// pre-key it used is removed from `prekeys` only once that message
    /// decrypted, so a forged establishment cannot burn it.
    pub fn accept(
        rng: &mut impl CryptoRngCore,
        identity: &Identity,
        prekeys: &mut PreKeys,
        initiator: &Did,
        establishment: &Establishment,
        first_message: &EncryptedMessage,
        dialect: KdfDialect,
    ) -> Result<(Self, Vec<u8>), AcceptError> {
        check_initiator(initiator, establishment)?;
        // An establishment does not name the signed pre-key it used: after a
        // rotation, the previous one (kept for a grace period) is tried too.
        let mut result = Err(AcceptError::Decrypt(DecryptError::AuthenticationFailed));
        for spk in std::iter::once(prekeys.signed_pre_key()).chain(prekeys.previous_signed_pre_key()) {
            let mut channel = Self::respond_unchecked(identity, spk, prekeys, initiator, establishment, dialect)?;
            match channel.decrypt(rng, first_message) {
                Ok(plaintext) => {
                    result = Ok((channel, plaintext));
                    break;
                }
                Err(e) => result = Err(AcceptError::Decrypt(e)),
            }
        }
        let (channel, plaintext) = result?;
        if let Some(id) = establishment.one_time_key_id {
            // respond() found the key, so it is there to remove.
            let _ = prekeys.remove_one_time_key(id);
        }
        Ok((channel, plaintext))
    }

    /// The responder's channel before any message arrived, for runtimes
    /// that need it (vector replay, foreign transports). Unlike
    /// [`SecureChannel::accept`] it leaves the one-time key in `prekeys`: the
    /// caller removes it after the first message decrypts.
    pub fn respond(
        identity: &Identity,
        prekeys: &PreKeys,
        initiator: &Did,
        establishment: &Establishment,
        dialect: KdfDialect,
    ) -> Result<Self, X3dhError> {
        check_initiator(initiator, establishment)?;
        Self::respond_unchecked(
            identity,
            prekeys.signed_pre_key(),
            prekeys,
            initiator,
            establishment,
            dialect,
        )
    }

    fn respond_unchecked(
        identity: &Identity,
        spk: &SignedPreKey,
        prekeys: &PreKeys,
        initiator: &Did,
        establishment: &Establishment,
        dialect: KdfDialect,
    ) -> Result<Self, X3dhError> {
        let x3dh = x3dh::respond_with(identity, spk, prekeys, establishment, dialect)?;
        let ratchet = DoubleRatchet::init_receiver(&x3dh.shared_secret, spk.pair.clone());
        let associated_data = mesh_associated_data(initiator, identity.did(), &x3dh.associated_data);
        Ok(Self::from_parts(
            ratchet,
            associated_data,
            *identity.x25519_public(),
            establishment.identity_key,
            dialect,
        ))
    }

    pub(crate) fn from_parts(
        ratchet: DoubleRatchet,
        associated_data: Vec<u8>,
        local_identity_key: X25519PublicKey,
        remote_identity_key: X25519PublicKey,
        dialect: KdfDialect,
    ) -> Self {
        Self {
            ratchet,
            associated_data,
            local_identity_key,
            remote_identity_key,
            dialect,
        }
    }

    /// Encrypts `plaintext` (draws a 12-byte nonce).
    pub fn encrypt(
        &mut self,
        rng: &mut impl CryptoRngCore,
        plaintext: &[u8],
    ) -> Result<EncryptedMessage, EncryptError> {
        self.ratchet.encrypt(rng, plaintext, &self.associated_data)
    }

    /// Decrypts `message`; on error the channel is unchanged.
    pub fn decrypt(
        &mut self,
        rng: &mut impl CryptoRngCore,
        message: &EncryptedMessage,
    ) -> Result<Vec<u8>, DecryptError> {
        self.ratchet.decrypt(rng, message, &self.associated_data)
    }

    /// The Double Ratchet underneath.
    pub fn ratchet(&self) -> &DoubleRatchet {
        &self.ratchet
    }

    /// The mesh associated data every message authenticates.
    pub fn associated_data(&self) -> &[u8] {
        &self.associated_data
    }

    /// Our X25519 identity key.
    pub fn local_identity_key(&self) -> &X25519PublicKey {
        &self.local_identity_key
    }

    /// The peer's X25519 identity key.
    pub fn remote_identity_key(&self) -> &X25519PublicKey {
        &self.remote_identity_key
    }

    /// The X3DH KDF dialect the session was agreed in.
    pub fn dialect(&self) -> KdfDialect {
        self.dialect
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    struct Parties {
        alice: Identity,
        bob: Identity,
        bob_keys: PreKeys,
        bundle: PreKeyBundle,
    }

    fn parties() -> Parties {
        let alice = Identity::generate(&mut OsRng);
        let bob = Identity::generate(&mut OsRng);
        let mut bob_keys = PreKeys::generate(&mut OsRng, &bob);
        let ids = bob_keys.generate_one_time_keys(&mut OsRng, 3).unwrap();
        let bundle = bob_keys.bundle(&bob, Some(ids[1]));
        Parties {
            alice,
            bob,
            bob_keys,
            bundle,
        }
    }

    #[test]
    fn forged_knock_does_not_burn_the_one_time_key() {
        let mut p = parties();
        let (mut alice_ch, est) =
            SecureChannel::initiate(&mut OsRng, &p.alice, p.bob.did(), &p.bundle, KdfDialect::Spec).unwrap();
        let first = alice_ch.encrypt(&mut OsRng, b"hi").unwrap();

        // An attacker replays the establishment with a message of its own.
        let mut forged = first.clone();
        forged.ciphertext[20] ^= 1;
        let err = SecureChannel::accept(
            &mut OsRng,
            &p.bob,
            &mut p.bob_keys,
            p.alice.did(),
            &est,
            &forged,
            KdfDialect::Spec,
        )
        .unwrap_err();
        assert_eq!(err, AcceptError::Decrypt(DecryptError::AuthenticationFailed));
        assert!(p.bob_keys.one_time_key(1).is_some());
        // The wrong dialect fails the same way and also keeps the key.
        let err = SecureChannel::accept(
            &mut OsRng,
            &p.bob,
            &mut p.bob_keys,
            p.alice.did(),
            &est,
            &first,
            KdfDialect::LegacyFfSalt,
        )
        .unwrap_err();
        assert_eq!(err, AcceptError::Decrypt(DecryptError::AuthenticationFailed));
        assert!(p.bob_keys.one_time_key(1).is_some());

        let (mut bob_ch, text) = SecureChannel::accept(
            &mut OsRng,
            &p.bob,
            &mut p.bob_keys,
            p.alice.did(),
            &est,
            &first,
            KdfDialect::Spec,
        )
        .unwrap();
        assert_eq!(text, b"hi");
        assert!(p.bob_keys.one_time_key(1).is_none());
        assert_eq!(p.bob_keys.one_time_key_ids().collect::<Vec<_>>(), vec![0, 2]);
        // The one-time key is gone: the same establishment cannot be accepted twice.
        assert_eq!(
            SecureChannel::accept(
                &mut OsRng,
                &p.bob,
                &mut p.bob_keys,
                p.alice.did(),
                &est,
                &first,
                KdfDialect::Spec
            )
            .unwrap_err(),
            AcceptError::X3dh(X3dhError::UnknownOneTimeKey(1))
        );
        let reply = bob_ch.encrypt(&mut OsRng, b"hello").unwrap();
        assert_eq!(alice_ch.decrypt(&mut OsRng, &reply).unwrap(), b"hello");
    }

    #[test]
    fn associated_data_binds_both_dids() {
        let mut p = parties();
        let (mut alice_ch, est) =
            SecureChannel::initiate(&mut OsRng, &p.alice, p.bob.did(), &p.bundle, KdfDialect::Spec).unwrap();
        let ad = alice_ch.associated_data().to_vec();
        let prefix = format!("{}|{}", p.alice.did(), p.bob.did());
        assert_eq!(&ad[..prefix.len()], prefix.as_bytes());
        assert_eq!(&ad[prefix.len()..prefix.len() + 32], p.alice.x25519_public().as_bytes());
        assert_eq!(&ad[prefix.len() + 32..], p.bob.x25519_public().as_bytes());
        let first = alice_ch.encrypt(&mut OsRng, b"hi").unwrap();
        // Claiming another DID for Alice's establishment is refused before
        // any DH: her identity key does not belong to it.
        let impostor = Did::parse("did:mesh:impostor").unwrap();
        let err = SecureChannel::accept(
            &mut OsRng,
            &p.bob,
            &mut p.bob_keys,
            &impostor,
            &est,
            &first,
            KdfDialect::Spec,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            AcceptError::X3dh(X3dhError::NotTheInitiatorsKey {
                reason: crate::BindingError::DidMismatch,
                ..
            })
        ));
        assert!(p.bob_keys.one_time_key(1).is_some(), "the one-time key is not burnt");
    }

    #[test]
    fn a_bundle_of_another_identity_is_refused_by_the_initiator() {
        // The attack: whoever writes the registry serves Mallory's own,
        // validly signed bundle for Bob's DID; Alice must not open a session
        // that Mallory can read.
        let p = parties();
        let mallory = Identity::generate(&mut OsRng);
        let mut mallory_keys = PreKeys::generate(&mut OsRng, &mallory);
        let otk = mallory_keys.generate_one_time_keys(&mut OsRng, 1).unwrap()[0];
        let forged = mallory_keys.bundle(&mallory, Some(otk));
        let err = SecureChannel::initiate(&mut OsRng, &p.alice, p.bob.did(), &forged, KdfDialect::Spec).unwrap_err();
        assert!(matches!(
            err,
            X3dhError::Bundle(crate::BundleError::NotTheDidsKeys {
                reason: crate::BindingError::DidMismatch,
                ..
            })
        ));
        // Bob's signing key with Mallory's X25519 identity key and signed
        // pre-key (signature made by... nobody: it cannot verify either).
        let mut mixed = p.bundle.clone();
        mixed.identity_key = *mallory.x25519_public();
        let err = SecureChannel::initiate(&mut OsRng, &p.alice, p.bob.did(), &mixed, KdfDialect::Spec).unwrap_err();
        assert!(matches!(
            err,
            X3dhError::Bundle(crate::BundleError::NotTheDidsKeys {
                reason: crate::BindingError::IdentityKeyMismatch,
                ..
            })
        ));
        SecureChannel::initiate(&mut OsRng, &p.alice, p.bob.did(), &p.bundle, KdfDialect::Spec).unwrap();
    }

    #[test]
    fn a_knock_of_another_identity_is_refused_by_the_responder() {
        // The attack: Mallory runs X3DH with her own identity key but claims
        // Alice's DID, hoping Bob files the session under Alice.
        let mut p = parties();
        let mallory = Identity::generate(&mut OsRng);
        let (mut ch, est) =
            SecureChannel::initiate(&mut OsRng, &mallory, p.bob.did(), &p.bundle, KdfDialect::Spec).unwrap();
        let first = ch.encrypt(&mut OsRng, b"I am alice").unwrap();
        let err = SecureChannel::accept(
            &mut OsRng,
            &p.bob,
            &mut p.bob_keys,
            p.alice.did(),
            &est,
            &first,
            KdfDialect::Spec,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            AcceptError::X3dh(X3dhError::NotTheInitiatorsKey {
                reason: crate::BindingError::DidMismatch,
                ..
            })
        ));
        assert!(p.bob_keys.one_time_key(1).is_some());
        assert!(SecureChannel::respond(&p.bob, &p.bob_keys, p.alice.did(), &est, KdfDialect::Spec).is_err());
        // Under her own DID, the same establishment is fine.
        SecureChannel::accept(
            &mut OsRng,
            &p.bob,
            &mut p.bob_keys,
            mallory.did(),
            &est,
            &first,
            KdfDialect::Spec,
        )
        .unwrap();
    }

    #[test]
    fn sessions_from_a_bundle_fetched_before_a_rotation_still_establish() {
        let mut p = parties();
        let (mut old_ch, old_est) =
            SecureChannel::initiate(&mut OsRng, &p.alice, p.bob.did(), &p.bundle, KdfDialect::Spec).unwrap();
        let old_first = old_ch.encrypt(&mut OsRng, b"old").unwrap();
        p.bob_keys.rotate_signed_pre_key(&mut OsRng, &p.bob, 1_000);
        let new_bundle = p.bob_keys.bundle(&p.bob, Some(2));
        let (mut new_ch, new_est) =
            SecureChannel::initiate(&mut OsRng, &p.alice, p.bob.did(), &new_bundle, KdfDialect::Spec).unwrap();
        let new_first = new_ch.encrypt(&mut OsRng, b"new").unwrap();
        let (_, text) = SecureChannel::accept(
            &mut OsRng,
            &p.bob,
            &mut p.bob_keys,
            p.alice.did(),
            &new_est,
            &new_first,
            KdfDialect::Spec,
        )
        .unwrap();
        assert_eq!(text, b"new");
        let (mut bob_ch, text) = SecureChannel::accept(
            &mut OsRng,
            &p.bob,
            &mut p.bob_keys,
            p.alice.did(),
            &old_est,
            &old_first,
            KdfDialect::Spec,
        )
        .unwrap();
        assert_eq!(text, b"old");
        let reply = bob_ch.encrypt(&mut OsRng, b"reply").unwrap();
        assert_eq!(old_ch.decrypt(&mut OsRng, &reply).unwrap(), b"reply");
        // Once the previous key is forgotten, an old-bundle session fails.
        assert!(p.bob_keys.forget_expired_signed_pre_key(u64::MAX, 1));
        let mut old_bundle = p.bundle.clone();
        old_bundle.one_time_pre_key = None;
        let (mut late, late_est) =
            SecureChannel::initiate(&mut OsRng, &p.alice, p.bob.did(), &old_bundle, KdfDialect::Spec).unwrap();
        let late_first = late.encrypt(&mut OsRng, b"late").unwrap();
        assert_eq!(
            SecureChannel::accept(
                &mut OsRng,
                &p.bob,
                &mut p.bob_keys,
                p.alice.did(),
                &late_est,
                &late_first,
                KdfDialect::Spec,
            )
            .unwrap_err(),
            AcceptError::Decrypt(DecryptError::AuthenticationFailed)
        );
    }

    #[test]
    fn channel_state_survives_export_import() {
        let mut p = parties();
        let (mut alice_ch, est) =
            SecureChannel::initiate(&mut OsRng, &p.alice, p.bob.did(), &p.bundle, KdfDialect::LegacyFfSalt).unwrap();
        let first = alice_ch.encrypt(&mut OsRng, b"1").unwrap();
        let (bob_ch, _) = SecureChannel::accept(
            &mut OsRng,
            &p.bob,
            &mut p.bob_keys,
            p.alice.did(),
            &est,
            &first,
            KdfDialect::LegacyFfSalt,
        )
        .unwrap();
        let exported = bob_ch.export_state();
        let mut restored = SecureChannel::import_state(&exported).unwrap();
        assert!(restored == bob_ch);
        assert_eq!(*restored.export_state(), *exported);
        let reply = restored.encrypt(&mut OsRng, b"2").unwrap();
        assert_eq!(alice_ch.decrypt(&mut OsRng, &reply).unwrap(), b"2");
        assert!(matches!(
            SecureChannel::import_state("{}"),
            Err(crate::StateError::Json(_))
        ));
    }
}
