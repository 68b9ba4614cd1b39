//! Wall-clock timestamps as the protocol writes them: ISO-8601 UTC with
//! milliseconds and `Z` (`2026-11-21T12:00:00.000Z`, JavaScript's
//! `toISOString`). The core never reads a clock; callers pass [`Timestamp`]s.

use std::fmt;

/// Milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

/// A timestamp string that is not ISO-8601 with a UTC offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ISO-8601 timestamp {0:?}")]
pub struct TimestampError(pub String);

const MS_PER_DAY: i64 = 86_400_000;

// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

impl Timestamp {
    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    pub fn to_iso(self) -> String {
        let ms = i64::try_from(self.0).unwrap_or(i64::MAX);
        let (days, rem) = (ms.div_euclid(MS_PER_DAY), ms.rem_euclid(MS_PER_DAY));
        let (y, m, d) = civil_from_days(days);
        let (h, rem) = (rem / 3_600_000, rem % 3_600_000);
        let (min, rem) = (rem / 60_000, rem % 60_000);
        format!(
            "{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{:02}.{:03}Z",
            rem / 1000,
            rem % 1000
        )
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`; an offset is required.
    pub fn parse_iso(text: &str) -> Result<Self, TimestampError> {
        let err = || TimestampError(text.chars().take(64).collect());
        let bytes = text.as_bytes();
        let num = |range: std::ops::Range<usize>| -> Result<i64, TimestampError> {
            let part = text.get(range).ok_or_else(err)?;
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            part.parse().map_err(|_| err())
        };
        let sep = |i: usize, c: u8| {
            if bytes.get(i) == Some(&c) {
                Ok(())
            } else {
                Err(err())
            }
        };
        let year = num(0..4)?;
        sep(4, b'-')?;
        let month = num(5..7)?;
        sep(7, b'-')?;
        let day = num(8..10)?;
        if !matches!(bytes.get(10), Some(b'T' | b't' | b' ')) {
            return Err(err());
        }
        let hour = num(11..13)?;
        sep(13, b':')?;
        let minute = num(14..16)?;
        sep(16, b':')?;
        let second = num(17..19)?;
        let mut i = 19;
        let mut millis = 0i64;
        if bytes.get(i) == Some(&b'.') {
            let start = i + 1;
            let mut end = start;
            while bytes.get(end).is_some_and(u8::is_ascii_digit) {
                end += 1;
            }
            if end == start || end - start > 9 {
                return Err(err());
            }
            let frac = text.get(start..end).ok_or_else(err)?;
            let first3: String = frac.chars().chain("000".chars()).take(3).collect();
            millis = first3.parse().map_err(|_| err())?;
            i = end;
        }
        let offset_minutes = match bytes.get(i) {
            Some(b'Z' | b'z') if i + 1 == bytes.len() => 0,
            Some(sign @ (b'+' | b'-')) if i + 6 == bytes.len() => {
                sep(i + 3, b':')?;
                let minutes = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
                if *sign == b'-' {
                    -minutes
                } else {
                    minutes
                }
            }
            _ => return Err(err()),
        };
        let days_in_month = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
            2 => 28,
            _ => return Err(err()),
        };
        if !(1..=days_in_month).contains(&day) || hour > 23 || minute > 59 || second > 60 {
            return Err(err());
        }
        let ms = days_from_civil(year, month, day) * MS_PER_DAY
            + ((hour * 60 + minute - offset_minutes) * 60 + second) * 1000
            + millis;
        u64::try_from(ms).map(Self).map_err(|_| err())
    }

    /// Absolute distance in milliseconds.
    pub fn abs_diff(self, other: Self) -> u64 {
        self.0.abs_diff(other.0)
    }

    /// This time plus `ms` milliseconds (saturating).
    pub fn plus_ms(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_iso())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_round_trip() {
        let t = Timestamp::parse_iso("2026-11-21T12:00:00.000Z").unwrap();
        assert_eq!(t.0, 1_795_262_400_000);
        assert_eq!(t.to_iso(), "2026-11-21T12:00:00.000Z");
        assert_eq!(Timestamp(0).to_iso(), "1970-01-01T00:00:00.000Z");
        assert_eq!(Timestamp(951_782_400_123).to_iso(), "2000-02-29T00:00:00.123Z");
        for ms in [
            0u64,
            1,
            86_399_999,
            1_795_262_400_000,
            4_102_444_800_000,
            253_402_300_799_999,
        ] {
            assert_eq!(Timestamp::parse_iso(&Timestamp(ms).to_iso()).unwrap().0, ms);
        }
    }

    #[test]
    fn offsets_and_fractions() {
        let z = Timestamp::parse_iso("2026-11-21T12:00:00Z").unwrap();
        assert_eq!(Timestamp::parse_iso("2026-11-21T13:30:00.000+01:30").unwrap(), z);
        assert_eq!(Timestamp::parse_iso("2026-11-21T11:00:00-01:00").unwrap(), z);
        assert_eq!(
            Timestamp::parse_iso("2026-11-21T12:00:00.123456+00:00").unwrap().0,
            z.0 + 123
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "2026-11-21",
            "2026-11-21T12:00:00",
            "2026-11-21T12:00:00.Z",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-21T24:00:00Z",
            "2026-11-21T12:00:00Zjunk",
            "２026-11-21T12:00:00Z",
            "2026-11-21T12:00:00+0100",
            "1969-12-31T23:59:59Z",
            "+026-11-21T12:00:00Z",
        ] {
            assert!(Timestamp::parse_iso(bad).is_err(), "{bad}");
        }
    }
}
