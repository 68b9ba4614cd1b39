//! The cluster backend: NATS JetStream (server 2.9 or newer; Debian's
//! `nats-server` package is 2.9.x).
//!
//! Layout (`NS` is [`NatsOptions::namespace`], default `MESHWIRE`; every
//! untrusted string in a subject or key is its hex SHA-256, see `token`):
//!
//! | what | where |
//! | --- | --- |
//! | mailboxes | stream `NS_MAIL`, subject `NS.mail.<recipient>`, file storage, `max_age` = [`MailboxLimits::max_ttl`](super::MailboxLimits::max_ttl), `max_msgs_per_subject` = per-recipient quota, `max_msgs`/`max_bytes` = totals, discard new (per subject) |
//! | per-sender quota | stream `NS_SENT`, one empty marker per queued message on `NS.sent.<sender>`, `max_msgs_per_subject` = per-sender quota, discard new (per subject) |
//! | per-recipient dedupe + ack index | KV `NS_MAILIDX`, key `<recipient>.<id>` → the message's and the marker's sequences, created with `create` (fails if present) |
//! | agents | KV `NS_AGENTS`, key `<did>` → JSON [`AgentRecord`]; updates are `update` with the expected revision |
//! | one-time keys | KV `NS_OTK`, key `<did>` → JSON list; consumption is compare-and-set (`update` with the revision read) |
//! | capability index | KV `NS_CAPS`, key `<capability>.<did>` → DID |
//! | proof memory | KV `NS_PROOFS`, key `<did>.<sha256(proof)>`, `create` (fails if the key exists), bucket `max_age` = [`StorageLimits::max_proof_lifetime`] |
//! | live routing | core NATS subjects `NS.live.<did>` and `NS.inst.<instance>` ([`LiveRouter`]) |
//!
//! **Acks.** A mailbox message is acknowledged by deleting it from the
//! stream (its sequence comes from the index), not through a JetStream
//! consumer: the relay's acks name `(recipient, id)`, arrive on any
//! instance, possibly hours and reconnections later, which a consumer's
//! ack-wait/redelivery model does not fit. Redelivery is the stream itself:
//! a message is fetched again on every connection until deleted.
//!
//! **Quotas** are stream limits with "discard new per subject" (server
//! 2.9+), so the server refuses atomically, across instances: an append
//! publishes the sender's marker (refused past the per-sender quota), then
//! the message (refused past the per-recipient quota or the totals; the
//! marker is then deleted), then creates the index entry (a duplicate that
//! lost the race deletes both). An ack deletes all three. Bytes are counted
//! as JetStream counts them (with subject and envelope). The limits are
//! set when the streams are created; changing them later needs a stream
//! update (not done here).
//!
//! **Proof memory.** NATS 2.9 has no per-key TTL, so entries live for the
//! bucket's maximum age; a claim whose `expires_at` lies further ahead than
//! that is refused (fail closed) rather than forgotten early. The total is
//! bounded by the bucket's byte limit (about
//! [`PROOF_ENTRY_BYTES`] per proof); the per-DID limit is not enforced.
//!
//! **Agent count and expiry.** A deleted agent's subject is purged, so the
//! bucket's message count is the agent count. [`Registry::expire_agents`]
//! lists the bucket's keys: O(agents), meant for a periodic sweep.

use super::{
    apply_change, clamp_expiry, token, AgentChange, AgentRecord, Appended, Created, MailboxTotals, Mailboxes,
    NewMessage, OneTimeKey, Quota, ReadyCheck, Registry, StorageError, StorageLimits, StorageResult, StoredMessage,
    MAX_FETCH_BATCH,
};
use crate::replay::{ClaimError, ProofLedger};
use async_nats::jetstream::{self, consumer, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use meshwire_proto::time::Timestamp;
use std::fmt;
use std::future::Future;
use std::time::Duration;

/// Default [`NatsOptions::namespace`].
pub const DEFAULT_NAMESPACE: &str = "MESHWIRE";
/// Default [`NatsOptions::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes budgeted per proof entry when sizing the proof bucket.
pub const PROOF_ENTRY_BYTES: i64 = 256;
/// Most compare-and-set attempts before [`StorageError::Contention`].
pub const MAX_CAS_ATTEMPTS: usize = 1_000;
/// Longest wait for one discovery walk.
const DISCOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsOptions {
    /// Server URL(s), comma-separated (`nats://127.0.0.1:4222`).
    pub url: String,
    /// Prefix of every stream, bucket and subject (letters, digits, `_`,
    /// `-`); instances that share data use the same namespace.
    pub namespace: String,
    /// Replicas of each stream and bucket (1 on a single server).
    pub replicas: usize,
    /// Timeout of each JetStream request.
    pub request_timeout: Duration,
}

impl NatsOptions {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            replicas: 1,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

fn unavailable(what: &str) -> impl Fn(&dyn fmt::Display) -> StorageError + '_ {
    move |e| StorageError::Unavailable(format!("nats: {what}: {e}"))
}

fn nats_err<E: fmt::Display>(what: &'static str) -> impl Fn(E) -> StorageError {
    move |e| StorageError::Unavailable(format!("nats: {what}: {e}"))
}

/// The NATS JetStream backend (see [`Storage::nats`](super::Storage::nats)).
pub struct NatsStorage {
    client: async_nats::Client,
    js: jetstream::Context,
    namespace: String,
    limits: StorageLimits,
    mail: stream::Stream,
    sent: stream::Stream,
    mail_index: kv::Store,
    agents: kv::Store,
    agents_stream: String,
    otks: kv::Store,
    caps: kv::Store,
    caps_stream: String,
    proofs: kv::Store,
    runtime: tokio::runtime::Handle,
}

impl fmt::Debug for NatsStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsStorage")
            .field("namespace", &self.namespace)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn as_limit(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl NatsStorage {
    /// Connects and creates the streams and buckets if missing.
    pub async fn connect(options: NatsOptions, limits: StorageLimits) -> StorageResult<Self> {
        let ns = options.namespace.clone();
        if ns.is_empty() || !ns.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(StorageError::Invalid(format!(
                "namespace must be letters, digits, '_' or '-' (got {} bytes)",
                ns.len()
            )));
        }
        let client = async_nats::ConnectOptions::new()
            .request_timeout(Some(options.request_timeout))
            .connect(options.url.as_str())
            .await
            .map_err(nats_err("connect"))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(options.request_timeout);
        // Quotas are stream limits the server enforces atomically: one
        // subject per recipient (at most `per_recipient` messages), one
        // marker subject per sender (at most `per_sender` markers), totals.
        let mail = js
            .get_or_create_stream(stream::Config {
                name: format!("{ns}_MAIL"),
                subjects: vec![format!("{ns}.mail.*")],
                max_age: limits.mailbox.max_ttl,
                max_messages: as_limit(limits.mailbox.total),
                max_bytes: as_limit(limits.mailbox.total_bytes),
                max_messages_per_subject: as_limit(limits.mailbox.per_recipient),
                discard: stream::DiscardPolicy::New,
                discard_new_per_subject: true,
                storage: stream::StorageType::File,
                num_replicas: options.replicas,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(nats_err("creating the mail stream"))?;
        let sent = js
            .get_or_create_stream(stream::Config {
                name: format!("{ns}_SENT"),
                subjects: vec![format!("{ns}.sent.*")],
                max_age: limits.mailbox.max_ttl,
                max_messages: as_limit(limits.mailbox.total),
                max_messages_per_subject: as_limit(limits.mailbox.per_sender),
                discard: stream::DiscardPolicy::New,
                discard_new_per_subject: true,
                storage: stream::StorageType::File,
                num_replicas: options.replicas,
                ..Default::default()
            })
            .await
            .map_err(nats_err("creating the sender stream"))?;
        // KV buckets are created as their backing streams: async-nats's
        // `create_key_value` first reads the account info, whose 2.9 shape
        // it cannot parse. The configuration is the KV one (history 1).
        let kv_open = |name: &'static str, max_age: Duration, max_bytes: i64| {
            let js = js.clone();
            let bucket = format!("{ns}_{name}");
            let replicas = options.replicas;
            async move {
                js.get_or_create_stream(stream::Config {
                    name: format!("KV_{bucket}"),
                    subjects: vec![format!("$KV.{bucket}.>")],
                    max_messages_per_subject: 1,
                    max_age,
                    max_bytes,
                    discard: stream::DiscardPolicy::New,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(nats_err("creating a bucket"))?;
                js.get_key_value(bucket).await.map_err(nats_err("opening a bucket"))
            }
        };
        let mail_index = kv_open("MAILIDX", limits.mailbox.max_ttl, -1).await?;
        let agents = kv_open("AGENTS", Duration::ZERO, -1).await?;
        let otks = kv_open("OTK", Duration::ZERO, -1).await?;
        let caps = kv_open("CAPS", Duration::ZERO, -1).await?;
        let proof_bytes = i64::try_from(limits.max_live_proofs)
            .unwrap_or(i64::MAX / PROOF_ENTRY_BYTES)
            .saturating_mul(PROOF_ENTRY_BYTES);
        let proofs = kv_open("PROOFS", limits.max_proof_lifetime, proof_bytes).await?;
        Ok(Self {
            client,
            js,
            agents_stream: format!("KV_{ns}_AGENTS"),
            caps_stream: format!("KV_{ns}_CAPS"),
            namespace: ns,
            limits,
            mail,
            sent,
            mail_index,
            agents,
            otks,
            caps,
            proofs,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// The live-routing primitive on this connection.
    pub fn router(&self) -> LiveRouter {
        LiveRouter {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
        }
    }

    fn mail_subject(&self, recipient: &str) -> String {
        format!("{}.mail.{}", self.namespace, token(recipient))
    }

    fn sent_subject(&self, sender: &str) -> String {
        format!("{}.sent.{}", self.namespace, token(sender))
    }

    async fn subject_count(stream: &stream::Stream, filter: String) -> StorageResult<u64> {
        let mut info = stream
            .info_with_subjects(filter)
            .await
            .map_err(nats_err("stream info"))?;
        let mut total = 0u64;
        while let Some(entry) = info.next().await {
            let (_, count) = entry.map_err(nats_err("stream info"))?;
            total = total.saturating_add(count as u64);
        }
        Ok(total)
    }

    fn index_key(recipient: &str, id: &str) -> String {
        format!("{}.{}", token(recipient), token(id))
    }

    /// Deletes message `seq` of the mail stream (absent is fine).
    async fn delete_seq(stream: &stream::Stream, seq: u64) -> StorageResult<()> {
        match stream.delete_message(seq).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("no message found") => Ok(()),
            Err(e) => Err(unavailable("deleting a message")(&e)),
        }
    }

    /// Deletes the message indexed under `(recipient, id)`, its sender
    /// marker and the index entry; `false` if not indexed. `only` limits it
    /// to the message at that sequence.
    async fn remove_indexed(&self, recipient: &str, id: &str, only: Option<u64>) -> StorageResult<bool> {
        let key = Self::index_key(recipient, id);
        let Some(entry) = self
            .mail_index
            .entry(&key)
            .await
            .map_err(nats_err("reading the index"))?
        else {
            return Ok(false);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(false);
        }
        let (seq, marker) = decode_index(&entry.value)?;
        if only.is_some_and(|only| only != seq) {
            return Ok(false);
        }
        let (deleted, unmarked, purged) = tokio::join!(
            Self::delete_seq(&self.mail, seq),
            Self::delete_seq(&self.sent, marker),
            self.mail_index.purge(key)
        );
        deleted?;
        unmarked?;
        purged.map_err(nats_err("deleting an index entry"))?;
        Ok(true)
    }

    async fn backoff(attempt: usize) {
        // Jittered, growing backoff so compare-and-set losers spread out.
        let jitter = u64::from(rand_core::RngCore::next_u32(&mut rand_core::OsRng) % 1000);
        let base = (attempt.min(20) as u64) * 100;
        tokio::time::sleep(Duration::from_micros(base + jitter)).await;
    }

    async fn agent_entry(&self, did: &str) -> StorageResult<Option<(AgentRecord, u64)>> {
        let entry = self
            .agents
            .entry(token(did))
            .await
            .map_err(nats_err("reading an agent"))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => Ok(Some((AgentRecord::decode(&e.value)?, e.revision))),
            _ => Ok(None),
        }
    }

    /// Runs an async NATS call from the synchronous proof-ledger trait.
    fn block_on<F: Future>(&self, future: F) -> Result<F::Output, ClaimError> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
                Ok(tokio::task::block_in_place(|| handle.block_on(future)))
            }
            Ok(_) => Err(ClaimError::Unavailable(
                "the NATS proof ledger needs a multi-thread tokio runtime".to_owned(),
            )),
            Err(_) => Ok(self.runtime.block_on(future)),
        }
    }

    async fn claim_async(
        &self,
        did: &str,
        proof: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), ClaimError> {
        let lifetime = u64::try_from(self.limits.max_proof_lifetime.as_millis()).unwrap_or(u64::MAX);
        if expires_at.0.saturating_sub(now.0) > lifetime {
            return Err(ClaimError::Unavailable(format!(
                "proof lifetime beyond the ledger's maximum of {lifetime} ms"
            )));
        }
        let key = format!("{}.{}", token(did), hex::encode(sha2::Sha256::digest_bytes(proof)));
        let value = Bytes::from(expires_at.0.to_be_bytes().to_vec());
        let full = |e: &dyn fmt::Display| {
            let text = e.to_string();
            if text.contains("maximum bytes") || text.contains("resource limits") {
                ClaimError::Full {
                    limit: self.limits.max_live_proofs,
                }
            } else {
                ClaimError::Unavailable(format!("nats: {text}"))
            }
        };
        match self.proofs.create(&key, value.clone()).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                // Present: a replay while live; an entry the bucket has not
                // aged out yet but whose expiry passed may be claimed again.
                let entry = self
                    .proofs
                    .entry(&key)
                    .await
                    .map_err(|e| ClaimError::Unavailable(format!("nats: {e}")))?;
                let Some(entry) = entry else {
                    return Err(ClaimError::Replayed);
                };
                let stored = <[u8; 8]>::try_from(entry.value.as_ref())
                    .map(u64::from_be_bytes)
                    .unwrap_or(u64::MAX);
                if stored >= now.0 {
                    return Err(ClaimError::Replayed);
                }
                match self.proofs.update(&key, value, entry.revision).await {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(ClaimError::Replayed),
                    Err(e) => Err(full(&e)),
                }
            }
            Err(e) => Err(full(&e)),
        }
    }
}

/// What a publish to a limited stream did.
enum Published {
    Stored(u64),
    /// `Recipient` stands for "the subject's limit" (per recipient on the
    /// mail stream, per sender on the marker stream).
    Refused(Quota),
}

async fn publish(js: &jetstream::Context, subject: String, payload: Bytes) -> StorageResult<Published> {
    let ack = match js.publish(subject, payload).await {
        Ok(future) => future.await,
        Err(e) => return Err(unavailable("publishing")(&e)),
    };
    match ack {
        Ok(ack) => Ok(Published::Stored(ack.sequence)),
        Err(e) => {
            let text = e.to_string();
            if text.contains("maximum messages per subject") {
                Ok(Published::Refused(Quota::Recipient))
            } else if text.contains("maximum messages") {
                Ok(Published::Refused(Quota::Total))
            } else if text.contains("maximum bytes") {
                Ok(Published::Refused(Quota::Bytes))
            } else {
                Err(StorageError::Unavailable(format!("nats: publishing: {text}")))
            }
        }
    }
}

/// An index entry: the message's and the sender marker's sequences.
fn decode_index(value: &[u8]) -> StorageResult<(u64, u64)> {
    let corrupt = || StorageError::Corrupt("malformed mailbox index entry".to_owned());
    let seq = value
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .ok_or_else(corrupt)?;
    let marker = value
        .get(8..16)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .ok_or_else(corrupt)?;
    Ok((u64::from_be_bytes(seq), u64::from_be_bytes(marker)))
}

/// Fixed-layout envelope of a mailbox message: three length-prefixed
/// strings (id, sender, recipient), the expiry, then the frame. Untrusted
/// strings never go into NATS headers.
fn encode_envelope(message: &NewMessage, expires_at: Timestamp) -> Bytes {
    let mut out = Vec::with_capacity(message.size() as usize + 14);
    for field in [&message.id, &message.sender, &message.recipient] {
        // Lengths are at most MAX_KEY_BYTES (checked), so they fit u16.
        out.extend_from_slice(&u16::try_from(field.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out.extend_from_slice(&expires_at.0.to_be_bytes());
    out.extend_from_slice(message.frame.as_bytes());
    Bytes::from(out)
}

struct Envelope {
    id: String,
    sender: String,
    recipient: String,
    expires_at: u64,
    frame: String,
}

fn decode_envelope(bytes: &[u8]) -> StorageResult<Envelope> {
    let corrupt = || StorageError::Corrupt("malformed mailbox envelope".to_owned());
    let mut rest = bytes;
    let mut take = |n: usize| -> StorageResult<&[u8]> {
        if rest.len() < n {
            return Err(corrupt());
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let mut strings = Vec::with_capacity(3);
    for _ in 0..3 {
        let len = take(2)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let text = std::str::from_utf8(take(len)?).map_err(|_| corrupt())?;
        strings.push(text.to_owned());
    }
    let expires = take(8)?;
    let expires_at = u64::from_be_bytes(<[u8; 8]>::try_from(expires).map_err(|_| corrupt())?);
    let frame = std::str::from_utf8(rest).map_err(|_| corrupt())?.to_owned();
    let mut strings = strings.into_iter();
    match (strings.next(), strings.next(), strings.next()) {
        (Some(id), Some(sender), Some(recipient)) => Ok(Envelope {
            id,
            sender,
            recipient,
            expires_at,
            frame,
        }),
        _ => Err(corrupt()),
    }
}

trait DigestBytes {
    fn digest_bytes(data: &[u8]) -> Vec<u8>;
}

impl DigestBytes for sha2::Sha256 {
    fn digest_bytes(data: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        sha2::Sha256::digest(data).to_vec()
    }
}

#[async_trait]
impl Mailboxes for NatsStorage {
    async fn append(&self, message: NewMessage, now: Timestamp) -> StorageResult<Appended> {
        message.check()?;
        let key = Self::index_key(&message.recipient, &message.id);
        if let Some(entry) = self
            .mail_index
            .entry(&key)
            .await
            .map_err(nats_err("reading the index"))?
        {
            if entry.operation == kv::Operation::Put {
                return Ok(Appended::Duplicate);
            }
        }
        // 1. The sender's marker: refused by the server past `per_sender`.
        let marker = match publish(&self.js, self.sent_subject(&message.sender), Bytes::new()).await? {
            Published::Stored(seq) => seq,
            Published::Refused(Quota::Recipient) => return Ok(Appended::Refused(Quota::Sender)),
            Published::Refused(quota) => return Ok(Appended::Refused(quota)),
        };
        // 2. The message: refused past `per_recipient` and the totals.
        let expires_at = clamp_expiry(message.expires_at, now, self.limits.mailbox.max_ttl);
        let envelope = encode_envelope(&message, expires_at);
        let seq = match publish(&self.js, self.mail_subject(&message.recipient), envelope).await {
            Ok(Published::Stored(seq)) => seq,
            Ok(Published::Refused(quota)) => {
                Self::delete_seq(&self.sent, marker).await?;
                return Ok(Appended::Refused(quota));
            }
            Err(e) => {
                let _ = Self::delete_seq(&self.sent, marker).await;
                return Err(e);
            }
        };
        // 3. The index entry decides: a concurrent append of the same id
        // that lost the create removes its copy.
        let value = Bytes::from([seq.to_be_bytes(), marker.to_be_bytes()].concat());
        match self.mail_index.create(&key, value).await {
            Ok(_) => Ok(Appended::Stored { seq }),
            Err(e) => {
                let _ = tokio::join!(Self::delete_seq(&self.mail, seq), Self::delete_seq(&self.sent, marker));
                if e.kind() == kv::CreateErrorKind::AlreadyExists {
                    Ok(Appended::Duplicate)
                } else {
                    Err(unavailable("indexing a message")(&e))
                }
            }
        }
    }

    async fn fetch(
        &self,
        recipient: &str,
        after: u64,
        max: usize,
        now: Timestamp,
    ) -> StorageResult<Vec<StoredMessage>> {
        let max = max.min(MAX_FETCH_BATCH);
        let filter = self.mail_subject(recipient);
        let mut out = Vec::with_capacity(max);
        let mut next = after.saturating_add(1);
        while out.len() < max {
            let message = self
                .mail
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(filter.clone())
                .send()
                .await;
            let message = match message {
                Ok(message) => message,
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(unavailable("fetching")(&e)),
            };
            next = message.sequence.saturating_add(1);
            let envelope = decode_envelope(&message.payload)?;
            if envelope.recipient != recipient {
                continue;
            }
            if envelope.expires_at <= now.0 {
                if !self
                    .remove_indexed(recipient, &envelope.id, Some(message.sequence))
                    .await?
                {
                    Self::delete_seq(&self.mail, message.sequence).await?;
                }
                continue;
            }
            out.push(StoredMessage {
                seq: message.sequence,
                id: envelope.id,
                sender: envelope.sender,
                frame: envelope.frame.into(),
                expires_at: Timestamp(envelope.expires_at),
            });
        }
        Ok(out)
    }

    async fn ack(&self, recipient: &str, id: &str) -> StorageResult<bool> {
        self.remove_indexed(recipient, id, None).await
    }

    async fn depth(&self, recipient: &str) -> StorageResult<u64> {
        Self::subject_count(&self.mail, self.mail_subject(recipient)).await
    }

    async fn sender_depth(&self, sender: &str) -> StorageResult<u64> {
        Self::subject_count(&self.sent, self.sent_subject(sender)).await
    }

    async fn totals(&self) -> StorageResult<MailboxTotals> {
        let info = self.mail.get_info().await.map_err(nats_err("stream info"))?;
        Ok(MailboxTotals {
            messages: info.state.messages,
            bytes: info.state.bytes,
        })
    }

    /// Expired messages are dropped by the stream's maximum age and skipped
    /// (and deleted) by fetches; nothing to sweep here.
    async fn expire(&self, _now: Timestamp, _max: usize) -> StorageResult<u64> {
        Ok(0)
    }
}

#[async_trait]
impl Registry for NatsStorage {
    async fn create_agent(&self, record: AgentRecord, max_agents: u64) -> StorageResult<Created> {
        if self.agent_count().await? >= max_agents {
            if self.agent_entry(&record.did).await?.is_some() {
                return Ok(Created::Exists);
            }
            return Ok(Created::Full);
        }
        let encoded = Bytes::from(record.encode()?);
        match self.agents.create(token(&record.did), encoded).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return Ok(Created::Exists),
            Err(e) => return Err(unavailable("creating an agent")(&e)),
        }
        let did_token = token(&record.did);
        for capability in &record.capabilities {
            self.caps
                .put(
                    format!("{}.{did_token}", token(capability)),
                    Bytes::from(record.did.clone()),
                )
                .await
                .map_err(nats_err("indexing a capability"))?;
        }
        Ok(Created::Created)
    }

    async fn get_agent(&self, did: &str) -> StorageResult<Option<AgentRecord>> {
        Ok(self.agent_entry(did).await?.map(|(r, _)| r))
    }

    async fn update_agent(&self, did: &str, change: AgentChange<'_>) -> StorageResult<Option<(AgentRecord, bool)>> {
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let Some((record, revision)) = self.agent_entry(did).await? else {
                return Ok(None);
            };
            let (next, write) = apply_change(&record, change);
            if !write {
                return Ok(Some((record, false)));
            }
            match self
                .agents
                .update(token(did), Bytes::from(next.encode()?), revision)
                .await
            {
                Ok(_) => return Ok(Some((next, true))),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Self::backoff(attempt).await,
                Err(e) => return Err(unavailable("updating an agent")(&e)),
            }
        }
        Err(StorageError::Contention(format!("agent record {}", token(did))))
    }

    async fn delete_agent(&self, did: &str) -> StorageResult<bool> {
        let Some((record, _)) = self.agent_entry(did).await? else {
            return Ok(false);
        };
        let did_token = token(did);
        for capability in &record.capabilities {
            let subject = format!("$KV.{}_CAPS.{}.{did_token}", self.namespace, token(capability));
            purge_subject(&self.js, &self.caps_stream, subject).await?;
        }
        purge_subject(
            &self.js,
            &format!("KV_{}_OTK", self.namespace),
            format!("$KV.{}_OTK.{did_token}", self.namespace),
        )
        .await?;
        // Purged, not deleted: no marker stays, so the message count of the
        // bucket is the agent count.
        purge_subject(
            &self.js,
            &self.agents_stream,
            format!("$KV.{}_AGENTS.{did_token}", self.namespace),
        )
        .await?;
        Ok(true)
    }

    async fn agent_count(&self) -> StorageResult<u64> {
        let info = self
            .js
            .get_stream(&self.agents_stream)
            .await
            .map_err(nats_err("agents stream"))?
            .get_info()
            .await
            .map_err(nats_err("agents stream info"))?;
        Ok(info.state.messages)
    }

    async fn discover(&self, capability: &str, limit: usize) -> StorageResult<Vec<AgentRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stream = self
            .js
            .get_stream_no_info(&self.caps_stream)
            .await
            .map_err(nats_err("capability index"))?;
        let filter = format!("$KV.{}_CAPS.{}.*", self.namespace, token(capability));
        let mut consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(nats_err("capability index consumer"))?;
        let pending = consumer
            .info()
            .await
            .map(|i| i.num_pending)
            .map_err(nats_err("capability index consumer"))?;
        if pending == 0 {
            return Ok(Vec::new());
        }
        let mut messages = consumer.messages().await.map_err(nats_err("capability index"))?;
        let mut dids = Vec::new();
        let walk = async {
            while let Some(message) = messages.next().await {
                let message = message.map_err(nats_err("capability index"))?;
                let left = message.info().map(|i| i.pending).unwrap_or(0);
                let deleted = message.headers.as_ref().and_then(|h| h.get("KV-Operation")).is_some();
                if !deleted {
                    if let Ok(did) = std::str::from_utf8(&message.payload) {
                        dids.push(did.to_owned());
                    }
                }
                if left == 0 || dids.len() >= limit {
                    break;
                }
            }
            Ok::<(), StorageError>(())
        };
        tokio::time::timeout(DISCOVER_TIMEOUT, walk)
            .await
            .map_err(|_| StorageError::Unavailable("nats: capability index walk timed out".to_owned()))??;
        let mut out = Vec::with_capacity(dids.len());
        for did in dids {
            if let Some((record, _)) = self.agent_entry(&did).await? {
                out.push(record);
            }
        }
        Ok(out)
    }

    async fn set_one_time_keys(&self, did: &str, keys: Vec<OneTimeKey>) -> StorageResult<bool> {
        if self.agent_entry(did).await?.is_none() {
            return Ok(false);
        }
        let encoded =
            serde_json::to_vec(&keys).map_err(|e| StorageError::Corrupt(format!("encoding one-time keys: {e}")))?;
        self.otks
            .put(token(did), Bytes::from(encoded))
            .await
            .map_err(nats_err("storing one-time keys"))?;
        Ok(true)
    }

    async fn consume_one_time_key(&self, did: &str) -> StorageResult<Option<OneTimeKey>> {
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let Some(entry) = self
                .otks
                .entry(token(did))
                .await
                .map_err(nats_err("reading one-time keys"))?
            else {
                return Ok(None);
            };
            if entry.operation != kv::Operation::Put {
                return Ok(None);
            }
            let mut keys: Vec<OneTimeKey> = serde_json::from_slice(&entry.value)
                .map_err(|e| StorageError::Corrupt(format!("decoding one-time keys: {e}")))?;
            if keys.is_empty() {
                return Ok(None);
            }
            let key = keys.remove(0);
            let encoded =
                serde_json::to_vec(&keys).map_err(|e| StorageError::Corrupt(format!("encoding one-time keys: {e}")))?;
            match self.otks.update(token(did), Bytes::from(encoded), entry.revision).await {
                Ok(_) => return Ok(Some(key)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Self::backoff(attempt).await,
                Err(e) => return Err(unavailable("consuming a one-time key")(&e)),
            }
        }
        Err(StorageError::Contention(format!("one-time keys of {}", token(did))))
    }

    async fn one_time_key_count(&self, did: &str) -> StorageResult<u64> {
        let Some(entry) = self
            .otks
            .entry(token(did))
            .await
            .map_err(nats_err("reading one-time keys"))?
        else {
            return Ok(0);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(0);
        }
        let keys: Vec<OneTimeKey> = serde_json::from_slice(&entry.value)
            .map_err(|e| StorageError::Corrupt(format!("decoding one-time keys: {e}")))?;
        Ok(keys.len() as u64)
    }

    async fn expire_agents(&self, not_seen_since: Timestamp, max: usize) -> StorageResult<Vec<String>> {
        let mut keys = self.agents.keys().await.map_err(nats_err("listing agents"))?;
        let mut stale = Vec::new();
        while let Some(key) = keys.next().await {
            if stale.len() >= max {
                break;
            }
            let key = key.map_err(nats_err("listing agents"))?;
            let Some(entry) = self.agents.entry(key).await.map_err(nats_err("reading an agent"))? else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            let record = AgentRecord::decode(&entry.value)?;
            if record.last_seen < not_seen_since.0 {
                stale.push(record.did);
            }
        }
        let mut removed = Vec::with_capacity(stale.len());
        for did in stale {
            if self.delete_agent(&did).await? {
                removed.push(did);
            }
        }
        Ok(removed)
    }
}

async fn purge_subject(js: &jetstream::Context, stream: &str, subject: String) -> StorageResult<()> {
    let stream = js.get_stream_no_info(stream).await.map_err(nats_err("purging"))?;
    stream.purge().filter(subject).await.map_err(nats_err("purging"))?;
    Ok(())
}

impl ProofLedger for NatsStorage {
    /// Blocks the calling worker (`block_in_place`) for one or two round
    /// trips to the server; needs a multi-thread runtime.
    fn claim(&self, did: &str, proof: &[u8], expires_at: Timestamp, now: Timestamp) -> Result<(), ClaimError> {
        self.block_on(self.claim_async(did, proof, expires_at, now))?
    }

    fn live(&self) -> usize {
        let name = format!("KV_{}_PROOFS", self.namespace);
        let js = self.js.clone();
        let messages = self.block_on(async move {
            let stream = js.get_stream_no_info(name).await.ok()?;
            stream.get_info().await.ok().map(|info| info.state.messages)
        });
        messages
            .ok()
            .flatten()
            .map_or(0, |v| usize::try_from(v).unwrap_or(usize::MAX))
    }
}

#[async_trait]
impl ReadyCheck for NatsStorage {
    async fn ready(&self) -> StorageResult<()> {
        // A disconnected client still hands out stream handles: ask the
        // connection first, then the server (a stream info round trip).
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(StorageError::Unavailable("not connected to NATS".to_owned()));
        }
        self.js
            .get_stream(format!("{}_MAIL", self.namespace))
            .await
            .map(|_| ())
            .map_err(nats_err("readiness"))
    }

    async fn flush(&self) -> StorageResult<()> {
        self.client
            .flush()
            .await
            .map_err(|e| StorageError::Unavailable(format!("flushing the NATS connection: {e}")))
    }
}

/// Core NATS subjects for reaching an agent connected to another instance:
/// `NS.live.<sha256(did)>` (the instance holding the agent's connection
/// subscribes; the relay sends frames and takeovers there, see
/// `relay::cluster`) and `NS.inst.<sha256(instance)>` (control messages to
/// one instance). Delivery is at most once: the relay stores a frame in
/// the mailbox when no instance takes it (no responders, timeout,
/// refusal) or the request fails.
#[derive(Clone)]
pub struct LiveRouter {
    client: async_nats::Client,
    namespace: String,
}

impl fmt::Debug for LiveRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveRouter")
            .field("namespace", &self.namespace)
            .finish()
    }
}

/// Why [`LiveRouter::request_did_within`] got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveRequestError {
    /// No instance is subscribed to the agent's subject.
    #[error("nats: live request: no responders")]
    NoResponders,
    /// Nobody answered within the timeout.
    #[error("nats: live request: timed out")]
    TimedOut,
    /// The request could not be sent or its answer read.
    #[error("nats: live request: {0}")]
    Failed(String),
}

/// Messages on a [`LiveRouter`] subject.
pub struct LiveSubscription {
    subscriber: async_nats::Subscriber,
}

impl fmt::Debug for LiveSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveSubscription").finish_non_exhaustive()
    }
}

/// One message received on a [`LiveSubscription`].
#[derive(Debug, Clone)]
pub struct LiveMessage {
    /// What was published.
    pub payload: Bytes,
    reply: Option<async_nats::Subject>,
}

impl LiveSubscription {
    /// The next message; `None` once unsubscribed or disconnected for good.
    pub async fn next(&mut self) -> Option<LiveMessage> {
        self.subscriber.next().await.map(|m| LiveMessage {
            payload: m.payload,
            reply: m.reply,
        })
    }

    /// Stops the subscription.
    pub async fn unsubscribe(mut self) -> StorageResult<()> {
        self.subscriber.unsubscribe().await.map_err(nats_err("unsubscribing"))
    }

    /// Stops the subscription but keeps what was already received:
    /// [`LiveSubscription::next`] yields those messages, then `None`.
    pub async fn close(&mut self) -> StorageResult<()> {
        self.subscriber.unsubscribe().await.map_err(nats_err("unsubscribing"))
    }
}

impl LiveMessage {
    /// Whether the sender waits for an answer ([`LiveRouter::reply`]).
    pub fn wants_reply(&self) -> bool {
        self.reply.is_some()
    }
}

impl LiveRouter {
    /// The subject of `did`'s live connection.
    pub fn did_subject(&self, did: &str) -> String {
        format!("{}.live.{}", self.namespace, token(did))
    }

    /// The control subject of instance `instance`.
    pub fn instance_subject(&self, instance: &str) -> String {
        format!("{}.inst.{}", self.namespace, token(instance))
    }

    /// Publishes `payload` to whichever instance holds `did` (nobody gets
    /// it if none does; use [`LiveRouter::request_did`] to know).
    pub async fn publish_to_did(&self, did: &str, payload: Bytes) -> StorageResult<()> {
        self.client
            .publish(self.did_subject(did), payload)
            .await
            .map_err(nats_err("publishing"))
    }

    /// Sends `payload` to the instance holding `did` and waits for its
    /// answer; [`StorageError::Unavailable`] (no responders, timeout) when
    /// no instance holds it, so the caller can store the frame instead.
    pub async fn request_did(&self, did: &str, payload: Bytes) -> StorageResult<Bytes> {
        self.client
            .request(self.did_subject(did), payload)
            .await
            .map(|m| m.payload)
            .map_err(nats_err("live request"))
    }

    /// Like [`LiveRouter::request_did`], waiting at most `timeout` and
    /// telling "nobody holds `did`" ([`LiveRequestError::NoResponders`],
    /// answered at once by the server) from a timeout.
    pub async fn request_did_within(
        &self,
        did: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, LiveRequestError> {
        let request = async_nats::Request::new().payload(payload).timeout(Some(timeout));
        match self.client.send_request(self.did_subject(did), request).await {
            Ok(message) => Ok(message.payload),
            Err(e) => Err(match e.kind() {
                async_nats::RequestErrorKind::NoResponders => LiveRequestError::NoResponders,
                async_nats::RequestErrorKind::TimedOut => LiveRequestError::TimedOut,
                async_nats::RequestErrorKind::Other => LiveRequestError::Failed(e.to_string()),
            }),
        }
    }

    /// Answers a message sent with [`LiveRouter::request_did`]; `false` if
    /// it was published without a reply subject.
    pub async fn reply(&self, message: &LiveMessage, payload: Bytes) -> StorageResult<bool> {
        let Some(reply) = message.reply.clone() else {
            return Ok(false);
        };
        self.client
            .publish(reply, payload)
            .await
            .map_err(nats_err("replying"))?;
        Ok(true)
    }

    /// Subscribes to `did`'s subject (while the agent is connected here).
    pub async fn subscribe_did(&self, did: &str) -> StorageResult<LiveSubscription> {
        self.client
            .subscribe(self.did_subject(did))
            .await
            .map(|subscriber| LiveSubscription { subscriber })
            .map_err(nats_err("subscribing"))
    }

    /// Publishes to one instance's control subject.
    pub async fn publish_to_instance(&self, instance: &str, payload: Bytes) -> StorageResult<()> {
        self.client
            .publish(self.instance_subject(instance), payload)
            .await
            .map_err(nats_err("publishing"))
    }

    /// Subscribes to this instance's control subject.
    pub async fn subscribe_instance(&self, instance: &str) -> StorageResult<LiveSubscription> {
        self.client
            .subscribe(self.instance_subject(instance))
            .await
            .map(|subscriber| LiveSubscription { subscriber })
            .map_err(nats_err("subscribing"))
    }

    /// Sends everything published so far to the server (writes it to the
    /// socket: the server may not have processed it yet; see
    /// [`LiveRouter::sync`]).
    pub async fn flush(&self) -> StorageResult<()> {
        self.client.flush().await.map_err(nats_err("flushing"))
    }

    /// Returns once the server has processed everything this connection
    /// sent before: a subscription made before is then in place for
    /// publishers on every other connection. [`LiveRouter::flush`] is not
    /// enough: it only writes to the socket, and a frame published through
    /// another instance right after found nobody subscribed (seen in
    /// tests under load). The round trip is a request to a subject nobody
    /// answers, refused by the server in order after what came before.
    pub async fn sync(&self) -> StorageResult<()> {
        let subject = format!("{}.sync.{}", self.namespace, self.client.new_inbox().replace('.', "_"));
        let request = async_nats::Request::new().timeout(Some(SYNC_TIMEOUT));
        match self.client.send_request(subject, request).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Err(e) => Err(StorageError::Unavailable(format!("nats: syncing with the server: {e}"))),
        }
    }
}

/// How long [`LiveRouter::sync`] waits for the server's answer.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
