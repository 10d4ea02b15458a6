//! A device session after the upgrade: the welcome, replacement by a newer connection, keepalive.

use std::time::Duration;

use e2e::{assert_close_to_now, json, time_field, Event, Gateway, Options};

#[tokio::test]
async fn welcome_has_session_time_and_default_limits() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;

    let dev = gw.connect(&token).await;
    let w = &dev.welcome.clone();
    assert_eq!(w["type"], "welcome", "first message {w}");
    assert_eq!(w["device_id"], "sensor-1");
    let session = w["session_id"].as_str().expect("session_id is a string");
    assert_eq!(dev.session_id(), session);
    assert!(!session.is_empty(), "empty session_id");
    assert_close_to_now(time_field(w, "server_time"), Duration::from_secs(5));
    assert_eq!(w["limits"]["max_message_bytes"], 65536, "welcome {w}");
    assert_eq!(w["limits"]["telemetry_per_sec"], 100, "welcome {w}");

    // Each connection is a new session.
    dev.close().await;
    let again = gw.connect(&token).await;
    assert_ne!(again.session_id(), session);
}

#[tokio::test]
async fn welcome_limits_reflect_flags() {
    let gw = Gateway::start(Options::new().args([
        "--max-message-bytes",
        "4096",
        "--telemetry-rate",
        "7",
        "--telemetry-burst",
        "9",
    ]))
    .await;
    let token = gw.create_device("sensor-1").await;

    let dev = gw.connect(&token).await;
    assert_eq!(dev.welcome["limits"]["max_message_bytes"], 4096);
    assert_eq!(dev.welcome["limits"]["telemetry_per_sec"], 7);
}

#[tokio::test]
async fn newer_connection_replaces_the_older_with_4001() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;

    let mut first = gw.connect(&token).await;
    let first_session = first.session_id().to_string();
    let mut second = gw.connect(&token).await;
    let (code, reason) = first.expect_close(Duration::from_secs(5)).await;
    assert_eq!(code, 4001, "close code of the replaced session");
    assert_eq!(reason, "session replaced");

    second
        .send_acked(&json!({"type": "telemetry", "id": "after-replace", "data": {"x": 1.5}}))
        .await;
    let device = gw.api().device("sensor-1").await;
    assert_eq!(
        device["online"], true,
        "the newer session is still connected"
    );
    let api = gw.api();
    let old = e2e::eventually(
        "the replaced session to be recorded as ended",
        Duration::from_secs(5),
        || async {
            let sessions = api.get("/devices/sensor-1/sessions").await.expect(200);
            let old = sessions["items"]
                .as_array()
                .expect("sessions items")
                .iter()
                .find(|s| s["session_id"] == first_session.as_str())
                .unwrap_or_else(|| panic!("replaced session missing from {sessions}"))
                .clone();
            (!old["disconnected_at"].is_null()).then_some(old)
        },
    )
    .await;
    assert_eq!(old["disconnect_reason"], "session_replaced", "{old}");
}

#[tokio::test]
async fn answering_pings_keeps_an_idle_device_connected() {
    let gw = Gateway::start(Options::new().args(["--ping-interval", "1s", "--idle-timeout", "3s"]))
        .await;
    let token = gw.create_device("sensor-1").await;
    let mut dev = gw.connect(&token).await;

    // Reading lets tungstenite answer each ping with a pong; the device sends nothing else.
    match dev.next_event(Duration::from_secs(5)).await {
        Event::Timeout => {}
        other => panic!("an idle device answering pings was disturbed: {other:?}"),
    }
    dev.send_acked(&json!({"type": "telemetry", "id": "still-here", "data": {"x": 1.5}}))
        .await;
}

#[tokio::test]
async fn silent_device_is_closed_with_4008() {
    let gw = Gateway::start(Options::new().args(["--ping-interval", "1s", "--idle-timeout", "3s"]))
        .await;
    let token = gw.create_device("sensor-1").await;

    // A raw connection that never answers anything, pings included.
    let mut raw = gw.connect_request().bearer(&token).send_raw().await;
    let started = std::time::Instant::now();
    let mut pings = 0;
    let code = loop {
        match raw.read_frame(Duration::from_secs(10)).await {
            Some((0x9, _)) => pings += 1,
            Some((0x8, payload)) => {
                assert!(payload.len() >= 2, "close frame without a code");
                break u16::from_be_bytes([payload[0], payload[1]]);
            }
            Some(_) => continue,
            None => panic!("connection ended without a close frame"),
        }
    };
    let waited = started.elapsed();
    assert_eq!(code, 4008, "close code for an idle device");
    assert!(pings >= 1, "the gateway never pinged (ping interval 1s)");
    assert!(
        waited >= Duration::from_millis(2500) && waited <= Duration::from_secs(8),
        "closed after {waited:?} with a 3s idle timeout"
    );

    let api = gw.api();
    let device = e2e::eventually("device offline", Duration::from_secs(5), || async {
        let d = api.device("sensor-1").await;
        (d["online"] == false).then_some(d)
    })
    .await;
    assert_eq!(device["last_disconnect_reason"], "idle_timeout");
}

#[tokio::test]
async fn settings_merge_flags_over_environment_over_toml_file() {
    let conf = tempfile::tempdir().expect("tempdir");
    let file = conf.path().join("gateway.toml");
    std::fs::write(
        &file,
        "max_message_bytes = 2048\ntelemetry_rate = 5\ntelemetry_burst = 5\n",
    )
    .expect("write config");
    let gw = Gateway::start(
        Options::new()
            .args(["--config", file.to_str().expect("utf-8 path")])
            .args(["--max-message-bytes", "3000"])
            .env("GATEWAY_MAX_MESSAGE_BYTES", "2500")
            .env("GATEWAY_TELEMETRY_RATE", "6"),
    )
    .await;
    let token = gw.create_device("sensor-1").await;
    let dev = gw.connect(&token).await;
    // flag (3000) beats environment (2500) beats file (2048)
    assert_eq!(dev.welcome["limits"]["max_message_bytes"], 3000);
    // environment (6) beats file (5)
    assert_eq!(dev.welcome["limits"]["telemetry_per_sec"], 6);
}

#[tokio::test]
async fn an_invalid_setting_stops_the_start_and_names_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(e2e::gateway::gateway_bin())
        .current_dir(dir.path())
        .args([
            "serve",
            "--device-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
        ])
        .args(["--ping-interval", "30s", "--idle-timeout", "10s"])
        .output()
        .expect("run the gateway");
    assert!(!out.status.success(), "it must not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("idle_timeout"), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "no listening line: {:?}", out.stdout);
}
