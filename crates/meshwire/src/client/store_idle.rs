//! Store upkeep out of the commit path: once the client has committed
//! nothing for [`STORE_QUIET`], the store's deferred work
//! ([`crate::persist::Persistence::idle`]: the SQLite store's WAL
//! checkpoint) runs on a blocking thread, so that a burst of messages
//! never waits for it.

use super::inner::Inner;
use super::types::ClientEvent;
use super::util::{escape_log, lock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long no commit must have been made before the store's idle work
/// runs (checked on the connection's 100 ms tick). Short enough to fit in
/// the gaps of a steady stream (50 messages/s leaves 20 ms), long enough
/// to stay out of a burst.
pub const STORE_QUIET: Duration = Duration::from_millis(10);

/// When the client last committed, and whether idle work is running.
#[derive(Default)]
pub(crate) struct StoreIdle {
    last_commit: Mutex<Option<Instant>>,
    /// The commit count when idle work last started: it runs again only
    /// after new commits.
    commits_at_idle: AtomicU64,
    running: Arc<AtomicBool>,
}

impl StoreIdle {
    /// Notes a commit made now.
    pub(crate) fn committed(&self) {
        *lock(&self.last_commit) = Some(Instant::now());
    }

    /// Whether idle work is due at `now`, with `commits` made so far: there
    /// were commits since it last ran, the last one [`STORE_QUIET`] ago or
    /// more, and none is running. Marks it started when due.
    fn due(&self, now: Instant, commits: u64) -> bool {
        let quiet = lock(&self.last_commit).is_some_and(|at| now.saturating_duration_since(at) >= STORE_QUIET);
        if !quiet || self.commits_at_idle.load(Ordering::Relaxed) == commits {
            return false;
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.commits_at_idle.store(commits, Ordering::Relaxed);
        true
    }
}

impl Inner {
    /// Runs the store's idle work on a blocking thread when it is due; a
    /// failure becomes a [`ClientEvent::StoreError`].
    pub(crate) fn store_idle_work(self: &Arc<Self>) {
        let commits = self.stats.store_commits.load(Ordering::Relaxed);
        if !self.store_idle.due(Instant::now(), commits) {
            return;
        }
        let inner = self.clone();
        let running = self.store_idle.running.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = inner.persistence.idle() {
                tracing::warn!(target: "meshwire", error = %escape_log(&e.to_string()), "store upkeep failed");
                inner.emit(ClientEvent::StoreError {
                    detail: format!("store upkeep: {e}"),
                });
            }
            running.store(false, Ordering::Release);
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn idle_work_waits_for_quiet_and_new_commits_and_never_overlaps() {
        let idle = StoreIdle::default();
        let t0 = Instant::now();
        assert!(!idle.due(t0 + STORE_QUIET * 10, 0), "never committed");
        idle.committed();
        let at = lock(&idle.last_commit).unwrap();
        assert!(!idle.due(at + STORE_QUIET / 2, 1), "not quiet yet");
        assert!(idle.due(at + STORE_QUIET, 1), "quiet after a commit");
        assert!(!idle.due(at + STORE_QUIET * 2, 2), "still running");
        idle.running.store(false, Ordering::Release);
        assert!(!idle.due(at + STORE_QUIET * 3, 1), "no commit since it ran");
        assert!(idle.due(at + STORE_QUIET * 3, 2), "a new commit");
    }
}
