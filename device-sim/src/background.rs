//! Background telemetry for the command benchmark: devices streaming at a fixed rate or with a
//! fixed number of messages in flight, from before the measurement until after it, counting
//! what the gateway acked.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinSet;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::bench::bench_message;
use crate::conn::{self, Ws};
use crate::fleet::Connector;
use crate::proto::{self, Incoming};
use crate::stats::ErrorTally;
use crate::tokens::Secret;

/// Connection attempts per background device (429 and 503 refusals are retried).
const ATTEMPTS: u32 = 3;
/// After an `error` answer, a device pauses this long rather than spin on refusals.
const ERROR_PAUSE: Duration = Duration::from_millis(50);
/// Size of each background message, in bytes of JSON (as `device-sim bench` sends by default).
const PAYLOAD_BYTES: usize = 200;

/// How fast each background device sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// One message every this long.
    Every(Duration),
    /// Keep this many messages sent and not yet acked.
    InFlight(usize),
}

impl Pace {
    /// A short description for reports.
    pub fn describe(&self) -> String {
        match self {
            Pace::Every(period) => format!("{:.1} msgs/s each", 1.0 / period.as_secs_f64()),
            Pace::InFlight(window) => format!("{window} in flight each"),
        }
    }
}

/// Counters of the background fleet.
#[derive(Debug, Default)]
pub struct Load {
    pub connected: AtomicUsize,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
}

/// A running background fleet.
pub struct Background {
    pub load: Arc<Load>,
    devices: usize,
    tasks: JoinSet<()>,
    cancel: CancellationToken,
}

impl Background {
    /// Connects every device and starts its stream; failures are counted in `tally`.
    pub fn start(
        connector: Arc<Connector>,
        creds: Vec<(String, Secret)>,
        pace: Pace,
        tally: Arc<ErrorTally>,
    ) -> Background {
        let load = Arc::new(Load::default());
        let cancel = CancellationToken::new();
        let boot = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let devices = creds.len();
        let mut tasks = JoinSet::new();
        for (id, token) in creds {
            let streamer = Streamer {
                prefix: format!("{id}-{boot}-"),
                id,
                boot,
                pace,
                load: load.clone(),
                tally: tally.clone(),
                cancel: cancel.clone(),
            };
            let connector = connector.clone();
            tasks.spawn(async move {
                let connected = tokio::select! {
                    _ = streamer.cancel.cancelled() => return,
                    connected = connector.with_retries(&streamer.id, &token, ATTEMPTS, &streamer.tally) => connected,
                };
                if let Ok((ws, _welcome)) = connected {
                    streamer.load.connected.fetch_add(1, Relaxed);
                    streamer.stream(ws).await;
                }
            });
        }
        Background {
            load,
            devices,
            tasks,
            cancel,
        }
    }

    /// Waits until every device connected or `limit` passed; the number connected.
    pub async fn wait_connected(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        while self.load.connected.load(Relaxed) < self.devices && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.load.connected.load(Relaxed)
    }

    /// Stops every stream and closes the connections (for at most a few seconds).
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }
}

/// One background device.
struct Streamer {
    id: String,
    prefix: String,
    boot: u64,
    pace: Pace,
    load: Arc<Load>,
    tally: Arc<ErrorTally>,
    cancel: CancellationToken,
}

impl Streamer {
    async fn stream(&self, mut ws: Ws) {
        let mut ticker = match self.pace {
            Pace::Every(period) => Some(ticker(period)),
            Pace::InFlight(_) => None,
        };
        let mut next = 0u64;
        let mut in_flight = 0usize;
        loop {
            if let Pace::InFlight(window) = self.pace {
                while in_flight < window {
                    if let Err(e) = self.send(&mut ws, &mut next).await {
                        return self.lost(e);
                    }
                    in_flight += 1;
                }
            }
            tokio::select! {
                _ = self.cancel.cancelled() => {
                    conn::close(&mut ws).await;
                    return;
                }
                _ = tick(&mut ticker) => {
                    if let Err(e) = self.send(&mut ws, &mut next).await {
                        return self.lost(e);
                    }
                    in_flight += 1;
                }
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        if self.on_text(&text, &mut in_flight) {
                            tokio::time::sleep(ERROR_PAUSE).await;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let code = conn::close_code_of(&frame).unwrap_or(1005);
                        let detail = format!("{} closed by the gateway", self.id);
                        self.tally.record(&format!("background: closed: {code}"), detail);
                        return;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return self.lost(e.to_string()),
                    None => return self.lost("closed without a close frame".into()),
                },
            }
        }
    }

    async fn send(&self, ws: &mut Ws, next: &mut u64) -> Result<(), String> {
        let id = proto::message_id(&self.id, self.boot, *next);
        let text = bench_message(&id, &proto::now_rfc3339(), *next, PAYLOAD_BYTES);
        *next += 1;
        ws.send(Message::text(text))
            .await
            .map_err(|e| e.to_string())?;
        self.load.sent.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Counts an ack or an error; true for an error (the message was not stored).
    fn on_text(&self, text: &str, in_flight: &mut usize) -> bool {
        match proto::parse(text) {
            Ok(Incoming::Ack { id }) if id.starts_with(&self.prefix) => {
                self.load.acked.fetch_add(1, Relaxed);
                *in_flight = in_flight.saturating_sub(1);
            }
            Ok(Incoming::Error(error)) => {
                if error.id.is_some_and(|id| id.starts_with(&self.prefix)) {
                    *in_flight = in_flight.saturating_sub(1);
                }
                let detail = format!("{}: {}", self.id, error.message);
                self.tally
                    .record(&format!("background: error: {}", error.code), detail);
                return true;
            }
            Ok(_) => {}
            Err(e) => self.tally.record(
                "background: unparsable message from the gateway",
                format!("{}: {e}", self.id),
            ),
        }
        false
    }

    fn lost(&self, why: String) {
        self.load.connected.fetch_sub(1, Relaxed);
        self.tally
            .record("background: connection lost", format!("{}: {why}", self.id));
    }
}

/// A ticker with a random phase, so a fleet's messages spread over the period.
fn ticker(period: Duration) -> Interval {
    let first = Instant::now() + period.mul_f64(rand::random::<f64>());
    let mut ticker = tokio::time::interval_at(first, period);
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
    use std::path::Path;

    async fn run_for(
        script: Script,
        pace: Pace,
        devices: usize,
        run: Duration,
    ) -> (Mock, Arc<Load>, Arc<ErrorTally>) {
        let mock = Mock::start(script, None).await;
        let target = Target::resolve(&mock.url("ws"), Path::new("unused.pem"))
            .await
            .unwrap();
        let creds = (1..=devices)
            .map(|n| (format!("bg-{n}"), mock::token()))
            .collect();
        let tally = Arc::new(ErrorTally::default());
        let background = Background::start(Connector::new(target, 4), creds, pace, tally.clone());
        assert_eq!(
            background.wait_connected(Duration::from_secs(5)).await,
            devices
        );
        tokio::time::sleep(run).await;
        let load = background.load.clone();
        background.stop().await;
        (mock, load, tally)
    }

    #[tokio::test]
    async fn a_fixed_rate_sends_about_that_many_and_counts_the_acks() {
        let pace = Pace::Every(Duration::from_millis(20));
        let (mock, load, tally) =
            run_for(Script::default(), pace, 2, Duration::from_millis(500)).await;
        assert_eq!(tally.total(), 0, "{:?}", tally.snapshot());
        let sent = load.sent.load(Relaxed);
        // 2 devices x 25 per 500 ms; allow for the random phase and a busy machine.
        assert!((30..=55).contains(&sent), "sent {sent}");
        assert_eq!(mock.seen.of_type("telemetry").len() as u64, sent);
        assert!(load.acked.load(Relaxed) + 2 >= sent, "acked {:?}", load);
        assert_eq!(*mock.seen.closes.lock().unwrap(), [1000, 1000]);
    }

    #[tokio::test]
    async fn a_window_keeps_messages_in_flight_and_pauses_on_errors() {
        let script = Script {
            error_every: Some(10),
            ..Script::default()
        };
        let (mock, load, tally) =
            run_for(script, Pace::InFlight(4), 1, Duration::from_millis(300)).await;
        let sent = mock.seen.of_type("telemetry").len() as u64;
        assert_eq!(load.sent.load(Relaxed), sent);
        let errors = tally.snapshot()["background: error: internal"];
        assert!(errors > 0);
        // Each error costs a 50 ms pause: at most 6 of them in 300 ms, so few messages.
        assert!(errors <= 7, "{errors}");
        // Nothing beyond the window was ever outstanding.
        let acked = load.acked.load(Relaxed);
        assert!(
            acked + errors <= sent && sent - acked - errors <= 4,
            "{load:?}, {errors} errors"
        );
        let ids: std::collections::HashSet<_> = mock
            .seen
            .of_type("telemetry")
            .iter()
            .map(|m| m["id"].to_string())
            .collect();
        assert_eq!(ids.len() as u64, sent, "ids are unique");
    }

    #[test]
    fn paces_describe_themselves() {
        assert_eq!(
            Pace::Every(Duration::from_millis(100)).describe(),
            "10.0 msgs/s each"
        );
        assert_eq!(Pace::InFlight(8).describe(), "8 in flight each");
    }
}
