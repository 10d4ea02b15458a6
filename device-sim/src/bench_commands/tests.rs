//! Tests of the command benchmark against the in-process mock gateway.

use super::*;
use crate::mock_gateway::{self, CommandMock};
use crate::tokens::{self, Secret, TokenMap};
use std::sync::atomic::Ordering::SeqCst;

fn args(devices: usize, commands: usize) -> BenchCommandsArgs {
    BenchCommandsArgs {
        devices,
        commands,
        concurrency: None,
        warmup_commands: None,
        wait_s: 5,
        background_devices: 0,
        background_rate: None,
        background_inflight: None,
        background_warmup: Duration::from_millis(100),
        online_timeout: Duration::from_secs(5),
        json: true,
    }
}

/// Common options pointing at `mock`, with tokens for `devices` and `background` devices.
fn common(dir: &std::path::Path, mock: &CommandMock, devices: usize, background: usize) -> Common {
    let mut map = mock_gateway::tokens(&tokens::device_ids("sim", devices).unwrap());
    if background > 0 {
        map.extend(mock_gateway::tokens(
            &tokens::device_ids("sim-bg", background).unwrap(),
        ));
    }
    common_with(dir, mock, map)
}

fn common_with(dir: &std::path::Path, mock: &CommandMock, map: TokenMap) -> Common {
    let path = dir.join("tokens.json");
    tokens::save(&path, &map).unwrap();
    // The gateway has the devices the file has tokens for (provisioning checks).
    mock.shared
        .registered
        .lock()
        .unwrap()
        .extend(map.keys().cloned());
    Common {
        url: mock.device_url.clone(),
        ca: dir.join("unused.pem"),
        api_url: mock.api_url.clone(),
        api_key: Some(Secret::from(mock_gateway::API_KEY.to_string())),
        tokens: path,
        provision: false,
        prefix: "sim".into(),
        connect_concurrency: 8,
        source_ips: crate::conn::SourceIps::Auto,
        client_certs: None,
    }
}

#[tokio::test]
async fn every_command_round_trips_with_one_outstanding_per_device() {
    let dir = tempfile::tempdir().unwrap();
    let mock = CommandMock::start(None).await;
    let report = measure(&common(dir.path(), &mock, 5, 0), &args(5, 40))
        .await
        .unwrap();

    assert_eq!(
        report.errors(),
        0,
        "{:?} {:?}",
        report.command_errors,
        report.device_errors
    );
    assert_eq!(report.measured.succeeded, 40);
    assert_eq!(report.measured.round_trip_us.len(), 40);
    assert_eq!(report.measured.gateway_ms.len(), 40);
    assert_eq!((report.concurrency, report.warmup_commands), (5, 5));
    // 40 measured and 5 warm-up commands, round-robin: 9 for each device.
    let per_device = mock.shared.per_device.lock().unwrap().clone();
    assert_eq!(per_device.len(), 5);
    assert!(per_device.values().all(|n| *n == 9), "{per_device:?}");
    assert_eq!(mock.shared.max_outstanding.load(SeqCst), 1);
    assert!(report.measured.round_trip_us.max() < 5_000_000);
    assert_eq!(report.json()["succeeded"], 40);
}

#[tokio::test]
async fn failed_answers_are_counted_not_measured() {
    let dir = tempfile::tempdir().unwrap();
    let mock = CommandMock::start(Some(4)).await;
    let mut args = args(2, 20);
    args.warmup_commands = Some(0);
    let report = measure(&common(dir.path(), &mock, 2, 0), &args)
        .await
        .unwrap();
    assert_eq!(report.measured.succeeded, 15);
    assert_eq!(report.measured.round_trip_us.len(), 15);
    assert_eq!(
        report.command_errors.get("HTTP 500 internal"),
        Some(&5),
        "{:?}",
        report.command_errors
    );
    assert_eq!(report.errors(), 5);
}

#[tokio::test]
async fn background_telemetry_streams_during_the_measurement() {
    let dir = tempfile::tempdir().unwrap();
    let mock = CommandMock::start(None).await;
    let mut args = args(3, 30);
    args.background_devices = 2;
    args.background_inflight = Some(2);
    let report = measure(&common(dir.path(), &mock, 3, 2), &args)
        .await
        .unwrap();
    assert_eq!(report.errors(), 0, "{:?}", report.device_errors);
    assert_eq!(report.measured.succeeded, 30);
    let background = report.background.as_ref().unwrap();
    assert_eq!((background.devices, background.connected), (2, 2));
    assert!(background.acked > 0);
    assert!(background.msgs_per_sec > 0.0);
    assert_eq!(report.json()["background"]["pace"], "2 in flight each");
}

#[tokio::test]
async fn devices_that_never_come_online_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let mock = CommandMock::start(None).await;
    // The token belongs to another device, so sim-00001 never shows as online.
    let map = [("sim-00001".to_string(), "tok-other".to_string())].into();
    let mut args = args(1, 1);
    args.online_timeout = Duration::from_millis(300);
    let error = measure(&common_with(dir.path(), &mock, map), &args)
        .await
        .err()
        .unwrap();
    assert!(
        error.to_string().contains("1 of 1 devices not online"),
        "{error}"
    );
    assert_eq!(mock.shared.posts.load(SeqCst), 0);
}

#[test]
fn operators_cover_every_command_once() {
    for (operators, commands) in [(1, 5), (3, 10), (100, 1000), (7, 3)] {
        let mut all: Vec<usize> = (0..operators)
            .flat_map(|k| indices(k, operators, commands))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..commands).collect::<Vec<_>>());
    }
    // As many operators as devices: operator k always sends to device k.
    assert!(indices(3, 10, 100).all(|i| i % 10 == 3));
}

#[test]
fn background_options_must_agree() {
    let mut a = args(1, 1);
    assert_eq!(background_pace(&a).unwrap(), None);
    a.background_rate = Some(20.0);
    assert!(background_pace(&a).is_err(), "a rate without devices");
    a.background_devices = 3;
    assert_eq!(
        background_pace(&a).unwrap(),
        Some(Pace::Every(Duration::from_millis(50)))
    );
    a.background_rate = None;
    assert!(background_pace(&a).is_err(), "devices without a pace");
    a.background_inflight = Some(0);
    assert!(background_pace(&a).is_err());
    a.background_inflight = Some(8);
    assert_eq!(background_pace(&a).unwrap(), Some(Pace::InFlight(8)));
}

#[test]
fn the_gateway_time_comes_from_the_command_timestamps() {
    let command = json!({"created_at": "2026-11-25T10:00:00.120Z", "completed_at": "2026-11-25T10:00:00.125Z"});
    assert_eq!(gateway_time_ms(&command), Some(5));
    assert_eq!(
        gateway_time_ms(&json!({"created_at": "2026-11-25T10:00:00.120Z", "completed_at": null})),
        None
    );
}

#[test]
fn the_gateways_own_time_is_read_from_its_metrics() {
    let text = |sum: &str, count: u64| {
        format!(
            "# TYPE gateway_api_request_seconds histogram\n\
             gateway_api_request_seconds_sum{{method=\"GET\",route=\"/v1/devices\",status=\"2xx\"}} 9.0\n\
             gateway_api_request_seconds_count{{method=\"GET\",route=\"/v1/devices\",status=\"2xx\"}} 3\n\
             gateway_api_request_seconds_sum{{method=\"POST\",route=\"/v1/devices/{{id}}/commands\",status=\"2xx\"}} {sum}\n\
             gateway_api_request_seconds_count{{method=\"POST\",route=\"/v1/devices/{{id}}/commands\",status=\"2xx\"}} {count}\n"
        )
    };
    let before = ApiSeconds::parse(&text("0.5", 100)).unwrap();
    let after = ApiSeconds::parse(&text("2.5", 1100)).unwrap();
    let mean = after.mean_ms_since(before).unwrap();
    assert!((mean - 2.0).abs() < 1e-9, "{mean}");
    // Nothing answered in between, or a server without the series: no figure.
    assert_eq!(after.mean_ms_since(after), None);
    assert_eq!(ApiSeconds::parse("gateway_connections 3\n"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_run_on_a_thread_of_their_own_which_stops_with_them() {
    let apart = Apart::start().unwrap();
    let here = std::thread::current().id();
    let (name, id) = apart
        .run(async {
            // A task spawned from there stays there too (the operators' JoinSet).
            tokio::spawn(async {
                let thread = std::thread::current();
                (thread.name().map(str::to_owned), thread.id())
            })
            .await
            .unwrap()
        })
        .await
        .unwrap();
    assert_eq!(name.as_deref(), Some("operators"));
    assert_ne!(id, here);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(apart);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("dropping it stops and joins its thread");
}
