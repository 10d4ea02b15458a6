//! Telemetry over the device socket: acks, durability as seen through the API, validation,
//! close codes for abuse, rate limiting and isolation between devices.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use e2e::{
    assert_close_to_now, assert_rfc3339_ms, fmt_ms, json, time_field, Api, Device, Event, Gateway,
    Options, Value,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// A gateway with one connected device `sensor-1`.
async fn setup(opts: Options) -> (Gateway, Device) {
    let gw = Gateway::start(opts).await;
    let token = gw.create_device("sensor-1").await;
    let dev = gw.connect(&token).await;
    (gw, dev)
}

/// Every stored item of `device` carrying message id `id`, by `seq`.
async fn stored(api: &Api, device: &str, id: &str) -> Vec<Value> {
    let mut items: Vec<Value> = api
        .telemetry_all(device, "order=asc")
        .await
        .into_iter()
        .filter(|i| i["id"] == id)
        .collect();
    items.sort_by_key(|i| i["seq"].as_u64());
    items
}

/// The single stored item for `id`, checked for shape.
async fn stored_one(api: &Api, device: &str, id: &str) -> Value {
    let items = stored(api, device, id).await;
    assert_eq!(items.len(), 1, "stored items for {id}: {items:?}");
    let item = items.into_iter().next().unwrap();
    assert_eq!(item["seq"], 0, "seq of a single point: {item}");
    assert_rfc3339_ms(item["ts"].as_str().expect("ts string"));
    assert_close_to_now(time_field(&item, "received_at"), Duration::from_secs(10));
    item
}

fn ms(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t).expect("valid epoch ms")
}

#[tokio::test]
async fn single_point_with_rfc3339_ts_is_acked_and_stored() {
    let (gw, mut dev) = setup(Options::new()).await;
    let api = gw.api();

    let data = json!({"temp": 21.5, "door": "open", "n": 3, "nested": {"a": [1, 2]}});
    dev.send_acked(&json!({"type": "telemetry", "id": "m-000123", "ts": "2026-11-25T10:00:00.000Z", "data": data}))
        .await;
    let item = stored_one(&api, "sensor-1", "m-000123").await;
    assert_eq!(item["ts"], "2026-11-25T10:00:00.000Z");
    assert_eq!(item["data"], data);

    // Other RFC 3339 spellings are normalised to UTC with milliseconds.
    dev.send_acked(&json!({"type": "telemetry", "id": "m-offset", "ts": "2026-11-25T11:00:00.250+01:00", "data": {"x": 1.5}}))
        .await;
    dev.send_acked(&json!({"type": "telemetry", "id": "m-nofrac", "ts": "2026-11-25T10:00:01Z", "data": {"x": 2.5}}))
        .await;
    let item = stored_one(&api, "sensor-1", "m-offset").await;
    assert_eq!(item["ts"], "2026-11-25T10:00:00.250Z");
    let item = stored_one(&api, "sensor-1", "m-nofrac").await;
    assert_eq!(item["ts"], "2026-11-25T10:00:01.000Z");
}

#[tokio::test]
async fn single_point_with_epoch_ms_ts_is_stored() {
    let (gw, mut dev) = setup(Options::new()).await;

    dev.send_acked(&json!({"type": "telemetry", "id": "m-epoch", "ts": 1795600802123_i64, "data": {"temp": 21.7}}))
        .await;
    let item = stored_one(&gw.api(), "sensor-1", "m-epoch").await;
    assert_eq!(item["ts"], fmt_ms(ms(1795600802123)));
    assert_eq!(item["data"], json!({"temp": 21.7}));
}

#[tokio::test]
async fn point_without_ts_uses_the_receive_time() {
    let (gw, mut dev) = setup(Options::new()).await;

    dev.send_acked(&json!({"type": "telemetry", "id": "m-now", "data": {"temp": 20.5}}))
        .await;
    let item = stored_one(&gw.api(), "sensor-1", "m-now").await;
    assert_close_to_now(time_field(&item, "ts"), Duration::from_secs(5));
}

#[tokio::test]
async fn batch_is_acked_once_and_stored_with_seq() {
    let (gw, mut dev) = setup(Options::new()).await;

    let points = json!([
        {"ts": "2026-11-25T10:00:01Z", "data": {"temp": 21.6}},
        {"ts": 1795600802000_i64, "data": {"temp": 21.7}},
        {"data": {"temp": 21.8, "door": "closed"}},
        {"ts": "2026-11-25T10:00:01Z", "data": {"temp": 21.9}},
    ]);
    dev.send_acked(&json!({"type": "telemetry", "id": "batch-1", "points": points}))
        .await;
    // Exactly one ack: the next answer is for the next message.
    dev.send_acked(&json!({"type": "telemetry", "id": "after-batch", "data": {"x": 0.5}}))
        .await;

    let items = stored(&gw.api(), "sensor-1", "batch-1").await;
    let seqs: Vec<_> = items.iter().map(|i| i["seq"].clone()).collect();
    assert_eq!(
        seqs,
        vec![json!(0), json!(1), json!(2), json!(3)],
        "{items:?}"
    );
    assert_eq!(items[0]["ts"], "2026-11-25T10:00:01.000Z");
    assert_eq!(items[1]["ts"], fmt_ms(ms(1795600802000)));
    assert_close_to_now(time_field(&items[2], "ts"), Duration::from_secs(5));
    assert_eq!(items[3]["ts"], "2026-11-25T10:00:01.000Z");
    for (item, point) in items.iter().zip(points.as_array().unwrap()) {
        assert_eq!(item["data"], point["data"]);
    }
}

#[tokio::test]
async fn acked_point_is_immediately_readable() {
    let (gw, mut dev) = setup(Options::new()).await;
    let api = gw.api();
    let base = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc);

    for i in 0..60 {
        let id = format!("r-{i}");
        let ts = base + chrono::Duration::seconds(i);
        dev.send_acked(&json!({"type": "telemetry", "id": id, "ts": fmt_ms(ts), "data": {"i": i}}))
            .await;
        let page = api
            .get("/devices/sensor-1/telemetry?order=desc&limit=1")
            .await
            .expect(200);
        assert_eq!(
            page["items"][0]["id"], id,
            "right after the ack of {id}, the newest point is {}",
            page["items"][0]
        );
    }
}

#[tokio::test]
async fn resent_id_is_acked_again_and_stored_once() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;
    let api = gw.api();
    let mut dev = gw.connect(&token).await;

    let single = json!({"type": "telemetry", "id": "dup-1", "ts": "2026-11-25T10:00:00Z", "data": {"temp": 1.5}});
    let batch = json!({"type": "telemetry", "id": "dup-batch", "points": [{"data": {"a": 1.5}}, {"data": {"a": 2.5}}]});
    dev.send_acked(&single).await;
    dev.send_acked(&batch).await;
    dev.send_acked(&single).await;
    dev.send_acked(&batch).await;

    // Again after a reconnect, as a device that never saw its ack would.
    dev.close().await;
    let mut dev = gw.connect(&token).await;
    dev.send_acked(&single).await;
    dev.send_acked(&batch).await;

    assert_eq!(stored(&api, "sensor-1", "dup-1").await.len(), 1);
    let seqs: Vec<_> = stored(&api, "sensor-1", "dup-batch")
        .await
        .iter()
        .map(|i| i["seq"].clone())
        .collect();
    assert_eq!(seqs, vec![json!(0), json!(1)]);
}

/// `(message, id the error must carry)`: each must be answered with `invalid_message`.
fn invalid_messages() -> Vec<(String, Option<String>)> {
    let obj = |v: Value| (v.to_string(), v["id"].as_str().map(str::to_string));
    let long_ascii = "x".repeat(129);
    let long_utf8 = "€".repeat(43); // 43 characters, 129 bytes
    let too_many: Vec<Value> = (0..1001).map(|i| json!({"data": {"v": i}})).collect();
    vec![
        ("{not json".to_string(), None),
        ("[1,2,3]".to_string(), None),
        obj(json!({"id": "bad-no-type", "data": {"a": 1}})),
        obj(json!({"type": "telemetry_v9", "id": "bad-unknown-type", "data": {"a": 1}})),
        obj(json!({"type": 7, "id": "bad-type-number", "data": {"a": 1}})),
        obj(json!({"type": "telemetry", "id": "bad-data-array", "data": [1, 2]})),
        obj(json!({"type": "telemetry", "id": "bad-data-string", "data": "hot"})),
        obj(json!({"type": "telemetry", "id": "bad-no-data"})),
        obj(json!({"type": "telemetry", "id": "bad-ts-word", "ts": "yesterday", "data": {"a": 1}})),
        obj(json!({"type": "telemetry", "id": "bad-ts-object", "ts": {"s": 1}, "data": {"a": 1}})),
        obj(json!({"type": "telemetry", "id": long_ascii, "data": {"a": 1}})),
        obj(json!({"type": "telemetry", "id": long_utf8, "data": {"a": 1}})),
        obj(json!({"type": "telemetry", "id": "", "data": {"a": 1}})),
        obj(json!({"type": "telemetry", "id": 42, "data": {"a": 1}})),
        obj(json!({"type": "telemetry", "data": {"a": 1}})),
        obj(json!({"type": "telemetry", "id": "bad-points-object", "points": {"data": {"a": 1}}})),
        obj(
            json!({"type": "telemetry", "id": "bad-point-data", "points": [{"data": {"a": 1}}, {"data": 5}]}),
        ),
        obj(
            json!({"type": "telemetry", "id": "bad-point-ts", "points": [{"ts": "soon", "data": {"a": 1}}]}),
        ),
        obj(json!({"type": "telemetry", "id": "bad-1001-points", "points": too_many})),
    ]
}

#[tokio::test]
async fn invalid_messages_get_an_error_and_the_connection_stays_open() {
    let (gw, mut dev) = setup(Options::new()).await;

    for (n, (msg, id)) in invalid_messages().into_iter().enumerate() {
        let reply = dev.request_text(&msg).await;
        let shown: String = msg.chars().take(120).collect();
        assert_eq!(reply["type"], "error", "reply to {shown}: {reply}");
        assert_eq!(
            reply["code"], "invalid_message",
            "reply to {shown}: {reply}"
        );
        assert!(
            reply["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error without a message: {reply}"
        );
        if let Some(id) = id {
            assert_eq!(
                reply["id"],
                id.as_str(),
                "error for {shown} must carry its id"
            );
        }
        // Still open, and still storing.
        dev.send_acked(&json!({"type": "telemetry", "id": format!("ok-{n}"), "data": {"n": n}}))
            .await;
    }

    let stored_ids: HashSet<String> = gw
        .api()
        .telemetry_all("sensor-1", "")
        .await
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    let expected: HashSet<String> = (0..invalid_messages().len())
        .map(|n| format!("ok-{n}"))
        .collect();
    assert_eq!(stored_ids, expected, "only the valid messages are stored");
}

#[tokio::test]
async fn id_length_is_counted_in_bytes_and_1000_points_are_allowed() {
    let (gw, mut dev) = setup(Options::new()).await;

    let id128 = format!("{}ab", "€".repeat(42));
    assert_eq!(id128.len(), 128);
    dev.send_acked(&json!({"type": "telemetry", "id": id128, "data": {"a": 1}}))
        .await;
    let points: Vec<Value> = (0..1000).map(|i| json!({"data": {"v": i}})).collect();
    dev.send_acked(&json!({"type": "telemetry", "id": "thousand", "points": points}))
        .await;

    let api = gw.api();
    assert_eq!(stored(&api, "sensor-1", &id128).await.len(), 1);
    let items = stored(&api, "sensor-1", "thousand").await;
    assert_eq!(items.len(), 1000);
    assert_eq!(items[999]["seq"], 999);
    assert_eq!(items[999]["data"], json!({"v": 999}));
}

#[tokio::test]
async fn ten_invalid_messages_in_a_row_close_with_1008() {
    let (gw, mut dev) = setup(Options::new()).await;

    // Nine in a row, then a valid one: the count starts again.
    for _ in 0..9 {
        let reply = dev.request_text("nope").await;
        assert_eq!(reply["code"], "invalid_message");
    }
    dev.send_acked(&json!({"type": "telemetry", "id": "breather", "data": {"a": 1}}))
        .await;
    for _ in 0..9 {
        let reply = dev.request_text("nope").await;
        assert_eq!(reply["code"], "invalid_message");
    }
    dev.send_acked(&json!({"type": "telemetry", "id": "breather-2", "data": {"a": 1}}))
        .await;

    for _ in 0..10 {
        dev.send_text("nope").await;
    }
    let (code, _) = dev.expect_close(CLOSE_WAIT).await;
    assert_eq!(code, 1008);

    let api = gw.api();
    let device = e2e::eventually("device offline", CLOSE_WAIT, || async {
        let d = api.device("sensor-1").await;
        (d["online"] == false).then_some(d)
    })
    .await;
    assert_eq!(device["last_disconnect_reason"], "protocol_error");
}

#[tokio::test]
async fn binary_frame_closes_with_1003() {
    let (_gw, mut dev) = setup(Options::new()).await;
    dev.send(Message::binary(
        br#"{"type":"telemetry","id":"b","data":{}}"#.to_vec(),
    ))
    .await;
    let (code, _) = dev.expect_close(CLOSE_WAIT).await;
    assert_eq!(code, 1003);
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    let (_gw, mut dev) = setup(Options::new()).await;
    let frame = Frame::message(
        b"{\"type\":\"telemetry\",\"id\":\"\xff\xfe\"}".to_vec(),
        OpCode::Data(Data::Text),
        true,
    );
    dev.send(Message::Frame(frame)).await;
    let (code, _) = dev.expect_close(CLOSE_WAIT).await;
    assert_eq!(code, 1007);
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let (gw, mut dev) = setup(Options::new().args(["--max-message-bytes", "1024"])).await;
    assert_eq!(dev.welcome["limits"]["max_message_bytes"], 1024);

    let fits = json!({"type": "telemetry", "id": "fits", "data": {"pad": "a".repeat(900)}});
    assert!(fits.to_string().len() <= 1024);
    dev.send_acked(&fits).await;

    let big = json!({"type": "telemetry", "id": "too-big", "data": {"pad": "a".repeat(1500)}});
    dev.send_json(&big).await;
    let (code, _) = dev.expect_close(CLOSE_WAIT).await;
    assert_eq!(code, 1009);
    assert!(stored(&gw.api(), "sensor-1", "too-big").await.is_empty());
}

#[tokio::test]
async fn over_rate_is_rate_limited_and_not_stored() {
    let (gw, mut dev) =
        setup(Options::new().args(["--telemetry-rate", "2", "--telemetry-burst", "2"])).await;
    assert_eq!(dev.welcome["limits"]["telemetry_per_sec"], 2);

    // More rate-limited answers in a row than the 10 invalid messages that close a connection:
    // being over the rate is not being invalid.
    let ids: Vec<String> = (0..20).map(|i| format!("fast-{i}")).collect();
    for id in &ids {
        dev.send_json(&json!({"type": "telemetry", "id": id, "data": {"a": 1}}))
            .await;
    }
    let mut acked = HashSet::new();
    let mut limited = HashSet::new();
    for _ in 0..ids.len() {
        let reply = dev.recv_json().await;
        let id = reply["id"]
            .as_str()
            .unwrap_or_else(|| panic!("reply without id: {reply}"))
            .to_string();
        match (reply["type"].as_str(), reply["code"].as_str()) {
            (Some("ack"), _) => assert!(acked.insert(id), "two acks: {reply}"),
            (Some("error"), Some("rate_limited")) => {
                assert!(limited.insert(id), "two errors: {reply}")
            }
            _ => panic!("unexpected reply {reply}"),
        }
    }
    assert_eq!(acked.len() + limited.len(), ids.len());
    assert!(
        (2..=4).contains(&acked.len()),
        "burst 2 at 2/s: {} of 20 quick messages acked",
        acked.len()
    );

    let stored_ids: HashSet<String> = gw
        .api()
        .telemetry_all("sensor-1", "")
        .await
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stored_ids, acked, "exactly the acked messages are stored");

    // The bucket refills: after a pause, the same connection is served again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    dev.send_acked(&json!({"type": "telemetry", "id": "later", "data": {"a": 1}}))
        .await;
}

#[tokio::test]
async fn rate_counts_messages_not_points_and_is_per_device() {
    let gw =
        Gateway::start(Options::new().args(["--telemetry-rate", "1", "--telemetry-burst", "2"]))
            .await;
    let a = gw.create_device("a").await;
    let b = gw.create_device("b").await;
    let mut dev_a = gw.connect(&a).await;
    let mut dev_b = gw.connect(&b).await;

    // Two batches of 500 points fit a burst of 2; a third message at once does not.
    for n in 0..2 {
        let points: Vec<Value> = (0..500).map(|i| json!({"data": {"i": i}})).collect();
        dev_a
            .send_json(&json!({"type": "telemetry", "id": format!("big-{n}"), "points": points}))
            .await;
    }
    dev_a
        .send_json(&json!({"type": "telemetry", "id": "a-over", "data": {"x": 1}}))
        .await;
    let mut replies = std::collections::HashMap::new();
    for _ in 0..3 {
        let reply = dev_a.recv_json().await;
        replies.insert(reply["id"].as_str().unwrap_or_default().to_string(), reply);
    }
    assert_eq!(replies["big-0"]["type"], "ack", "{replies:?}");
    assert_eq!(replies["big-1"]["type"], "ack", "{replies:?}");
    assert_eq!(replies["a-over"]["code"], "rate_limited", "{replies:?}");

    // Device b has its own budget.
    for n in 0..2 {
        dev_b
            .send_json(&json!({"type": "telemetry", "id": format!("b-{n}"), "data": {"x": n}}))
            .await;
    }
    for _ in 0..2 {
        let reply = dev_b.recv_json().await;
        assert_eq!(reply["type"], "ack", "device b: {reply}");
    }
    assert_eq!(gw.api().telemetry_all("a", "").await.len(), 1000);
}

#[tokio::test]
async fn same_id_sent_back_to_back_is_stored_once() {
    let (gw, mut dev) = setup(Options::new()).await;

    let single = json!({"type": "telemetry", "id": "burst", "data": {"x": 1.5}});
    let batch = json!({"type": "telemetry", "id": "burst-batch", "points": [{"data": {"a": 1}}, {"data": {"a": 2}}]});
    // No waiting between sends: the copies can land in one database transaction.
    for _ in 0..5 {
        dev.send_json(&single).await;
        dev.send_json(&batch).await;
    }
    let mut acks = std::collections::HashMap::new();
    for _ in 0..10 {
        let reply = dev.recv_json().await;
        assert_eq!(reply["type"], "ack", "{reply}");
        *acks
            .entry(reply["id"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(acks.get("burst"), Some(&5));
    assert_eq!(acks.get("burst-batch"), Some(&5));

    let counts = gw.api().telemetry_counts("sensor-1").await;
    assert_eq!(counts.get("burst"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("burst-batch"), Some(&2), "{counts:?}");
}

#[tokio::test]
async fn message_ids_are_unique_per_device_not_globally() {
    let gw = Gateway::start(Options::new()).await;
    let a = gw.create_device("a").await;
    let b = gw.create_device("b").await;
    let mut dev_a = gw.connect(&a).await;
    let mut dev_b = gw.connect(&b).await;

    dev_a
        .send_acked(&json!({"type": "telemetry", "id": "m-1", "data": {"from": "a"}}))
        .await;
    dev_b
        .send_acked(&json!({"type": "telemetry", "id": "m-1", "data": {"from": "b"}}))
        .await;

    let api = gw.api();
    let from_a = api.telemetry_all("a", "").await;
    let from_b = api.telemetry_all("b", "").await;
    assert_eq!(from_a.len(), 1, "{from_a:?}");
    assert_eq!(from_b.len(), 1, "{from_b:?}");
    assert_eq!(from_a[0]["data"], json!({"from": "a"}));
    assert_eq!(from_b[0]["data"], json!({"from": "b"}));
}

#[tokio::test]
async fn bad_device_does_not_disturb_another() {
    let gw = Gateway::start(Options::new()).await;
    let good_token = gw.create_device("good").await;
    let bad_token = gw.create_device("bad").await;
    let mut good = gw.connect(&good_token).await;

    let good_side = async {
        for i in 0..80 {
            good.send_acked(
                &json!({"type": "telemetry", "id": format!("g-{i}"), "data": {"i": i}}),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let bad_side = async {
        let mut bad = gw.connect(&bad_token).await;
        for _ in 0..10 {
            bad.send_text("\u{1}garbage").await;
        }
        assert_eq!(bad.expect_close(CLOSE_WAIT).await.0, 1008);
        let mut bad = gw.connect(&bad_token).await;
        bad.send(Message::binary(vec![0u8; 4096])).await;
        assert_eq!(bad.expect_close(CLOSE_WAIT).await.0, 1003);
        let mut bad = gw.connect(&bad_token).await;
        // Far over the limit, in many TLS records: the device is still writing when the
        // gateway refuses the frame, and still gets 1009 (not a reset mid-write).
        bad.send_text(&"x".repeat(900_000)).await;
        assert_eq!(bad.expect_close(CLOSE_WAIT).await.0, 1009);
    };
    tokio::join!(good_side, bad_side);

    match good.next_event(Duration::from_millis(200)).await {
        Event::Timeout => {}
        other => panic!("the good device got {other:?}"),
    }
    let ids = gw.api().telemetry_counts("good").await;
    assert_eq!(ids.len(), 80);
    assert!(ids.values().all(|&n| n == 1));
}
