//! Time and window semantics: the contract batch, speed, serving and parity all implement.
//!
//! All instants are milliseconds since the Unix epoch, UTC. Every rule lives in exactly one
//! function here; nothing else in the workspace re-derives it.
//!
//! * **Tiles** are epoch-aligned, half-open `[start, start + width)`: see [`tile_start`].
//! * **Served window**: the value of a window of length `W` asked for at time `t` covers
//!   `[floor(t, hop(W)) − W, t)`: the head is exact up to `t` (fresh), the tail moves in steps of
//!   [`hop`] (a "sawtooth", as in Chronon), so the covered length is between `W` and `W + hop`.
//!   See [`served_range`].
//! * **Watermark** = max event time seen − allowed out-of-orderness ([`watermark`]); an event whose
//!   time is before watermark − allowed lateness is late ([`is_late`]) and is not applied by the speed
//!   layer (it goes to the late sink, and the nightly batch picks it up).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// Milliseconds in one second.
pub const SECOND_MS: i64 = 1_000;
/// Milliseconds in one minute.
pub const MINUTE_MS: i64 = 60 * SECOND_MS;
/// Milliseconds in one hour.
pub const HOUR_MS: i64 = 60 * MINUTE_MS;
/// Milliseconds in one day.
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// A non-negative length of time with millisecond precision, written `500ms`, `30s`, `5m`, `1h`,
/// `90d` (or combinations like `1h30m`) in feature definitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span(i64);

impl Span {
    /// A span of `ms` milliseconds.
    pub const fn from_millis(ms: i64) -> Self {
        Span(ms)
    }
    /// A span of `m` minutes.
    pub const fn minutes(m: i64) -> Self {
        Span(m * MINUTE_MS)
    }
    /// A span of `h` hours.
    pub const fn hours(h: i64) -> Self {
        Span(h * HOUR_MS)
    }
    /// A span of `d` days.
    pub const fn days(d: i64) -> Self {
        Span(d * DAY_MS)
    }
    /// Length in milliseconds.
    pub const fn millis(self) -> i64 {
        self.0
    }
    /// True if `self` is an exact multiple of `other` (`other` > 0).
    pub fn is_multiple_of(self, other: Span) -> bool {
        other.0 > 0 && self.0 % other.0 == 0
    }
}

impl fmt::Display for Span {
    /// Shortest exact form: `90d`, `1h30m`, `250ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0s");
        }
        let mut rest = self.0;
        for (unit, ms) in [
            ("d", DAY_MS),
            ("h", HOUR_MS),
            ("m", MINUTE_MS),
            ("s", SECOND_MS),
            ("ms", 1),
        ] {
            if rest >= ms {
                write!(f, "{}{unit}", rest / ms)?;
                rest %= ms;
            }
        }
        Ok(())
    }
}

impl FromStr for Span {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let s = text.trim();
        if s.is_empty() {
            return Err("empty duration (expected e.g. `5m`, `1h`, `90d`)".into());
        }
        let bytes = s.as_bytes();
        let mut i = 0;
        let mut total: i64 = 0;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if start == i {
                return Err(format!(
                    "`{text}` is not a duration (expected e.g. `5m`, `1h`, `90d`)"
                ));
            }
            let n: i64 = s[start..i]
                .parse()
                .map_err(|_| format!("`{text}`: number too large"))?;
            let ustart = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            let unit = match &s[ustart..i] {
                "ms" => 1,
                "s" => SECOND_MS,
                "m" => MINUTE_MS,
                "h" => HOUR_MS,
                "d" => DAY_MS,
                "" => return Err(format!("`{text}`: missing unit (use ms, s, m, h or d)")),
                u => {
                    return Err(format!(
                        "`{text}`: unknown unit `{u}` (use ms, s, m, h or d)"
                    ));
                }
            };
            total = n
                .checked_mul(unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| format!("`{text}`: duration too large"))?;
        }
        Ok(Span(total))
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Span {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Start of the epoch-aligned tile of `width` that contains `t`: `t − (t mod width)`, using the
/// Euclidean remainder so instants before 1970 still floor downwards.
///
/// This is the one definition of window assignment; the batch SQL uses
/// `date_bin(width, ts, TIMESTAMP '1970-01-01T00:00:00Z')`, and a test asserts that they agree.
pub fn tile_start(t_ms: i64, width: Span) -> i64 {
    t_ms - t_ms.rem_euclid(width.millis())
}

/// `floor(t, step)`: the same as [`tile_start`], named for its use on arbitrary steps.
pub fn floor_to(t_ms: i64, step: Span) -> i64 {
    tile_start(t_ms, step)
}

/// The hop (tail resolution) of a served window of length `window`:
/// 5 minutes below 12 hours, 1 hour below 12 days, 1 day otherwise.
pub fn hop(window: Span) -> Span {
    if window < Span::hours(12) {
        Span::minutes(5)
    } else if window < Span::days(12) {
        Span::hours(1)
    } else {
        Span::days(1)
    }
}

/// The half-open range `[start, end)` of event times the value of `window` covers when asked at
/// time `t`: `[floor(t, hop(window)) − window, t)`.
pub fn served_range(t_ms: i64, window: Span) -> (i64, i64) {
    (floor_to(t_ms, hop(window)) - window.millis(), t_ms)
}

/// The watermark after seeing events up to `max_event_time`: `max_event_time − out_of_orderness`.
pub fn watermark(max_event_time_ms: i64, out_of_orderness: Span) -> i64 {
    max_event_time_ms.saturating_sub(out_of_orderness.millis())
}

/// True if an event at `event_time` is too late to apply: it is before `watermark − lateness`.
pub fn is_late(event_time_ms: i64, watermark_ms: i64, allowed_lateness: Span) -> bool {
    event_time_ms < watermark_ms.saturating_sub(allowed_lateness.millis())
}

/// True once a tile `[start, start + width)` can no longer change: the watermark has passed its
/// end plus the allowed lateness.
pub fn tile_is_final(
    tile_start_ms: i64,
    width: Span,
    watermark_ms: i64,
    allowed_lateness: Span,
) -> bool {
    watermark_ms >= tile_start_ms + width.millis() + allowed_lateness.millis()
}

/// The nightly batch cutoff for a run at `now`: the last midnight UTC at or before `now`.
pub fn last_midnight(now_ms: i64) -> i64 {
    floor_to(now_ms, Span::days(1))
}

/// Formats epoch milliseconds as RFC 3339 UTC with millisecond precision.
pub fn format_ts(t_ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(t_ms) {
        Some(dt) => dt.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => format!("{t_ms}ms"),
    }
}

/// Parses an RFC 3339 timestamp with any offset into epoch milliseconds UTC.
pub fn parse_rfc3339_ms(text: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|dt| dt.timestamp_millis())
        .map_err(|e| format!("`{text}` is not an RFC 3339 timestamp ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_parse_and_print() {
        assert_eq!("5m".parse::<Span>(), Ok(Span::minutes(5)));
        assert_eq!("1h30m".parse::<Span>(), Ok(Span::minutes(90)));
        assert_eq!("90d".parse::<Span>().unwrap().to_string(), "90d");
        assert_eq!(Span::minutes(90).to_string(), "1h30m");
        assert!("5".parse::<Span>().unwrap_err().contains("missing unit"));
        assert!("5w".parse::<Span>().unwrap_err().contains("unknown unit"));
        assert!("m".parse::<Span>().unwrap_err().contains("not a duration"));
    }

    #[test]
    fn tiles_are_epoch_aligned_and_half_open() {
        let w = Span::minutes(5);
        assert_eq!(tile_start(0, w), 0);
        assert_eq!(tile_start(299_999, w), 0);
        assert_eq!(tile_start(300_000, w), 300_000);
        assert_eq!(tile_start(-1, w), -300_000);
    }

    #[test]
    fn served_window_is_a_sawtooth() {
        let t = 10 * DAY_MS + 7 * HOUR_MS + 13 * MINUTE_MS + 5;
        // 1h window, 5m hop: [07:10 - 1h, t)
        assert_eq!(
            served_range(t, Span::hours(1)),
            (10 * DAY_MS + 6 * HOUR_MS + 10 * MINUTE_MS, t)
        );
        // 1d window, 1h hop.
        assert_eq!(
            served_range(t, Span::days(1)),
            (9 * DAY_MS + 7 * HOUR_MS, t)
        );
        // 30d window, 1d hop.
        assert_eq!(served_range(t, Span::days(30)), (-20 * DAY_MS, t));
        assert_eq!(hop(Span::hours(11)), Span::minutes(5));
        assert_eq!(hop(Span::hours(12)), Span::hours(1));
        assert_eq!(hop(Span::days(12)), Span::days(1));
    }

    #[test]
    fn watermark_and_lateness() {
        let wm = watermark(100 * SECOND_MS, Span::from_millis(10 * SECOND_MS));
        assert_eq!(wm, 90 * SECOND_MS);
        assert!(!is_late(
            60 * SECOND_MS,
            wm,
            Span::from_millis(30 * SECOND_MS)
        ));
        assert!(is_late(
            60 * SECOND_MS - 1,
            wm,
            Span::from_millis(30 * SECOND_MS)
        ));
        assert!(tile_is_final(
            0,
            Span::minutes(1),
            2 * MINUTE_MS,
            Span::minutes(1)
        ));
        assert!(!tile_is_final(
            0,
            Span::minutes(1),
            2 * MINUTE_MS - 1,
            Span::minutes(1)
        ));
    }

    #[test]
    fn rfc3339_offsets_normalize_to_utc() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T01:00:00+01:00"), Ok(0));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00.250Z"), Ok(250));
        assert!(parse_rfc3339_ms("yesterday").is_err());
        assert_eq!(format_ts(250), "1970-01-01T00:00:00.250Z");
    }
}
