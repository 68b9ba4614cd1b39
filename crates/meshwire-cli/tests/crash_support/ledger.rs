//! The parent's bookkeeping: what each agent reported sending, what each
//! application was handed and acknowledged, and what that adds up to.

use std::collections::{BTreeMap, BTreeSet};

/// A message as the harness names it: the sender's incarnation (one per
/// process start) and its number within it. Unique for a whole scenario.
pub type Key = (u64, u64);

/// Agents: index 0 is "A", 1 is "B"; a message of `i` goes to `1 - i`.
pub const ROLES: [&str; 2] = ["A", "B"];

/// What one receiver's application saw of one message.
#[derive(Debug, Clone)]
struct Got {
    /// Times it was handed over (RECV lines).
    deliveries: u32,
    /// An ACKED line was seen for it.
    acked: bool,
    /// The message id of its first delivery.
    id: String,
}

/// Everything the agents reported, by sender (`sent`) and by receiver
/// (`got`).
#[derive(Debug, Default)]
pub struct Ledger {
    sent: [BTreeMap<Key, bool>; 2],
    got: [BTreeMap<Key, Got>; 2],
    /// Deliveries of a message after an ACKED line for it (must be 0
    /// outside the rollback scenario).
    pub dup_after_ack: u64,
    /// Deliveries again, before any ACKED line, flagged `redelivered`
    /// (allowed: the receiving process died before acknowledging).
    pub redelivered_again: u64,
    /// Deliveries again, before any ACKED line, *not* flagged
    /// `redelivered` (a violation: the same process got it twice, or a new
    /// one did not say so).
    pub dup_unflagged: u64,
    /// First deliveries already flagged `redelivered` (the previous
    /// process was handed it but died before printing it).
    pub redelivered_first: u64,
    /// Deliveries again carrying another message id than the first.
    pub id_mismatch: u64,
    /// ACK calls answering "already acknowledged".
    pub ack_again: u64,
    /// The first few duplicates after acknowledgement, for the report.
    pub evidence: Vec<String>,
}

impl Ledger {
    /// `sender` reported `send()` returning Ok for `key`.
    pub fn sent(&mut self, sender: usize, key: Key, final_exchange: bool) {
        self.sent[sender].insert(key, final_exchange);
    }

    /// `receiver`'s application was handed `key` (sent by the other agent).
    /// `receiver_inc` is the receiving process's incarnation (evidence only).
    pub fn received(&mut self, receiver: usize, key: Key, redelivered: bool, id: &str, receiver_inc: u64) {
        match self.got[receiver].get_mut(&key) {
            None => {
                if redelivered {
                    self.redelivered_first += 1;
                }
                self.got[receiver].insert(
                    key,
                    Got {
                        deliveries: 1,
                        acked: false,
                        id: id.to_owned(),
                    },
                );
            }
            Some(got) => {
                got.deliveries += 1;
                if got.id != id {
                    self.id_mismatch += 1;
                }
                if got.acked {
                    self.dup_after_ack += 1;
                    if self.evidence.len() < 10 {
                        self.evidence.push(format!(
                            "{}->{} message {}.{} (id {id}) delivered again (delivery {}, redelivered={redelivered}) \
                             to {} incarnation {receiver_inc} after its ACKED line",
                            ROLES[1 - receiver],
                            ROLES[receiver],
                            key.0,
                            key.1,
                            got.deliveries,
                            ROLES[receiver],
                        ));
                    }
                } else if redelivered {
                    self.redelivered_again += 1;
                } else {
                    self.dup_unflagged += 1;
                    if self.evidence.len() < 10 {
                        self.evidence.push(format!(
                            "{}->{} message {}.{} (id {id}) delivered again without the redelivered flag \
                             (delivery {}) to {} incarnation {receiver_inc}",
                            ROLES[1 - receiver],
                            ROLES[receiver],
                            key.0,
                            key.1,
                            got.deliveries,
                            ROLES[receiver],
                        ));
                    }
                }
            }
        }
    }

    /// `receiver` acknowledged `key` (`ack` returned Ok(true)).
    pub fn acked(&mut self, receiver: usize, key: Key) {
        if let Some(got) = self.got[receiver].get_mut(&key) {
            got.acked = true;
        }
    }

    /// Messages `sender` reported sent (final exchange excluded).
    pub fn sent_count(&self, sender: usize) -> usize {
        self.sent[sender].values().filter(|f| !**f).count()
    }

    /// Messages `sender` reported sent (final exchange excluded) that the
    /// other application never got.
    pub fn lost(&self, sender: usize) -> Vec<Key> {
        self.sent[sender]
            .iter()
            .filter(|(k, f)| !**f && !self.got[1 - sender].contains_key(k))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Every message `sender` reported sent (final ones too) reached the
    /// other application.
    pub fn all_delivered(&self, sender: usize) -> bool {
        self.sent[sender].keys().all(|k| self.got[1 - sender].contains_key(k))
    }

    /// The final-exchange messages of `sender`: reported sent, and of those
    /// how many the other application got.
    pub fn finals(&self, sender: usize) -> (usize, usize) {
        let finals: BTreeSet<&Key> = self.sent[sender].iter().filter(|(_, f)| **f).map(|(k, _)| k).collect();
        let got = finals.iter().filter(|k| self.got[1 - sender].contains_key(k)).count();
        (finals.len(), got)
    }

    /// Messages the application of `receiver` got that were never reported
    /// sent (the sender died between `send()` committing and printing).
    pub fn unreported(&self, receiver: usize) -> usize {
        self.got[receiver]
            .keys()
            .filter(|k| !self.sent[1 - receiver].contains_key(k))
            .count()
    }
}
