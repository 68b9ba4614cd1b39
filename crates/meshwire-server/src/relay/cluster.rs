//! Live routing between instances that share a NATS store
//! ([`LiveRouter`]): the wire format of what instances tell each other,
//! forwarding a frame to the instance that holds its recipient, and the
//! per-connection task that answers for an agent connected here.
//!
//! Every message on `NS.live.<did>` starts with a tag byte:
//!
//! | tag | body | answer |
//! | --- | --- | --- |
//! | `F` | flags, kind, sender, id (length-prefixed), then the frame text | `1` taken (queued live, or parked behind a closing connection's queue), `0` not taken (stale, closing: store it), `B` busy (a closing connection's parked frames are at their limit: retry shortly) |
//! | `T` | the newcomer's [`HolderKey`] | `R` + the old holder's key, once it closed (4006) and handed its queue back to the store |
//! | `A` | a holder's key (no answer) | a holder with a smaller key closes (4006); one with a greater key announces its own |

use super::connection::{offer_local, Delivery, Offer};
use crate::server::Shared;
use crate::storage::nats::{LiveMessage, LiveRequestError, LiveRouter, LiveSubscription};
use crate::util::Esc;
use bytes::{BufMut, Bytes, BytesMut};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};

/// How long a newcomer waits for the previous holder on another instance
/// to close and hand its queue back.
pub(crate) const TAKEOVER_WAIT: Duration = Duration::from_secs(2);
/// Longest a sender retries a holder that answers "busy".
const BUSY_WAIT: Duration = Duration::from_secs(10);
/// Pause between two tries at a busy holder.
const BUSY_RETRY: Duration = Duration::from_millis(20);
/// How long a closing holder keeps answering what it received before it
/// unsubscribed.
const DRAIN_WAIT: Duration = Duration::from_millis(100);

const TAG_FRAME: u8 = b'F';
const TAG_TAKEOVER: u8 = b'T';
const TAG_ANNOUNCE: u8 = b'A';
const TAG_RELEASED: u8 = b'R';
const ANSWER_TAKEN: u8 = b'1';
const ANSWER_NOT_TAKEN: u8 = b'0';
const ANSWER_BUSY: u8 = b'B';
/// Flag: the recipient's connection sends its stored frames before this one.
const FLAG_FETCH_FIRST: u8 = 1;
/// The routed frame types, by their index on the wire.
const KINDS: [&str; 4] = ["message", "knock", "knock_accept", "knock_reject"];

/// Orders the connections of one DID cluster-wide: the greatest key is
/// the newest and wins a race. Wall-clock nanoseconds (a newcomer's key is
/// also above the key of the holder it displaced), then a random instance
/// number and the connection number as tie-breakers, so every instance
/// agrees on the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct HolderKey {
    nanos: u64,
    instance: u64,
    conn: u64,
}

const KEY_BYTES: usize = 24;

impl HolderKey {
    fn encode(self, tag: u8) -> Bytes {
        let mut out = BytesMut::with_capacity(1 + KEY_BYTES);
        out.put_u8(tag);
        out.put_u64(self.nanos);
        out.put_u64(self.instance);
        out.put_u64(self.conn);
        out.freeze()
    }

    fn decode(body: &[u8]) -> Option<Self> {
        if body.len() != KEY_BYTES {
            return None;
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(body.get(i * 8..i * 8 + 8)?);
            Some(u64::from_be_bytes(b))
        };
        Some(Self {
            nanos: word(0)?,
            instance: word(1)?,
            conn: word(2)?,
        })
    }
}

/// This instance's side of live routing.
#[derive(Debug, Clone)]
pub(crate) struct Cluster {
    router: LiveRouter,
    instance: u64,
    timeout: Duration,
}

/// What the cluster did with a frame.
pub(crate) enum Forwarded {
    /// Another instance took it.
    Taken,
    /// Nobody took it (the reason labels the fallback metric): store it.
    NotTaken,
}

/// One decoded message on a DID subject.
enum Envelope {
    Frame(Delivery),
    Takeover(HolderKey),
    Announce(HolderKey),
}

fn encode_frame(delivery: &Delivery) -> Bytes {
    let kind = KINDS.iter().position(|k| *k == delivery.kind).unwrap_or(0);
    let mut out = BytesMut::with_capacity(11 + delivery.sender.len() + delivery.id.len() + delivery.text.len());
    out.put_u8(TAG_FRAME);
    out.put_u8(if delivery.fetch_first { FLAG_FETCH_FIRST } else { 0 });
    out.put_u8(u8::try_from(kind).unwrap_or(0));
    for field in [delivery.sender.as_bytes(), delivery.id.as_bytes()] {
        out.put_u32(u32::try_from(field.len()).unwrap_or(u32::MAX));
        out.put_slice(field);
    }
    out.put_slice(delivery.text.as_bytes());
    out.freeze()
}

/// Splits `len`-prefixed field off `body`.
fn field(body: &[u8]) -> Option<(&str, &[u8])> {
    let (len, rest) = body.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    if rest.len() < len {
        return None;
    }
    let (value, rest) = rest.split_at(len);
    Some((std::str::from_utf8(value).ok()?, rest))
}

fn decode(payload: &[u8]) -> Option<Envelope> {
    let (&tag, body) = payload.split_first()?;
    match tag {
        TAG_FRAME => {
            let [flags, kind, rest @ ..] = body else {
                return None;
            };
            let kind = *KINDS.get(usize::from(*kind))?;
            let (sender, rest) = field(rest)?;
            let (id, rest) = field(rest)?;
            let text = std::str::from_utf8(rest).ok()?;
            Some(Envelope::Frame(Delivery {
                kind,
                id: id.to_owned(),
                sender: sender.to_owned(),
                text: Arc::from(text),
                fetch_first: flags & FLAG_FETCH_FIRST != 0,
            }))
        }
        TAG_TAKEOVER => HolderKey::decode(body).map(Envelope::Takeover),
        TAG_ANNOUNCE => HolderKey::decode(body).map(Envelope::Announce),
        _ => None,
    }
}

impl Cluster {
    pub(crate) fn new(router: LiveRouter, timeout: Duration) -> Self {
        Self {
            router,
            instance: rand_core::RngCore::next_u64(&mut rand_core::OsRng),
            timeout,
        }
    }

    /// A key for connection `conn` of this instance, now.
    pub(crate) fn key(&self, conn: u64) -> HolderKey {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        HolderKey {
            nanos,
            instance: self.instance,
            conn,
        }
    }

    /// Asks the instance holding `to` to take `delivery` live. Never both
    /// taken and [`Forwarded::NotTaken`], except when the answer is lost or
    /// late (timeout, NATS error): then the holder may have taken it and
    /// the caller stores it too (at least once).
    pub(crate) async fn forward(&self, shared: &Shared, to: &str, delivery: &Delivery) -> Forwarded {
        let payload = encode_frame(delivery);
        let started = Instant::now();
        let reason = loop {
            match self.router.request_did_within(to, payload.clone(), self.timeout).await {
                Ok(answer) => match answer.first() {
                    Some(&ANSWER_TAKEN) => {
                        shared.metrics.cluster_out.inc();
                        return Forwarded::Taken;
                    }
                    Some(&ANSWER_BUSY) if started.elapsed() < BUSY_WAIT => tokio::time::sleep(BUSY_RETRY).await,
                    Some(&ANSWER_BUSY) => break "busy",
                    _ => break "refused",
                },
                Err(LiveRequestError::NoResponders) => break "no_responders",
                Err(LiveRequestError::TimedOut) => break "timeout",
                Err(LiveRequestError::Failed(error)) => {
                    tracing::warn!(to = %Esc(to), %error, "forwarding a frame to another instance failed");
                    break "error";
                }
            }
        };
        shared.metrics.cluster_fallback(reason);
        Forwarded::NotTaken
    }

    /// Closes `did`'s connection on any other instance (4006) and waits
    /// until it handed its queue back; then subscribes to `did`'s subject.
    /// Returns the subscription (`None` if NATS failed: the connection
    /// still works locally) and this connection's key.
    pub(crate) async fn claim(&self, did: &str, conn: u64) -> (Option<LiveSubscription>, HolderKey) {
        let mut key = self.key(conn);
        match self
            .router
            .request_did_within(did, key.encode(TAG_TAKEOVER), TAKEOVER_WAIT)
            .await
        {
            Ok(answer) => {
                if let Some((&TAG_RELEASED, body)) = answer.split_first() {
                    if let Some(previous) = HolderKey::decode(body) {
                        // Newer than the connection it displaced, whatever
                        // the clocks say.
                        key.nanos = key.nanos.max(previous.nanos.saturating_add(1));
                    }
                }
                tracing::info!(did = %Esc(did), "took the session over from another connection");
            }
            Err(LiveRequestError::NoResponders) => {}
            Err(error) => tracing::warn!(did = %Esc(did), %error, "cluster takeover not confirmed"),
        }
        match self.router.subscribe_did(did).await {
            Ok(subscription) => {
                // The server has the subscription once it answered a round
                // trip (a flush only writes it to the socket).
                if let Err(error) = self.router.sync().await {
                    tracing::warn!(did = %Esc(did), %error, "confirming a live subscription failed");
                }
                (Some(subscription), key)
            }
            Err(error) => {
                tracing::warn!(did = %Esc(did), %error, "subscribing to the agent's live subject failed; frames from other instances are stored");
                (None, key)
            }
        }
    }

    /// Tells every other holder of `did` that `key` holds it now (resolves
    /// two connections that claimed it at the same time).
    pub(crate) async fn announce(&self, did: &str, key: HolderKey) {
        if let Err(error) = self.router.publish_to_did(did, key.encode(TAG_ANNOUNCE)).await {
            tracing::warn!(did = %Esc(did), %error, "announcing a connection to the cluster failed");
        }
    }

    async fn answer(&self, message: &LiveMessage, answer: u8) {
        if message.wants_reply() {
            if let Err(error) = self.router.reply(message, Bytes::copy_from_slice(&[answer])).await {
                tracing::debug!(%error, "answering another instance failed");
            }
        }
    }
}

/// What a connection's live-subject task needs.
pub(crate) struct Holder {
    pub(crate) shared: Arc<Shared>,
    pub(crate) cluster: Cluster,
    pub(crate) did: String,
    pub(crate) conn: u64,
    pub(crate) key: HolderKey,
    /// Closes the connection with 4006.
    pub(crate) replaced: Arc<Notify>,
    /// True once the connection handed its queue back.
    pub(crate) done: watch::Receiver<bool>,
}

impl Holder {
    /// Answers `did`'s subject for the connection until it handed its queue
    /// back, then unsubscribes, answers what was already received and
    /// confirms a takeover.
    pub(crate) async fn serve(mut self, mut subscription: LiveSubscription) {
        let mut takeover: Option<LiveMessage> = None;
        let mut displaced = false;
        loop {
            let message = tokio::select! {
                biased;
                _ = self.done.wait_for(|done| *done) => break,
                message = subscription.next() => message,
            };
            let Some(message) = message else {
                break;
            };
            match decode(&message.payload) {
                Some(Envelope::Frame(delivery)) => self.take(&message, delivery).await,
                Some(Envelope::Takeover(key)) => {
                    if key != self.key {
                        self.displace(&mut displaced);
                        if takeover.is_none() {
                            takeover = Some(message);
                        }
                    }
                }
                Some(Envelope::Announce(key)) => {
                    if key > self.key {
                        self.displace(&mut displaced);
                    } else if key < self.key && !displaced {
                        self.cluster.announce(&self.did, self.key).await;
                    }
                }
                None => {
                    tracing::debug!(did = %Esc(&self.did), "unreadable message on a live subject");
                    self.cluster.answer(&message, ANSWER_NOT_TAKEN).await;
                }
            }
        }
        if let Err(error) = subscription.close().await {
            tracing::debug!(did = %Esc(&self.did), %error, "unsubscribing failed");
        }
        // What arrived before the unsubscribe: frames are not ours any
        // more (the sender stores them), takeovers are done.
        while let Ok(Some(message)) = tokio::time::timeout(DRAIN_WAIT, subscription.next()).await {
            match decode(&message.payload) {
                Some(Envelope::Takeover(_)) => self.released(&message).await,
                Some(Envelope::Announce(_)) => {}
                _ => self.cluster.answer(&message, ANSWER_NOT_TAKEN).await,
            }
        }
        if let Some(message) = takeover {
            self.released(&message).await;
        }
    }

    fn displace(&self, displaced: &mut bool) {
        if !*displaced {
            *displaced = true;
            tracing::info!(did = %Esc(&self.did), "closing the connection: the agent connected to another instance");
            self.shared.metrics.cluster_takeovers.inc();
            self.replaced.notify_one();
        }
    }

    async fn released(&self, message: &LiveMessage) {
        if message.wants_reply() {
            if let Err(error) = self.cluster.router.reply(message, self.key.encode(TAG_RELEASED)).await {
                tracing::debug!(%error, "confirming a takeover failed");
            }
        }
    }

    /// A frame from another instance: through the same path as a local
    /// one. Silent when another connection of this instance holds the DID
    /// now (its own task answers).
    async fn take(&self, message: &LiveMessage, delivery: Delivery) {
        let answer = match offer_local(&self.shared, &self.did, delivery, Some(self.conn)) {
            Offer::Queued | Offer::Parked => {
                self.shared.metrics.cluster_in.inc();
                ANSWER_TAKEN
            }
            Offer::Full(..) => ANSWER_BUSY,
            Offer::NotLive(_) | Offer::Absent(_) => ANSWER_NOT_TAKEN,
            Offer::NotMine(_) => return,
        };
        self.cluster.answer(message, answer).await;
    }
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let delivery = Delivery {
            kind: "knock_accept",
            id: "m\n1".to_owned(),
            sender: "did:mesh:a".to_owned(),
            text: Arc::from("{\"type\":\"knock_accept\"}"),
            fetch_first: true,
        };
        let wire = encode_frame(&delivery);
        let Some(Envelope::Frame(back)) = decode(&wire) else {
            panic!("not a frame");
        };
        assert_eq!(back.kind, "knock_accept");
        assert_eq!(back.id, "m\n1");
        assert_eq!(back.sender, "did:mesh:a");
        assert_eq!(&*back.text, "{\"type\":\"knock_accept\"}");
        assert!(back.fetch_first);
        // Every truncation is refused, never a panic.
        for cut in 0..wire.len() - delivery.text.len() {
            assert!(decode(&wire[..cut]).is_none(), "cut {cut}");
        }
        assert!(decode(b"F\x00\x09").is_none());
        assert!(decode(b"Zxyz").is_none());
        let key = HolderKey {
            nanos: 5,
            instance: 6,
            conn: 7,
        };
        assert!(matches!(decode(&key.encode(TAG_TAKEOVER)), Some(Envelope::Takeover(k)) if k == key));
        assert!(matches!(decode(&key.encode(TAG_ANNOUNCE)), Some(Envelope::Announce(k)) if k == key));
        assert!(decode(&key.encode(TAG_ANNOUNCE)[..10]).is_none());
    }

    #[test]
    fn keys_order_by_time_then_instance_then_connection() {
        let key = |nanos, instance, conn| HolderKey { nanos, instance, conn };
        assert!(key(2, 0, 0) > key(1, 9, 9));
        assert!(key(1, 2, 0) > key(1, 1, 9));
        assert!(key(1, 1, 2) > key(1, 1, 1));
    }
}
