//! Tests of store-and-forward, reconnect timing and injected faults against the scripted mock.

use std::collections::HashMap;
use std::sync::atomic::Ordering::SeqCst;

use serde_json::Value;

use super::tests::device;
use super::*;
use crate::backoff::RESTART_CAP;
use crate::mock::{self, Mock, Script};

/// Runs one device (readings every 20 ms, `profile`) against `script` for `run`.
async fn run_device(
    script: Script,
    profile: Profile,
    run: Duration,
) -> (Mock, Arc<Counters>, Arc<ErrorTally>) {
    let mock = Mock::start(script, None).await;
    let (mut device, counters, tally, cancel) = device(&mock, mock::token()).await;
    device.period = Some(Duration::from_millis(20));
    device.profile = profile;
    let task = tokio::spawn(device.run());
    tokio::time::sleep(run).await;
    cancel.cancel();
    task.await.unwrap();
    (mock, counters, tally)
}

/// The reading counters a telemetry message carries, single point or batch.
fn counters_of(message: &Value) -> Vec<u64> {
    match message["points"].as_array() {
        Some(points) => points
            .iter()
            .map(|p| p["data"]["counter"].as_u64().unwrap())
            .collect(),
        None => vec![message["data"]["counter"].as_u64().unwrap()],
    }
}

#[tokio::test]
async fn readings_taken_offline_go_out_as_a_batch_once_the_retry_after_has_passed() {
    let script = Script {
        refuse_first: 1,
        retry_after_s: 1,
        ..Script::default()
    };
    let (mock, counters, tally) =
        run_device(script, Profile::default(), Duration::from_millis(1600)).await;

    // The refusal's Retry-After (1 s) was honoured, not the first backoff delay (< 0.5 s).
    let accepted = mock.seen.accepted_at.lock().unwrap().clone();
    assert_eq!(accepted.len(), 2);
    assert!(
        accepted[1] - accepted[0] >= Duration::from_secs(1),
        "{:?}",
        accepted[1] - accepted[0]
    );
    assert_eq!(
        tally.snapshot().get("connect: http 503 unavailable"),
        Some(&1)
    );

    let telemetry = mock.seen.of_type("telemetry");
    let first = counters_of(&telemetry[0]);
    // Nominally 50 (a reading every 20 ms for the 1 s Retry-After); a loaded machine runs
    // the timer late, so only "many of them" is asserted.
    assert!(
        first.len() >= 20,
        "a second of readings in the first message: {}",
        first.len()
    );
    assert_eq!(first[0], 0);
    // Every reading exactly once, in order, none dropped.
    let all: Vec<u64> = telemetry.iter().flat_map(counters_of).collect();
    assert_eq!(all, (0..all.len() as u64).collect::<Vec<_>>());
    assert_eq!(counters.dropped.load(Relaxed), 0);
    assert_eq!(counters.resent.load(Relaxed), 0);
}

#[tokio::test]
async fn a_full_buffer_drops_the_oldest_readings_and_counts_them() {
    let script = Script {
        refuse_first: 1,
        retry_after_s: 1,
        ..Script::default()
    };
    let profile = Profile {
        buffer: 10,
        ..Profile::default()
    };
    let (mock, counters, _) = run_device(script, profile, Duration::from_millis(1300)).await;
    let telemetry = mock.seen.of_type("telemetry");
    let first = counters_of(&telemetry[0]);
    assert_eq!(first.len(), 10);
    let dropped = counters.dropped.load(Relaxed);
    // The ten newest readings survived: the dropped ones are exactly those before them.
    // Nominally 40 of the 50 taken while refused; fewer when a loaded machine runs the timer
    // late, but the buffer must have overflowed.
    assert_eq!(first[0], dropped);
    assert!(dropped >= 10, "{dropped}");
}

#[tokio::test]
async fn unacked_messages_are_resent_after_a_reconnect_and_acked_ones_never() {
    let script = Script {
        first_session_acks: Some(5),
        ..Script::default()
    };
    let (mock, counters, tally) =
        run_device(script, Profile::default(), Duration::from_millis(1500)).await;
    assert_eq!(mock.seen.handshakes.load(SeqCst), 2);
    assert_eq!(tally.snapshot().get("connection lost"), Some(&1));

    let telemetry = mock.seen.of_type("telemetry");
    let mut by_id: HashMap<String, Vec<&Value>> = HashMap::new();
    for message in &telemetry {
        by_id
            .entry(message["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(message);
    }
    // Messages 0..5 were acked: sent once. Messages 5..8 had no ack: sent again, identical.
    for n in 0..8 {
        let sent = &by_id[&format!("sim-00001-42-{n}")];
        match n {
            0..5 => assert_eq!(sent.len(), 1, "message {n}"),
            _ => {
                assert_eq!(sent.len(), 2, "message {n}");
                assert_eq!(sent[0], sent[1]);
            }
        }
    }
    assert_eq!(counters.resent.load(Relaxed), 3);
    // Apart from the resends, every reading went out once and in order.
    let mut all: Vec<u64> = by_id
        .values()
        .flat_map(|sent| counters_of(sent[0]))
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..all.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn refusals_worth_retrying_are_sent_again_and_others_are_counted() {
    let script = Script {
        error_every: Some(3),
        ..Script::default()
    };
    let (mock, counters, _) =
        run_device(script, Profile::default(), Duration::from_millis(600)).await;
    assert_eq!(counters.rejected.load(Relaxed), 0);
    // The mock refused every third message (`internal`); the rest were acked.
    let acked: Vec<u64> = mock
        .seen
        .of_type("telemetry")
        .iter()
        .enumerate()
        .filter(|(i, _)| (i + 1) % 3 != 0)
        .flat_map(|(_, m)| counters_of(m))
        .collect();
    let newest = *acked.iter().max().unwrap();
    for n in 0..newest.saturating_sub(3) {
        assert!(acked.contains(&n), "reading {n} was never acked: {acked:?}");
    }

    let script = Script {
        error_every: Some(2),
        error_code: Some("invalid_message"),
        ..Script::default()
    };
    let (_, counters, tally) =
        run_device(script, Profile::default(), Duration::from_millis(400)).await;
    let rejected = counters.rejected.load(Relaxed);
    assert!(rejected > 0);
    assert_eq!(
        tally.snapshot().get("error: invalid_message"),
        Some(&rejected)
    );
}

#[tokio::test]
async fn duplicate_sends_are_acked_twice_and_counted_once() {
    let profile = Profile {
        chaos: Chaos {
            duplicate_rate: 1.0,
            ..Chaos::default()
        },
        ..Profile::default()
    };
    let (mock, counters, tally) =
        run_device(Script::default(), profile, Duration::from_millis(400)).await;
    let sent = counters.sent.load(Relaxed);
    assert!(sent >= 5);
    assert_eq!(counters.duplicates_sent.load(Relaxed), sent);
    assert_eq!(mock.seen.of_type("telemetry").len() as u64, 2 * sent);
    assert!(counters.acked.load(Relaxed) <= sent);
    assert_eq!(tally.total(), 0, "{:?}", tally.snapshot());
}

#[tokio::test]
async fn chaos_drops_connections_abruptly_and_the_device_comes_back() {
    let profile = Profile {
        chaos: Chaos {
            disconnect_rate: 1.0,
            ..Chaos::default()
        },
        ..Profile::default()
    };
    let (mock, counters, tally) =
        run_device(Script::default(), profile, Duration::from_millis(2700)).await;
    let disconnects = counters.chaos_disconnects.load(Relaxed);
    assert!(disconnects >= 1, "{disconnects}");
    assert!(mock.seen.handshakes.load(SeqCst) >= 2);
    // Abrupt: no close frame, except the one that ends the run if the device is online then.
    let closes = mock.seen.closes.lock().unwrap().clone();
    assert!(closes.is_empty() || closes == [1000], "{closes:?}");
    assert_eq!(tally.total(), 0, "not errors: {:?}", tally.snapshot());
    // Nothing lost across the drops: every reading up to the newest went out.
    let mut all: Vec<u64> = mock
        .seen
        .of_type("telemetry")
        .iter()
        .flat_map(counters_of)
        .collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all, (0..all.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_skewed_clock_shows_in_timestamps_and_command_results() {
    let script = Script {
        commands: vec![serde_json::json!({"type":"command","id":"c-1","name":"ping"})],
        ..Script::default()
    };
    let profile = Profile {
        clock: Clock {
            skew: chrono::TimeDelta::hours(-1),
        },
        ..Profile::default()
    };
    let (mock, _, _) = run_device(script, profile, Duration::from_millis(200)).await;
    let behind = |ts: &str| {
        let ts = chrono::DateTime::parse_from_rfc3339(ts).unwrap();
        chrono::Utc::now().signed_duration_since(ts)
    };
    let telemetry = &mock.seen.of_type("telemetry")[0];
    let off = behind(telemetry["ts"].as_str().unwrap());
    assert!(
        (off - chrono::TimeDelta::hours(1)).abs() < chrono::TimeDelta::seconds(5),
        "{off}"
    );
    let result = &mock.seen.of_type("command_result")[0];
    let off = behind(result["result"]["ts"].as_str().unwrap());
    assert!(
        (off - chrono::TimeDelta::hours(1)).abs() < chrono::TimeDelta::seconds(5),
        "{off}"
    );
}

#[tokio::test]
async fn what_is_left_at_the_end_is_counted_as_unsent() {
    // Never acked, never connected: every reading is still buffered when the device stops.
    let script = Script {
        refuse_first: 10,
        retry_after_s: 5,
        ..Script::default()
    };
    let (_, counters, _) = run_device(script, Profile::default(), Duration::from_millis(300)).await;
    let unsent = counters.unsent.load(Relaxed);
    assert!((10..=16).contains(&unsent), "{unsent}");
    assert_eq!(counters.sent.load(Relaxed), 0);
}

#[tokio::test]
async fn a_fleet_closed_for_a_restart_is_back_within_seconds_of_the_gateway_return() {
    const DEVICES: usize = 10;
    const DOWN: Duration = Duration::from_secs(5);
    // The gateway closes every session with 1001 (shutting down), then stops listening.
    let old = Mock::closing_with(1001).await;
    let mut fleet = Vec::new();
    for _ in 0..DEVICES {
        let (device, counters, tally, cancel) = device(&old, mock::token()).await;
        fleet.push((tokio::spawn(device.run()), counters, tally, cancel));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while old.seen.handshakes.load(SeqCst) < DEVICES {
        assert!(Instant::now() < deadline, "the fleet did not connect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    old.stop_listening();
    // Down long enough for the usual backoff's ceiling to reach 8 s (0.5 + 1 + 2 + 4 s of
    // refusals at most); the ceiling after a restart's close stays at 2 s.
    tokio::time::sleep(DOWN).await;
    let new = Mock::start_at(old.addr, Script::default(), None).await;
    let back = Instant::now();
    let deadline = back + Duration::from_secs(10);
    while new.seen.handshakes.load(SeqCst) < DEVICES {
        assert!(Instant::now() < deadline, "the fleet did not come back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = back.elapsed();
    for (task, counters, tally, cancel) in fleet {
        cancel.cancel();
        task.await.unwrap();
        assert!(counters.reconnects.load(Relaxed) >= 2);
        let tally = tally.snapshot();
        assert!(
            tally.get("closed: 1001").is_some_and(|n| *n >= 1),
            "{tally:?}"
        );
        assert!(
            tally.get("connect: tcp").is_some_and(|n| *n >= 2),
            "{tally:?}"
        );
    }
    assert!(
        took < RESTART_CAP + Duration::from_millis(800),
        "all {DEVICES} devices back {took:?} after the gateway's return"
    );
}
