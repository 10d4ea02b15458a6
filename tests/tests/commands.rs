//! Commands end to end: every status and its timestamps, order and window, redelivery after a
//! reconnect and a restart, expiry, timeout, cancel, `wait_s`, idempotency, the bounded queue,
//! listing, and what a device may and may not answer.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use e2e::commands::{
    ack, answer, assert_command_shape, assert_silent, create, create_named, expect_unknown_command,
    get, id_of, keys, list, list_ids, recv_command, wait_status,
};
use e2e::{assert_api_error, assert_close_to_now, json, time_field, Api, Gateway, Options, Value};

/// Long enough for a command that should not come to have come.
const QUIET: Duration = Duration::from_millis(700);

/// Parses any RFC 3339 time (the device message need not carry milliseconds).
#[track_caller]
fn rfc3339(v: &Value, field: &str) -> DateTime<Utc> {
    let s = v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {v}"));
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{field} {s:?} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

/// Asserts a command message sent again is the same command as the first time.
#[track_caller]
fn assert_same_command(again: &Value, first: &Value) {
    for field in ["type", "id", "name", "params"] {
        assert_eq!(again[field], first[field], "{field}: {again} vs {first}");
    }
    assert_eq!(
        rfc3339(again, "expires_at"),
        rfc3339(first, "expires_at"),
        "{again} vs {first}"
    );
}

/// A gateway with one device `sensor-1`; returns it and the device's token.
async fn gateway_with_device(opts: Options) -> (Gateway, Api, String) {
    let gw = Gateway::start(opts).await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;
    (gw, api, token)
}

#[tokio::test]
async fn command_goes_sent_delivered_succeeded_with_each_timestamp() {
    let (gw, api, token) = gateway_with_device(Options::new()).await;
    let mut dev = gw.connect(&token).await;

    let created = create(
        &api,
        "sensor-1",
        &json!({"name": "reboot", "params": {"delay_s": 5}}),
    )
    .await;
    let id = id_of(&created);
    assert_eq!(created["device_id"], "sensor-1");
    assert_eq!(created["name"], "reboot");
    assert_eq!(created["params"], json!({"delay_s": 5}));
    assert!(
        matches!(created["status"].as_str(), Some("queued" | "sent")),
        "status of a new command for an online device: {created}"
    );
    let created_at = time_field(&created, "created_at");
    assert_close_to_now(created_at, Duration::from_secs(5));
    let expires_at = time_field(&created, "expires_at");
    let ttl = (expires_at - created_at).num_milliseconds();
    assert!(
        (3_599_000..=3_601_000).contains(&ttl),
        "default ttl_s is 3600; expires_at - created_at = {ttl} ms: {created}"
    );
    assert_eq!(created["timeout_s"], 30, "default timeout_s: {created}");
    for empty in [
        "delivered_at",
        "completed_at",
        "result",
        "error",
        "idempotency_key",
    ] {
        assert_eq!(created[empty], Value::Null, "{empty} of a new command");
    }

    let msg = recv_command(&mut dev).await;
    for field in ["type", "id", "name", "params", "expires_at"] {
        assert!(keys(&msg).contains(field), "{field} missing in {msg}");
    }
    assert_eq!(msg["id"], id.as_str());
    assert_eq!(msg["name"], "reboot");
    assert_eq!(msg["params"], json!({"delay_s": 5}));
    assert_eq!(
        rfc3339(&msg, "expires_at"),
        expires_at,
        "{msg} vs {created}"
    );

    let sent = wait_status(&api, &id, "sent").await;
    let sent_at = time_field(&sent, "sent_at");
    assert!(sent_at >= created_at, "sent_at before created_at: {sent}");
    assert_eq!(sent["delivered_at"], Value::Null, "{sent}");
    assert_eq!(sent["completed_at"], Value::Null, "{sent}");

    // An ack of a command is a receipt; the gateway does not answer it.
    ack(&mut dev, &id).await;
    let delivered = wait_status(&api, &id, "delivered").await;
    assert_silent(&mut dev, QUIET).await;
    let delivered_at = time_field(&delivered, "delivered_at");
    assert!(delivered_at >= sent_at, "{delivered}");
    assert_eq!(delivered["sent_at"], sent["sent_at"]);
    assert_eq!(delivered["completed_at"], Value::Null, "{delivered}");

    answer(
        &mut dev,
        &id,
        "succeeded",
        json!({"result": {"uptime_s": 12}}),
    )
    .await;
    // The ack promises the result is stored: no polling.
    let done = get(&api, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], json!({"uptime_s": 12}));
    assert_eq!(done["error"], Value::Null);
    assert_eq!(done["sent_at"], sent["sent_at"]);
    assert_eq!(done["delivered_at"], delivered["delivered_at"]);
    assert_eq!(done["created_at"], created["created_at"]);
    let completed_at = time_field(&done, "completed_at");
    assert!(completed_at >= delivered_at, "{done}");
    assert_close_to_now(completed_at, Duration::from_secs(5));
}

#[tokio::test]
async fn failed_and_rejected_results_keep_the_error_and_count_as_receipt() {
    let (gw, api, token) = gateway_with_device(Options::new()).await;
    let mut dev = gw.connect(&token).await;
    let fail = create_named(&api, "sensor-1", "format").await;
    let reject = create_named(&api, "sensor-1", "self-destruct").await;
    assert_eq!(id_of(&recv_command(&mut dev).await), fail);
    assert_eq!(id_of(&recv_command(&mut dev).await), reject);

    // A result without an ack first: it is the receipt as well.
    answer(&mut dev, &fail, "failed", json!({"error": "disk full"})).await;
    let failed = get(&api, &fail).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"], "disk full");
    assert_eq!(failed["result"], Value::Null);
    let delivered_at = time_field(&failed, "delivered_at");
    assert!(delivered_at >= time_field(&failed, "sent_at"), "{failed}");
    assert!(
        time_field(&failed, "completed_at") >= delivered_at,
        "{failed}"
    );

    ack(&mut dev, &reject).await;
    wait_status(&api, &reject, "delivered").await;
    answer(
        &mut dev,
        &reject,
        "rejected",
        json!({"error": "unknown command"}),
    )
    .await;
    let rejected = get(&api, &reject).await;
    assert_eq!(rejected["status"], "rejected", "{rejected}");
    assert_eq!(rejected["error"], "unknown command");
    time_field(&rejected, "completed_at");
}

#[tokio::test]
async fn params_default_to_an_empty_object_and_ttl_and_timeout_are_kept() {
    let (gw, api, token) = gateway_with_device(Options::new()).await;
    let cmd = create(
        &api,
        "sensor-1",
        &json!({"name": "ping", "ttl_s": 120, "timeout_s": 7}),
    )
    .await;
    assert_eq!(cmd["params"], json!({}));
    assert_eq!(cmd["status"], "queued", "device offline: {cmd}");
    assert_eq!(cmd["sent_at"], Value::Null);
    assert_eq!(cmd["timeout_s"], 7);
    let ttl = (time_field(&cmd, "expires_at") - time_field(&cmd, "created_at")).num_milliseconds();
    assert!((119_000..=121_000).contains(&ttl), "ttl_s 120: {cmd}");

    let mut dev = gw.connect(&token).await;
    let msg = recv_command(&mut dev).await;
    assert_eq!(msg["params"], json!({}), "{msg}");
    let sent = wait_status(&api, &id_of(&cmd), "sent").await;
    assert!(time_field(&sent, "sent_at") >= time_field(&sent, "created_at"));
    assert_eq!(sent["timeout_s"], 7);
    assert_eq!(sent["expires_at"], cmd["expires_at"]);
}

#[tokio::test]
async fn commands_arrive_in_creation_order_at_most_eight_in_flight() {
    let (gw, api, token) = gateway_with_device(Options::new()).await;
    let mut ids = Vec::new();
    for n in 0..10 {
        let cmd = create(
            &api,
            "sensor-1",
            &json!({"name": "step", "params": {"n": n}}),
        )
        .await;
        assert_eq!(cmd["status"], "queued", "device offline: {cmd}");
        ids.push(id_of(&cmd));
    }

    let mut dev = gw.connect(&token).await;
    for (n, id) in ids.iter().enumerate().take(8) {
        let msg = recv_command(&mut dev).await;
        assert_eq!(msg["id"], id.as_str(), "command #{n} out of order: {msg}");
        assert_eq!(msg["params"], json!({"n": n}));
    }
    assert_silent(&mut dev, QUIET).await;
    assert_eq!(list(&api, "sensor-1", "?status=sent").await.len(), 8);
    let mut queued = list_ids(&api, "sensor-1", "?status=queued").await;
    queued.sort();
    let mut want = ids[8..].to_vec();
    want.sort();
    assert_eq!(queued, want, "the two past the window stay queued");

    // A delivered command still holds its slot until it is final.
    ack(&mut dev, &ids[0]).await;
    wait_status(&api, &ids[0], "delivered").await;
    assert_silent(&mut dev, QUIET).await;

    answer(&mut dev, &ids[0], "succeeded", json!({})).await;
    assert_eq!(id_of(&recv_command(&mut dev).await), ids[8]);
    assert_silent(&mut dev, QUIET).await;
    answer(&mut dev, &ids[1], "failed", json!({"error": "no"})).await;
    assert_eq!(id_of(&recv_command(&mut dev).await), ids[9]);
    assert_silent(&mut dev, QUIET).await;
}

#[tokio::test]
async fn command_window_flag_sets_how_many_are_in_flight() {
    let (gw, api, token) =
        gateway_with_device(Options::new().args(["--command-window", "2"])).await;
    let mut dev = gw.connect(&token).await;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(create_named(&api, "sensor-1", &format!("c{n}")).await);
    }
    assert_eq!(id_of(&recv_command(&mut dev).await), ids[0]);
    assert_eq!(id_of(&recv_command(&mut dev).await), ids[1]);
    assert_silent(&mut dev, QUIET).await;
    assert_eq!(get(&api, &ids[2]).await["status"], "queued");

    answer(&mut dev, &ids[1], "succeeded", json!({})).await;
    assert_eq!(id_of(&recv_command(&mut dev).await), ids[2]);
    assert_silent(&mut dev, QUIET).await;
    answer(&mut dev, &ids[0], "succeeded", json!({})).await;
    assert_eq!(id_of(&recv_command(&mut dev).await), ids[3]);
}

#[tokio::test]
async fn sent_but_unacked_command_is_sent_again_on_reconnect() {
    let (gw, api, token) = gateway_with_device(Options::new()).await;
    let mut dev = gw.connect(&token).await;
    let acked = create(&api, "sensor-1", &json!({"name": "a", "params": {"k": 1}})).await;
    let unacked = create(&api, "sensor-1", &json!({"name": "b", "params": {"k": 2}})).await;
    let first_a = recv_command(&mut dev).await;
    let first_b = recv_command(&mut dev).await;
    assert_eq!(first_a["id"], acked["id"]);
    assert_eq!(first_b["id"], unacked["id"]);
    ack(&mut dev, &id_of(&acked)).await;
    wait_status(&api, &id_of(&acked), "delivered").await;
    dev.close().await;

    let mut dev = gw.connect(&token).await;
    let again = recv_command(&mut dev).await;
    assert_same_command(&again, &first_b);
    // The acked one is with the device already.
    assert_silent(&mut dev, QUIET).await;
    assert_eq!(get(&api, &id_of(&acked)).await["status"], "delivered");
    assert_eq!(get(&api, &id_of(&unacked)).await["status"], "sent");

    ack(&mut dev, &id_of(&unacked)).await;
    wait_status(&api, &id_of(&unacked), "delivered").await;
    answer(&mut dev, &id_of(&acked), "succeeded", json!({})).await;
    answer(&mut dev, &id_of(&unacked), "succeeded", json!({})).await;
}

#[tokio::test]
async fn a_replacing_connection_gets_the_unacked_command_of_the_replaced_one() {
    let (gw, api, token) = gateway_with_device(Options::new()).await;
    let mut first = gw.connect(&token).await;
    let id = create_named(&api, "sensor-1", "reboot").await;
    assert_eq!(id_of(&recv_command(&mut first).await), id);

    let mut second = gw.connect(&token).await;
    let (code, _) = first.expect_close(Duration::from_secs(5)).await;
    assert_eq!(code, 4001);
    let msg = recv_command(&mut second).await;
    assert_eq!(msg["id"], id.as_str());
    answer(&mut second, &id, "succeeded", json!({})).await;
    assert_eq!(get(&api, &id).await["status"], "succeeded");
}

#[tokio::test]
async fn queued_and_unacked_commands_survive_a_gateway_restart() {
    let (gw, api, token) =
        gateway_with_device(Options::new().args(["--command-window", "1"])).await;
    let mut dev = gw.connect(&token).await;
    let done = create_named(&api, "sensor-1", "done").await;
    assert_eq!(id_of(&recv_command(&mut dev).await), done);
    answer(&mut dev, &done, "succeeded", json!({"v": 1})).await;
    let done_before = get(&api, &done).await;

    let sent = create_named(&api, "sensor-1", "sent").await;
    let queued = create_named(&api, "sensor-1", "queued").await;
    let sent_msg = recv_command(&mut dev).await;
    assert_eq!(id_of(&sent_msg), sent);
    let sent_before = wait_status(&api, &sent, "sent").await;
    assert_eq!(get(&api, &queued).await["status"], "queued");

    // The device reads on, so it answers the gateway's close.
    let closed = tokio::spawn(async move { dev.expect_close(Duration::from_secs(15)).await });
    let gw = gw.restart().await;
    assert_eq!(closed.await.expect("device task").0, 1001);
    let api = gw.api();
    assert_eq!(
        get(&api, &done).await,
        done_before,
        "a final command after restart"
    );
    assert_eq!(
        get(&api, &sent).await,
        sent_before,
        "a sent command after restart"
    );
    assert_eq!(get(&api, &queued).await["status"], "queued");

    let mut dev = gw.connect(&token).await;
    assert_same_command(&recv_command(&mut dev).await, &sent_msg);
    assert_silent(&mut dev, QUIET).await;
    answer(&mut dev, &sent, "succeeded", json!({})).await;
    assert_eq!(id_of(&recv_command(&mut dev).await), queued);
    answer(&mut dev, &queued, "succeeded", json!({})).await;
    assert_eq!(get(&api, &queued).await["status"], "succeeded");
}

#[tokio::test]
async fn a_crash_loses_no_created_command() {
    let (gw, api, token) = gateway_with_device(Options::new()).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(create_named(&api, "sensor-1", &format!("c{n}")).await);
    }
    let gw = gw.kill9().await.start().await;
    let api = gw.api();
    for id in &ids {
        assert_eq!(get(&api, id).await["status"], "queued");
    }
    let mut dev = gw.connect(&token).await;
    for id in &ids {
        assert_eq!(id_of(&recv_command(&mut dev).await), *id);
    }
}

#[tokio::test]
async fn a_command_not_delivered_in_time_expires() {
    let (gw, api, token) = gateway_with_device(Options::new()).await;

    // Offline the whole time: the timer expires it, no connection needed.
    let offline = create(&api, "sensor-1", &json!({"name": "late", "ttl_s": 1})).await;
    let expires_at = time_field(&offline, "expires_at");
    let ttl = (expires_at - time_field(&offline, "created_at")).num_milliseconds();
    assert!((900..=1100).contains(&ttl), "ttl_s 1: {offline}");
    let expired = wait_status(&api, &id_of(&offline), "expired").await;
    assert_eq!(expired["sent_at"], Value::Null);
    assert_eq!(expired["delivered_at"], Value::Null);
    let completed_at = time_field(&expired, "completed_at");
    assert!(
        completed_at >= expires_at - chrono::Duration::milliseconds(50),
        "completed before it expired: {expired}"
    );
    assert_close_to_now(completed_at, Duration::from_secs(5));

    // Sent but never acked: it expires too, and is not sent again.
    let mut dev = gw.connect(&token).await;
    assert_silent(&mut dev, QUIET).await;
    let unacked = create(&api, "sensor-1", &json!({"name": "unacked", "ttl_s": 1})).await;
    let id = id_of(&unacked);
    assert_eq!(id_of(&recv_command(&mut dev).await), id);
    let expired = wait_status(&api, &id, "expired").await;
    time_field(&expired, "sent_at");
    assert_eq!(expired["delivered_at"], Value::Null);
    dev.close().await;
    let mut dev = gw.connect(&token).await;
    assert_silent(&mut dev, QUIET).await;

    // A late result is acked and changes nothing.
    answer(
        &mut dev,
        &id,
        "succeeded",
        json!({"result": {"late": true}}),
    )
    .await;
    assert_eq!(get(&api, &id).await, expired);
}

#[tokio::test]
async fn a_delivered_command_without_result_times_out_not_expires() {
    let (gw, api, token) =
        gateway_with_device(Options::new().args(["--command-window", "1"])).await;
    let mut dev = gw.connect(&token).await;
    let slow = create(
        &api,
        "sensor-1",
        &json!({"name": "slow", "ttl_s": 1, "timeout_s": 2}),
    )
    .await;
    let next = create_named(&api, "sensor-1", "next").await;
    let id = id_of(&slow);
    assert_eq!(id_of(&recv_command(&mut dev).await), id);
    ack(&mut dev, &id).await;
    let delivered = wait_status(&api, &id, "delivered").await;
    assert_silent(&mut dev, Duration::from_millis(1300)).await;
    // Past expires_at: a delivered command does not expire.
    assert_eq!(get(&api, &id).await["status"], "delivered");

    // Timing out frees the slot.
    let msg = recv_command(&mut dev).await;
    assert_eq!(id_of(&msg), next);
    let timed_out = wait_status(&api, &id, "timed_out").await;
    let waited = time_field(&timed_out, "completed_at") - time_field(&delivered, "delivered_at");
    assert!(
        (1900..=5000).contains(&waited.num_milliseconds()),
        "timed out {waited} after delivery with timeout_s 2: {timed_out}"
    );
    assert_eq!(timed_out["result"], Value::Null);

    answer(
        &mut dev,
        &id,
        "succeeded",
        json!({"result": {"late": true}}),
    )
    .await;
    assert_eq!(
        get(&api, &id).await,
        timed_out,
        "a late result changes nothing"
    );
}

#[tokio::test]
async fn wait_s_returns_201_as_soon_as_the_command_is_final() {
    let (gw, api, token) = gateway_with_device(Options::new()).await;
    let mut dev = gw.connect(&token).await;
    let device = tokio::spawn(async move {
        let msg = recv_command(&mut dev).await;
        answer(
            &mut dev,
            &id_of(&msg),
            "succeeded",
            json!({"result": {"ok": 1}}),
        )
        .await;
        dev
    });
    let started = Instant::now();
    let resp = api
        .post(
            "/devices/sensor-1/commands",
            &json!({"name": "quick", "wait_s": 10}),
        )
        .await;
    let took = started.elapsed();
    let cmd = resp.expect(201);
    assert_command_shape(&cmd);
    assert_eq!(cmd["status"], "succeeded", "{cmd}");
    assert_eq!(cmd["result"], json!({"ok": 1}));
    assert!(took < Duration::from_secs(5), "returned after {took:?}");
    device.await.expect("device task");
}

#[tokio::test]
async fn wait_s_ends_with_202_and_the_status_so_far() {
    let (gw, api, token) = gateway_with_device(Options::new()).await;

    // Offline: still queued when the wait ends.
    let started = Instant::now();
    let resp = api
        .post(
            "/devices/sensor-1/commands",
            &json!({"name": "nobody", "wait_s": 1}),
        )
        .await;
    let took = started.elapsed();
    let cmd = resp.expect(202);
    assert_command_shape(&cmd);
    assert_eq!(cmd["status"], "queued", "{cmd}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "wait_s 1 returned after {took:?}"
    );

    // Online, acked but never answered: delivered when the wait ends.
    let mut dev = gw.connect(&token).await;
    assert_eq!(id_of(&recv_command(&mut dev).await), id_of(&cmd));
    let poster = api.clone();
    let post = tokio::spawn(async move {
        poster
            .post(
                "/devices/sensor-1/commands",
                &json!({"name": "silent", "wait_s": 2}),
            )
            .await
    });
    let msg = recv_command(&mut dev).await;
    ack(&mut dev, &id_of(&msg)).await;
    let cmd = post.await.expect("POST task").expect(202);
    assert_eq!(cmd["id"], msg["id"]);
    assert_eq!(cmd["status"], "delivered", "{cmd}");

    // wait_s 0 is no wait at all.
    let started = Instant::now();
    api.post(
        "/devices/sensor-1/commands",
        &json!({"name": "no-wait", "wait_s": 0}),
    )
    .await
    .expect(201);
    assert!(started.elapsed() < Duration::from_millis(900));
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_command_with_200() {
    let (gw, api, token) = gateway_with_device(Options::new()).await;
    api.create_device("sensor-2").await;
    let first = create(
        &api,
        "sensor-1",
        &json!({"name": "reboot", "params": {"n": 1}, "idempotency_key": "k-1"}),
    )
    .await;
    assert_eq!(first["idempotency_key"], "k-1");

    let again = api
        .post(
            "/devices/sensor-1/commands",
            &json!({"name": "reboot", "params": {"n": 2}, "idempotency_key": "k-1"}),
        )
        .await
        .expect(200);
    assert_eq!(
        again, first,
        "the repeat returns the first command as it is"
    );
    assert_eq!(list(&api, "sensor-1", "").await.len(), 1);

    // Keys are per device; another key is another command.
    let other_device = create(
        &api,
        "sensor-2",
        &json!({"name": "reboot", "idempotency_key": "k-1"}),
    )
    .await;
    assert_ne!(other_device["id"], first["id"]);
    let other_key = create(
        &api,
        "sensor-1",
        &json!({"name": "reboot", "idempotency_key": "k-2"}),
    )
    .await;
    assert_ne!(other_key["id"], first["id"]);

    // Still the first command once it is final.
    api.post(&format!("/commands/{}/cancel", id_of(&first)), &json!({}))
        .await
        .expect(200);
    let after_cancel = api
        .post(
            "/devices/sensor-1/commands",
            &json!({"name": "reboot", "idempotency_key": "k-1"}),
        )
        .await
        .expect(200);
    assert_eq!(after_cancel["id"], first["id"]);
    assert_eq!(after_cancel["status"], "canceled");

    let mut dev = gw.connect(&token).await;
    assert_eq!(recv_command(&mut dev).await["id"], other_key["id"]);
    assert_silent(&mut dev, QUIET).await;
}

#[tokio::test]
async fn cancel_ends_a_command_once_and_unknown_ids_are_404() {
    let (gw, api, token) =
        gateway_with_device(Options::new().args(["--command-window", "1"])).await;
    let queued = create_named(&api, "sensor-1", "never").await;
    let canceled = api
        .post(&format!("/commands/{queued}/cancel"), &json!({}))
        .await
        .expect(200);
    assert_command_shape(&canceled);
    assert_eq!(canceled["status"], "canceled");
    assert_close_to_now(
        time_field(&canceled, "completed_at"),
        Duration::from_secs(5),
    );
    assert_eq!(get(&api, &queued).await, canceled);

    let again = api
        .post(&format!("/commands/{queued}/cancel"), &json!({}))
        .await;
    assert_api_error(&again, 409, "conflict");
    assert_eq!(
        get(&api, &queued).await,
        canceled,
        "a refused cancel changes nothing"
    );
    let unknown = api
        .post("/commands/c-does-not-exist/cancel", &json!({}))
        .await;
    assert_api_error(&unknown, 404, "not_found");

    // A canceled command is never delivered; canceling a sent one frees its slot.
    let mut dev = gw.connect(&token).await;
    assert_silent(&mut dev, QUIET).await;
    let sent = create_named(&api, "sensor-1", "sent").await;
    let next = create_named(&api, "sensor-1", "next").await;
    assert_eq!(id_of(&recv_command(&mut dev).await), sent);
    let canceled = api
        .post(&format!("/commands/{sent}/cancel"), &json!({}))
        .await
        .expect(200);
    assert_eq!(canceled["status"], "canceled");
    let msg = recv_command(&mut dev).await;
    assert_eq!(id_of(&msg), next);

    // The device's late answer to the canceled command is acked and changes nothing.
    answer(&mut dev, &sent, "succeeded", json!({"result": {"x": 1}})).await;
    assert_eq!(get(&api, &sent).await, canceled);

    // Done is done: a final command cannot be canceled.
    answer(&mut dev, &next, "succeeded", json!({})).await;
    let resp = api
        .post(&format!("/commands/{next}/cancel"), &json!({}))
        .await;
    assert_api_error(&resp, 409, "conflict");
    assert_eq!(get(&api, &next).await["status"], "succeeded");
}

#[tokio::test]
async fn a_full_queue_is_429_until_a_command_is_final() {
    let (gw, api, token) = gateway_with_device(Options::new().args(["--command-queue", "3"])).await;
    api.create_device("sensor-2").await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(create_named(&api, "sensor-1", &format!("c{n}")).await);
    }
    let full = api
        .post(
            "/devices/sensor-1/commands",
            &json!({"name": "one-too-many"}),
        )
        .await;
    assert_api_error(&full, 429, "rate_limited");
    assert_eq!(
        list(&api, "sensor-1", "").await.len(),
        3,
        "the refused command is not stored"
    );
    // Another device has its own queue.
    create_named(&api, "sensor-2", "fine").await;

    api.post(&format!("/commands/{}/cancel", ids[0]), &json!({}))
        .await
        .expect(200);
    ids.push(create_named(&api, "sensor-1", "c3").await);
    let full = api
        .post(
            "/devices/sensor-1/commands",
            &json!({"name": "one-too-many"}),
        )
        .await;
    assert_api_error(&full, 429, "rate_limited");

    // Sent and delivered commands still count; a result makes room.
    let mut dev = gw.connect(&token).await;
    for id in &ids[1..] {
        assert_eq!(id_of(&recv_command(&mut dev).await), *id);
    }
    ack(&mut dev, &ids[1]).await;
    wait_status(&api, &ids[1], "delivered").await;
    let full = api
        .post(
            "/devices/sensor-1/commands",
            &json!({"name": "one-too-many"}),
        )
        .await;
    assert_api_error(&full, 429, "rate_limited");
    answer(&mut dev, &ids[1], "succeeded", json!({})).await;
    create_named(&api, "sensor-1", "c4").await;
}

#[tokio::test]
async fn list_is_newest_first_filters_by_status_and_pages() {
    let (_gw, api, _token) = gateway_with_device(Options::new()).await;
    api.create_device("sensor-2").await;
    create_named(&api, "sensor-2", "not-mine").await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(create_named(&api, "sensor-1", &format!("c{n}")).await);
        // Distinct created_at times, so "newest first" has one answer.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let canceled = api
        .post(&format!("/commands/{}/cancel", ids[1]), &json!({}))
        .await
        .expect(200);

    let page = api.get("/devices/sensor-1/commands").await.expect(200);
    assert_eq!(
        keys(&page),
        ["items", "next_cursor"].map(String::from).into()
    );
    assert_eq!(page["next_cursor"], Value::Null);
    let items = page["items"].as_array().expect("items");
    for item in items {
        assert_command_shape(item);
        assert_eq!(item["device_id"], "sensor-1");
        assert_eq!(*item, get(&api, &id_of(item)).await, "list item vs GET");
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(items.iter().map(id_of).collect::<Vec<_>>(), newest_first);

    assert_eq!(
        list(&api, "sensor-1", "?status=canceled").await,
        vec![canceled]
    );
    assert_eq!(
        list_ids(&api, "sensor-1", "?status=queued").await,
        vec![
            ids[4].clone(),
            ids[3].clone(),
            ids[2].clone(),
            ids[0].clone()
        ]
    );
    assert!(list(&api, "sensor-1", "?status=succeeded").await.is_empty());

    // Pages of two, following next_cursor to the end.
    let mut paged = Vec::new();
    let mut path = "/devices/sensor-1/commands?limit=2".to_string();
    for _ in 0..5 {
        let page = api.get(&path).await.expect(200);
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 2, "limit=2 page of {}", items.len());
        paged.extend(items.iter().map(id_of));
        match &page["next_cursor"] {
            Value::Null => break,
            Value::String(c) => {
                path = format!(
                    "/devices/sensor-1/commands?limit=2&cursor={}",
                    e2e::api::encode(c)
                )
            }
            other => panic!("next_cursor {other}"),
        }
    }
    assert_eq!(paged, newest_first);

    assert_api_error(
        &api.get("/devices/sensor-1/commands?status=bogus").await,
        400,
        "bad_request",
    );
    assert_api_error(&api.get("/devices/nobody/commands").await, 404, "not_found");
    assert_api_error(
        &api.get("/commands/c-does-not-exist").await,
        404,
        "not_found",
    );
}

#[tokio::test]
async fn invalid_create_requests_are_refused_and_store_nothing() {
    let (_gw, api, _token) = gateway_with_device(Options::new()).await;
    for bad in [
        json!({}),
        json!({"params": {}}),
        json!({"name": 5}),
        json!({"name": "x", "params": [1, 2]}),
        json!({"name": "x", "params": "on"}),
        json!({"name": "x", "wait_s": 61}),
        json!({"name": "x", "wait_s": -1}),
        json!({"name": "x", "ttl_s": -1}),
    ] {
        let resp = api.post("/devices/sensor-1/commands", &bad).await;
        assert_eq!(resp.status, 422, "{bad} -> {} {}", resp.status, resp.raw);
        assert_api_error(&resp, 422, "invalid");
    }
    let resp = api
        .post_raw("/devices/sensor-1/commands", b"{\"name\":".to_vec())
        .await;
    assert_api_error(&resp, 400, "bad_request");
    let resp = api
        .post("/devices/nobody/commands", &json!({"name": "x"}))
        .await;
    assert_api_error(&resp, 404, "not_found");
    // An unknown device is what a request for it hears first, whatever its body.
    let resp = api
        .post(
            "/devices/nobody/commands",
            &json!({"name": "x", "wait_s": 61}),
        )
        .await;
    assert_api_error(&resp, 404, "not_found");
    let resp = api
        .with_key(None)
        .post("/devices/sensor-1/commands", &json!({"name": "x"}))
        .await;
    assert_api_error(&resp, 401, "unauthorized");
    assert!(list(&api, "sensor-1", "").await.is_empty());
}

#[tokio::test]
async fn an_ack_or_result_for_an_unknown_command_is_an_error() {
    let (gw, _api, token) = gateway_with_device(Options::new()).await;
    let mut dev = gw.connect(&token).await;
    expect_unknown_command(&mut dev, &json!({"type": "ack", "id": "c-nope"})).await;
    expect_unknown_command(
        &mut dev,
        &json!({"type": "command_result", "id": "c-nope", "status": "succeeded", "result": {}}),
    )
    .await;
    // The connection stays open and usable.
    dev.send_acked(&json!({"type": "telemetry", "id": "m-1", "data": {"a": 1}}))
        .await;
}

#[tokio::test]
async fn a_device_cannot_ack_or_answer_another_devices_command() {
    let (gw, api, token) =
        gateway_with_device(Options::new().args(["--command-window", "1"])).await;
    let intruder_token = api.create_device("sensor-2").await;
    let mut owner = gw.connect(&token).await;
    let mut intruder = gw.connect(&intruder_token).await;
    let sent = create_named(&api, "sensor-1", "sent").await;
    let queued = create_named(&api, "sensor-1", "queued").await;
    assert_eq!(id_of(&recv_command(&mut owner).await), sent);
    let sent_before = wait_status(&api, &sent, "sent").await;
    let queued_before = get(&api, &queued).await;

    for id in [&sent, &queued] {
        expect_unknown_command(&mut intruder, &json!({"type": "ack", "id": id})).await;
        for (status, extra) in [
            ("succeeded", json!({"result": {"pwned": true}})),
            ("failed", json!({"error": "pwned"})),
        ] {
            let mut msg = json!({"type": "command_result", "id": id, "status": status});
            msg.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            expect_unknown_command(&mut intruder, &msg).await;
        }
    }
    assert_eq!(
        get(&api, &sent).await,
        sent_before,
        "untouched by another device"
    );
    assert_eq!(
        get(&api, &queued).await,
        queued_before,
        "untouched by another device"
    );
    assert_silent(&mut owner, QUIET).await;

    // The owner still completes it.
    answer(
        &mut owner,
        &sent,
        "succeeded",
        json!({"result": {"mine": true}}),
    )
    .await;
    let done = get(&api, &sent).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["result"], json!({"mine": true}));
    assert_eq!(id_of(&recv_command(&mut owner).await), queued);
}

#[tokio::test]
async fn a_duplicate_result_is_acked_and_changes_nothing() {
    let (gw, api, token) = gateway_with_device(Options::new()).await;
    let mut dev = gw.connect(&token).await;
    let id = create_named(&api, "sensor-1", "once").await;
    recv_command(&mut dev).await;
    answer(&mut dev, &id, "succeeded", json!({"result": {"v": 1}})).await;
    let done = get(&api, &id).await;
    tokio::time::sleep(Duration::from_millis(20)).await;

    answer(&mut dev, &id, "succeeded", json!({"result": {"v": 1}})).await;
    answer(&mut dev, &id, "failed", json!({"error": "changed my mind"})).await;
    answer(&mut dev, &id, "succeeded", json!({"result": {"v": 2}})).await;
    assert_eq!(get(&api, &id).await, done);
}

/// A command queued while its device connects is marked sent and pushed to the new session,
/// which at the same time lists what was sent before and never acked: it must reach the
/// device once, not once from each path.
#[tokio::test]
async fn a_command_queued_while_the_device_connects_is_written_once() {
    let (gw, api, token) = gateway_with_device(Options::new()).await;
    for round in 0..10 {
        let creator = {
            let api = api.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..4 {
                    ids.push(create_named(&api, "sensor-1", &format!("r{round}-{i}")).await);
                }
                ids
            })
        };
        let mut dev = gw.connect(&token).await;
        let created = creator.await.unwrap();
        let mut seen = Vec::new();
        while let e2e::Event::Json(msg) = dev.next_event(QUIET).await {
            assert_eq!(msg["type"], "command", "round {round}: {msg}");
            let id = msg["id"].as_str().unwrap().to_string();
            assert!(
                !seen.contains(&id),
                "round {round}: command {id} written twice to one session ({seen:?})"
            );
            seen.push(id);
        }
        let mut want = created.clone();
        want.sort();
        seen.sort();
        assert_eq!(seen, want, "round {round}: every command, once");
        // All final before the next session, so none is legitimately sent again.
        for id in &created {
            dev.send_json(&json!({"type": "command_result", "id": id, "status": "succeeded"}))
                .await;
        }
        for id in &created {
            wait_status(&api, id, "succeeded").await;
        }
        dev.close().await;
    }
}
