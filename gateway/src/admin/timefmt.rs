//! Durations (`90d`, `12h`, `1d12h`) and times (RFC 3339, UTC) as the
//! admin CLI reads and prints them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Units a duration may use, largest first.
const UNITS: [(char, u64); 5] =
    [('w', 7 * 86_400), ('d', 86_400), ('h', 3_600), ('m', 60), ('s', 1)];

/// Parses `90d`, `12h`, `30m`, `45s`, `2w` or a concatenation such as
/// `1d12h` into seconds. At least one second, at most about 100 years.
pub(crate) fn parse_duration(text: &str) -> Result<u64, String> {
    const HINT: &str = "use a number and a unit (s, m, h, d, w), e.g. 90d, 12h or 1d12h";
    const MAX_SECS: u64 = 100 * 366 * 86_400;
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("empty duration: {HINT}"));
    }
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in text.chars() {
        if let Some(digit) = c.to_digit(10) {
            let n = number.unwrap_or(0);
            number = Some(
                n.checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(digit)))
                    .ok_or_else(|| format!("duration {text:?} is too long"))?,
            );
            continue;
        }
        let unit = UNITS.iter().find(|(u, _)| *u == c).map(|(_, secs)| *secs);
        match (number.take(), unit) {
            (Some(n), Some(secs)) => {
                total = n
                    .checked_mul(secs)
                    .and_then(|s| total.checked_add(s))
                    .ok_or_else(|| format!("duration {text:?} is too long"))?;
            }
            _ => return Err(format!("invalid duration {text:?}: {HINT}")),
        }
    }
    if number.is_some() {
        return Err(format!("invalid duration {text:?}: the number needs a unit; {HINT}"));
    }
    if total == 0 {
        return Err(format!("duration {text:?} is zero"));
    }
    if total > MAX_SECS {
        return Err(format!("duration {text:?} is too long"));
    }
    Ok(total)
}

/// Seconds as the shortest duration text `parse_duration` reads back
/// (`7776000` → `90d`, `129600` → `1d12h`).
pub(crate) fn format_duration(secs: u64) -> String {
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut rest = secs;
    let mut out = String::new();
    // Weeks only when they divide evenly (90d reads better than 12w6d).
    for (unit, size) in UNITS.iter().skip(usize::from(!secs.is_multiple_of(7 * 86_400))) {
        let n = rest / size;
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
            rest %= size;
        }
    }
    out
}

/// A unix time (seconds) as RFC 3339 in UTC, e.g. `2023-11-14T22:13:20Z`.
pub(crate) fn rfc3339(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("@{secs}"))
}

/// An optional unix time as RFC 3339, or `-`.
pub(crate) fn rfc3339_or_dash(secs: Option<i64>) -> String {
    secs.map_or_else(|| "-".to_owned(), rfc3339)
}

/// `--since`: an RFC 3339 time (`2026-01-31T00:00:00Z`) or a duration
/// back from now (`24h`), as unix milliseconds.
pub(crate) fn parse_since(text: &str) -> Result<i64, String> {
    if let Ok(t) = OffsetDateTime::parse(text.trim(), &Rfc3339) {
        return i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
            .map_err(|_| format!("time {text:?} is out of range"));
    }
    let back = parse_duration(text).map_err(|_| {
        format!(
            "invalid time {text:?}: give an RFC 3339 time (2026-01-31T00:00:00Z) \
             or a duration back from now (24h, 7d)"
        )
    })?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let since = now.saturating_sub(Duration::from_secs(back));
    i64::try_from(since.as_millis()).map_err(|_| format!("time {text:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d"), Ok(7_776_000));
        assert_eq!(parse_duration("12h"), Ok(43_200));
        assert_eq!(parse_duration("30m"), Ok(1_800));
        assert_eq!(parse_duration("45s"), Ok(45));
        assert_eq!(parse_duration("1d12h"), Ok(129_600));
        assert_eq!(parse_duration("2w"), Ok(1_209_600));
        for bad in ["", "0d", "90", "d", "1x", "1.5d", "-1d", "1d 2h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_round_trip() {
        for secs in [1, 59, 60, 3_600, 86_400, 129_600, 7_776_000, 1_209_600, 90_061] {
            assert_eq!(parse_duration(&format_duration(secs)), Ok(secs), "{secs}");
        }
        assert_eq!(format_duration(7_776_000), "90d");
        assert_eq!(format_duration(1_209_600), "2w");
        assert_eq!(format_duration(129_600), "1d12h");
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_or_dash(None), "-");
        assert_eq!(parse_since("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(parse_since("2023-11-14T23:13:20+01:00"), Ok(1_700_000_000_000));
        let day_ago = parse_since("24h").unwrap();
        let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis())
            .unwrap();
        assert!((now - day_ago - 86_400_000).abs() < 5_000);
        assert!(parse_since("yesterday").is_err());
    }
}
