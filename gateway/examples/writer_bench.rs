//! Benchmark of the storage path alone: the batching writer committing telemetry to SQLite.
//!
//! `cargo run --release -p gateway --example writer_bench -- [devices] [inflight] [seconds] [full|normal]`
//! Each simulated device keeps `inflight` messages waiting for their commit, like the
//! session does; prints committed messages per second and the batch sizes seen.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::config::Synchronous;
use gateway::device::protocol::Point;
use gateway::store::writer::{TelemetryJob, WriteJob, Writer, WriterConfig};
use gateway::store::Store;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (devices, inflight, seconds) = (arg(0, 100), arg(1, 8), arg(2, 10));
    let sync = match args.get(3).map(String::as_str) {
        Some("normal") => Synchronous::Normal,
        _ => Synchronous::Full,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/bench.db", dir.path().display());
    let store = Store::open(&url, sync, gateway::store::DEFAULT_WAL_MAX_BYTES)
        .await
        .expect("open");
    let (writer, task) = Writer::spawn(
        store,
        WriterConfig {
            max_rows: 4000,
            max_delay: Duration::ZERO,
            queue: 4096,
            idle_checkpoint: gateway::store::writer::IDLE_CHECKPOINT,
        },
        std::sync::Arc::new(gateway::events::Events::starting_now(10_000)),
    );
    let data = r#"{"temp":21.53,"humidity":40.21,"battery":88.12,"counter":12345,"state":"ok","site":"greenhouse-north-7","pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    let committed = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for d in 0..devices {
        let (writer, committed) = (writer.clone(), committed.clone());
        tasks.push(tokio::spawn(async move {
            let mut waiting = std::collections::VecDeque::new();
            let mut n = 0u64;
            while Instant::now() < stop {
                while waiting.len() < inflight as usize {
                    n += 1;
                    let (done, rx) = oneshot::channel();
                    let job = TelemetryJob {
                        device_pk: d as i64 + 1,
                        device_id: std::sync::Arc::from(format!("d{d}")),
                        msg_id: format!("m-{n}"),
                        points: vec![Point {
                            ts: None,
                            data: RawValue::from_string(data.to_string()).expect("json"),
                        }],
                        received_at: 1_795_600_800_000 + n as i64,
                        done,
                    };
                    writer
                        .submit(WriteJob::Telemetry(job))
                        .await
                        .expect("writer");
                    waiting.push_back(rx);
                }
                if let Some(rx) = waiting.pop_front() {
                    assert!(rx.await.expect("answer"), "commit failed");
                    committed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await.expect("device task");
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(writer);
    task.await.expect("writer task");
    let n = committed.load(Ordering::Relaxed);
    println!(
        "devices={devices} inflight={inflight} sync={sync:?}: {n} committed in {elapsed:.1}s = {:.0} msgs/s",
        n as f64 / elapsed
    );
}
