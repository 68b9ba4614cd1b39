//! Small helpers shared by the relay and the registry.

use meshwire_proto::time::Timestamp;

/// A client timestamp could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IsoError {
    /// Not an ISO-8601 date-time.
    Invalid,
    /// A date-time without a UTC offset.
    Naive,
}

/// Parses an ISO-8601 timestamp that must carry an offset (`Z` or `±HH:MM`),
/// telling a missing offset apart from garbage as Python's `fromisoformat`
/// callers in the reference do.
pub(crate) fn parse_iso(text: &str) -> Result<Timestamp, IsoError> {
    match Timestamp::parse_iso(text) {
        Ok(ts) => Ok(ts),
        Err(_) if Timestamp::parse_iso(&format!("{text}Z")).is_ok() => Err(IsoError::Naive),
        Err(_) => Err(IsoError::Invalid),
    }
}

/// `datetime.isoformat()` of an aware UTC datetime, as the reference servers
/// write timestamps: `2026-11-21T12:00:00.123000+00:00`, or without the
/// fraction when it is zero.
pub(crate) fn python_isoformat(ts: Timestamp) -> String {
    let iso = ts.to_iso(); // YYYY-MM-DDTHH:MM:SS.mmmZ
    let body = iso.strip_suffix('Z').unwrap_or(&iso);
    match body.rsplit_once('.') {
        Some((seconds, "000")) => format!("{seconds}+00:00"),
        Some((seconds, millis)) => format!("{seconds}.{millis}000+00:00"),
        None => format!("{body}+00:00"),
    }
}

/// Equality that does not stop at the first differing byte
/// (`secrets.compare_digest`); the length is not hidden.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Untrusted text (a DID or id from a frame or a path) for log fields:
/// control characters, quotes and backslashes escaped as Rust's
/// `escape_debug` does, so a value cannot end a log line or forge one; at
/// most [`MAX_LOGGED_CHARS`] characters, then `…`.
pub(crate) struct Esc<'a>(pub(crate) &'a str);

/// Longest untrusted string written to a log line.
pub(crate) const MAX_LOGGED_CHARS: usize = 200;

impl std::fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars().take(MAX_LOGGED_CHARS) {
            write!(f, "{}", c.escape_debug())?;
        }
        if self.0.chars().nth(MAX_LOGGED_CHARS).is_some() {
            f.write_str("…")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_log_text_stays_on_one_line() {
        let text = Esc("did:mesh:x\nINFO forged line\u{1b}[31m").to_string();
        assert!(!text.contains('\n') && !text.contains('\u{1b}'));
        assert_eq!(Esc(&"a".repeat(500)).to_string().chars().count(), MAX_LOGGED_CHARS + 1);
    }

    #[test]
    fn isoformat_like_python() {
        let t = Timestamp::parse_iso("2026-11-21T12:00:00.000Z").unwrap_or_default();
        assert_eq!(python_isoformat(t), "2026-11-21T12:00:00+00:00");
        assert_eq!(python_isoformat(t.plus_ms(123)), "2026-11-21T12:00:00.123000+00:00");
    }

    #[test]
    fn naive_timestamps_are_told_apart() {
        assert_eq!(parse_iso("2026-11-21T12:00:00"), Err(IsoError::Naive));
        assert_eq!(parse_iso("yesterday"), Err(IsoError::Invalid));
        assert!(parse_iso("2026-11-21T12:00:00+00:00").is_ok());
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
