//! Prometheus metrics (`GET /metrics`, OpenMetrics text format).
//!
//! Every server has its own registry (no global recorder), so several
//! servers in one process (tests) do not mix their figures. Counters are
//! updated where things happen; gauges that mirror state (connections,
//! mailbox depth, agents, live proofs) are read when scraped.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `meshwire_connections` | gauge | (live relay connections, authenticated) |
//! | `meshwire_sockets` | gauge | (open relay WebSockets, handshaking included) |
//! | `meshwire_connections_accepted_total` | counter | |
//! | `meshwire_frames_in_total` | counter | `type` |
//! | `meshwire_frames_out_total` | counter | `type` |
//! | `meshwire_mailbox_messages` | gauge | (queued offline messages) |
//! | `meshwire_mailbox_bytes` | gauge | |
//! | `meshwire_messages_stored_total` / `_delivered_total` / `_routed_total` | counter | |
//! | `meshwire_cluster_routed_out_total` / `_routed_in_total` | counter | (frames handed to / taken from another instance over NATS) |
//! | `meshwire_cluster_fallbacks_total` | counter | `reason` (frames for an agent not connected here that went to the mailbox after asking the cluster) |
//! | `meshwire_cluster_takeovers_total` | counter | (connections closed with 4006 for a newer one on another instance) |
//! | `meshwire_registered_agents` | gauge | |
//! | `meshwire_live_proofs` | gauge | |
//! | `meshwire_auth_failures_total` | counter | `reason` |
//! | `meshwire_rate_limited_total` | counter | `limit` |
//! | `meshwire_limit_refusals_total` | counter | `limit` |
//! | `meshwire_agents_expired_total` | counter | |
//! | `meshwire_store_seconds` | histogram | `op` |

use crate::storage::{
    AgentChange, AgentRecord, Appended, Created, MailboxTotals, Mailboxes, NewMessage, OneTimeKey, Registry,
    StorageResult, StoredMessage,
};
use async_trait::async_trait;
use meshwire_proto::time::Timestamp;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry as PromRegistry;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// One label `name=value`, both fixed strings (never untrusted input).
pub(crate) type Label = [(&'static str, &'static str); 1];

type Counters = Family<Label, Counter>;

/// Frame types counted on the relay's hot path.
const FRAME_TYPES: [&str; 13] = [
    "message",
    "knock",
    "knock_accept",
    "knock_reject",
    "ack",
    "heartbeat",
    "disconnect",
    "fetch_pending",
    "invalid",
    "error",
    "stored",
    "binary",
    "connect",
];

/// A `type`-labelled counter family's series for [`FRAME_TYPES`], each
/// created in the family on first use (an unused type stays out of the
/// exposition, as with `get_or_create`).
#[derive(Default)]
struct FrameCounters([OnceLock<Counter>; FRAME_TYPES.len()]);

impl FrameCounters {
    fn inc(&self, family: &Counters, kind: &'static str) {
        match FRAME_TYPES.iter().position(|k| *k == kind).and_then(|i| self.0.get(i)) {
            Some(slot) => {
                slot.get_or_init(|| family.get_or_create(&[("type", kind)]).clone())
                    .inc();
            }
            None => {
                family.get_or_create(&[("type", kind)]).inc();
            }
        }
    }
}

fn histogram() -> Histogram {
    // 50 µs to ~3.3 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

/// The server's metrics.
pub(crate) struct Metrics {
    registry: PromRegistry,
    pub(crate) connections: Gauge,
    pub(crate) sockets: Gauge,
    pub(crate) accepted: Counter,
    frames_in: Counters,
    frames_out: Counters,
    /// The series of `frames_in` / `frames_out` for the frame types, once
    /// created: counting a frame is then one atomic add, not a lookup.
    frames_in_cache: FrameCounters,
    frames_out_cache: FrameCounters,
    pub(crate) mailbox_messages: Gauge,
    pub(crate) mailbox_bytes: Gauge,
    pub(crate) stored: Counter,
    pub(crate) delivered: Counter,
    pub(crate) routed: Counter,
    pub(crate) cluster_out: Counter,
    pub(crate) cluster_in: Counter,
    cluster_fallbacks: Counters,
    pub(crate) cluster_takeovers: Counter,
    pub(crate) agents: Gauge,
    pub(crate) live_proofs: Gauge,
    auth_failures: Counters,
    rate_limited: Counters,
    limit_refusals: Counters,
    pub(crate) agents_expired: Counter,
    store_seconds: Family<Label, Histogram, fn() -> Histogram>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = PromRegistry::with_prefix("meshwire");
        let this = Self {
            registry: PromRegistry::default(),
            connections: Gauge::default(),
            sockets: Gauge::default(),
            accepted: Counter::default(),
            frames_in: Counters::default(),
            frames_out: Counters::default(),
            frames_in_cache: FrameCounters::default(),
            frames_out_cache: FrameCounters::default(),
            mailbox_messages: Gauge::default(),
            mailbox_bytes: Gauge::default(),
            stored: Counter::default(),
            delivered: Counter::default(),
            routed: Counter::default(),
            cluster_out: Counter::default(),
            cluster_in: Counter::default(),
            cluster_fallbacks: Counters::default(),
            cluster_takeovers: Counter::default(),
            agents: Gauge::default(),
            live_proofs: Gauge::default(),
            auth_failures: Counters::default(),
            rate_limited: Counters::default(),
            limit_refusals: Counters::default(),
            agents_expired: Counter::default(),
            store_seconds: Family::new_with_constructor(histogram as fn() -> Histogram),
        };
        registry.register(
            "connections",
            "Live relay connections (authenticated)",
            this.connections.clone(),
        );
        registry.register(
            "sockets",
            "Open relay WebSockets, handshaking ones included (counted against max_connections)",
            this.sockets.clone(),
        );
        registry.register(
            "connections_accepted",
            "Relay connections that completed the connect handshake",
            this.accepted.clone(),
        );
        registry.register("frames_in", "Relay frames received, by type", this.frames_in.clone());
        registry.register("frames_out", "Relay frames sent, by type", this.frames_out.clone());
        registry.register(
            "mailbox_messages",
            "Messages queued in the offline store (all mailboxes)",
            this.mailbox_messages.clone(),
        );
        registry.register(
            "mailbox_bytes",
            "Bytes queued in the offline store",
            this.mailbox_bytes.clone(),
        );
        registry.register(
            "messages_stored",
            "Frames put into the offline store",
            this.stored.clone(),
        );
        registry.register(
            "messages_delivered",
            "Stored frames sent to their recipient",
            this.delivered.clone(),
        );
        registry.register("messages_routed", "Frames forwarded live", this.routed.clone());
        registry.register(
            "cluster_routed_out",
            "Frames handed live to an agent connected to another instance (NATS)",
            this.cluster_out.clone(),
        );
        registry.register(
            "cluster_routed_in",
            "Frames taken from another instance for an agent connected here (NATS)",
            this.cluster_in.clone(),
        );
        registry.register(
            "cluster_fallbacks",
            "Frames for an agent not connected here stored in the mailbox after asking the cluster, by reason",
            this.cluster_fallbacks.clone(),
        );
        registry.register(
            "cluster_takeovers",
            "Connections closed (4006) because the same DID connected to another instance",
            this.cluster_takeovers.clone(),
        );
        registry.register("registered_agents", "Agents in the registry", this.agents.clone());
        registry.register(
            "live_proofs",
            "Proofs of possession in the once-only memory",
            this.live_proofs.clone(),
        );
        registry.register(
            "auth_failures",
            "Refused authentications (relay connect, registry Authorization), by reason",
            this.auth_failures.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit, by limit",
            this.rate_limited.clone(),
        );
        registry.register(
            "limit_refusals",
            "Requests, connections or frames refused by a size or count limit, by limit",
            this.limit_refusals.clone(),
        );
        registry.register(
            "agents_expired",
            "Agents removed for not being seen within the agent expiry",
            this.agents_expired.clone(),
        );
        registry.register(
            "store_seconds",
            "Latency of storage operations, by operation",
            this.store_seconds.clone(),
        );
        Self { registry, ..this }
    }

    /// Counts a frame received of `kind`.
    pub(crate) fn frame_in(&self, kind: &'static str) {
        self.frames_in_cache.inc(&self.frames_in, kind);
    }

    /// Counts a frame sent of `kind`.
    pub(crate) fn frame_out(&self, kind: &'static str) {
        self.frames_out_cache.inc(&self.frames_out, kind);
    }

    /// Counts a frame stored after asking the cluster (`reason`:
    /// [`CLUSTER_FALLBACK_REASONS`]).
    pub(crate) fn cluster_fallback(&self, reason: &'static str) {
        self.cluster_fallbacks.get_or_create(&[("reason", reason)]).inc();
    }

    /// Frames stored after asking the cluster, all reasons.
    pub(crate) fn cluster_fallbacks_total(&self) -> u64 {
        CLUSTER_FALLBACK_REASONS
            .iter()
            .map(|reason| self.cluster_fallbacks.get_or_create(&[("reason", reason)]).get())
            .sum()
    }

    /// Counts a refused authentication.
    pub(crate) fn auth_failure(&self, reason: &'static str) {
        self.auth_failures.get_or_create(&[("reason", reason)]).inc();
    }

    /// Counts a refusal by size or count limit `limit`.
    pub(crate) fn limit_refused(&self, limit: &'static str) {
        self.limit_refusals.get_or_create(&[("limit", limit)]).inc();
    }

    /// The counter of rate limit `limit`.
    pub(crate) fn rate_limited_counter(&self, limit: &'static str) -> Counter {
        self.rate_limited.get_or_create(&[("limit", limit)]).clone()
    }

    /// The counter of size or count limit `limit`.
    pub(crate) fn limit_counter(&self, limit: &'static str) -> Counter {
        self.limit_refusals.get_or_create(&[("limit", limit)]).clone()
    }

    fn observe(&self, op: &'static str, started: Instant) {
        self.store_seconds
            .get_or_create(&[("op", op)])
            .observe(started.elapsed().as_secs_f64());
    }

    /// The exposition text.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Labels of `meshwire_cluster_fallbacks_total`: nobody subscribed to the
/// agent, no answer in time, the holder did not take it (stale or
/// closing), the holder stayed busy, a NATS error.
pub(crate) const CLUSTER_FALLBACK_REASONS: [&str; 5] = ["no_responders", "timeout", "refused", "busy", "error"];

/// Clamps a count into a gauge value.
pub(crate) fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A storage wrapper that times every operation into
/// `meshwire_store_seconds{op}`.
pub(crate) struct Timed<T: ?Sized> {
    inner: Arc<T>,
    metrics: Arc<Metrics>,
}

impl<T: ?Sized> Timed<T> {
    pub(crate) fn new(inner: Arc<T>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

macro_rules! timed {
    ($self:ident, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let result = $call.await;
        $self.metrics.observe($op, started);
        result
    }};
}

#[async_trait]
impl Mailboxes for Timed<dyn Mailboxes> {
    async fn append(&self, message: NewMessage, now: Timestamp) -> StorageResult<Appended> {
        timed!(self, "mail_append", self.inner.append(message, now))
    }

    async fn fetch(
        &self,
        recipient: &str,
        after: u64,
        max: usize,
        now: Timestamp,
    ) -> StorageResult<Vec<StoredMessage>> {
        timed!(self, "mail_fetch", self.inner.fetch(recipient, after, max, now))
    }

    async fn ack(&self, recipient: &str, id: &str) -> StorageResult<bool> {
        timed!(self, "mail_ack", self.inner.ack(recipient, id))
    }

    async fn depth(&self, recipient: &str) -> StorageResult<u64> {
        timed!(self, "mail_depth", self.inner.depth(recipient))
    }

    async fn sender_depth(&self, sender: &str) -> StorageResult<u64> {
        timed!(self, "mail_sender_depth", self.inner.sender_depth(sender))
    }

    async fn totals(&self) -> StorageResult<MailboxTotals> {
        timed!(self, "mail_totals", self.inner.totals())
    }

    async fn expire(&self, now: Timestamp, max: usize) -> StorageResult<u64> {
        timed!(self, "mail_expire", self.inner.expire(now, max))
    }
}

#[async_trait]
impl Registry for Timed<dyn Registry> {
    async fn create_agent(&self, record: AgentRecord, max_agents: u64) -> StorageResult<Created> {
        timed!(self, "agent_create", self.inner.create_agent(record, max_agents))
    }

    async fn get_agent(&self, did: &str) -> StorageResult<Option<AgentRecord>> {
        timed!(self, "agent_get", self.inner.get_agent(did))
    }

    async fn update_agent(&self, did: &str, change: AgentChange<'_>) -> StorageResult<Option<(AgentRecord, bool)>> {
        timed!(self, "agent_update", self.inner.update_agent(did, change))
    }

    async fn delete_agent(&self, did: &str) -> StorageResult<bool> {
        timed!(self, "agent_delete", self.inner.delete_agent(did))
    }

    async fn agent_count(&self) -> StorageResult<u64> {
        timed!(self, "agent_count", self.inner.agent_count())
    }

    async fn discover(&self, capability: &str, limit: usize) -> StorageResult<Vec<AgentRecord>> {
        timed!(self, "agent_discover", self.inner.discover(capability, limit))
    }

    async fn set_one_time_keys(&self, did: &str, keys: Vec<OneTimeKey>) -> StorageResult<bool> {
        timed!(self, "otk_set", self.inner.set_one_time_keys(did, keys))
    }

    async fn consume_one_time_key(&self, did: &str) -> StorageResult<Option<OneTimeKey>> {
        timed!(self, "otk_consume", self.inner.consume_one_time_key(did))
    }

    async fn one_time_key_count(&self, did: &str) -> StorageResult<u64> {
        timed!(self, "otk_count", self.inner.one_time_key_count(did))
    }

    async fn expire_agents(&self, not_seen_since: Timestamp, max: usize) -> StorageResult<Vec<String>> {
        timed!(self, "agent_expire", self.inner.expire_agents(not_seen_since, max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_labels() {
        let m = Metrics::new();
        m.frame_in("message");
        m.frame_in("message");
        m.auth_failure("proof");
        m.connections.set(3);
        let text = m.encode();
        assert!(text.contains("meshwire_frames_in_total{type=\"message\"} 2"), "{text}");
        assert!(
            text.contains("meshwire_auth_failures_total{reason=\"proof\"} 1"),
            "{text}"
        );
        assert!(text.contains("meshwire_connections 3"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
