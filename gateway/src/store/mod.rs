//! The database: SQLite pools, embedded migrations, and every SQL statement the gateway runs.
//!
//! Writes go through a pool holding one connection, so in-process writers queue
//! instead of failing with `SQLITE_BUSY`; reads use a separate pool of read-only
//! connections that WAL lets run beside the writer. Telemetry and presence reach
//! the write connection through the batching [`writer`] (group commit), which also
//! keeps the WAL within its limit.

mod checkpointer;
pub mod commands;
pub mod devices;
mod readers;
pub mod sessions;
pub mod telemetry;
mod wal_vfs;
pub mod writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    LockedSqliteHandle, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, Sqlite, Transaction};

use tokio::sync::Notify;

use crate::config::Synchronous;

/// A database failure; the details are logged, never sent to clients.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create the database folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the telemetry writer has stopped")]
    WriterGone,
    #[error("the batch holding this change failed to commit")]
    NotCommitted,
}

/// The default WAL size limit: 64 MiB.
pub const DEFAULT_WAL_MAX_BYTES: u64 = 64 << 20;

/// The page size SQLite creates databases with (this one never sets another);
/// `wal_autocheckpoint` counts pages of it.
const PAGE_BYTES: u64 = 4096;

/// Both pools of one SQLite database file.
#[derive(Clone, Debug)]
pub struct Store {
    write: SqlitePool,
    /// Writers other than the batching writer waiting for the write connection.
    wanted: Arc<WriteWanted>,
    read: SqlitePool,
    /// Connections for the lookups that run on the caller's thread (see [`readers`]).
    readers: Arc<readers::Readers>,
    path: PathBuf,
    wal_path: PathBuf,
    wal_max_bytes: u64,
    /// SQLite's automatic checkpoint interval, in WAL frames (half of `wal_max_bytes`).
    checkpoint_pages: i64,
    synchronous: Synchronous,
}

/// Writers waiting for the write connection, and a wake-up for the writer that holds it.
#[derive(Debug, Default)]
struct WriteWanted {
    waiting: AtomicUsize,
    notify: Notify,
}

/// A writer waiting for the write connection (see [`Store::want_write`]).
#[derive(Debug)]
struct Waiting(Arc<WriteWanted>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The write connection, held by the batching writer across its transactions so that
/// their statements stay prepared. Each transaction runs on the caller's thread, with
/// the connection locked out of its sqlx worker thread. The lock is taken at the first
/// transaction and kept until sqlx itself needs the connection (a WAL truncation, the
/// hand-back): taking it is a round trip to that thread, and giving it back wakes that
/// thread, so keeping it spares every commit two thread wake-ups.
///
/// The writer hands the connection back whenever another writer waits
/// ([`Store::write_wanted`]); [`WriteSession::release`] finalizes the prepared
/// statements first, as sqlx must close a connection without any left.
pub(crate) struct WriteSession {
    /// rusqlite's view of the same handle, with its statement cache. Declared first: it
    /// is dropped (its statements finalized) before the lock and the connection go back.
    db: Option<rusqlite::Connection>,
    /// The connection locked out of its worker thread (see [`WriteSession::lock`]).
    locked: Option<LockedSqliteHandle<'static>>,
    pooled: PoolConnection<Sqlite>,
    /// A failed transaction could not be rolled back: close rather than reuse.
    broken: bool,
    /// The store syncs every commit (`synchronous=FULL`).
    full: bool,
    /// The connection is at `synchronous=NORMAL` for [`WriteSession::transaction_unsynced`]
    /// (only ever while locked).
    unsynced: bool,
    /// With [`WriteSession::count_wal_frames`]: the WAL's frames after the last commit,
    /// which SQLite's WAL hook writes here instead of checkpointing by itself.
    wal_frames: Option<Box<AtomicI64>>,
    /// The hook is installed on the handle.
    hooked: bool,
    /// What SQLite's automatic checkpoint is set back to when the hook goes.
    checkpoint_pages: i64,
}

impl WriteSession {
    /// Locks the connection out of its sqlx worker thread, unless it already is.
    #[allow(unsafe_code)]
    async fn lock(&mut self) -> Result<&mut LockedSqliteHandle<'static>, StoreError> {
        if self.locked.is_none() {
            let locked = self.pooled.lock_handle().await?;
            // SAFETY: the guard refers to the mutex in the worker's shared state, a heap
            // allocation behind the connection's `Arc`: it stays where it is when this
            // session (and `pooled` with it) moves, for as long as the connection lives.
            // `pooled` is neither used through sqlx nor dropped while `locked` is `Some`:
            // `truncate_wal`, `release` and `drop` unlock first.
            let locked = unsafe {
                std::mem::transmute::<LockedSqliteHandle<'_>, LockedSqliteHandle<'static>>(locked)
            };
            self.locked = Some(locked);
        }
        Ok(self.locked.as_mut().expect("locked above"))
    }

    /// Gives the connection back to its worker thread, so that sqlx can use it.
    fn unlock(&mut self) {
        self.restore_sync();
        self.locked = None;
    }

    /// Back at `synchronous=FULL` after unsynced commits, so that commits through sqlx sync
    /// themselves; a connection that cannot be is closed rather than reused.
    fn restore_sync(&mut self) {
        if self.locked.is_some() && std::mem::take(&mut self.unsynced) {
            let restored = self
                .db
                .as_ref()
                .map(|db| db.execute_batch("PRAGMA synchronous=FULL"));
            self.broken |= !matches!(restored, Some(Ok(())));
        }
    }

    /// Runs `work` in one `BEGIN IMMEDIATE` transaction, directly on this thread, and
    /// commits; rolls back if `work` or the commit fails. Blocks the thread for the
    /// transaction: the batching writer has a thread of its own for this.
    pub(crate) async fn transaction<T>(
        &mut self,
        work: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        self.transaction_with(work, true).await
    }

    /// [`WriteSession::transaction`], but with `synchronous=FULL` its commit does not sync
    /// the WAL (it runs at `NORMAL`): the change is visible and survives the process, not yet
    /// the machine, until [`WriteSession::sync_wal`] (or the next commit that syncs). The
    /// caller syncs before it tells anyone the change is durable.
    pub(crate) async fn transaction_unsynced<T>(
        &mut self,
        work: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        self.transaction_with(work, false).await
    }

    #[allow(unsafe_code)]
    async fn transaction_with<T>(
        &mut self,
        work: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
        sync: bool,
    ) -> Result<T, StoreError> {
        let handle = self.lock().await?.as_raw_handle().as_ptr();
        let db = match &mut self.db {
            Some(db) => db,
            // SAFETY: rusqlite and sqlx link the same libsqlite3-sys (a `links = "sqlite3"`
            // crate exists once in a build). The handle is this session's for as long as
            // `db` lives: `pooled` is held until `release` or drop, which drop `db` first,
            // and `from_handle` leaves closing the handle to sqlx. It is used only while
            // locked out of the worker thread, here and in `release`.
            None => self
                .db
                .insert(unsafe { rusqlite::Connection::from_handle(handle) }?),
        };
        if let (Some(frames), false) = (&self.wal_frames, self.hooked) {
            let frames: *const AtomicI64 = &**frames;
            // SAFETY: the handle is locked out of its worker thread. The hook's argument is
            // the boxed counter, which stays where it is and outlives the hook: `unhook`
            // removes it (in `release` and `drop`) before the box goes.
            unsafe {
                rusqlite::ffi::sqlite3_wal_hook(
                    db.handle(),
                    Some(note_wal_frames),
                    frames.cast_mut().cast(),
                );
            }
            self.hooked = true;
        }
        // The level changes only between transactions (SQLite refuses it inside one).
        let unsynced = self.full && !sync;
        if unsynced != self.unsynced {
            db.execute_batch(match unsynced {
                true => "PRAGMA synchronous=NORMAL",
                false => "PRAGMA synchronous=FULL",
            })?;
            self.unsynced = unsynced;
        }
        let outcome = db
            .execute_batch("BEGIN IMMEDIATE")
            .and_then(|()| work(db))
            .and_then(|value| db.execute_batch("COMMIT").map(|()| value));
        // A failed COMMIT (disk full, I/O error) may already have rolled back by itself.
        if outcome.is_err() && !db.is_autocommit() {
            let _ = db.execute_batch("ROLLBACK");
            self.broken |= !db.is_autocommit();
        }
        Ok(outcome?)
    }

    /// Syncs the WAL file, as a commit at `synchronous=FULL` does: every commit before it is
    /// then durable. Called after a transaction of this session, on the same thread.
    #[allow(unsafe_code)]
    pub(crate) fn sync_wal(&mut self) -> Result<(), StoreError> {
        let failed = |rc: std::ffi::c_int| {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rc),
                Some("syncing the WAL".into()),
            ))
        };
        let wal = self.wal_file().map_err(failed)?;
        // SAFETY: see `wal_file`. Its `xSync` is the one SQLite's own commit calls (through
        // `wal_vfs`, which writes out what it gathered first).
        let rc = unsafe {
            match (*(*wal).pMethods).xSync {
                Some(sync) => sync(wal, rusqlite::ffi::SQLITE_SYNC_NORMAL),
                None => rusqlite::ffi::SQLITE_MISUSE,
            }
        };
        match rc {
            rusqlite::ffi::SQLITE_OK => Ok(()),
            rc => Err(failed(rc)),
        }
    }

    /// The WAL file's own descriptor for syncing it from another thread
    /// ([`wal_vfs::WalSync`]), after a transaction of this session; `None` if the connection
    /// does not use `wal_vfs` or the descriptor could not be opened.
    #[allow(unsafe_code)]
    pub(crate) fn wal_sync(&mut self) -> Option<Arc<wal_vfs::WalSync>> {
        let wal = self.wal_file().ok()?;
        // SAFETY: see `wal_file`.
        unsafe { wal_vfs::sync_handle(wal) }
    }

    /// SQLite's open WAL file of this session's connection, between its transactions.
    ///
    /// Safe to use on this thread until the next transaction: the handle is this session's,
    /// locked out of sqlx's worker thread, so nothing else uses the connection or its files
    /// now (SQLite calls a file's methods from one thread at a time, and so does the caller).
    /// The file is open for as long as the connection is.
    #[allow(unsafe_code)]
    fn wal_file(&self) -> Result<*mut rusqlite::ffi::sqlite3_file, std::ffi::c_int> {
        use rusqlite::ffi;
        let db = match (&self.db, &self.locked) {
            (Some(db), Some(_)) => db,
            _ => return Err(ffi::SQLITE_MISUSE),
        };
        let mut wal: *mut ffi::sqlite3_file = std::ptr::null_mut();
        // SAFETY: `db` is an open handle; the call writes the WAL's file pointer to `wal`.
        let rc = unsafe {
            ffi::sqlite3_file_control(
                db.handle(),
                c"main".as_ptr(),
                ffi::SQLITE_FCNTL_JOURNAL_POINTER,
                std::ptr::addr_of_mut!(wal).cast(),
            )
        };
        match rc {
            // SAFETY: a non-null pointer from SQLite is an open file.
            ffi::SQLITE_OK if !wal.is_null() && unsafe { !(*wal).pMethods.is_null() } => Ok(wal),
            ffi::SQLITE_OK => Err(ffi::SQLITE_MISUSE),
            rc => Err(rc),
        }
    }

    /// From the next transaction on, SQLite does not checkpoint by itself after this
    /// session's commits: it reports the WAL's length ([`WriteSession::wal_frames`]) and the
    /// caller checkpoints ([`checkpointer`]). Until the session is released.
    pub(crate) fn count_wal_frames(&mut self) {
        self.wal_frames.get_or_insert_with(Box::default);
    }

    /// The frames in the WAL after the last commit (0 before one, or without
    /// [`WriteSession::count_wal_frames`]).
    pub(crate) fn wal_frames(&self) -> i64 {
        self.wal_frames
            .as_ref()
            .map_or(0, |f| f.load(Ordering::Relaxed))
    }

    /// A passive checkpoint on this connection, after a transaction of this session and on
    /// the same thread: copies what readers allow of the WAL into the database, waiting for
    /// nobody. Returns the WAL's frames and how many of them are now copied.
    pub(crate) fn checkpoint_passive(&mut self) -> Result<(i64, i64), StoreError> {
        let db = match (&self.db, &self.locked) {
            (Some(db), Some(_)) => db,
            _ => {
                return Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_MISUSE),
                    Some("checkpoint outside a write session".into()),
                )))
            }
        };
        Ok(checkpointer::passive(db)?)
    }

    /// Removes the WAL hook and gives SQLite its automatic checkpoints back.
    #[allow(unsafe_code)]
    fn unhook(&mut self) {
        if !std::mem::take(&mut self.hooked) {
            return;
        }
        match (&self.db, &self.locked) {
            // SAFETY: `db` is this session's open handle, locked out of its worker thread.
            (Some(db), Some(_)) => unsafe {
                rusqlite::ffi::sqlite3_wal_autocheckpoint(
                    db.handle(),
                    self.checkpoint_pages.min(std::ffi::c_int::MAX.into()) as std::ffi::c_int,
                );
            },
            // Not locked (its worker thread gone, or dropped mid-truncation): the hook cannot
            // be removed from here, so its counter is leaked rather than freed under it, and
            // the connection is closed instead of going back to the pool without checkpoints.
            _ => {
                std::mem::forget(self.wal_frames.take());
                self.broken = true;
            }
        }
    }

    /// Copies the whole WAL into the database and truncates the WAL file to zero bytes,
    /// waiting (up to the busy timeout) for readers of older snapshots to finish.
    pub(crate) async fn truncate_wal(&mut self) -> Result<Checkpoint, StoreError> {
        self.unlock();
        let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&mut *self.pooled)
            .await?;
        Ok(if busy == 0 {
            Checkpoint::Truncated
        } else {
            Checkpoint::Blocked
        })
    }

    /// Hands the connection back to the pool, its prepared statements finalized (or
    /// closes it if a transaction could not be rolled back).
    pub(crate) async fn release(mut self) {
        if self.db.is_some() {
            // The statements are finalized with the connection locked (and back at `FULL`),
            // then it is unlocked; if the worker thread is gone, so is the connection.
            let _ = self.lock().await;
            self.restore_sync();
            self.unhook();
            self.db = None;
        }
        self.unlock();
        if self.broken {
            self.pooled.close_on_drop();
        }
    }
}

impl Drop for WriteSession {
    /// Dropped without [`WriteSession::release`] (a panic, say): the connection goes back
    /// to `FULL`, then `db` goes, its statements finalized while the connection is still
    /// locked or its worker thread idles (nobody else has the connection), then the lock.
    fn drop(&mut self) {
        self.restore_sync();
        self.unhook();
        self.db = None;
        self.unlock();
        if self.broken {
            self.pooled.close_on_drop();
        }
    }
}

/// SQLite's WAL hook while a [`WriteSession`] counts frames: notes the WAL's length after
/// each commit, and checkpoints nothing.
#[allow(unsafe_code)]
unsafe extern "C" fn note_wal_frames(
    frames_out: *mut std::ffi::c_void,
    _db: *mut rusqlite::ffi::sqlite3,
    _schema: *const std::ffi::c_char,
    frames: std::ffi::c_int,
) -> std::ffi::c_int {
    // SAFETY: installed with a pointer to the session's boxed counter, alive while hooked.
    unsafe { &*frames_out.cast::<AtomicI64>() }.store(frames.into(), Ordering::Relaxed);
    rusqlite::ffi::SQLITE_OK
}

/// What a `wal_checkpoint(TRUNCATE)` achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// Everything copied into the database; the WAL file is empty.
    Truncated,
    /// A reader of an older snapshot was still in the WAL when the wait ended.
    Blocked,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `url`.
    ///
    /// The WAL is checkpointed whenever it holds half of `wal_max_bytes` (beside the
    /// [`writer`], or by SQLite itself after other writers' commits); the writer forces a
    /// checkpoint if it ever grows past all of it.
    pub async fn open(
        url: &str,
        synchronous: Synchronous,
        wal_max_bytes: u64,
    ) -> Result<Store, StoreError> {
        let sync = match synchronous {
            Synchronous::Full => SqliteSynchronous::Full,
            Synchronous::Normal => SqliteSynchronous::Normal,
        };
        let base = SqliteConnectOptions::from_str(url)?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sync)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(false);
        let path = base.get_filename().to_owned();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Folder {
                path: dir.to_owned(),
                source,
            })?;
        }
        let checkpoint_pages = (wal_max_bytes / 2 / PAGE_BYTES).max(1);
        // The writer's commits go through the VFS that writes each commit's WAL frames at once.
        let write_base = if wal_vfs::register() {
            base.clone().vfs(wal_vfs::NAME)
        } else {
            base.clone()
        };
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            // An SQLite connection is a library handle, not a socket that can go stale: the
            // ping sqlx sends before handing one out would cost a round trip to its worker
            // thread on every transaction and every read, for nothing.
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(60))
            // When a COMMIT fails (disk full, I/O error) SQLite may roll the transaction back
            // by itself; sqlx's own ROLLBACK then fails and it goes on counting an open
            // transaction, so the connection could never begin another. Such a connection
            // is closed instead of reused, and the pool opens a fresh one.
            .after_release(|conn, _| {
                Box::pin(async move {
                    if conn.is_in_transaction() {
                        // A dropped transaction's ROLLBACK is queued: let it run first.
                        conn.ping().await?;
                    }
                    Ok(!conn.is_in_transaction())
                })
            })
            .connect_with(
                write_base
                    .create_if_missing(true)
                    // Index pages of recent telemetry stay cached instead of being re-read.
                    .pragma("cache_size", "-16384")
                    // Checkpoint every tens of MB of WAL (by default) rather than 4 MB: pages
                    // that many commits dirty are copied back once.
                    .pragma("wal_autocheckpoint", checkpoint_pages.to_string())
                    .pragma("journal_size_limit", wal_max_bytes.to_string()),
            )
            .await?;
        sqlx::migrate!("../migrations").run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(base.read_only(true).pragma("query_only", "true"))
            .await?;
        let mut wal_path = path.clone().into_os_string();
        wal_path.push("-wal");
        Ok(Store {
            write,
            wanted: Arc::default(),
            read,
            readers: Arc::new(readers::Readers::open(path.clone())?),
            path,
            wal_path: wal_path.into(),
            wal_max_bytes,
            checkpoint_pages: checkpoint_pages as i64,
            synchronous,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size of the WAL file now (0 when there is none).
    pub fn wal_bytes(&self) -> u64 {
        std::fs::metadata(&self.wal_path).map_or(0, |m| m.len())
    }

    /// How durable a commit is made (`--synchronous`).
    pub fn synchronous(&self) -> Synchronous {
        self.synchronous
    }

    /// SQLite's automatic checkpoint interval, in WAL frames (half of `wal_max_bytes`).
    pub(crate) fn checkpoint_pages(&self) -> i64 {
        self.checkpoint_pages
    }

    /// The size the WAL file should stay under.
    pub fn wal_max_bytes(&self) -> u64 {
        self.wal_max_bytes
    }

    /// A write transaction that takes the write lock at once (`BEGIN IMMEDIATE`). The
    /// batching writer hands the write connection over between two of its batches.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        let _waiting = self.want_write();
        Ok(self.write.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// The write connection, for the batching writer to keep between its transactions
    /// (see [`WriteSession`]); waits while another writer has it.
    pub(crate) async fn write_session(&self) -> Result<WriteSession, StoreError> {
        Ok(WriteSession {
            db: None,
            locked: None,
            pooled: self.write.acquire().await?,
            broken: false,
            full: self.synchronous == Synchronous::Full,
            unsynced: false,
            wal_frames: None,
            hooked: false,
            checkpoint_pages: self.checkpoint_pages,
        })
    }

    /// Runs `work` in one transaction of a write session of its own (see
    /// [`WriteSession::transaction`]); for the tests, which write outside the batching writer.
    #[cfg(test)]
    pub(crate) async fn write_sync<T>(
        &self,
        work: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut session = {
            let _waiting = self.want_write();
            self.write_session().await?
        };
        let outcome = session.transaction(work).await;
        session.release().await;
        outcome
    }

    /// Tells the batching writer that another writer waits for the write connection,
    /// until the returned guard is dropped (once that writer has the connection).
    fn want_write(&self) -> Waiting {
        self.wanted.waiting.fetch_add(1, Ordering::SeqCst);
        self.wanted.notify.notify_one();
        Waiting(self.wanted.clone())
    }

    /// True while another writer waits for the write connection.
    pub(crate) fn write_wanted(&self) -> bool {
        self.wanted.waiting.load(Ordering::SeqCst) > 0
    }

    /// Resolves when another writer may have started to wait for the write connection
    /// (check [`Store::write_wanted`]).
    pub(crate) async fn write_wanted_changed(&self) {
        self.wanted.notify.notified().await
    }

    /// Checks that the database answers; used by `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    /// Closes both pools, checkpointing the WAL.
    pub async fn close(&self) {
        self.readers.close();
        self.read.close().await;
        self.write.close().await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh store in a temporary folder (in a subfolder it creates), for the tests.
    pub(crate) async fn open(sync: Synchronous) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/data/g.db", dir.path().display());
        let store = Store::open(&url, sync, DEFAULT_WAL_MAX_BYTES)
            .await
            .unwrap();
        (dir, store)
    }

    /// `PRAGMA synchronous` of the write connection, as sqlx's own commits get it.
    pub(crate) async fn sqlx_synchronous(store: &Store) -> i64 {
        sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&store.write)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn wal_and_the_chosen_durability() {
        for (sync, level) in [(Synchronous::Full, 2), (Synchronous::Normal, 1)] {
            let (_dir, store) = open(sync).await;
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(&store.write)
                .await
                .unwrap();
            assert_eq!(mode, "wal");
            assert_eq!(sqlx_synchronous(&store).await, level, "{sync:?}");
            // SQLite checkpoints by itself at half the WAL limit (64 MiB by default).
            let pages: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint")
                .fetch_one(&store.write)
                .await
                .unwrap();
            assert_eq!(pages, 8192);
            assert!(store.path().ends_with("data/g.db"), "the folder is created");
        }
    }

    /// An unsynced commit runs at `NORMAL` (with `full`), the next synced one at `FULL`
    /// again, `sync_wal` succeeds after either, and sqlx gets the connection back at the
    /// store's level. With `normal`, nothing ever switches to `FULL`.
    #[tokio::test]
    async fn unsynced_commits_and_the_wal_sync() {
        let level = |db: &rusqlite::Connection| {
            db.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))
        };
        for (sync, full) in [(Synchronous::Full, 2), (Synchronous::Normal, 1)] {
            let (_dir, store) = open(sync).await;
            let mut session = store.write_session().await.unwrap();
            let insert = |db: &rusqlite::Connection| {
                db.execute(
                    "INSERT INTO devices (id, token_hash, created_at, updated_at) \
                     VALUES (hex(randomblob(8)), randomblob(8), 0, 0)",
                    [],
                )?;
                level(db)
            };
            assert_eq!(session.transaction_unsynced(insert).await.unwrap(), 1);
            session.sync_wal().expect("the WAL syncs");
            assert_eq!(session.transaction(insert).await.unwrap(), full, "{sync:?}");
            session.sync_wal().expect("the WAL syncs");
            assert_eq!(session.transaction_unsynced(insert).await.unwrap(), 1);
            session.release().await;
            let got = sqlx_synchronous(&store).await;
            assert_eq!(got, full, "{sync:?}: sqlx's commits sync as configured");
            let devices: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
                .fetch_one(&store.read)
                .await
                .unwrap();
            assert_eq!(devices, 3);
        }
    }

    #[tokio::test]
    async fn a_transaction_that_sqlite_ended_by_itself_does_not_wedge_the_write_connection() {
        let (_dir, store) = open(Synchronous::Full).await;
        {
            let mut tx = store.begin_write().await.unwrap();
            // What SQLite does when a COMMIT fails for a full disk or an I/O error: it rolls
            // the transaction back itself, behind sqlx's back.
            sqlx::query("ROLLBACK").execute(&mut *tx).await.unwrap();
        }
        for n in 0..2u8 {
            store
                .create_device(&format!("d{n}"), None, "{}", &[n], 0)
                .await
                .expect("a write after the failed transaction");
        }
        let devices: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
            .fetch_one(&store.read)
            .await
            .unwrap();
        assert_eq!(devices, 2);
    }

    #[tokio::test]
    async fn migrations_apply_once_and_reopen_cleanly() {
        let (dir, store) = open(Synchronous::Full).await;
        store.close().await;
        let url = format!("sqlite://{}/data/g.db", dir.path().display());
        let again = Store::open(&url, Synchronous::Full, DEFAULT_WAL_MAX_BYTES)
            .await
            .unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' \
             AND name IN ('devices', 'telemetry', 'sessions', 'commands')",
        )
        .fetch_one(&again.read)
        .await
        .unwrap();
        assert_eq!(tables, 4);
    }
}
