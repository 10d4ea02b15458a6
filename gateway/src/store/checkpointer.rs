//! WAL checkpoints off the writer's thread.
//!
//! SQLite's automatic checkpoint runs inside the commit that fills the WAL to its interval,
//! on the committing thread: the batching writer would copy thousands of pages into the
//! database and sync it while every ack and command waits. Instead the writer's session
//! counts the WAL's frames ([`WriteSession::count_wal_frames`](super::WriteSession)), and
//! once they reach the interval this thread, on a connection of its own, copies them in
//! passes (`wal_checkpoint(PASSIVE)`), which WAL lets run beside the writer's commits.
//!
//! A WAL restarts from its beginning (instead of growing) only at a commit that finds all
//! of it copied, which a background pass rarely leaves: the writer commits meanwhile. So
//! once a pass has left no more than a tail behind, the writer copies that tail itself,
//! between two batches, and its next commit restarts the WAL as after SQLite's own
//! checkpoint. Each pass copies what was committed during the one before, so the tail is
//! short: a few commits' pages, not the interval's.
//!
//! Should commits outpace the passes, so that none leaves a short tail, the writer copies
//! what is left once the WAL holds half an interval more, as SQLite would have done.
//! Readers of an older snapshot can keep frames from being copied; a pass that copies
//! nothing new is not repeated for [`REST`], and the writer's forced checkpoint at the
//! WAL's limit (see [`writer`](super::writer)) is still there for them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use super::Store;
use crate::config::Synchronous;
use crate::metrics::METRICS;

/// After a pass that copied nothing new (readers held it back), how long before another.
const REST: Duration = Duration::from_millis(100);
/// How long a truncation waits for the background pass in progress (as long as SQLite's
/// busy timeout lets a checkpoint wait for readers).
const PASS_WAIT: Duration = Duration::from_secs(10);
/// After a failed pass or tail (say, no room for the database file to grow), how long
/// before another: each failure is logged.
const REST_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// A passive checkpoint: the WAL's frames and how many of them are now in the database.
pub(crate) fn passive(db: &Connection) -> rusqlite::Result<(i64, i64)> {
    db.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

/// What the writer does after a commit ([`Checkpointer::after_commit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Nothing,
    /// Copy the WAL's tail now ([`WriteSession::checkpoint_passive`](super::WriteSession)).
    CopyTail,
}

/// Between the checkpoint thread and the writer.
#[derive(Debug, Default)]
struct Shared {
    running: AtomicBool,
    /// The last pass: the WAL it was asked for (see [`Checkpointer::wal`]) and the frames
    /// it left copied (`None` if it failed), until the writer takes it.
    done: Mutex<Option<(u64, Option<i64>)>>,
}

/// The checkpoint thread, and the writer's side of the policy.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    /// Asks the thread for a pass over the WAL numbered so.
    passes: Option<mpsc::Sender<u64>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// WAL frames at which copying starts (SQLite's own interval).
    interval: i64,
    /// Frames left uncopied that the writer copies itself.
    tail: i64,
    /// The WAL's frames after the last commit seen, to notice a restart.
    last_frames: i64,
    /// Counts the WAL's restarts: a pass over an earlier one says nothing of this one.
    wal: u64,
    /// Frames of this WAL that the last pass left copied.
    copied: Option<i64>,
    rest_until: Option<Instant>,
}

impl Checkpointer {
    /// Opens a connection of its own to the database file and starts the thread; `None`
    /// (SQLite then checkpoints in the writer as usual) if that fails.
    pub(crate) fn start(store: &Store) -> Option<Self> {
        let db = Connection::open_with_flags(
            store.path(),
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|db| {
            // A checkpoint syncs the WAL before it copies and the database after, at
            // either level; never less than the store's own.
            db.execute_batch(match store.synchronous() {
                Synchronous::Full => "PRAGMA synchronous=FULL",
                Synchronous::Normal => "PRAGMA synchronous=NORMAL",
            })?;
            db.busy_timeout(Duration::from_secs(10))?;
            Ok(db)
        });
        let db = match db {
            Ok(db) => db,
            Err(error) => {
                tracing::warn!(%error, "no checkpoint thread; SQLite checkpoints in the writer");
                return None;
            }
        };
        let shared = Arc::new(Shared::default());
        let (passes, requests) = mpsc::channel::<u64>();
        let thread = std::thread::Builder::new()
            .name("wal-checkpoint".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    while let Ok(wal) = requests.recv() {
                        let done = match passive(&db) {
                            Ok((frames, copied)) => {
                                tracing::trace!(frames, copied, "WAL checkpoint pass");
                                Some(copied)
                            }
                            Err(error) => {
                                tracing::warn!(%error, "WAL checkpoint pass failed");
                                None
                            }
                        };
                        METRICS.wal_checkpoint_passes.inc();
                        *shared.done.lock().unwrap_or_else(|e| e.into_inner()) = Some((wal, done));
                        shared.running.store(false, Ordering::Release);
                    }
                }
            })
            .ok()?;
        Some(Checkpointer::new(
            Some(passes),
            shared,
            Some(thread),
            store.checkpoint_pages(),
        ))
    }

    fn new(
        passes: Option<mpsc::Sender<u64>>,
        shared: Arc<Shared>,
        thread: Option<JoinHandle<()>>,
        interval: i64,
    ) -> Checkpointer {
        Checkpointer {
            passes,
            shared,
            thread,
            interval: interval.max(1),
            tail: (interval / 8).max(1),
            last_frames: 0,
            wal: 0,
            copied: None,
            rest_until: None,
        }
    }

    /// After a commit that left `frames` in the WAL: starts a pass, or asks the writer to
    /// copy the tail itself, or neither.
    pub(crate) fn after_commit(&mut self, frames: i64) -> Step {
        if frames < self.last_frames {
            self.wal += 1;
            self.copied = None;
        }
        self.last_frames = frames;
        if frames < self.interval || self.shared.running.load(Ordering::Acquire) {
            return Step::Nothing;
        }
        let pass = self
            .shared
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((_, copied)) = pass.filter(|&(wal, _)| wal == self.wal) {
            // A pass that failed or copied nothing new is not repeated at once.
            match copied {
                None => self.rest(REST_AFTER_FAILURE),
                Some(_) if copied == self.copied => self.rest(REST),
                Some(_) => {}
            }
            self.copied = copied.filter(|&c| c <= frames);
        }
        if self.rest_until.is_some_and(|t| Instant::now() < t) {
            return Step::Nothing;
        }
        let short_tail = self
            .copied
            .is_some_and(|copied| frames - copied <= self.tail);
        // Passes that never leave a short tail (commits outpacing them) must not let the
        // WAL grow on: past half the interval again, the writer copies what is left.
        match short_tail || frames >= self.interval + self.interval / 2 {
            true => {
                self.copied = None;
                METRICS.wal_checkpoint_tails.inc();
                Step::CopyTail
            }
            false => {
                self.shared.running.store(true, Ordering::Release);
                if let Some(passes) = &self.passes {
                    let _ = passes.send(self.wal);
                }
                Step::Nothing
            }
        }
    }

    /// Waits for the pass in progress, if any, to end. SQLite does not wait for another
    /// connection's checkpoint (the busy handler is not called for the checkpoint lock), so
    /// a truncation started meanwhile would fail at once, and be taken for readers in its way.
    /// At most [`PASS_WAIT`]: a thread that never ends its pass must not stop the writer.
    pub(crate) async fn pass_ended(&self) {
        let deadline = Instant::now() + PASS_WAIT;
        while self.shared.running.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                tracing::warn!("WAL checkpoint pass still running; truncating beside it");
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The writer's copy of the tail failed: no pass or tail for a while.
    pub(crate) fn tail_failed(&mut self) {
        self.rest(REST_AFTER_FAILURE);
    }

    fn rest(&mut self, pause: Duration) {
        self.rest_until = Some(Instant::now() + pause);
    }
}

impl Drop for Checkpointer {
    /// Stops the thread after its pass, closing its connection before the store closes.
    fn drop(&mut self) {
        self.passes = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit leaving `frames` in the WAL: the writer's step, and the pass it started.
    fn commit(
        background: &mut Checkpointer,
        passes: &mpsc::Receiver<u64>,
        frames: i64,
    ) -> (Step, Option<u64>) {
        let step = background.after_commit(frames);
        (step, passes.try_recv().ok())
    }

    /// When passes start, when the writer copies the tail, and which passes count.
    #[test]
    fn passes_then_the_tail_after_the_commits() {
        let (passes, requests) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let mut background = Checkpointer::new(Some(passes), shared.clone(), None, 64);
        let pass_ends = |wal: u64, copied: Option<i64>| {
            *shared.done.lock().unwrap() = Some((wal, copied));
            shared.running.store(false, Ordering::Release);
        };
        let (nothing, tail) = ((Step::Nothing, None), (Step::CopyTail, None));
        let pass_over = |wal| (Step::Nothing, Some(wal));
        let mut after = |frames| commit(&mut background, &requests, frames);
        // Below the interval, nothing; at it, a pass over the first WAL; nothing more while
        // it runs.
        assert_eq!(after(40), nothing);
        assert_eq!(after(64), pass_over(0));
        assert_eq!(after(70), nothing);
        // It left more than the tail (8 frames) behind: another pass.
        pass_ends(0, Some(64));
        assert_eq!(after(76), pass_over(0));
        // That one left a tail: the writer copies it.
        pass_ends(0, Some(76));
        assert_eq!(after(80), tail);
        // The WAL restarts; a pass over the old one that ends late counts for nothing.
        assert_eq!(after(3), nothing);
        pass_ends(0, Some(70));
        assert_eq!(after(72), pass_over(1));
        // A pass that copies nothing new (readers hold the frames) is not repeated at once.
        pass_ends(1, Some(10));
        assert_eq!(after(74), pass_over(1));
        pass_ends(1, Some(10));
        assert_eq!(after(75), nothing);
        assert_eq!(after(76), nothing);
        std::thread::sleep(REST + Duration::from_millis(10));
        assert_eq!(after(77), pass_over(1));
        // Past one and a half intervals, the writer copies whatever is left.
        pass_ends(1, Some(20));
        assert_eq!(after(96), tail);
        // A failed pass rests longer.
        assert_eq!(after(5), nothing);
        assert_eq!(after(64), pass_over(2));
        pass_ends(2, None);
        assert_eq!(after(70), nothing);
        std::thread::sleep(REST + Duration::from_millis(10));
        assert_eq!(after(100), nothing);
        // So does a failed tail.
        background.rest_until = None;
        background.tail_failed();
        assert_eq!(background.after_commit(101), Step::Nothing);
        assert!(requests.try_recv().is_err());
    }

    /// The writer's session counts frames instead of checkpointing; once they reach the
    /// interval a pass copies them beside it, the writer copies the short tail, and its
    /// next commit restarts the WAL. Afterwards sqlx's connection checkpoints by itself again.
    #[tokio::test]
    async fn passes_beside_the_writer_then_its_tail_restart_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/c.db", dir.path().display());
        let store = Store::open(&url, Synchronous::Full, 2 * 64 * 4096)
            .await
            .unwrap();
        let interval = store.checkpoint_pages();
        assert_eq!(interval, 64);
        let mut background = Checkpointer::start(&store).expect("started");
        let mut session = store.write_session().await.unwrap();
        session.count_wal_frames();
        session
            .transaction(|db| db.execute_batch("CREATE TABLE filler (b BLOB)"))
            .await
            .unwrap();
        let (mut tails, mut restarts, mut last, mut peak) = (0, 0, 0, 0);
        for _ in 0..100 {
            session
                .transaction(|db| {
                    db.execute_batch(
                        "INSERT INTO filler VALUES (randomblob(3000)), (randomblob(3000))",
                    )
                })
                .await
                .unwrap();
            let frames = session.wal_frames();
            if frames < last {
                restarts += 1;
            }
            (last, peak) = (frames, peak.max(frames));
            if background.after_commit(frames) == Step::CopyTail {
                let (in_wal, copied) = session.checkpoint_passive().unwrap();
                assert_eq!(copied, in_wal, "the tail is all copied");
                tails += 1;
            }
            // Each pass ends before the next commit: the tail is then one commit.
            background.pass_ended().await;
        }
        // Passes that catch up restart the WAL too; no restart is SQLite's own (the hook
        // reports the frames instead).
        assert!(restarts >= 3, "the WAL restarted {restarts} times");
        assert!(tails <= restarts);
        let most = interval + interval / 8 + 8;
        assert!(
            peak <= most,
            "the WAL reached {peak} frames (at most {most})"
        );
        session.release().await;
        let pages: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint")
            .fetch_one(&store.write)
            .await
            .unwrap();
        assert_eq!(
            pages, interval,
            "sqlx's commits checkpoint by themselves again"
        );
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM filler")
            .fetch_one(&store.read)
            .await
            .unwrap();
        assert_eq!(rows, 200);
    }
}
