//! Tests of the simulated device against the scripted mock gateway.

use super::*;
use crate::conn::Target;
use crate::mock::{self, Mock, Script};
use serde_json::json;
use std::path::Path;

pub(super) type Parts = (Device, Arc<Counters>, Arc<ErrorTally>, CancellationToken);

pub(super) async fn device(mock: &Mock, token: Secret) -> Parts {
    let target = Target::resolve(&mock.url("ws"), Path::new("unused.pem"))
        .await
        .unwrap();
    device_for(target, token)
}

pub(super) fn device_for(target: Target, token: Secret) -> Parts {
    let (counters, tally, cancel) = (Arc::default(), Arc::default(), CancellationToken::new());
    let device = Device {
        id: "sim-00001".into(),
        token,
        boot: 42,
        period: Some(Duration::from_millis(40)),
        profile: Profile::default(),
        connector: Connector::new(target, 4),
        counters: Arc::clone(&counters),
        tally: Arc::clone(&tally),
        cancel: cancel.clone(),
    };
    (device, counters, tally, cancel)
}

#[tokio::test]
async fn sends_acked_telemetry_and_answers_commands() {
    let commands = vec![
        json!({"type":"command","id":"c-1","name":"ping","params":{}}),
        json!({"type":"command","id":"c-2","name":"fail","params":{"error":"disk full"}}),
        json!({"type":"command","id":"c-3","name":"self_destruct","params":{}}),
    ];
    let mock = Mock::start(
        Script {
            commands,
            ..Script::default()
        },
        None,
    )
    .await;
    let (device, counters, tally, cancel) = device(&mock, mock::token()).await;
    let task = tokio::spawn(device.run());
    tokio::time::sleep(Duration::from_millis(600)).await;
    cancel.cancel();
    task.await.unwrap();

    let acked = counters.acked.load(Relaxed);
    assert!(acked >= 5, "acked {acked}");
    assert!(counters.sent.load(Relaxed) >= acked);
    assert_eq!(tally.total(), 0, "{:?}", tally.snapshot());
    assert_eq!(counters.commands.load(Relaxed), 3);

    let first = &mock.seen.of_type("telemetry")[0];
    assert_eq!(first["id"], "sim-00001-42-0");
    assert_eq!(first["data"]["counter"], 0);
    assert_eq!(first["data"]["state"], "ok");
    assert!(first["ts"].as_str().unwrap().ends_with('Z'));

    let acks: Vec<_> = mock
        .seen
        .of_type("ack")
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(acks, [json!("c-1"), json!("c-2"), json!("c-3")]);
    let results = mock.seen.of_type("command_result");
    assert_eq!(results[0]["id"], "c-1");
    assert_eq!(results[0]["status"], "succeeded");
    assert_eq!(results[0]["result"]["pong"], true);
    assert!(results[0]["result"]["ts"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        results[1],
        json!({"type":"command_result","id":"c-2","status":"failed","error":"disk full"})
    );
    assert_eq!(
        results[2],
        json!({"type":"command_result","id":"c-3","status":"rejected","error":"unknown command"})
    );
}

/// Every message the device sent, in order, as (type, id).
pub(super) fn sent_in_order(mock: &Mock) -> Vec<(String, String)> {
    let messages = mock.seen.messages.lock().unwrap();
    messages
        .iter()
        .map(|m| {
            let field = |k: &str| m[k].as_str().unwrap_or_default().to_owned();
            (field("type"), field("id"))
        })
        .collect()
}

#[tokio::test]
async fn the_result_follows_the_ack_at_once() {
    let commands = (0..20)
        .map(|n| json!({"type":"command","id":format!("c-{n}"),"name":"ping"}))
        .collect();
    let mock = Mock::start(
        Script {
            commands,
            ..Script::default()
        },
        None,
    )
    .await;
    let (mut device, _, _, cancel) = device(&mock, mock::token()).await;
    device.period = None;
    let task = tokio::spawn(device.run());
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel();
    task.await.unwrap();
    let expected: Vec<_> = (0..20)
        .flat_map(|n| {
            let id = format!("c-{n}");
            [
                ("ack".to_string(), id.clone()),
                ("command_result".to_string(), id),
            ]
        })
        .collect();
    assert_eq!(sent_in_order(&mock), expected);
}

#[tokio::test]
async fn a_redelivered_reboot_is_acked_and_answered_again_but_executed_once() {
    // The mock sends the same command on every connection, as a gateway does with a command
    // it has no ack for.
    let commands =
        vec![json!({"type":"command","id":"c-1","name":"reboot","params":{"delay_s":0.1}})];
    let mock = Mock::start(
        Script {
            commands,
            ..Script::default()
        },
        None,
    )
    .await;
    let (mut device, counters, tally, cancel) = device(&mock, mock::token()).await;
    device.period = None;
    let task = tokio::spawn(device.run());
    tokio::time::sleep(Duration::from_millis(800)).await;
    cancel.cancel();
    task.await.unwrap();

    assert_eq!(
        mock.seen
            .handshakes
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    assert_eq!(counters.reboots.load(Relaxed), 1);
    assert_eq!(counters.commands.load(Relaxed), 1);
    assert_eq!(counters.duplicate_commands.load(Relaxed), 1);
    assert_eq!(tally.total(), 0, "{:?}", tally.snapshot());
    // The reboot closes normally (1000) and the stop at the end too.
    assert_eq!(*mock.seen.closes.lock().unwrap(), [1000, 1000]);
    let results = mock.seen.of_type("command_result");
    assert_eq!(results.len(), 2);
    assert_eq!(results[0], results[1], "the same answer both times");
    assert_eq!(
        results[0]["result"],
        json!({"rebooting": true, "delay_s": 0.1})
    );
    let acks = mock.seen.of_type("ack");
    assert_eq!(acks.len(), 2);
}

#[tokio::test]
async fn set_interval_starts_and_changes_telemetry() {
    let commands = vec![
        json!({"type":"command","id":"c-1","name":"set_interval","params":{"interval_ms":5}}),
        json!({"type":"command","id":"c-2","name":"set_interval","params":{"interval_ms":20}}),
    ];
    let mock = Mock::start(
        Script {
            commands,
            ..Script::default()
        },
        None,
    )
    .await;
    let (mut device, counters, _, cancel) = device(&mock, mock::token()).await;
    device.period = None;
    let task = tokio::spawn(device.run());
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel.cancel();
    task.await.unwrap();

    let results = mock.seen.of_type("command_result");
    assert_eq!(results[0]["status"], "failed", "5 ms is below the minimum");
    assert_eq!(results[1]["result"], json!({"interval_ms": 20}));
    // About 25 messages in 500 ms at 20 ms; none without the command.
    let sent = counters.sent.load(Relaxed);
    assert!((15..=30).contains(&sent), "sent {sent}");
    assert_eq!(mock.seen.of_type("telemetry").len() as u64, sent);
}

#[tokio::test]
async fn stops_for_good_when_the_session_is_replaced() {
    let mock = Mock::closing_with(4001).await;
    let (device, _, tally, _cancel) = device(&mock, mock::token()).await;
    tokio::time::timeout(Duration::from_secs(3), device.run())
        .await
        .expect("the device stops on its own");
    assert_eq!(
        mock.seen
            .handshakes
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(tally.snapshot().get("closed: 4001"), Some(&1));
}

#[tokio::test]
async fn a_replacement_close_counts_even_when_tls_ends_abruptly() {
    let dir = tempfile::tempdir().unwrap();
    let (acceptor, ca) = mock::tls_pair(dir.path());
    let script = Script {
        close_with: Some(4001),
        ..Script::default()
    };
    let mock = Mock::start(script, Some(acceptor)).await;
    let target = Target::resolve(&mock.url("wss"), &ca).await.unwrap();
    let (device, _, tally, _cancel) = device_for(target, mock::token());
    tokio::time::timeout(Duration::from_secs(3), device.run())
        .await
        .expect("the device stops on its own");
    assert_eq!(
        mock.seen
            .handshakes
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(
        tally.snapshot().get("closed: 4001"),
        Some(&1),
        "{:?}",
        tally.snapshot()
    );
}

#[tokio::test]
async fn a_refused_token_is_not_retried() {
    let mock = Mock::start(Script::default(), None).await;
    let (device, _, tally, _cancel) = device(&mock, Secret::from("wrong".to_string())).await;
    tokio::time::timeout(Duration::from_secs(3), device.run())
        .await
        .expect("the device stops on its own");
    assert_eq!(
        mock.seen
            .handshakes
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(
        tally.snapshot().get("connect: http 401 unauthorized"),
        Some(&1)
    );
}

#[tokio::test]
async fn reconnects_after_an_ordinary_close() {
    let mock = Mock::closing_with(1001).await;
    let (device, counters, _, cancel) = device(&mock, mock::token()).await;
    let task = tokio::spawn(device.run());
    // The first two delays are at most 0.5 s and 1 s.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    cancel.cancel();
    task.await.unwrap();
    assert!(
        mock.seen
            .handshakes
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2
    );
    assert!(counters.reconnects.load(Relaxed) >= 1);
}

#[tokio::test]
async fn a_close_frame_ends_the_session_as_closed_even_with_readings_due() {
    // Readings every millisecond: some fall between the gateway's close frame and the end of
    // the connection, and must wait for the next session instead of failing a send.
    let mock = Mock::closing_with(1001).await;
    let mut fleet = Vec::new();
    for _ in 0..10 {
        let (mut device, _, tally, cancel) = device(&mock, mock::token()).await;
        device.period = Some(Duration::from_millis(1));
        fleet.push((tokio::spawn(device.run()), tally, cancel));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (task, tally, cancel) in fleet {
        cancel.cancel();
        task.await.unwrap();
        let tally = tally.snapshot();
        assert!(
            tally.get("closed: 1001").is_some_and(|n| *n >= 2),
            "{tally:?}"
        );
        assert_eq!(tally.get("connection lost"), None, "{tally:?}");
    }
}
