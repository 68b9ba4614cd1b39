//! The relay's offline mail, through the storage's [`Mailboxes`]: frames
//! for recipients that are not live, kept verbatim until the recipient
//! acknowledges them or they expire.
//!
//! No lock of the relay is held while the store works: every call here is
//! one storage operation (plus, now and then, a bounded sweep). Stored
//! mail is sent in batches of [`DELIVERY_BATCH`] from a per-connection
//! cursor, so sending pending mail costs O(batch) per storage call and
//! nothing is sent twice on one connection.

use crate::storage::{Appended, Mailboxes, NewMessage, Quota, StorageError};
use crate::util::Esc;
use meshwire_proto::time::Timestamp;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Messages fetched from the store per call when sending pending mail.
pub(crate) const DELIVERY_BATCH: usize = 100;
/// How often (server clock) expired messages of all recipients are swept;
/// a recipient's own expired messages are dropped whenever it fetches.
const SWEEP_INTERVAL_MS: u64 = 60_000;
/// Most expired messages one sweep deletes.
const SWEEP_BATCH: usize = 10_000;

/// What [`RelayMail::store`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreOutcome {
    /// Queued.
    Stored,
    /// A message with this id is already queued for this recipient.
    Duplicate,
    /// A quota refused it.
    Full(Quota),
    /// The store failed.
    Failed(StorageError),
}

/// The relay's view of the offline store, with its counters.
pub(crate) struct RelayMail {
    store: Arc<dyn Mailboxes>,
    ttl: Duration,
    /// Frames put into the store.
    pub(crate) stored: AtomicU64,
    /// Stored frames sent to their recipient.
    pub(crate) delivered: AtomicU64,
    /// Frames refused by a quota.
    pub(crate) refused: AtomicU64,
    /// Messages queued, as of this instance's last change or read.
    pending: AtomicU64,
    last_sweep: AtomicU64,
}

impl std::fmt::Debug for RelayMail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayMail")
            .field("stored", &self.stored.load(Ordering::Relaxed))
            .field("delivered", &self.delivered.load(Ordering::Relaxed))
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

impl RelayMail {
    pub(crate) fn new(store: Arc<dyn Mailboxes>, ttl: Duration) -> Self {
        Self {
            store,
            ttl,
            stored: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            last_sweep: AtomicU64::new(0),
        }
    }

    /// Messages queued in the store, as of this instance's last change (or
    /// [`RelayMail::refresh`]); other instances' changes show after it.
    pub(crate) fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Re-reads the store's totals for [`RelayMail::pending`].
    pub(crate) async fn refresh(&self) {
        match self.store.totals().await {
            Ok(totals) => self.pending.store(totals.messages, Ordering::Relaxed),
            Err(error) => tracing::warn!(%error, "reading the offline store's totals failed"),
        }
    }

    /// The store's totals now (`None` when it fails).
    pub(crate) async fn totals(&self) -> Option<crate::storage::MailboxTotals> {
        self.store.totals().await.ok()
    }

    /// Queues `frame` for `recipient` under `id`, sent by `sender`.
    pub(crate) async fn store(
        &self,
        recipient: &str,
        sender: &str,
        id: &str,
        frame: Arc<str>,
        now: Timestamp,
    ) -> StoreOutcome {
        self.sweep_if_due(now).await;
        let message = NewMessage {
            recipient: recipient.to_owned(),
            sender: sender.to_owned(),
            id: id.to_owned(),
            frame,
            expires_at: Timestamp(now.0.saturating_add(crate::config::duration_ms(self.ttl))),
        };
        let outcome = match self.store.append(message, now).await {
            Ok(Appended::Stored { .. }) => {
                self.stored.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(recipient = %Esc(recipient), id = %Esc(id), "stored message");
                StoreOutcome::Stored
            }
            Ok(Appended::Duplicate) => StoreOutcome::Duplicate,
            Ok(Appended::Refused(quota)) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(recipient = %Esc(recipient), id = %Esc(id), %quota, "message not stored");
                StoreOutcome::Full(quota)
            }
            Err(error) => {
                tracing::warn!(recipient = %Esc(recipient), id = %Esc(id), %error, "storing a message failed");
                StoreOutcome::Failed(error)
            }
        };
        self.refresh().await;
        outcome
    }

    /// Up to [`DELIVERY_BATCH`] unexpired frames of `recipient` after
    /// position `after`, oldest first, as `(seq, frame)`.
    pub(crate) async fn batch(
        &self,
        recipient: &str,
        after: u64,
        now: Timestamp,
    ) -> Result<Vec<(u64, Arc<str>)>, StorageError> {
        let messages = self.store.fetch(recipient, after, DELIVERY_BATCH, now).await?;
        Ok(messages.into_iter().map(|m| (m.seq, m.frame)).collect())
    }

    /// Deletes message `id` of `recipient`'s mailbox. The relay passes the
    /// connection's authenticated DID, so nobody else can delete its mail.
    pub(crate) async fn ack(&self, recipient: &str, id: &str) -> bool {
        match self.store.ack(recipient, id).await {
            Ok(removed) => {
                if removed {
                    self.refresh().await;
                }
                removed
            }
            Err(error) => {
                tracing::warn!(recipient = %Esc(recipient), id = %Esc(id), %error, "acknowledging a message failed");
                false
            }
        }
    }

    /// Sweeps expired messages of all recipients at most every
    /// [`SWEEP_INTERVAL_MS`] (one instance at a time gets the turn).
    async fn sweep_if_due(&self, now: Timestamp) {
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now.0 < last.saturating_add(SWEEP_INTERVAL_MS)
            || self
                .last_sweep
                .compare_exchange(last, now.0, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if let Err(error) = self.store.expire(now, SWEEP_BATCH).await {
            tracing::warn!(%error, "sweeping expired messages failed");
        }
    }
}
