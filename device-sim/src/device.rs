//! One simulated device for `run` (and the command benchmark): telemetry from its sensor through
//! a store-and-forward outbox, prompt answers to commands, reconnects with backoff as a
//! well-behaved device does, and, when asked, faults injected on purpose.

use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::chaos::{Chaos, Clock};
use crate::commands::{self, Action, RecentCommands};
use crate::conn::{self, Ws, FINAL_CLOSE_CODES};
use crate::fleet::Connector;
use crate::outbox::{Outbox, Point, Refused};
use crate::proto::{self, Command, Incoming};
use crate::sensor::Sensor;
use crate::stats::{ErrorTally, Latency};
use crate::tokens::Secret;

/// The close code of a gateway that is shutting down (and most likely restarting).
const GATEWAY_SHUTTING_DOWN: u16 = 1001;
/// A session that lasted this long was healthy: the next reconnect starts from a short delay.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// Before a simulated reboot, how long to wait for the gateway to ack (store) the result.
const RESULT_ACK_WAIT: Duration = Duration::from_secs(2);
/// Telemetry messages a device keeps sent and unacked at most; more readings wait in the buffer.
const MAX_IN_FLIGHT: usize = 64;
/// The message size limit until a welcome announces one (the protocol's default).
const DEFAULT_MAX_MESSAGE_BYTES: usize = 65_536;

/// Fleet-wide counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Telemetry messages sent (first sends; see `resent` and `duplicates_sent`).
    pub sent: AtomicU64,
    /// Telemetry messages acked (each once).
    pub acked: AtomicU64,
    /// Send-to-ack latency of telemetry.
    pub latency: Latency,
    pub reconnects: AtomicU64,
    pub connected: AtomicI64,
    /// Messages sent again after a reconnect because they had no ack.
    pub resent: AtomicU64,
    /// Readings dropped because the buffer was full (the oldest go first).
    pub dropped: AtomicU64,
    /// Readings the gateway refused for good (an `error` other than `rate_limited`/`internal`).
    pub rejected: AtomicU64,
    /// Readings still buffered or unacked when the devices stopped.
    pub unsent: AtomicU64,
    /// Commands executed (each id once).
    pub commands: AtomicU64,
    /// Commands received again after they were executed (acked and answered, not executed).
    pub duplicate_commands: AtomicU64,
    /// Simulated reboots (`reboot` commands).
    pub reboots: AtomicU64,
    /// Connections dropped on purpose (`--chaos-disconnect-rate`).
    pub chaos_disconnects: AtomicU64,
    /// Messages sent twice on purpose (`--chaos-duplicate-rate`).
    pub duplicates_sent: AtomicU64,
}

/// How a device behaves beyond the protocol.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// Readings kept while they cannot be sent, at most.
    pub buffer: usize,
    pub chaos: Chaos,
    pub clock: Clock,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            buffer: 10_000,
            chaos: Chaos::default(),
            clock: Clock::default(),
        }
    }
}

/// How a session ended.
#[derive(Debug, PartialEq)]
enum SessionEnd {
    Cancelled,
    Closed(u16),
    Lost(String),
    /// Closed by the device itself for a `reboot` command; offline this long.
    Rebooted(Duration),
    /// Dropped by the device on purpose, without a close.
    Chaos,
}

/// What a device keeps across sessions and simulated reboots (its "flash").
struct State {
    sensor: Sensor,
    /// Ticks when a reading is due; `None` takes none (until `set_interval`).
    ticker: Option<Interval>,
    recent: RecentCommands,
    outbox: Outbox,
    /// Number of the next telemetry message, part of its id.
    next_message: u64,
    /// The gateway's message size limit, from the last welcome.
    max_message_bytes: usize,
}

/// What the session does after a frame was handled.
enum Next {
    Continue,
    Reboot { command_id: String, delay: Duration },
}

/// One device of a `run` fleet.
pub struct Device {
    pub id: String,
    pub token: Secret,
    /// Part of every message id, so ids stay unique across runs.
    pub boot: u64,
    /// Time between readings at start; `None` takes none (until `set_interval`).
    pub period: Option<Duration>,
    pub profile: Profile,
    pub connector: Arc<Connector>,
    pub counters: Arc<Counters>,
    pub tally: Arc<ErrorTally>,
    pub cancel: CancellationToken,
}

impl Device {
    /// Connects, runs sessions and reconnects until cancelled or refused for good; readings
    /// taken while offline are buffered and sent after the next connect.
    pub async fn run(self) {
        let mut backoff = Backoff::device();
        let mut state = State {
            sensor: Sensor::new(&mut rand::thread_rng()),
            // A random phase spreads a fleet's messages over the period.
            ticker: self
                .period
                .map(|period| ticker_for(period, period.mul_f64(rand::random::<f64>()))),
            recent: RecentCommands::default(),
            outbox: Outbox::new(self.profile.buffer, MAX_IN_FLIGHT),
            next_message: 0,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        };
        loop {
            let connect = self.connector.once(&self.id, &self.token);
            let Some(attempt) = self.offline(&mut state, connect).await else {
                return self.stop(&state);
            };
            let delay = match attempt {
                Ok((ws, welcome)) => {
                    if let Some(max) = welcome.limits.max_message_bytes {
                        state.max_message_bytes = usize::try_from(max).unwrap_or(usize::MAX);
                    }
                    let started = Instant::now();
                    self.counters.connected.fetch_add(1, Relaxed);
                    let end = self.session(ws, &mut state).await;
                    self.counters.connected.fetch_sub(1, Relaxed);
                    match end {
                        SessionEnd::Cancelled => return self.stop(&state),
                        SessionEnd::Rebooted(delay) => {
                            self.counters.reboots.fetch_add(1, Relaxed);
                            backoff.reset();
                            delay
                        }
                        SessionEnd::Closed(code) if FINAL_CLOSE_CODES.contains(&code) => {
                            let detail = format!("{} stops (no reconnect after {code})", self.id);
                            self.tally.record(&format!("closed: {code}"), detail);
                            return self.stop(&state);
                        }
                        SessionEnd::Closed(code) => {
                            self.tally.record(&format!("closed: {code}"), &self.id);
                            if code == GATEWAY_SHUTTING_DOWN
                                && backoff.gateway_restarting(std::time::Instant::now())
                            {
                                backoff.next_delay(&mut rand::thread_rng())
                            } else {
                                retry_delay(&mut backoff, started)
                            }
                        }
                        SessionEnd::Lost(why) => {
                            self.tally.record("connection lost", why);
                            retry_delay(&mut backoff, started)
                        }
                        SessionEnd::Chaos => {
                            self.counters.chaos_disconnects.fetch_add(1, Relaxed);
                            retry_delay(&mut backoff, started)
                        }
                    }
                }
                Err(e) if e.is_final() => {
                    let detail = format!("{}: {e}; this device stops", self.id);
                    self.tally.record(&e.kind(), detail);
                    return self.stop(&state);
                }
                Err(e) => {
                    self.tally.record(&e.kind(), &e);
                    let jitter = backoff.next_delay(&mut rand::thread_rng());
                    jitter.max(e.retry_after().unwrap_or_default())
                }
            };
            if self
                .offline(&mut state, tokio::time::sleep(delay))
                .await
                .is_none()
            {
                return self.stop(&state);
            }
            self.counters.reconnects.fetch_add(1, Relaxed);
        }
    }

    /// Waits for `until` while offline, taking readings into the buffer meanwhile; `None` when
    /// cancelled first.
    async fn offline<F: Future>(&self, state: &mut State, until: F) -> Option<F::Output> {
        tokio::pin!(until);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return None,
                output = &mut until => return Some(output),
                _ = tick(&mut state.ticker) => self.take_reading(state),
            }
        }
    }

    /// Counts what is left unsent when the device stops: nothing goes missing silently.
    fn stop(&self, state: &State) {
        let left = state.outbox.waiting() + state.outbox.unacked_points();
        self.counters.unsent.fetch_add(left as u64, Relaxed);
    }

    fn take_reading(&self, state: &mut State) {
        let reading = state.sensor.step(&mut rand::thread_rng());
        let point = Point {
            ts: self.profile.clock.now_rfc3339(),
            data: serde_json::to_value(&reading).expect("readings serialize"),
        };
        let dropped = state.outbox.push(point);
        if dropped > 0 {
            self.counters.dropped.fetch_add(dropped, Relaxed);
        }
    }

    async fn session(&self, mut ws: Ws, state: &mut State) -> SessionEnd {
        if let Err(e) = self.catch_up(&mut ws, state).await {
            return ended_by_send(&mut ws, e).await;
        }
        let mut chaos = (self.profile.chaos.disconnect_rate > 0.0)
            .then(|| ticker_for(Duration::from_secs(1), Duration::from_secs(1)));
        let mut close_code = None;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => {
                    conn::close(&mut ws).await;
                    return SessionEnd::Cancelled;
                }
                _ = tick(&mut state.ticker) => {
                    self.take_reading(state);
                    // After the gateway's close frame the connection takes no more messages
                    // (a send would fail and end the session as lost rather than closed):
                    // readings wait in the buffer for the next session.
                    if close_code.is_none() {
                        if let Err(e) = self.send_waiting(&mut ws, state).await {
                            return ended_by_send(&mut ws, e).await;
                        }
                    }
                }
                _ = tick(&mut chaos) => {
                    if self.profile.chaos.disconnect_now(&mut rand::thread_rng()) {
                        // Dropping the socket without a close frame (or a TLS close_notify).
                        return SessionEnd::Chaos;
                    }
                }
                frame = ws.next() => match frame {
                    // After the gateway's close frame, the end of the stream (or the TCP
                    // connection dropped without a TLS close_notify) is the expected end.
                    None | Some(Err(_)) if close_code.is_some() => {
                        return SessionEnd::Closed(close_code.unwrap_or(1005));
                    }
                    None => return SessionEnd::Lost("closed without a close frame".into()),
                    Some(Err(e)) => return SessionEnd::Lost(e.to_string()),
                    Some(Ok(Message::Text(text))) => match self.handle(&mut ws, &text, state).await {
                        Err(e) => return SessionEnd::Lost(e),
                        Ok(Next::Continue) => {}
                        Ok(Next::Reboot { command_id, delay }) => {
                            self.await_ack(&mut ws, &command_id, state).await;
                            conn::close(&mut ws).await;
                            return SessionEnd::Rebooted(delay);
                        }
                    },
                    Some(Ok(Message::Close(frame))) => {
                        close_code = Some(conn::close_code_of(&frame).unwrap_or(1005));
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// After a connect: first what was sent before and never acked (same ids: the gateway
    /// stores each once), then what was buffered meanwhile.
    async fn catch_up(&self, ws: &mut Ws, state: &mut State) -> Result<(), String> {
        for text in state.outbox.resend(Instant::now()) {
            ws.send(Message::text(text))
                .await
                .map_err(|e| e.to_string())?;
            self.counters.resent.fetch_add(1, Relaxed);
        }
        self.send_waiting(ws, state).await
    }

    /// Sends what waits in the buffer, as far as the in-flight window allows.
    async fn send_waiting(&self, ws: &mut Ws, state: &mut State) -> Result<(), String> {
        let (device, boot) = (&self.id, self.boot);
        let number = &mut state.next_message;
        let mut next_id = || {
            let id = proto::message_id(device, boot, *number);
            *number += 1;
            id
        };
        while let Some(text) =
            state
                .outbox
                .next_message(&mut next_id, state.max_message_bytes, Instant::now())
        {
            if self.profile.chaos.duplicate(&mut rand::thread_rng()) {
                ws.feed(Message::text(text.clone()))
                    .await
                    .map_err(|e| e.to_string())?;
                self.counters.duplicates_sent.fetch_add(1, Relaxed);
            }
            ws.send(Message::text(text))
                .await
                .map_err(|e| e.to_string())?;
            self.counters.sent.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    async fn handle(&self, ws: &mut Ws, text: &str, state: &mut State) -> Result<Next, String> {
        match proto::parse(text) {
            Ok(Incoming::Ack { id }) => self.on_ack(&id, state),
            Ok(Incoming::Command(command)) => return self.on_command(ws, command, state).await,
            Ok(Incoming::Error(error)) => {
                let detail = format!("{} (message {:?}): {}", self.id, error.id, error.message);
                self.tally.record(&format!("error: {}", error.code), detail);
                if let Some(id) = &error.id {
                    if let Refused::Rejected(points) = state.outbox.refused(id, &error.code) {
                        self.counters.rejected.fetch_add(points as u64, Relaxed);
                    }
                }
            }
            Ok(Incoming::Welcome(_) | Incoming::Other) => {}
            Err(e) => self.tally.record(
                "unparsable message from the gateway",
                format!("{}: {e}", self.id),
            ),
        }
        Ok(Next::Continue)
    }

    /// An ack of one of our telemetry messages (acks of command results and second acks of
    /// duplicates find nothing in flight).
    fn on_ack(&self, id: &str, state: &mut State) {
        if let Some(latency) = state.outbox.ack(id, Instant::now()) {
            self.counters.acked.fetch_add(1, Relaxed);
            self.counters.latency.record(latency);
        }
    }

    /// Acks the command and answers it in the same flush; a command seen before is answered
    /// with the remembered result and not executed again.
    async fn on_command(
        &self,
        ws: &mut Ws,
        command: Command,
        state: &mut State,
    ) -> Result<Next, String> {
        let (answer, next) = match state.recent.answer_to(&command.id) {
            Some(answer) => {
                self.counters.duplicate_commands.fetch_add(1, Relaxed);
                (answer.to_owned(), Next::Continue)
            }
            None => {
                let (outcome, action) = commands::execute(&command, self.profile.clock.now());
                let answer = proto::command_result(&command.id, &outcome);
                state.recent.remember(&command.id, answer.clone());
                self.counters.commands.fetch_add(1, Relaxed);
                let next = match action {
                    Action::None => Next::Continue,
                    Action::SetInterval(period) => {
                        state.ticker = Some(ticker_for(period, period));
                        Next::Continue
                    }
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
    async fn await_ack(&self, ws: &mut Ws, command_id: &str, state: &mut State) {
        let _ = tokio::time::timeout(RESULT_ACK_WAIT, async {
            while let Some(Ok(frame)) = ws.next().await {
                let Message::Text(text) = frame else { continue };
                match proto::parse(&text) {
                    Ok(Incoming::Ack { id }) if id == command_id => return,
                    Ok(Incoming::Ack { id }) => self.on_ack(&id, state),
                    _ => {}
                }
            }
        })
        .await;
    }
}

/// How long a device whose send failed looks for a close frame it has not read yet.
const UNREAD_CLOSE_WAIT: Duration = Duration::from_millis(100);

/// A send failed (`error`): when the gateway's close frame had already arrived, unread, the
/// session ended with that close, not with the failure. A gateway in a hurry closes and drops
/// the connection without waiting for the device's reply, so a send after its close frame
/// but before the device read it may find the connection gone.
async fn ended_by_send(ws: &mut Ws, error: String) -> SessionEnd {
    let unread_close = async {
        while let Some(Ok(frame)) = ws.next().await {
            if let Message::Close(frame) = frame {
                return Some(conn::close_code_of(&frame).unwrap_or(1005));
            }
        }
        None
    };
    match tokio::time::timeout(UNREAD_CLOSE_WAIT, unread_close).await {
        Ok(Some(code)) => SessionEnd::Closed(code),
        _ => SessionEnd::Lost(error),
    }
}

/// The wait before reconnecting after a session that started at `started` ended.
fn retry_delay(backoff: &mut Backoff, started: Instant) -> Duration {
    if started.elapsed() >= STABLE_SESSION {
        backoff.reset();
    }
    backoff.next_delay(&mut rand::thread_rng())
}

/// A ticker with the first tick after `first`.
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
mod forward_tests;
#[cfg(test)]
mod tests;
