//! The device wire protocol: pure message types, parsing and validation (no I/O).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::time;

/// Longest message id, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Most points in one telemetry batch.
pub const MAX_POINTS: usize = 1000;

/// One telemetry point: its time (None: use the receive time) and its `data` object as JSON text.
#[derive(Debug, Clone)]
pub struct Point {
    pub ts: Option<i64>,
    pub data: Box<RawValue>,
}

/// A message a device sent, validated.
#[derive(Debug)]
pub enum Inbound {
    /// Telemetry: a single point is a batch of one.
    Telemetry { id: String, points: Vec<Point> },
    /// Receipt of a command.
    Ack { id: String },
    /// The outcome of a command.
    CommandResult {
        id: String,
        status: ResultStatus,
        result: Option<Box<RawValue>>,
        error: Option<String>,
    },
}

/// The final statuses a device may report for a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultStatus {
    Succeeded,
    Failed,
    Rejected,
}

impl ResultStatus {
    /// The status name on the wire and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Succeeded => "succeeded",
            ResultStatus::Failed => "failed",
            ResultStatus::Rejected => "rejected",
        }
    }
}

/// Why a message was refused; answered with an `invalid_message` error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The message's `id`, when it had a string one.
    pub id: Option<String>,
    pub message: &'static str,
}

/// Every field any device message may carry; unknown fields are ignored.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ts: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    points: Option<&'a RawValue>,
    #[serde(borrow, default)]
    status: Option<&'a RawValue>,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawPoint<'a> {
    #[serde(borrow, default)]
    ts: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

fn as_string(raw: &RawValue) -> Option<String> {
    if raw.get().starts_with('"') {
        serde_json::from_str(raw.get()).ok()
    } else {
        None
    }
}

fn is_object(raw: &RawValue) -> bool {
    raw.get().starts_with('{')
}

fn parse_ts(raw: &RawValue) -> Option<i64> {
    let text = raw.get();
    if text.starts_with('"') {
        let s: String = serde_json::from_str(text).ok()?;
        time::parse_rfc3339_ms(&s)
    } else {
        let ms: i64 = text.parse().ok()?;
        (0..=time::MAX_MS).contains(&ms).then_some(ms)
    }
}

fn optional_ts(raw: Option<&RawValue>) -> Result<Option<i64>, &'static str> {
    match raw {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => parse_ts(raw)
            .map(Some)
            .ok_or("ts must be an RFC 3339 time or integer Unix epoch milliseconds"),
    }
}

fn object(raw: Option<&RawValue>, missing: &'static str) -> Result<Box<RawValue>, &'static str> {
    match raw {
        Some(raw) if is_object(raw) => Ok(raw.to_owned()),
        Some(_) => Err("data must be an object"),
        None => Err(missing),
    }
}

/// Parses and validates one text frame.
pub fn parse(text: &str) -> Result<Inbound, Invalid> {
    let not_object = || Invalid {
        id: None,
        message: "message must be a JSON object",
    };
    // serde would also accept an array for a struct; the protocol does not.
    if !text.trim_start().starts_with('{') {
        return Err(not_object());
    }
    let env: Envelope = serde_json::from_str(text).map_err(|_| not_object())?;
    let id = env.id.and_then(as_string);
    let fail = |message| Invalid {
        id: id.clone(),
        message,
    };
    let kind = env
        .kind
        .and_then(as_string)
        .ok_or_else(|| fail("type must be a string"))?;
    let valid_id = match &id {
        Some(i) if !i.is_empty() && i.len() <= MAX_ID_BYTES => i.clone(),
        _ => return Err(fail("id must be a string of 1 to 128 bytes")),
    };
    match kind.as_str() {
        "telemetry" => parse_telemetry(&env, valid_id).map_err(fail),
        "ack" => Ok(Inbound::Ack { id: valid_id }),
        "command_result" => parse_result(&env, valid_id).map_err(fail),
        _ => Err(fail("unknown message type")),
    }
}

fn parse_telemetry(env: &Envelope, id: String) -> Result<Inbound, &'static str> {
    let default_ts = optional_ts(env.ts)?;
    let points = match env.points {
        None => vec![Point {
            ts: default_ts,
            data: object(env.data, "data (an object) or points is required")?,
        }],
        Some(_) if env.data.is_some() => {
            return Err("telemetry has either data or points, not both")
        }
        Some(raw) => {
            let raw_points: Vec<RawPoint> = serde_json::from_str(raw.get())
                .map_err(|_| "points must be an array of objects")?;
            if raw_points.is_empty() {
                return Err("points must not be empty");
            }
            if raw_points.len() > MAX_POINTS {
                return Err("points holds at most 1000 points");
            }
            raw_points
                .iter()
                .map(|p| {
                    Ok(Point {
                        ts: optional_ts(p.ts)?.or(default_ts),
                        data: object(p.data, "every point needs a data object")?,
                    })
                })
                .collect::<Result<_, &'static str>>()?
        }
    };
    Ok(Inbound::Telemetry { id, points })
}

fn parse_result(env: &Envelope, id: String) -> Result<Inbound, &'static str> {
    const BAD_STATUS: &str = "status must be succeeded, failed or rejected";
    let status = match env.status.and_then(as_string).as_deref() {
        Some("succeeded") => ResultStatus::Succeeded,
        Some("failed") => ResultStatus::Failed,
        Some("rejected") => ResultStatus::Rejected,
        _ => return Err(BAD_STATUS),
    };
    let error = match env.error {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) => Some(as_string(raw).ok_or("error must be a string")?),
    };
    let result = env
        .result
        .filter(|raw| raw.get() != "null")
        .map(|raw| raw.to_owned());
    Ok(Inbound::CommandResult {
        id,
        status,
        result,
        error,
    })
}

/// Limits announced in the welcome message.
#[derive(Debug, Serialize)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub telemetry_per_sec: u32,
}

/// A message the gateway sends to a device.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outbound<'a> {
    Welcome {
        device_id: &'a str,
        session_id: &'a str,
        server_time: String,
        limits: Limits,
    },
    Ack {
        id: &'a str,
    },
    Command {
        id: &'a str,
        name: &'a str,
        params: &'a RawValue,
        expires_at: String,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        code: ErrorCode,
        message: &'a str,
    },
}

/// The codes of `error` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidMessage,
    RateLimited,
    UnknownCommand,
    Internal,
}

impl Outbound<'_> {
    /// The JSON text of the message.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("outbound messages always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(text: &str) -> Invalid {
        parse(text).expect_err(text)
    }

    #[test]
    fn single_point_with_both_ts_forms_and_without() {
        let Inbound::Telemetry { id, points } = parse(
            r#"{"type":"telemetry","id":"m-1","ts":"2026-11-25T10:00:00.000Z","data":{"temp":21.5}}"#,
        )
        .unwrap() else {
            panic!("not telemetry")
        };
        assert_eq!(id, "m-1");
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].ts, Some(1_795_600_800_000));
        assert_eq!(points[0].data.get(), r#"{"temp":21.5}"#);

        let Inbound::Telemetry { points, .. } =
            parse(r#"{"type":"telemetry","id":"m-2","ts":1795600802000,"data":{}}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(points[0].ts, Some(1_795_600_802_000));

        let Inbound::Telemetry { points, .. } =
            parse(r#"{"type":"telemetry","id":"m-3","data":{"a":1},"extra":true}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(points[0].ts, None);
    }

    #[test]
    fn batch_points_inherit_the_message_ts() {
        let Inbound::Telemetry { points, .. } = parse(
            r#"{"type":"telemetry","id":"b","ts":1000,"points":[{"ts":"2026-11-25T10:00:01Z","data":{"t":1}},{"data":{"t":2}}]}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].ts, Some(1_795_600_801_000));
        assert_eq!(points[1].ts, Some(1000));
    }

    #[test]
    fn invalid_messages_say_why_and_keep_the_id() {
        assert_eq!(invalid("not json").id, None);
        assert_eq!(invalid("[1,2]").message, "message must be a JSON object");
        let e = invalid(r#"{"type":"telemetry","id":"x","data":[1]}"#);
        assert_eq!(e.id.as_deref(), Some("x"));
        assert_eq!(e.message, "data must be an object");
        assert_eq!(
            invalid(r#"{"id":"x","data":{}}"#).message,
            "type must be a string"
        );
        assert_eq!(
            invalid(r#"{"type":"nope","id":"x"}"#).message,
            "unknown message type"
        );
        assert!(invalid(r#"{"type":"telemetry","id":"","data":{}}"#)
            .message
            .starts_with("id"));
        let long = "x".repeat(129);
        let e = invalid(&format!(
            r#"{{"type":"telemetry","id":"{long}","data":{{}}}}"#
        ));
        assert!(e.message.starts_with("id"));
        assert!(
            invalid(r#"{"type":"telemetry","id":"x","ts":"soon","data":{}}"#)
                .message
                .starts_with("ts")
        );
        assert!(
            invalid(r#"{"type":"telemetry","id":"x","ts":1.5,"data":{}}"#)
                .message
                .starts_with("ts")
        );
        assert!(invalid(r#"{"type":"telemetry","id":"x","points":{}}"#)
            .message
            .starts_with("points"));
        assert!(invalid(r#"{"type":"telemetry","id":"x","points":[]}"#)
            .message
            .starts_with("points"));
        assert!(invalid(r#"{"type":"telemetry","id":"x"}"#)
            .message
            .contains("data"));
        assert_eq!(invalid(r#"{"type":"telemetry","id":7,"data":{}}"#).id, None);
    }

    #[test]
    fn at_most_1000_points() {
        let point = r#"{"data":{"v":1}}"#;
        let ok = format!(
            r#"{{"type":"telemetry","id":"b","points":[{}]}}"#,
            vec![point; 1000].join(",")
        );
        assert!(parse(&ok).is_ok());
        let too_many = format!(
            r#"{{"type":"telemetry","id":"b","points":[{}]}}"#,
            vec![point; 1001].join(",")
        );
        assert_eq!(
            invalid(&too_many).message,
            "points holds at most 1000 points"
        );
    }

    #[test]
    fn command_answers() {
        assert!(matches!(
            parse(r#"{"type":"ack","id":"c-1"}"#).unwrap(),
            Inbound::Ack { id } if id == "c-1"
        ));
        let Inbound::CommandResult { status, result, .. } =
            parse(r#"{"type":"command_result","id":"c-1","status":"succeeded","result":{"u":1}}"#)
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(status, ResultStatus::Succeeded);
        assert_eq!(result.unwrap().get(), r#"{"u":1}"#);
        assert!(
            invalid(r#"{"type":"command_result","id":"c-1","status":"done"}"#)
                .message
                .starts_with("status")
        );
    }

    #[test]
    fn outbound_shapes() {
        assert_eq!(
            Outbound::Ack { id: "m-1" }.to_json(),
            r#"{"type":"ack","id":"m-1"}"#
        );
        let params = RawValue::from_string(r#"{"delay_s":5}"#.into()).unwrap();
        assert_eq!(
            Outbound::Command {
                id: "c-1",
                name: "reboot",
                params: &params,
                expires_at: "2026-11-25T11:00:00.000Z".into(),
            }
            .to_json(),
            r#"{"type":"command","id":"c-1","name":"reboot","params":{"delay_s":5},"expires_at":"2026-11-25T11:00:00.000Z"}"#
        );
        assert_eq!(
            Outbound::Error {
                id: Some("m"),
                code: ErrorCode::RateLimited,
                message: "slow down"
            }
            .to_json(),
            r#"{"type":"error","id":"m","code":"rate_limited","message":"slow down"}"#
        );
    }
}

#[cfg(test)]
#[path = "protocol_roundtrip.rs"]
mod roundtrip;
