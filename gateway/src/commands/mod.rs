//! Operator commands: queueing, the delivery window, device answers, timers, and waiting for an outcome.
//!
//! The database is the source of truth for every command's status; this service
//! applies the transitions, then tells the interested parties: the live event
//! log (`command.updated`), callers waiting in `wait_s`, and the device's
//! session when a slot in its window may have opened.

pub mod timers;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::events::{EventKind, Events, Payload};
use crate::hub::Hub;
use crate::metrics::METRICS;
use crate::store::commands::{
    Answer, Cancel, CommandOp, CommandOutcome, CommandRow, ConnectListing, Delivery, NewCommand,
    Queued, Status,
};
use crate::store::writer::{committed, durable, CommandReceipt, Writer};
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
    writer: Writer,
    hub: Arc<Hub>,
    events: Arc<Events>,
    window: u32,
    queue_max: u32,
    timers: Timers,
    shutdown: CancellationToken,
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<CommandRow>>>>,
    /// Commands queued since start-up, counted after each one's commit and before its
    /// nudge: a connecting device that read it before learning it had no commands waiting
    /// may skip its listing only while it is unchanged (see [`Commands::queued_since`]).
    queued: AtomicU64,
}

impl Commands {
    /// True while the database cannot be written (the last batch failed to commit).
    pub fn storage_failing(&self) -> bool {
        self.writer.failing()
    }

    /// Starts the timer task and re-arms the timers of every command left open by the last run.
    pub async fn start(
        store: Store,
        writer: Writer,
        hub: Arc<Hub>,
        events: Arc<Events>,
        window: u32,
        queue_max: u32,
        shutdown: CancellationToken,
    ) -> Result<Arc<Commands>, StoreError> {
        let (timers, requests) = Timers::channel(1024);
        let commands = Arc::new(Commands {
            store,
            writer,
            hub,
            events,
            window,
            queue_max,
            timers,
            shutdown,
            waiters: Mutex::new(HashMap::new()),
            queued: AtomicU64::new(0),
        });
        tokio::spawn(timers::run(
            requests,
            Arc::downgrade(&commands),
            commands.shutdown.clone(),
        ));
        for row in commands.store.open_commands().await? {
            commands.arm(&row).await;
        }
        Ok(commands)
    }

    /// Commands a device may have in flight.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Queues a command for a device (or finds the one with the same idempotency key) and
    /// waits up to `wait` (none if zero) for it to be final: true in the second place when
    /// the wait ran out first, with the status so far.
    ///
    /// A new command's waiter is registered under its id before the command is committed:
    /// every transition after the commit reaches it, so none needs reading back.
    pub async fn queue_and_wait(
        &self,
        device_id: &str,
        request: CommandRequest,
        wait: Duration,
    ) -> Result<(Queued, bool), StoreError> {
        let id = new_id();
        let mut waiter = (!wait.is_zero()).then(|| self.register(&id));
        let queued = self.queue_as(id, device_id, request).await?;
        let (fresh, row) = match queued {
            Queued::New(row) => (true, row),
            Queued::Existing(row) => (false, row),
            Queued::QueueFull | Queued::NoDevice => return Ok((queued, false)),
        };
        let (row, waited_out) = if wait.is_zero() || row.status.is_final() {
            (row, false)
        } else {
            let done = match (fresh, &mut waiter) {
                (true, Some(waiter)) => self.wait_on(waiter, wait).await,
                // Found by its key: registered only now, so its status is read after.
                _ => self.wait_final(&row.id, wait).await?,
            };
            match done {
                Some(done) => (done, false),
                None => {
                    // Its status so far (it may have been sent or delivered meanwhile).
                    let now = self.store.get_command(&row.id).await?.unwrap_or(row);
                    let out = !now.status.is_final();
                    (now, out)
                }
            }
        };
        let queued = match fresh {
            true => Queued::New(row),
            false => Queued::Existing(row),
        };
        Ok((queued, waited_out))
    }

    async fn queue_as(
        &self,
        id: String,
        device_id: &str,
        request: CommandRequest,
    ) -> Result<Queued, StoreError> {
        let now = now_ms();
        let new = NewCommand {
            id,
            device_id: device_id.to_owned(),
            name: request.name,
            params: request.params,
            created_at: now,
            expires_at: now.saturating_add(request.ttl_s.saturating_mul(1000)),
            timeout_s: request.timeout_s,
            idempotency_key: request.idempotency_key,
        };
        // For an online device, the same commit marks it sent when its window has room,
        // and the session gets it without another round trip to the database.
        let session = self.hub.get(device_id).filter(|s| s.accepts_commands());
        let op = CommandOp::Queue {
            new,
            queue_max: self.queue_max,
            deliver_window: session.as_ref().map(|_| self.window),
        };
        // For an online device, the command is on its way while its commit syncs: the
        // answer below still waits for the sync (see `Writer::command_early`).
        let (outcome, synced) = match &session {
            Some(_) => {
                let (outcome, synced) = self.writer.command_early(op).await?;
                (outcome, Some(synced))
            }
            None => (self.writer.command(op).await?, None),
        };
        let CommandOutcome::Queued(queued, taken) = outcome else {
            unreachable!("a queue op answers Queued")
        };
        if let Queued::New(row) = &queued {
            self.queued.fetch_add(1, Ordering::SeqCst);
            self.arm(row).await;
            self.updated(row);
            for sent in &taken {
                self.updated(sent);
            }
            match (&session, taken.is_empty()) {
                (Some(s), false) => {
                    let messages = taken.iter().map(|r| (r.id.clone(), wire_text(r))).collect();
                    if let Err(unsent) = s.push_commands(messages) {
                        // The session ended meanwhile: back to the queue for the next one.
                        self.requeue(unsent.into_iter().map(|(id, _)| id).collect())
                            .await?;
                    }
                }
                _ => self.nudge(device_id),
            }
        }
        if let Some(synced) = synced {
            durable(synced).await?;
        }
        Ok(queued)
    }

    /// Waits up to `wait` for the command to be final; `None` if it is not by then.
    async fn wait_final(&self, id: &str, wait: Duration) -> Result<Option<CommandRow>, StoreError> {
        // Register before reading, so a transition between the two is not missed.
        let mut waiter = self.register(id);
        match self.store.get_command(id).await? {
            Some(row) if row.status.is_final() => Ok(Some(row)),
            Some(_) => Ok(self.wait_on(&mut waiter, wait).await),
            None => Ok(None),
        }
    }

    /// Registers a waiter for command `id`'s final status (the command need not exist yet).
    fn register(&self, id: &str) -> Waiter<'_> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters lock")
            .entry(id.to_owned())
            .or_default()
            .push(tx);
        Waiter {
            commands: self,
            id: id.to_owned(),
            rx: Some(rx),
        }
    }

    /// The final status `waiter` receives within `wait`; `None` if none does by then, or at
    /// shutdown (which answers with the status so far rather than hold the API open).
    async fn wait_on(&self, waiter: &mut Waiter<'_>, wait: Duration) -> Option<CommandRow> {
        let rx = waiter.rx.as_mut()?;
        tokio::select! {
            _ = self.shutdown.cancelled() => None,
            done = tokio::time::timeout(wait, rx) => done.ok().and_then(Result::ok),
        }
    }

    /// Cancels a command that is not final.
    pub async fn cancel(&self, id: &str) -> Result<Cancel, StoreError> {
        let op = CommandOp::Cancel {
            id: id.to_owned(),
            now: now_ms(),
        };
        let CommandOutcome::Cancel(outcome) = self.writer.command(op).await? else {
            unreachable!("a cancel op answers Cancel")
        };
        if let Cancel::Canceled(row) = &outcome {
            self.updated(row);
            self.nudge(&row.device_id);
        }
        Ok(outcome)
    }

    /// The count of queued commands, for [`Commands::queued_since`].
    pub fn queued_count(&self) -> u64 {
        self.queued.load(Ordering::SeqCst)
    }

    /// Whether any command was queued since `count` was read.
    ///
    /// A device whose lookup found no command waiting, read after `count`, needs no connect
    /// listing unless this says so: no command turns queued or sent again once it is past
    /// those, so only a new one could have been missed, and a new one queued after this
    /// answer finds the session in the hub and nudges it.
    pub fn queued_since(&self, count: u64) -> bool {
        self.queued.load(Ordering::SeqCst) != count
    }

    /// Commands a connecting device was sent but never acked (they go out again), and
    /// whether any wait in its queue.
    pub async fn connect_listing(&self, device_pk: i64) -> Result<ConnectListing, StoreError> {
        self.store.connect_listing(device_pk).await
    }

    /// Marks the next queued commands sent, within the window; the session writes them out.
    pub async fn take_for_delivery(&self, device_pk: i64) -> Result<Delivery, StoreError> {
        let op = CommandOp::TakeForDelivery {
            device_pk,
            window: self.window,
            now: now_ms(),
        };
        let CommandOutcome::Delivery(delivery) = self.writer.command(op).await? else {
            unreachable!("a delivery op answers Delivery")
        };
        for row in &delivery.rows {
            self.updated(row);
        }
        Ok(delivery)
    }

    /// Puts commands marked sent but never written out back in the queue.
    pub async fn requeue(&self, ids: Vec<String>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let CommandOutcome::Taken(rows) = self.writer.command(CommandOp::Requeue { ids }).await?
        else {
            unreachable!("a requeue op answers Taken")
        };
        for row in &rows {
            self.updated(row);
        }
        if let Some(row) = rows.first() {
            self.nudge(&row.device_id);
        }
        Ok(())
    }

    /// Hands the device's ack (receipt) of a command to the writer; see [`answered`](Self::answered).
    pub async fn submit_ack(&self, device_pk: i64, id: &str) -> Result<CommandReceipt, StoreError> {
        let op = CommandOp::Delivered {
            device_pk,
            id: id.to_owned(),
            now: now_ms(),
        };
        self.writer.submit_command(op).await
    }

    /// Hands the device's result for a command to the writer; see [`answered`](Self::answered).
    pub async fn submit_result(
        &self,
        device_pk: i64,
        id: &str,
        status: Status,
        result: Option<&RawValue>,
        error: Option<&str>,
    ) -> Result<CommandReceipt, StoreError> {
        let op = CommandOp::Completed {
            device_pk,
            id: id.to_owned(),
            status,
            result: result.map(|r| r.get().to_owned()),
            error: error.map(str::to_owned),
            now: now_ms(),
        };
        self.writer.submit_command(op).await
    }

    /// Once a device's ack or result is committed: arm the result timeout, publish the change.
    pub async fn answered(
        &self,
        received: Result<Option<CommandOutcome>, oneshot::error::RecvError>,
    ) -> Result<Answer, StoreError> {
        let CommandOutcome::Answer(answer) = committed(received)? else {
            unreachable!("an ack or result op answers Answer")
        };
        if let Answer::Changed(row) = &answer {
            self.arm(row).await;
            self.updated(row);
        }
        Ok(answer)
    }

    /// A timer fired: expire or time out the command if it is still waiting for that.
    async fn deadline_passed(&self, deadline: Deadline, id: &str) {
        let now = now_ms();
        let id_owned = id.to_owned();
        let op = match deadline {
            Deadline::Expire => CommandOp::Expire { id: id_owned, now },
            Deadline::TimeOut => CommandOp::TimeOut { id: id_owned, now },
        };
        match self.writer.command(op).await {
            Ok(CommandOutcome::Finished(Some(row))) => {
                self.updated(&row);
                self.nudge(&row.device_id);
            }
            Ok(_) => {}
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

/// A new command's id: time-ordered, so ids sort by creation.
fn new_id() -> String {
    format!("c-{}", uuid::Uuid::now_v7().simple())
}

/// A registration for one command's final status; it leaves the waiters when dropped,
/// whether or not it was answered.
struct Waiter<'a> {
    commands: &'a Commands,
    id: String,
    rx: Option<oneshot::Receiver<CommandRow>>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        // Closed first, so that the clean-up below sees this waiter gone.
        drop(self.rx.take());
        let mut waiters = self.commands.waiters.lock().expect("waiters lock");
        if let Some(list) = waiters.get_mut(&self.id) {
            list.retain(|w| !w.is_closed());
            if list.is_empty() {
                waiters.remove(&self.id);
            }
        }
    }
}

/// The `command` message a device receives.
pub fn wire_text(row: &CommandRow) -> String {
    let empty = RawValue::from_string("{}".into()).expect("valid JSON");
    let params = serde_json::from_str::<&RawValue>(&row.params).unwrap_or(&empty);
    crate::device::protocol::Outbound::Command {
        id: &row.id,
        name: &row.name,
        params,
        expires_at: format_ms(row.expires_at),
    }
    .to_json()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::commands::Cancel;

    fn request(key: &str) -> CommandRequest {
        CommandRequest {
            name: "ping".into(),
            params: "{}".into(),
            ttl_s: 60,
            timeout_s: 30,
            idempotency_key: Some(key.into()),
        }
    }

    /// What lets a connecting device skip its command listing: its lookup says whether it has
    /// commands waiting, and the count says whether one was queued after that lookup.
    #[tokio::test]
    async fn a_device_lookup_and_the_queued_count_tell_when_a_listing_can_be_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (state, _writer) = crate::api::test_state(dir.path()).await;
        let (store, commands) = (&state.store, &state.commands);
        let device = store
            .create_device("d1", None, "{}", b"hash-of-d1", 1)
            .await
            .unwrap();
        let waiting = || async {
            let owner = store.device_by_token(b"hash-of-d1").unwrap().unwrap();
            owner.commands_waiting
        };
        assert!(!waiting().await, "a new device has no commands waiting");

        let before = commands.queued_count();
        assert!(!commands.queued_since(before));
        let queue = |key| commands.queue_and_wait("d1", request(key), Duration::ZERO);
        let Queued::New(row) = queue("k1").await.unwrap().0 else {
            panic!("a new command");
        };
        assert!(commands.queued_since(before), "queuing counts");
        assert!(waiting().await, "a queued command is waiting");

        // The same idempotency key queues nothing new.
        let after = commands.queued_count();
        let again = queue("k1").await.unwrap().0;
        assert!(matches!(again, Queued::Existing(_)));
        assert!(!commands.queued_since(after));

        // Sent and never acknowledged, it is waiting too (it is sent again on connect).
        let taken = commands.take_for_delivery(device.pk).await.unwrap();
        assert_eq!(taken.rows.len(), 1);
        assert!(waiting().await, "a sent, unacknowledged command is waiting");

        // Once final, nothing is left to list.
        assert!(matches!(
            commands.cancel(&row.id).await.unwrap(),
            Cancel::Canceled(_)
        ));
        assert!(!waiting().await, "a final command is not waiting");
    }

    /// The ids of the commands someone waits for.
    fn waited_for(commands: &Commands) -> Vec<String> {
        commands.waiters.lock().unwrap().keys().cloned().collect()
    }

    /// `queue_and_wait` for device `d1` with key `key`, for up to 10 s, in a task.
    fn spawn_waiting(
        commands: &Arc<Commands>,
        key: &'static str,
    ) -> tokio::task::JoinHandle<Result<(Queued, bool), StoreError>> {
        let commands = commands.clone();
        tokio::spawn(async move {
            let wait = Duration::from_secs(10);
            commands.queue_and_wait("d1", request(key), wait).await
        })
    }

    /// `wait_s` on a new command: its waiter is there before the command is, gets its end,
    /// and leaves no trace; a wait that runs out answers the status so far, and so does a
    /// wait on the command an idempotency key finds.
    #[tokio::test]
    async fn waiting_for_a_command_catches_its_end_and_leaves_no_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let (state, _writer) = crate::api::test_state(dir.path()).await;
        let (store, commands) = (state.store.clone(), state.commands.clone());
        store
            .create_device("d1", None, "{}", b"hash-of-d1", 1)
            .await
            .unwrap();
        let waiting = spawn_waiting(&commands, "k1");
        // Registered under the new id, which the command then gets.
        let id = loop {
            if let [id] = waited_for(&commands).as_slice() {
                break id.clone();
            }
            tokio::task::yield_now().await;
        };
        while store.get_command(&id).await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(matches!(
            commands.cancel(&id).await.unwrap(),
            Cancel::Canceled(_)
        ));
        let (queued, waited_out) = waiting.await.unwrap().unwrap();
        let Queued::New(row) = queued else {
            panic!("a new command")
        };
        assert_eq!(
            (row.id.as_str(), row.status),
            (id.as_str(), Status::Canceled)
        );
        assert!(!waited_out);
        assert!(waited_for(&commands).is_empty());

        // Nobody answers: the wait runs out, with the status so far.
        let short = Duration::from_millis(50);
        let (queued, waited_out) = commands
            .queue_and_wait("d1", request("k2"), short)
            .await
            .unwrap();
        let Queued::New(pending) = queued else {
            panic!("a new command")
        };
        assert_eq!(pending.status, Status::Queued);
        assert!(waited_out);
        assert!(waited_for(&commands).is_empty());

        // The same key finds that command, and waits for it under its own id.
        let again = spawn_waiting(&commands, "k2");
        while !waited_for(&commands).contains(&pending.id) {
            tokio::task::yield_now().await;
        }
        commands.cancel(&pending.id).await.unwrap();
        let (queued, waited_out) = again.await.unwrap().unwrap();
        let Queued::Existing(row) = queued else {
            panic!("the command its key found")
        };
        assert_eq!((row.id, row.status), (pending.id, Status::Canceled));
        assert!(!waited_out);
        assert!(waited_for(&commands).is_empty());
    }
}
