//! Store-and-forward inbox: frames for recipients that are not live, kept
//! verbatim until the recipient acknowledges them or they expire.

use meshwire_proto::time::Timestamp;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// How often (by the server clock) expired messages of all recipients are
/// swept; a recipient's own expired messages are dropped whenever it fetches.
const SWEEP_INTERVAL_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy)]
pub(crate) struct InboxLimits {
    pub(crate) per_recipient: usize,
    pub(crate) total: usize,
    pub(crate) bytes: usize,
    pub(crate) ttl_ms: u64,
}

#[derive(Debug)]
struct Stored {
    seq: u64,
    text: Arc<str>,
    expires_at: u64,
    size: usize,
}

/// One recipient's messages: by id (dedupe, ack) and by arrival (delivery
/// order).
#[derive(Debug, Default)]
struct Mailbox {
    by_id: HashMap<String, Stored>,
    order: BTreeMap<u64, String>,
}

/// What [`Inbox::store`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreOutcome {
    Stored,
    /// A message with this id is already stored for this recipient.
    Duplicate,
    /// A per-recipient or global cap is reached.
    Full,
}

#[derive(Debug)]
pub(crate) struct Inbox {
    limits: InboxLimits,
    boxes: HashMap<String, Mailbox>,
    total: usize,
    bytes: usize,
    seq: u64,
    last_sweep: u64,
}

impl Inbox {
    pub(crate) fn new(limits: InboxLimits) -> Self {
        Self {
            limits,
            boxes: HashMap::new(),
            total: 0,
            bytes: 0,
            seq: 0,
            last_sweep: 0,
        }
    }

    /// Stores `text` (the frame as the sender wrote it) for `recipient`
    /// under message `id`.
    pub(crate) fn store(&mut self, recipient: &str, id: &str, text: Arc<str>, now: Timestamp) -> StoreOutcome {
        if now.0 >= self.last_sweep.saturating_add(SWEEP_INTERVAL_MS) {
            self.sweep(now);
        }
        if self.boxes.get(recipient).is_some_and(|b| b.by_id.contains_key(id)) {
            return StoreOutcome::Duplicate;
        }
        let size = text.len() + id.len() + recipient.len();
        let recipient_count = self.boxes.get(recipient).map_or(0, |b| b.by_id.len());
        if recipient_count >= self.limits.per_recipient
            || self.total >= self.limits.total
            || self.bytes.saturating_add(size) > self.limits.bytes
        {
            // Expired messages may be what fills the inbox.
            self.sweep(now);
            let recipient_count = self.boxes.get(recipient).map_or(0, |b| b.by_id.len());
            if recipient_count >= self.limits.per_recipient
                || self.total >= self.limits.total
                || self.bytes.saturating_add(size) > self.limits.bytes
            {
                return StoreOutcome::Full;
            }
        }
        self.seq += 1;
        let mailbox = self.boxes.entry(recipient.to_owned()).or_default();
        mailbox.order.insert(self.seq, id.to_owned());
        mailbox.by_id.insert(
            id.to_owned(),
            Stored {
                seq: self.seq,
                text,
                expires_at: now.0.saturating_add(self.limits.ttl_ms),
                size,
            },
        );
        self.total += 1;
        self.bytes += size;
        StoreOutcome::Stored
    }

    /// The unexpired frames stored for `recipient`, oldest first. They stay
    /// stored until acknowledged.
    pub(crate) fn pending(&mut self, recipient: &str, now: Timestamp) -> Vec<(String, Arc<str>)> {
        self.drop_expired(recipient, now);
        self.boxes.get(recipient).map_or_else(Vec::new, |mailbox| {
            mailbox
                .order
                .values()
                .filter_map(|id| mailbox.by_id.get(id).map(|m| (id.clone(), Arc::clone(&m.text))))
                .collect()
        })
    }

    /// Deletes message `id` stored for `recipient`; only the recipient's own
    /// connection calls this, so nobody else can delete its mail.
    pub(crate) fn ack(&mut self, recipient: &str, id: &str) -> bool {
        let Some(mailbox) = self.boxes.get_mut(recipient) else {
            return false;
        };
        let Some(message) = mailbox.by_id.remove(id) else {
            return false;
        };
        mailbox.order.remove(&message.seq);
        self.total -= 1;
        self.bytes -= message.size;
        if mailbox.by_id.is_empty() {
            self.boxes.remove(recipient);
        }
        true
    }

    /// Messages currently stored.
    pub(crate) fn len(&self) -> usize {
        self.total
    }

    fn drop_expired(&mut self, recipient: &str, now: Timestamp) {
        let Some(mailbox) = self.boxes.get_mut(recipient) else {
            return;
        };
        let expired: Vec<String> = mailbox
            .by_id
            .iter()
            .filter(|(_, m)| m.expires_at <= now.0)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(message) = mailbox.by_id.remove(&id) {
                mailbox.order.remove(&message.seq);
                self.total -= 1;
                self.bytes -= message.size;
            }
        }
        if mailbox.by_id.is_empty() {
            self.boxes.remove(recipient);
        }
    }

    fn sweep(&mut self, now: Timestamp) {
        self.last_sweep = now.0;
        let recipients: Vec<String> = self.boxes.keys().cloned().collect();
        for recipient in recipients {
            self.drop_expired(&recipient, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbox(per_recipient: usize, total: usize) -> Inbox {
        Inbox::new(InboxLimits {
            per_recipient,
            total,
            bytes: 1 << 20,
            ttl_ms: 1000,
        })
    }

    #[test]
    fn dedupes_orders_and_acks() {
        let mut inbox = inbox(10, 10);
        let now = Timestamp(5);
        assert_eq!(inbox.store("b", "1", "one".into(), now), StoreOutcome::Stored);
        assert_eq!(inbox.store("b", "2", "two".into(), now), StoreOutcome::Stored);
        assert_eq!(inbox.store("b", "1", "again".into(), now), StoreOutcome::Duplicate);
        let texts: Vec<String> = inbox.pending("b", now).iter().map(|(_, t)| t.to_string()).collect();
        assert_eq!(texts, ["one", "two"]);
        assert!(!inbox.ack("c", "1"), "only the recipient's mailbox");
        assert!(inbox.ack("b", "1"));
        assert_eq!(inbox.pending("b", now).len(), 1);
        assert_eq!(inbox.len(), 1);
    }

    #[test]
    fn caps_and_expiry() {
        let mut inbox = inbox(2, 3);
        let now = Timestamp(0);
        assert_eq!(inbox.store("b", "1", "x".into(), now), StoreOutcome::Stored);
        assert_eq!(inbox.store("b", "2", "x".into(), now), StoreOutcome::Stored);
        assert_eq!(inbox.store("b", "3", "x".into(), now), StoreOutcome::Full);
        assert_eq!(inbox.store("c", "3", "x".into(), now), StoreOutcome::Stored);
        assert_eq!(inbox.store("d", "4", "x".into(), now), StoreOutcome::Full);
        let later = Timestamp(1000);
        // The global cap is reached: storing sweeps the expired messages.
        assert_eq!(inbox.store("d", "4", "x".into(), later), StoreOutcome::Stored);
        assert_eq!(inbox.len(), 1);
        assert!(inbox.pending("b", later).is_empty());
        assert!(inbox.pending("d", Timestamp(2000)).is_empty());
        assert_eq!(inbox.len(), 0);
    }
}
