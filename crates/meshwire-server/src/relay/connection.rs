//! One authenticated relay connection: its place in the routing table
//! (and, on a cluster, its DID's live subject), its main loop (frames in,
//! deliveries out), routing of the frames it sends, and handing
//! undelivered frames back to the offline store when it ends.

use super::close_code;
use super::cluster::{Forwarded, Holder};
use super::frames::{classify, label, Incoming};
use super::mailbox::{StoreOutcome, DELIVERY_BATCH};
use super::socket::{linger, send_close, send_close_within, send_error, send_text, shutting_down, Gone, Sink, Stream};
use crate::config::duration_ms;
use crate::server::Shared;
use crate::storage::Quota;
use crate::util::Esc;
use axum::extract::ws::Message;
use futures_util::StreamExt;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long a taking-over connection waits for the one it replaces to hand
/// its undelivered queue back to the offline store.
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);
/// Longest a sender waits for a closing slow consumer to hand its queue
/// back when as much is parked for it as its queue may hold.
const PARKED_WAIT: Duration = Duration::from_secs(10);

/// How long a slow consumer's close frame may take before its socket is
/// dropped (its send buffer is full, so the frame may never go out).
const SLOW_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Recipients one connection remembers as "stored to since its last live
/// delivery" ([`Sticky`]); past it every live frame of the connection asks
/// for the recipient's stored frames first.
const MAX_STICKY: usize = 1024;
/// How long a connection's end waits for its live-subject task.
const HOLDER_WAIT: Duration = Duration::from_secs(5);

/// A frame queued for a live connection.
#[derive(Debug)]
pub(crate) struct Delivery {
    /// The frame's type (metrics label).
    pub(crate) kind: &'static str,
    pub(crate) id: String,
    pub(crate) sender: String,
    pub(crate) text: Arc<str>,
    /// The recipient's connection sends its stored frames (from its
    /// cursor) before this one: the sender stored an earlier frame for it,
    /// which must not be overtaken.
    pub(crate) fetch_first: bool,
}

/// Recipients this connection stored a frame for since its last live
/// delivery to them. Their next live frame carries
/// [`Delivery::fetch_first`], so that it cannot overtake the stored one
/// (which the recipient might otherwise only get on its next connect or
/// `fetch_pending`).
#[derive(Debug, Default)]
struct Sticky {
    recipients: HashSet<String>,
    /// More than [`MAX_STICKY`] recipients: every frame fetches first.
    all: bool,
}

impl Sticky {
    fn get(&self, to: &str) -> bool {
        self.all || self.recipients.contains(to)
    }

    fn stored(&mut self, to: &str) {
        if self.all || self.recipients.contains(to) {
            return;
        }
        if self.recipients.len() >= MAX_STICKY {
            self.all = true;
            self.recipients.clear();
        } else {
            self.recipients.insert(to.to_owned());
        }
    }

    fn live(&mut self, to: &str) {
        self.recipients.remove(to);
    }
}

/// A live connection, as the router sees it.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    id: u64,
    tx: mpsc::Sender<Delivery>,
    /// Bytes of frames in `tx`'s queue.
    queued_bytes: Arc<AtomicUsize>,
    /// Last time (server clock, ms) anything arrived on the connection.
    last_active: Arc<AtomicU64>,
    /// Tells the connection that another one replaced it.
    replaced: oneshot::Sender<()>,
    /// Tells the connection that its outbound buffer overflowed.
    slow: Arc<Notify>,
    /// Frames that could not join the live queue (overflow, or the
    /// connection closing), kept in order until the connection hands its
    /// queue back to the store.
    parked: Arc<Mutex<Parked>>,
    /// Becomes true once the connection handed its queue back.
    done: watch::Receiver<bool>,
}

/// Frames for a connection that stopped taking live frames. Order per
/// recipient is kept: once one frame is parked, every later one is too,
/// and the connection stores its live queue first, then these, and only
/// then lets new frames go to the store directly (`released`).
#[derive(Default)]
pub(crate) struct Parked {
    frames: Vec<Delivery>,
    /// Bytes of `frames`: at most the outbound byte budget (and at most
    /// `outbound_queue` frames); past it senders wait until the connection
    /// handed everything back, then store directly.
    bytes: usize,
    released: bool,
}

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parked")
            .field("frames", &self.frames.len())
            .field("released", &self.released)
            .finish()
    }
}

/// How a connection's main loop ended.
enum End {
    /// The peer closed or the socket failed.
    Gone,
    /// We close with this code and reason.
    Close(u16, &'static str),
    /// The outbound buffer overflowed: close quickly, the peer is not
    /// reading.
    Slow,
}

enum Flow {
    Continue,
    Close(u16),
}

/// A registered live connection.
pub(crate) struct Connection {
    did: String,
    id: u64,
    rx: mpsc::Receiver<Delivery>,
    queued_bytes: Arc<AtomicUsize>,
    replaced: oneshot::Receiver<()>,
    slow: Arc<Notify>,
    parked: Arc<Mutex<Parked>>,
    done: watch::Sender<bool>,
    last_active: Arc<AtomicU64>,
    /// Tells the connection that a newer one for its DID took over on
    /// another instance (or won a race for it).
    displaced: Arc<Notify>,
    /// Answers the DID's live subject for other instances (cluster only).
    holder: Option<JoinHandle<()>>,
    sticky: Sticky,
    /// Stored frames up to this position were sent on this connection:
    /// `fetch_pending` (which TypeScript clients send right after
    /// `connect`) must not send them again, or clients whose ratchet is not
    /// transactional break.
    cursor: u64,
}

impl Connection {
    /// Registers the connection for `did`, replacing (closing with 4006)
    /// any previous one, on this instance or (cluster) any other, and
    /// waiting for it to hand its queue back.
    pub(crate) async fn open(shared: &Arc<Shared>, did: String) -> Self {
        let relay = &shared.relay;
        let id = relay.next_id.fetch_add(1, Ordering::Relaxed);
        // Cluster: the previous holder elsewhere closes and hands its queue
        // back first; then this connection subscribes (before it enters the
        // table: until then a previous local connection answers for it).
        let claimed = match &relay.cluster {
            Some(cluster) => Some(cluster.claim(&did, id).await),
            None => None,
        };
        let (tx, rx) = mpsc::channel(shared.config.outbound_queue.max(1));
        let (replaced_tx, replaced) = oneshot::channel();
        let (done, done_rx) = watch::channel(false);
        let last_active = Arc::new(AtomicU64::new(shared.config.now().0));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let slow = Arc::new(Notify::new());
        let parked = Arc::new(Mutex::new(Parked::default()));
        let previous = relay.conns().insert(
            did.clone(),
            ConnHandle {
                id,
                tx,
                queued_bytes: Arc::clone(&queued_bytes),
                last_active: Arc::clone(&last_active),
                replaced: replaced_tx,
                slow: Arc::clone(&slow),
                parked: Arc::clone(&parked),
                done: done_rx,
            },
        );
        if let Some(previous) = previous {
            tracing::info!(did = %Esc(&did), "closing the previous connection (session replaced)");
            let _ = previous.replaced.send(());
            let mut previous_done = previous.done;
            let _ = tokio::time::timeout(TAKEOVER_WAIT, previous_done.wait_for(|done| *done)).await;
        }
        let displaced = Arc::new(Notify::new());
        let mut holder = None;
        if let (Some(cluster), Some((subscription, key))) = (&relay.cluster, claimed) {
            if let Some(subscription) = subscription {
                let task = Holder {
                    shared: Arc::clone(shared),
                    cluster: cluster.clone(),
                    did: did.clone(),
                    conn: id,
                    key,
                    replaced: Arc::clone(&displaced),
                    done: done.subscribe(),
                };
                holder = Some(tokio::spawn(task.serve(subscription)));
            }
            cluster.announce(&did, key).await;
        }
        tracing::info!(did = %Esc(&did), "agent connected");
        Self {
            did,
            id,
            rx,
            queued_bytes,
            replaced,
            slow,
            parked,
            done,
            last_active,
            displaced,
            holder,
            sticky: Sticky::default(),
            cursor: 0,
        }
    }

    /// Serves the connection until it ends, then leaves the routing table.
    pub(crate) async fn run(mut self, shared: &Shared, mut sink: Sink, mut stream: Stream) {
        let end = self.main_loop(shared, &mut sink, &mut stream).await;
        match end {
            End::Close(code, reason) => send_close(&mut sink, code, reason).await,
            End::Slow => {
                tracing::warn!(did = %Esc(&self.did), "closing a slow consumer (outbound buffer full)");
                send_close_within(&mut sink, close_code::SLOW_CONSUMER, "slow consumer", SLOW_CLOSE_WAIT).await;
            }
            End::Gone => {}
        }
        self.release(shared).await;
        // Also flushes the reply to a close frame the peer sent.
        linger(&mut stream).await;
        tracing::info!(did = %Esc(&self.did), "agent disconnected");
    }

    async fn main_loop(&mut self, shared: &Shared, sink: &mut Sink, stream: &mut Stream) -> End {
        if self.deliver_pending(shared, sink).await.is_err() {
            return End::Gone;
        }
        let idle_timeout = shared.config.idle_timeout;
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let mut shutdown = shared.shutdown_receiver();
        loop {
            tokio::select! {
                biased;
                () = shutting_down(&mut shutdown) => {
                    return End::Close(close_code::GOING_AWAY, "server shutting down");
                }
                _ = &mut self.replaced => {
                    return End::Close(close_code::SESSION_REPLACED, "session_replaced");
                }
                () = self.displaced.notified() => {
                    return End::Close(close_code::SESSION_REPLACED, "session_replaced");
                }
                () = self.slow.notified() => return End::Slow,
                incoming = stream.next() => {
                    let Some(Ok(message)) = incoming else {
                        return End::Gone;
                    };
                    idle.as_mut().reset(Instant::now() + idle_timeout);
                    self.last_active.store(shared.config.now().0, Ordering::Relaxed);
                    let flow = match message {
                        Message::Text(text) => self.handle_text(shared, sink, text).await,
                        Message::Binary(_) => {
                            shared.metrics.frame_in("binary");
                            shared.metrics.frame_out("error");
                            send_error(sink, "Binary frames are not supported")
                                .await
                                .map(|()| Flow::Continue)
                        }
                        Message::Ping(_) | Message::Pong(_) => Ok(Flow::Continue),
                        Message::Close(_) => return End::Gone,
                    };
                    match flow {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Close(code)) => return End::Close(code, ""),
                        Err(Gone) => return End::Gone,
                    }
                }
                delivery = self.rx.recv() => {
                    let Some(delivery) = delivery else {
                        // Our handle left the routing table: replaced.
                        return End::Close(close_code::SESSION_REPLACED, "session_replaced");
                    };
                    self.queued_bytes.fetch_sub(delivery.text.len(), Ordering::Relaxed);
                    if delivery.fetch_first && self.deliver_pending(shared, sink).await.is_err() {
                        store(shared, &self.did, delivery).await;
                        return End::Gone;
                    }
                    // A peer that stops reading blocks this write: the
                    // overflow signal must still end the connection.
                    let sent = tokio::select! {
                        biased;
                        () = self.slow.notified() => None,
                        sent = send_text(sink, delivery.text.to_string()) => Some(sent),
                    };
                    match sent {
                        Some(Ok(())) => shared.metrics.frame_out(delivery.kind),
                        Some(Err(Gone)) => {
                            store(shared, &self.did, delivery).await;
                            return End::Gone;
                        }
                        None => {
                            store(shared, &self.did, delivery).await;
                            return End::Slow;
                        }
                    }
                }
                () = &mut idle => {
                    tracing::info!(did = %Esc(&self.did), "idle timeout");
                    return End::Close(close_code::IDLE_TIMEOUT, "");
                }
            }
        }
    }

    async fn handle_text(&mut self, shared: &Shared, sink: &mut Sink, text: String) -> Result<Flow, Gone> {
        let incoming = classify(&self.did, &text, shared.config.max_frame_bytes);
        shared.metrics.frame_in(label(&incoming));
        match incoming {
            Incoming::Error(detail) => {
                shared.metrics.frame_out("error");
                send_error(sink, &detail).await?;
            }
            Incoming::Route { kind, to, id, stamped } => {
                if stamped.is_some() {
                    tracing::info!(did = %Esc(&self.did), "frame claimed another 'from'; stamped with the sender's DID");
                }
                let delivery = Delivery {
                    kind,
                    id,
                    sender: self.did.clone(),
                    text: Arc::from(stamped.unwrap_or(text)),
                    fetch_first: false,
                };
                if let Err(detail) = route(shared, &mut self.sticky, &to, delivery).await {
                    shared.metrics.frame_out("error");
                    send_error(sink, detail).await?;
                }
            }
            Incoming::Ack(id) => {
                if let Some(id) = id {
                    shared.relay.mail.ack(&self.did, &id).await;
                }
            }
            // Any frame refreshes liveness; nothing else to do.
            Incoming::Heartbeat => {}
            Incoming::Disconnect => return Ok(Flow::Close(close_code::NORMAL)),
            Incoming::FetchPending => self.deliver_pending(shared, sink).await?,
        }
        Ok(Flow::Continue)
    }

    /// Sends every stored frame for this DID not yet sent on this
    /// connection, oldest first, [`DELIVERY_BATCH`] per storage call. They
    /// stay stored until acknowledged (and are sent again on the next
    /// connection).
    async fn deliver_pending(&mut self, shared: &Shared, sink: &mut Sink) -> Result<(), Gone> {
        let mail = &shared.relay.mail;
        loop {
            let batch = match mail.batch(&self.did, self.cursor, shared.config.now()).await {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(did = %Esc(&self.did), %error, "reading stored messages failed");
                    shared.metrics.frame_out("error");
                    send_error(sink, "Stored messages are unavailable now; retry with fetch_pending").await?;
                    break;
                }
            };
            let more = batch.len() >= DELIVERY_BATCH;
            for (seq, text) in batch {
                send_text(sink, text.to_string()).await?;
                shared.metrics.frame_out("stored");
                self.cursor = self.cursor.max(seq);
                mail.delivered.fetch_add(1, Ordering::Relaxed);
            }
            if !more {
                break;
            }
        }
        // Fetching deletes expired messages it meets.
        mail.refresh().await;
        Ok(())
    }

    /// Leaves the routing table (unless already replaced) and hands frames
    /// still queued for this connection back to the offline store.
    async fn release(&mut self, shared: &Shared) {
        // The live queue first, then what was parked behind it, in order;
        // new frames keep being parked until both are stored, so none
        // overtakes them.
        self.rx.close();
        while let Ok(delivery) = self.rx.try_recv() {
            store(shared, &self.did, delivery).await;
        }
        loop {
            let frames = {
                let mut parked = lock_parked(&self.parked);
                if parked.frames.is_empty() {
                    parked.released = true;
                    break;
                }
                parked.bytes = 0;
                std::mem::take(&mut parked.frames)
            };
            for delivery in frames {
                store(shared, &self.did, delivery).await;
            }
        }
        {
            let mut conns = shared.relay.conns();
            if conns.get(&self.did).is_some_and(|h| h.id == self.id) {
                conns.remove(&self.did);
            }
        }
        self.done.send_replace(true);
        // The live subject is answered until here (frames taken meanwhile
        // were parked, then stored above, or refused), then dropped.
        if let Some(holder) = self.holder.take() {
            if tokio::time::timeout(HOLDER_WAIT, holder).await.is_err() {
                tracing::warn!(did = %Esc(&self.did), "the live-subject task did not end in time");
            }
        }
    }
}

fn lock_parked(parked: &Mutex<Parked>) -> std::sync::MutexGuard<'_, Parked> {
    parked.lock().unwrap_or_else(|p| p.into_inner())
}

async fn store(shared: &Shared, recipient: &str, delivery: Delivery) -> StoreOutcome {
    shared
        .relay
        .mail
        .store(
            recipient,
            &delivery.sender,
            &delivery.id,
            delivery.text,
            shared.config.now(),
        )
        .await
}

/// Signals `to`'s connection that its outbound buffer overflowed (it
/// closes with [`close_code::SLOW_CONSUMER`]).
fn overflowed(shared: &Shared, to: &str, slow: &Notify) {
    shared.metrics.limit_refused("outbound_buffer");
    tracing::debug!(did = %Esc(to), "outbound buffer full");
    slow.notify_one();
}

/// What [`offer_local`] did with a frame.
pub(crate) enum Offer {
    /// Queued for the recipient's live connection here.
    Queued,
    /// Parked behind the queue of the recipient's closing connection here
    /// (stored after it, in order).
    Parked,
    /// As much is parked as a queue may hold: store it once the closing
    /// connection handed its queue back (`done`), not before.
    Full(Delivery, watch::Receiver<bool>),
    /// The recipient is connected here but stale or closed: store it.
    NotLive(Delivery),
    /// The recipient is not connected to this instance.
    Absent(Delivery),
    /// Another connection than the one asked for holds the DID here.
    NotMine(Delivery),
}

/// Offers a frame to `to`'s live connection on this instance (to
/// connection `only` when given), without waiting: the one path of local
/// and cross-instance live deliveries, with the slow-consumer rules.
pub(crate) fn offer_local(shared: &Shared, to: &str, mut delivery: Delivery, only: Option<u64>) -> Offer {
    let now = shared.config.now();
    let stale_ms = duration_ms(shared.config.stale_after);
    let live = {
        let conns = shared.relay.conns();
        let Some(h) = conns.get(to) else {
            return Offer::Absent(delivery);
        };
        if only.is_some_and(|id| id != h.id) {
            return Offer::NotMine(delivery);
        }
        let last = h.last_active.load(Ordering::Relaxed);
        (now.0.saturating_sub(last) <= stale_ms).then(|| {
            (
                h.tx.clone(),
                Arc::clone(&h.queued_bytes),
                Arc::clone(&h.slow),
                Arc::clone(&h.parked),
                h.done.clone(),
            )
        })
    };
    let Some((tx, queued_bytes, slow, parked, done)) = live else {
        return Offer::NotLive(delivery);
    };
    // Bound what a slow reader can make us hold: past the byte budget (one
    // frame always fits an empty queue) or the frame count, the reader is
    // a slow consumer: it is disconnected, and this frame and every later
    // one are parked, then stored after its queue (order per recipient is
    // kept).
    let mut held = lock_parked(&parked);
    if held.released {
        return Offer::NotLive(delivery);
    }
    if held.frames.is_empty() {
        let size = delivery.text.len();
        let before = queued_bytes.fetch_add(size, Ordering::Relaxed);
        if before == 0 || before.saturating_add(size) <= shared.config.outbound_queue_bytes {
            match tx.try_send(delivery) {
                Ok(()) => {
                    shared.relay.routed.fetch_add(1, Ordering::Relaxed);
                    return Offer::Queued;
                }
                Err(TrySendError::Full(back)) => {
                    delivery = back;
                    overflowed(shared, to, &slow);
                }
                Err(TrySendError::Closed(back)) => delivery = back,
            }
        } else {
            overflowed(shared, to, &slow);
        }
        queued_bytes.fetch_sub(size, Ordering::Relaxed);
    }
    let size = delivery.text.len();
    let full = held.frames.len() >= shared.config.outbound_queue.max(1)
        || held.bytes.saturating_add(size) > shared.config.outbound_queue_bytes;
    if full {
        return Offer::Full(delivery, done);
    }
    held.bytes += size;
    held.frames.push(delivery);
    Offer::Parked
}

/// Routes a checked frame to `to`: live on this instance, live on the
/// instance that holds `to` (cluster), or into the offline store. The
/// error is the detail of the error frame for the sender.
async fn route(shared: &Shared, sticky: &mut Sticky, to: &str, mut delivery: Delivery) -> Result<(), &'static str> {
    delivery.fetch_first = sticky.get(to);
    let delivery = match offer_local(shared, to, delivery, None) {
        Offer::Queued => {
            sticky.live(to);
            return Ok(());
        }
        Offer::Parked => {
            sticky.stored(to);
            return Ok(());
        }
        Offer::Full(delivery, mut done) => {
            // As much is parked as a queue may hold: this sender waits
            // until the connection handed it all to the store (it is
            // closing), so that storing this frame now keeps the order.
            let _ = tokio::time::timeout(PARKED_WAIT, done.wait_for(|done| *done)).await;
            delivery
        }
        Offer::NotLive(delivery) | Offer::NotMine(delivery) => delivery,
        Offer::Absent(delivery) => match &shared.relay.cluster {
            Some(cluster) => match cluster.forward(shared, to, &delivery).await {
                Forwarded::Taken => {
                    sticky.live(to);
                    return Ok(());
                }
                Forwarded::NotTaken => delivery,
            },
            None => delivery,
        },
    };
    let outcome = store(shared, to, delivery).await;
    if outcome == StoreOutcome::Stored {
        sticky.stored(to);
    }
    match outcome {
        StoreOutcome::Stored | StoreOutcome::Duplicate => Ok(()),
        StoreOutcome::Full(Quota::Sender) => Err("Too many of your messages are queued; message dropped"),
        StoreOutcome::Full(_) => Err("Recipient inbox is full; message dropped"),
        StoreOutcome::Failed(_) => Err("Relay storage unavailable; message dropped"),
    }
}
