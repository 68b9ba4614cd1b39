//! One authenticated relay connection: its place in the routing table
//! (and, on a cluster, its DID's live subject), its main loop (frames in,
//! deliveries out), routing of the frames it sends, and handing
//! undelivered frames back to the offline store when it ends.

use super::close_code;
use super::cluster::{Forwarded, Holder};
use super::frames::{classify, label, Incoming};
use super::mailbox::{StoreOutcome, DELIVERY_BATCH};
use super::socket::{
    linger, send_close, send_close_within, send_error, send_text, shutting_down, Gone, Sink, Stream, WRITE_TIMEOUT,
};
use super::unacked::Unacked;
use crate::config::duration_ms;
use crate::server::Shared;
use crate::storage::Quota;
use crate::util::Esc;
use futures_util::{SinkExt, StreamExt};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

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
/// A batch buffer grown past this many frames is not kept for the next.
const KEPT_BATCH_CAPACITY: usize = 64;
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
        self.all || (!self.recipients.is_empty() && self.recipients.contains(to))
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
        if !self.recipients.is_empty() {
            self.recipients.remove(to);
        }
    }
}

/// A live connection, as the router sees it.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    id: u64,
    link: Arc<Link>,
    /// Tells the connection that another one replaced it.
    replaced: oneshot::Sender<()>,
}

/// What a connection shares with the senders that route frames to it (one
/// allocation per connection).
#[derive(Debug)]
struct Link {
    /// Last time (server clock, ms) anything arrived on the connection.
    last_active: AtomicU64,
    /// Tells the connection that its outbound buffer overflowed.
    slow: Notify,
    /// Tells the connection that its live queue went from empty to not.
    ready: Notify,
    queue: Mutex<Queue>,
    /// Becomes true once the connection handed its queue back.
    done: watch::Receiver<bool>,
}

/// A connection's outbound frames: the live queue (sent in batches: one
/// socket flush per batch) and, once it stopped taking live frames, the
/// parked ones. Order per recipient is kept: once one frame is parked,
/// every later one is too, and the connection stores its live queue first,
/// then the parked frames, and only then lets new frames go to the store
/// directly (`released`).
#[derive(Default)]
struct Queue {
    live: VecDeque<Delivery>,
    /// Frames and bytes of `live` plus those of the batch being written:
    /// at most `outbound_queue` frames and `outbound_queue_bytes` bytes
    /// (one frame always fits an empty queue).
    frames: usize,
    bytes: usize,
    /// The connection takes no more live frames (it is ending).
    closed: bool,
    parked: Vec<Delivery>,
    /// Bytes of `parked`: at most the outbound byte budget (and at most
    /// `outbound_queue` frames); past it senders wait until the connection
    /// handed everything back, then store directly.
    parked_bytes: usize,
    released: bool,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("live", &self.live.len())
            .field("frames", &self.frames)
            .field("bytes", &self.bytes)
            .field("parked", &self.parked.len())
            .field("released", &self.released)
            .finish()
    }
}

impl Link {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frees the budget of frames written (or stored) from a batch.
    fn written(&self, frames: usize, bytes: usize) {
        let mut queue = self.queue();
        queue.frames = queue.frames.saturating_sub(frames);
        queue.bytes = queue.bytes.saturating_sub(bytes);
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
    link: Arc<Link>,
    replaced: oneshot::Receiver<()>,
    done: watch::Sender<bool>,
    /// Tells the connection that a newer one for its DID took over on
    /// another instance (or won a race for it); cluster only.
    displaced: Option<Arc<Notify>>,
    /// Answers the DID's live subject for other instances (cluster only).
    holder: Option<JoinHandle<()>>,
    sticky: Sticky,
    /// Stored frames up to this position were sent on this connection:
    /// `fetch_pending` (which TypeScript clients send right after
    /// `connect`) must not send them again, or clients whose ratchet is not
    /// transactional break.
    cursor: u64,
    /// Message frames written live and not acknowledged yet: stored when
    /// the connection ends.
    unacked: Unacked,
    /// A stored frame was sent on this connection: an `ack` may be for
    /// one, so it always goes to the store too.
    sent_stored: bool,
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
        let (replaced_tx, replaced) = oneshot::channel();
        let (done, done_rx) = watch::channel(false);
        let link = Arc::new(Link {
            last_active: AtomicU64::new(shared.config.now().0),
            slow: Notify::new(),
            ready: Notify::new(),
            queue: Mutex::new(Queue::default()),
            done: done_rx,
        });
        let previous = relay.conns().insert(
            did.clone(),
            ConnHandle {
                id,
                link: Arc::clone(&link),
                replaced: replaced_tx,
            },
        );
        if let Some(previous) = previous {
            tracing::info!(did = %Esc(&did), "closing the previous connection (session replaced)");
            let ConnHandle { link, replaced, .. } = previous;
            let _ = replaced.send(());
            let mut previous_done = link.done.clone();
            drop(link);
            let _ = tokio::time::timeout(TAKEOVER_WAIT, previous_done.wait_for(|done| *done)).await;
        }
        let mut displaced = None;
        let mut holder = None;
        if let (Some(cluster), Some((subscription, key))) = (&relay.cluster, claimed) {
            let notify = Arc::new(Notify::new());
            if let Some(subscription) = subscription {
                let task = Holder {
                    shared: Arc::clone(shared),
                    cluster: cluster.clone(),
                    did: did.clone(),
                    conn: id,
                    key,
                    replaced: Arc::clone(&notify),
                    done: done.subscribe(),
                };
                holder = Some(tokio::spawn(task.serve(subscription)));
            }
            displaced = Some(notify);
            cluster.announce(&did, key).await;
        }
        tracing::info!(did = %Esc(&did), "agent connected");
        Self {
            did,
            id,
            link,
            replaced,
            done,
            displaced,
            holder,
            sticky: Sticky::default(),
            cursor: 0,
            unacked: Unacked::default(),
            sent_stored: false,
        }
    }

    /// Serves the connection until it ends, then leaves the routing table.
    pub(crate) async fn run(mut self, shared: &Shared, mut sink: Sink, mut stream: Stream) {
        // Boxed, as the ending below: only what is live while the
        // connection is open is part of its task (idle connections cost
        // memory).
        let end = Box::pin(self.main_loop(shared, &mut sink, &mut stream)).await;
        Box::pin(self.finish(shared, end, sink, stream)).await;
    }

    /// Closes the socket as `end` says, hands the queue back and lingers
    /// for the peer's close frame.
    async fn finish(mut self, shared: &Shared, end: End, mut sink: Sink, mut stream: Stream) {
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
        if Box::pin(self.deliver_pending(shared, sink)).await.is_err() {
            return End::Gone;
        }
        let idle_timeout = shared.config.idle_timeout;
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let mut shutdown = shared.shutdown_receiver();
        // Long-lived waits, registered once rather than on every turn.
        let link = Arc::clone(&self.link);
        let displaced = self.displaced.clone();
        let shutdown = shutting_down(&mut shutdown);
        tokio::pin!(shutdown);
        let slow = link.slow.notified();
        tokio::pin!(slow);
        let ready = link.ready.notified();
        tokio::pin!(ready);
        let displaced = async {
            match &displaced {
                Some(notify) => notify.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(displaced);
        let mut batch = VecDeque::new();
        let mut last_frame = Instant::now();
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    return End::Close(close_code::GOING_AWAY, "server shutting down");
                }
                _ = &mut self.replaced => {
                    return End::Close(close_code::SESSION_REPLACED, "session_replaced");
                }
                () = &mut displaced => {
                    return End::Close(close_code::SESSION_REPLACED, "session_replaced");
                }
                () = &mut slow => return End::Slow,
                incoming = stream.next() => {
                    let Some(Ok(message)) = incoming else {
                        return End::Gone;
                    };
                    // The timer is re-armed when it fires, from the last
                    // frame (re-arming it on every frame costs).
                    last_frame = Instant::now();
                    link.last_active.store(shared.config.now().0, Ordering::Relaxed);
                    let flow = match message {
                        Message::Text(text) => self.handle_text(shared, sink, text).await,
                        Message::Binary(_) => {
                            shared.metrics.frame_in("binary");
                            shared.metrics.frame_out("error");
                            Box::pin(send_error(sink, "Binary frames are not supported"))
                                .await
                                .map(|()| Flow::Continue)
                        }
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(Flow::Continue),
                        Message::Close(_) => return End::Gone,
                    };
                    match flow {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Close(code)) => return End::Close(code, ""),
                        Err(Gone) => return End::Gone,
                    }
                }
                () = &mut ready => {
                    ready.set(link.ready.notified());
                    std::mem::swap(&mut link.queue().live, &mut batch);
                    if batch.is_empty() {
                        continue;
                    }
                    let sent = self.send_batch(shared, sink, &mut batch, slow.as_mut()).await;
                    // Whatever was not written goes to the store, oldest
                    // first: after what was written and not acknowledged
                    // (the connection is ending).
                    let unsent = batch.len();
                    if unsent > 0 {
                        self.store_unacked(shared).await;
                        let mut bytes = 0;
                        for delivery in batch.drain(..) {
                            bytes += delivery.text.len();
                            Box::pin(store(shared, &self.did, delivery)).await;
                        }
                        link.written(unsent, bytes);
                    }
                    if let Err(end) = sent {
                        return end;
                    }
                    if batch.capacity() > KEPT_BATCH_CAPACITY {
                        batch = VecDeque::new();
                    }
                }
                () = &mut idle => {
                    let deadline = last_frame + idle_timeout;
                    if deadline > Instant::now() {
                        idle.as_mut().reset(deadline);
                        continue;
                    }
                    tracing::info!(did = %Esc(&self.did), "idle timeout");
                    return End::Close(close_code::IDLE_TIMEOUT, "");
                }
            }
        }
    }

    /// Writes `batch` (frames taken from the live queue, oldest first) with
    /// one flush per run of frames, removing the frames written; on an
    /// error the frames left are not written (the caller stores them). A
    /// frame marked [`Delivery::fetch_first`] makes the stored frames go
    /// first. A peer that stops reading blocks the flush: the overflow
    /// signal (`slow`) must still end the connection.
    async fn send_batch(
        &mut self,
        shared: &Shared,
        sink: &mut Sink,
        batch: &mut VecDeque<Delivery>,
        mut slow: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    ) -> Result<(), End> {
        while !batch.is_empty() {
            if batch.front().is_some_and(|d| d.fetch_first)
                && Box::pin(self.deliver_pending(shared, sink)).await.is_err()
            {
                return Err(End::Gone);
            }
            // The run: up to the next frame that fetches first.
            let run = batch
                .iter()
                .skip(1)
                .position(|d| d.fetch_first)
                .map_or(batch.len(), |at| at + 1);
            let sent = tokio::select! {
                biased;
                () = slow.as_mut() => return Err(End::Slow),
                sent = write_run(sink, batch.range(..run)) => sent,
            };
            if sent.is_err() {
                return Err(End::Gone);
            }
            let mut bytes = 0;
            let (max_frames, max_bytes) = (shared.config.outbound_queue, shared.config.outbound_queue_bytes);
            for delivery in batch.drain(..run) {
                bytes += delivery.text.len();
                shared.metrics.frame_out(delivery.kind);
                if delivery.kind == "message" {
                    for _ in 0..self.unacked.written(delivery, max_frames, max_bytes) {
                        shared.metrics.limit_refused("unacked");
                    }
                }
            }
            self.link.written(run, bytes);
        }
        Ok(())
    }

    async fn handle_text(&mut self, shared: &Shared, sink: &mut Sink, text: String) -> Result<Flow, Gone> {
        let incoming = classify(&self.did, &text, shared.config.max_frame_bytes);
        shared.metrics.frame_in(label(&incoming));
        match incoming {
            Incoming::Error(detail) => {
                shared.metrics.frame_out("error");
                Box::pin(send_error(sink, &detail)).await?;
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
                    Box::pin(send_error(sink, detail)).await?;
                }
            }
            Incoming::Ack(id) => {
                if let Some(id) = id {
                    // A frame held here was never stored (unless the
                    // sender sent it again after storing it, and then
                    // the stored copy was sent on this connection too).
                    if !self.unacked.ack(&id) || self.sent_stored {
                        Box::pin(shared.relay.mail.ack(&self.did, &id)).await;
                    }
                }
            }
            // Any frame refreshes liveness; nothing else to do.
            Incoming::Heartbeat => {}
            Incoming::Disconnect => return Ok(Flow::Close(close_code::NORMAL)),
            Incoming::FetchPending => Box::pin(self.deliver_pending(shared, sink)).await?,
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
                self.sent_stored = true;
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

    /// Stores the message frames written and not acknowledged, oldest
    /// first (the connection is ending).
    async fn store_unacked(&mut self, shared: &Shared) {
        for delivery in self.unacked.take() {
            store(shared, &self.did, delivery).await;
        }
    }

    /// Leaves the routing table (unless already replaced) and hands frames
    /// still queued for this connection back to the offline store.
    async fn release(&mut self, shared: &Shared) {
        // What was written but not acknowledged, then the live queue, then
        // what was parked behind it, in order; new frames keep being
        // parked until all are stored, so none overtakes them.
        self.store_unacked(shared).await;
        let live = {
            let mut queue = self.link.queue();
            queue.closed = true;
            queue.frames = 0;
            queue.bytes = 0;
            std::mem::take(&mut queue.live)
        };
        for delivery in live {
            store(shared, &self.did, delivery).await;
        }
        loop {
            let frames = {
                let mut queue = self.link.queue();
                if queue.parked.is_empty() {
                    queue.released = true;
                    break;
                }
                queue.parked_bytes = 0;
                std::mem::take(&mut queue.parked)
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

/// Writes a run of frames: each is buffered, then one flush.
async fn write_run<'a>(sink: &mut Sink, run: impl Iterator<Item = &'a Delivery>) -> Result<(), Gone> {
    let write = async {
        for delivery in run {
            sink.feed(Message::Text(delivery.text.to_string())).await?;
        }
        sink.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(Gone),
    }
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
pub(crate) fn offer_local(shared: &Shared, to: &str, delivery: Delivery, only: Option<u64>) -> Offer {
    let now = shared.config.now();
    let stale_ms = duration_ms(shared.config.stale_after);
    let link = {
        let conns = shared.relay.conns();
        let Some(h) = conns.get(to) else {
            return Offer::Absent(delivery);
        };
        if only.is_some_and(|id| id != h.id) {
            return Offer::NotMine(delivery);
        }
        let last = h.link.last_active.load(Ordering::Relaxed);
        if now.0.saturating_sub(last) > stale_ms {
            return Offer::NotLive(delivery);
        }
        Arc::clone(&h.link)
    };
    // Bound what a slow reader can make us hold: past the byte budget (one
    // frame always fits an empty queue) or the frame count, the reader is
    // a slow consumer: it is disconnected, and this frame and every later
    // one are parked, then stored after its queue (order per recipient is
    // kept).
    let max_frames = shared.config.outbound_queue.max(1);
    let max_bytes = shared.config.outbound_queue_bytes;
    let mut queue = link.queue();
    if queue.released {
        return Offer::NotLive(delivery);
    }
    let size = delivery.text.len();
    if queue.parked.is_empty() && !queue.closed {
        if queue.frames < max_frames && (queue.bytes == 0 || queue.bytes.saturating_add(size) <= max_bytes) {
            queue.frames += 1;
            queue.bytes += size;
            queue.live.push_back(delivery);
            let wake = queue.live.len() == 1;
            drop(queue);
            if wake {
                link.ready.notify_one();
            }
            shared.relay.routed.fetch_add(1, Ordering::Relaxed);
            return Offer::Queued;
        }
        overflowed(shared, to, &link.slow);
    }
    let full = queue.parked.len() >= max_frames || queue.parked_bytes.saturating_add(size) > max_bytes;
    if full {
        return Offer::Full(delivery, link.done.clone());
    }
    queue.parked_bytes += size;
    queue.parked.push(delivery);
    Offer::Parked
}

/// Routes a checked frame to `to`: live on this instance, live on the
/// instance that holds `to` (cluster), or into the offline store. The
/// error is the detail of the error frame for the sender.
async fn route(shared: &Shared, sticky: &mut Sticky, to: &str, mut delivery: Delivery) -> Result<(), &'static str> {
    delivery.fetch_first = sticky.get(to);
    match offer_local(shared, to, delivery, None) {
        Offer::Queued => {
            sticky.live(to);
            Ok(())
        }
        Offer::Parked => {
            sticky.stored(to);
            Ok(())
        }
        // Boxed: the rarer paths' state is not part of every connection's
        // (idle) state.
        offer => Box::pin(route_elsewhere(shared, sticky, to, offer)).await,
    }
}

/// [`route`] for a frame the recipient's live connection here did not
/// take: wait for it to hand back its queue, ask the cluster, store.
async fn route_elsewhere(shared: &Shared, sticky: &mut Sticky, to: &str, offer: Offer) -> Result<(), &'static str> {
    let delivery = match offer {
        Offer::Queued | Offer::Parked => return Ok(()),
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
        StoreOutcome::Full(Quota::Unregistered) => Err("Recipient is not registered; message dropped"),
        StoreOutcome::Full(_) => Err("Recipient inbox is full; message dropped"),
        StoreOutcome::Failed(_) => Err("Relay storage unavailable; message dropped"),
    }
}
