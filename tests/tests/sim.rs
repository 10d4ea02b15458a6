//! The device simulator (`device-sim`) run as a process against a real gateway: its fleet comes
//! online and its telemetry is stored, its devices answer commands sent through the API, readings
//! taken while the gateway is down arrive after it is back without gap or duplicate, a fleet
//! that lost its gateway comes back spread out, its `--json` summary, the README's demo, and
//! `idle`, `bench` and `run` spread over processes when one may not open enough files.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use e2e::sim::{
    assert_gapless, device_addr, fleet_ids, online_ids, stored_counters, wait_all_online,
    wait_none_online, Relay, Sim,
};
use e2e::{assert_close_to_now, assert_rfc3339_ms, eventually, json, time_field};
use e2e::{Api, Cli, Gateway, Options, Value};

/// How long a fleet may take to be online (it is provisioned first).
const ONLINE_WAIT: Duration = Duration::from_secs(30);

/// The fields of `device-sim run --json`.
const SUMMARY_FIELDS: [&str; 15] = [
    "devices",
    "online",
    "sent",
    "acked",
    "ack_p50_ms",
    "ack_p99_ms",
    "errors",
    "reconnects",
    "commands",
    "resent",
    "dropped",
    "rejected",
    "unsent",
    "chaos_disconnects",
    "duplicates_sent",
];

fn count(summary: &Value, field: &str) -> u64 {
    summary[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a count in {summary}"))
}

/// `POST /v1/devices/{device}/commands` with `wait_s`, asserting `201` (final within the wait).
async fn command(api: &Api, device: &str, body: Value) -> Value {
    api.post(&format!("/devices/{device}/commands"), &body)
        .await
        .expect(201)
}

/// Stored telemetry items of a device, oldest first.
async fn stored(api: &Api, device: &str) -> Vec<Value> {
    api.telemetry_all(device, "order=asc").await
}

#[tokio::test]
async fn every_device_comes_online_and_its_readings_are_stored() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let ids = fleet_ids("sim", 20);
    let sim = Sim::against(&gw)
        .args(["--provision", "run", "--devices", "20", "--rate", "5"])
        .spawn();

    wait_all_online(&api, &ids, ONLINE_WAIT).await;
    assert_eq!(online_ids(&api).await, ids, "exactly the fleet is online");
    let device = api.device("sim-00007").await;
    assert_eq!(device["metadata"]["simulated"], true, "{device}");

    eventually("5 readings of every device stored", ONLINE_WAIT, || async {
        for id in &ids {
            if stored(&api, id).await.len() < 5 {
                return None;
            }
        }
        Some(())
    })
    .await;
    let latest = api
        .get("/devices/sim-00007/telemetry/latest")
        .await
        .expect(200);
    let data = &latest["data"];
    let temp = data["temp"].as_f64().expect("temp");
    assert!((-20.0..=50.0).contains(&temp), "{latest}");
    for key in ["humidity", "battery"] {
        let value = data[key].as_f64().unwrap_or(-1.0);
        assert!((0.0..=100.0).contains(&value), "{key} in {latest}");
    }
    assert!(data["counter"].is_u64(), "{latest}");
    assert_eq!(data["state"], "ok", "{latest}");
    assert_close_to_now(time_field(&latest, "ts"), Duration::from_secs(5));

    let tokens: Value = serde_json::from_slice(
        &std::fs::read(gw.dir().join("data/sim-tokens.json")).expect("the tokens file"),
    )
    .expect("the tokens file is JSON");
    assert_eq!(tokens.as_object().map(|t| t.len()), Some(20), "{tokens}");

    let out = sim.terminate().await;
    out.success();
    let line = out.stdout.join("\n");
    assert!(line.starts_with("online=20/20 "), "summary line: {line}");
    assert!(line.contains(" errors=0 "), "summary line: {line}");
    let secret = tokens["sim-00007"].as_str().expect("a token");
    assert!(
        !out.stderr.contains(secret) && !line.contains(secret),
        "a token was printed"
    );

    // Stopped devices close their connections, and what they stored is each device's readings
    // from the first on, each once.
    wait_none_online(&api, ONLINE_WAIT).await;
    assert_eq!(
        api.device("sim-00007").await["last_disconnect_reason"],
        "client_closed"
    );
    for id in &ids {
        assert_gapless(id, &stored_counters(&api, id).await);
    }
}

#[tokio::test]
async fn commands_sent_through_the_api_are_answered_by_simulated_devices() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    // --rate 0: no telemetry until a set_interval command asks for it.
    let sim = Sim::against(&gw)
        .args(["--provision", "run", "--devices", "2", "--rate", "0"])
        .spawn();
    wait_all_online(&api, &fleet_ids("sim", 2), ONLINE_WAIT).await;

    let ping = command(&api, "sim-00001", json!({"name": "ping", "wait_s": 10})).await;
    assert_eq!(ping["status"], "succeeded", "{ping}");
    assert_eq!(ping["result"]["pong"], true, "{ping}");
    let pong_ts = ping["result"]["ts"].as_str().expect("result.ts");
    assert_close_to_now(assert_rfc3339_ms(pong_ts), Duration::from_secs(5));

    let fail = json!({"name": "fail", "params": {"error": "disk full"}, "wait_s": 10});
    let failed = command(&api, "sim-00001", fail).await;
    assert_eq!(
        (&failed["status"], &failed["error"]),
        (&json!("failed"), &json!("disk full")),
        "{failed}"
    );

    let unknown = command(
        &api,
        "sim-00001",
        json!({"name": "self_destruct", "wait_s": 10}),
    )
    .await;
    assert_eq!(
        (&unknown["status"], &unknown["error"]),
        (&json!("rejected"), &json!("unknown command")),
        "{unknown}"
    );

    assert!(stored(&api, "sim-00002").await.is_empty());
    let every_100ms = json!({"name": "set_interval", "params": {"interval_ms": 100}, "wait_s": 10});
    let set = command(&api, "sim-00002", every_100ms).await;
    assert_eq!(set["status"], "succeeded", "{set}");
    assert_eq!(set["result"]["interval_ms"], 100, "{set}");
    eventually(
        "sim-00002 sends telemetry after set_interval",
        Duration::from_secs(10),
        || async { (stored(&api, "sim-00002").await.len() >= 5).then_some(()) },
    )
    .await;
    assert!(
        stored(&api, "sim-00001").await.is_empty(),
        "only sim-00002 was told to send"
    );

    let reboot = command(
        &api,
        "sim-00001",
        json!({"name": "reboot", "params": {"delay_s": 0.5}, "wait_s": 10}),
    )
    .await;
    assert_eq!(reboot["status"], "succeeded", "{reboot}");
    assert_eq!(
        reboot["result"],
        json!({"rebooting": true, "delay_s": 0.5}),
        "{reboot}"
    );
    // It closes its connection itself, and is back on a new one.
    let sessions = eventually("sim-00001 back after its reboot", ONLINE_WAIT, || async {
        let sessions = api.get("/devices/sim-00001/sessions").await.expect(200)["items"].clone();
        let items = sessions.as_array()?;
        (items.len() == 2 && items[0]["disconnected_at"].is_null()).then(|| items.clone())
    })
    .await;
    assert_eq!(
        sessions[1]["disconnect_reason"], "client_closed",
        "{sessions:?}"
    );
    let offline = time_field(&sessions[1], "disconnected_at");
    let back = time_field(&sessions[0], "connected_at");
    assert!(
        back - offline >= chrono::TimeDelta::milliseconds(400),
        "offline {offline} -> back {back}: shorter than the reboot's delay"
    );

    let out = sim.terminate().await;
    out.success();
    let line = out.stdout.join("\n");
    assert!(line.contains(" commands=5"), "summary line: {line}");
}

#[tokio::test]
async fn readings_taken_while_the_gateway_is_down_arrive_after_it_is_back_without_gap_or_duplicate()
{
    let gw = Gateway::start(Options::new()).await;
    let relay = Relay::start(Some(device_addr(&gw))).await;
    let ids = fleet_ids("sim", 10);
    let sim = Sim::new(gw.dir())
        .args(["--url", &relay.device_url(), "--api-url", &gw.api_url])
        .env("GATEWAY_API_KEY", &gw.api_key)
        .args([
            "--provision",
            "run",
            "--devices",
            "10",
            "--rate",
            "10",
            "--json",
        ])
        .spawn();
    wait_all_online(&gw.api(), &ids, ONLINE_WAIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A graceful restart: devices are closed with 1001 and keep taking readings meanwhile.
    let stopped = gw.terminate().await;
    assert!(stopped.status.success(), "{}", stopped.stderr);
    relay.set_backend(None);
    let gone_at = Utc::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let back_at = Utc::now();
    let gw = stopped.start().await;
    relay.set_backend(Some(device_addr(&gw)));
    let api = gw.api();
    wait_all_online(&api, &ids, ONLINE_WAIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let summary = sim.terminate().await.summary();
    assert_eq!(count(&summary, "dropped"), 0, "{summary}");
    assert_eq!(count(&summary, "rejected"), 0, "{summary}");
    assert!(count(&summary, "reconnects") >= 10, "{summary}");

    for id in &ids {
        let items = stored(&api, id).await;
        let counters = stored_counters(&api, id).await;
        assert_gapless(id, &counters);
        // 4 s at 10 readings/s, give or take the connects.
        assert!(
            counters.len() >= 30,
            "{id}: only {} readings",
            counters.len()
        );
        let offline: Vec<&Value> = items
            .iter()
            .filter(|item| {
                let ts = time_field(item, "ts");
                ts >= gone_at && ts < back_at
            })
            .collect();
        assert!(
            offline.len() >= 15,
            "{id}: {} readings taken in the 2 s the gateway was down",
            offline.len()
        );
        for item in offline {
            assert!(
                time_field(item, "received_at") >= back_at,
                "{id}: {item} was received while the gateway was down"
            );
        }
    }
}

#[tokio::test]
async fn a_fleet_that_lost_its_gateway_comes_back_spread_out_not_in_a_wave() {
    const DEVICES: usize = 50;
    let gw = Gateway::start(Options::new()).await;
    let relay = Relay::start(Some(device_addr(&gw))).await;
    let ids = fleet_ids("sim", DEVICES);
    let sim = Sim::new(gw.dir())
        .args(["--url", &relay.device_url(), "--api-url", &gw.api_url])
        .env("GATEWAY_API_KEY", &gw.api_key)
        .args([
            "--provision",
            "run",
            "--devices",
            "50",
            "--rate",
            "10",
            "--json",
        ])
        .spawn();
    wait_all_online(&gw.api(), &ids, ONLINE_WAIT).await;

    // kill -9: every connection drops at the same instant, the worst case for a reconnect wave.
    let stopped = gw.kill9().await;
    relay.set_backend(None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gw = stopped.start().await;
    let back_at = Utc::now();
    relay.set_backend(Some(device_addr(&gw)));
    let api = gw.api();
    wait_all_online(&api, &ids, Duration::from_secs(60)).await;

    let mut reconnected: Vec<i64> = Vec::new();
    for id in &ids {
        let sessions = api
            .get(&format!("/devices/{id}/sessions"))
            .await
            .expect(200);
        let newest = &sessions["items"][0];
        let at: DateTime<Utc> = time_field(newest, "connected_at");
        assert!(
            at >= back_at,
            "{id}: newest session {newest} is not after the restart"
        );
        reconnected.push((at - back_at).num_milliseconds());
    }
    reconnected.sort_unstable();
    let spread = reconnected[DEVICES - 1] - reconnected[0];
    let busiest_100ms = reconnected
        .iter()
        .map(|start| {
            reconnected
                .iter()
                .filter(|t| (*start..start + 100).contains(*t))
                .count()
        })
        .max()
        .unwrap_or(0);
    eprintln!(
        "reconnects after the restart: first {} ms, last {} ms, spread {spread} ms, \
         at most {busiest_100ms} in 100 ms: {reconnected:?}",
        reconnected[0],
        reconnected[DEVICES - 1]
    );
    assert!(
        spread >= 1000,
        "{DEVICES} devices reconnected within {spread} ms: {reconnected:?}"
    );
    // Without jitter (retries in lockstep) 36 of the 50 came back within one 100 ms; with full
    // jitter it is typically 5 to 7, and more than 12 about once in 10,000 runs (simulated).
    assert!(
        busiest_100ms <= DEVICES / 4,
        "{busiest_100ms} of {DEVICES} devices reconnected within the same 100 ms: {reconnected:?}"
    );

    // And nothing was lost or stored twice across the crash: unacked messages were sent again.
    let summary = sim.terminate().await.summary();
    eprintln!("summary: {summary}");
    assert!(count(&summary, "reconnects") >= DEVICES as u64, "{summary}");
    assert_eq!(count(&summary, "dropped"), 0, "{summary}");
    for id in &ids {
        assert_gapless(id, &stored_counters(&api, id).await);
    }
}

#[tokio::test]
async fn the_json_summary_carries_what_a_script_needs() {
    let gw = Gateway::start(Options::new()).await;
    let out = Sim::against(&gw)
        .args(["--provision", "run", "--devices", "5", "--rate", "10"])
        .args(["--duration", "3s", "--json"])
        .spawn()
        .wait()
        .await;
    let summary = out.summary();
    let fields: Vec<&str> = summary
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(fields, SUMMARY_FIELDS, "{summary}");

    assert_eq!(count(&summary, "devices"), 5, "{summary}");
    assert_eq!(count(&summary, "online"), 5, "{summary}");
    let (sent, acked) = (count(&summary, "sent"), count(&summary, "acked"));
    // 5 devices at 10/s for 3 s, less the time to connect.
    assert!(acked >= 50 && acked <= sent, "{summary}");
    let p50 = summary["ack_p50_ms"].as_f64().expect("ack_p50_ms");
    let p99 = summary["ack_p99_ms"].as_f64().expect("ack_p99_ms");
    assert!(0.0 < p50 && p50 <= p99 && p99 < 5000.0, "{summary}");
    for zero in [
        "errors",
        "reconnects",
        "commands",
        "resent",
        "dropped",
        "rejected",
        "chaos_disconnects",
        "duplicates_sent",
    ] {
        assert_eq!(count(&summary, zero), 0, "{zero} in {summary}");
    }
    // Readings still waiting or unacked at the stop are counted, not lost silently.
    assert!(count(&summary, "unsent") < sent, "{summary}");

    // What it says was acked is stored: every acked message is in the database.
    let api = gw.api();
    let mut messages = HashSet::new();
    for id in fleet_ids("sim", 5) {
        for item in stored(&api, &id).await {
            messages.insert(item["id"].as_str().expect("message id").to_string());
        }
    }
    let stored_messages = messages.len() as u64;
    assert!(
        acked <= stored_messages && stored_messages <= sent,
        "acked {acked} <= stored {stored_messages} <= sent {sent}"
    );
}

#[tokio::test]
async fn the_demo_runs_a_gateway_and_a_fleet_and_ctrl_c_stops_both_in_order() {
    let dir = tempfile::Builder::new()
        .prefix("e2e-demo-")
        .tempdir()
        .expect("temporary directory");
    let gateway_bin = e2e::gateway::gateway_bin();
    let demo = || {
        Sim::new(dir.path())
            .args(["demo", "--devices", "5", "--gateway-bin"])
            .args([gateway_bin.display().to_string()])
            .env("GATEWAY_DEVICE_ADDR", "127.0.0.1:0")
            .env("GATEWAY_API_ADDR", "127.0.0.1:0")
            .own_process_group()
            .spawn()
    };
    let ids = fleet_ids("sim", 5);

    // 1: a fresh directory; 2: a second start (devices and tokens exist); 3: the database
    // deleted, the tokens file kept (its tokens are no good any more).
    for run in 1..=3 {
        if run == 3 {
            for file in ["gateway.db", "gateway.db-wal", "gateway.db-shm"] {
                let _ = std::fs::remove_file(dir.path().join("data").join(file));
            }
        }
        let process = demo();
        let api_line = process
            .line_where(Duration::from_secs(60), |l| {
                l.trim_start().starts_with("operator API")
            })
            .await;
        let api_url = api_line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no API URL in {api_line:?}"))
            .to_string();
        let key = std::fs::read_to_string(dir.path().join("data/api-key")).expect("data/api-key");
        let root = api_url.trim_end_matches("/v1").to_string();
        let api = Api::new(&api_url, &root, Some(key.trim()));
        wait_all_online(&api, &ids, ONLINE_WAIT).await;

        // What it prints to try works as printed (the API on a port of its own here).
        let stdout = process.stdout_lines().join("\n");
        assert!(
            stdout.contains(&format!("export GATEWAY_API_URL={api_url}")),
            "{stdout}"
        );
        assert!(
            stdout.contains("commands send sim-00001 ping --wait 5s"),
            "{stdout}"
        );
        let ping = Cli::new(dir.path())
            .args(["commands", "send", "sim-00001", "ping", "--wait", "5s"])
            .env("GATEWAY_API_URL", &api_url)
            .run()
            .await;
        assert!(ping.success().contains("succeeded"), "{}", ping.stdout);

        if run == 2 {
            // The first run's Ctrl-C stopped the fleet before the gateway: its devices closed
            // their own connections, the gateway did not close them for its shutdown.
            let sessions = api.get("/devices/sim-00001/sessions").await.expect(200);
            assert_eq!(
                sessions["items"][1]["disconnect_reason"], "client_closed",
                "{sessions}"
            );
            assert!(
                process
                    .stderr()
                    .contains("all 5 devices already have tokens"),
                "the second start reuses the tokens:\n{}",
                process.stderr()
            );
        }
        if run == 3 {
            assert!(
                process.stderr().contains("5 devices with a token in"),
                "the devices the gateway lost are created again:\n{}",
                process.stderr()
            );
        }

        let gateway_pid = gateway_pid(&process.stderr());
        let out = process.interrupt_group().await;
        out.success();
        let (fleet, gateway) = (
            out.stderr.find("run: stopped after"),
            out.stderr.find("demo: the gateway stopped (exit 0)"),
        );
        assert!(
            matches!((fleet, gateway), (Some(f), Some(g)) if f < g),
            "the fleet stops first, then the gateway, exit 0:\n{}",
            out.stderr
        );
        assert!(
            !std::path::Path::new(&format!("/proc/{gateway_pid}")).exists(),
            "the gateway (pid {gateway_pid}) outlived the demo"
        );
    }
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces, so split after its last `)`.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if ppid == Some(pid) {
            children.push(child);
        }
    }
    children
}

/// How many files a process has open.
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn idle_holds_more_connections_than_one_process_may_open_files_for() {
    const DEVICES: usize = 1000;
    const FILES: u64 = 320;
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let sim = Sim::against(&gw)
        .open_files_limit(FILES)
        .args(["--provision", "--source-ips", "127.0.0.1-127.0.0.4"])
        .args(["idle", "--devices", &DEVICES.to_string()])
        .args(["--hold", "10m", "--ignore-stdin"])
        .spawn();
    let line = sim
        .line_where(ONLINE_WAIT * 4, |l| l.starts_with("connected "))
        .await;
    // 320 files, 64 kept for the process itself: 256 connections each, so 4 processes.
    assert!(
        line.starts_with(&format!("connected {DEVICES} in "))
            && line.ends_with(" over 4 processes"),
        "{line}\n{}",
        sim.stderr()
    );

    // Every device is online at once, although no process may open more than 320 files.
    let ids = fleet_ids("sim", DEVICES);
    wait_all_online(&api, &ids, ONLINE_WAIT).await;
    let shards = children_of(sim.pid);
    assert_eq!(shards.len(), 4, "shard processes of {}", sim.pid);
    let files: Vec<usize> = shards.iter().map(|&pid| open_files(pid)).collect();
    assert!(
        files.iter().all(|&n| n <= FILES as usize) && files.iter().sum::<usize>() >= DEVICES,
        "open files per shard: {files:?}"
    );

    // The connections come from the four source addresses, about a quarter each.
    let mut per_source = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        let sessions = api
            .get(&format!("/devices/{id}/sessions"))
            .await
            .expect(200);
        let addr = sessions["items"][0]["remote_addr"]
            .as_str()
            .unwrap_or_else(|| panic!("{id}: no session in {sessions}"));
        let ip = addr.rsplit_once(':').map_or(addr, |(ip, _)| ip);
        *per_source.entry(ip.to_string()).or_default() += 1;
    }
    let sources: Vec<&str> = per_source.keys().map(String::as_str).collect();
    assert_eq!(
        sources,
        ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"],
        "{per_source:?}"
    );
    assert!(
        per_source.values().all(|&n| n >= DEVICES / 5),
        "{per_source:?}"
    );

    // SIGTERM to the parent: it stops its shards, which close their connections normally.
    let out = sim.terminate().await;
    out.success();
    assert!(
        out.stdout.iter().any(
            |l| l.starts_with(&format!("held {DEVICES} connections for "))
                && l.ends_with("; 0 dropped")
        ),
        "{:?}\n{}",
        out.stdout,
        out.stderr
    );
    wait_none_online(&api, ONLINE_WAIT).await;
    assert_eq!(
        api.device("sim-00999").await["last_disconnect_reason"],
        "client_closed"
    );
}

#[tokio::test]
async fn bench_spreads_a_fleet_over_processes_and_adds_up_their_measurements() {
    const DEVICES: usize = 300;
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let out = Sim::against(&gw)
        .open_files_limit(200)
        .args(["--provision", "bench", "--devices", &DEVICES.to_string()])
        .args([
            "--inflight",
            "2",
            "--warmup",
            "1s",
            "--duration",
            "3s",
            "--json",
        ])
        .spawn()
        .wait()
        .await;
    let results = out.summary();
    // 200 files less 64: 136 connections each, so 3 processes.
    assert!(
        out.stderr
            .contains(&format!("{DEVICES}/{DEVICES} devices connected"))
            && out.stderr.contains("(3 processes)"),
        "{}",
        out.stderr
    );
    assert_eq!(count(&results, "connected"), DEVICES as u64, "{results}");
    assert_eq!(count(&results, "errors"), 0, "{results}");
    assert_eq!(count(&results, "unacked"), 0, "{results}");
    let (acked, sent) = (count(&results, "acked"), count(&results, "sent"));
    assert!(acked > 0 && acked <= sent, "{results}");
    assert_eq!(
        results["msgs_per_sec"].as_f64(),
        Some((acked as f64 / 3.0 * 1000.0).round() / 1000.0),
        "{results}"
    );
    let (p50, p99) = (results["p50_ms"].as_f64(), results["p99_ms"].as_f64());
    assert!(
        matches!((p50, p99), (Some(p50), Some(p99)) if 0.0 < p50 && p50 <= p99),
        "{results}"
    );

    // Each shard's devices sent (the fleet's ids are dealt round-robin over the shards), and
    // what the run counts as sent is what the gateway stored.
    let mut stored_messages = 0;
    for id in fleet_ids("sim", DEVICES) {
        let items = stored(&api, &id).await.len() as u64;
        assert!(items > 0, "{id} stored nothing");
        stored_messages += items;
    }
    assert_eq!(stored_messages, sent, "{results}");
}

#[tokio::test]
async fn bench_commands_reports_the_round_trip_and_the_gateways_own_part_of_it() {
    let gw = Gateway::start(Options::new()).await;
    let out = Sim::against(&gw)
        .args(["--provision", "bench-commands", "--devices", "4"])
        .args([
            "--commands",
            "40",
            "--concurrency",
            "1",
            "--wait-s",
            "5",
            "--json",
        ])
        .spawn()
        .wait()
        .await;
    let results = out.summary();
    assert_eq!(count(&results, "succeeded"), 40, "{results}");
    assert_eq!(count(&results, "errors"), 0, "{results}");
    let (p50, mean) = (results["p50_ms"].as_f64(), results["mean_ms"].as_f64());
    let api = results["gateway_api_mean_ms"].as_f64();
    // The gateway times each request from its arrival to its response's head, which the
    // client's round trip holds: so its mean is above zero and at most the client's.
    assert!(
        matches!((p50, mean, api), (Some(p50), Some(mean), Some(api))
            if 0.0 < p50 && 0.0 < api && api <= mean),
        "{results}"
    );
}

#[tokio::test]
async fn run_spreads_a_fleet_over_processes_and_adds_up_their_figures() {
    const DEVICES: usize = 30;
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let ids = fleet_ids("sim", DEVICES);
    let sim = Sim::against(&gw)
        .own_process_group()
        .args(["--provision", "run", "--devices", &DEVICES.to_string()])
        .args(["--rate", "5", "--processes", "3", "--json"])
        .spawn();
    wait_all_online(&api, &ids, ONLINE_WAIT).await;
    assert_eq!(online_ids(&api).await, ids, "exactly the fleet is online");
    let shards = children_of(sim.pid);
    assert_eq!(shards.len(), 3, "shard processes of {}", sim.pid);
    // Every shard's devices send (the ids are dealt round-robin over the shards).
    eventually("a reading of every device stored", ONLINE_WAIT, || async {
        for id in &ids {
            if stored(&api, id).await.is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await;

    // SIGUSR1 to the parent: it prints the errors so far, of every shard, and runs on.
    sim.request_report();
    let report = eventually("the errors so far, on SIGUSR1", ONLINE_WAIT, || async {
        sim.stderr()
            .lines()
            .find(|l| l.starts_with("run: at "))
            .map(str::to_owned)
    })
    .await;
    assert!(report.ends_with("s; errors by kind: none"), "{report}");
    assert_eq!(children_of(sim.pid).len(), 3, "the shards run on");
    assert_eq!(online_ids(&api).await, ids, "the fleet stays online");

    // Ctrl-C reaches the whole group: the shards leave stopping to the parent, which stops
    // them, adds up their last figures and prints one summary.
    let out = sim.interrupt_group().await;
    let summary = out.summary();
    assert!(
        out.stderr.contains(&format!(
            "run: {DEVICES} devices -> {} over 3 processes (--processes)",
            gw.device_url
        )),
        "{}",
        out.stderr
    );
    let stopped = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("run: stopped after "))
        .collect::<Vec<_>>();
    assert!(
        matches!(stopped.as_slice(), [line] if line.ends_with("; errors by kind: none")),
        "one summary line, from the parent:\n{}",
        out.stderr
    );
    for field in SUMMARY_FIELDS {
        assert!(summary.get(field).is_some(), "{field} missing in {summary}");
    }
    assert_eq!(count(&summary, "devices"), DEVICES as u64, "{summary}");
    assert_eq!(count(&summary, "online"), DEVICES as u64, "{summary}");
    assert_eq!(count(&summary, "errors"), 0, "{summary}");
    let (sent, acked) = (count(&summary, "sent"), count(&summary, "acked"));
    assert!(sent >= DEVICES as u64 && acked <= sent, "{summary}");
    assert!(summary["ack_p99_ms"].as_f64().is_some(), "{summary}");
    wait_none_online(&api, ONLINE_WAIT).await;
    // Messages (several readings each at times), by id: the acked ones are stored, and maybe
    // some sent in the last moment, whose ack came too late.
    let mut messages = HashSet::new();
    for id in &ids {
        for item in stored(&api, id).await {
            messages.insert(item["id"].as_str().expect("message id").to_string());
        }
    }
    let stored_messages = messages.len() as u64;
    assert!(
        acked <= stored_messages && stored_messages <= sent,
        "{stored_messages} stored: {summary}"
    );
    for pid in shards {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "shard {pid} outlived its parent"
        );
    }

    // --duration ends a sharded run as it ends one process's.
    let out = Sim::against(&gw)
        .args(["run", "--devices", "4", "--rate", "0", "--processes", "2"])
        .args(["--duration", "2s", "--json"])
        .spawn()
        .wait()
        .await;
    let summary = out.summary();
    assert_eq!(count(&summary, "devices"), 4, "{summary}");
    assert_eq!(count(&summary, "online"), 4, "{summary}");
    assert_eq!(count(&summary, "sent"), 0, "{summary}");
}

/// The gateway's pid from the demo's `demo: started ... (pid N)` line.
fn gateway_pid(stderr: &str) -> u32 {
    stderr
        .lines()
        .find(|l| l.starts_with("demo: started"))
        .and_then(|l| l.split("(pid ").nth(1))
        .and_then(|rest| rest.split(')').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no `demo: started ... (pid N)` line in:\n{stderr}"))
}
