//! The telemetry query API: order, time bounds, pagination, key selection, aggregation, latest.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use e2e::api::encode;
use e2e::{assert_api_error, assert_rfc3339_ms, fmt_ms, json, Api, Gateway, Options, Value};

/// The first of ten points, one per second.
const T0: &str = "2025-06-01T12:00:00.000Z";
/// The order the ten points are sent in: not the order of their `ts`.
const SEND_ORDER: [i64; 10] = [3, 7, 0, 9, 1, 5, 2, 8, 4, 6];

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(T0)
        .unwrap()
        .with_timezone(&Utc)
}

fn at(secs: i64) -> String {
    fmt_ms(t0() + Duration::seconds(secs))
}

/// A gateway whose device `q-1` holds points `p-0`..`p-9` at `T0 + i s`.
async fn setup() -> (Gateway, Api) {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("q-1").await;
    let mut dev = gw.connect(&token).await;
    for i in SEND_ORDER {
        let data =
            json!({"temp": 20.5 + i as f64, "hum": 40.25 + i as f64, "label": format!("p{i}")});
        dev.send_acked(
            &json!({"type": "telemetry", "id": format!("p-{i}"), "ts": at(i), "data": data}),
        )
        .await;
    }
    dev.close().await;
    (gw, api)
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items array in {page}"))
        .iter()
        .map(|i| i["id"].as_str().expect("item id").to_string())
        .collect()
}

fn p(range: impl Iterator<Item = i64>) -> Vec<String> {
    range.map(|i| format!("p-{i}")).collect()
}

/// Follows `next_cursor` from `path` (which has a query string) and returns each page's items.
async fn pages(api: &Api, path: &str) -> Vec<Vec<Value>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}&cursor={}", encode(c)),
            None => path.to_string(),
        };
        let page = api.get(&url).await.expect(200);
        out.push(page["items"].as_array().expect("items").clone());
        assert!(out.len() <= 50, "paging {path} does not end");
        match &page["next_cursor"] {
            Value::Null => return out,
            Value::String(c) => cursor = Some(c.clone()),
            other => panic!("next_cursor is {other}"),
        }
    }
}

fn page_ids(pages: &[Vec<Value>]) -> Vec<Vec<String>> {
    pages
        .iter()
        .map(|p| {
            p.iter()
                .map(|i| i["id"].as_str().unwrap().to_string())
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn default_order_is_newest_first_with_contract_fields() {
    let (_gw, api) = setup().await;

    let page = api.get("/devices/q-1/telemetry").await.expect(200);
    assert_eq!(ids(&page), p((0..10).rev()));
    assert_eq!(page["next_cursor"], Value::Null);
    for item in page["items"].as_array().unwrap() {
        for field in ["id", "seq", "ts", "received_at", "data"] {
            assert!(item.get(field).is_some(), "item lacks {field}: {item}");
        }
        assert_eq!(item["seq"], 0);
        assert_rfc3339_ms(item["ts"].as_str().expect("ts string"));
        assert_rfc3339_ms(item["received_at"].as_str().expect("received_at string"));
        let i: i64 = item["id"].as_str().unwrap()[2..].parse().unwrap();
        assert_eq!(item["ts"], at(i));
        assert_eq!(
            item["data"],
            json!({"temp": 20.5 + i as f64, "hum": 40.25 + i as f64, "label": format!("p{i}")})
        );
    }
}

#[tokio::test]
async fn order_asc_is_oldest_first() {
    let (_gw, api) = setup().await;
    let page = api
        .get("/devices/q-1/telemetry?order=asc")
        .await
        .expect(200);
    assert_eq!(ids(&page), p(0..10));
    let page = api
        .get("/devices/q-1/telemetry?order=desc")
        .await
        .expect(200);
    assert_eq!(ids(&page), p((0..10).rev()));
}

#[tokio::test]
async fn from_is_inclusive_and_to_exclusive() {
    let (_gw, api) = setup().await;
    let range = format!("from={}&to={}", encode(&at(2)), encode(&at(5)));

    let page = api
        .get(&format!("/devices/q-1/telemetry?{range}"))
        .await
        .expect(200);
    assert_eq!(ids(&page), p((2..5).rev()));
    let page = api
        .get(&format!("/devices/q-1/telemetry?{range}&order=asc"))
        .await
        .expect(200);
    assert_eq!(ids(&page), p(2..5));

    let only_from = format!("/devices/q-1/telemetry?order=asc&from={}", encode(&at(8)));
    assert_eq!(ids(&api.get(&only_from).await.expect(200)), p(8..10));
    let only_to = format!("/devices/q-1/telemetry?order=asc&to={}", encode(&at(2)));
    assert_eq!(ids(&api.get(&only_to).await.expect(200)), p(0..2));
    // Offsets other than Z mean the same instant.
    let shifted = (t0() + Duration::seconds(8))
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339();
    let page = api
        .get(&format!(
            "/devices/q-1/telemetry?order=asc&from={}",
            encode(&shifted)
        ))
        .await
        .expect(200);
    assert_eq!(ids(&page), p(8..10));
}

#[tokio::test]
async fn limit_and_cursor_cover_every_point_once_in_both_orders() {
    let (_gw, api) = setup().await;

    let desc = pages(&api, "/devices/q-1/telemetry?limit=3").await;
    assert_eq!(
        page_ids(&desc),
        vec![
            p(7..10).into_iter().rev().collect(),
            p((4..7).rev()),
            p((1..4).rev()),
            p(0..1)
        ]
    );
    let asc = pages(&api, "/devices/q-1/telemetry?limit=3&order=asc").await;
    assert_eq!(page_ids(&asc), vec![p(0..3), p(3..6), p(6..9), p(9..10)]);

    // A cursor keeps the query's bounds.
    let bounded = format!(
        "/devices/q-1/telemetry?limit=2&order=asc&from={}&to={}",
        encode(&at(2)),
        encode(&at(7))
    );
    let flat: Vec<String> = page_ids(&pages(&api, &bounded).await).concat();
    assert_eq!(flat, p(2..7));
}

#[tokio::test]
async fn a_full_last_page_has_a_null_cursor() {
    let (_gw, api) = setup().await;

    let one = api.get("/devices/q-1/telemetry?limit=10").await.expect(200);
    assert_eq!(ids(&one).len(), 10);
    assert_eq!(
        one["next_cursor"],
        Value::Null,
        "all 10 points fit in limit=10"
    );

    let two = pages(&api, "/devices/q-1/telemetry?limit=5").await;
    assert_eq!(
        two.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![5, 5],
        "10 points with limit=5"
    );
}

#[tokio::test]
async fn paging_through_equal_timestamps_loses_and_repeats_nothing() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("ties").await;
    let mut dev = gw.connect(&token).await;
    let ts = at(0);
    let points: Vec<Value> = (0..5)
        .map(|i| json!({"ts": ts, "data": {"i": i}}))
        .collect();
    dev.send_acked(&json!({"type": "telemetry", "id": "batch", "points": points}))
        .await;
    for id in ["single-a", "single-b"] {
        dev.send_acked(&json!({"type": "telemetry", "id": id, "ts": ts, "data": {"i": 9}}))
            .await;
    }

    for order in ["asc", "desc"] {
        let all: Vec<(String, u64)> = pages(
            &api,
            &format!("/devices/ties/telemetry?limit=2&order={order}"),
        )
        .await
        .concat()
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_string(),
                i["seq"].as_u64().unwrap(),
            )
        })
        .collect();
        let unique: HashSet<_> = all.iter().cloned().collect();
        assert_eq!(all.len(), 7, "order={order}: {all:?}");
        assert_eq!(unique.len(), 7, "order={order} repeats: {all:?}");
    }
}

#[tokio::test]
async fn keys_keeps_only_the_named_keys() {
    let (_gw, api) = setup().await;

    let page = api
        .get("/devices/q-1/telemetry?keys=temp,label")
        .await
        .expect(200);
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 10);
    for item in items {
        let i: i64 = item["id"].as_str().unwrap()[2..].parse().unwrap();
        assert_eq!(
            item["data"],
            json!({"temp": 20.5 + i as f64, "label": format!("p{i}")})
        );
    }
    let page = api
        .get("/devices/q-1/telemetry?keys=hum&limit=1")
        .await
        .expect(200);
    assert_eq!(page["items"][0]["data"], json!({"hum": 49.25}));
}

/// Points for aggregation around `T0` (a whole minute): `(seconds after T0, data)`, in send order.
fn agg_points() -> Vec<(i64, Value)> {
    vec![
        (10, json!({"temp": 10.0, "door": "open"})),
        (50, json!({"temp": 30.0})),
        (20, json!({"temp": 20.0})),
        (30, json!({"temp": "hot", "hum": 50.0})),
        (70, json!({"temp": 50.0, "hum": 60.0})),
        (65, json!({"temp": 40.0, "door": "closed"})),
        // nothing in the minute starting at T0 + 120 s
        (185, json!({"temp": 5.0})),
    ]
}

async fn setup_agg() -> (Gateway, Api) {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("agg-1").await;
    let mut dev = gw.connect(&token).await;
    for (n, (secs, data)) in agg_points().into_iter().enumerate() {
        dev.send_acked(
            &json!({"type": "telemetry", "id": format!("a-{n}"), "ts": at(secs), "data": data}),
        )
        .await;
    }
    (gw, api)
}

/// `ts` → `values` of an aggregate query (from `T0 + 5 s`, so alignment to `from` would show).
async fn aggregate(api: &Api, interval: &str, agg: &str) -> HashMap<String, Value> {
    let path = format!(
        "/devices/agg-1/telemetry?interval={interval}&agg={agg}&from={}&to={}",
        encode(&at(5)),
        encode(&at(600))
    );
    let page = api.get(&path).await.expect(200);
    let items = page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {page}"));
    let mut out = HashMap::new();
    for item in items {
        let ts = item["ts"]
            .as_str()
            .unwrap_or_else(|| panic!("row without ts: {item}"));
        assert_rfc3339_ms(ts);
        assert!(item["values"].is_object(), "row without values: {item}");
        assert!(
            out.insert(ts.to_string(), item["values"].clone()).is_none(),
            "two rows for {ts}"
        );
    }
    out
}

#[track_caller]
fn assert_num(v: &Value, expected: f64) {
    let got = v
        .as_f64()
        .unwrap_or_else(|| panic!("{v} is not a number (expected {expected})"));
    assert!(
        (got - expected).abs() < 1e-9,
        "got {got}, expected {expected}"
    );
}

/// `(agg, temp per minute, hum per minute (None: no numeric value that minute))`.
type AggCase = (&'static str, [f64; 3], [Option<f64>; 3]);

#[tokio::test]
async fn aggregates_per_epoch_aligned_interval() {
    let (_gw, api) = setup_agg().await;
    let minutes = [at(0), at(60), at(180)];

    let cases: [AggCase; 6] = [
        ("avg", [20.0, 45.0, 5.0], [Some(50.0), Some(60.0), None]),
        ("min", [10.0, 40.0, 5.0], [Some(50.0), Some(60.0), None]),
        ("max", [30.0, 50.0, 5.0], [Some(50.0), Some(60.0), None]),
        ("sum", [60.0, 90.0, 5.0], [Some(50.0), Some(60.0), None]),
        ("count", [3.0, 2.0, 1.0], [Some(1.0), Some(1.0), None]),
        ("last", [30.0, 50.0, 5.0], [Some(50.0), Some(60.0), None]),
    ];
    for (agg, temps, hums) in cases {
        let rows = aggregate(&api, "60s", agg).await;
        let mut got: Vec<&String> = rows.keys().collect();
        got.sort();
        assert_eq!(
            got,
            minutes.iter().collect::<Vec<_>>(),
            "agg={agg}: interval starts (empty minute left out)"
        );
        for ((minute, temp), hum) in minutes.iter().zip(temps).zip(hums) {
            let values = &rows[minute];
            assert_num(&values["temp"][agg], temp);
            match hum {
                Some(h) => assert_num(&values["hum"][agg], h),
                None => assert!(values.get("hum").is_none(), "agg={agg} {minute}: {values}"),
            }
            assert!(
                values.get("door").is_none(),
                "non-numeric key aggregated: {values}"
            );
        }
    }

    // Two-minute intervals start at even minutes since the epoch.
    let rows = aggregate(&api, "2m", "count").await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_num(&rows[&at(0)]["temp"]["count"], 5.0);
    assert_num(&rows[&at(120)]["temp"]["count"], 1.0);

    // Seven-second intervals: epoch-aligned starts are multiples of 7 s since 1970.
    let rows = aggregate(&api, "7s", "count").await;
    for ts in rows.keys() {
        let ms = DateTime::parse_from_rfc3339(ts).unwrap().timestamp_millis();
        assert_eq!(
            ms % 7000,
            0,
            "interval start {ts} is not aligned to the epoch"
        );
    }
    let total: f64 = rows
        .values()
        .map(|v| v["temp"]["count"].as_f64().unwrap_or(0.0))
        .sum();
    assert_num(&json!(total), 6.0);
}

#[tokio::test]
async fn latest_is_the_newest_ts_and_404_without_points() {
    let (gw, api) = setup().await;

    let latest = api.get("/devices/q-1/telemetry/latest").await.expect(200);
    assert_eq!(
        latest["id"], "p-9",
        "newest ts, although p-6 was received last: {latest}"
    );
    assert_eq!(latest["ts"], at(9));
    assert_eq!(latest["seq"], 0);
    assert_eq!(latest["data"]["label"], "p9");
    assert_rfc3339_ms(latest["received_at"].as_str().expect("received_at"));

    api.create_device("empty").await;
    assert_api_error(
        &api.get("/devices/empty/telemetry/latest").await,
        404,
        "not_found",
    );
    drop(gw);
}

#[tokio::test]
async fn invalid_query_values_are_400() {
    let (_gw, api) = setup().await;

    for query in [
        "limit=abc",
        "limit=-1",
        "limit=2.5",
        "order=sideways",
        "from=yesterday",
        "to=2025-13-45T00:00:00Z",
        "cursor=%21%21bogus%21%21",
        "interval=abc&agg=avg",
        "interval=60s&agg=median",
    ] {
        let resp = api.get(&format!("/devices/q-1/telemetry?{query}")).await;
        assert_api_error(&resp, 400, "bad_request");
    }
}
