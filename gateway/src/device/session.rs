//! One task per connected device: reads its messages, hands telemetry to the writer, sends acks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::limits::TokenBucket;
use super::protocol::{self, ErrorCode, Inbound, Limits, Outbound, ResultStatus};
use super::DeviceContext;
use crate::events::{EventKind, Payload};
use crate::hub::{CloseOrder, SessionHandle};
use crate::metrics::{Reason, METRICS};
use crate::store::commands::{Answer, CommandOutcome, CommandRow, Status};
use crate::store::sessions::{SessionEnd, SessionStart};
use crate::store::writer::{CommandReceipt, TelemetryJob, WriteJob};
use crate::store::StoreError;
use crate::time::now_ms;

/// Messages a device may have waiting for their commit before the session stops reading.
const MAX_PENDING_ACKS: usize = 128;
/// Consecutive invalid messages tolerated before closing with 1008.
const MAX_INVALID_STREAK: u32 = 10;

/// Who is connected, as established by the handshake.
#[derive(Debug, Clone)]
pub struct Identity {
    pub device_pk: i64,
    pub device_id: String,
    pub session_id: String,
    pub remote_addr: String,
    pub auth: &'static str,
    /// Set when the device had no commands waiting at its lookup: the count of queued
    /// commands read before it, and its connect listing is skipped while that holds.
    pub commands_as_of: Option<u64>,
}

/// Waits for the commit of something the device sent: telemetry, or a command ack or result.
enum Pending {
    Telemetry {
        id: String,
        done: oneshot::Receiver<bool>,
    },
    Answer {
        id: String,
        is_result: bool,
        done: CommandReceipt,
    },
}

/// A commit [`Pending`] waited for.
enum Done {
    Telemetry(String, bool),
    Answer {
        id: String,
        is_result: bool,
        received: Box<Result<Option<CommandOutcome>, oneshot::error::RecvError>>,
    },
}

impl Future for Pending {
    type Output = Done;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Done> {
        match &mut *self {
            Pending::Telemetry { id, done } => done
                .poll_unpin(cx)
                .map(|r| Done::Telemetry(std::mem::take(id), r.unwrap_or(false))),
            Pending::Answer {
                id,
                is_result,
                done,
            } => done.poll_unpin(cx).map(|received| Done::Answer {
                id: std::mem::take(id),
                is_result: *is_result,
                received: Box::new(received),
            }),
        }
    }
}

/// The most a session reads and drops of a frame over the size limit before it closes.
const OVERSIZED_DRAIN_BYTES: usize = 4 << 20;
/// Draining an oversized frame stops once the device has sent nothing for this long.
const OVERSIZED_DRAIN_QUIET: std::time::Duration = std::time::Duration::from_millis(250);

/// How a session ended.
struct Ending {
    /// Close frame to send, if the gateway closes.
    close: Option<(u16, &'static str)>,
    /// `last_disconnect_reason`.
    reason: &'static str,
    /// The device may still be writing a frame over the size limit: read and drop it first.
    drain: bool,
}

impl Ending {
    fn close(code: u16, text: &'static str, reason: &'static str) -> Ending {
        Ending {
            close: Some((code, text)),
            reason,
            drain: false,
        }
    }
    fn lost() -> Ending {
        Ending {
            close: None,
            reason: "connection_lost",
            drain: false,
        }
    }
}

impl From<CloseOrder> for Ending {
    fn from(o: CloseOrder) -> Ending {
        Ending::close(o.code, o.text, o.reason)
    }
}

/// The state of one device connection.
pub struct Session<S> {
    ws: WebSocketStream<S>,
    ctx: Arc<DeviceContext>,
    me: Identity,
    /// The device id, shared with the events and write jobs this session makes.
    device_id: Arc<str>,
    handle: Arc<SessionHandle>,
    pending: FuturesUnordered<Pending>,
    bucket: TokenBucket,
    invalid_streak: u32,
    last_frame: Instant,
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// A session over an upgraded socket.
    pub fn new(ws: WebSocketStream<S>, ctx: Arc<DeviceContext>, me: Identity) -> Session<S> {
        let handle = SessionHandle::new(me.session_id.clone(), now_ms());
        let bucket = TokenBucket::new(ctx.settings.telemetry_rate, ctx.settings.telemetry_burst);
        Session {
            ws,
            ctx,
            device_id: Arc::from(me.device_id.as_str()),
            me,
            handle,
            pending: FuturesUnordered::new(),
            bucket,
            invalid_streak: 0,
            last_frame: Instant::now(),
        }
    }

    /// Runs the session to its end, recording presence on both sides. The start and the end
    /// are boxed for the time they run, so that the task an idle session keeps is sized by
    /// [`serve`](Self::serve) alone.
    pub async fn run(mut self) {
        Box::pin(self.begin()).await;
        let ending = match Box::pin(self.welcome()).await {
            Ok(()) => match Box::pin(self.deliver_commands(true)).await {
                Ok(()) => {
                    // Only now may commands be handed over directly: one queued during the
                    // listing above waits for its nudge, so none is written twice.
                    self.handle.open_outbox();
                    self.serve().await
                }
                Err(_) => Ending::lost(),
            },
            Err(_) => Ending::lost(),
        };
        Box::pin(self.end(ending)).await;
    }

    /// Joins the hub and records the start; the device is welcomed only once the session is
    /// on record, so its history and presence read true.
    async fn begin(&mut self) {
        let connected_at = self.handle.connected_at;
        self.ctx
            .hub
            .register(&self.me.device_id, self.handle.clone());
        let start = SessionStart {
            session_id: self.me.session_id.clone(),
            device_pk: self.me.device_pk,
            connected_at,
            remote_addr: self.me.remote_addr.clone(),
            auth: self.me.auth,
        };
        let (done, recorded) = oneshot::channel();
        if self
            .ctx
            .writer
            .submit(WriteJob::SessionStart(start, done))
            .await
            .is_ok()
        {
            let _ = recorded.await;
        }
        METRICS.connections.inc();
        self.publish_presence(EventKind::DeviceConnected, connected_at, None);
        tracing::debug!("device connected");
    }

    /// Hands back what was not written, closes, records the end, and leaves the hub.
    async fn end(&mut self, ending: Ending) {
        // From here on nothing is written to the device: commands handed over but not
        // written go back to the queue (they were marked sent in advance).
        let unsent: Vec<String> = self
            .handle
            .stop_commands()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        if let Err(e) = self.ctx.commands.requeue(unsent).await {
            tracing::warn!(error = %e, "cannot requeue commands the session did not write");
        }
        self.finish(&ending).await;
        let disconnected_at = now_ms();
        let end = SessionEnd {
            session_id: self.me.session_id.clone(),
            device_pk: self.me.device_pk,
            disconnected_at,
            reason: ending.reason,
            last_seen_at: self.handle.last_seen(),
        };
        // Leave the hub once the end is recorded, so `online: false` always comes
        // with its `last_disconnected_at`.
        let (done, recorded) = oneshot::channel();
        if self
            .ctx
            .writer
            .submit(WriteJob::SessionEnd(end, done))
            .await
            .is_ok()
        {
            let _ = recorded.await;
        }
        self.ctx
            .hub
            .unregister(&self.me.device_id, &self.me.session_id);
        self.publish_presence(
            EventKind::DeviceDisconnected,
            disconnected_at,
            Some(ending.reason),
        );
        METRICS.connections.dec();
        METRICS
            .disconnects
            .get_or_create(&Reason {
                reason: ending.reason,
            })
            .inc();
        tracing::debug!(reason = ending.reason, "device disconnected");
    }

    /// The conformance echo mode's session: no welcome, no presence, no commands; the
    /// frames go through [`serve`](Self::serve) like a device's (see `device::conformance`).
    #[cfg(feature = "conformance")]
    pub(super) async fn run_echo(mut self) {
        let ending = self.serve().await;
        self.finish(&ending).await;
    }

    /// Sends the gateway's close frame, if it closes, then ends TLS properly (close_notify),
    /// so clients see a clean close, not a truncation.
    async fn finish(&mut self, ending: &Ending) {
        if ending.drain {
            self.drain_oversized().await;
        }
        if let Some((code, text)) = ending.close {
            self.close(code, text).await;
        }
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            self.ws.get_mut().shutdown(),
        )
        .await;
    }

    fn publish_presence(&self, kind: EventKind, at: i64, reason: Option<&'static str>) {
        self.ctx.events.publish(
            kind,
            self.device_id.clone(),
            Payload::Presence {
                session_id: self.me.session_id.clone(),
                at,
                reason,
            },
        );
    }

    async fn welcome(&mut self) -> Result<(), WsError> {
        let text = Outbound::Welcome {
            device_id: &self.me.device_id,
            session_id: &self.me.session_id,
            server_time: crate::time::format_ms(now_ms()),
            limits: Limits {
                max_message_bytes: self.ctx.settings.max_message_bytes,
                telemetry_per_sec: self.ctx.settings.telemetry_rate,
            },
        }
        .to_json();
        self.ws.send(Message::text(text)).await
    }

    /// Waits for whatever comes next, most of a session's life. What each event needs is
    /// boxed for the time it is handled: inline, the largest of those futures would size
    /// every idle session's task (3 KiB more per connection, measured).
    async fn serve(&mut self) -> Ending {
        let settings = self.ctx.settings.clone();
        let mut ping = tokio::time::interval_at(
            Instant::now() + settings.ping_interval,
            settings.ping_interval,
        );
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let handle = self.handle.clone();
        let shutdown = self.ctx.shutdown.clone();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    Box::pin(self.drain_acks()).await;
                    return Ending::close(1001, "server shutting down", "server_shutdown");
                }
                order = handle.close_ordered() => return order.into(),
                Some(done) = self.pending.next(), if !self.pending.is_empty() => {
                    if Box::pin(self.on_commits(done)).await.is_err() {
                        return Ending::lost();
                    }
                }
                _ = handle.commands_changed() => {
                    if Box::pin(self.on_commands_changed()).await.is_err() {
                        return Ending::lost();
                    }
                }
                frame = self.ws.next(), if self.pending.len() < MAX_PENDING_ACKS => {
                    if let Some(ending) = Box::pin(self.on_frame(frame)).await {
                        return ending;
                    }
                }
                _ = ping.tick() => {
                    if self.last_frame.elapsed() >= settings.idle_timeout {
                        return Ending::close(4008, "idle timeout", "idle_timeout");
                    }
                    if self.ws.send(Message::Ping(Default::default())).await.is_err() {
                        return Ending::lost();
                    }
                }
            }
        }
    }

    /// Handles what the socket yielded; `Some` ends the session.
    async fn on_frame(&mut self, frame: Option<Result<Message, WsError>>) -> Option<Ending> {
        let message = match frame {
            None => {
                return Some(Ending {
                    reason: "client_closed",
                    ..Ending::lost()
                })
            }
            Some(Ok(m)) => m,
            Some(Err(e)) => return Some(ending_for(e)),
        };
        self.last_frame = Instant::now();
        self.handle.touch(now_ms());
        #[cfg(feature = "conformance")]
        if self.ctx.settings.conformance_echo {
            if let Message::Text(_) | Message::Binary(_) = message {
                return self.ws.send(message).await.err().map(|_| Ending::lost());
            }
        }
        match message {
            Message::Text(text) => self.on_text(text.as_str()).await,
            Message::Binary(_) => Some(Ending::close(
                1003,
                "binary frames are not accepted",
                "protocol_error",
            )),
            // tungstenite queues the close reply; the next read sends it and ends the stream.
            Message::Close(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
        }
    }

    async fn on_text(&mut self, text: &str) -> Option<Ending> {
        let inbound = match protocol::parse(text) {
            Ok(m) => m,
            Err(invalid) => {
                METRICS.message("invalid");
                METRICS.rejection("invalid_message");
                self.invalid_streak += 1;
                let sent = self
                    .send_error(
                        invalid.id.as_deref(),
                        ErrorCode::InvalidMessage,
                        invalid.message,
                    )
                    .await;
                if self.invalid_streak >= MAX_INVALID_STREAK {
                    return Some(Ending::close(
                        1008,
                        "too many invalid messages",
                        "protocol_error",
                    ));
                }
                return sent.err().map(|_| Ending::lost());
            }
        };
        self.invalid_streak = 0;
        let result = match inbound {
            Inbound::Telemetry { id, points } => {
                METRICS.telemetry_messages.inc();
                self.on_telemetry(id, points).await
            }
            Inbound::Ack { id } => {
                METRICS.message("ack");
                let receipt = Box::pin(self.ctx.commands.submit_ack(self.me.device_pk, &id)).await;
                self.await_answer(id, false, receipt).await
            }
            Inbound::CommandResult {
                id,
                status,
                result,
                error,
            } => {
                METRICS.message("command_result");
                let status = match status {
                    ResultStatus::Succeeded => Status::Succeeded,
                    ResultStatus::Failed => Status::Failed,
                    ResultStatus::Rejected => Status::Rejected,
                };
                let receipt = Box::pin(self.ctx.commands.submit_result(
                    self.me.device_pk,
                    &id,
                    status,
                    result.as_deref(),
                    error.as_deref(),
                ))
                .await;
                self.await_answer(id, true, receipt).await
            }
        };
        result.err().map(|_| Ending::lost())
    }

    /// Waits (with the telemetry acks) for a command answer's commit.
    async fn await_answer(
        &mut self,
        id: String,
        is_result: bool,
        receipt: Result<CommandReceipt, StoreError>,
    ) -> Result<(), WsError> {
        match receipt {
            Ok(done) => {
                self.pending.push(Pending::Answer {
                    id,
                    is_result,
                    done,
                });
                Ok(())
            }
            Err(e) => {
                let text = answer_reply(&id, Err(e), is_result).0;
                self.ws
                    .send(text.expect("an error always has a reply"))
                    .await
            }
        }
    }

    /// Replies to everything whose commit is done (telemetry acks, command answers) in
    /// one flush; then, if a command became final, sends what its slot lets through.
    async fn on_commits(&mut self, first: Done) -> Result<(), WsError> {
        let mut slot_freed = false;
        let mut next = Some(first);
        while let Some(done) = next {
            match done {
                Done::Telemetry(id, ok) => self.ws.feed(ack_message(&id, ok)).await?,
                Done::Answer {
                    id,
                    is_result,
                    received,
                } => {
                    let answer = Box::pin(self.ctx.commands.answered(*received)).await;
                    let (reply, freed) = answer_reply(&id, answer, is_result);
                    slot_freed |= freed;
                    if let Some(reply) = reply {
                        self.ws.feed(reply).await?;
                    }
                }
            }
            next = self.pending.next().now_or_never().flatten();
        }
        self.ws.flush().await?;
        if slot_freed {
            Box::pin(self.deliver_commands(false)).await?;
        }
        Ok(())
    }

    /// Writes out commands already marked sent for this session, then, if asked, looks
    /// for queued ones the window lets through.
    async fn on_commands_changed(&mut self) -> Result<(), WsError> {
        let (ready, recheck) = self.handle.take_commands();
        if !ready.is_empty() {
            for (_, text) in ready {
                self.ws.feed(Message::text(text)).await?;
            }
            self.ws.flush().await?;
        }
        if recheck {
            Box::pin(self.deliver_commands(false)).await?;
        }
        Ok(())
    }

    /// Writes out the commands due: on (re)connect first those sent before and never
    /// acked, then queued ones while the window has room.
    async fn deliver_commands(&mut self, reconnect: bool) -> Result<(), WsError> {
        let commands = self.ctx.commands.clone();
        let pk = self.me.device_pk;
        let mut due = Vec::new();
        // Taken before the listing: a command queued after it sets the flag again.
        let mut look = self.handle.take_backlog();
        let listed = async {
            if reconnect {
                let as_of = self.me.commands_as_of;
                if as_of.is_some_and(|count| !commands.queued_since(count)) {
                    // The device's lookup found nothing to list, and nothing was queued since.
                    look = false;
                } else {
                    let listing = commands.connect_listing(pk).await?;
                    due = listing.unacked;
                    // With nothing queued, the commit that would take from the queue is saved.
                    look &= listing.any_queued;
                }
            }
            if look {
                let taken = commands.take_for_delivery(pk).await?;
                if taken.maybe_more {
                    self.handle.keep_backlog();
                }
                due.extend(taken.rows);
            }
            Ok::<_, StoreError>(())
        };
        if let Err(e) = listed.await {
            // The commands stay queued; the next nudge, freed slot or reconnect tries again.
            self.handle.keep_backlog();
            tracing::error!(error = %e, "cannot read the device's commands");
        }
        if due.is_empty() {
            return Ok(());
        }
        for row in &due {
            self.ws.feed(command_message(row)).await?;
        }
        self.ws.flush().await
    }

    async fn on_telemetry(
        &mut self,
        id: String,
        points: Vec<protocol::Point>,
    ) -> Result<(), WsError> {
        if !self.bucket.try_take(Instant::now()) {
            METRICS.rejection("rate_limited");
            return self
                .send_error(
                    Some(&id),
                    ErrorCode::RateLimited,
                    "telemetry rate limit exceeded; the message was not stored",
                )
                .await;
        }
        let (done, wait) = oneshot::channel();
        let job = WriteJob::Telemetry(TelemetryJob {
            device_pk: self.me.device_pk,
            device_id: self.device_id.clone(),
            msg_id: id.clone(),
            points,
            received_at: now_ms(),
            done,
        });
        if self.ctx.writer.submit(job).await.is_err() {
            return self
                .send_error(
                    Some(&id),
                    ErrorCode::Internal,
                    "storage unavailable; retry later",
                )
                .await;
        }
        self.pending.push(Pending::Telemetry { id, done: wait });
        Ok(())
    }

    /// On shutdown: wait for the writer to finish what this device sent, and answer it.
    async fn drain_acks(&mut self) {
        let grace = self.ctx.settings.shutdown_grace;
        let _ = tokio::time::timeout(grace, async {
            while let Some(done) = self.pending.next().await {
                if self.on_commits(done).await.is_err() {
                    break;
                }
            }
        })
        .await;
    }

    async fn send_error(
        &mut self,
        id: Option<&str>,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), WsError> {
        let text = Outbound::Error { id, code, message }.to_json();
        self.ws.send(Message::text(text)).await
    }

    /// Reads and drops what the device still sends of a frame over the size limit (up to
    /// [`OVERSIZED_DRAIN_BYTES`], until it pauses): a device still writing it then finishes
    /// and reads the `1009` close, rather than the kernel resetting the connection over
    /// unread bytes and the close code lost with it.
    async fn drain_oversized(&mut self) {
        let mut scratch = [0u8; 8192];
        let mut left = OVERSIZED_DRAIN_BYTES;
        while left > 0 {
            let read = self.ws.get_mut().read(&mut scratch);
            match tokio::time::timeout(OVERSIZED_DRAIN_QUIET, read).await {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    }

    /// Sends a close frame and waits briefly for the device's answer.
    async fn close(&mut self, code: u16, text: &'static str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: text.into(),
        };
        if self.ws.close(Some(frame)).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// The reply to a committed command ack or result (a result's ack, or an error), and
/// whether the command became final (freeing a slot in the window).
fn answer_reply(
    id: &str,
    answer: Result<Answer, StoreError>,
    is_result: bool,
) -> (Option<Message>, bool) {
    let error = |code, message| {
        let text = Outbound::Error {
            id: Some(id),
            code,
            message,
        }
        .to_json();
        Some(Message::text(text))
    };
    match answer {
        Ok(Answer::Unknown) => {
            METRICS.rejection("unknown_command");
            (
                error(
                    ErrorCode::UnknownCommand,
                    "this device has no command with that id",
                ),
                false,
            )
        }
        Ok(_) if !is_result => (None, false),
        Ok(answer) => (
            Some(Message::text(Outbound::Ack { id }.to_json())),
            matches!(answer, Answer::Changed(_)),
        ),
        Err(e) => {
            tracing::error!(error = %e, "cannot record a command answer");
            METRICS.rejection("internal");
            (
                error(
                    ErrorCode::Internal,
                    "storage failed; the answer was not recorded, retry later",
                ),
                false,
            )
        }
    }
}

fn command_message(row: &CommandRow) -> Message {
    Message::text(crate::commands::wire_text(row))
}

fn ack_message(id: &str, ok: bool) -> Message {
    if ok {
        METRICS.acks.inc();
    } else {
        METRICS.rejection("internal");
    }
    let text = if ok {
        Outbound::Ack { id }.to_json()
    } else {
        Outbound::Error {
            id: Some(id),
            code: ErrorCode::Internal,
            message: "storage failed; the message was not stored, retry later",
        }
        .to_json()
    };
    Message::text(text)
}

/// Maps a read error to the close code of the contract.
fn ending_for(e: WsError) -> Ending {
    match e {
        WsError::Capacity(_) => Ending {
            drain: true,
            ..Ending::close(1009, "message too big", "protocol_error")
        },
        WsError::Utf8(_) => Ending::close(1007, "invalid UTF-8", "protocol_error"),
        WsError::Protocol(p) => {
            tracing::debug!(error = %p, "WebSocket protocol violation");
            Ending::close(1002, "protocol error", "protocol_error")
        }
        other => {
            tracing::debug!(error = %other, "connection lost");
            Ending::lost()
        }
    }
}
