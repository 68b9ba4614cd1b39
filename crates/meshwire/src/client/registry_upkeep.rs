//! Staying known to the registry: heartbeats, and registering again (with
//! the pre-keys) whenever the registry answers that it does not know us,
//! as after a registry restart that lost its data.

use super::inner::Inner;
use super::types::{ClientError, ClientEvent};
use super::util::{escape_log, saturating_period};
use std::sync::Arc;
use std::time::Duration;

/// Time between registry heartbeats.
pub const REGISTRY_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);

/// First wait before retrying a failed heartbeat or re-registration;
/// doubled per failure up to [`REGISTRY_HEARTBEAT_INTERVAL`].
pub const REGISTRY_RETRY_BASE: Duration = Duration::from_secs(1);

impl Inner {
    /// Registers this agent (proof of possession) with its capabilities and
    /// metadata.
    pub(crate) async fn register(&self) -> Result<(), ClientError> {
        let registered = self
            .registry
            .register(
                &self.identity(),
                &self.registration.capabilities,
                &self.registration.metadata,
            )
            .await?;
        if registered.as_str() != self.did {
            return Err(ClientError::Relay(format!(
                "registry assigned {registered}, expected {}",
                self.did
            )));
        }
        Ok(())
    }

    /// One heartbeat; when the registry does not know us (404, or 401 for
    /// a DID it cannot verify), registers again and republishes the
    /// pre-keys.
    async fn heartbeat_once(self: &Arc<Self>) -> Result<(), (String, ClientError)> {
        let identity = self.identity();
        match self.registry.heartbeat(&identity).await {
            Ok(_) => Ok(()),
            // Heartbeats come faster than the registry allows (a quick
            // reconnection): the next one is due in a minute anyway.
            Err(e) if e.status() == Some(429) => Ok(()),
            Err(e) if matches!(e.status(), Some(404 | 401)) => {
                let reason = e.to_string();
                tracing::info!(target: "meshwire", reason = %escape_log(&reason), "the registry lost this agent; registering again");
                self.register().await.map_err(|e| ("registering again".to_owned(), e))?;
                self.republish_prekeys()
                    .await
                    .map_err(|e| ("republishing pre-keys".to_owned(), e))?;
                self.stats
                    .reregistrations
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.emit(ClientEvent::Reregistered { reason });
                Ok(())
            }
            Err(e) => Err(("heartbeat".to_owned(), e.into())),
        }
    }
}

/// Heartbeats while a relay connection is up (the connection task aborts
/// it): at once (the registry may have restarted with the relay), then
/// every [`super::ClientConfig::registry_heartbeat`]; failures are reported as
/// [`ClientEvent::RegistryError`] and retried with backoff.
pub(crate) async fn registry_upkeep(inner: Arc<Inner>) {
    let mut retry = REGISTRY_RETRY_BASE;
    loop {
        let wait = match inner.heartbeat_once().await {
            Ok(()) => {
                retry = REGISTRY_RETRY_BASE;
                inner.config.registry_heartbeat
            }
            Err((operation, e)) => {
                tracing::debug!(target: "meshwire", operation, error = %escape_log(&e.to_string()), "registry upkeep failed");
                inner.emit(ClientEvent::RegistryError {
                    operation,
                    detail: e.to_string(),
                });
                let wait = retry;
                retry = (retry * 2).min(inner.config.registry_heartbeat.max(REGISTRY_RETRY_BASE));
                wait
            }
        };
        tokio::time::sleep(saturating_period(wait)).await;
    }
}
