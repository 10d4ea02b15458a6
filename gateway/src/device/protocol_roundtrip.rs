//! Property tests: every message of the device protocol survives encoding and decoding.
//!
//! Device -> gateway: a message drawn from a model is written as a device may write
//! it (either form of timestamp, optional fields absent or null, unknown fields, any
//! field order) and [`parse`] must give back the model. Gateway -> device: every
//! [`Outbound`] is encoded with `to_json` and read back as a device reads it, with
//! the field names of the contract.

use chrono::{DateTime, FixedOffset, SecondsFormat};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::*;
use crate::time::{format_ms, parse_rfc3339_ms, MAX_MS};

const DAY_MS: i64 = 86_400_000;

/// A timestamp and how the device writes it.
#[derive(Debug, Clone)]
enum Ts {
    Absent,
    Null,
    Millis(i64),
    /// RFC 3339 with milliseconds, at an offset of this many minutes.
    Rfc3339(i64, i32),
}

impl Ts {
    fn ms(&self) -> Option<i64> {
        match self {
            Ts::Absent | Ts::Null => None,
            Ts::Millis(ms) | Ts::Rfc3339(ms, _) => Some(*ms),
        }
    }

    fn write(&self, fields: &mut Vec<(String, Value)>) {
        let value = match self {
            Ts::Absent => return,
            Ts::Null => Value::Null,
            Ts::Millis(ms) => json!(ms),
            Ts::Rfc3339(ms, minutes) => {
                let offset = FixedOffset::east_opt(minutes * 60).expect("offset in range");
                let at = DateTime::from_timestamp_millis(*ms).expect("ms in range");
                json!(at
                    .with_timezone(&offset)
                    .to_rfc3339_opts(SecondsFormat::Millis, true))
            }
        };
        fields.push(("ts".into(), value));
    }
}

/// Telemetry's payload: one point, or a batch whose points may have their own `ts`.
#[derive(Debug, Clone)]
enum Body {
    Single(Value),
    Batch(Vec<(Ts, Value)>),
}

/// What a device sends, as a model.
#[derive(Debug, Clone)]
enum DeviceMessage {
    Telemetry {
        id: String,
        ts: Ts,
        body: Body,
    },
    Ack {
        id: String,
    },
    CommandResult {
        id: String,
        status: ResultStatus,
        /// Absent, or any JSON value (`null` reads as no result).
        result: Option<Value>,
        /// Absent, `null`, or a string.
        error: Option<Option<String>>,
    },
}

impl DeviceMessage {
    /// The fields as the device writes them, before unknown fields and reordering.
    fn fields(&self) -> Vec<(String, Value)> {
        let mut fields = Vec::new();
        let mut field = |name: &str, value: Value| fields.push((name.to_owned(), value));
        match self {
            DeviceMessage::Telemetry { id, ts, body } => {
                field("type", json!("telemetry"));
                field("id", json!(id));
                match body {
                    Body::Single(data) => field("data", data.clone()),
                    Body::Batch(points) => {
                        let points = points
                            .iter()
                            .map(|(ts, data)| {
                                let mut point = Vec::new();
                                ts.write(&mut point);
                                point.push(("data".into(), data.clone()));
                                Value::Object(point.into_iter().collect())
                            })
                            .collect();
                        field("points", Value::Array(points));
                    }
                }
                ts.write(&mut fields);
            }
            DeviceMessage::Ack { id } => {
                field("type", json!("ack"));
                field("id", json!(id));
            }
            DeviceMessage::CommandResult {
                id,
                status,
                result,
                error,
            } => {
                field("type", json!("command_result"));
                field("id", json!(id));
                field("status", json!(status.as_str()));
                if let Some(result) = result {
                    field("result", result.clone());
                }
                if let Some(error) = error {
                    field("error", json!(error));
                }
            }
        }
        fields
    }
}

/// Any char, quotes, backslashes and control characters included.
fn text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..=max).prop_map(String::from_iter)
}

/// A message id: 1 to 128 bytes.
fn message_id() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<char>(), 1..=32).prop_map(String::from_iter),
        "[A-Za-z0-9_-]{1,128}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        text(12).prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            json_object(inner),
        ]
    })
}

fn json_object(values: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    prop::collection::vec((text(8), values), 0..4)
        .prop_map(|entries| Value::Object(entries.into_iter().collect()))
}

fn timestamp() -> impl Strategy<Value = Ts> {
    prop_oneof![
        Just(Ts::Absent),
        Just(Ts::Null),
        (0..=MAX_MS).prop_map(Ts::Millis),
        // A day inside the range, so that the local time at any offset is a 4-digit year.
        (DAY_MS..=MAX_MS - DAY_MS, -1439..=1439).prop_map(|(ms, m)| Ts::Rfc3339(ms, m)),
    ]
}

fn device_message() -> impl Strategy<Value = DeviceMessage> {
    let data = || json_object(json_value());
    let body = prop_oneof![
        data().prop_map(Body::Single),
        prop::collection::vec((timestamp(), data()), 1..8).prop_map(Body::Batch),
    ];
    let status = prop_oneof![
        Just(ResultStatus::Succeeded),
        Just(ResultStatus::Failed),
        Just(ResultStatus::Rejected),
    ];
    prop_oneof![
        (message_id(), timestamp(), body).prop_map(|(id, ts, body)| DeviceMessage::Telemetry {
            id,
            ts,
            body
        }),
        message_id().prop_map(|id| DeviceMessage::Ack { id }),
        (
            message_id(),
            status,
            prop::option::of(json_value()),
            prop::option::of(prop::option::of(text(20)))
        )
            .prop_map(|(id, status, result, error)| DeviceMessage::CommandResult {
                id,
                status,
                result,
                error
            }),
    ]
}

/// Fields no message type has: devices may send them and they are ignored.
fn unknown_fields() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::vec(("x-[a-z]{1,8}", json_value()), 0..3)
}

/// Writes the message as one JSON object: its fields, the unknown ones, rotated.
fn encode(message: &DeviceMessage, unknown: &[(String, Value)], rotate: usize) -> String {
    let mut fields = message.fields();
    fields.extend(unknown.iter().cloned());
    let by = rotate % fields.len();
    fields.rotate_left(by);
    Value::Object(fields.into_iter().collect::<Map<_, _>>()).to_string()
}

fn device_roundtrip(message: &DeviceMessage, text: &str) -> Result<(), TestCaseError> {
    let decoded = parse(text).map_err(|e| TestCaseError::fail(format!("{e:?} for {text}")))?;
    match (message, decoded) {
        (DeviceMessage::Telemetry { id, ts, body }, Inbound::Telemetry { id: got, points }) => {
            prop_assert_eq!(&got, id);
            let expected: Vec<(Option<i64>, String)> = match body {
                Body::Single(data) => vec![(ts.ms(), data.to_string())],
                Body::Batch(points) => points
                    .iter()
                    .map(|(own, data)| (own.ms().or(ts.ms()), data.to_string()))
                    .collect(),
            };
            let got: Vec<(Option<i64>, String)> = points
                .iter()
                .map(|p| (p.ts, p.data.get().to_owned()))
                .collect();
            prop_assert_eq!(got, expected);
        }
        (DeviceMessage::Ack { id }, Inbound::Ack { id: got }) => prop_assert_eq!(&got, id),
        (
            DeviceMessage::CommandResult {
                id,
                status,
                result,
                error,
            },
            Inbound::CommandResult {
                id: got_id,
                status: got_status,
                result: got_result,
                error: got_error,
            },
        ) => {
            prop_assert_eq!(&got_id, id);
            prop_assert_eq!(got_status, *status);
            let result = result
                .as_ref()
                .filter(|r| !r.is_null())
                .map(Value::to_string);
            prop_assert_eq!(got_result.map(|r| r.get().to_owned()), result);
            prop_assert_eq!(got_error, error.clone().flatten());
        }
        (message, decoded) => {
            return Err(TestCaseError::fail(format!(
                "{message:?} decoded as {decoded:?}"
            )))
        }
    }
    Ok(())
}

/// What the gateway sends, as a model.
#[derive(Debug, Clone)]
enum GatewayMessage {
    Welcome {
        device_id: String,
        session_id: String,
        server_time: i64,
        max_message_bytes: usize,
        telemetry_per_sec: u32,
    },
    Ack {
        id: String,
    },
    Command {
        id: String,
        name: String,
        params: Value,
        expires_at: i64,
    },
    Error {
        id: Option<String>,
        code: ErrorCode,
        message: String,
    },
}

fn gateway_message() -> impl Strategy<Value = GatewayMessage> {
    let code = prop_oneof![
        Just(ErrorCode::InvalidMessage),
        Just(ErrorCode::RateLimited),
        Just(ErrorCode::UnknownCommand),
        Just(ErrorCode::Internal),
    ];
    prop_oneof![
        (text(20), text(20), 0..=MAX_MS, any::<usize>(), any::<u32>()).prop_map(
            |(device_id, session_id, server_time, max_message_bytes, telemetry_per_sec)| {
                GatewayMessage::Welcome {
                    device_id,
                    session_id,
                    server_time,
                    max_message_bytes,
                    telemetry_per_sec,
                }
            }
        ),
        message_id().prop_map(|id| GatewayMessage::Ack { id }),
        (message_id(), text(20), json_value(), 0..=MAX_MS).prop_map(
            |(id, name, params, expires_at)| GatewayMessage::Command {
                id,
                name,
                params,
                expires_at,
            }
        ),
        (prop::option::of(message_id()), code, text(40))
            .prop_map(|(id, code, message)| GatewayMessage::Error { id, code, message }),
    ]
}

/// Encodes with the gateway's `Outbound`; returns the text and what a device must read.
fn encode_outbound(message: &GatewayMessage) -> (String, Value) {
    match message {
        GatewayMessage::Welcome {
            device_id,
            session_id,
            server_time,
            max_message_bytes,
            telemetry_per_sec,
        } => {
            let text = Outbound::Welcome {
                device_id,
                session_id,
                server_time: format_ms(*server_time),
                limits: Limits {
                    max_message_bytes: *max_message_bytes,
                    telemetry_per_sec: *telemetry_per_sec,
                },
            }
            .to_json();
            let expected = json!({
                "type": "welcome",
                "device_id": device_id,
                "session_id": session_id,
                "server_time": format_ms(*server_time),
                "limits": {
                    "max_message_bytes": max_message_bytes,
                    "telemetry_per_sec": telemetry_per_sec,
                },
            });
            (text, expected)
        }
        GatewayMessage::Ack { id } => (
            Outbound::Ack { id }.to_json(),
            json!({"type": "ack", "id": id}),
        ),
        GatewayMessage::Command {
            id,
            name,
            params,
            expires_at,
        } => {
            let raw = RawValue::from_string(params.to_string()).expect("a JSON value");
            let text = Outbound::Command {
                id,
                name,
                params: &raw,
                expires_at: format_ms(*expires_at),
            }
            .to_json();
            // Read back through the same parser as the message, so floats compare equal.
            let params: Value = serde_json::from_str(raw.get()).expect("JSON");
            let expected = json!({
                "type": "command",
                "id": id,
                "name": name,
                "params": params,
                "expires_at": format_ms(*expires_at),
            });
            (text, expected)
        }
        GatewayMessage::Error { id, code, message } => {
            let text = Outbound::Error {
                id: id.as_deref(),
                code: *code,
                message,
            }
            .to_json();
            let code = match code {
                ErrorCode::InvalidMessage => "invalid_message",
                ErrorCode::RateLimited => "rate_limited",
                ErrorCode::UnknownCommand => "unknown_command",
                ErrorCode::Internal => "internal",
            };
            let mut expected = json!({"type": "error", "code": code, "message": message});
            if let Some(id) = id {
                expected["id"] = json!(id);
            }
            (text, expected)
        }
    }
}

proptest! {
    #[test]
    fn device_messages_decode_to_what_was_sent(
        message in device_message(),
        unknown in unknown_fields(),
        rotate in any::<usize>(),
    ) {
        let text = encode(&message, &unknown, rotate);
        device_roundtrip(&message, &text)?;
    }

    #[test]
    fn gateway_messages_read_back_as_sent(message in gateway_message()) {
        let (text, expected) = encode_outbound(&message);
        let read: Value = serde_json::from_str(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        prop_assert_eq!(&read, &expected);
        if let GatewayMessage::Welcome { server_time, .. } | GatewayMessage::Command { expires_at: server_time, .. } = message {
            let field = if read["type"] == "welcome" { "server_time" } else { "expires_at" };
            let at = read[field].as_str().and_then(parse_rfc3339_ms);
            prop_assert_eq!(at, Some(server_time));
        }
    }
}
