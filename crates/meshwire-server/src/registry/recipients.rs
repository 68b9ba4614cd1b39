//! "Route only to registered DIDs" for the offline store
//! ([`ServerConfig::route_only_registered`](crate::ServerConfig::route_only_registered)):
//! a [`Mailboxes`] wrapper that refuses to queue mail for a recipient the
//! registry does not know, so nobody can fill the store with mail for DIDs
//! that do not exist (keys cost nothing; registrations are rate-limited).

use crate::metrics::Metrics;
use crate::storage::{Appended, MailboxTotals, Mailboxes, NewMessage, Quota, Registry, StorageResult, StoredMessage};
use crate::util::Esc;
use async_trait::async_trait;
use meshwire_proto::time::Timestamp;
use std::sync::Arc;

/// Mailboxes that accept mail only for registered recipients. A refused
/// message is [`Appended::Refused`] with [`Quota::Unregistered`], also counted as
/// `meshwire_limit_refusals_total{limit="unregistered_recipient"}`.
pub(crate) struct RegisteredOnly {
    inner: Arc<dyn Mailboxes>,
    registry: Arc<dyn Registry>,
    metrics: Arc<Metrics>,
}

impl RegisteredOnly {
    pub(crate) fn new(inner: Arc<dyn Mailboxes>, registry: Arc<dyn Registry>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            registry,
            metrics,
        }
    }
}

#[async_trait]
impl Mailboxes for RegisteredOnly {
    async fn append(&self, message: NewMessage, now: Timestamp) -> StorageResult<Appended> {
        if self.registry.get_agent(&message.recipient).await?.is_none() {
            self.metrics.limit_refused("unregistered_recipient");
            tracing::debug!(recipient = %Esc(&message.recipient), "not storing mail for an unregistered DID");
            return Ok(Appended::Refused(Quota::Unregistered));
        }
        self.inner.append(message, now).await
    }

    async fn fetch(
        &self,
        recipient: &str,
        after: u64,
        max: usize,
        now: Timestamp,
    ) -> StorageResult<Vec<StoredMessage>> {
        self.inner.fetch(recipient, after, max, now).await
    }

    async fn ack(&self, recipient: &str, id: &str) -> StorageResult<bool> {
        self.inner.ack(recipient, id).await
    }

    async fn depth(&self, recipient: &str) -> StorageResult<u64> {
        self.inner.depth(recipient).await
    }

    async fn sender_depth(&self, sender: &str) -> StorageResult<u64> {
        self.inner.sender_depth(sender).await
    }

    async fn totals(&self) -> StorageResult<MailboxTotals> {
        self.inner.totals().await
    }

    async fn expire(&self, now: Timestamp, max: usize) -> StorageResult<u64> {
        self.inner.expire(now, max).await
    }
}
