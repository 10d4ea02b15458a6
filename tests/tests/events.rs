//! The live event stream (`GET /v1/events`, Server-Sent Events) over real HTTP: event names and
//! fields, the device filter, `Last-Event-ID` resume, a stalled client, and shutdown.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use e2e::commands::{ack, answer, assert_command_shape, create, id_of, recv_command};
use e2e::sse::{self, SseEvent, SseNext, SseStream};
use e2e::{
    assert_api_error, assert_close_to_now, json, time_field, Device, Gateway, Options, Value,
};

/// Enough time to read a large backlog of events.
const LONG: Duration = Duration::from_secs(60);

#[track_caller]
fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

/// Whether `e` is the telemetry event of message `id` (its first point, for a batch).
fn is_telemetry(e: &SseEvent, id: &str) -> bool {
    e.event == "telemetry" && e.json()["id"] == id && e.json()["seq"] == 0
}

/// Whether `e` is a device event `name` for `session_id`.
fn is_device_event(e: &SseEvent, name: &str, session_id: &str) -> bool {
    e.event == name && e.json()["session_id"] == session_id
}

/// Asserts every event has a decimal id, strictly increasing.
#[track_caller]
fn assert_increasing_ids(events: &[SseEvent]) {
    for pair in events.windows(2) {
        assert!(
            pair[1].id_num() > pair[0].id_num(),
            "event ids not increasing: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
    if let Some(e) = events.first() {
        e.id_num();
    }
}

/// Asserts a `device.connected`/`device.disconnected` event's fields.
#[track_caller]
fn assert_device_event(e: &SseEvent, device: &str, session_id: &str, reason: Option<&str>) {
    let d = e.json();
    assert_eq!(
        keys(&d),
        BTreeSet::from(["device_id", "session_id", "at", "reason"]),
        "{e:?}"
    );
    assert_eq!(d["device_id"], device, "{e:?}");
    assert_eq!(d["session_id"], session_id, "{e:?}");
    assert_close_to_now(time_field(&d, "at"), Duration::from_secs(10));
    match reason {
        Some(r) => assert_eq!(d["reason"], r, "{e:?}"),
        None => assert_eq!(d["reason"], Value::Null, "{e:?}"),
    }
}

/// Sends `batches` telemetry messages of `points` points each (ids `{prefix}-{n}`), one at a
/// time, and returns the longest wait for an ack.
async fn send_batches(
    dev: &mut Device,
    prefix: &str,
    batches: usize,
    points: usize,
    pad: usize,
) -> Duration {
    let filler = "x".repeat(pad);
    let mut slowest = Duration::ZERO;
    for n in 0..batches {
        let pts: Vec<Value> = (0..points)
            .map(|i| json!({"data": {"n": n, "i": i, "pad": filler}}))
            .collect();
        let started = Instant::now();
        dev.send_acked(&json!({"type": "telemetry", "id": format!("{prefix}-{n}"), "points": pts}))
            .await;
        slowest = slowest.max(started.elapsed());
    }
    slowest
}

#[tokio::test]
async fn events_need_the_api_key() {
    let gw = Gateway::start(Options::new()).await;
    for key in [None, Some("wrong-key")] {
        let refused = sse::open(&gw.api_url, key, "", None).await;
        match refused {
            Ok(_) => panic!("GET /v1/events with key {key:?} was accepted"),
            Err(resp) => assert_api_error(&resp, 401, "unauthorized"),
        }
    }
    sse::subscribe(&gw, "").await;
}

#[tokio::test]
async fn device_and_telemetry_events_carry_the_contract_fields() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;
    let mut events = sse::subscribe(&gw, "").await;

    let mut dev = gw.connect(&token).await;
    let session_id = dev.session_id().to_string();
    dev.send_acked(&json!({"type": "telemetry", "id": "m-1", "points": [
        {"ts": "2026-11-25T10:00:01Z", "data": {"temp": 21.6}},
        {"ts": 1795600802000u64, "data": {"temp": 21.7, "door": "open"}},
        {"data": {"temp": 21.8}},
    ]}))
    .await;
    dev.close().await;

    let seen = events
        .recv_until("device.disconnected", Duration::from_secs(10), |e| {
            e.event == "device.disconnected"
        })
        .await;
    assert_increasing_ids(&seen);
    let names: Vec<&str> = seen.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        [
            "device.connected",
            "telemetry",
            "telemetry",
            "telemetry",
            "device.disconnected"
        ],
        "{seen:?}"
    );
    assert_device_event(&seen[0], "sensor-1", &session_id, None);
    assert_device_event(&seen[4], "sensor-1", &session_id, Some("client_closed"));

    // One event per point, the same point the telemetry API returns.
    let stored = api.telemetry_all("sensor-1", "order=asc").await;
    assert_eq!(stored.len(), 3);
    for (seq, e) in seen[1..4].iter().enumerate() {
        let d = e.json();
        assert_eq!(
            keys(&d),
            BTreeSet::from(["device_id", "id", "seq", "ts", "received_at", "data"]),
            "{e:?}"
        );
        assert_eq!(d["device_id"], "sensor-1");
        assert_eq!(d["id"], "m-1");
        assert_eq!(d["seq"], seq);
        time_field(&d, "ts");
        assert_close_to_now(time_field(&d, "received_at"), Duration::from_secs(10));
        let point = stored
            .iter()
            .find(|p| p["seq"] == seq)
            .unwrap_or_else(|| panic!("seq {seq} not stored: {stored:?}"));
        for field in ["ts", "received_at", "data"] {
            assert_eq!(
                d[field], point[field],
                "{field} of event {e:?} vs stored {point}"
            );
        }
    }
    assert_eq!(seen[1].json()["ts"], "2026-11-25T10:00:01.000Z");
    assert_eq!(
        seen[2].json()["data"],
        json!({"temp": 21.7, "door": "open"})
    );
}

#[tokio::test]
async fn replacement_and_a_lost_connection_show_as_device_events() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;
    let mut events = sse::subscribe(&gw, "").await;

    let mut first = gw.connect(&token).await;
    let second = gw.connect(&token).await;
    assert_eq!(first.expect_close(Duration::from_secs(5)).await.0, 4001);
    let (a, b) = (
        first.session_id().to_string(),
        second.session_id().to_string(),
    );
    drop(second);

    // Either session's end may be published first: the replaced one ends after its close
    // handshake, the dropped one as soon as the gateway sees the connection gone.
    let (mut a_ended, mut b_ended) = (false, false);
    let seen = events
        .recv_until("both sessions' ends", Duration::from_secs(10), |e| {
            a_ended |= is_device_event(e, "device.disconnected", &a);
            b_ended |= is_device_event(e, "device.disconnected", &b);
            a_ended && b_ended
        })
        .await;
    assert_increasing_ids(&seen);
    let find = |name: &str, session: &str| {
        seen.iter()
            .find(|e| is_device_event(e, name, session))
            .unwrap_or_else(|| panic!("no {name} for {session} in {seen:?}"))
    };
    assert_device_event(find("device.connected", &a), "sensor-1", &a, None);
    assert_device_event(find("device.connected", &b), "sensor-1", &b, None);
    assert_device_event(
        find("device.disconnected", &a),
        "sensor-1",
        &a,
        Some("session_replaced"),
    );
    assert_device_event(
        find("device.disconnected", &b),
        "sensor-1",
        &b,
        Some("connection_lost"),
    );
}

#[tokio::test]
async fn command_updated_follows_every_status() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;
    let mut events = sse::subscribe(&gw, "").await;

    let cmd = create(
        &api,
        "sensor-1",
        &json!({"name": "reboot", "params": {"a": 1}}),
    )
    .await;
    let id = id_of(&cmd);
    let mut dev = gw.connect(&token).await;
    assert_eq!(id_of(&recv_command(&mut dev).await), id);
    ack(&mut dev, &id).await;
    e2e::commands::wait_status(&api, &id, "delivered").await;
    answer(&mut dev, &id, "succeeded", json!({"result": {"ok": true}})).await;
    dev.close().await;

    let canceled = id_of(&create(&api, "sensor-1", &json!({"name": "never"})).await);
    api.post(&format!("/commands/{canceled}/cancel"), &json!({}))
        .await
        .expect(200);
    let expiring = id_of(&create(&api, "sensor-1", &json!({"name": "late", "ttl_s": 1})).await);

    let seen = events
        .recv_until("the expiry event", Duration::from_secs(10), |e| {
            e.event == "command.updated"
                && e.json()["id"] == expiring.as_str()
                && e.json()["status"] == "expired"
        })
        .await;
    assert_increasing_ids(&seen);
    let updates = |cid: &str| -> Vec<Value> {
        seen.iter()
            .filter(|e| e.event == "command.updated" && e.json()["id"] == cid)
            .map(SseEvent::json)
            .collect()
    };
    let statuses = |cid: &str| -> Vec<String> {
        updates(cid)
            .iter()
            .map(|c| c["status"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(statuses(&id), ["queued", "sent", "delivered", "succeeded"]);
    assert_eq!(statuses(&canceled), ["queued", "canceled"]);
    assert_eq!(statuses(&expiring), ["queued", "expired"]);
    for c in updates(&id) {
        assert_command_shape(&c);
    }
    let last = updates(&id).pop().expect("updates");
    assert_eq!(
        last,
        e2e::commands::get(&api, &id).await,
        "the final event is the command"
    );
    assert_eq!(last["result"], json!({"ok": true}));
}

#[tokio::test]
async fn device_filter_keeps_only_that_devices_events() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token_a = api.create_device("sensor-a").await;
    let token_b = api.create_device("sensor-b").await;
    let mut all = sse::subscribe(&gw, "").await;
    let mut only_a = sse::subscribe(&gw, "?device=sensor-a").await;

    let mut a = gw.connect(&token_a).await;
    let mut b = gw.connect(&token_b).await;
    for n in 0..3 {
        for (dev, name) in [(&mut a, "a"), (&mut b, "b")] {
            dev.send_acked(
                &json!({"type": "telemetry", "id": format!("{name}-{n}"), "data": {"n": n}}),
            )
            .await;
        }
    }
    create(&api, "sensor-a", &json!({"name": "for-a"})).await;
    create(&api, "sensor-b", &json!({"name": "for-b"})).await;
    recv_command(&mut a).await;
    recv_command(&mut b).await;
    b.close().await;
    a.send_acked(&json!({"type": "telemetry", "id": "a-end", "data": {"n": 9}}))
        .await;

    let everything = all
        .recv_until("a-end", Duration::from_secs(10), |e| {
            is_telemetry(e, "a-end")
        })
        .await;
    let filtered = only_a
        .recv_until("a-end", Duration::from_secs(10), |e| {
            is_telemetry(e, "a-end")
        })
        .await;
    assert_increasing_ids(&filtered);
    let of_a: Vec<(String, Value)> = everything
        .iter()
        .filter(|e| e.json()["device_id"] == "sensor-a")
        .map(|e| (e.event.clone(), e.json()))
        .collect();
    let got: Vec<(String, Value)> = filtered
        .iter()
        .map(|e| (e.event.clone(), e.json()))
        .collect();
    assert_eq!(
        got, of_a,
        "the filtered stream is sensor-a's part of the whole"
    );
    assert!(
        everything
            .iter()
            .any(|e| e.json()["device_id"] == "sensor-b"),
        "the unfiltered stream saw sensor-b too"
    );
    let names: BTreeSet<&str> = filtered.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["device.connected", "telemetry", "command.updated"]),
        "{filtered:?}"
    );
}

#[tokio::test]
async fn last_event_id_resumes_exactly_after_that_event() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;
    let reference = sse::subscribe(&gw, "").await;
    let reference = tokio::spawn(read_until_telemetry(reference, "end"));
    let mut first = sse::subscribe(&gw, "").await;

    let mut dev = gw.connect(&token).await;
    dev.send_acked(&json!({"type": "telemetry", "id": "before", "data": {"n": 0}}))
        .await;
    let before = first
        .recv_until("before", Duration::from_secs(10), |e| {
            is_telemetry(e, "before")
        })
        .await;
    let last_id = before.last().expect("events").id.clone().expect("an id");
    drop(first);

    // More than 9,000 events while the client is away (the gateway keeps at least 10,000).
    send_batches(&mut dev, "away", 9, 1000, 0).await;
    let cmd = create(&api, "sensor-1", &json!({"name": "while-away"})).await;
    recv_command(&mut dev).await;
    ack(&mut dev, &id_of(&cmd)).await;
    e2e::commands::wait_status(&api, &id_of(&cmd), "delivered").await;
    dev.close().await;
    let mut dev = gw.connect(&token).await;
    dev.send_acked(&json!({"type": "telemetry", "id": "end", "data": {"n": 1}}))
        .await;

    let reference = reference.await.expect("reference reader");
    assert_increasing_ids(&reference);
    let expected: Vec<&SseEvent> = reference
        .iter()
        .filter(|e| e.id_num() > last_id.parse::<u64>().expect("decimal id"))
        .collect();
    assert!(
        expected.len() > 9000,
        "only {} events after {last_id}",
        expected.len()
    );

    let resumed = sse::resume(&gw, "", Some(&last_id)).await;
    let resumed = read_until_telemetry(resumed, "end").await;
    assert_eq!(resumed.len(), expected.len(), "events after {last_id}");
    for (got, want) in resumed.iter().zip(&expected) {
        assert_eq!(got, *want, "resumed event vs the live one");
    }

    // Resuming from the newest event replays nothing.
    let newest = resumed.last().expect("events").id.clone().expect("an id");
    let mut caught_up = sse::resume(&gw, "", Some(&newest)).await;
    dev.send_acked(&json!({"type": "telemetry", "id": "later", "data": {"n": 2}}))
        .await;
    let next = caught_up.recv().await;
    assert!(
        is_telemetry(&next, "later"),
        "first event after resuming at the newest: {next:?}"
    );
    assert!(next.id_num() > newest.parse::<u64>().expect("decimal id"));
}

#[tokio::test]
async fn resuming_keeps_the_device_filter() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let mut a = gw.connect(&api.create_device("sensor-a").await).await;
    let mut b = gw.connect(&api.create_device("sensor-b").await).await;
    let mut first = sse::subscribe(&gw, "?device=sensor-a").await;
    a.send_acked(&json!({"type": "telemetry", "id": "a-0", "data": {"n": 0}}))
        .await;
    let seen = first
        .recv_until("a-0", Duration::from_secs(10), |e| is_telemetry(e, "a-0"))
        .await;
    let last_id = seen.last().expect("events").id.clone().expect("an id");
    drop(first);

    for n in 1..3 {
        b.send_acked(&json!({"type": "telemetry", "id": format!("b-{n}"), "data": {"n": n}}))
            .await;
        a.send_acked(&json!({"type": "telemetry", "id": format!("a-{n}"), "data": {"n": n}}))
            .await;
    }
    a.send_acked(&json!({"type": "telemetry", "id": "a-end", "data": {"n": 9}}))
        .await;

    let resumed = sse::resume(&gw, "?device=sensor-a", Some(&last_id)).await;
    let resumed = read_until_telemetry(resumed, "a-end").await;
    assert_increasing_ids(&resumed);
    let ids: Vec<Value> = resumed.iter().map(|e| e.json()["id"].clone()).collect();
    assert_eq!(
        ids,
        [json!("a-1"), json!("a-2"), json!("a-end")],
        "{resumed:?}"
    );
}

#[tokio::test]
async fn resuming_from_beyond_the_buffer_says_how_many_events_were_lost() {
    let gw = Gateway::start(Options::new().args(["--event-buffer", "100"])).await;
    let token = gw.create_device("sensor-1").await;
    let mut first = sse::subscribe(&gw, "").await;
    let mut dev = gw.connect(&token).await;
    dev.send_acked(&json!({"type": "telemetry", "id": "first", "data": {"n": 0}}))
        .await;
    let seen = first
        .recv_until("first", Duration::from_secs(10), |e| {
            is_telemetry(e, "first")
        })
        .await;
    let last_id = seen.last().expect("events").id.clone().expect("an id");
    drop(first);

    // 301 events after `first`, three times what the gateway was told to keep.
    send_batches(&mut dev, "many", 3, 100, 0).await;
    dev.send_acked(&json!({"type": "telemetry", "id": "end", "data": {"n": 1}}))
        .await;

    let mut resumed = sse::resume(&gw, "", Some(&last_id)).await;
    let lagged = resumed.recv().await;
    assert_eq!(
        lagged.event, "lagged",
        "first event resuming past the buffer: {lagged:?}"
    );
    let missed = lagged.json()["missed"].as_u64().unwrap_or(0);
    let rest = resumed
        .recv_until("end", LONG, |e| is_telemetry(e, "end"))
        .await;
    assert!(rest.iter().all(|e| e.event == "telemetry"), "{rest:?}");
    assert_increasing_ids(&rest);
    assert!(
        rest.len() >= 100,
        "the last 100 events are kept; got {}",
        rest.len()
    );
    assert_eq!(
        rest.len() as u64 + missed,
        301,
        "events received ({}) plus missed ({missed}) after {last_id}",
        rest.len()
    );
}

/// Reads `stream` until the telemetry event of message `id`, asserting nothing was missed.
async fn read_until_telemetry(mut stream: SseStream, id: &'static str) -> Vec<SseEvent> {
    let events = stream.recv_until(id, LONG, |e| is_telemetry(e, id)).await;
    assert!(
        events.iter().all(|e| e.event != "lagged"),
        "a reading client lagged"
    );
    events
}

#[tokio::test]
async fn a_stalled_client_does_not_slow_devices_and_learns_it_lagged() {
    let gw = Gateway::start(Options::new().args([
        "--event-buffer",
        "100",
        "--max-message-bytes",
        "1048576",
    ]))
    .await;
    let api = gw.api();
    let mut tokens = Vec::new();
    for n in 0..4 {
        tokens.push(api.create_device(&format!("sensor-{n}")).await);
    }
    // Subscribed, then never read until the end: its socket fills up.
    let mut stalled = sse::subscribe(&gw, "").await;

    // 4 devices x 25 messages x 200 points of ~1 KB: 20,000 events, far more than any socket
    // buffer holds.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, token) in tokens.iter().enumerate() {
        let mut dev = gw.connect(token).await;
        tasks.push(tokio::spawn(async move {
            let slowest = send_batches(&mut dev, &format!("d{n}"), 25, 200, 1000).await;
            (dev, slowest)
        }));
    }
    let mut devices = Vec::new();
    for task in tasks {
        let (dev, slowest) = task.await.expect("device task");
        assert!(
            slowest < Duration::from_secs(5),
            "an ack took {slowest:?} with a stalled event client"
        );
        devices.push(dev);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "20,000 points took {took:?}"
    );
    assert_eq!(
        api.telemetry_all("sensor-0", "").await.len(),
        25 * 200,
        "every acked point stored"
    );

    // The gateway is fine: healthy, and a new client gets new events at once.
    assert_eq!(api.with_key(None).get_root("/healthz").await.status, 200);
    let mut fresh = sse::subscribe(&gw, "").await;
    devices[0]
        .send_acked(&json!({"type": "telemetry", "id": "after-stall", "data": {"n": 1}}))
        .await;
    let got = fresh
        .recv_until("after-stall", Duration::from_secs(10), |e| {
            is_telemetry(e, "after-stall")
        })
        .await;
    assert_eq!(got.len(), 1, "only the new event: {got:?}");

    // The stalled client, read at last: told it missed events, then it goes on.
    let seen = stalled
        .recv_until("a lagged event", LONG, |e| e.event == "lagged")
        .await;
    let lagged = seen.last().expect("lagged").json();
    let missed = lagged["missed"].as_u64().unwrap_or(0);
    assert!(missed > 0, "lagged without a positive count: {lagged}");
    assert!(
        seen.len() < 20_000,
        "read all {} events, yet lagged",
        seen.len()
    );
    assert_increasing_ids(&seen[..seen.len() - 1]);
    let rest = stalled
        .recv_until("after-stall", LONG, |e| is_telemetry(e, "after-stall"))
        .await;
    let rest: Vec<SseEvent> = rest.into_iter().filter(|e| e.event != "lagged").collect();
    assert_increasing_ids(&rest);
}

#[tokio::test]
async fn the_stream_ends_when_the_gateway_shuts_down() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;
    let mut events = sse::subscribe(&gw, "").await;
    let mut dev = gw.connect(&token).await;
    let session_id = dev.session_id().to_string();
    events
        .recv_until("device.connected", Duration::from_secs(10), |e| {
            e.event == "device.connected"
        })
        .await;
    // The device reads on, so it answers the gateway's close.
    let device = tokio::spawn(async move { dev.expect_close(Duration::from_secs(15)).await });

    let stopping = tokio::spawn(gw.terminate());
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    loop {
        match events
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            SseNext::Event(e) => seen.push(e),
            SseNext::Ended(_) => break,
            SseNext::Timeout => panic!("the event stream outlived the shutdown; got {seen:?}"),
        }
    }
    let stopped = stopping.await.expect("terminate");
    assert!(
        stopped.status.success(),
        "exit {}: {}",
        stopped.status,
        stopped.stderr
    );
    for e in seen.iter().filter(|e| e.event == "device.disconnected") {
        assert_device_event(e, "sensor-1", &session_id, Some("server_shutdown"));
    }
    assert_eq!(device.await.expect("device task").0, 1001);
}
