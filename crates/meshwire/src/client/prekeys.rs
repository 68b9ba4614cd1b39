//! Pre-key upkeep: signed pre-key rotation and one-time key refills. Each
//! new key is committed to the store before it is published: a key the
//! registry hands out is always one the agent can still answer after a
//! crash.

use super::inner::Inner;
use super::types::{ClientError, ClientEvent};
use super::util::{escape_log, lock, now, saturating_period};
use meshwire_proto::Identity;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Most one-time keys whose private halves are kept (older ones go first).
const MAX_HELD_ONE_TIME_KEYS: usize = 500;

impl Inner {
    pub(crate) fn maybe_replenish(self: &Arc<Self>) {
        let published = *lock(&self.published);
        let low_water = published.saturating_sub(published / 4).max(1) as u64;
        if self.consumed_since_upload.load(Ordering::SeqCst) < low_water {
            return;
        }
        if self.replenishing.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = self.clone();
        tokio::spawn(async move {
            if let Err(e) = inner.publish_one_time_keys().await {
                inner.emit(ClientEvent::RegistryError {
                    operation: "replenishing one-time keys".into(),
                    detail: e.to_string(),
                });
            }
            inner.replenishing.store(false, Ordering::SeqCst);
        });
    }

    /// Rotates the signed pre-key if it is older than
    /// [`super::ClientConfig::signed_pre_key_rotation`] (and forgets the
    /// previous one past its grace period), committed; returns whether it
    /// rotated. The caller uploads the new bundle.
    pub(crate) fn rotate_signed_pre_key_if_due(&self) -> Result<bool, ClientError> {
        let now_ms = now().0;
        let interval_ms = u64::try_from(self.config.signed_pre_key_rotation.as_millis()).unwrap_or(u64::MAX);
        let rotated = self.state_step(|mesh, _| {
            let identity = Identity::from_seed(&mesh.identity().seed());
            let prekeys = mesh.prekeys_mut();
            prekeys.forget_expired_signed_pre_key(now_ms, meshwire_proto::prekeys::SIGNED_PRE_KEY_GRACE_MS);
            prekeys
                .signed_pre_key_rotation_due(now_ms, interval_ms)
                .then(|| prekeys.rotate_signed_pre_key(&mut rand::thread_rng(), &identity, now_ms))
        })?;
        if let Some(id) = rotated {
            self.stats.signed_pre_key_rotations.fetch_add(1, Ordering::Relaxed);
            tracing::info!(target: "meshwire", signed_pre_key_id = id, "rotated the signed pre-key");
        }
        Ok(rotated.is_some())
    }

    /// One round of pre-key upkeep: rotate the signed pre-key when due,
    /// and refill the one-time keys when the registry's count of them
    /// (meshwire-server reports `otk_count` on the agent record; AGT 5.0.0
    /// does not, and there the refill follows consumed keys only) fell
    /// below three quarters of [`super::ClientConfig::one_time_keys`].
    async fn maintain_prekeys(self: &Arc<Self>) -> Result<(), ClientError> {
        if self.rotate_signed_pre_key_if_due()? {
            self.publish_one_time_keys().await?;
            return Ok(());
        }
        let Ok(did) = meshwire_proto::Did::parse(&self.did) else {
            return Ok(());
        };
        let record = self.registry.get_agent(&did).await?;
        let Some(held) = record.extra.get("otk_count").and_then(serde_json::Value::as_u64) else {
            return Ok(());
        };
        let wanted = self.config.one_time_keys as u64;
        let low_water = wanted.saturating_sub(wanted / 4);
        if held < low_water && !self.replenishing.swap(true, Ordering::SeqCst) {
            tracing::info!(
                target: "meshwire",
                held,
                wanted,
                "the registry holds few of our one-time keys; refilling"
            );
            let published = self.publish_one_time_keys().await;
            self.replenishing.store(false, Ordering::SeqCst);
            published?;
            self.stats.one_time_key_refills.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Draws a fresh batch of one-time keys, commits it and publishes
    /// exactly that batch. Older keys keep their privates (a peer may hold
    /// one already) until used, up to a cap.
    pub(crate) async fn publish_one_time_keys(self: &Arc<Self>) -> Result<(), ClientError> {
        let (prekeys, ids) = self.state_step(|mesh, _| {
            let ids = mesh
                .prekeys_mut()
                .generate_one_time_keys(&mut rand::thread_rng(), self.config.one_time_keys)
                .map_err(|e| ClientError::Relay(format!("one-time keys: {e}")))?;
            let held: Vec<u32> = mesh.prekeys().one_time_key_ids().collect();
            for old in held.iter().take(held.len().saturating_sub(MAX_HELD_ONE_TIME_KEYS)) {
                let _ = mesh.prekeys_mut().remove_one_time_key(*old);
            }
            Ok::<_, ClientError>((mesh.prekeys().clone(), ids))
        })??;
        let identity = self.identity();
        self.registry.upload_prekeys(&identity, &prekeys, &ids).await?;
        self.consumed_since_upload.store(0, Ordering::SeqCst);
        *lock(&self.published) = ids.len();
        Ok(())
    }

    /// Publishes the pre-keys held now (after a restart, or when the
    /// registry lost them): fresh one-time keys if few are left.
    pub(crate) async fn republish_prekeys(self: &Arc<Self>) -> Result<(), ClientError> {
        let (prekeys, held) = {
            let mesh = lock(&self.mesh);
            (
                mesh.prekeys().clone(),
                mesh.prekeys().one_time_key_ids().collect::<Vec<_>>(),
            )
        };
        if held.len() < self.config.one_time_keys / 2 {
            return self.publish_one_time_keys().await;
        }
        self.registry.upload_prekeys(&self.identity(), &prekeys, &held).await?;
        *lock(&self.published) = held.len();
        Ok(())
    }

    /// A copy of the agent's identity (for signing registry requests).
    pub(crate) fn identity(&self) -> Identity {
        Identity::from_seed(&lock(&self.mesh).identity().seed())
    }
}

/// Pre-key upkeep until the client is dropped or closed: every
/// [`super::ClientConfig::one_time_key_check`] (or sooner when the signed
/// pre-key rotation interval is shorter).
pub(crate) async fn maintain_prekeys(inner: std::sync::Weak<Inner>) {
    let period = {
        let Some(inner) = inner.upgrade() else { return };
        saturating_period(
            inner
                .config
                .one_time_key_check
                .min(inner.config.signed_pre_key_rotation / 2)
                .max(Duration::from_millis(100)),
        )
    };
    let mut tick = tokio::time::interval(period);
    tick.reset();
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = inner.maintain_prekeys().await {
            tracing::debug!(target: "meshwire", error = %escape_log(&e.to_string()), "pre-key upkeep failed");
            inner.emit(ClientEvent::RegistryError {
                operation: "pre-key upkeep".into(),
                detail: e.to_string(),
            });
        }
    }
}
