//! One peer's messages awaiting end-to-end receipts, kept so that what a
//! send costs does not grow with how many are waiting.
//!
//! A send checks the bytes awaiting receipts over all peers, and each
//! commit reports to the store what changed in the list. Both used to walk
//! every waiting message: up to [`super::MeshConfig::max_unconfirmed_per_peer`]
//! per peer, on every send. The list counts its payload bytes as it
//! changes, and knows when the only change since the store's last look is
//! messages appended at its end (a send's case), so that a commit reports
//! them without comparing the rest.

use super::Unconfirmed;
use std::collections::HashSet;

/// Receipts naming more ids than this are looked up through a hash set
/// rather than a scan of the ids per waiting message.
const RECEIPT_SET_FROM: usize = 8;

/// The messages one peer has not confirmed, in sending order.
#[derive(Default)]
pub(super) struct UnconfirmedList {
    items: Vec<Unconfirmed>,
    /// Payload bytes of `items`.
    bytes: usize,
    /// `Some(n)`: since the last [`UnconfirmedList::mark_clean`] only
    /// entries were appended, and the first `n` are as they were then.
    /// `None`: something else changed (a removal, a retransmission stamp),
    /// or the list was never marked: compare it whole.
    clean: Option<usize>,
}

impl UnconfirmedList {
    /// A list of `items` (as loaded), not marked clean.
    pub(super) fn from_vec(items: Vec<Unconfirmed>) -> Self {
        let bytes = items.iter().map(|u| u.payload.len()).sum();
        Self {
            items,
            bytes,
            clean: None,
        }
    }

    /// How many messages wait.
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether none waits.
    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Payload bytes waiting.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The messages, oldest first.
    pub(super) fn as_slice(&self) -> &[Unconfirmed] {
        &self.items
    }

    /// Appends a message just sent.
    pub(super) fn push(&mut self, u: Unconfirmed) {
        self.bytes = self.bytes.saturating_add(u.payload.len());
        self.items.push(u);
    }

    /// Forgets them all (the session they were sent on is gone).
    pub(super) fn clear(&mut self) {
        if !self.items.is_empty() {
            self.clean = None;
        }
        self.items.clear();
        self.bytes = 0;
    }

    /// Removes the messages a receipt names; whether any was waiting.
    pub(super) fn confirm(&mut self, ids: &[String]) -> bool {
        let before = self.items.len();
        if ids.len() > RECEIPT_SET_FROM {
            let set: HashSet<&str> = ids.iter().map(String::as_str).collect();
            self.items.retain(|u| !set.contains(u.id.as_str()));
        } else {
            self.items.retain(|u| !ids.contains(&u.id));
        }
        if self.items.len() == before {
            return false;
        }
        self.bytes = self.items.iter().map(|u| u.payload.len()).sum();
        self.clean = None;
        true
    }

    /// Marks every message to go out again at the next retransmission.
    pub(super) fn resend_all(&mut self) {
        if !self.items.is_empty() {
            self.clean = None;
        }
        for u in &mut self.items {
            u.sent_at = 0;
        }
    }

    /// Stamps `now` on the messages last sent `older_than_ms` or more
    /// before it and hands each to `due` with when it had last gone out.
    pub(super) fn stamp_due(&mut self, now: u64, older_than_ms: u64, mut due: impl FnMut(u64, &Unconfirmed)) {
        for u in &mut self.items {
            if now.saturating_sub(u.sent_at) >= older_than_ms {
                let last = u.sent_at;
                u.sent_at = now;
                self.clean = None;
                due(last, u);
            }
        }
    }

    /// The messages appended since the last [`UnconfirmedList::mark_clean`]
    /// when nothing else changed; `None` when the list must be compared
    /// whole.
    pub(super) fn appended(&self) -> Option<&[Unconfirmed]> {
        self.items.get(self.clean?..)
    }

    /// The store now holds the list as it is.
    pub(super) fn mark_clean(&mut self) {
        self.clean = Some(self.items.len());
    }
}

#[cfg(test)]
mod tests {
    use super::{Unconfirmed, UnconfirmedList};

    fn message(id: &str, payload: &str) -> Unconfirmed {
        Unconfirmed {
            id: id.to_owned(),
            payload: payload.to_owned(),
            sent_at: 10,
        }
    }

    fn ids(list: Option<&[Unconfirmed]>) -> Option<Vec<&str>> {
        list.map(|l| l.iter().map(|u| u.id.as_str()).collect())
    }

    #[test]
    fn only_appends_keep_the_list_clean() {
        let mut list = UnconfirmedList::from_vec(vec![message("a", "xx")]);
        assert_eq!(ids(list.appended()), None, "a loaded list is compared whole once");
        list.mark_clean();
        assert_eq!(ids(list.appended()), Some(vec![]));
        list.push(message("b", "yyy"));
        list.push(message("c", "z"));
        assert_eq!(ids(list.appended()), Some(vec!["b", "c"]));
        assert_eq!(list.bytes(), 6);
        list.mark_clean();

        assert!(!list.confirm(&["nobody".to_owned()]), "a receipt for nothing waiting");
        assert_eq!(ids(list.appended()), Some(vec![]), "and it changed nothing");
        assert!(list.confirm(&["b".to_owned()]));
        assert_eq!(ids(list.appended()), None, "a removal is not an append");
        assert_eq!(list.bytes(), 3);
        list.mark_clean();

        list.stamp_due(10_000, 5_000, |_, _| {});
        assert_eq!(ids(list.appended()), None, "new send times are changes");
        list.mark_clean();
        let mut due = 0;
        list.stamp_due(10_001, 5_000, |_, _| due += 1);
        assert_eq!(
            (due, ids(list.appended())),
            (0, Some(vec![])),
            "nothing due, nothing changed"
        );

        list.resend_all();
        assert_eq!(ids(list.appended()), None);
        list.clear();
        assert_eq!((list.len(), list.bytes()), (0, 0));
    }

    #[test]
    fn a_long_receipt_removes_what_it_names_and_recounts() {
        let mut list = UnconfirmedList::default();
        for i in 0..100 {
            list.push(message(&format!("m{i}"), "1234"));
        }
        let receipt: Vec<String> = (0..100).step_by(2).map(|i| format!("m{i}")).collect();
        assert!(list.confirm(&receipt));
        assert_eq!(list.len(), 50);
        assert_eq!(list.bytes(), 200);
        assert!(list
            .as_slice()
            .iter()
            .all(|u| u.id.trim_start_matches('m').parse::<u32>().is_ok_and(|n| n % 2 == 1)));
    }
}
