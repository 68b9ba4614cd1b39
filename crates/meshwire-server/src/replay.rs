//! The once-only proof memory shared by the relay and the registry.
//!
//! Every proof of possession the server accepts (a relay `connect`
//! signature, a registry `Authorization` header, a registration proof, a
//! challenge-bound proof) is claimed here under `(DID, proof bytes)` before
//! it takes effect. A proof is accepted once while it can still pass the
//! freshness check; it is forgotten only after its expiry, when it is stale
//! anyway. Keys are the *decoded* signature bytes, so re-encoding a proof
//! in the other base64 alphabet (or with or without padding) is the same
//! proof, and the relay and the registry share one memory, so a `connect`
//! signature cannot be replayed as an `Ed25519-Timestamp` header (both sign
//! utf8(timestamp) under the same key).
//!
//! The memory is bounded: [`MemoryLedger`] holds at most
//! [`ServerConfig::max_live_proofs`](crate::ServerConfig::max_live_proofs)
//! live proofs in total and
//! [`ServerConfig::max_live_proofs_per_did`](crate::ServerConfig::max_live_proofs_per_did)
//! per DID. When full it refuses new proofs ([`ClaimError::Full`]); it never
//! evicts a live entry, which would make that proof acceptable again.
//!
//! A cluster puts the memory in a shared store by implementing
//! [`ProofLedger`] (an atomic "insert if absent, with expiry") and passing it
//! as [`ServerConfig::proof_ledger`](crate::ServerConfig::proof_ledger).

use meshwire_proto::time::Timestamp;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Default of [`ServerConfig::max_live_proofs`](crate::ServerConfig::max_live_proofs).
/// With the default 5-minute window a proof lives at most 10 minutes (a
/// timestamp up to 5 minutes in the future, plus the window), so this
/// sustains about 160 authentications per second; an entry costs about
/// 200 bytes (20 MB when full).
pub const DEFAULT_MAX_LIVE_PROOFS: usize = 100_000;
/// Default of [`ServerConfig::max_live_proofs_per_did`](crate::ServerConfig::max_live_proofs_per_did):
/// one agent cannot fill the memory for everyone else. 2,000 proofs in a
/// 10-minute lifetime is more than 3 authentications per second, sustained.
pub const DEFAULT_MAX_LIVE_PROOFS_PER_DID: usize = 2_000;

/// A proof could not be claimed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// The same proof was accepted before and has not expired: a replay.
    #[error("proof already used (replayed)")]
    Replayed,
    /// The memory holds its maximum of live proofs (in total or for this
    /// DID); no new proof is accepted until some expire.
    #[error("too many live proofs ({limit}); retry later")]
    Full {
        /// The limit that was hit.
        limit: usize,
    },
    /// The shared store could not be reached (cluster implementations).
    #[error("proof store unavailable: {0}")]
    Unavailable(String),
}

/// The once-only memory: an atomic "accept `(did, proof)` unless already
/// present", with expiry. Implementations must never forget an entry before
/// `expires_at`.
pub trait ProofLedger: Send + Sync + 'static {
    /// Claims `proof` for `did` until `expires_at` (server clock). `Ok` the
    /// first time; [`ClaimError::Replayed`] while an earlier claim is live.
    fn claim(&self, did: &str, proof: &[u8], expires_at: Timestamp, now: Timestamp) -> Result<(), ClaimError>;

    /// Live proofs held now (for stats; may be approximate).
    fn live(&self) -> usize;
}

type Key = (String, Vec<u8>);

#[derive(Default)]
struct State {
    /// Live proofs and their expiry.
    entries: HashMap<Key, u64>,
    /// The same entries ordered by expiry, for pruning.
    by_expiry: BTreeSet<(u64, Key)>,
    /// Live proofs per DID.
    per_did: HashMap<String, usize>,
}

impl State {
    fn prune(&mut self, now: u64) {
        while let Some(first) = self.by_expiry.first() {
            if first.0 >= now {
                break;
            }
            let Some((_, key)) = self.by_expiry.pop_first() else {
                break;
            };
            self.entries.remove(&key);
            if let Some(count) = self.per_did.get_mut(&key.0) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.per_did.remove(&key.0);
                }
            }
        }
    }
}

/// The in-process [`ProofLedger`]: a map pruned by expiry on every claim.
pub struct MemoryLedger {
    state: Mutex<State>,
    max_total: usize,
    max_per_did: usize,
    replays_refused: AtomicU64,
    full_refused: AtomicU64,
}

impl fmt::Debug for MemoryLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLedger")
            .field("live", &self.live())
            .field("max_total", &self.max_total)
            .field("max_per_did", &self.max_per_did)
            .field("replays_refused", &self.replays_refused())
            .field("full_refused", &self.full_refused())
            .finish()
    }
}

impl MemoryLedger {
    /// A memory of at most `max_total` live proofs, `max_per_did` per DID.
    pub fn new(max_total: usize, max_per_did: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            max_total,
            max_per_did,
            replays_refused: AtomicU64::new(0),
            full_refused: AtomicU64::new(0),
        }
    }

    /// Claims refused because the proof was already used.
    pub fn replays_refused(&self) -> u64 {
        self.replays_refused.load(Ordering::Relaxed)
    }

    /// Claims refused because the memory was full.
    pub fn full_refused(&self) -> u64 {
        self.full_refused.load(Ordering::Relaxed)
    }
}

impl ProofLedger for MemoryLedger {
    fn claim(&self, did: &str, proof: &[u8], expires_at: Timestamp, now: Timestamp) -> Result<(), ClaimError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.prune(now.0);
        let key = (did.to_owned(), proof.to_vec());
        if state.entries.contains_key(&key) {
            self.replays_refused.fetch_add(1, Ordering::Relaxed);
            return Err(ClaimError::Replayed);
        }
        if state.entries.len() >= self.max_total {
            self.full_refused.fetch_add(1, Ordering::Relaxed);
            return Err(ClaimError::Full { limit: self.max_total });
        }
        let for_did = state.per_did.get(did).copied().unwrap_or(0);
        if for_did >= self.max_per_did {
            self.full_refused.fetch_add(1, Ordering::Relaxed);
            return Err(ClaimError::Full {
                limit: self.max_per_did,
            });
        }
        state.entries.insert(key.clone(), expires_at.0);
        state.by_expiry.insert((expires_at.0, key));
        *state.per_did.entry(did.to_owned()).or_insert(0) += 1;
        Ok(())
    }

    fn live(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).entries.len()
    }
}

/// The ledger the server uses, with the refusal counters the server keeps
/// whatever the implementation.
pub(crate) struct Ledger {
    inner: std::sync::Arc<dyn ProofLedger>,
    pub(crate) replays_refused: AtomicU64,
    pub(crate) full_refused: AtomicU64,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("live", &self.inner.live())
            .field("replays_refused", &self.replays_refused.load(Ordering::Relaxed))
            .field("full_refused", &self.full_refused.load(Ordering::Relaxed))
            .finish()
    }
}

impl Ledger {
    pub(crate) fn new(inner: std::sync::Arc<dyn ProofLedger>) -> Self {
        Self {
            inner,
            replays_refused: AtomicU64::new(0),
            full_refused: AtomicU64::new(0),
        }
    }

    /// Claims a proof, counting refusals.
    pub(crate) fn claim(
        &self,
        did: &str,
        proof: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), ClaimError> {
        let result = self.inner.claim(did, proof, expires_at, now);
        match &result {
            Ok(()) => {}
            Err(ClaimError::Replayed) => {
                self.replays_refused.fetch_add(1, Ordering::Relaxed);
            }
            Err(ClaimError::Full { .. } | ClaimError::Unavailable(_)) => {
                self.full_refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    pub(crate) fn live(&self) -> usize {
        self.inner.live()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_until_expiry_then_forgotten() {
        let ledger = MemoryLedger::new(10, 10);
        let now = Timestamp(1_000);
        assert_eq!(ledger.claim("a", b"sig", Timestamp(2_000), now), Ok(()));
        assert_eq!(
            ledger.claim("a", b"sig", Timestamp(2_000), now),
            Err(ClaimError::Replayed)
        );
        // Another DID with the same bytes is another proof.
        assert_eq!(ledger.claim("b", b"sig", Timestamp(2_000), now), Ok(()));
        // Still remembered at the expiry instant, forgotten after it.
        assert_eq!(
            ledger.claim("a", b"sig", Timestamp(3_000), Timestamp(2_000)),
            Err(ClaimError::Replayed)
        );
        assert_eq!(ledger.claim("a", b"sig", Timestamp(3_000), Timestamp(2_001)), Ok(()));
        assert_eq!(ledger.replays_refused(), 2);
    }

    #[test]
    fn full_refuses_and_never_evicts() {
        let ledger = MemoryLedger::new(3, 2);
        let now = Timestamp(0);
        let far = Timestamp(10_000);
        assert_eq!(ledger.claim("a", b"1", far, now), Ok(()));
        assert_eq!(ledger.claim("a", b"2", far, now), Ok(()));
        assert_eq!(ledger.claim("a", b"3", far, now), Err(ClaimError::Full { limit: 2 }));
        assert_eq!(ledger.claim("b", b"1", far, now), Ok(()));
        assert_eq!(ledger.claim("c", b"1", far, now), Err(ClaimError::Full { limit: 3 }));
        // Nothing was evicted: the first proofs are still refused.
        assert_eq!(ledger.claim("a", b"1", far, now), Err(ClaimError::Replayed));
        assert_eq!(ledger.live(), 3);
        assert_eq!(ledger.full_refused(), 2);
        // Once they expire there is room again.
        assert_eq!(ledger.claim("c", b"1", far, Timestamp(10_001)), Ok(()));
        assert_eq!(ledger.live(), 1);
    }
}
