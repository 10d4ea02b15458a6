//! The batching writer (group commit): the only task that writes telemetry, presence, commands
//! and new devices.
//!
//! Sessions hand it jobs over a bounded channel. It takes every job that is
//! waiting (up to `max_rows` telemetry rows, optionally waiting `max_delay` for
//! more), writes them in one `BEGIN IMMEDIATE` transaction (one prepared insert per
//! row, on its own thread), commits, and only once the commit is synced answers each
//! telemetry job. At `synchronous=FULL` the commit itself does not sync: when more jobs
//! wait, a thread of its own (`wal-sync`) syncs the WAL while the writer writes the next
//! batch, and answers the batches it synced; otherwise the writer syncs itself. When it
//! falls behind, the channel fills and sessions stop reading their sockets.
//!
//! A failed commit (disk full, I/O error) answers every job in its batch with a
//! failure and nothing else: the next batch starts afresh, so writing resumes by
//! itself once the fault clears. The writer also keeps the WAL small: checkpoints run
//! beside it (`checkpointer.rs`); when it has been idle for a moment it checkpoints and
//! truncates the WAL (giving a burst's space back), and if readers ever keep checkpoints
//! from restarting the WAL until it outgrows its limit, it forces a checkpoint that waits
//! for them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::checkpointer::{Checkpointer, Step};
use super::commands::{CommandOp, CommandOutcome};
use super::devices::{DeviceRow, NewDevice, Taken};
use super::sessions::{record_ends, record_starts, SessionEnd, SessionStart};
use super::telemetry::{insert_rows, NewRow};
use super::wal_vfs::WalSync;
use super::{Checkpoint, Store, StoreError, WriteSession};
use crate::config::Synchronous;
use crate::device::protocol::Point;
use crate::events::{EventKind, Events, Payload};
use crate::metrics::METRICS;

/// Telemetry to commit; `done` receives `true` once it is durable, `false` if the commit failed.
#[derive(Debug)]
pub struct TelemetryJob {
    pub device_pk: i64,
    /// For the `telemetry` events published once the commit is done.
    pub device_id: Arc<str>,
    pub msg_id: String,
    pub points: Vec<Point>,
    pub received_at: i64,
    pub done: oneshot::Sender<bool>,
}

/// A unit of work for the writer.
#[derive(Debug)]
pub enum WriteJob {
    Telemetry(TelemetryJob),
    /// `done` learns when the start is recorded, so the device is welcomed only then.
    SessionStart(SessionStart, oneshot::Sender<bool>),
    /// `done` learns when the end is recorded, so the session leaves the hub only then.
    SessionEnd(SessionEnd, oneshot::Sender<bool>),
    /// A command change, and where its outcome goes.
    Command(CommandOp, Reply),
    /// A device to create; `done` gets the device once it is durable (`None` if its batch
    /// failed).
    CreateDevice(NewDevice, oneshot::Sender<Option<Result<DeviceRow, Taken>>>),
}

/// Where a command change's outcome goes.
#[derive(Debug)]
pub enum Reply {
    /// The outcome once the change is durable (`None` if its batch failed).
    Durable(oneshot::Sender<Option<CommandOutcome>>),
    /// The outcome as soon as the change is committed, before the commit's sync (with
    /// `synchronous=full`), so that a command is on its way to its device while the WAL
    /// syncs; then whether the sync made the change durable.
    Early(
        oneshot::Sender<Option<CommandOutcome>>,
        oneshot::Sender<bool>,
    ),
    /// An early reply whose outcome has gone: whether the change is durable is left to tell.
    Durability(oneshot::Sender<bool>),
}

impl WriteJob {
    fn rows(&self) -> usize {
        match self {
            WriteJob::Telemetry(t) => t.points.len(),
            _ => 1,
        }
    }

    /// A device's receipt of a command (`delivered`): nobody waits for its commit.
    fn is_receipt(&self) -> bool {
        matches!(self, WriteJob::Command(CommandOp::Delivered { .. }, _))
    }

    /// A device's connection starting, to be recorded before it is welcomed.
    fn is_start(&self) -> bool {
        matches!(self, WriteJob::SessionStart(..))
    }

    /// An operator's change (a command's or a device's), served before telemetry and
    /// sessions. Exactly these jobs have an outcome ([`WriteJob::apply`]), which [`paired`]
    /// relies on: both list every variant.
    fn is_operators(&self) -> bool {
        match self {
            WriteJob::Command(..) | WriteJob::CreateDevice(..) => true,
            WriteJob::Telemetry(_) | WriteJob::SessionStart(..) | WriteJob::SessionEnd(..) => false,
        }
    }

    /// Applies an operator's change in the writer's transaction (`None` for other jobs).
    fn apply(&self, db: &rusqlite::Connection) -> Option<rusqlite::Result<Outcome>> {
        match self {
            WriteJob::Command(op, _) => Some(op.apply(db).map(Outcome::Command)),
            WriteJob::CreateDevice(new, _) => Some(new.insert(db).map(Outcome::Created)),
            WriteJob::Telemetry(_) | WriteJob::SessionStart(..) | WriteJob::SessionEnd(..) => None,
        }
    }
}

/// What an operator's change gave back ([`WriteJob::apply`]).
#[derive(Debug)]
enum Outcome {
    Command(CommandOutcome),
    Created(Result<DeviceRow, Taken>),
}

impl Outcome {
    fn command(self) -> Option<CommandOutcome> {
        match self {
            Outcome::Command(outcome) => Some(outcome),
            Outcome::Created(_) => None,
        }
    }

    fn created(self) -> Option<Result<DeviceRow, Taken>> {
        match self {
            Outcome::Created(created) => Some(created),
            Outcome::Command(_) => None,
        }
    }
}

/// How long a batch of nothing but command receipts waits for company. A device answers a
/// command with its receipt and, often at once, its result: committed together, the result
/// (which an operator may be waiting for) does not queue behind the receipt's commit.
const RECEIPT_DELAY: Duration = Duration::from_millis(2);

/// How long a batch of nothing but session starts waits for more. Devices connect in crowds
/// (a fleet coming back after an outage, a gateway restart): one commit, and one sync, for a
/// millisecond's worth of them instead of one per two or three devices. Connecting 19,000
/// devices took about a sixth less gateway CPU. A device's welcome waits at most this long;
/// telemetry or a session end arriving meanwhile joins the batch and ends the wait, and a
/// command change (served first, but not mid-batch) waits at most this long too.
const START_DELAY: Duration = Duration::from_millis(1);

/// While commits keep failing, one error line per this interval (with the count) is enough.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Runs of failed commits: flagged for readiness, logged at their start, then sparingly,
/// and when commits succeed again.
struct Failures {
    failing: Arc<AtomicBool>,
    /// Failed batches in the current run, and when one was last logged.
    run: Option<(u64, Instant)>,
}

impl Failures {
    fn new(failing: Arc<AtomicBool>) -> Failures {
        Failures { failing, run: None }
    }

    fn failed(&mut self, error: &StoreError, rows: usize) {
        self.failing.store(true, Ordering::Relaxed);
        let now = Instant::now();
        match &mut self.run {
            Some((count, logged)) => {
                *count += 1;
                if now.duration_since(*logged) >= FAILURE_LOG_EVERY {
                    tracing::error!(%error, rows, failed_batches = *count, "batch commits still failing; nothing in them was acked");
                    *logged = now;
                }
            }
            None => {
                tracing::error!(%error, rows, "batch commit failed; nothing in it was acked");
                self.run = Some((1, now));
            }
        }
    }

    fn committed(&mut self) {
        if let Some((count, _)) = self.run.take() {
            self.failing.store(false, Ordering::Relaxed);
            tracing::info!(failed_batches = count, "commits succeed again");
        }
    }
}

/// Resolves when the writer has committed everything and stopped.
pub type WriterTask = oneshot::Receiver<()>;

/// How long the writer waits without work before it truncates the WAL.
pub const IDLE_CHECKPOINT: Duration = Duration::from_secs(1);
/// After a forced checkpoint that readers blocked, how long before the next try (each
/// try may wait up to the busy timeout, and commits wait with it).
const FORCED_CHECKPOINT_RETRY: Duration = Duration::from_secs(30);

/// How the writer batches.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    pub max_rows: usize,
    pub max_delay: Duration,
    pub queue: usize,
    /// Idle time after which the WAL is checkpointed and truncated ([`IDLE_CHECKPOINT`]).
    pub idle_checkpoint: Duration,
}

/// The sending side, cloned into every session.
///
/// Operators' changes (commands, devices created) have a queue of their own that the writer
/// serves first, in batches of their own: an operator's command then waits for the commit in
/// progress and one small commit, not for a telemetry backlog and a commit of hundreds of rows.
/// Each queue keeps its order; no job of one depends on a job of the other still queued (a
/// session awaits the commits it builds on, such as its start and the requeue before its end).
#[derive(Debug, Clone)]
pub struct Writer {
    tx: mpsc::Sender<WriteJob>,
    commands: mpsc::Sender<WriteJob>,
    /// The last batch failed to commit (disk full, I/O error): readiness reports it.
    failing: Arc<AtomicBool>,
}

impl Writer {
    /// Starts the writer task; it ends once every `Writer` clone is dropped and the queue is empty.
    ///
    /// The writer runs on a thread of its own (with its own small runtime), so its
    /// round trips to SQLite are never queued behind thousands of session tasks:
    /// a commit's latency is the database's, not the scheduler's.
    pub fn spawn(store: Store, config: WriterConfig, events: Arc<Events>) -> (Writer, WriterTask) {
        let (tx, rx) = mpsc::channel(config.queue);
        let (commands, commands_rx) = mpsc::channel(config.queue);
        let (finished, task) = oneshot::channel();
        let failing = Arc::new(AtomicBool::new(false));
        let health = Failures::new(failing.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime can always be built");
        std::thread::Builder::new()
            .name("telemetry-writer".into())
            .spawn(move || {
                let queues = Queues {
                    commands: commands_rx,
                    other: rx,
                };
                // The syncer ends once `run` has dropped its sender, after the last sync.
                let syncer = Syncer::start(events.clone());
                runtime.block_on(run(store, config, queues, &events, health, &syncer));
                syncer.finish();
                let _ = finished.send(());
            })
            .expect("spawning the writer thread");
        (
            Writer {
                tx,
                commands,
                failing,
            },
            task,
        )
    }

    /// True while commits fail (from a failed batch until the next one that commits).
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Queues a job, waiting while the queue is full (this is the backpressure).
    pub async fn submit(&self, job: WriteJob) -> Result<(), StoreError> {
        let queue = match job.is_operators() {
            true => &self.commands,
            false => &self.tx,
        };
        queue.send(job).await.map_err(|_| StoreError::WriterGone)
    }

    /// Queues a command change; the receiver gets its outcome once committed.
    pub async fn submit_command(&self, op: CommandOp) -> Result<CommandReceipt, StoreError> {
        let (done, receipt) = oneshot::channel();
        self.submit(WriteJob::Command(op, Reply::Durable(done)))
            .await?;
        Ok(receipt)
    }

    /// Applies a command change and returns its outcome once committed, before the commit
    /// is synced ([`Reply::Early`]); the receiver learns whether the sync made it durable,
    /// which the caller awaits (with [`durable`]) before it promises anything.
    pub async fn command_early(
        &self,
        op: CommandOp,
    ) -> Result<(CommandOutcome, oneshot::Receiver<bool>), StoreError> {
        let (first, outcome) = oneshot::channel();
        let (synced, durable) = oneshot::channel();
        self.submit(WriteJob::Command(op, Reply::Early(first, synced)))
            .await?;
        Ok((committed(outcome.await)?, durable))
    }

    /// Applies a command change and waits for its commit.
    pub async fn command(&self, op: CommandOp) -> Result<CommandOutcome, StoreError> {
        committed(self.submit_command(op).await?.await)
    }

    /// Creates a device; the row once it is durable, or [`Taken`] if its id exists.
    pub async fn create_device(
        &self,
        new: NewDevice,
    ) -> Result<Result<DeviceRow, Taken>, StoreError> {
        let (done, created) = oneshot::channel();
        self.submit(WriteJob::CreateDevice(new, done)).await?;
        match created.await {
            Ok(Some(created)) => Ok(created),
            Ok(None) => Err(StoreError::NotCommitted),
            Err(_) => Err(StoreError::WriterGone),
        }
    }
}

/// Whether an early reply's change became durable ([`Writer::command_early`]).
pub async fn durable(synced: oneshot::Receiver<bool>) -> Result<(), StoreError> {
    match synced.await {
        Ok(true) => Ok(()),
        Ok(false) => Err(StoreError::NotCommitted),
        Err(_) => Err(StoreError::WriterGone),
    }
}

/// Where a command change's outcome arrives (`None` if its batch failed).
pub type CommandReceipt = oneshot::Receiver<Option<CommandOutcome>>;

/// The outcome a [`CommandReceipt`] delivered, or why there is none.
pub fn committed(
    received: Result<Option<CommandOutcome>, oneshot::error::RecvError>,
) -> Result<CommandOutcome, StoreError> {
    match received {
        Ok(Some(outcome)) => Ok(outcome),
        Ok(None) => Err(StoreError::NotCommitted),
        Err(_) => Err(StoreError::WriterGone),
    }
}

/// The writer's two queues (see [`Writer`]).
struct Queues {
    commands: mpsc::Receiver<WriteJob>,
    /// Telemetry and session starts and ends.
    other: mpsc::Receiver<WriteJob>,
}

impl Queues {
    /// The next job, a command change first; `None` once every sender is gone and both
    /// queues are empty (the senders are dropped together, with the last `Writer`).
    async fn next(&mut self) -> Option<WriteJob> {
        tokio::select! {
            biased;
            Some(job) = self.commands.recv() => Some(job),
            job = self.other.recv() => job,
        }
    }

    /// Nothing is waiting in either queue.
    fn is_empty(&self) -> bool {
        self.commands.is_empty() && self.other.is_empty()
    }

    /// The queue `job` came from.
    fn of(&mut self, job: &WriteJob) -> &mut mpsc::Receiver<WriteJob> {
        match job.is_operators() {
            true => &mut self.commands,
            false => &mut self.other,
        }
    }
}

async fn run(
    store: Store,
    config: WriterConfig,
    mut queues: Queues,
    events: &Events,
    mut health: Failures,
    syncer: &Syncer,
) {
    let mut batch: Vec<WriteJob> = Vec::new();
    // At `synchronous=FULL` a batch commits without its sync: early replies get their
    // outcomes at once, and every other answer waits for the sync, which the syncer thread
    // does while this one writes the next batch.
    let full = store.synchronous() == Synchronous::Full;
    // Something was committed since the WAL was last truncated.
    let mut wal_dirty = false;
    let mut next_forced = Instant::now();
    // Checkpoints run beside the writer, not inside its commits.
    let mut background = Checkpointer::start(&store);
    let mut held = Held {
        store: &store,
        session: None,
        count_wal_frames: background.is_some(),
    };
    loop {
        let idle_checkpoint = wal_dirty.then_some(config.idle_checkpoint);
        let first = tokio::select! {
            biased;
            // Between batches, the write connection goes to whoever waits for it.
            () = store.write_wanted_changed(), if held.session.is_some() => {
                held.hand_back_if_wanted().await;
                continue;
            }
            next = next_or_idle(&mut queues, idle_checkpoint) => match next {
                Some(job) => job,
                None => {
                    wal_dirty = false;
                    checkpoint(&mut held, background.as_ref(), "idle").await;
                    continue;
                }
            },
        };
        let Some(first) = first else { break };
        let mut rows = first.rows();
        // A batch takes from its first job's queue only.
        let operators = first.is_operators();
        let mut receipts_only = first.is_receipt();
        let mut starts_only = first.is_start();
        let rx = queues.of(&first);
        batch.push(first);
        let now = Instant::now();
        let (deadline, receipts_until, starts_until) = (
            now + config.max_delay,
            now + RECEIPT_DELAY,
            now + START_DELAY,
        );
        while rows < config.max_rows {
            // Telemetry may wait for company up to the configured delay; a batch of command
            // receipts waits up to RECEIPT_DELAY for the result that tends to follow, and a
            // batch of session starts up to START_DELAY for more; other operators' changes
            // never wait.
            let wait_until = if operators {
                receipts_only.then_some(receipts_until)
            } else if starts_only {
                Some(starts_until)
            } else {
                (!config.max_delay.is_zero()).then_some(deadline)
            };
            let next = match (rx.try_recv(), wait_until) {
                (Ok(job), _) => Some(job),
                (Err(mpsc::error::TryRecvError::Empty), Some(until)) => {
                    tokio::time::timeout_at(until, rx.recv())
                        .await
                        .ok()
                        .flatten()
                }
                (Err(_), _) => None,
            };
            let Some(job) = next else { break };
            receipts_only &= job.is_receipt();
            starts_only &= job.is_start();
            rows += job.rows();
            batch.push(job);
        }
        // Under load, one batch at most waits behind the sync in progress: until that sync
        // is done, a batch of telemetry or sessions keeps gathering instead of committing.
        // Committed sooner it would be acked no sooner (the next sync starts when this one
        // ends, and covers whatever waits then), only in more, smaller commits, each of
        // which rewrites the index pages it touches. Operators' changes never wait.
        while !operators && rows < config.max_rows {
            let synced = syncer.synced.notified();
            tokio::pin!(synced);
            synced.as_mut().enable();
            if syncer.pending() < 2 {
                break;
            }
            tokio::select! {
                biased;
                () = &mut synced => {}
                job = rx.recv() => match job {
                    Some(job) => {
                        rows += job.rows();
                        batch.push(job);
                    }
                    None => break,
                },
            }
        }
        let started = Instant::now();
        let (outcomes, mut error) = match held.get().await {
            Ok(session) => match commit(session, &batch, !full).await {
                Ok(outcomes) => (outcomes, None),
                Err(e) => (Vec::new(), Some(e)),
            },
            Err(e) => (Vec::new(), Some(e)),
        };
        let mut answers = paired(std::mem::take(&mut batch), outcomes);
        // The descriptor the syncer syncs through (only after a commit that did not fail);
        // without one, the sync happens here.
        let mut wal = None;
        if full && error.is_none() {
            answers = answer_early(answers);
            error = match held.get().await {
                Ok(session) => {
                    wal = session.wal_sync();
                    match wal {
                        Some(_) => None,
                        None => session.sync_wal().err(),
                    }
                }
                Err(e) => Some(e),
            };
        }
        let ok = match &error {
            None => {
                health.committed();
                tracing::trace!(
                    rows,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "batch committed"
                );
                true
            }
            Some(e) => {
                METRICS
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                METRICS.commit_failures.inc();
                health.failed(e, rows);
                false
            }
        };
        let unsynced = Unsynced {
            answers,
            rows,
            started,
            wal,
        };
        match unsynced.wal {
            // With nothing else to write and no sync in progress, there is nothing to
            // overlap: the sync runs here, without waking the syncer.
            Some(_) if syncer.idle() && queues.is_empty() => {
                sync_and_answer(vec![unsynced], events)
            }
            Some(_) => syncer.send(unsynced),
            None => unsynced.done(ok, events),
        }
        if let (true, Some(background), Some(session)) =
            (ok, &mut background, held.session.as_mut())
        {
            if background.after_commit(session.wal_frames()) == Step::CopyTail {
                if let Err(error) = session.checkpoint_passive() {
                    tracing::warn!(%error, "WAL checkpoint of the tail failed");
                    background.tail_failed();
                }
            }
        }
        if ok {
            wal_dirty = true;
            // SQLite's passive checkpoints cannot restart a WAL that readers are still in;
            // past the limit, wait for them (new commits wait too) rather than grow on.
            let wal_bytes = store.wal_bytes();
            METRICS.wal_bytes.set(wal_bytes as i64);
            if wal_bytes > store.wal_max_bytes() && Instant::now() >= next_forced {
                if checkpoint(&mut held, background.as_ref(), "limit").await {
                    wal_dirty = false;
                } else {
                    next_forced = Instant::now() + FORCED_CHECKPOINT_RETRY;
                }
            }
        }
        if ok {
            held.hand_back_if_wanted().await;
        } else {
            // A connection a failed commit left in a transaction is closed, not reused.
            held.hand_back().await;
        }
    }
    held.hand_back().await;
    tracing::debug!("telemetry writer stopped");
}

/// A committed batch and what it waits for before its answers: the sync of its WAL
/// (`wal`), unless it is durable already or failed (`None`).
struct Unsynced {
    answers: Vec<(WriteJob, Option<Outcome>)>,
    rows: usize,
    started: Instant,
    wal: Option<Arc<WalSync>>,
}

impl Unsynced {
    /// Answers the batch: `ok` once it is durable, or with a failure.
    fn done(self, ok: bool, events: &Events) {
        if ok {
            METRICS
                .commit_seconds
                .observe(self.started.elapsed().as_secs_f64());
            METRICS.batch_rows.observe(self.rows as f64);
        }
        answer(self.answers, ok, events);
    }
}

/// The thread that syncs committed batches and only then answers them (group commit,
/// pipelined): while it syncs, the writer writes the next batch, and one sync covers every
/// batch committed before it started.
///
/// A failed sync stops the process. Its batches are answered with a failure first, and
/// nothing after them is acked: once `fsync` has failed, the kernel may have dropped the
/// unwritten pages, and a later sync that succeeds would not bring them back, so the WAL
/// on disk could miss a commit that later, acked, commits follow (and SQLite's recovery
/// stops at the first frame missing). A restart recovers everything that was synced,
/// which is everything ever acked.
struct Syncer {
    tx: std::sync::mpsc::Sender<Unsynced>,
    /// Batches sent and not answered yet.
    pending: Arc<AtomicUsize>,
    /// Signalled after each sync's batches are answered.
    synced: Arc<tokio::sync::Notify>,
    thread: std::thread::JoinHandle<()>,
}

impl Syncer {
    fn start(events: Arc<Events>) -> Syncer {
        let (tx, rx) = std::sync::mpsc::channel::<Unsynced>();
        let pending = Arc::new(AtomicUsize::new(0));
        let synced = Arc::new(tokio::sync::Notify::new());
        let (answered, signal) = (pending.clone(), synced.clone());
        let thread = std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let batches: Vec<Unsynced> =
                        std::iter::once(first).chain(rx.try_iter()).collect();
                    let count = batches.len();
                    sync_and_answer(batches, &events);
                    answered.fetch_sub(count, Ordering::SeqCst);
                    signal.notify_waiters();
                }
            })
            .expect("spawning the WAL sync thread");
        Syncer {
            tx,
            pending,
            synced,
            thread,
        }
    }

    /// Hands a committed batch over, to be answered after its sync.
    fn send(&self, batch: Unsynced) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        // The thread outlives the writer's loop (see `finish`).
        let _ = self.tx.send(batch);
    }

    /// Batches sent and not answered yet.
    fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// No batch is waiting for its sync: a sync now would not be ahead of anybody's.
    fn idle(&self) -> bool {
        self.pending() == 0
    }

    /// Waits until every batch sent is answered.
    fn finish(self) {
        drop(self.tx);
        let _ = self.thread.join();
    }
}

/// Syncs the WAL of each batch (one sync per file: each batch was written before it was
/// sent, so the sync after the last covers them all).
fn sync_all(batches: &[Unsynced]) -> Result<(), (std::io::Error, std::path::PathBuf)> {
    let mut synced: Vec<&Arc<WalSync>> = Vec::new();
    for wal in batches.iter().filter_map(|b| b.wal.as_ref()) {
        if !synced.iter().any(|s| Arc::ptr_eq(s, wal)) {
            wal.sync().map_err(|e| (e, wal.path().to_path_buf()))?;
            synced.push(wal);
        }
    }
    Ok(())
}

/// Syncs committed batches, then answers them; stops the process if the sync fails (see
/// [`Syncer`]).
fn sync_and_answer(batches: Vec<Unsynced>, events: &Events) {
    match sync_all(&batches) {
        Ok(()) => batches.into_iter().for_each(|b| b.done(true, events)),
        Err((error, wal)) => {
            METRICS.commit_failures.inc();
            batches.into_iter().for_each(|b| b.done(false, events));
            tracing::error!(%error, wal = %wal.display(),
                "syncing the WAL failed; stopping, so that nothing unsynced is ever acked \
                 (a restart recovers everything that was acked)");
            sync_failed();
        }
    }
}

/// What a failed sync does: exit (see [`Syncer`]); a test of the writer panics instead.
fn sync_failed() {
    #[cfg(not(test))]
    std::process::exit(74);
    #[cfg(test)]
    panic!("a WAL sync failed");
}

/// Each job with its outcome: operators' changes take theirs in order (none if the commit
/// failed).
fn paired(jobs: Vec<WriteJob>, outcomes: Vec<Outcome>) -> Vec<(WriteJob, Option<Outcome>)> {
    let mut outcomes = outcomes.into_iter();
    jobs.into_iter()
        .map(|job| {
            let outcome = job.is_operators().then(|| outcomes.next()).flatten();
            (job, outcome)
        })
        .collect()
}

/// Sends the early replies their outcomes, before the batch's sync; what is left for each
/// is to learn whether the sync made its change durable.
fn answer_early(answers: Vec<(WriteJob, Option<Outcome>)>) -> Vec<(WriteJob, Option<Outcome>)> {
    answers
        .into_iter()
        .map(|answer| match answer {
            (WriteJob::Command(op, Reply::Early(first, synced)), outcome) => {
                let _ = first.send(outcome.and_then(Outcome::command));
                (WriteJob::Command(op, Reply::Durability(synced)), None)
            }
            other => other,
        })
        .collect()
}

/// Answers every job of a batch: `ok` once it is durable, or with a failure. Then publishes
/// its telemetry events: live events never delay an ack.
fn answer(answers: Vec<(WriteJob, Option<Outcome>)>, ok: bool, events: &Events) {
    let mut committed = Vec::new();
    for (job, outcome) in answers {
        // A receiver may be gone (its session ended); its device will resend.
        let outcome = outcome.filter(|_| ok);
        match job {
            WriteJob::Telemetry(t) => {
                let _ = t.done.send(ok);
                if ok {
                    committed.push((t.device_id, t.msg_id, t.points, t.received_at));
                }
            }
            WriteJob::SessionEnd(_, done) | WriteJob::SessionStart(_, done) => {
                let _ = done.send(ok);
            }
            WriteJob::Command(_, Reply::Durable(done)) => {
                let _ = done.send(outcome.and_then(Outcome::command));
            }
            WriteJob::Command(_, Reply::Early(first, synced)) => {
                let _ = first.send(outcome.and_then(Outcome::command));
                let _ = synced.send(ok);
            }
            WriteJob::CreateDevice(_, done) => {
                let _ = done.send(outcome.and_then(Outcome::created));
            }
            WriteJob::Command(_, Reply::Durability(synced)) => {
                let _ = synced.send(ok);
            }
        }
    }
    events.publish_all(committed.into_iter().flat_map(telemetry_events));
}

/// The next job (`Some(None)` once the queues are closed and empty), or `None` after
/// `idle` without one.
async fn next_or_idle(queues: &mut Queues, idle: Option<Duration>) -> Option<Option<WriteJob>> {
    match idle {
        Some(idle) => tokio::time::timeout(idle, queues.next()).await.ok(),
        None => Some(queues.next().await),
    }
}

/// The write connection, kept by the writer from batch to batch (its statements stay
/// prepared) until another writer waits for it.
struct Held<'s> {
    store: &'s Store,
    session: Option<WriteSession>,
    /// Sessions leave checkpoints to the [`Checkpointer`] (see [`WriteSession::count_wal_frames`]).
    count_wal_frames: bool,
}

impl Held<'_> {
    async fn get(&mut self) -> Result<&mut WriteSession, StoreError> {
        if self.session.is_none() {
            let mut session = self.store.write_session().await?;
            if self.count_wal_frames {
                session.count_wal_frames();
            }
            self.session = Some(session);
        }
        Ok(self.session.as_mut().expect("set above"))
    }

    async fn hand_back(&mut self) {
        if let Some(session) = self.session.take() {
            session.release().await;
        }
    }

    async fn hand_back_if_wanted(&mut self) {
        if self.store.write_wanted() {
            self.hand_back().await;
        }
    }
}

/// Checkpoints and truncates the WAL, after the background pass in progress if any;
/// whether it is now empty. A failure is logged and left for the next attempt (with a full
/// disk, the database file may not be able to grow).
async fn checkpoint(
    held: &mut Held<'_>,
    background: Option<&Checkpointer>,
    why: &'static str,
) -> bool {
    if let Some(background) = background {
        background.pass_ended().await;
    }
    let store = held.store;
    let before = store.wal_bytes();
    let outcome = match held.get().await {
        Ok(session) => session.truncate_wal().await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(Checkpoint::Truncated) => {
            METRICS.wal_bytes.set(0);
            tracing::debug!(why, wal_bytes = before, "WAL checkpointed and truncated");
            true
        }
        Ok(Checkpoint::Blocked) => {
            tracing::warn!(
                why,
                wal_bytes = store.wal_bytes(),
                "WAL checkpoint incomplete: a reader kept an older snapshot open"
            );
            false
        }
        Err(e) => {
            tracing::warn!(why, error = %e, "WAL checkpoint failed");
            false
        }
    }
}

/// One `telemetry` event per committed point.
fn telemetry_events(
    (device_id, msg_id, points, received_at): (Arc<str>, String, Vec<Point>, i64),
) -> impl Iterator<Item = (EventKind, Arc<str>, Payload)> {
    let msg_id: Arc<str> = Arc::from(msg_id);
    points.into_iter().enumerate().map(move |(seq, p)| {
        (
            EventKind::Telemetry,
            device_id.clone(),
            Payload::Telemetry {
                msg_id: msg_id.clone(),
                seq: seq as u32,
                ts: p.ts.unwrap_or(received_at),
                received_at,
                data: p.data,
            },
        )
    })
}

/// The batch's telemetry as rows: one per point, `seq` its index, `ts` defaulting to receipt.
fn rows(batch: &[WriteJob]) -> Vec<NewRow<'_>> {
    batch
        .iter()
        .filter_map(|job| match job {
            WriteJob::Telemetry(t) => Some(t),
            _ => None,
        })
        .flat_map(|t| {
            t.points.iter().enumerate().map(move |(seq, p)| NewRow {
                device_pk: t.device_pk,
                msg_id: &t.msg_id,
                seq: seq as i64,
                ts: p.ts.unwrap_or(t.received_at),
                received_at: t.received_at,
                data: p.data.get(),
            })
        })
        .collect()
}

/// Writes the batch in one transaction; the outcomes of its operators' changes, in order.
///
/// The statements run on the writer's own thread ([`WriteSession::transaction`]): a batch
/// costs one round trip to SQLite's worker thread, not one per statement.
async fn commit(
    session: &mut WriteSession,
    batch: &[WriteJob],
    sync: bool,
) -> Result<Vec<Outcome>, StoreError> {
    let rows = rows(batch);
    // Sessions and operators' changes touch different rows; a session's end never shares a
    // batch with its start, which it waits for.
    let (mut starts, mut ends) = (Vec::new(), Vec::new());
    for job in batch {
        match job {
            WriteJob::SessionStart(s, _) => starts.push(s),
            WriteJob::SessionEnd(e, _) => ends.push(e),
            _ => {}
        }
    }
    let work = |db: &rusqlite::Connection| {
        insert_rows(db, &rows)?;
        let outcomes = batch
            .iter()
            .filter_map(|job| job.apply(db))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        record_starts(db, &starts)?;
        record_ends(db, &ends)?;
        Ok(outcomes)
    };
    match sync {
        true => session.transaction(work).await,
        false => session.transaction_unsynced(work).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::wal_vfs::tests::SyncGate;
    use serde_json::value::RawValue;

    fn job(
        pk: i64,
        id: &str,
        points: &[(Option<i64>, &str)],
    ) -> (WriteJob, oneshot::Receiver<bool>) {
        let (done, rx) = oneshot::channel();
        let points = points
            .iter()
            .map(|(ts, data)| Point {
                ts: *ts,
                data: RawValue::from_string(data.to_string()).unwrap(),
            })
            .collect();
        let job = WriteJob::Telemetry(TelemetryJob {
            device_pk: pk,
            device_id: Arc::from("d"),
            msg_id: id.to_string(),
            points,
            received_at: 5000,
            done,
        });
        (job, rx)
    }

    /// Every point stored for device `pk`, in time order.
    async fn stored(store: &Store, pk: i64) -> Vec<super::super::telemetry::TelemetryRow> {
        store
            .query_telemetry(&super::super::telemetry::RangeQuery {
                device_pk: pk,
                from: 0,
                to: i64::MAX,
                descending: false,
                after: None,
                limit: 10_000,
            })
            .await
            .unwrap()
    }

    /// A store in `dir` (WAL limit `wal_max_bytes`) and its writer, truncating the WAL
    /// after `idle_checkpoint` without work.
    async fn writer_on(
        dir: &std::path::Path,
        wal_max_bytes: u64,
        idle_checkpoint: Duration,
    ) -> (Store, Writer, WriterTask) {
        let url = format!("sqlite://{}/t.db", dir.display());
        let store = Store::open(&url, crate::config::Synchronous::Full, wal_max_bytes)
            .await
            .unwrap();
        let (writer, task) = spawn_writer(&store, idle_checkpoint);
        (store, writer, task)
    }

    /// A store in `dir` with the default WAL limit, and its writer, which never truncates
    /// the WAL for being idle.
    async fn writer_in(dir: &std::path::Path) -> (Store, Writer, WriterTask) {
        writer_on(
            dir,
            crate::store::DEFAULT_WAL_MAX_BYTES,
            Duration::from_secs(3600),
        )
        .await
    }

    /// A writer for `store`, in batches of up to 100 rows, truncating the WAL after
    /// `idle_checkpoint` without work.
    fn spawn_writer(store: &Store, idle_checkpoint: Duration) -> (Writer, WriterTask) {
        spawn_writer_of(store, idle_checkpoint, 100)
    }

    /// [`spawn_writer`], in batches of up to `max_rows` rows.
    fn spawn_writer_of(
        store: &Store,
        idle_checkpoint: Duration,
        max_rows: usize,
    ) -> (Writer, WriterTask) {
        Writer::spawn(
            store.clone(),
            WriterConfig {
                max_rows,
                max_delay: Duration::ZERO,
                queue: 16,
                idle_checkpoint,
            },
            Arc::new(Events::new(100, 1)),
        )
    }

    /// A command change queued after telemetry is served first; each queue keeps its order.
    #[tokio::test]
    async fn command_changes_go_before_queued_telemetry() {
        let (tx, other) = mpsc::channel(8);
        let (ctx, commands) = mpsc::channel(8);
        let mut queues = Queues { commands, other };
        for id in ["m1", "m2"] {
            tx.send(job(1, id, &[(None, "{}")]).0).await.unwrap();
        }
        let delivered = |id: &str| {
            let op = CommandOp::Delivered {
                device_pk: 1,
                id: id.into(),
                now: 1,
            };
            WriteJob::Command(op, Reply::Durable(oneshot::channel().0))
        };
        ctx.send(delivered("c1")).await.unwrap();
        ctx.send(delivered("c2")).await.unwrap();
        let mut order = Vec::new();
        drop((tx, ctx));
        while let Some(job) = queues.next().await {
            order.push(match job {
                WriteJob::Telemetry(t) => t.msg_id,
                WriteJob::Command(CommandOp::Delivered { id, .. }, _) => id,
                other => panic!("{other:?}"),
            });
        }
        assert_eq!(order, ["c1", "c2", "m1", "m2"]);
    }

    /// A session start waits for more (a crowd of devices connecting shares one commit);
    /// telemetry arriving meanwhile ends the wait by joining the batch.
    #[tokio::test]
    async fn session_starts_wait_for_company() {
        let (_dir, store) = crate::store::tests::open(Synchronous::Full).await;
        let device = store
            .create_device("d1", None, "{}", b"h", 1)
            .await
            .unwrap();
        let (writer, task) = spawn_writer(&store, Duration::from_secs(3600));
        let start = |sid: &str| {
            let (done, recorded) = oneshot::channel();
            let start = super::super::sessions::tests::start(sid, device.pk, 1);
            (WriteJob::SessionStart(start, done), recorded)
        };
        // The writer's first commit also sets its connection up: out of the way first.
        let (warm, warmed) = job(device.pk, "m0", &[(None, "{}")]);
        writer.submit(warm).await.unwrap();
        assert!(warmed.await.unwrap());
        let (a, mut a_recorded) = start("s1");
        writer.submit(a).await.unwrap();
        // Well past the time a commit of one row takes here, within START_DELAY.
        std::thread::sleep(START_DELAY * 7 / 10);
        assert!(
            a_recorded.try_recv().is_err(),
            "the first start was committed alone, without waiting for company"
        );
        let (b, b_recorded) = start("s2");
        writer.submit(b).await.unwrap();
        assert!(a_recorded.await.unwrap());
        assert!(b_recorded.await.unwrap());
        // A start followed by telemetry: the telemetry joins it and nothing waits longer.
        let (c, c_recorded) = start("s3");
        let (m, m_acked) = job(device.pk, "m1", &[(None, "{}")]);
        writer.submit(c).await.unwrap();
        writer.submit(m).await.unwrap();
        assert!(c_recorded.await.unwrap());
        assert!(m_acked.await.unwrap());
        let sessions = store.list_sessions(device.pk, None, 10).await.unwrap();
        assert_eq!(sessions.len(), 3);
        drop(writer);
        task.await.unwrap();
    }

    #[test]
    fn rows_carry_seq_and_receive_time_default() {
        let (a, _) = job(1, "m1", &[(Some(10), r#"{"t":1}"#), (None, r#"{"t":2}"#)]);
        let batch = [a];
        let r = rows(&batch);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].seq, r[0].ts, r[0].data), (0, 10, r#"{"t":1}"#));
        assert_eq!((r[1].seq, r[1].ts, r[1].received_at), (1, 5000, 5000));
    }

    #[tokio::test]
    async fn commits_then_acks_and_stores_duplicates_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer, task) = writer_on(
            dir.path(),
            crate::store::DEFAULT_WAL_MAX_BYTES,
            IDLE_CHECKPOINT,
        )
        .await;
        let mut waits = Vec::new();
        for _ in 0..3 {
            let (j, rx) = job(
                7,
                "same",
                &[(Some(1), r#"{"v":1}"#), (Some(2), r#"{"v":2}"#)],
            );
            writer.submit(j).await.unwrap();
            waits.push(rx);
        }
        for rx in waits {
            assert!(rx.await.unwrap(), "acked after commit");
        }
        let rows = stored(&store, 7).await;
        assert_eq!(rows.len(), 2, "a re-sent id is stored once");
        assert_eq!(rows[0].data, r#"{"v":1}"#);
        assert_eq!((rows[0].seq, rows[1].seq), (0, 1));
        drop(writer);
        task.await.unwrap();
    }

    /// The writer keeps the write connection between batches, and hands it over to another
    /// writer (an API change) that waits for it: while idle, and while busy, between batches.
    #[tokio::test]
    async fn the_writer_hands_the_write_connection_to_another_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer, task) = writer_in(dir.path()).await;
        let (j, rx) = job(1, "m0", &[(None, "{}")]);
        writer.submit(j).await.unwrap();
        assert!(rx.await.unwrap());
        // Idle, holding the connection.
        let wait = Duration::from_secs(10);
        let created = tokio::time::timeout(wait, store.create_device("a", None, "{}", b"ha", 1))
            .await
            .expect("the idle writer hands the connection over")
            .unwrap();
        // Busy: batches keep coming while another device is created.
        let streaming = {
            let writer = writer.clone();
            tokio::spawn(async move {
                for i in 1..=200 {
                    let (j, rx) = job(1, &format!("m{i}"), &[(None, "{}")]);
                    writer.submit(j).await.unwrap();
                    assert!(rx.await.unwrap(), "m{i} committed");
                }
            })
        };
        let other = tokio::time::timeout(wait, store.create_device("b", None, "{}", b"hb", 2))
            .await
            .expect("the busy writer hands the connection over between batches")
            .unwrap();
        streaming.await.unwrap();
        assert_ne!(created.pk, other.pk);
        let rows = stored(&store, 1).await;
        assert_eq!(rows.len(), 201, "every batch committed, before and after");
        drop(writer);
        task.await.unwrap();
    }

    /// An early reply gets the queued command (marked sent, for its device) at once, then
    /// learns that it is durable; the command is stored, and the connection that committed
    /// it at `NORMAL` is at `FULL` again for the other writers. With `normal`, the same.
    #[tokio::test]
    async fn an_early_reply_gets_its_outcome_then_its_durability() {
        for sync in [Synchronous::Full, Synchronous::Normal] {
            let (_dir, store) = crate::store::tests::open(sync).await;
            let device = store
                .create_device("d1", None, "{}", b"h", 1)
                .await
                .unwrap();
            let (writer, task) = spawn_writer(&store, Duration::from_secs(3600));
            let op = |id: &str| CommandOp::Queue {
                new: super::super::commands::NewCommand {
                    id: id.into(),
                    device_id: "d1".into(),
                    name: "reboot".into(),
                    params: "{}".into(),
                    created_at: 1,
                    expires_at: i64::MAX,
                    timeout_s: 30,
                    idempotency_key: None,
                },
                queue_max: 100,
                deliver_window: Some(4),
            };
            let (outcome, synced) = writer.command_early(op("c1")).await.unwrap();
            let CommandOutcome::Queued(super::super::commands::Queued::New(row), taken) = outcome
            else {
                panic!("{sync:?}: {outcome:?}")
            };
            assert_eq!(row.id, "c1");
            assert_eq!(taken.len(), 1, "{sync:?}: taken for its online device");
            assert_eq!(taken[0].status.as_str(), "sent");
            durable(synced).await.expect("durable");
            // An ordinary reply after it (a commit at `FULL` again), then an early one.
            let CommandOutcome::Queued(..) = writer.command(op("c2")).await.unwrap() else {
                panic!("{sync:?}: c2 not queued")
            };
            let (_, synced) = writer.command_early(op("c3")).await.unwrap();
            durable(synced).await.expect("c3 durable");
            let stored = store.get_command("c1").await.unwrap().expect("c1 stored");
            assert_eq!(stored.status.as_str(), "sent");
            assert_eq!(stored.device_pk, device.pk);
            // Another writer takes the connection over: at the store's own level.
            store
                .create_device("d2", None, "{}", b"h2", 2)
                .await
                .unwrap();
            let level = crate::store::tests::sqlx_synchronous(&store).await;
            assert_eq!(
                level,
                if sync == Synchronous::Full { 2 } else { 1 },
                "{sync:?}"
            );
            drop(writer);
            task.await.unwrap();
        }
    }

    /// Polls `done` until it holds (10 s at most).
    async fn until<F: std::future::Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// At `synchronous=FULL` a batch is acked only after its sync. With nothing else to
    /// write, the writer syncs itself; with more waiting, the sync runs beside the writer,
    /// which commits the next batch meanwhile (readers see it) and acks nothing before its
    /// sync.
    #[tokio::test]
    async fn acks_wait_for_their_sync_which_runs_beside_the_writer_under_load() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        let url = format!("sqlite://{}/t.db", dir.display());
        let store = Store::open(&url, Synchronous::Full, crate::store::DEFAULT_WAL_MAX_BYTES)
            .await
            .unwrap();
        // One message per batch.
        let (writer, task) = spawn_writer_of(&store, Duration::from_secs(3600), 1);
        let gate = SyncGate::close(&dir.join("t.db-wal"));
        let (j1, mut rx1) = job(1, "m1", &[(Some(1), "{}")]);
        writer.submit(j1).await.unwrap();
        until("m1 committed and its sync started", || async {
            stored(&store, 1).await.len() == 1 && gate.arrived() == 1
        })
        .await;
        // The writer is in m1's sync: m2 and m3 wait in the queue.
        let (j2, mut rx2) = job(1, "m2", &[(Some(2), "{}")]);
        let (j3, mut rx3) = job(1, "m3", &[(Some(3), "{}")]);
        writer.submit(j2).await.unwrap();
        writer.submit(j3).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx1.try_recv().is_err(), "m1 acked before its sync");
        assert_eq!(
            stored(&store, 1).await.len(),
            1,
            "the writer went on during its sync"
        );
        // m1's sync goes through; m2's, handed to the syncer (m3 was waiting), is held.
        gate.pass(1);
        assert!(rx1.await.unwrap(), "m1 acked after its sync");
        until("m2 and m3 committed while m2's sync is held", || async {
            stored(&store, 1).await.len() == 3 && gate.arrived() >= 2
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx2.try_recv().is_err(), "m2 acked before its sync");
        assert!(rx3.try_recv().is_err(), "m3 acked before its sync");
        gate.open(false);
        assert!(rx2.await.unwrap(), "m2 acked after its sync");
        assert!(rx3.await.unwrap(), "m3 acked after its sync");
        drop(writer);
        task.await.unwrap();
    }

    /// Devices created while a commit syncs share the next commit and its sync; an id taken
    /// among them is refused alone, and every device is answered only once durable.
    #[tokio::test]
    async fn devices_created_together_share_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer, task) = writer_in(dir.path()).await;
        let create = |id: &str| {
            let writer = writer.clone();
            let new = NewDevice {
                id: id.into(),
                name: None,
                metadata: "{}".into(),
                token_hash: format!("hash of {id}").into_bytes(),
                now: 1,
            };
            tokio::spawn(async move { writer.create_device(new).await.unwrap() })
        };
        // The writer's first commit also sets its connection up: out of the way first.
        assert!(create("d0").await.unwrap().is_ok());
        let gate = SyncGate::close(&dir.path().join("t.db-wal"));
        let first = create("a");
        until("a committed and its sync started", || async {
            gate.arrived() == 1
        })
        .await;
        let (b, taken, c) = (create("b"), create("a"), create("c"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!first.is_finished(), "a answered before its sync");
        assert!(
            store.get_device("b").await.unwrap().is_none(),
            "b committed during a's sync"
        );
        gate.open(false);
        let a = first.await.unwrap().expect("a created");
        assert_eq!(taken.await.unwrap().unwrap_err(), Taken, "a second a");
        let (b, c) = (b.await.unwrap().unwrap(), c.await.unwrap().unwrap());
        assert_eq!(
            (a.id.as_str(), b.id.as_str(), c.id.as_str()),
            ("a", "b", "c")
        );
        assert_eq!(gate.arrived(), 2, "b, the second a and c shared one commit");
        let stored = store.get_device("b").await.unwrap().expect("b stored");
        assert_eq!(
            (stored.pk, stored.enabled, stored.created_at),
            (b.pk, true, 1)
        );
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
            .fetch_one(&store.read)
            .await
            .unwrap();
        assert_eq!(count, 4, "d0, a, b and c");
        drop(writer);
        task.await.unwrap();
    }

    /// A failed sync acks nothing: neither its batch (answered with a failure, though
    /// readers saw it committed) nor any batch after it, though the next sync would succeed.
    /// (The gateway exits then; this build's writer panics instead.)
    #[tokio::test]
    async fn after_a_failed_sync_nothing_is_acked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        let (store, writer, task) = writer_on(
            &dir,
            crate::store::DEFAULT_WAL_MAX_BYTES,
            Duration::from_secs(3600),
        )
        .await;
        let gate = SyncGate::close(&dir.join("t.db-wal"));
        let (j1, rx1) = job(1, "m1", &[(Some(1), "{}")]);
        writer.submit(j1).await.unwrap();
        until("m1's sync started", || async { gate.arrived() == 1 }).await;
        gate.open(true);
        assert!(!rx1.await.unwrap(), "m1 answered with a failure");
        let (j2, rx2) = job(1, "m2", &[(Some(2), "{}")]);
        let acked = match writer.submit(j2).await {
            Ok(()) => matches!(rx2.await, Ok(true)),
            Err(_) => false,
        };
        assert!(!acked, "m2 acked after a failed sync");
        drop((writer, store));
        let _ = task.await;
    }

    #[tokio::test]
    async fn an_idle_writer_truncates_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer, task) = writer_on(
            dir.path(),
            crate::store::DEFAULT_WAL_MAX_BYTES,
            Duration::from_millis(50),
        )
        .await;
        let (j, rx) = job(7, "m", &[(Some(1), r#"{"v":1}"#)]);
        writer.submit(j).await.unwrap();
        assert!(rx.await.unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.wal_bytes() > 0 {
            assert!(
                Instant::now() < deadline,
                "WAL still {} bytes",
                store.wal_bytes()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The data went into the database file, not away.
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
            .fetch_one(&store.read)
            .await
            .unwrap();
        assert_eq!(rows, 1);
        drop(writer);
        task.await.unwrap();
    }

    /// Checkpoints run beside the writer: a stream of commits many times the WAL's limit
    /// keeps the WAL file under it, with no forced checkpoint, and every row is stored.
    #[tokio::test]
    async fn checkpoints_beside_the_writer_keep_the_wal_under_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 1024 * 1024;
        let (store, writer, task) = writer_on(dir.path(), limit, Duration::from_secs(3600)).await;
        let data = format!(r#"{{"pad":"{}"}}"#, "z".repeat(3000));
        let mut peak = 0;
        for n in 0..800 {
            let (j, rx) = job(7, &format!("m{n}"), &[(Some(n), data.as_str())]);
            writer.submit(j).await.unwrap();
            assert!(rx.await.unwrap());
            peak = peak.max(store.wal_bytes());
        }
        assert!(
            peak > limit / 2,
            "the WAL reached its interval ({peak} bytes)"
        );
        assert!(peak <= limit, "the WAL grew to {peak} bytes");
        assert_eq!(stored(&store, 7).await.len(), 800);
        drop(writer);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_wal_past_its_limit_is_truncated_once_readers_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 64 * 1024;
        // Never idle long enough: only the limit can truncate here.
        let (store, writer, task) = writer_on(dir.path(), limit, Duration::from_secs(3600)).await;
        // A reader holding an old snapshot: no checkpoint can reset the WAL meanwhile.
        let mut reader = store.read.begin().await.unwrap();
        let _: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
            .fetch_one(&mut *reader)
            .await
            .unwrap();
        let data = format!(r#"{{"pad":"{}"}}"#, "z".repeat(3000));
        let mut n = 0;
        while store.wal_bytes() <= limit {
            assert!(n < 1000, "the WAL does not grow");
            let (j, rx) = job(7, &format!("m{n}"), &[(Some(n), data.as_str())]);
            writer.submit(j).await.unwrap();
            assert!(rx.await.unwrap());
            n += 1;
        }
        // The writer now waits for the reader (up to the busy timeout) to truncate the WAL.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(store.wal_bytes() > limit, "truncated under a reader");
        reader.rollback().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.wal_bytes() > 0 {
            assert!(
                Instant::now() < deadline,
                "WAL still {} bytes after the reader left",
                store.wal_bytes()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(writer);
        task.await.unwrap();
    }
}
