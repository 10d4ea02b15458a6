//! One simulated device for `run` (and the command benchmark): telemetry from its sensor, prompt
//! answers to commands, and reconnects with backoff as a well-behaved device does.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::commands::{self, Action, RecentCommands};
use crate::conn::{self, Ws, FINAL_CLOSE_CODES};
use crate::fleet::Connector;
use crate::proto::{self, Command, Incoming};
use crate::sensor::Sensor;
use crate::stats::ErrorTally;
use crate::tokens::Secret;

/// A session that lasted this long was healthy: the next reconnect starts from a short delay.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// Before a simulated reboot, how long to wait for the gateway to ack (store) the result.
const RESULT_ACK_WAIT: Duration = Duration::from_secs(2);

/// Fleet-wide counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub reconnects: AtomicU64,
    pub connected: AtomicI64,
    /// Commands executed (each id once).
    pub commands: AtomicU64,
    /// Commands received again after they were executed (acked and answered, not executed).
    pub duplicate_commands: AtomicU64,
    /// Simulated reboots (`reboot` commands).
    pub reboots: AtomicU64,
}

/// How a session ended.
#[derive(Debug, PartialEq)]
enum SessionEnd {
    Cancelled,
    Closed(u16),
    Lost(String),
    /// Closed by the device itself for a `reboot` command; offline this long.
    Rebooted(Duration),
}

/// What a device keeps across sessions and simulated reboots (its "flash").
struct State {
    sensor: Sensor,
    /// Time between telemetry messages; `None` sends none.
    period: Option<Duration>,
    recent: RecentCommands,
}

/// What the session does after a frame was handled.
enum Next {
    Continue,
    SetInterval(Duration),
    Reboot { command_id: String, delay: Duration },
}

/// One device of a `run` fleet.
pub struct Device {
    pub id: String,
    pub token: Secret,
    /// Part of every message id, so ids stay unique across runs.
    pub boot: u64,
    /// Time between telemetry messages at start; `None` sends none (until `set_interval`).
    pub period: Option<Duration>,
    pub connector: Arc<Connector>,
    pub counters: Arc<Counters>,
    pub tally: Arc<ErrorTally>,
    pub cancel: CancellationToken,
}

impl Device {
    /// Connects, runs sessions and reconnects until cancelled or refused for good.
    pub async fn run(self) {
        let mut backoff = Backoff::device();
        let mut state = State {
            sensor: Sensor::new(&mut rand::thread_rng()),
            period: self.period,
            recent: RecentCommands::default(),
        };
        loop {
            let attempt = tokio::select! {
                _ = self.cancel.cancelled() => return,
                attempt = self.connector.once(&self.token) => attempt,
            };
            let delay = match attempt {
                Ok((ws, _welcome)) => {
                    let started = Instant::now();
                    self.counters.connected.fetch_add(1, Relaxed);
                    let end = self.session(ws, &mut state).await;
                    self.counters.connected.fetch_sub(1, Relaxed);
                    match end {
                        SessionEnd::Cancelled => return,
                        SessionEnd::Rebooted(delay) => {
                            self.counters.reboots.fetch_add(1, Relaxed);
                            backoff.reset();
                            delay
                        }
                        SessionEnd::Closed(code) if FINAL_CLOSE_CODES.contains(&code) => {
                            let detail = format!("{} stops (no reconnect after {code})", self.id);
                            self.tally.record(&format!("closed: {code}"), detail);
                            return;
                        }
                        SessionEnd::Closed(code) => {
                            self.tally.record(&format!("closed: {code}"), &self.id);
                            retry_delay(&mut backoff, started)
                        }
                        SessionEnd::Lost(why) => {
                            self.tally.record("connection lost", why);
                            retry_delay(&mut backoff, started)
                        }
                    }
                }
                Err(e) if e.is_final() => {
                    let detail = format!("{}: {e}; this device stops", self.id);
                    self.tally.record(&e.kind(), detail);
                    return;
                }
                Err(e) => {
                    self.tally.record(&e.kind(), &e);
                    let jitter = backoff.next_delay(&mut rand::thread_rng());
                    jitter.max(e.retry_after().unwrap_or_default())
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            self.counters.reconnects.fetch_add(1, Relaxed);
        }
    }

    async fn session(&self, mut ws: Ws, state: &mut State) -> SessionEnd {
        let prefix = format!("{}-{}-", self.id, self.boot);
        // A random phase spreads a fleet's messages over the period.
        let mut ticker = state
            .period
            .map(|period| ticker_for(period, period.mul_f64(rand::random::<f64>())));
        let mut close_code = None;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => {
                    conn::close(&mut ws).await;
                    return SessionEnd::Cancelled;
                }
                _ = tick(&mut ticker) => {
                    let reading = state.sensor.step(&mut rand::thread_rng());
                    let id = proto::message_id(&self.id, self.boot, reading.counter);
                    let text = proto::telemetry(&id, &proto::now_rfc3339(), &reading);
                    if let Err(e) = ws.send(Message::text(text)).await {
                        return SessionEnd::Lost(e.to_string());
                    }
                    self.counters.sent.fetch_add(1, Relaxed);
                }
                frame = ws.next() => match frame {
                    // After the gateway's close frame, the end of the stream (or the TCP
                    // connection dropped without a TLS close_notify) is the expected end.
                    None | Some(Err(_)) if close_code.is_some() => {
                        return SessionEnd::Closed(close_code.unwrap_or(1005));
                    }
                    None => return SessionEnd::Lost("closed without a close frame".into()),
                    Some(Err(e)) => return SessionEnd::Lost(e.to_string()),
                    Some(Ok(Message::Text(text))) => {
                        match self.handle(&mut ws, &text, &prefix, &mut state.recent).await {
                            Err(e) => return SessionEnd::Lost(e),
                            Ok(Next::Continue) => {}
                            Ok(Next::SetInterval(period)) => {
                                state.period = Some(period);
                                ticker = Some(ticker_for(period, period));
                            }
                            Ok(Next::Reboot { command_id, delay }) => {
                                self.await_ack(&mut ws, &command_id, &prefix).await;
                                conn::close(&mut ws).await;
                                return SessionEnd::Rebooted(delay);
                            }
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        close_code = Some(conn::close_code_of(&frame).unwrap_or(1005));
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    async fn handle(
        &self,
        ws: &mut Ws,
        text: &str,
        prefix: &str,
        recent: &mut RecentCommands,
    ) -> Result<Next, String> {
        match proto::parse(text) {
            // Acks of our command results share the type; only count telemetry acks.
            Ok(Incoming::Ack { id }) if id.starts_with(prefix) => {
                self.counters.acked.fetch_add(1, Relaxed);
            }
            Ok(Incoming::Command(command)) => return self.on_command(ws, command, recent).await,
            Ok(Incoming::Error(error)) => {
                let detail = format!("{} (message {:?}): {}", self.id, error.id, error.message);
                self.tally.record(&format!("error: {}", error.code), detail);
            }
            Ok(Incoming::Ack { .. } | Incoming::Welcome(_) | Incoming::Other) => {}
            Err(e) => self.tally.record(
                "unparsable message from the gateway",
                format!("{}: {e}", self.id),
            ),
        }
        Ok(Next::Continue)
    }

    /// Acks the command and answers it in the same flush; a command seen before is answered
    /// with the remembered result and not executed again.
    async fn on_command(
        &self,
        ws: &mut Ws,
        command: Command,
        recent: &mut RecentCommands,
    ) -> Result<Next, String> {
        let (answer, next) = match recent.answer_to(&command.id) {
            Some(answer) => {
                self.counters.duplicate_commands.fetch_add(1, Relaxed);
                (answer.to_owned(), Next::Continue)
            }
            None => {
                let (outcome, action) = commands::execute(&command, chrono::Utc::now());
                let answer = proto::command_result(&command.id, &outcome);
                recent.remember(&command.id, answer.clone());
                self.counters.commands.fetch_add(1, Relaxed);
                let next = match action {
                    Action::None => Next::Continue,
                    Action::SetInterval(period) => Next::SetInterval(period),
                    Action::Reboot(delay) => Next::Reboot {
                        command_id: command.id.clone(),
                        delay,
                    },
                };
                (answer, next)
            }
        };
        let send = async {
            ws.feed(Message::text(proto::ack(&command.id))).await?;
            ws.feed(Message::text(answer)).await?;
            ws.flush().await
        };
        send.await.map_err(|e| e.to_string())?;
        Ok(next)
    }

    /// Reads until the gateway acks `command_id` (it has stored the result), the connection
    /// ends, or [`RESULT_ACK_WAIT`] passes. Commands arriving meanwhile are left unanswered: the
    /// gateway sends them again after the reboot.
    async fn await_ack(&self, ws: &mut Ws, command_id: &str, prefix: &str) {
        let _ = tokio::time::timeout(RESULT_ACK_WAIT, async {
            while let Some(Ok(frame)) = ws.next().await {
                let Message::Text(text) = frame else { continue };
                match proto::parse(&text) {
                    Ok(Incoming::Ack { id }) if id == command_id => return,
                    Ok(Incoming::Ack { id }) if id.starts_with(prefix) => {
                        self.counters.acked.fetch_add(1, Relaxed);
                    }
                    _ => {}
                }
            }
        })
        .await;
    }
}

/// The wait before reconnecting after a session that started at `started` ended.
fn retry_delay(backoff: &mut Backoff, started: Instant) -> Duration {
    if started.elapsed() >= STABLE_SESSION {
        backoff.reset();
    }
    backoff.next_delay(&mut rand::thread_rng())
}

/// A telemetry ticker with the first tick after `first`.
fn ticker_for(period: Duration, first: Duration) -> Interval {
    let mut ticker = tokio::time::interval_at(Instant::now() + first, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

async fn tick(ticker: &mut Option<Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Target;
    use crate::mock::{self, Mock, Script};
    use serde_json::json;
    use std::path::Path;

    type Parts = (Device, Arc<Counters>, Arc<ErrorTally>, CancellationToken);

    async fn device(mock: &Mock, token: Secret) -> Parts {
        let target = Target::resolve(&mock.url("ws"), Path::new("unused.pem"))
            .await
            .unwrap();
        device_for(target, token)
    }

    fn device_for(target: Target, token: Secret) -> Parts {
        let (counters, tally, cancel) = (Arc::default(), Arc::default(), CancellationToken::new());
        let device = Device {
            id: "sim-00001".into(),
            token,
            boot: 42,
            period: Some(Duration::from_millis(40)),
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
    fn sent_in_order(mock: &Mock) -> Vec<(String, String)> {
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
        let mock = Mock::start(
            Script {
                close_with: Some(4001),
                ..Script::default()
            },
            None,
        )
        .await;
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
        let mock = Mock::start(
            Script {
                close_with: Some(1001),
                ..Script::default()
            },
            None,
        )
        .await;
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
}
