//! Storage under stress: a full disk under the real gateway (nothing acked that is not stored,
//! `internal` for the device, service goes on, recovery by itself once space returns), and
//! the WAL staying bounded under sustained telemetry with concurrent API reads and writes.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{eventually, json, Device, Event, Gateway, Options, Value};

/// Padding that makes each message need pages of its own, so a full disk is hit at once.
const PAD: usize = 2000;

fn padded(id: &str) -> Value {
    json!({"type": "telemetry", "id": id, "data": {"pad": "x".repeat(PAD)}})
}

/// Fills the file system holding `path` with one file until not even 512 bytes fit.
fn fill(path: &Path) -> u64 {
    let mut file =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut written = 0u64;
    for chunk in [1 << 20, 4096, 512] {
        let buf = vec![0xa5u8; chunk];
        loop {
            match file.write(&buf) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("fill {}: {e}", path.display()),
            }
        }
    }
    written
}

/// Sends `msg` and returns the gateway's answer to it (`ack` or `error`, carrying its id).
async fn answer(dev: &mut Device, msg: &Value) -> Value {
    let reply = dev.request(msg).await;
    assert_eq!(reply["id"], msg["id"], "answer to {}: {reply}", msg["id"]);
    reply
}

/// Asserts `reply` is the contract's storage error: `{"type":"error","id",...,"code":"internal","message"}`.
#[track_caller]
fn assert_internal(reply: &Value) {
    assert_eq!(reply["type"], "error", "expected an error, got {reply}");
    assert_eq!(reply["code"], "internal", "{reply}");
    assert!(
        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an error without a message: {reply}"
    );
}

/// Asserts a device's stored telemetry is exactly `ids`, each message once.
async fn assert_stored_once(gw: &Gateway, device: &str, ids: &HashSet<String>) {
    let counts = gw.api().telemetry_counts(device).await;
    for id in ids {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "{device}: {id} must be stored once"
        );
    }
    let extra: Vec<&String> = counts.keys().filter(|id| !ids.contains(*id)).collect();
    assert!(
        extra.is_empty(),
        "{device}: stored though never acked: {extra:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_answers_internal_and_recovers_when_space_returns() {
    let opts = Options::new().data_on_tmpfs("8m").args([
        "--telemetry-rate",
        "100000",
        "--telemetry-burst",
        "100000",
    ]);
    let mut gw = Gateway::start(opts).await;
    let data = gw.data_dir();
    let api = gw.api();
    let token_a = api.create_device("disk-a").await;
    let token_b = api.create_device("disk-b").await;
    let mut a = gw.connect(&token_a).await;
    let mut acked = HashSet::new();
    for i in 0..5 {
        let msg = padded(&format!("before-{i}"));
        a.send_acked(&msg).await;
        acked.insert(msg["id"].as_str().unwrap().to_string());
    }

    let filler = data.join("filler");
    let filled = fill(&filler);

    // The WAL may have room left for a commit or two; the first refusal must come soon.
    let mut refused = Vec::new();
    for i in 0..1000 {
        let id = format!("full-{i}");
        let reply = answer(&mut a, &padded(&id)).await;
        if reply["type"] == "ack" {
            acked.insert(id);
        } else {
            assert_internal(&reply);
            refused.push(id);
            break;
        }
    }
    assert_eq!(refused.len(), 1, "no `internal` with the disk full");
    let acked_while_full = acked.len() - 5;
    for i in 0..20 {
        let id = format!("refused-{i}");
        assert_internal(&answer(&mut a, &padded(&id)).await);
        refused.push(id);
    }

    // The rest of the gateway goes on: another device connects (its telemetry refused the
    // same way), reads are answered, the process is alive.
    let mut b = gw.connect(&token_b).await;
    assert_internal(&answer(&mut b, &padded("b-0")).await);
    assert_eq!(api.device("disk-a").await["online"], true);
    assert_stored_once(&gw, "disk-a", &acked).await;
    assert_eq!(api.get_root("/healthz").await.status, 200);
    // Alive, but not ready: a load balancer should send devices elsewhere meanwhile.
    let ready = api.get_root("/readyz").await;
    assert_eq!(
        ready.status, 503,
        "/readyz with the disk full: {}",
        ready.raw
    );
    assert!(gw.is_running(), "the gateway died with the disk full");

    // Space returns: the same connections, without a restart, are served again. The refused
    // messages re-sent under their ids are acked and stored once, new ones too.
    std::fs::remove_file(&filler).expect("remove the filler");
    // An API write goes through the write connection the failed commits left behind.
    api.create_device("disk-c").await;
    for id in &refused {
        a.send_acked(&padded(id)).await;
        acked.insert(id.clone());
    }
    for i in 0..5 {
        let msg = padded(&format!("after-{i}"));
        a.send_acked(&msg).await;
        acked.insert(msg["id"].as_str().unwrap().to_string());
    }
    b.send_acked(&padded("b-0")).await;
    assert_stored_once(&gw, "disk-a", &acked).await;
    assert_stored_once(&gw, "disk-b", &HashSet::from(["b-0".to_string()])).await;
    assert_eq!(api.get_root("/readyz").await.status, 200, "ready again");

    // SQLite cannot open the database through `/proc/PID/root` (it resolves the link to the
    // test's own view), so the check reads a copy, taken once the idle writer has emptied the
    // WAL into the database file (the writer made the last change, so nothing is left out).
    let wal = data.join("gateway.db-wal");
    eventually("the WAL truncated", Duration::from_secs(10), || {
        let bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
        std::future::ready((bytes == 0).then_some(()))
    })
    .await;
    let copy = tempfile::tempdir().expect("a temporary directory");
    let db = copy.path().join("gateway.db");
    std::fs::copy(data.join("gateway.db"), &db).expect("copy the database");
    assert_eq!(e2e::db::integrity_check(&db).await, ["ok"]);
    assert!(gw.is_running(), "the gateway died");
    let stderr = gw.stderr();
    assert!(
        !stderr.contains("panicked"),
        "the gateway panicked:\n{stderr}"
    );
    assert!(
        stderr.contains("database or disk is full"),
        "the failed commits are not logged:\n{stderr}"
    );
    // Logged when a run of failures starts (then at most every 10 s), not per batch: 22
    // refusals, a line or two (a small commit may fit in the WAL meanwhile, ending a run).
    let logged = stderr.matches("batch commit failed").count();
    assert!(
        (1..=3).contains(&logged),
        "{logged} failed-commit lines for {} refusals:\n{stderr}",
        refused.len() + 1
    );
    assert!(stderr.contains("commits succeed again"), "{stderr}");
    eprintln!(
        "full disk: {filled} filler bytes, {acked_while_full} acked after filling, {} + 1 \
         refused with `internal`, all stored once after the space returned",
        refused.len()
    );
}

/// Sustained telemetry from `DEVICES` devices with `WINDOW` messages in flight each.
const DEVICES: usize = 8;
const WINDOW: usize = 8;
const MESSAGES_PER_DEVICE: usize = 500;
/// The WAL limit the gateway runs with in the bound test (the smallest it accepts).
const WAL_MAX: u64 = 1 << 20;

/// Streams `count` messages with `WINDOW` in flight; every one must be acked.
async fn stream(mut dev: Device, device: String, count: usize) {
    let mut in_flight = 0;
    let mut sent = 0;
    let mut acked = 0;
    while acked < count {
        while in_flight < WINDOW && sent < count {
            let msg = json!({"type": "telemetry", "id": format!("w-{sent}"),
                             "data": {"n": sent, "pad": "y".repeat(300)}});
            dev.send_json(&msg).await;
            in_flight += 1;
            sent += 1;
        }
        match dev.next_event(Duration::from_secs(20)).await {
            Event::Json(reply) if reply["type"] == "ack" => {
                acked += 1;
                in_flight -= 1;
            }
            other => panic!("{device}: expected an ack, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_stays_bounded_under_load_with_concurrent_api_use_and_is_truncated_when_idle() {
    let opts = Options::new().args([
        "--telemetry-rate",
        "100000",
        "--telemetry-burst",
        "100000",
        "--wal-max-bytes",
        &WAL_MAX.to_string(),
    ]);
    let gw = Gateway::start(opts).await;
    let wal = gw.dir().join("data").join("gateway.db-wal");
    let api = gw.api();
    let mut streams = Vec::new();
    for i in 0..DEVICES {
        let device = format!("wal-{i}");
        let token = api.create_device(&device).await;
        let dev = gw.connect(&token).await;
        streams.push(tokio::spawn(stream(dev, device, MESSAGES_PER_DEVICE)));
    }

    let done = Arc::new(AtomicBool::new(false));
    let max_wal = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn({
        let (done, max_wal, wal) = (done.clone(), max_wal.clone(), wal.clone());
        async move {
            while !done.load(Ordering::SeqCst) {
                let bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
                max_wal.fetch_max(bytes, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    // Readers in every pool connection, and an operator creating devices (API writes share
    // the writer's connection): none of it may fail with a busy database.
    let mut readers = Vec::new();
    for r in 0..4 {
        let (api, done) = (api.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let mut reads = 0u64;
            while !done.load(Ordering::SeqCst) {
                let device = format!("wal-{}", (reads as usize + r) % DEVICES);
                let path = match reads % 3 {
                    0 => format!("/devices/{device}/telemetry?limit=200"),
                    1 => format!("/devices/{device}/telemetry/latest"),
                    _ => "/devices?limit=100".to_string(),
                };
                let resp = api.get(&path).await;
                assert!(
                    resp.status == 200 || (resp.status == 404 && path.ends_with("latest")),
                    "GET {path}: {} {}",
                    resp.status,
                    resp.raw
                );
                reads += 1;
            }
            reads
        }));
    }
    let creator = tokio::spawn({
        let (api, done) = (api.clone(), done.clone());
        async move {
            let mut created = 0u64;
            while !done.load(Ordering::SeqCst) {
                api.create_device(&format!("wal-extra-{created}")).await;
                created += 1;
            }
            created
        }
    });

    let started = Instant::now();
    for s in streams {
        s.await.expect("a streaming device failed");
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    let mut reads = 0;
    for r in readers {
        reads += r.await.expect("an API reader failed");
    }
    let created = creator.await.expect("device creation failed");
    let max = max_wal.load(Ordering::SeqCst);

    // Idle: the writer checkpoints and gives the WAL's space back.
    eventually(
        "the WAL truncated after the load",
        Duration::from_secs(10),
        || {
            let bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
            std::future::ready((bytes == 0).then_some(()))
        },
    )
    .await;
    let stored: usize = {
        let mut total = 0;
        for i in 0..DEVICES {
            total += api.telemetry_counts(&format!("wal-{i}")).await.len();
        }
        total
    };
    eprintln!(
        "WAL bound: {} messages acked in {:.1} s with {reads} concurrent API reads and \
         {created} devices created; largest WAL {max} bytes (limit {WAL_MAX}); 0 bytes once idle",
        DEVICES * MESSAGES_PER_DEVICE,
        elapsed.as_secs_f64()
    );
    assert_eq!(stored, DEVICES * MESSAGES_PER_DEVICE);
    assert!(reads > 0 && created > 0);
    // Past the limit by at most about one batch: the writer looks after every commit.
    assert!(
        max <= 2 * WAL_MAX,
        "the WAL reached {max} bytes with a limit of {WAL_MAX}"
    );
}
