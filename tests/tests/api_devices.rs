//! The operator API for devices: create, read, list, update, delete, token rotation, presence,
//! and what each does to a live session.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use e2e::{assert_api_error, assert_close_to_now, json, time_field, Api, Gateway, Options, Value};

const DEVICE_FIELDS: [&str; 10] = [
    "id",
    "name",
    "metadata",
    "enabled",
    "online",
    "created_at",
    "last_connected_at",
    "last_disconnected_at",
    "last_seen_at",
    "last_disconnect_reason",
];

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn device_fields() -> BTreeSet<String> {
    DEVICE_FIELDS.iter().map(|s| s.to_string()).collect()
}

/// Waits until the device's `online` is `online` and returns the device.
async fn wait_online(api: &Api, id: &str, online: bool) -> Value {
    e2e::eventually(
        &format!("{id} online={online}"),
        Duration::from_secs(5),
        || async {
            let d = api.device(id).await;
            (d["online"] == online).then_some(d)
        },
    )
    .await
}

#[tokio::test]
async fn create_returns_token_and_device() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let metadata = json!({"floor": 2, "tags": ["boiler", "north"], "vendor": {"name": "Acme"}});

    let created = api
        .post(
            "/devices",
            &json!({"id": "sensor-1", "name": "Boiler room", "metadata": metadata}),
        )
        .await
        .expect(201);
    let token = created["token"].as_str().expect("token in 201 body");
    assert!(!token.is_empty());
    assert!(
        keys(&created).is_superset(&device_fields()),
        "create response lacks device fields: {created}"
    );
    assert_eq!(created["id"], "sensor-1");
    assert_eq!(created["name"], "Boiler room");
    assert_eq!(created["metadata"], metadata);
    assert_eq!(created["enabled"], true);
    assert_eq!(created["online"], false);
    assert_close_to_now(time_field(&created, "created_at"), Duration::from_secs(10));
    for never in [
        "last_connected_at",
        "last_disconnected_at",
        "last_seen_at",
        "last_disconnect_reason",
    ] {
        assert_eq!(created[never], Value::Null, "{never} of a new device");
    }

    let got = api.device("sensor-1").await;
    assert_eq!(keys(&got), device_fields(), "GET device {got}");
    for field in DEVICE_FIELDS {
        assert_eq!(got[field], created[field], "{field}: GET vs create");
    }
    // The token is shown only at creation.
    assert!(!api.get("/devices/sensor-1").await.raw.contains(token));
    assert!(!api.get("/devices").await.raw.contains(token));
}

#[tokio::test]
async fn duplicate_id_is_409() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let first = api.create_device("sensor-1").await;

    let resp = api.post("/devices", &json!({"id": "sensor-1"})).await;
    assert_api_error(&resp, 409, "conflict");
    // The first device and its token are untouched.
    gw.connect(&first).await;
}

#[tokio::test]
async fn invalid_ids_are_422_and_valid_edge_ids_are_accepted() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();

    for bad in [
        json!({"id": "bad id!"}),
        json!({"id": ""}),
        json!({"id": "a".repeat(129)}),
        json!({"id": "-leading-dash"}),
        json!({"id": ".leading-dot"}),
        json!({"id": "slash/inside"}),
        json!({"id": "é"}),
        json!({"id": 5}),
        json!({"name": "no id at all"}),
    ] {
        let resp = api.post("/devices", &bad).await;
        assert_api_error(&resp, 422, "invalid");
    }
    let listed = api.get("/devices").await.expect(200);
    assert_eq!(listed["items"], json!([]), "a refused device was created");

    for good in ["a".repeat(128), "A".to_string(), "9a._:-Z".to_string()] {
        api.post("/devices", &json!({"id": good})).await.expect(201);
        assert_eq!(
            api.device(&e2e::api::encode(&good)).await["id"],
            good.as_str()
        );
    }
}

#[tokio::test]
async fn malformed_json_body_is_400() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    api.create_device("sensor-1").await;

    for body in [&b"{\"id\":"[..], b"not json", b"{\"id\": \"x\",}"] {
        assert_api_error(
            &api.post_raw("/devices", body.to_vec()).await,
            400,
            "bad_request",
        );
    }
    let resp = api.patch_raw("/devices/sensor-1", b"{".to_vec()).await;
    assert_api_error(&resp, 400, "bad_request");
}

#[tokio::test]
async fn missing_or_wrong_api_key_is_401() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    api.create_device("sensor-1").await;

    let wrong = e2e::random_token(32);
    for client in [
        api.with_key(None),
        api.with_key(Some(&wrong)),
        api.with_key(Some("")),
    ] {
        assert_api_error(&client.get("/devices").await, 401, "unauthorized");
        assert_api_error(&client.get("/devices/sensor-1").await, 401, "unauthorized");
        assert_api_error(
            &client.post("/devices", &json!({"id": "intruder"})).await,
            401,
            "unauthorized",
        );
        assert_api_error(
            &client.delete("/devices/sensor-1").await,
            401,
            "unauthorized",
        );
    }
    // Nothing an unauthorised client sent took effect.
    assert_api_error(&api.get("/devices/intruder").await, 404, "not_found");
    api.device("sensor-1").await;
}

#[tokio::test]
async fn unknown_device_is_404() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();

    assert_api_error(&api.get("/devices/nope").await, 404, "not_found");
    assert_api_error(
        &api.patch("/devices/nope", &json!({"name": "x"})).await,
        404,
        "not_found",
    );
    assert_api_error(&api.delete("/devices/nope").await, 404, "not_found");
    assert_api_error(
        &api.post("/devices/nope/token", &json!({})).await,
        404,
        "not_found",
    );
}

#[tokio::test]
async fn list_pages_through_every_device_once() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let ids: HashSet<String> = (0..23).map(|i| format!("dev-{i:02}")).collect();
    for id in &ids {
        api.create_device(id).await;
    }

    let all = api.get("/devices").await.expect(200);
    assert_eq!(all["items"].as_array().unwrap().len(), 23);
    assert_eq!(all["next_cursor"], Value::Null);
    for item in all["items"].as_array().unwrap() {
        assert_eq!(keys(item), device_fields(), "list item {item}");
    }

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/devices?limit=5".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", e2e::api::encode(c)));
        }
        let page = api.get(&path).await.expect(200);
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 5, "page of {} with limit=5", items.len());
        seen.extend(items.iter().map(|d| d["id"].as_str().unwrap().to_string()));
        pages += 1;
        assert!(pages <= 10, "paging does not end");
        match &page["next_cursor"] {
            Value::Null => break,
            Value::String(c) => cursor = Some(c.clone()),
            other => panic!("next_cursor {other}"),
        }
    }
    assert_eq!(pages, 5, "23 devices in pages of 5");
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "duplicates across pages: {seen:?}"
    );
    assert_eq!(unique, ids);

    for bad in [
        "limit=abc",
        "limit=-1",
        "online=maybe",
        "cursor=%21%21bogus%21%21",
    ] {
        assert_api_error(
            &api.get(&format!("/devices?{bad}")).await,
            400,
            "bad_request",
        );
    }
}

#[tokio::test]
async fn online_filter_lists_connected_devices() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    api.create_device("a").await;
    let b = api.create_device("b").await;
    api.create_device("c").await;

    let online_ids = || async {
        let page = api.get("/devices?online=true").await.expect(200);
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(online_ids().await.is_empty());

    let dev = gw.connect(&b).await;
    wait_online(&api, "b", true).await;
    assert_eq!(online_ids().await, vec!["b".to_string()]);
    let page = api.get("/devices?online=true").await.expect(200);
    assert_eq!(page["items"][0]["online"], true);

    dev.close().await;
    wait_online(&api, "b", false).await;
    assert!(online_ids().await.is_empty());
}

#[tokio::test]
async fn patch_updates_name_metadata_and_enabled() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    api.post(
        "/devices",
        &json!({"id": "sensor-1", "name": "old", "metadata": {"a": 1}}),
    )
    .await
    .expect(201);

    let updated = api
        .patch("/devices/sensor-1", &json!({"name": "new name"}))
        .await
        .expect(200);
    assert_eq!(keys(&updated), device_fields());
    assert_eq!(updated["name"], "new name");
    assert_eq!(updated["metadata"], json!({"a": 1}), "metadata kept");
    assert_eq!(updated["enabled"], true);

    let updated = api
        .patch(
            "/devices/sensor-1",
            &json!({"metadata": {"b": [true, null]}, "enabled": false}),
        )
        .await
        .expect(200);
    assert_eq!(updated["name"], "new name", "name kept");
    assert_eq!(updated["metadata"], json!({"b": [true, null]}));
    assert_eq!(updated["enabled"], false);

    let got = api.device("sensor-1").await;
    assert_eq!(got, updated, "GET after PATCH");

    assert_api_error(
        &api.patch("/devices/sensor-1", &json!({"enabled": "yes"}))
            .await,
        422,
        "invalid",
    );
    assert_eq!(api.device("sensor-1").await["enabled"], false);
}

#[tokio::test]
async fn disabling_closes_the_live_session_with_4003() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;
    let mut dev = gw.connect(&token).await;

    api.patch("/devices/sensor-1", &json!({"enabled": false}))
        .await
        .expect(200);
    let (code, _) = dev.expect_close(Duration::from_secs(5)).await;
    assert_eq!(code, 4003);
    let device = wait_online(&api, "sensor-1", false).await;
    assert_eq!(device["last_disconnect_reason"], "disabled");
    gw.connect_request()
        .bearer(&token)
        .send()
        .await
        .refusal()
        .assert_error(403, "device_disabled");
}

#[tokio::test]
async fn delete_is_204_then_404_and_closes_the_live_session() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;
    let mut dev = gw.connect(&token).await;

    let resp = api.delete("/devices/sensor-1").await;
    assert_eq!(resp.status, 204, "DELETE: {}", resp.raw);
    assert!(resp.raw.is_empty(), "204 with a body: {}", resp.raw);
    let (code, _) = dev.expect_close(Duration::from_secs(5)).await;
    assert_eq!(code, 4003);

    assert_api_error(&api.get("/devices/sensor-1").await, 404, "not_found");
    assert_api_error(&api.delete("/devices/sensor-1").await, 404, "not_found");
    gw.connect_request()
        .bearer(&token)
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");
    let listed = api.get("/devices").await.expect(200);
    assert_eq!(listed["items"], json!([]));
}

#[tokio::test]
async fn token_rotation_closes_the_live_session_with_4003() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let old = api.create_device("sensor-1").await;
    let mut dev = gw.connect(&old).await;

    let body = api
        .post("/devices/sensor-1/token", &json!({}))
        .await
        .expect(200);
    assert_eq!(keys(&body), BTreeSet::from(["token".to_string()]));
    let new = body["token"].as_str().unwrap();
    assert_ne!(new, old);

    let (code, _) = dev.expect_close(Duration::from_secs(5)).await;
    assert_eq!(code, 4003);
    let device = wait_online(&api, "sensor-1", false).await;
    assert_eq!(device["last_disconnect_reason"], "token_rotated");

    gw.connect_request()
        .bearer(&old)
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");
    let mut dev = gw.connect(new).await;
    dev.send_acked(&json!({"type": "telemetry", "id": "after-rotation", "data": {"a": 1.5}}))
        .await;
}

#[tokio::test]
async fn body_over_1_mib_is_413() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();

    let big = json!({"id": "big", "metadata": {"blob": "x".repeat(1_100_000)}});
    let resp = api.post("/devices", &big).await;
    assert_api_error(&resp, 413, "too_large");
    assert_api_error(&api.get("/devices/big").await, 404, "not_found");
    // Just under the limit is fine.
    let fits = json!({"id": "fits", "metadata": {"blob": "x".repeat(1_000_000)}});
    api.post("/devices", &fits).await.expect(201);
}

#[tokio::test]
async fn health_endpoints_need_no_auth() {
    let gw = Gateway::start(Options::new()).await;
    let anonymous = gw.api().with_key(None);
    for path in ["/healthz", "/readyz"] {
        let resp = anonymous.get_root(path).await;
        assert_eq!(resp.status, 200, "GET {path}: {}", resp.raw);
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text_without_auth() {
    let gw = Gateway::start(Options::new()).await;
    let resp = gw.api().with_key(None).get_root("/metrics").await;
    assert_eq!(resp.status, 200, "GET /metrics: {}", resp.raw);
    let content_type = resp
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain"),
        "/metrics Content-Type {content_type:?}"
    );
    assert!(
        resp.raw.lines().any(|l| l.starts_with("# TYPE ")),
        "no Prometheus # TYPE line in /metrics:\n{}",
        resp.raw
    );
}

#[tokio::test]
async fn presence_follows_the_connection() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;

    let before = api.device("sensor-1").await;
    assert_eq!(before["online"], false);
    assert_eq!(before["last_connected_at"], Value::Null);

    let mut dev = gw.connect(&token).await;
    let session_id = dev.session_id().to_string();
    let online = wait_online(&api, "sensor-1", true).await;
    let connected_at = time_field(&online, "last_connected_at");
    assert_close_to_now(connected_at, Duration::from_secs(5));
    dev.send_acked(&json!({"type": "telemetry", "id": "p-1", "data": {"a": 1.5}}))
        .await;
    let seen = api.device("sensor-1").await;
    let seen_at = time_field(&seen, "last_seen_at");
    assert!(
        seen_at >= connected_at,
        "last_seen_at {seen_at} before connect {connected_at}"
    );
    assert_close_to_now(seen_at, Duration::from_secs(5));

    dev.close().await;
    let offline = wait_online(&api, "sensor-1", false).await;
    let disconnected_at = time_field(&offline, "last_disconnected_at");
    assert!(disconnected_at >= connected_at);
    assert_close_to_now(disconnected_at, Duration::from_secs(5));
    assert_eq!(offline["last_connected_at"], online["last_connected_at"]);
    assert_eq!(offline["last_disconnect_reason"], "client_closed");

    let sessions = api.get("/devices/sensor-1/sessions").await.expect(200);
    let session = sessions["items"]
        .as_array()
        .expect("sessions items")
        .iter()
        .find(|s| s["session_id"] == session_id.as_str())
        .unwrap_or_else(|| panic!("session {session_id} not in {sessions}"));
    assert_eq!(session["auth"], "token");
    let remote = session["remote_addr"].as_str().unwrap_or_default();
    assert!(remote.starts_with("127.0.0.1"), "remote_addr {remote:?}");
    assert_eq!(session["disconnect_reason"], "client_closed");
    let near = |a: chrono::DateTime<chrono::Utc>, b: chrono::DateTime<chrono::Utc>| {
        (a - b).num_milliseconds().abs() <= 1000
    };
    assert!(
        near(time_field(session, "connected_at"), connected_at),
        "{session}"
    );
    assert!(
        near(time_field(session, "disconnected_at"), disconnected_at),
        "{session}"
    );
}
