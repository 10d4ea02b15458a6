//! Fuzzes the device message decoder (`protocol::parse`): any text frame is either
//! refused or decodes to a message that keeps the protocol's promises; never a panic.

#![no_main]

use gateway_fuzz::protocol::{self, Inbound, MAX_ID_BYTES, MAX_POINTS};
use gateway_fuzz::time::MAX_MS;
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::value::RawValue;

/// `type` and `id` as an independent reading of the same text sees them.
#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
    id: String,
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let message = match protocol::parse(text) {
        Ok(message) => message,
        Err(invalid) => {
            assert!(!invalid.message.is_empty());
            return;
        }
    };
    let head: Head = serde_json::from_str(text).expect("a decoded message is a JSON object");
    let id = match &message {
        Inbound::Telemetry { id, points } => {
            assert_eq!(head.kind, "telemetry");
            assert!((1..=MAX_POINTS).contains(&points.len()));
            for point in points {
                assert!(point.ts.is_none_or(|ts| (0..=MAX_MS).contains(&ts)));
                let data = point.data.get();
                assert!(data.starts_with('{'), "data is an object: {data}");
                serde_json::from_str::<&RawValue>(data).expect("data is JSON");
            }
            id
        }
        Inbound::Ack { id } => {
            assert_eq!(head.kind, "ack");
            id
        }
        Inbound::CommandResult { id, result, .. } => {
            assert_eq!(head.kind, "command_result");
            assert!(result.as_ref().is_none_or(|r| r.get() != "null"));
            id
        }
    };
    assert_eq!(*id, head.id);
    assert!(!id.is_empty() && id.len() <= MAX_ID_BYTES);
});
