//! Timestamps: Unix epoch milliseconds inside, RFC 3339 UTC with milliseconds outside.

use chrono::{DateTime, SecondsFormat, Utc};

/// The largest timestamp accepted: 9999-12-31T23:59:59.999Z.
pub const MAX_MS: i64 = 253_402_300_799_999;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// `2026-11-25T10:00:00.000Z`.
pub fn format_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses an RFC 3339 timestamp (any offset) into epoch milliseconds within `0..=MAX_MS`.
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let ms = DateTime::parse_from_rfc3339(text).ok()?.timestamp_millis();
    (0..=MAX_MS).contains(&ms).then_some(ms)
}

/// Parses either an RFC 3339 timestamp or a number of epoch milliseconds.
pub fn parse_time_param(text: &str) -> Option<i64> {
    match text.parse::<i64>() {
        Ok(ms) => (0..=MAX_MS).contains(&ms).then_some(ms),
        Err(_) => parse_rfc3339_ms(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_milliseconds() {
        let ms = parse_rfc3339_ms("2026-11-25T10:00:00.123Z").unwrap();
        assert_eq!(format_ms(ms), "2026-11-25T10:00:00.123Z");
        assert_eq!(parse_rfc3339_ms("2026-11-25T11:00:00.123+01:00"), Some(ms));
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn rejects_nonsense_and_out_of_range() {
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59Z"), None);
        assert_eq!(parse_time_param("-5"), None);
        assert_eq!(parse_time_param("1795600802000"), Some(1_795_600_802_000));
    }
}
