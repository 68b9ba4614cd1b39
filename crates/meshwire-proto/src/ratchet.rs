//! The Double Ratchet, with AgentMesh's KDFs and header layout.
//!
//! Decryption is transactional: everything a message would change (new
//! chain keys, skipped keys, a DH ratchet step) is computed aside and
//! committed only after the AEAD tag verified, so a forged, replayed or
//! malformed message leaves the session exactly as it was.

use crate::crypto::{Active, CryptoProvider, NONCE_LEN, TAG_LEN};
use crate::keys::{ChainKey, KeyError, KeyPair, MessageKey, RootKey, SharedSecret, X25519PublicKey};
use indexmap::IndexMap;
use rand_core::CryptoRngCore;
use std::fmt;
use zeroize::Zeroizing;

/// Most message keys one message may make us skip in one chain.
pub const MAX_SKIP: u32 = 100;
/// Most skipped message keys kept; the oldest are evicted first.
pub const MAX_SKIPPED_KEYS: usize = 2000;
/// Length of an encoded [`Header`].
pub const HEADER_LEN: usize = 40;

const RATCHET_INFO: &[u8] = b"AgentMesh_Ratchet_v1";

/// The cleartext header of a ratchet message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The sender's current ratchet public key.
    pub dh: X25519PublicKey,
    /// Length of the sender's previous sending chain.
    pub pn: u32,
    /// Number of this message in its chain.
    pub n: u32,
}

/// A header was not 40 bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header must be {HEADER_LEN} bytes, got {0}")]
pub struct HeaderError(pub usize);

impl Header {
    /// `dh || u32be(pn) || u32be(n)`.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..32].copy_from_slice(self.dh.as_bytes());
        out[32..36].copy_from_slice(&self.pn.to_be_bytes());
        out[36..].copy_from_slice(&self.n.to_be_bytes());
        out
    }

    /// Parses the 40 header bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HeaderError> {
        let bytes: &[u8; HEADER_LEN] = bytes.try_into().map_err(|_| HeaderError(bytes.len()))?;
        let (dh, rest) = bytes.split_at(32);
        let (pn, n) = rest.split_at(4);
        let word = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap_or_default());
        Ok(Self {
            dh: X25519PublicKey::from_slice(dh).map_err(|_| HeaderError(bytes.len()))?,
            pn: word(pn),
            n: word(n),
        })
    }
}

/// A ratchet message: header and `nonce || ciphertext || tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedMessage {
    /// The header (authenticated, not encrypted).
    pub header: Header,
    /// `nonce || ciphertext || tag`.
    pub ciphertext: Vec<u8>,
}

/// Encryption failed; the ratchet is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncryptError {
    #[error("no sending chain yet: the responder must receive a message first")]
    /// The sending chain is not initialised (a responder before its first message).
    NoSendingChain,
    #[error("the sending chain's message numbers are exhausted")]
    /// The sending chain's counter is exhausted.
    CounterExhausted,
}

/// Decryption failed; the ratchet is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error("ciphertext of {0} bytes is shorter than nonce and tag")]
    /// Shorter than a nonce and a tag (the length given).
    CiphertextTooShort(usize),
    #[error("authentication tag does not verify")]
    /// The AEAD tag does not verify (forged, corrupted, or the wrong session).
    AuthenticationFailed,
    #[error("message {n} was already decrypted or its key expired")]
    /// The message's key was used or dropped already (a replay, or a
    /// number the sender reused).
    DuplicateOrExpired {
        /// The message number.
        n: u32,
    },
    #[error("message would skip {requested} keys, more than {MAX_SKIP}")]
    /// Decrypting would skip more message keys than allowed.
    TooManySkipped {
        /// How many it would skip.
        requested: u64,
    },
    #[error("no receiving chain for the header's ratchet key")]
    /// A message on a new ratchet key before any receiving chain exists.
    NoReceivingChain,
    #[error("header carries a low-order ratchet key")]
    /// The peer's ratchet key is of low order.
    NonContributory,
    #[error("message number overflow")]
    /// A message number overflows the chain counter.
    CounterOverflow,
}

impl From<KeyError> for DecryptError {
    fn from(_: KeyError) -> Self {
        Self::NonContributory
    }
}

pub(crate) type SkippedId = (X25519PublicKey, u32);

/// One side of a Double Ratchet session.
#[derive(Clone, PartialEq, Eq)]
pub struct DoubleRatchet {
    pub(crate) dh_self: KeyPair,
    pub(crate) dh_remote: Option<X25519PublicKey>,
    pub(crate) root_key: RootKey,
    pub(crate) chain_send: Option<ChainKey>,
    pub(crate) chain_recv: Option<ChainKey>,
    pub(crate) n_send: u32,
    pub(crate) n_recv: u32,
    pub(crate) pn: u32,
    pub(crate) skipped: IndexMap<SkippedId, MessageKey>,
}

impl fmt::Debug for DoubleRatchet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DoubleRatchet")
            .field("dh_self_public", self.dh_self.public())
            .field("dh_remote_public", &self.dh_remote)
            .field("n_send", &self.n_send)
            .field("n_recv", &self.n_recv)
            .field("pn", &self.pn)
            .field("skipped", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

fn kdf_root(root: &RootKey, dh: &[u8; 32]) -> (RootKey, ChainKey) {
    let mut out = Zeroizing::new([0u8; 64]);
    Active::hkdf_sha256(root.as_bytes(), dh, RATCHET_INFO, out.as_mut());
    let root = out.first_chunk::<32>().copied().unwrap_or_default();
    let chain = out.last_chunk::<32>().copied().unwrap_or_default();
    (RootKey::from_bytes(root), ChainKey::from_bytes(chain))
}

fn chain_step(chain: &ChainKey) -> (MessageKey, ChainKey) {
    let (mk, next) = Active::chain_step(chain.as_bytes());
    (MessageKey::from_bytes(mk), ChainKey::from_bytes(next))
}

/// `HMAC-SHA256(chain_key, 0x01)`: the key of the next message on a chain.
pub fn message_key_of(chain: &ChainKey) -> MessageKey {
    chain_step(chain).0
}

fn aad(ad: &[u8], header: &Header) -> Vec<u8> {
    let mut aad = Vec::with_capacity(ad.len() + HEADER_LEN);
    aad.extend_from_slice(ad);
    aad.extend_from_slice(&header.to_bytes());
    aad
}

fn open(key: &MessageKey, ciphertext: &[u8], aad: &[u8]) -> Result<Vec<u8>, DecryptError> {
    let nonce: &[u8; NONCE_LEN] = ciphertext
        .get(..NONCE_LEN)
        .and_then(|n| n.try_into().ok())
        .ok_or(DecryptError::CiphertextTooShort(ciphertext.len()))?;
    let body = ciphertext.get(NONCE_LEN..).unwrap_or_default();
    Active::open(key.as_bytes(), nonce, aad, body).map_err(|_| DecryptError::AuthenticationFailed)
}

/// Advances `chain` from message `from` up to (excluding) `until`, collecting
/// the keys passed over under `dh`.
fn skip_keys(
    chain: ChainKey,
    dh: X25519PublicKey,
    from: u32,
    until: u32,
    out: &mut Vec<(SkippedId, MessageKey)>,
) -> Result<ChainKey, DecryptError> {
    let requested = u64::from(until).saturating_sub(u64::from(from));
    if requested > u64::from(MAX_SKIP) {
        return Err(DecryptError::TooManySkipped { requested });
    }
    let mut chain = chain;
    for n in from..until {
        let (mk, next) = chain_step(&chain);
        out.push(((dh, n), mk));
        chain = next;
    }
    Ok(chain)
}

impl DoubleRatchet {
    /// The initiator's ratchet: draws its first ratchet key pair (32 bytes of
    /// `rng`) and derives the sending chain against the responder's signed
    /// pre-key.
    pub fn init_sender(
        rng: &mut impl CryptoRngCore,
        shared_secret: &SharedSecret,
        remote_signed_pre_key: &X25519PublicKey,
    ) -> Result<Self, KeyError> {
        let dh_self = KeyPair::generate(rng);
        let dh = dh_self.secret().diffie_hellman(remote_signed_pre_key)?;
        let (root_key, chain_send) = kdf_root(&RootKey::from_bytes(*shared_secret.as_bytes()), dh.as_bytes());
        Ok(Self {
            dh_self,
            dh_remote: Some(*remote_signed_pre_key),
            root_key,
            chain_send: Some(chain_send),
            chain_recv: None,
            n_send: 0,
            n_recv: 0,
            pn: 0,
            skipped: IndexMap::new(),
        })
    }

    /// The responder's ratchet: its signed pre-key is the first ratchet key.
    pub fn init_receiver(shared_secret: &SharedSecret, signed_pre_key: KeyPair) -> Self {
        Self {
            dh_self: signed_pre_key,
            dh_remote: None,
            root_key: RootKey::from_bytes(*shared_secret.as_bytes()),
            chain_send: None,
            chain_recv: None,
            n_send: 0,
            n_recv: 0,
            pn: 0,
            skipped: IndexMap::new(),
        }
    }

    /// Encrypts `plaintext`, authenticating `associated_data || header`. Draws
    /// the 12-byte nonce from `rng`.
    pub fn encrypt(
        &mut self,
        rng: &mut impl CryptoRngCore,
        plaintext: &[u8],
        associated_data: &[u8],
    ) -> Result<EncryptedMessage, EncryptError> {
        let chain = self.chain_send.as_ref().ok_or(EncryptError::NoSendingChain)?;
        let next_n = self.n_send.checked_add(1).ok_or(EncryptError::CounterExhausted)?;
        let (mk, next_chain) = chain_step(chain);
        let header = Header {
            dh: *self.dh_self.public(),
            pn: self.pn,
            n: self.n_send,
        };
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let mut ciphertext = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        ciphertext.extend_from_slice(&nonce);
        Active::seal(
            mk.as_bytes(),
            &nonce,
            &aad(associated_data, &header),
            plaintext,
            &mut ciphertext,
        );
        self.chain_send = Some(next_chain);
        self.n_send = next_n;
        Ok(EncryptedMessage { header, ciphertext })
    }

    /// Decrypts `message`. On any error the ratchet is left unchanged; on a
    /// DH ratchet step, 32 bytes are drawn from `rng` for the new key pair,
    /// after the tag verified.
    pub fn decrypt(
        &mut self,
        rng: &mut impl CryptoRngCore,
        message: &EncryptedMessage,
        associated_data: &[u8],
    ) -> Result<Vec<u8>, DecryptError> {
        let header = &message.header;
        let ciphertext = &message.ciphertext;
        if ciphertext.len() < NONCE_LEN + TAG_LEN {
            return Err(DecryptError::CiphertextTooShort(ciphertext.len()));
        }
        let aad = aad(associated_data, header);

        let id = (header.dh, header.n);
        if let Some(mk) = self.skipped.get(&id) {
            let plaintext = open(mk, ciphertext, &aad)?;
            self.skipped.shift_remove(&id);
            return Ok(plaintext);
        }

        let next_n = header.n.checked_add(1).ok_or(DecryptError::CounterOverflow)?;
        let mut new_skipped = Vec::new();

        if self.dh_remote == Some(header.dh) {
            let chain = self.chain_recv.clone().ok_or(DecryptError::NoReceivingChain)?;
            if header.n < self.n_recv {
                return Err(DecryptError::DuplicateOrExpired { n: header.n });
            }
            let chain = skip_keys(chain, header.dh, self.n_recv, header.n, &mut new_skipped)?;
            let (mk, next_chain) = chain_step(&chain);
            let plaintext = open(&mk, ciphertext, &aad)?;
            self.chain_recv = Some(next_chain);
            self.n_recv = next_n;
            self.store_skipped(new_skipped);
            return Ok(plaintext);
        }

        // A new ratchet key: finish the current receiving chain up to pn.
        if let (Some(chain), Some(remote)) = (self.chain_recv.clone(), self.dh_remote) {
            skip_keys(chain, remote, self.n_recv, header.pn, &mut new_skipped)?;
        }
        let dh_recv = self.dh_self.secret().diffie_hellman(&header.dh)?;
        let (root_after_recv, chain) = kdf_root(&self.root_key, dh_recv.as_bytes());
        let chain = skip_keys(chain, header.dh, 0, header.n, &mut new_skipped)?;
        let (mk, next_chain) = chain_step(&chain);
        let plaintext = open(&mk, ciphertext, &aad)?;

        let dh_self = KeyPair::generate(rng);
        let dh_send = dh_self.secret().diffie_hellman(&header.dh)?;
        let (root_key, chain_send) = kdf_root(&root_after_recv, dh_send.as_bytes());
        self.pn = self.n_send;
        self.n_send = 0;
        self.n_recv = next_n;
        self.dh_remote = Some(header.dh);
        self.dh_self = dh_self;
        self.root_key = root_key;
        self.chain_recv = Some(next_chain);
        self.chain_send = Some(chain_send);
        self.store_skipped(new_skipped);
        Ok(plaintext)
    }

    fn store_skipped(&mut self, keys: Vec<(SkippedId, MessageKey)>) {
        self.skipped.extend(keys);
        let excess = self.skipped.len().saturating_sub(MAX_SKIPPED_KEYS);
        if excess > 0 {
            self.skipped.drain(..excess);
        }
    }

    /// Our current ratchet public key.
    pub fn dh_self_public(&self) -> &X25519PublicKey {
        self.dh_self.public()
    }

    /// The peer's current ratchet public key, once known.
    pub fn dh_remote_public(&self) -> Option<&X25519PublicKey> {
        self.dh_remote.as_ref()
    }

    /// The current root key (secret).
    pub fn root_key(&self) -> &RootKey {
        &self.root_key
    }

    /// The current sending chain key (secret).
    pub fn sending_chain_key(&self) -> Option<&ChainKey> {
        self.chain_send.as_ref()
    }

    /// The current receiving chain key (secret).
    pub fn receiving_chain_key(&self) -> Option<&ChainKey> {
        self.chain_recv.as_ref()
    }

    /// Messages sent on the current sending chain.
    pub fn send_count(&self) -> u32 {
        self.n_send
    }

    /// Messages received on the current receiving chain.
    pub fn recv_count(&self) -> u32 {
        self.n_recv
    }

    /// Length of the previous sending chain.
    pub fn previous_send_count(&self) -> u32 {
        self.pn
    }

    /// `(ratchet key, message number)` of every cached skipped key, oldest first.
    pub fn skipped_key_ids(&self) -> impl Iterator<Item = (&X25519PublicKey, u32)> + '_ {
        self.skipped.keys().map(|(dh, n)| (dh, *n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    fn pair() -> (DoubleRatchet, DoubleRatchet) {
        let ss = SharedSecret::from_bytes([42u8; 32]);
        let spk = KeyPair::generate(&mut OsRng);
        let alice = DoubleRatchet::init_sender(&mut OsRng, &ss, spk.public()).unwrap();
        let bob = DoubleRatchet::init_receiver(&ss, spk);
        (alice, bob)
    }

    const AD: &[u8] = b"ad";

    fn send(r: &mut DoubleRatchet, text: &[u8]) -> EncryptedMessage {
        r.encrypt(&mut OsRng, text, AD).unwrap()
    }

    #[test]
    fn header_round_trip_and_length_errors() {
        let h = Header {
            dh: X25519PublicKey::from_bytes([7; 32]),
            pn: 0x01020304,
            n: 0xfffffffe,
        };
        let bytes = h.to_bytes();
        assert_eq!(hex::encode(&bytes[32..]), "01020304fffffffe");
        assert_eq!(Header::from_bytes(&bytes).unwrap(), h);
        assert_eq!(Header::from_bytes(&bytes[..39]), Err(HeaderError(39)));
        assert_eq!(Header::from_bytes(&[0; 41]), Err(HeaderError(41)));
    }

    #[test]
    fn conversation_with_ratchet_steps_and_reordering() {
        let (mut a, mut b) = pair();
        let m0 = send(&mut a, b"0");
        let m1 = send(&mut a, b"1");
        let m2 = send(&mut a, b"2");
        assert_eq!(b.decrypt(&mut OsRng, &m2, AD).unwrap(), b"2");
        assert_eq!(b.skipped.len(), 2);
        let r0 = send(&mut b, b"r0");
        assert_eq!(a.decrypt(&mut OsRng, &r0, AD).unwrap(), b"r0");
        let m3 = send(&mut a, b"3");
        assert_eq!(b.decrypt(&mut OsRng, &m0, AD).unwrap(), b"0");
        assert_eq!(b.decrypt(&mut OsRng, &m3, AD).unwrap(), b"3");
        assert_eq!(b.decrypt(&mut OsRng, &m1, AD).unwrap(), b"1");
        assert!(b.skipped.is_empty());
        assert_eq!(a.encrypt(&mut OsRng, b"x", AD).unwrap().header.pn, 3);
    }

    #[test]
    fn responder_cannot_send_first() {
        let (_, mut b) = pair();
        assert_eq!(
            b.encrypt(&mut OsRng, b"x", AD).unwrap_err(),
            EncryptError::NoSendingChain
        );
    }

    fn assert_rejected_unchanged(r: &mut DoubleRatchet, m: &EncryptedMessage, ad: &[u8], expected: DecryptError) {
        let before = r.clone();
        assert_eq!(r.decrypt(&mut OsRng, m, ad).unwrap_err(), expected);
        assert!(*r == before, "state changed after {expected:?}");
    }

    #[test]
    fn failures_leave_state_untouched_and_genuine_message_still_decrypts() {
        let (mut a, mut b) = pair();
        let m0 = send(&mut a, b"zero");
        let m1 = send(&mut a, b"one");

        // Forged first message: new ratchet key path, bad tag.
        let mut forged = m1.clone();
        *forged.ciphertext.last_mut().unwrap() ^= 1;
        assert_rejected_unchanged(&mut b, &forged, AD, DecryptError::AuthenticationFailed);
        // Wrong associated data.
        assert_rejected_unchanged(&mut b, &m1, b"other", DecryptError::AuthenticationFailed);
        // Unknown ratchet key with a bad tag.
        let mut unknown = m0.clone();
        unknown.header.dh = *KeyPair::generate(&mut OsRng).public();
        assert_rejected_unchanged(&mut b, &unknown, AD, DecryptError::AuthenticationFailed);
        // Truncated and low-order.
        let mut short = m0.clone();
        short.ciphertext.truncate(27);
        assert_rejected_unchanged(&mut b, &short, AD, DecryptError::CiphertextTooShort(27));
        let mut low = m0.clone();
        low.header.dh = X25519PublicKey::from_bytes([0; 32]);
        assert_rejected_unchanged(&mut b, &low, AD, DecryptError::NonContributory);

        assert_eq!(b.decrypt(&mut OsRng, &m1, AD).unwrap(), b"one");
        // Forged message whose (dh, n) hits a cached skipped key: key kept.
        let mut forged_skipped = m0.clone();
        forged_skipped.ciphertext[12] ^= 0x80;
        assert_rejected_unchanged(&mut b, &forged_skipped, AD, DecryptError::AuthenticationFailed);
        assert_eq!(b.decrypt(&mut OsRng, &m0, AD).unwrap(), b"zero");
        // Replays.
        assert_rejected_unchanged(&mut b, &m0, AD, DecryptError::DuplicateOrExpired { n: 0 });
        assert_rejected_unchanged(&mut b, &m1, AD, DecryptError::DuplicateOrExpired { n: 1 });
        // A forged message in the current chain with a tampered counter.
        let m2 = send(&mut a, b"two");
        let mut bumped = m2.clone();
        bumped.header.n = 5;
        assert_rejected_unchanged(&mut b, &bumped, AD, DecryptError::AuthenticationFailed);
        assert_eq!(b.decrypt(&mut OsRng, &m2, AD).unwrap(), b"two");
    }

    #[test]
    fn skip_limits() {
        let (mut a, mut b) = pair();
        let mut msgs: Vec<_> = (0..=102).map(|i| send(&mut a, format!("{i}").as_bytes())).collect();
        assert_rejected_unchanged(&mut b, &msgs[101], AD, DecryptError::TooManySkipped { requested: 101 });
        assert_eq!(b.decrypt(&mut OsRng, &msgs[100], AD).unwrap(), b"100");
        assert_eq!(b.skipped.len(), 100);
        let last = msgs.pop().unwrap();
        assert_eq!(b.decrypt(&mut OsRng, &last, AD).unwrap(), b"102");
        for i in (0..=101).rev().filter(|&i| i != 100) {
            assert_eq!(b.decrypt(&mut OsRng, &msgs[i], AD).unwrap(), format!("{i}").as_bytes());
        }
        assert!(b.skipped.is_empty());
    }

    #[test]
    fn skipped_cache_is_bounded_oldest_first() {
        let (mut a, mut b) = pair();
        let mut early = Vec::new();
        // Each round Alice sends 101 messages, Bob reads only the last and replies:
        // 100 keys skipped per round, 2100 after 21 rounds.
        for _ in 0..21 {
            let msgs: Vec<_> = (0..=100).map(|_| send(&mut a, b"m")).collect();
            b.decrypt(&mut OsRng, &msgs[100], AD).unwrap();
            early.push((msgs[0].clone(), msgs[99].clone()));
            let reply = send(&mut b, b"r");
            a.decrypt(&mut OsRng, &reply, AD).unwrap();
        }
        assert_eq!(b.skipped.len(), MAX_SKIPPED_KEYS);
        let (evicted_first, evicted_last) = early[0].clone();
        assert_rejected_unchanged(&mut b, &evicted_first, AD, DecryptError::AuthenticationFailed);
        assert_rejected_unchanged(&mut b, &evicted_last, AD, DecryptError::AuthenticationFailed);
        assert_eq!(b.decrypt(&mut OsRng, &early[1].0, AD).unwrap(), b"m");
        assert_eq!(
            b.skipped_key_ids().next().unwrap().1,
            1,
            "oldest surviving key is round 1's n=1"
        );
    }
}
