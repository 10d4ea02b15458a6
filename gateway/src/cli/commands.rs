//! `gateway commands send|list|show|cancel`: commands to devices and their outcome.

use std::time::Duration;

use clap::{Args, Subcommand};
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};

use super::client::{Client, REQUEST_TIMEOUT};
use super::output::{age, clip, fields, print, print_json, render, table, text, CELL_CHARS};
use super::{parse_duration, parse_json, whole_seconds, CliError, Connection};
use gateway::time::now_ms;

/// Statuses after which a command never changes again.
const FINAL: [&str; 6] = [
    "succeeded",
    "failed",
    "rejected",
    "expired",
    "timed_out",
    "canceled",
];

/// `gateway commands ...`.
#[derive(Debug, Args)]
pub struct CommandsArgs {
    #[command(flatten)]
    pub conn: Connection,
    #[command(subcommand)]
    pub action: CommandsAction,
}

/// What to do with commands.
#[derive(Debug, Subcommand)]
pub enum CommandsAction {
    /// Queue a command for a device; with --wait, wait for its outcome (exit 4 or 5 if not `succeeded`).
    Send {
        /// The device id.
        device: String,
        /// The command name, e.g. reboot.
        name: String,
        /// Parameters as JSON, e.g. '{"delay_s":5}'.
        #[arg(long, value_name = "JSON", value_parser = parse_json)]
        params: Option<Value>,
        /// Wait up to this long (at most 60s) for a final status, e.g. 10s.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        wait: Option<Duration>,
        /// Expire the command if it is not delivered within this long [gateway default: 1h].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Time the command out if the device has not answered this long after delivery [gateway default: 30s].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// Send the same key again to get the first command back instead of a new one.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
    },
    /// List a device's commands, newest first.
    List {
        /// The device id.
        device: String,
        /// Only commands in these statuses, e.g. queued or queued,sent,delivered.
        #[arg(long)]
        status: Option<String>,
        /// At most this many commands [default: all].
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Show one command.
    Show {
        /// The command id.
        command_id: String,
    },
    /// Cancel a command that is not final yet.
    Cancel {
        /// The command id.
        command_id: String,
    },
}

/// Runs one `commands` action.
pub async fn run(client: &Client, json: bool, action: CommandsAction) -> Result<(), CliError> {
    match action {
        CommandsAction::Send {
            device,
            name,
            params,
            wait,
            ttl,
            timeout,
            idempotency_key,
        } => {
            let wait = wait.filter(|w| !w.is_zero());
            let mut body = Map::new();
            body.insert("name".into(), Value::String(name));
            if let Some(params) = params {
                body.insert("params".into(), params);
            }
            let seconds = [("ttl_s", ttl), ("timeout_s", timeout), ("wait_s", wait)];
            for (field, duration) in seconds {
                if let Some(d) = duration {
                    body.insert(field.into(), Value::from(whole_seconds(d)));
                }
            }
            if let Some(key) = idempotency_key {
                body.insert("idempotency_key".into(), Value::String(key));
            }
            let answer = client
                .call(
                    Method::POST,
                    &["devices", &device, "commands"],
                    &[],
                    Some(&body.into()),
                    REQUEST_TIMEOUT + wait.unwrap_or_default(),
                )
                .await?;
            show(json, &answer.body)?;
            match wait {
                Some(wait) => outcome(&answer.body, answer.status, wait),
                None => Ok(()),
            }
        }
        CommandsAction::List {
            device,
            status,
            limit,
        } => {
            let query: Vec<(&str, String)> = status.map(|s| ("status", s)).into_iter().collect();
            let items = client
                .list(
                    &["devices", &device, "commands"],
                    &query,
                    limit.filter(|l| *l > 0),
                )
                .await?;
            if json {
                return print_json(&Value::Array(items));
            }
            print(&render(&commands_table(&items, now_ms())))
        }
        CommandsAction::Show { command_id } => {
            let command = client.get(&["commands", &command_id], &[]).await?;
            show(json, &command)
        }
        CommandsAction::Cancel { command_id } => {
            let answer = client
                .call(
                    Method::POST,
                    &["commands", &command_id, "cancel"],
                    &[],
                    Some(&json!({})),
                    REQUEST_TIMEOUT,
                )
                .await?;
            if json {
                return print_json(&answer.body);
            }
            print(&format!(
                "command {command_id} {}",
                text(&answer.body["status"])
            ))
        }
    }
}

fn show(json: bool, command: &Value) -> Result<(), CliError> {
    if json {
        print_json(command)
    } else {
        print(&fields(command))
    }
}

/// After `send --wait`: success only for `succeeded`; the exit code tells the rest apart.
///
/// `202` is the API saying the wait ran out; otherwise the command's own status decides.
fn outcome(command: &Value, http: StatusCode, wait: Duration) -> Result<(), CliError> {
    let id = text(&command["id"]);
    let status = command["status"].as_str().unwrap_or_default();
    if http != StatusCode::ACCEPTED && status == "succeeded" {
        return Ok(());
    }
    if http != StatusCode::ACCEPTED && FINAL.contains(&status) {
        let why = match command["error"].as_str() {
            Some(error) if !error.is_empty() => format!(": {error}"),
            _ => String::new(),
        };
        return Err(CliError::CommandNotSucceeded(format!(
            "command {id} ended {status}{why}"
        )));
    }
    Err(CliError::StillPending(format!(
        "command {id} is still {} after waiting {}s",
        text(&command["status"]),
        whole_seconds(wait)
    )))
}

/// ID, NAME, STATUS, CREATED, COMPLETED, RESULT/ERROR.
fn commands_table(items: &[Value], now: i64) -> comfy_table::Table {
    let rows = items
        .iter()
        .map(|c| {
            let outcome = match &c["error"] {
                Value::Null => clip(&c["result"], CELL_CHARS),
                error => clip(error, CELL_CHARS),
            };
            vec![
                text(&c["id"]),
                text(&c["name"]),
                text(&c["status"]),
                age(&c["created_at"], now),
                age(&c["completed_at"], now),
                outcome,
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "NAME",
            "STATUS",
            "CREATED",
            "COMPLETED",
            "RESULT/ERROR",
        ],
        rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway::time::parse_rfc3339_ms;

    #[test]
    fn wait_outcomes_map_to_exit_codes() {
        let wait = Duration::from_secs(5);
        let created = StatusCode::CREATED;
        let ok = json!({"id": "c-1", "status": "succeeded", "error": null});
        assert!(outcome(&ok, created, wait).is_ok());
        // An idempotent repeat (200) is judged by the command it returns.
        assert!(outcome(&ok, StatusCode::OK, wait).is_ok());

        let failed = json!({"id": "c-1", "status": "failed", "error": "disk full"});
        let e = outcome(&failed, created, wait).unwrap_err();
        assert_eq!(e.to_string(), "command c-1 ended failed: disk full");
        assert_eq!(e.exit_code(), 4);
        for status in ["rejected", "expired", "timed_out", "canceled"] {
            let c = json!({"id": "c-1", "status": status, "error": null});
            assert_eq!(
                outcome(&c, created, wait).unwrap_err().exit_code(),
                4,
                "{status}"
            );
        }
        for status in ["queued", "sent", "delivered"] {
            let c = json!({"id": "c-1", "status": status});
            let e = outcome(&c, StatusCode::ACCEPTED, Duration::from_millis(1500)).unwrap_err();
            assert_eq!(e.exit_code(), 5, "{status}");
            assert_eq!(
                e.to_string(),
                format!("command c-1 is still {status} after waiting 2s")
            );
        }
        let queued = json!({"id": "c-1", "status": "queued"});
        assert_eq!(outcome(&queued, created, wait).unwrap_err().exit_code(), 5);
    }

    #[test]
    fn command_rows() {
        let now = parse_rfc3339_ms("2026-11-25T10:00:00.000Z").unwrap();
        let items = [
            json!({"id": "c-2", "name": "reboot", "status": "failed",
                   "created_at": "2026-11-25T09:59:00.000Z",
                   "completed_at": "2026-11-25T09:59:30.000Z", "result": null, "error": "disk full"}),
            json!({"id": "c-1", "name": "ping", "status": "succeeded",
                   "created_at": "2026-11-25T08:00:00.000Z",
                   "completed_at": "2026-11-25T08:00:00.000Z", "result": {"pong": true}, "error": null}),
            json!({"id": "c-0", "name": "ping", "status": "queued",
                   "created_at": "2026-11-25T08:00:00.000Z",
                   "completed_at": null, "result": null, "error": null}),
        ];
        let out = render(&commands_table(&items, now));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "ID    NAME     STATUS      CREATED   COMPLETED   RESULT/ERROR",
                "c-2   reboot   failed      1m ago    30s ago     disk full",
                "c-1   ping     succeeded   2h ago    2h ago      {\"pong\":true}",
                "c-0   ping     queued      2h ago    -           -",
            ]
        );
    }
}
