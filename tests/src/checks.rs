//! Assertions and small utilities shared by the end-to-end tests.

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::api::Resp;

/// Asserts `s` is RFC 3339 UTC with milliseconds (`2026-11-25T10:00:00.000Z`) and returns it parsed.
#[track_caller]
pub fn assert_rfc3339_ms(s: &str) -> DateTime<Utc> {
    let b = s.as_bytes();
    let shape_ok = b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    assert!(
        shape_ok,
        "{s:?} is not RFC 3339 UTC with milliseconds (YYYY-MM-DDTHH:MM:SS.mmmZ)"
    );
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

/// Asserts a JSON field is an RFC 3339 ms UTC string and returns it parsed.
#[track_caller]
pub fn time_field(v: &Value, field: &str) -> DateTime<Utc> {
    let s = v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {v}"));
    assert_rfc3339_ms(s)
}

/// Formats a time the way the contract writes times: RFC 3339 UTC with milliseconds.
pub fn fmt_ms(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Asserts `t` is within `slack` of the current time.
#[track_caller]
pub fn assert_close_to_now(t: DateTime<Utc>, slack: Duration) {
    let diff = (Utc::now() - t).abs().to_std().unwrap_or(Duration::MAX);
    assert!(
        diff <= slack,
        "{t} is {diff:?} away from now (allowed {slack:?})"
    );
}

/// Asserts an API error: the status, `{"error": code, "message": <non-empty string>}`.
#[track_caller]
pub fn assert_api_error(resp: &Resp, status: u16, code: &str) {
    assert_eq!(
        resp.status, status,
        "expected {status} {code}, got {} {}",
        resp.status, resp.raw
    );
    assert_error_body(&resp.body, &resp.raw, code);
}

/// Asserts a JSON error body `{"error": code, "message": "<non-empty>"}`.
#[track_caller]
pub fn assert_error_body(body: &Value, raw: &str, code: &str) {
    assert_eq!(
        body["error"].as_str(),
        Some(code),
        "error code in body {raw:?}"
    );
    let message = body["message"].as_str();
    assert!(
        message.is_some_and(|m| !m.trim().is_empty()),
        "body {raw:?} has no human-readable `message`"
    );
}

/// Polls `f` until it yields `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A random string of `len` characters from `[0-9a-f]`.
pub fn random_token(len: usize) -> String {
    let mut out = String::with_capacity(len + 16);
    while out.len() < len {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(len);
    out
}

/// A process-unique id with a readable prefix, e.g. `m-17`.
pub fn unique_id(prefix: &str) -> String {
    format!("{prefix}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

static COUNTER: AtomicU64 = AtomicU64::new(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_ms_shape() {
        assert_rfc3339_ms("2026-11-25T10:00:00.000Z");
        for bad in [
            "2026-11-25T10:00:00Z",
            "2026-11-25T10:00:00.000+00:00",
            "2026-11-25T10:00:00.000000Z",
            "2026-11-25 10:00:00.000Z",
        ] {
            assert!(
                std::panic::catch_unwind(|| assert_rfc3339_ms(bad)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn random_tokens_differ() {
        let a = random_token(32);
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_token(32));
    }
}
