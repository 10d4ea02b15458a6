//! `gateway devices create|list|show|disable|enable|delete|rotate-token`.

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Map, Value};

use super::client::{Client, REQUEST_TIMEOUT};
use super::output::{age, fields, print, print_json, render, table, text};
use super::{parse_json_object, CliError, Connection};
use gateway::time::now_ms;

/// `gateway devices ...`.
#[derive(Debug, Args)]
pub struct DevicesArgs {
    #[command(flatten)]
    pub conn: Connection,
    #[command(subcommand)]
    pub action: DevicesAction,
}

/// What to do with devices.
#[derive(Debug, Subcommand)]
pub enum DevicesAction {
    /// Create a device and print its token (shown only this once).
    Create {
        /// Device id: [A-Za-z0-9][A-Za-z0-9._:-]{0,127}.
        id: String,
        /// A human-readable name.
        #[arg(long)]
        name: Option<String>,
        /// Metadata as a JSON object, e.g. '{"site":"north"}'.
        #[arg(long, value_name = "JSON", value_parser = parse_json_object)]
        metadata: Option<Value>,
    },
    /// List devices, by id.
    List {
        /// Only devices connected now.
        #[arg(long)]
        online: bool,
        /// At most this many devices [default: all].
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Show one device.
    Show { id: String },
    /// Disable a device: it cannot connect, and its live session is closed.
    Disable { id: String },
    /// Enable a disabled device.
    Enable { id: String },
    /// Delete a device (its live session is closed, its telemetry purged).
    Delete { id: String },
    /// Issue a new token; the old one stops working and a live session is closed.
    RotateToken { id: String },
}

/// Runs one `devices` action.
pub async fn run(client: &Client, json: bool, action: DevicesAction) -> Result<(), CliError> {
    match action {
        DevicesAction::Create { id, name, metadata } => {
            let mut body = Map::new();
            body.insert("id".into(), Value::String(id.clone()));
            if let Some(name) = name {
                body.insert("name".into(), Value::String(name));
            }
            if let Some(metadata) = metadata {
                body.insert("metadata".into(), metadata);
            }
            let created = send(client, Method::POST, &["devices"], Some(&body.into())).await?;
            if json {
                return print_json(&created);
            }
            print(&format!(
                "created device {id}\ntoken: {}\n\
                 The token is shown only this once: keep it now \
                 (`gateway devices rotate-token {id}` issues a new one).",
                text(&created["token"])
            ))
        }
        DevicesAction::List { online, limit } => {
            let query: Vec<(&str, String)> = if online {
                vec![("online", "true".into())]
            } else {
                Vec::new()
            };
            let items = client
                .list(&["devices"], &query, limit.filter(|l| *l > 0))
                .await?;
            if json {
                return print_json(&Value::Array(items));
            }
            print(&render(&devices_table(&items, now_ms())))
        }
        DevicesAction::Show { id } => {
            let device = client.get(&["devices", &id], &[]).await?;
            if json {
                print_json(&device)
            } else {
                print(&fields(&device))
            }
        }
        DevicesAction::Disable { id } => set_enabled(client, json, &id, false).await,
        DevicesAction::Enable { id } => set_enabled(client, json, &id, true).await,
        DevicesAction::Delete { id } => {
            send(client, Method::DELETE, &["devices", &id], None).await?;
            if json {
                print_json(&json!({"id": id, "deleted": true}))
            } else {
                print(&format!("deleted device {id}"))
            }
        }
        DevicesAction::RotateToken { id } => {
            let rotated = send(
                client,
                Method::POST,
                &["devices", &id, "token"],
                Some(&json!({})),
            )
            .await?;
            if json {
                return print_json(&rotated);
            }
            print(&format!(
                "new token for device {id}\ntoken: {}\n\
                 The old token no longer works; this one is shown only this once.",
                text(&rotated["token"])
            ))
        }
    }
}

async fn set_enabled(client: &Client, json: bool, id: &str, enabled: bool) -> Result<(), CliError> {
    let body = json!({ "enabled": enabled });
    let device = send(client, Method::PATCH, &["devices", id], Some(&body)).await?;
    if json {
        return print_json(&device);
    }
    let what = if enabled { "enabled" } else { "disabled" };
    print(&format!("device {id} {what}"))
}

async fn send(
    client: &Client,
    method: Method,
    path: &[&str],
    body: Option<&Value>,
) -> Result<Value, CliError> {
    let answer = client
        .call(method, path, &[], body, REQUEST_TIMEOUT)
        .await?;
    Ok(answer.body)
}

/// ID, NAME, ENABLED, ONLINE, LAST SEEN, LAST DISCONNECT (reason and when).
fn devices_table(items: &[Value], now: i64) -> comfy_table::Table {
    let rows = items
        .iter()
        .map(|d| {
            let last_disconnect = match &d["last_disconnected_at"] {
                Value::Null => "-".to_string(),
                at => format!("{} {}", text(&d["last_disconnect_reason"]), age(at, now)),
            };
            vec![
                text(&d["id"]),
                text(&d["name"]),
                text(&d["enabled"]),
                text(&d["online"]),
                age(&d["last_seen_at"], now),
                last_disconnect,
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "NAME",
            "ENABLED",
            "ONLINE",
            "LAST SEEN",
            "LAST DISCONNECT",
        ],
        rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway::time::parse_rfc3339_ms;

    #[test]
    fn device_rows() {
        let now = parse_rfc3339_ms("2026-11-25T10:00:00.000Z").unwrap();
        let items = [
            json!({"id": "a", "name": "Boiler", "enabled": true, "online": true,
                   "last_seen_at": "2026-11-25T09:59:58.000Z", "last_disconnected_at": null,
                   "last_disconnect_reason": null}),
            json!({"id": "b", "name": null, "enabled": false, "online": false,
                   "last_seen_at": "2026-11-25T09:00:00.000Z",
                   "last_disconnected_at": "2026-11-25T09:00:00.000Z",
                   "last_disconnect_reason": "disabled"}),
        ];
        let out = render(&devices_table(&items, now));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "ID   NAME     ENABLED   ONLINE   LAST SEEN   LAST DISCONNECT",
                "a    Boiler   true      true     2s ago      -",
                "b    -        false     false    1h ago      disabled 1h ago",
            ]
        );
    }
}
