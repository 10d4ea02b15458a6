//! Operator commands: queueing, the delivery window, device answers, timers, and waiting for an outcome.
//!
//! The database is the source of truth for every command's status; this service
//! applies the transitions, then tells the interested parties: the live event
//! log (`command.updated`), callers waiting in `wait_s`, and the device's
//! session when a slot in its window may have opened.

pub mod timers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::events::{EventKind, Events, Payload};
use crate::hub::Hub;
use crate::metrics::METRICS;
use crate::store::commands::{Answer, Cancel, CommandRow, NewCommand, Queued, Status};
use crate::store::{Store, StoreError};
use crate::time::{format_ms, now_ms};
use timers::{Deadline, Timers};

/// What an operator asks for; validated by the API.
#[derive(Debug, Clone)]
pub struct CommandRequest {
    pub name: String,
    /// JSON object text.
    pub params: String,
    pub ttl_s: i64,
    pub timeout_s: i64,
    pub idempotency_key: Option<String>,
}

/// The command service, shared by the API and every device session.
#[derive(Debug)]
pub struct Commands {
    store: Store,
    hub: Arc<Hub>,
    events: Arc<Events>,
    window: u32,
    queue_max: u32,
    timers: Timers,
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<CommandRow>>>>,
}

impl Commands {
    /// Starts the timer task and re-arms the timers of every command left open by the last run.
    pub async fn start(
        store: Store,
        hub: Arc<Hub>,
        events: Arc<Events>,
        window: u32,
        queue_max: u32,
        shutdown: CancellationToken,
    ) -> Result<Arc<Commands>, StoreError> {
        let (timers, requests) = Timers::channel(1024);
        let commands = Arc::new(Commands {
            store,
            hub,
            events,
            window,
            queue_max,
            timers,
            waiters: Mutex::new(HashMap::new()),
        });
        tokio::spawn(timers::run(requests, Arc::downgrade(&commands), shutdown));
        for row in commands.store.open_commands().await? {
            commands.arm(&row).await;
        }
        Ok(commands)
    }

    /// Commands a device may have in flight.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Queues a command for a device (or finds the one with the same idempotency key).
    pub async fn queue(
        &self,
        device_pk: i64,
        device_id: &str,
        request: CommandRequest,
    ) -> Result<Queued, StoreError> {
        let now = now_ms();
        let new = NewCommand {
            id: format!("c-{}", uuid::Uuid::now_v7().simple()),
            device_pk,
            device_id: device_id.to_owned(),
            name: request.name,
            params: request.params,
            created_at: now,
            expires_at: now.saturating_add(request.ttl_s.saturating_mul(1000)),
            timeout_s: request.timeout_s,
            idempotency_key: request.idempotency_key,
        };
        let queued = self.store.queue_command(&new, self.queue_max).await?;
        if let Queued::New(row) = &queued {
            self.arm(row).await;
            self.updated(row);
            self.nudge(device_id);
        }
        Ok(queued)
    }

    /// Waits up to `wait` for the command to be final; `None` if it is not by then.
    pub async fn wait_final(
        &self,
        id: &str,
        wait: Duration,
    ) -> Result<Option<CommandRow>, StoreError> {
        let (tx, rx) = oneshot::channel();
        // Register before reading, so a transition between the two is not missed.
        self.waiters
            .lock()
            .expect("waiters lock")
            .entry(id.to_owned())
            .or_default()
            .push(tx);
        let outcome = match self.store.get_command(id).await? {
            Some(row) if row.status.is_final() => Some(row),
            Some(_) => tokio::time::timeout(wait, rx)
                .await
                .ok()
                .and_then(Result::ok),
            None => None,
        };
        let mut waiters = self.waiters.lock().expect("waiters lock");
        if let Some(list) = waiters.get_mut(id) {
            list.retain(|w| !w.is_closed());
            if list.is_empty() {
                waiters.remove(id);
            }
        }
        Ok(outcome)
    }

    /// Cancels a command that is not final.
    pub async fn cancel(&self, id: &str) -> Result<Cancel, StoreError> {
        let outcome = self.store.cancel_command(id, now_ms()).await?;
        if let Cancel::Canceled(row) = &outcome {
            self.updated(row);
            self.nudge(&row.device_id);
        }
        Ok(outcome)
    }

    /// Commands a reconnecting device was sent but never acked: they go out again.
    pub async fn unacked(&self, device_pk: i64) -> Result<Vec<CommandRow>, StoreError> {
        let mut rows = self.store.in_flight_commands(device_pk).await?;
        rows.retain(|r| r.status == Status::Sent);
        Ok(rows)
    }

    /// Marks the next queued commands sent, within the window; the session writes them out.
    pub async fn take_for_delivery(&self, device_pk: i64) -> Result<Vec<CommandRow>, StoreError> {
        let rows = self
            .store
            .take_for_delivery(device_pk, self.window, now_ms())
            .await?;
        for row in &rows {
            self.updated(row);
        }
        Ok(rows)
    }

    /// The device acked a command (receipt).
    pub async fn delivered(&self, device_pk: i64, id: &str) -> Result<Answer, StoreError> {
        let answer = self
            .store
            .command_delivered(device_pk, id, now_ms())
            .await?;
        if let Answer::Changed(row) = &answer {
            self.arm(row).await;
            self.updated(row);
        }
        Ok(answer)
    }

    /// The device reported a command's outcome.
    pub async fn completed(
        &self,
        device_pk: i64,
        id: &str,
        status: Status,
        result: Option<&RawValue>,
        error: Option<&str>,
    ) -> Result<Answer, StoreError> {
        let answer = self
            .store
            .command_completed(
                device_pk,
                id,
                status,
                result.map(RawValue::get),
                error,
                now_ms(),
            )
            .await?;
        if let Answer::Changed(row) = &answer {
            self.updated(row);
        }
        Ok(answer)
    }

    /// A timer fired: expire or time out the command if it is still waiting for that.
    async fn deadline_passed(&self, deadline: Deadline, id: &str) {
        let now = now_ms();
        let outcome = match deadline {
            Deadline::Expire => self.store.expire_command(id, now).await,
            Deadline::TimeOut => self.store.time_out_command(id, now).await,
        };
        match outcome {
            Ok(Some(row)) => {
                self.updated(&row);
                self.nudge(&row.device_id);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, command = id, "cannot record a command deadline; retrying in 1s");
                self.timers.arm(deadline, id, now + 1000).await;
            }
        }
    }

    /// Arms the timer that applies to the command's status.
    async fn arm(&self, row: &CommandRow) {
        match row.status {
            Status::Queued | Status::Sent => {
                self.timers
                    .arm(Deadline::Expire, &row.id, row.expires_at)
                    .await
            }
            Status::Delivered => {
                if let Some(at) = row.result_deadline() {
                    self.timers.arm(Deadline::TimeOut, &row.id, at).await;
                }
            }
            _ => {}
        }
    }

    /// After every transition: count it, publish it, and wake whoever waits for the outcome.
    fn updated(&self, row: &CommandRow) {
        METRICS.command(row.status.as_str());
        self.events.publish(
            EventKind::CommandUpdated,
            Arc::from(row.device_id.as_str()),
            Payload::Json(command_json(row).to_string()),
        );
        if row.status.is_final() {
            let waiting = self.waiters.lock().expect("waiters lock").remove(&row.id);
            for waiter in waiting.into_iter().flatten() {
                let _ = waiter.send(row.clone());
            }
        }
    }

    /// Tells the device's live session (if any) that its commands changed.
    fn nudge(&self, device_id: &str) {
        if let Some(session) = self.hub.get(device_id) {
            session.notify_commands();
        }
    }
}

/// A command as the API and the event stream show it.
pub fn command_json(row: &CommandRow) -> Value {
    let time = |ms: Option<i64>| ms.map(format_ms);
    let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
    json!({
        "id": row.id,
        "device_id": row.device_id,
        "name": row.name,
        "params": parse(&row.params),
        "status": row.status.as_str(),
        "created_at": format_ms(row.created_at),
        "sent_at": time(row.sent_at),
        "delivered_at": time(row.delivered_at),
        "completed_at": time(row.completed_at),
        "expires_at": format_ms(row.expires_at),
        "timeout_s": row.timeout_s,
        "result": row.result.as_deref().map(parse),
        "error": row.error,
        "idempotency_key": row.idempotency_key,
    })
}
