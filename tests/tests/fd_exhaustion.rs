//! Out of file descriptors: the accept loop backs off instead of crashing or spinning, the
//! devices already connected keep being served, and new devices get in again once
//! descriptors are free.

use std::time::{Duration, Instant};

use e2e::{json, Gateway, Options};
use tokio::net::TcpStream;

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the gateway's fd folder")
        .count()
}

/// User plus system CPU time of a process, in clock ticks (100 per second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("comm field")
        .1
        .split_whitespace()
        .collect();
    // After `pid (comm)`: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn set_open_files_limit(pid: u32, files: usize) {
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={files}:{files}"),
        ])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit --pid {pid} failed");
}

#[tokio::test]
async fn running_out_of_descriptors_backs_off_serves_the_connected_and_recovers() {
    let gw = Gateway::start(Options::new().args(["--handshake-timeout", "2s"])).await;
    let token = gw.create_device("sensor-1").await;
    let late_token = gw.create_device("sensor-2").await;
    let mut dev = gw.connect(&token).await;
    let addr = gw.connect_request().addr();

    // A few descriptors of headroom, then a flood of idle sockets to take them all.
    let baseline = open_files(gw.pid);
    set_open_files_limit(gw.pid, baseline + 8);
    let mut flood = Vec::new();
    for _ in 0..64 {
        // The kernel completes the TCP handshake from the backlog whether or not the
        // gateway can accept.
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
        {
            flood.push(s);
        }
    }
    assert!(
        flood.len() >= 20,
        "only {} flood sockets opened",
        flood.len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Out of descriptors for 2 s: no spinning (a busy accept loop burns a core).
    let (ticks, started) = (cpu_ticks(gw.pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = (cpu_ticks(gw.pid) - ticks) as f64 / 100.0;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        used < 0.5 * elapsed,
        "the gateway used {used:.2} s of CPU in {elapsed:.2} s while out of descriptors"
    );
    // Logged when it starts, not at every retry (and counted in /metrics, read below: the API
    // too needs a descriptor for each new connection).
    let stderr = gw.stderr();
    let warnings = stderr.matches("accept failed; backing off").count();
    assert_eq!(warnings, 1, "back-off warnings:\n{stderr}");

    // The connected device is still served, acks and all.
    let ack = dev
        .request(&json!({"type": "telemetry", "id": "m-1", "data": {"temp": 20}}))
        .await;
    assert_eq!(ack, json!({"type": "ack", "id": "m-1"}));

    // Freed descriptors: the flood goes away (or times out), and a new device gets in.
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(15);
    let late = loop {
        match gw
            .connect_request()
            .bearer(&late_token)
            .try_exchange()
            .await
        {
            Ok(101) => {
                break gw
                    .connect_request()
                    .bearer(&late_token)
                    .send()
                    .await
                    .device()
            }
            other if Instant::now() > deadline => {
                panic!(
                    "no new device got in after the flood: {other:?}\n{}",
                    gw.stderr()
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(late.welcome["device_id"], "sensor-2");
    assert!(
        gw.stderr().contains("accepting connections again"),
        "{}",
        gw.stderr()
    );
    assert!(gw.api().get("/devices/sensor-1").await.status == 200);
    let metrics = gw.api().with_key(None).get_root("/metrics").await.raw;
    let failures: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gateway_accept_failures_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no gateway_accept_failures_total in:\n{metrics}"));
    assert!(failures >= 10.0, "{failures} failed accepts counted");
}
