//! What operators watch: `/metrics` counts what happened (connections, handshakes by outcome,
//! messages by type, acks, rejections by reason, batch and commit histograms, commands by
//! status, SSE clients), and JSON logs carry a span per connection with the device id once
//! known, and never a token or the API key.

use std::collections::HashMap;
use std::time::Duration;

use e2e::{eventually, json, Gateway, Options, Value};

/// The samples of a Prometheus text page: `name{labels}` -> value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn sample(all: &HashMap<String, f64>, series: &str) -> f64 {
    *all.get(series)
        .unwrap_or_else(|| panic!("no sample `{series}` in /metrics: {:?}", all.keys()))
}

#[tokio::test]
async fn metrics_count_connections_handshakes_messages_rejections_commits_commands_and_sse() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;
    let mut dev = gw.connect(&token).await;
    gw.connect_request()
        .bearer("not-a-token")
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");
    for n in 0..3 {
        let ack = dev
            .request(&json!({"type": "telemetry", "id": format!("m-{n}"), "data": {"n": n}}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let refused = dev
        .request(&json!({"type": "telemetry", "id": "bad"}))
        .await;
    assert_eq!(refused["type"], "error", "{refused}");
    api.post("/devices/sensor-1/commands", &json!({"name": "ping"}))
        .await
        .expect(201);
    let _events = e2e::sse::open(&gw.api_url, Some(&gw.api_key), "", None)
        .await
        .unwrap_or_else(|r| panic!("GET /v1/events: {} {}", r.status, r.raw));

    let metrics = gw.api().with_key(None).get_root("/metrics").await;
    assert_eq!(metrics.status, 200);
    let all = samples(&metrics.raw);
    assert_eq!(sample(&all, "gateway_connections"), 1.0);
    assert_eq!(
        sample(&all, r#"gateway_handshakes_total{outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        sample(&all, r#"gateway_handshakes_total{outcome="unauthorized"}"#),
        1.0
    );
    assert_eq!(
        sample(&all, r#"gateway_messages_total{type="telemetry"}"#),
        3.0
    );
    assert_eq!(
        sample(&all, r#"gateway_messages_total{type="invalid"}"#),
        1.0
    );
    assert_eq!(sample(&all, "gateway_telemetry_acks_total"), 3.0);
    assert_eq!(
        sample(
            &all,
            r#"gateway_rejections_total{reason="invalid_message"}"#
        ),
        1.0
    );
    // Three committed telemetry rows, in however many batches (session records ride too).
    assert!(
        sample(&all, "gateway_batch_rows_sum") >= 3.0,
        "{}",
        metrics.raw
    );
    assert!(sample(&all, "gateway_batch_rows_count") >= 1.0);
    assert!(sample(&all, "gateway_commit_seconds_count") >= 1.0);
    assert!(sample(&all, r#"gateway_commit_seconds_bucket{le="+Inf"}"#) >= 1.0);
    assert!(sample(&all, r#"gateway_commands_total{status="queued"}"#) >= 1.0);
    assert_eq!(sample(&all, "gateway_sse_clients"), 1.0);

    // The device answers nothing, so the command stays sent; closing counts a disconnect.
    dev.close().await;
    eventually("the disconnect counted", Duration::from_secs(5), || async {
        let all = samples(&gw.api().with_key(None).get_root("/metrics").await.raw);
        (all.get("gateway_connections") == Some(&0.0)
            && all.get(r#"gateway_disconnects_total{reason="client_closed"}"#) == Some(&1.0))
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn json_logs_carry_a_span_per_connection_and_no_secrets() {
    let gw = Gateway::start(
        Options::new()
            .args(["--log-format", "json"])
            .env("RUST_LOG", "gateway=debug"),
    )
    .await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;
    let mut dev = gw.connect(&token).await;
    let ack = dev
        .request(&json!({"type": "telemetry", "id": "m-1", "data": {"temp": 1}}))
        .await;
    assert_eq!(ack["type"], "ack");
    dev.close().await;
    gw.connect_request()
        .query(&format!("token={token}"))
        .send()
        .await
        .refusal()
        .assert_error(400, "bad_request");
    gw.connect_request()
        .bearer(&format!("{token}x"))
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");

    let lines = eventually("the disconnect logged", Duration::from_secs(5), || async {
        let stderr = gw.stderr();
        stderr
            .contains("device disconnected")
            .then(|| stderr.lines().map(str::to_owned).collect::<Vec<_>>())
    })
    .await;
    let mut records = Vec::new();
    for line in &lines {
        let record: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        assert!(
            record["timestamp"].is_string() && record["level"].is_string(),
            "{line}"
        );
        records.push(record);
    }
    for message in ["device connected", "device disconnected"] {
        let record = records
            .iter()
            .find(|r| r["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no `{message}` record in:\n{}", lines.join("\n")));
        let span = &record["span"];
        assert_eq!(span["name"], "conn", "{record}");
        assert_eq!(span["device_id"], "sensor-1", "{record}");
        assert_eq!(span["auth"], "token", "{record}");
        assert!(
            span["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{record}"
        );
        assert!(
            span["session_id"].as_str().is_some_and(|s| !s.is_empty()),
            "{record}"
        );
    }
    let refusals: Vec<&Value> = records
        .iter()
        .filter(|r| r["fields"]["message"] == "upgrade refused")
        .collect();
    let statuses: Vec<&Value> = refusals.iter().map(|r| &r["fields"]["status"]).collect();
    assert_eq!(statuses, [400, 401], "{refusals:?}");
    assert!(
        refusals.iter().all(|r| r["span"]["device_id"].is_null()),
        "{refusals:?}"
    );

    let all = lines.join("\n");
    assert!(
        !all.contains(&token),
        "a device token was logged (sent in a header, a query string and wrong)"
    );
    assert!(!all.contains(&gw.api_key), "the API key was logged");
}
