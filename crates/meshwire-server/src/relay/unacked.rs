//! Message frames a connection wrote live and its agent has not
//! acknowledged yet. A frame written to a socket is not yet received: the
//! agent may die with it in its receive buffer. Until the agent's `ack`
//! arrives the connection keeps the frame, and when the connection ends
//! the frames still here go to the offline store, so the agent gets them
//! on its next connect instead of waiting for the sender to send them
//! again (or never getting them, if the sender is gone).
//!
//! Bounded like the outbound queue (`outbound_queue` frames,
//! `outbound_queue_bytes` bytes): past either, the oldest frame is
//! forgotten (as a relay without this memory would) and counted
//! (`meshwire_limit_refusals_total{limit="unacked"}`).

use super::connection::Delivery;
use std::collections::{BTreeMap, HashMap};

/// The frames one connection wrote live and has no `ack` for.
#[derive(Debug, Default)]
pub(crate) struct Unacked {
    /// In the order written.
    frames: BTreeMap<u64, Delivery>,
    /// Message id → key in `frames`.
    by_id: HashMap<String, u64>,
    next: u64,
    bytes: usize,
}

impl Unacked {
    /// Remembers `delivery`, written just now. A frame with the id of one
    /// already held (the sender sent it again) replaces it. Returns how
    /// many of the oldest frames were forgotten to stay within
    /// `max_frames` and `max_bytes` (never the one just written).
    pub(crate) fn written(&mut self, delivery: Delivery, max_frames: usize, max_bytes: usize) -> usize {
        let key = self.next;
        self.next += 1;
        if let Some(old) = self.by_id.insert(delivery.id.clone(), key) {
            if let Some(old) = self.frames.remove(&old) {
                self.bytes -= old.text.len();
            }
        }
        self.bytes += delivery.text.len();
        self.frames.insert(key, delivery);
        let mut forgotten = 0;
        while self.frames.len() > max_frames.max(1) || (self.bytes > max_bytes && self.frames.len() > 1) {
            let Some((_, oldest)) = self.frames.pop_first() else {
                break;
            };
            self.bytes -= oldest.text.len();
            self.by_id.remove(&oldest.id);
            forgotten += 1;
        }
        forgotten
    }

    /// The agent acknowledged `id`: whether a frame with it was held.
    pub(crate) fn ack(&mut self, id: &str) -> bool {
        let Some(key) = self.by_id.remove(id) else {
            return false;
        };
        if let Some(frame) = self.frames.remove(&key) {
            self.bytes -= frame.text.len();
        }
        true
    }

    /// Frames held now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.frames.len()
    }

    /// Everything held, oldest first; leaves this empty.
    pub(crate) fn take(&mut self) -> impl Iterator<Item = Delivery> {
        self.by_id.clear();
        self.bytes = 0;
        std::mem::take(&mut self.frames).into_values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn frame(id: &str, size: usize) -> Delivery {
        Delivery {
            kind: "message",
            id: id.to_owned(),
            sender: "did:mesh:a".to_owned(),
            text: Arc::from("x".repeat(size)),
            fetch_first: false,
        }
    }

    fn ids(unacked: &mut Unacked) -> Vec<String> {
        unacked.take().map(|d| d.id).collect()
    }

    #[test]
    fn acked_frames_go_and_the_rest_come_back_oldest_first() {
        let mut u = Unacked::default();
        for id in ["m1", "m2", "m3", "m4"] {
            assert_eq!(u.written(frame(id, 10), 100, 1000), 0);
        }
        assert!(u.ack("m3"));
        assert!(!u.ack("m3"), "only once");
        assert!(!u.ack("other"));
        assert!(u.ack("m1"));
        assert_eq!(u.len(), 2);
        assert_eq!(ids(&mut u), ["m2", "m4"]);
        assert_eq!((u.len(), u.bytes, u.by_id.len()), (0, 0, 0));
    }

    #[test]
    fn a_frame_sent_again_replaces_the_held_copy_at_its_new_place() {
        let mut u = Unacked::default();
        u.written(frame("m1", 10), 100, 1000);
        u.written(frame("m2", 10), 100, 1000);
        u.written(frame("m1", 12), 100, 1000);
        assert_eq!((u.len(), u.bytes), (2, 22));
        assert_eq!(ids(&mut u), ["m2", "m1"]);
    }

    #[test]
    fn past_the_bounds_the_oldest_frames_are_forgotten() {
        let mut u = Unacked::default();
        for i in 0..5 {
            assert_eq!(u.written(frame(&format!("m{i}"), 10), 3, 1000), usize::from(i >= 3));
        }
        assert_eq!(u.len(), 3);
        assert!(!u.ack("m0"), "forgotten");
        // Bytes: 25 + 25 fit 60, a third does not; one frame always stays.
        let mut u = Unacked::default();
        assert_eq!(u.written(frame("a", 25), 100, 60), 0);
        assert_eq!(u.written(frame("b", 25), 100, 60), 0);
        assert_eq!(u.written(frame("c", 25), 100, 60), 1);
        assert_eq!(u.written(frame("big", 500), 100, 60), 2);
        assert_eq!(ids(&mut u), ["big"]);
    }
}
