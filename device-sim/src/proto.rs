//! Wire messages of the device protocol (v1): parsing what the gateway sends, building what a device sends.

use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The subprotocol a device offers.
pub const SUBPROTOCOL: &str = "iot-gateway.v1";

/// A message from the gateway, as far as a device cares; unknown types become `Other`.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Incoming {
    Welcome(Welcome),
    Ack {
        id: String,
    },
    Command(Command),
    Error(ErrorMessage),
    #[serde(other)]
    Other,
}

/// The gateway's first message on a connection.
#[derive(Debug, Default, Deserialize, PartialEq)]
pub struct Welcome {
    pub device_id: String,
    #[serde(default)]
    pub session_id: String,
    #[serde(default)]
    pub limits: Limits,
}

/// Limits the gateway announces in its welcome.
#[derive(Debug, Default, Deserialize, PartialEq)]
pub struct Limits {
    pub max_message_bytes: Option<u64>,
    pub telemetry_per_sec: Option<f64>,
}

/// A command for the device.
#[derive(Debug, Deserialize, PartialEq)]
pub struct Command {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub params: Value,
}

/// The gateway's complaint about a message; the connection stays open.
#[derive(Debug, Deserialize, PartialEq)]
pub struct ErrorMessage {
    #[serde(default)]
    pub id: Option<String>,
    pub code: String,
    #[serde(default)]
    pub message: String,
}

/// Parses one text frame from the gateway.
pub fn parse(text: &str) -> serde_json::Result<Incoming> {
    serde_json::from_str(text)
}

/// A device's final answer to a command.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Succeeded(Value),
    Failed(String),
    Rejected(String),
}

/// Now, as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A telemetry message id, unique per device: `<device>-<boot>-<n>`.
pub fn message_id(device: &str, boot: u64, n: u64) -> String {
    format!("{device}-{boot}-{n}")
}

#[derive(Serialize)]
struct Telemetry<'a, D> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    ts: &'a str,
    data: &'a D,
}

/// `{"type":"telemetry","id":..,"ts":..,"data":..}`; `data` must serialize to a JSON object.
pub fn telemetry<D: Serialize>(id: &str, ts: &str, data: &D) -> String {
    let message = Telemetry {
        kind: "telemetry",
        id,
        ts,
        data,
    };
    serde_json::to_string(&message).expect("telemetry data serializes")
}

/// `{"type":"ack","id":..}`: receipt of a command.
pub fn ack(id: &str) -> String {
    serde_json::json!({"type": "ack", "id": id}).to_string()
}

/// `{"type":"command_result",..}` for a command's outcome.
pub fn command_result(id: &str, outcome: &Outcome) -> String {
    let message = match outcome {
        Outcome::Succeeded(result) => serde_json::json!({
            "type": "command_result", "id": id, "status": "succeeded", "result": result,
        }),
        Outcome::Failed(error) => serde_json::json!({
            "type": "command_result", "id": id, "status": "failed", "error": error,
        }),
        Outcome::Rejected(error) => serde_json::json!({
            "type": "command_result", "id": id, "status": "rejected", "error": error,
        }),
    };
    message.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn welcome_parses_with_limits_and_extra_fields() {
        let text = r#"{"type":"welcome","device_id":"sensor-1","session_id":"s1","server_time":"2026-11-25T10:00:00.000Z",
            "limits":{"max_message_bytes":65536,"telemetry_per_sec":100},"future":true}"#;
        let Incoming::Welcome(welcome) = parse(text).unwrap() else {
            panic!("not a welcome")
        };
        assert_eq!(welcome.device_id, "sensor-1");
        assert_eq!(welcome.limits.max_message_bytes, Some(65536));
        assert_eq!(welcome.limits.telemetry_per_sec, Some(100.0));
    }

    #[test]
    fn gateway_messages_parse() {
        assert_eq!(
            parse(r#"{"type":"ack","id":"m-1"}"#).unwrap(),
            Incoming::Ack { id: "m-1".into() }
        );
        let command = parse(r#"{"type":"command","id":"c-1","name":"reboot","params":{"delay_s":5},"expires_at":"x"}"#)
            .unwrap();
        assert_eq!(
            command,
            Incoming::Command(Command {
                id: "c-1".into(),
                name: "reboot".into(),
                params: json!({"delay_s": 5})
            })
        );
        let error =
            parse(r#"{"type":"error","code":"rate_limited","message":"slow down"}"#).unwrap();
        assert!(
            matches!(error, Incoming::Error(ErrorMessage { id: None, ref code, .. }) if code == "rate_limited")
        );
        assert_eq!(parse(r#"{"type":"news","x":1}"#).unwrap(), Incoming::Other);
    }

    #[test]
    fn malformed_gateway_messages_are_errors_not_panics() {
        for bad in [
            "",
            "not json",
            "[]",
            r#"{"id":"m-1"}"#,
            r#"{"type":"ack","id":7}"#,
            r#"{"type":"command","id":"c-1"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn telemetry_has_the_protocol_shape() {
        let text = telemetry(
            "sim-00001-17-3",
            "2026-11-25T10:00:00.000Z",
            &json!({"temp": 21.5}),
        );
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            json!({"type":"telemetry","id":"sim-00001-17-3","ts":"2026-11-25T10:00:00.000Z","data":{"temp":21.5}})
        );
        assert_eq!(message_id("sim-00001", 17, 3), "sim-00001-17-3");
    }

    #[test]
    fn command_answers_have_the_protocol_shape() {
        let ack: Value = serde_json::from_str(&ack("c-1")).unwrap();
        assert_eq!(ack, json!({"type":"ack","id":"c-1"}));
        let ok: Value = serde_json::from_str(&command_result(
            "c-1",
            &Outcome::Succeeded(json!({"pong": 1})),
        ))
        .unwrap();
        assert_eq!(
            ok,
            json!({"type":"command_result","id":"c-1","status":"succeeded","result":{"pong":1}})
        );
        let no: Value = serde_json::from_str(&command_result(
            "c-2",
            &Outcome::Rejected("unknown command".into()),
        ))
        .unwrap();
        assert_eq!(
            no,
            json!({"type":"command_result","id":"c-2","status":"rejected","error":"unknown command"})
        );
        let failed: Value =
            serde_json::from_str(&command_result("c-3", &Outcome::Failed("disk full".into())))
                .unwrap();
        assert_eq!(
            failed,
            json!({"type":"command_result","id":"c-3","status":"failed","error":"disk full"})
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let ts = now_rfc3339();
        assert_eq!(ts.len(), "2026-11-25T10:00:00.000Z".len(), "{ts}");
        assert!(ts.ends_with('Z'));
        assert!(chrono::DateTime::parse_from_rfc3339(&ts).is_ok());
    }
}
