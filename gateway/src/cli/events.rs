//! `gateway events [--device ID]`: the live event stream, one line per event, until Ctrl-C.

use clap::Args;
use serde_json::{json, Value};

use super::client::{Client, Event};
use super::output::{clip, print, print_json_line, row_line, text, CELL_CHARS};
use super::{CliError, Connection};

/// Columns of an event line: an RFC 3339 time with milliseconds, the longest event name, a device id.
const WIDTHS: [u16; 3] = [24, 19, 12];

/// `gateway events ...`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// Only the events of this device.
    #[arg(long, value_name = "ID")]
    pub device: Option<String>,
}

/// Prints events as they come until the server ends the stream (or the user stops the process).
pub async fn run(client: &Client, json: bool, args: &EventsArgs) -> Result<(), CliError> {
    let mut events = client.events(args.device.as_deref()).await?;
    if !json {
        // Printed once the stream is open: from here on no event is missed.
        print(&row_line(
            &WIDTHS,
            ["TIME", "EVENT", "DEVICE", "SUMMARY"]
                .map(String::from)
                .into(),
        ))?;
    }
    while let Some(event) = events.next().await {
        let event = event?;
        if json {
            print_json_line(&json!({"event": event.name, "id": event.id, "data": event.data}))?;
        } else {
            print(&row_line(&WIDTHS, line(&event)))?;
        }
    }
    Ok(())
}

/// TIME, EVENT, DEVICE, SUMMARY of one event.
fn line(event: &Event) -> Vec<String> {
    let data = &event.data;
    let time = match event.name.as_str() {
        "telemetry" => &data["ts"],
        "command.updated" => ["completed_at", "delivered_at", "sent_at", "created_at"]
            .iter()
            .map(|field| &data[*field])
            .find(|v| !v.is_null())
            .unwrap_or(&Value::Null),
        _ => &data["at"],
    };
    vec![
        text(time),
        event.name.clone(),
        text(&data["device_id"]),
        summary(event),
    ]
}

/// What happened, in a few words.
fn summary(event: &Event) -> String {
    let data = &event.data;
    match event.name.as_str() {
        "telemetry" => format!(
            "id={} seq={} {}",
            text(&data["id"]),
            text(&data["seq"]),
            text(&data["data"])
        ),
        "device.connected" => format!("session={}", text(&data["session_id"])),
        "device.disconnected" => format!(
            "reason={} session={}",
            text(&data["reason"]),
            text(&data["session_id"])
        ),
        "command.updated" => {
            let mut s = format!(
                "{} {} {}",
                text(&data["id"]),
                text(&data["name"]),
                text(&data["status"])
            );
            if !data["error"].is_null() {
                s.push_str(&format!(" error={}", clip(&data["error"], CELL_CHARS)));
            } else if !data["result"].is_null() {
                s.push_str(&format!(" result={}", clip(&data["result"], CELL_CHARS)));
            }
            s
        }
        _ => clip(data, CELL_CHARS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, data: Value) -> Event {
        Event {
            name: name.into(),
            id: "1".into(),
            data,
        }
    }

    #[test]
    fn one_line_per_event() {
        let connected = event(
            "device.connected",
            json!({"device_id": "sensor-1", "session_id": "s-1",
                   "at": "2026-11-25T10:00:00.000Z", "reason": null}),
        );
        assert_eq!(
            row_line(&WIDTHS, line(&connected)),
            "2026-11-25T10:00:00.000Z   device.connected      sensor-1       session=s-1"
        );
        let point = event(
            "telemetry",
            json!({"device_id": "sensor-1", "id": "m-1", "seq": 0,
                   "ts": "2026-11-25T10:00:01.000Z", "received_at": "2026-11-25T10:00:01.002Z",
                   "data": {"temp": 21.5}}),
        );
        assert_eq!(
            line(&point),
            [
                "2026-11-25T10:00:01.000Z",
                "telemetry",
                "sensor-1",
                "id=m-1 seq=0 {\"temp\":21.5}"
            ]
        );
        let command = event(
            "command.updated",
            json!({"id": "c-1", "device_id": "sensor-1", "name": "reboot", "status": "failed",
                   "created_at": "2026-11-25T10:00:00.000Z", "sent_at": "2026-11-25T10:00:00.100Z",
                   "delivered_at": null, "completed_at": "2026-11-25T10:00:02.000Z",
                   "result": null, "error": "disk full"}),
        );
        assert_eq!(
            line(&command),
            [
                "2026-11-25T10:00:02.000Z",
                "command.updated",
                "sensor-1",
                "c-1 reboot failed error=disk full"
            ]
        );
        let lagged = event("lagged", json!({"missed": 3}));
        assert_eq!(line(&lagged), ["-", "lagged", "-", "{\"missed\":3}"]);
    }
}
