//! Crash safety: every acked message survives `kill -9` and a graceful `SIGTERM`, stored once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::{json, Device, Event, Gateway, Options, Value};

/// Messages each device keeps in flight.
const WINDOW: usize = 4;
/// How long the streaming phase may last at most (the gateway is stopped well before).
const STREAM_LIMIT: Duration = Duration::from_secs(15);

/// What one streaming device saw.
struct Outcome {
    device: String,
    /// Acked message ids with their number of points.
    acked: HashMap<String, usize>,
    /// Every message id sent, with its number of points.
    sent: HashMap<String, usize>,
    /// The close code, when the gateway sent a close frame.
    close_code: Option<u16>,
    /// Why streaming stopped.
    end: String,
    /// Whether streaming stopped before the gateway was told to stop.
    ended_early: bool,
    /// The device's token, for reconnecting.
    token: String,
}

/// Streams telemetry as fast as acks allow, `WINDOW` messages in flight, until the connection
/// ends; every fifth message is a batch of three points.
async fn stream(device: String, token: String, dev: Device, stopping: Arc<AtomicBool>) -> Outcome {
    let mut out = Outcome {
        device,
        acked: HashMap::new(),
        sent: HashMap::new(),
        close_code: None,
        end: String::new(),
        ended_early: false,
        token,
    };
    stream_until_end(&mut out, dev).await;
    out.ended_early = !stopping.load(Ordering::SeqCst);
    out
}

async fn stream_until_end(out: &mut Outcome, mut dev: Device) {
    let device = out.device.clone();
    let mut in_flight = 0;
    let mut n = 0u64;
    let deadline = tokio::time::Instant::now() + STREAM_LIMIT;
    loop {
        while in_flight < WINDOW {
            let id = format!("{device}-m{n}");
            let msg = if n % 5 == 4 {
                let points: Vec<Value> =
                    (0..3).map(|k| json!({"data": {"n": n, "k": k}})).collect();
                json!({"type": "telemetry", "id": id, "points": points})
            } else {
                json!({"type": "telemetry", "id": id, "data": {"n": n, "temp": 20.5}})
            };
            let points = msg["points"].as_array().map_or(1, Vec::len);
            if let Err(e) = dev.try_send_json(&msg).await {
                out.end = format!("send failed after {n} messages: {e}");
                // A close frame may be waiting behind the failed write.
                if let Event::Close { code, .. } = dev.next_event(Duration::from_secs(2)).await {
                    out.close_code = code;
                }
                return;
            }
            out.sent.insert(id, points);
            in_flight += 1;
            n += 1;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match dev.next_event(left.min(Duration::from_secs(10))).await {
            Event::Json(reply) => {
                let id = reply["id"].as_str().unwrap_or_default().to_string();
                match reply["type"].as_str() {
                    Some("ack") => {
                        let points = *out
                            .sent
                            .get(&id)
                            .unwrap_or_else(|| panic!("ack for unsent {id}"));
                        assert!(
                            out.acked.insert(id, points).is_none(),
                            "{device}: acked twice: {reply}"
                        );
                    }
                    // `internal` or a rate limit: the message is not stored, which is allowed.
                    Some("error") => {}
                    _ => panic!("{device}: unexpected message {reply}"),
                }
                in_flight -= 1;
            }
            Event::Close { code, reason } => {
                out.close_code = code;
                out.end = format!("close {code:?} {reason:?}");
                return;
            }
            other => {
                out.end = format!("{other:?}");
                return;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            out.end = "stream limit reached".into();
            return;
        }
    }
}

/// Creates `count` devices, connects them and starts streaming; returns the tasks.
async fn start_streaming(
    gw: &Gateway,
    count: usize,
    stopping: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Outcome>> {
    let api = gw.api();
    let mut tasks = Vec::new();
    for i in 0..count {
        let id = format!("crash-{i:02}");
        let token = api.create_device(&id).await;
        let dev = gw.connect(&token).await;
        tasks.push(tokio::spawn(stream(id, token, dev, stopping.clone())));
    }
    tasks
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Outcome>>) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("streaming task panicked"));
    }
    outcomes
}

/// Checks through the API that every acked message is stored exactly once (all its points,
/// each `seq` once) and that nothing sent is stored twice.
async fn assert_acked_stored_once(gw: &Gateway, outcomes: &[Outcome]) {
    let api = gw.api();
    let mut total_acked = 0;
    let mut total_stored = 0;
    for o in outcomes {
        let items = api.telemetry_all(&o.device, "order=asc").await;
        let mut rows: HashMap<String, Vec<u64>> = HashMap::new();
        for item in &items {
            let id = item["id"].as_str().expect("item id").to_string();
            rows.entry(id)
                .or_default()
                .push(item["seq"].as_u64().expect("seq"));
        }
        for (id, points) in &o.acked {
            let mut seqs = rows.get(id).cloned().unwrap_or_default();
            seqs.sort_unstable();
            let expected: Vec<u64> = (0..*points as u64).collect();
            assert_eq!(
                seqs, expected,
                "{}: acked message {id} stored as seqs {seqs:?}",
                o.device
            );
        }
        for (id, seqs) in &rows {
            let points = o
                .sent
                .get(id)
                .unwrap_or_else(|| panic!("{}: stored {id} was never sent", o.device));
            assert!(
                seqs.len() <= *points,
                "{}: {id} stored {} times for {points} points",
                o.device,
                seqs.len()
            );
        }
        total_acked += o.acked.len();
        total_stored += rows.len();
    }
    let total_sent: usize = outcomes.iter().map(|o| o.sent.len()).sum();
    eprintln!("{total_sent} messages sent, {total_acked} acked, {total_stored} stored");
    assert!(total_acked > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_telemetry_survives_kill_9() {
    let opts = Options::new().args(["--telemetry-rate", "100000", "--telemetry-burst", "100000"]);
    let gw = Gateway::start(opts).await;
    let stopping = Arc::new(AtomicBool::new(false));
    let tasks = start_streaming(&gw, 20, &stopping).await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    stopping.store(true, Ordering::SeqCst);
    let stopped = gw.kill9().await;
    let outcomes = collect(tasks).await;
    for o in &outcomes {
        assert!(
            o.acked.len() >= 5,
            "{} got only {} acks in 3 s ({})",
            o.device,
            o.acked.len(),
            o.end
        );
        assert!(
            !o.ended_early,
            "{} stopped before the kill: {}",
            o.device, o.end
        );
    }

    let gw = stopped.start().await;
    assert_acked_stored_once(&gw, &outcomes).await;
    // Nobody has reconnected: no device may still show as online after the crash.
    let online = gw.api().get("/devices?online=true").await.expect(200);
    assert_eq!(
        online["items"],
        json!([]),
        "online after a crash and restart"
    );
    assert_eq!(gw.api().device(&outcomes[0].device).await["online"], false);

    // A device that never saw its ack re-sends after reconnecting: acked again, still once.
    let first = &outcomes[0];
    let (resend_id, points) = first.acked.iter().next().unwrap();
    let mut dev = gw.connect(&first.token).await;
    let msg = if *points == 1 {
        json!({"type": "telemetry", "id": resend_id, "data": {"again": true}})
    } else {
        let pts: Vec<Value> = (0..*points)
            .map(|_| json!({"data": {"again": true}}))
            .collect();
        json!({"type": "telemetry", "id": resend_id, "points": pts})
    };
    dev.send_acked(&msg).await;
    let counts = gw.api().telemetry_counts(&first.device).await;
    assert_eq!(counts.get(resend_id.as_str()), Some(points));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_devices_with_1001_and_keeps_acked_telemetry() {
    let opts = Options::new().args(["--telemetry-rate", "100000", "--telemetry-burst", "100000"]);
    let gw = Gateway::start(opts).await;
    let stopping = Arc::new(AtomicBool::new(false));
    let tasks = start_streaming(&gw, 10, &stopping).await;

    tokio::time::sleep(Duration::from_millis(1500)).await;
    stopping.store(true, Ordering::SeqCst);
    gw.sigterm();
    let outcomes = collect(tasks).await;
    let stopped = gw.wait_exit().await;
    assert!(
        stopped.status.success(),
        "gateway exit after SIGTERM: {} ; stderr:\n{}",
        stopped.status,
        stopped.stderr
    );
    assert_eq!(stopped.status.code(), Some(0));
    for o in &outcomes {
        assert!(
            !o.ended_early,
            "{} stopped before SIGTERM: {}",
            o.device, o.end
        );
        assert_eq!(o.close_code, Some(1001), "{}: {}", o.device, o.end);
        assert!(!o.acked.is_empty(), "{} got no acks", o.device);
    }

    let gw = stopped.start().await;
    assert_acked_stored_once(&gw, &outcomes).await;
    for o in &outcomes {
        let device = gw.api().device(&o.device).await;
        assert_eq!(device["online"], false);
        assert_eq!(
            device["last_disconnect_reason"], "server_shutdown",
            "{device}"
        );
    }
}
