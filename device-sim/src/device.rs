//! One simulated device for `run`: sensor readings on a random walk, answers to commands, and
//! reconnects with backoff as a well-behaved device does.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde::Serialize;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::conn::{self, Ws, FINAL_CLOSE_CODES};
use crate::fleet::Connector;
use crate::proto::{self, Command, Incoming, Outcome};
use crate::stats::ErrorTally;
use crate::tokens::Secret;

/// A session that lasted this long was healthy: the next reconnect starts from a short delay.
const STABLE_SESSION: Duration = Duration::from_secs(30);

/// Fleet-wide counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub reconnects: AtomicU64,
    pub connected: AtomicI64,
}

/// One reading, the `data` of a telemetry message.
#[derive(Debug, Serialize, PartialEq)]
pub struct Reading {
    pub temp: f64,
    pub humidity: f64,
    pub battery: f64,
    pub counter: u64,
    pub state: &'static str,
}

/// Sensor values that drift a little with every reading.
#[derive(Debug)]
pub struct Sensor {
    temp: f64,
    humidity: f64,
    battery: f64,
    counter: u64,
}

impl Sensor {
    /// A sensor starting at plausible indoor values.
    pub fn new(rng: &mut impl Rng) -> Sensor {
        Sensor {
            temp: rng.gen_range(18.0..24.0),
            humidity: rng.gen_range(35.0..55.0),
            battery: rng.gen_range(60.0..100.0),
            counter: 0,
        }
    }

    /// The next reading; `counter` counts readings from 0.
    pub fn step(&mut self, rng: &mut impl Rng) -> Reading {
        self.temp = (self.temp + rng.gen_range(-0.2..=0.2)).clamp(-20.0, 50.0);
        self.humidity = (self.humidity + rng.gen_range(-0.5..=0.5)).clamp(0.0, 100.0);
        self.battery = (self.battery - rng.gen_range(0.0..0.01)).max(0.0);
        let reading = Reading {
            temp: round2(self.temp),
            humidity: round2(self.humidity),
            battery: round2(self.battery),
            counter: self.counter,
            state: "ok",
        };
        self.counter += 1;
        reading
    }
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// What the simulated device answers to a command.
pub fn answer(command: &Command) -> Outcome {
    match command.name.as_str() {
        "ping" => Outcome::Succeeded(serde_json::json!({"pong": proto::now_rfc3339()})),
        _ => Outcome::Rejected("unknown command".into()),
    }
}

/// How a session ended.
#[derive(Debug, PartialEq)]
enum SessionEnd {
    Cancelled,
    Closed(u16),
    Lost(String),
}

/// One device of a `run` fleet.
pub struct Device {
    pub id: String,
    pub token: Secret,
    /// Part of every message id, so ids stay unique across runs.
    pub boot: u64,
    /// Time between telemetry messages; `None` sends none.
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
        let mut sensor = Sensor::new(&mut rand::thread_rng());
        loop {
            let attempt = tokio::select! {
                _ = self.cancel.cancelled() => return,
                attempt = self.connector.once(&self.token) => attempt,
            };
            let retry_after = match attempt {
                Ok((ws, _welcome)) => {
                    let started = Instant::now();
                    self.counters.connected.fetch_add(1, Relaxed);
                    let end = self.session(ws, &mut sensor).await;
                    self.counters.connected.fetch_sub(1, Relaxed);
                    match end {
                        SessionEnd::Cancelled => return,
                        SessionEnd::Closed(code) if FINAL_CLOSE_CODES.contains(&code) => {
                            let detail = format!("{} stops (no reconnect after {code})", self.id);
                            self.tally.record(&format!("closed: {code}"), detail);
                            return;
                        }
                        SessionEnd::Closed(code) => {
                            self.tally.record(&format!("closed: {code}"), &self.id)
                        }
                        SessionEnd::Lost(why) => self.tally.record("connection lost", why),
                    }
                    if started.elapsed() >= STABLE_SESSION {
                        backoff.reset();
                    }
                    None
                }
                Err(e) if e.is_final() => {
                    let detail = format!("{}: {e}; this device stops", self.id);
                    self.tally.record(&e.kind(), detail);
                    return;
                }
                Err(e) => {
                    self.tally.record(&e.kind(), &e);
                    e.retry_after()
                }
            };
            let delay = backoff
                .next_delay(&mut rand::thread_rng())
                .max(retry_after.unwrap_or_default());
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            self.counters.reconnects.fetch_add(1, Relaxed);
        }
    }

    async fn session(&self, mut ws: Ws, sensor: &mut Sensor) -> SessionEnd {
        let prefix = format!("{}-{}-", self.id, self.boot);
        let mut ticker = self.period.map(|period| {
            // A random phase spreads a fleet's messages over the period.
            let phase = period.mul_f64(rand::random::<f64>());
            let mut ticker = tokio::time::interval_at(Instant::now() + phase, period);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            ticker
        });
        let mut close_code = None;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => {
                    conn::close(&mut ws).await;
                    return SessionEnd::Cancelled;
                }
                _ = tick(&mut ticker) => {
                    let reading = sensor.step(&mut rand::thread_rng());
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
                        if let Err(e) = self.handle(&mut ws, &text, &prefix).await {
                            return SessionEnd::Lost(e);
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

    async fn handle(&self, ws: &mut Ws, text: &str, prefix: &str) -> Result<(), String> {
        match proto::parse(text) {
            // Acks of our command results share the type; only count telemetry acks.
            Ok(Incoming::Ack { id }) if id.starts_with(prefix) => {
                self.counters.acked.fetch_add(1, Relaxed);
            }
            Ok(Incoming::Command(command)) => {
                // Receipt first, then the outcome; a redelivered command is answered again,
                // which the gateway takes as a harmless duplicate.
                let outcome = answer(&command);
                let replies = [
                    proto::ack(&command.id),
                    proto::command_result(&command.id, &outcome),
                ];
                for reply in replies {
                    ws.send(Message::text(reply))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
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
        Ok(())
    }
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
            json!({"type":"command","id":"c-2","name":"reboot","params":{"delay_s":5}}),
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
        assert_eq!(acks, [json!("c-1"), json!("c-2")]);
        let results = mock.seen.of_type("command_result");
        assert_eq!(results[0]["status"], "succeeded");
        assert!(results[0]["result"]["pong"].is_string());
        assert_eq!(results[1]["status"], "rejected");
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

    #[test]
    fn readings_drift_within_physical_bounds() {
        let mut rng = rand::thread_rng();
        let mut sensor = Sensor::new(&mut rng);
        let mut previous = sensor.step(&mut rng);
        assert_eq!(previous.counter, 0);
        for n in 1..20_000 {
            let reading = sensor.step(&mut rng);
            assert_eq!(reading.counter, n);
            assert!((-20.0..=50.0).contains(&reading.temp));
            assert!((0.0..=100.0).contains(&reading.humidity));
            assert!((0.0..=100.0).contains(&reading.battery));
            assert!((reading.temp - previous.temp).abs() <= 0.21);
            assert!(reading.battery <= previous.battery);
            previous = reading;
        }
    }

    #[test]
    fn ping_succeeds_and_anything_else_is_rejected() {
        let command = |name: &str| Command {
            id: "c-1".into(),
            name: name.into(),
            params: json!({}),
        };
        match answer(&command("ping")) {
            Outcome::Succeeded(result) => assert!(result["pong"].is_string()),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            answer(&command("reboot")),
            Outcome::Rejected("unknown command".into())
        );
    }
}
