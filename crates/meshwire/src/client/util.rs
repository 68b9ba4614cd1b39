//! Small helpers: clock, waits that cannot overflow, log escaping, locks.

use super::config::MAX_WAIT;
use meshwire_proto::time::Timestamp;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The instant `timeout` from now, saturating at [`MAX_WAIT`]: never panics,
/// whatever the timeout (`Duration::MAX` included).
pub fn deadline_after(timeout: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout.min(MAX_WAIT))
        .or_else(|| now.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}

/// `period` capped at [`MAX_WAIT`] (and at least 1 ms), for intervals and
/// sleeps whose length comes from configuration.
pub fn saturating_period(period: Duration) -> Duration {
    period.clamp(Duration::from_millis(1), MAX_WAIT)
}

/// Unverified text (a `from`, a relay's error detail) as it may appear in a
/// log line: control characters, quotes and non-ASCII escaped, so that a
/// newline in a DID cannot forge a second log line.
pub fn escape_log(text: &str) -> String {
    text.escape_default().to_string()
}

pub(crate) fn now() -> Timestamp {
    Timestamp(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn frame_kind(text: &str) -> String {
    // The type is near the start of every frame; avoid a full parse.
    let head = text.get(..text.len().min(200)).unwrap_or(text);
    head.split("\"type\":")
        .nth(1)
        .and_then(|rest| rest.trim_start().strip_prefix('"'))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("unknown")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_kinds_are_read_without_parsing() {
        assert_eq!(frame_kind(r#"{"v":1,"type":"message","from":"x"}"#), "message");
        assert_eq!(frame_kind(r#"{"ciphertext": "AAAA", "type": "ack"}"#), "ack");
        assert_eq!(frame_kind("garbage"), "unknown");
    }
}
