//! Device presence and connection history: the presence fields, every disconnect reason as both
//! the device and its session list record it, replacement (4001), `last_seen_at`, and a crash.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use chrono::Utc;
use e2e::{assert_api_error, assert_close_to_now, json, time_field, Api, Gateway, Options, Value};
use tokio_tungstenite::tungstenite::Message;

/// How long a state change may take to show in the API.
const STATE_WAIT: Duration = Duration::from_secs(10);
/// How long a close frame may take to come.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

const SESSION_FIELDS: [&str; 6] = [
    "session_id",
    "connected_at",
    "disconnected_at",
    "disconnect_reason",
    "remote_addr",
    "auth",
];

const REASONS: [&str; 8] = [
    "client_closed",
    "connection_lost",
    "idle_timeout",
    "session_replaced",
    "disabled",
    "token_rotated",
    "protocol_error",
    "server_shutdown",
];

/// Asserts two times of the same moment, recorded in two places, are within a second.
#[track_caller]
fn assert_near(a: &Value, a_field: &str, b: &Value, b_field: &str) {
    let diff = (time_field(a, a_field) - time_field(b, b_field)).num_milliseconds();
    assert!(
        diff.abs() <= 1000,
        "{a_field} of {a} and {b_field} of {b} are {diff} ms apart"
    );
}

/// Every session of `device`, following `next_cursor` with pages of `limit`.
async fn sessions(api: &Api, device: &str, limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut path = format!("/devices/{device}/sessions?limit={limit}");
    for _ in 0..100 {
        let page = api.get(&path).await.expect(200);
        let keys: BTreeSet<&str> = page
            .as_object()
            .expect("sessions page is an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, BTreeSet::from(["items", "next_cursor"]), "{page}");
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= limit, "page over limit={limit}: {page}");
        out.extend(items.iter().cloned());
        match &page["next_cursor"] {
            Value::Null => return out,
            Value::String(c) => {
                path = format!(
                    "/devices/{device}/sessions?limit={limit}&cursor={}",
                    e2e::api::encode(c)
                )
            }
            other => panic!("next_cursor {other}"),
        }
    }
    panic!("sessions of {device} did not end");
}

/// The session `session_id` of `device`, asserting its shape.
async fn session(api: &Api, device: &str, session_id: &str) -> Value {
    let all = sessions(api, device, 100).await;
    let s = all
        .iter()
        .find(|s| s["session_id"] == session_id)
        .unwrap_or_else(|| panic!("session {session_id} not in {all:?}"))
        .clone();
    assert_session_shape(&s);
    s
}

#[track_caller]
fn assert_session_shape(s: &Value) {
    let keys: BTreeSet<&str> = s
        .as_object()
        .unwrap_or_else(|| panic!("session is not an object: {s}"))
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(SESSION_FIELDS),
        "session fields of {s}"
    );
    assert_eq!(s["auth"], "token", "{s}");
    let remote = s["remote_addr"].as_str().unwrap_or_default();
    assert!(remote.starts_with("127.0.0.1"), "remote_addr of {s}");
    let connected_at = time_field(s, "connected_at");
    if s["disconnected_at"].is_null() {
        assert_eq!(s["disconnect_reason"], Value::Null, "open session {s}");
    } else {
        assert!(time_field(s, "disconnected_at") >= connected_at, "{s}");
        let reason = s["disconnect_reason"].as_str().unwrap_or_default();
        assert!(REASONS.contains(&reason), "disconnect_reason of {s}");
    }
}

/// Waits until session `session_id` has ended and returns it.
async fn ended_session(api: &Api, device: &str, session_id: &str) -> Value {
    e2e::eventually(
        &format!("session {session_id} to end"),
        STATE_WAIT,
        || async {
            let s = session(api, device, session_id).await;
            (!s["disconnected_at"].is_null()).then_some(s)
        },
    )
    .await
}

/// Waits until the device is offline with `reason` as its last disconnect reason.
async fn offline_with(api: &Api, device: &str, reason: &str) -> Value {
    e2e::eventually(
        &format!("{device} offline with reason {reason}"),
        STATE_WAIT,
        || async {
            let d = api.device(device).await;
            (d["online"] == false && d["last_disconnect_reason"] == reason).then_some(d)
        },
    )
    .await
}

/// Waits until the device is online and returns it.
async fn online(api: &Api, device: &str) -> Value {
    e2e::eventually(&format!("{device} online"), STATE_WAIT, || async {
        let d = api.device(device).await;
        (d["online"] == true).then_some(d)
    })
    .await
}

/// Asserts the device and the session agree on the end of `session_id` with `reason`.
async fn assert_ended(api: &Api, device: &str, session_id: &str, reason: &str) -> Value {
    let s = ended_session(api, device, session_id).await;
    assert_eq!(s["disconnect_reason"], reason, "{s}");
    assert_close_to_now(time_field(&s, "disconnected_at"), Duration::from_secs(10));
    s
}

#[tokio::test]
async fn a_dropped_connection_is_recorded_as_connection_lost() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;
    let dev = gw.connect(&token).await;
    let session_id = dev.session_id().to_string();
    online(&api, "sensor-1").await;

    // The TCP connection goes away without a WebSocket close frame.
    drop(dev);
    let device = offline_with(&api, "sensor-1", "connection_lost").await;
    let s = assert_ended(&api, "sensor-1", &session_id, "connection_lost").await;
    assert_near(&device, "last_disconnected_at", &s, "disconnected_at");
}

#[tokio::test]
async fn each_way_a_session_ends_is_recorded_for_the_device_and_its_history() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let mut token = api.create_device("sensor-1").await;
    let mut expected: Vec<(String, &str)> = Vec::new();

    let dev = gw.connect(&token).await;
    expected.push((dev.session_id().into(), "client_closed"));
    online(&api, "sensor-1").await;
    dev.close().await;
    offline_with(&api, "sensor-1", "client_closed").await;

    let dev = gw.connect(&token).await;
    expected.push((dev.session_id().into(), "connection_lost"));
    online(&api, "sensor-1").await;
    drop(dev);
    offline_with(&api, "sensor-1", "connection_lost").await;

    let mut old = gw.connect(&token).await;
    let mut new = gw.connect(&token).await;
    expected.push((old.session_id().into(), "session_replaced"));
    assert_eq!(old.expect_close(CLOSE_WAIT).await.0, 4001);
    let old_session = ended_session(&api, "sensor-1", &expected[2].0).await;
    assert_eq!(old_session["disconnect_reason"], "session_replaced");

    expected.push((new.session_id().into(), "protocol_error"));
    for _ in 0..10 {
        new.send_text("not json").await;
    }
    assert_eq!(new.expect_close(CLOSE_WAIT).await.0, 1008);
    offline_with(&api, "sensor-1", "protocol_error").await;

    let mut dev = gw.connect(&token).await;
    expected.push((dev.session_id().into(), "disabled"));
    api.patch("/devices/sensor-1", &json!({"enabled": false}))
        .await
        .expect(200);
    assert_eq!(dev.expect_close(CLOSE_WAIT).await.0, 4003);
    offline_with(&api, "sensor-1", "disabled").await;
    api.patch("/devices/sensor-1", &json!({"enabled": true}))
        .await
        .expect(200);

    let mut dev = gw.connect(&token).await;
    expected.push((dev.session_id().into(), "token_rotated"));
    let rotated = api
        .post("/devices/sensor-1/token", &json!({}))
        .await
        .expect(200);
    token = rotated["token"].as_str().expect("new token").to_string();
    assert_eq!(dev.expect_close(CLOSE_WAIT).await.0, 4003);
    offline_with(&api, "sensor-1", "token_rotated").await;

    let mut dev = gw.connect(&token).await;
    expected.push((dev.session_id().into(), "server_shutdown"));
    online(&api, "sensor-1").await;
    // The device reads on, so it answers the gateway's close.
    let closed = tokio::spawn(async move { dev.expect_close(Duration::from_secs(15)).await });
    let gw = gw.restart().await;
    assert_eq!(closed.await.expect("device task").0, 1001);
    let api = gw.api();
    let device = offline_with(&api, "sensor-1", "server_shutdown").await;

    let history = sessions(&api, "sensor-1", 100).await;
    assert_eq!(
        history.len(),
        expected.len(),
        "one session per connection: {history:?}"
    );
    let mut last: Option<Value> = None;
    for (session_id, reason) in &expected {
        let s = session(&api, "sensor-1", session_id).await;
        assert_eq!(s["disconnect_reason"], *reason, "{s}");
        if let Some(prev) = &last {
            assert!(
                time_field(&s, "connected_at") >= time_field(prev, "connected_at"),
                "connected_at out of order: {prev} then {s}"
            );
        }
        last = Some(s);
    }
    let last = last.expect("sessions");
    // last_disconnected_at is the end of the last session.
    assert_near(&device, "last_disconnected_at", &last, "disconnected_at");

    // A new connection is the current session: open, no reason yet; the device keeps its last
    // disconnect reason and time while online.
    let dev = gw.connect(&token).await;
    let device = online(&api, "sensor-1").await;
    let current = session(&api, "sensor-1", dev.session_id()).await;
    assert_eq!(current["disconnected_at"], Value::Null, "{current}");
    assert_eq!(current["disconnect_reason"], Value::Null, "{current}");
    assert_near(&device, "last_connected_at", &current, "connected_at");
    assert_eq!(
        device["last_disconnect_reason"], "server_shutdown",
        "{device}"
    );
    assert_near(&device, "last_disconnected_at", &last, "disconnected_at");
    let ids: HashSet<String> = sessions(&api, "sensor-1", 2)
        .await
        .iter()
        .map(|s| s["session_id"].as_str().expect("session_id").to_string())
        .collect();
    assert_eq!(
        ids.len(),
        expected.len() + 1,
        "pages of 2 list each session once"
    );
}

#[tokio::test]
async fn idle_timeout_is_recorded_in_the_session_history() {
    let gw = Gateway::start(Options::new().args(["--ping-interval", "1s", "--idle-timeout", "3s"]))
        .await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;
    // A raw connection that answers nothing, pings included; its first frame is the welcome.
    let mut raw = gw.connect_request().bearer(&token).send_raw().await;
    let (opcode, welcome) = raw
        .read_frame(Duration::from_secs(5))
        .await
        .expect("a welcome frame");
    assert_eq!(opcode, 0x1, "the welcome is a text frame");
    let welcome: Value = serde_json::from_slice(&welcome).expect("welcome JSON");
    let session_id = welcome["session_id"].as_str().expect("session_id");

    let device = offline_with(&api, "sensor-1", "idle_timeout").await;
    let s = assert_ended(&api, "sensor-1", session_id, "idle_timeout").await;
    assert_near(&device, "last_disconnected_at", &s, "disconnected_at");
}

#[tokio::test]
async fn a_replaced_session_leaves_the_device_online() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;
    let mut first = gw.connect(&token).await;
    online(&api, "sensor-1").await;

    let mut second = gw.connect(&token).await;
    let (code, reason) = first.expect_close(CLOSE_WAIT).await;
    assert_eq!((code, reason.as_str()), (4001, "session replaced"));
    let old = ended_session(&api, "sensor-1", first.session_id()).await;
    assert_eq!(old["disconnect_reason"], "session_replaced");
    let current = session(&api, "sensor-1", second.session_id()).await;
    assert_eq!(current["disconnected_at"], Value::Null, "{current}");

    // The end of the old session must not take the device offline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let device = api.device("sensor-1").await;
    assert_eq!(device["online"], true, "{device}");
    assert_eq!(
        device["last_disconnect_reason"], "session_replaced",
        "{device}"
    );
    assert_near(&device, "last_disconnected_at", &old, "disconnected_at");
    assert_near(&device, "last_connected_at", &current, "connected_at");
    let listed = api.get("/devices?online=true").await.expect(200);
    assert_eq!(listed["items"][0]["id"], "sensor-1", "{listed}");
    second
        .send_acked(&json!({"type": "telemetry", "id": "still-on", "data": {"a": 1}}))
        .await;

    // The newer session ends normally: now the device is offline.
    second.close().await;
    offline_with(&api, "sensor-1", "client_closed").await;
}

#[tokio::test]
async fn last_seen_at_moves_forward_with_any_frame() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;
    let mut dev = gw.connect(&token).await;
    let device = online(&api, "sensor-1").await;
    let connected_at = time_field(&device, "last_connected_at");
    let mut last = if device["last_seen_at"].is_null() {
        connected_at
    } else {
        let seen = time_field(&device, "last_seen_at");
        assert!(seen >= connected_at, "{device}");
        seen
    };

    for what in ["ping", "pong", "unknown-command ack"] {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let before = Utc::now() - chrono::Duration::milliseconds(5);
        match what {
            "ping" => dev.send(Message::Ping(b"hi".to_vec().into())).await,
            "pong" => dev.send(Message::Pong(b"hi".to_vec().into())).await,
            _ => {
                let reply = dev.request(&json!({"type": "ack", "id": "c-none"})).await;
                assert_eq!(reply["code"], "unknown_command", "{reply}");
            }
        }
        let seen = e2e::eventually(
            &format!("last_seen_at to move past {last} after a {what}"),
            STATE_WAIT,
            || async {
                let d = api.device("sensor-1").await;
                let seen = time_field(&d, "last_seen_at");
                (seen > last).then_some(seen)
            },
        )
        .await;
        assert!(
            seen >= before,
            "last_seen_at {seen} earlier than the {what} ({before})"
        );
        assert_close_to_now(seen, Duration::from_secs(5));
        last = seen;
    }

    dev.close().await;
    let device = offline_with(&api, "sensor-1", "client_closed").await;
    let seen = time_field(&device, "last_seen_at");
    assert!(seen >= last, "last_seen_at went back from {last} to {seen}");
    assert!(
        seen <= time_field(&device, "last_disconnected_at"),
        "{device}"
    );

    // It is kept across a restart.
    let gw = gw.restart().await;
    let after = gw.api().device("sensor-1").await;
    assert_eq!(after["last_seen_at"], device["last_seen_at"], "{after}");
    assert_eq!(after["online"], false);
}

#[tokio::test]
async fn after_a_crash_no_device_or_session_is_left_online() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;
    let dev = gw.connect(&token).await;
    let session_id = dev.session_id().to_string();
    online(&api, "sensor-1").await;

    let gw = gw.kill9().await.start().await;
    drop(dev);
    let api = gw.api();
    let device = api.device("sensor-1").await;
    assert_eq!(
        device["online"], false,
        "no socket is open after a restart: {device}"
    );
    let listed = api.get("/devices?online=true").await.expect(200);
    assert_eq!(listed["items"], json!([]), "{listed}");
    // The session the crash cut is in the past, not shown as current.
    let s = session(&api, "sensor-1", &session_id).await;
    assert!(!s["disconnected_at"].is_null(), "{s}");
}

#[tokio::test]
async fn sessions_need_the_api_key_and_a_known_device() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    api.create_device("sensor-1").await;
    assert_eq!(sessions(&api, "sensor-1", 100).await, Vec::<Value>::new());
    assert_api_error(
        &api.with_key(None).get("/devices/sensor-1/sessions").await,
        401,
        "unauthorized",
    );
    assert_api_error(
        &api.with_key(Some("wrong-key"))
            .get("/devices/sensor-1/sessions")
            .await,
        401,
        "unauthorized",
    );
    assert_api_error(&api.get("/devices/nobody/sessions").await, 404, "not_found");
}
