//! Helpers for command tests: create, read and wait on commands through the operator API, and
//! receive and answer them as a device.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::Api;
use crate::checks::{eventually, time_field};
use crate::device::{Device, Event};

/// The fields of a command object, as the contract lists them.
pub const COMMAND_FIELDS: [&str; 14] = [
    "id",
    "device_id",
    "name",
    "params",
    "status",
    "created_at",
    "sent_at",
    "delivered_at",
    "completed_at",
    "expires_at",
    "timeout_s",
    "result",
    "error",
    "idempotency_key",
];

/// The statuses after which nothing changes any more.
pub const FINAL: [&str; 6] = [
    "succeeded",
    "failed",
    "rejected",
    "expired",
    "timed_out",
    "canceled",
];

/// How long [`wait_status`] polls before giving up.
pub const STATE_WAIT: Duration = Duration::from_secs(10);

/// The keys of a JSON object.
#[track_caller]
pub fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// Asserts `cmd` has exactly the contract's command fields, with RFC 3339 ms times where set.
#[track_caller]
pub fn assert_command_shape(cmd: &Value) {
    let want: BTreeSet<String> = COMMAND_FIELDS.iter().map(|s| s.to_string()).collect();
    assert_eq!(keys(cmd), want, "command fields of {cmd}");
    let id = cmd["id"].as_str().unwrap_or_default();
    assert!(
        id.starts_with("c-"),
        "command id {id:?} does not start with c-"
    );
    time_field(cmd, "created_at");
    time_field(cmd, "expires_at");
    for field in ["sent_at", "delivered_at", "completed_at"] {
        if !cmd[field].is_null() {
            time_field(cmd, field);
        }
    }
    assert!(cmd["params"].is_object(), "params of {cmd}");
}

/// The `id` of a command (or any object with a string id).
#[track_caller]
pub fn id_of(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no string id in {v}"))
        .to_string()
}

/// `POST /v1/devices/{device}/commands` with `body`, asserting `201` and the command shape.
pub async fn create(api: &Api, device: &str, body: &Value) -> Value {
    let cmd = api
        .post(&format!("/devices/{device}/commands"), body)
        .await
        .expect(201);
    assert_command_shape(&cmd);
    cmd
}

/// Creates a command named `name` with no other field and returns its id.
pub async fn create_named(api: &Api, device: &str, name: &str) -> String {
    id_of(&create(api, device, &json!({ "name": name })).await)
}

/// `GET /v1/commands/{id}`, asserting `200` and the command shape.
pub async fn get(api: &Api, id: &str) -> Value {
    let cmd = api.get(&format!("/commands/{id}")).await.expect(200);
    assert_command_shape(&cmd);
    cmd
}

/// Polls `GET /v1/commands/{id}` until its status is `status`; panics after [`STATE_WAIT`] or if
/// it reaches another final status first.
pub async fn wait_status(api: &Api, id: &str, status: &str) -> Value {
    eventually(
        &format!("command {id} to become {status}"),
        STATE_WAIT,
        || async {
            let cmd = get(api, id).await;
            let now = cmd["status"].as_str().unwrap_or_default().to_string();
            if now == status {
                return Some(cmd);
            }
            assert!(
                !FINAL.contains(&now.as_str()),
                "command {id} became {now}, not {status}: {cmd}"
            );
            None
        },
    )
    .await
}

/// `GET /v1/devices/{device}/commands{query}` items, asserting `200`.
pub async fn list(api: &Api, device: &str, query: &str) -> Vec<Value> {
    let page = api
        .get(&format!("/devices/{device}/commands{query}"))
        .await
        .expect(200);
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items array in {page}"))
        .clone()
}

/// The ids of [`list`].
pub async fn list_ids(api: &Api, device: &str, query: &str) -> Vec<String> {
    list(api, device, query).await.iter().map(id_of).collect()
}

/// The next message on `dev`, which must be a `command`.
#[track_caller]
pub fn recv_command(dev: &mut Device) -> impl std::future::Future<Output = Value> + '_ {
    let caller = std::panic::Location::caller();
    async move {
        let msg = match dev.next_event(Duration::from_secs(10)).await {
            Event::Json(v) => v,
            other => panic!("{caller}: expected a command, got {other:?}"),
        };
        assert_eq!(
            msg["type"], "command",
            "{caller}: expected a command, got {msg}"
        );
        msg
    }
}

/// Asserts the gateway sends `dev` nothing for `quiet` (pings aside).
#[track_caller]
pub fn assert_silent(
    dev: &mut Device,
    quiet: Duration,
) -> impl std::future::Future<Output = ()> + '_ {
    let caller = std::panic::Location::caller();
    async move {
        match dev.next_event(quiet).await {
            Event::Timeout => {}
            other => panic!("{caller}: expected nothing for {quiet:?}, got {other:?}"),
        }
    }
}

/// Sends `{"type":"ack","id":id}` (a device's receipt; the gateway does not answer it).
pub async fn ack(dev: &mut Device, id: &str) {
    dev.send_json(&json!({"type": "ack", "id": id})).await;
}

/// Sends a `command_result` with `status` and the `extra` fields (`result`, `error`) and asserts
/// the gateway's `{"type":"ack","id":id}`.
pub async fn answer(dev: &mut Device, id: &str, status: &str, extra: Value) {
    let mut msg = json!({"type": "command_result", "id": id, "status": status});
    if let (Some(m), Some(e)) = (msg.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    dev.send_acked(&msg).await;
}

/// Sends `msg` and asserts the answer is an `unknown_command` error carrying `msg`'s id.
#[track_caller]
pub fn expect_unknown_command<'a>(
    dev: &'a mut Device,
    msg: &'a Value,
) -> impl std::future::Future<Output = ()> + 'a {
    let caller = std::panic::Location::caller();
    async move {
        let reply = dev.request(msg).await;
        assert_eq!(reply["type"], "error", "{caller}: answer to {msg}: {reply}");
        assert_eq!(reply["id"], msg["id"], "{caller}: answer to {msg}: {reply}");
        assert_eq!(
            reply["code"], "unknown_command",
            "{caller}: answer to {msg}: {reply}"
        );
        assert!(
            reply["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{caller}: error without a message: {reply}"
        );
    }
}
