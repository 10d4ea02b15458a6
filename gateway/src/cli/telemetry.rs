//! `gateway telemetry DEVICE [--since 1h] [--limit N] [--keys a,b] [--follow]`.

use std::collections::HashSet;
use std::time::Duration;

use clap::Args;
use serde_json::{Map, Value};

use super::client::Client;
use super::output::{print, print_json, print_json_line, render, row_line, table, text};
use super::{parse_duration, CliError, Connection};
use gateway::time::{format_ms, now_ms};

/// `gateway telemetry ...`.
#[derive(Debug, Args)]
pub struct TelemetryArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// The device id.
    pub device: String,
    /// How far back to look, e.g. 15m, 1h, 48h.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1h")]
    pub since: Duration,
    /// Show the newest N points of that window (oldest first); 0 for all of them.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: usize,
    /// Only these keys of `data`, e.g. temp,door.
    #[arg(long, value_name = "KEYS")]
    pub keys: Option<String>,
    /// After the history, print new points as they arrive, until Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// Prints the window's points, then (with `--follow`) every new point of the device.
pub async fn run(client: &Client, json: bool, args: &TelemetryArgs) -> Result<(), CliError> {
    let since_ms = i64::try_from(args.since.as_millis()).unwrap_or(i64::MAX);
    let mut query = vec![
        ("from", format_ms(now_ms().saturating_sub(since_ms).max(0))),
        ("order", "desc".to_string()),
    ];
    if let Some(keys) = &args.keys {
        query.push(("keys", keys.clone()));
    }
    // Subscribe before reading the history, so that no point falls between the two.
    let mut live = if args.follow {
        Some(client.events(Some(&args.device)).await?)
    } else {
        None
    };
    let path = ["devices", args.device.as_str(), "telemetry"];
    let mut history = client
        .list(&path, &query, Some(args.limit).filter(|l| *l > 0))
        .await?;
    // Newest first from the API (so that --limit keeps the newest), oldest first on screen.
    history.reverse();

    let widths = if json && !args.follow {
        print_json(&Value::Array(history.clone()))?;
        Vec::new()
    } else if json {
        for point in &history {
            print_json_line(point)?;
        }
        Vec::new()
    } else {
        let table = table(
            &["TS", "ID", "SEQ", "DATA"],
            history.iter().map(row).collect(),
        );
        print(&render(&table))?;
        table.column_max_content_widths()
    };

    let Some(live) = live.as_mut() else {
        return Ok(());
    };
    let mut seen: HashSet<(String, String)> = history.iter().map(point_key).collect();
    let keys = args.keys.as_deref().map(parse_keys);
    while let Some(event) = live.next().await {
        let event = event?;
        match event.name.as_str() {
            "telemetry" if event.data["device_id"] == args.device.as_str() => {}
            "lagged" => {
                let missed = text(&event.data["missed"]);
                eprintln!("gateway: warning: {missed} events missed: this reader fell behind");
                continue;
            }
            _ => continue,
        }
        let mut point = event.data;
        if !seen.insert(point_key(&point)) {
            continue;
        }
        if let (Some(keys), Some(Value::Object(data))) = (&keys, point.get_mut("data")) {
            data.retain(|k, _| keys.contains(k));
        }
        if json {
            print_json_line(&point)?;
        } else {
            print(&row_line(&widths, row(&point)))?;
        }
    }
    Ok(())
}

/// TS, ID, SEQ, DATA of one point.
fn row(point: &Value) -> Vec<String> {
    vec![
        text(&point["ts"]),
        text(&point["id"]),
        text(&point["seq"]),
        text(
            &point
                .get("data")
                .cloned()
                .unwrap_or(Value::Object(Map::new())),
        ),
    ]
}

/// What tells points apart: the message id and the index in its batch.
fn point_key(point: &Value) -> (String, String) {
    (text(&point["id"]), text(&point["seq"]))
}

/// `a,b` as the API reads `keys=`.
fn parse_keys(keys: &str) -> HashSet<String> {
    keys.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn point_rows_and_keys() {
        let point = json!({"id": "m-1", "seq": 2, "ts": "2026-11-25T10:00:00.000Z",
                           "received_at": "2026-11-25T10:00:00.001Z", "data": {"temp": 21.5}});
        assert_eq!(
            row(&point),
            ["2026-11-25T10:00:00.000Z", "m-1", "2", "{\"temp\":21.5}"]
        );
        assert_eq!(point_key(&point), ("m-1".to_string(), "2".to_string()));
        assert_eq!(
            parse_keys(" temp, ,door"),
            HashSet::from(["temp".to_string(), "door".to_string()])
        );
    }
}
