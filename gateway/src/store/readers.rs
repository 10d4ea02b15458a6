//! Read-only connections of the gateway's own, for the point lookups on a hot path (a
//! connecting device's token), run on the caller's thread.
//!
//! A read through sqlx's pool goes to the connection's worker thread and back, and when the
//! connection returns to the pool sqlx pings it, a second round trip: four thread wake-ups for
//! a lookup that SQLite answers in microseconds from its page cache. Here the lookup runs
//! where it is asked. It never waits for the writer (WAL readers read the last commit), so it
//! blocks its thread no longer than the query itself.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::StoreError;

/// How many idle connections are kept. A lookup holds one only while it runs, without
/// awaiting, so no more are ever in use at once than threads that look up.
const KEEP_IDLE: usize = 8;

/// How long a lookup waits on a lock. WAL readers meet one only in the moments SQLite
/// reserves the whole database for itself (recovering the WAL index after a crash, at the
/// first open); the caller's thread should not stall behind longer ones.
const BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// Idle read-only connections to one database file, opened as needed.
#[derive(Debug)]
pub(crate) struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// Closed with the store: connections are no longer kept, so none outlives it beside the
    /// write connection's close.
    closed: AtomicBool,
}

impl Readers {
    /// The readers of the database at `path`, with a first connection open and read from: a
    /// database it cannot read shows at start, and the gateway's open files do not grow when
    /// the first device connects.
    pub(crate) fn open(path: PathBuf) -> Result<Readers, StoreError> {
        let readers = Readers {
            path,
            idle: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        };
        let first = readers.connect()?;
        // A first read: it opens the WAL and its index as every later read would.
        first.query_row("PRAGMA schema_version", [], |_| Ok(()))?;
        readers.idle().push(first);
        Ok(readers)
    }

    /// Closes the idle connections; later reads close theirs when done.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.idle().clear();
    }

    /// Runs `work` on an idle connection (a new one if none is idle) and keeps it for the next.
    pub(crate) fn read<T>(
        &self,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let idle = self.idle().pop();
        let conn = match idle {
            Some(conn) => conn,
            None => self.connect()?,
        };
        let out = work(&conn)?;
        let mut idle = self.idle();
        if idle.len() < KEEP_IDLE && !self.closed.load(Ordering::SeqCst) {
            idle.push(conn);
        }
        Ok(out)
    }

    /// The idle connections (a panic elsewhere while holding the lock leaves them usable).
    fn idle(&self) -> MutexGuard<'_, Vec<Connection>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn connect(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_see_the_last_commit_and_connections_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let writer = Connection::open(&path).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode=WAL; CREATE TABLE t (v INTEGER); INSERT INTO t VALUES (1);",
            )
            .unwrap();
        let readers = Readers::open(path).unwrap();
        assert_eq!(
            readers.idle.lock().unwrap().len(),
            1,
            "one connection from the start"
        );
        let count =
            |db: &Connection| db.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0));
        assert_eq!(readers.read(count).unwrap(), 1);
        writer.execute("INSERT INTO t VALUES (2)", []).unwrap();
        assert_eq!(readers.read(count).unwrap(), 2);
        assert_eq!(
            readers.idle.lock().unwrap().len(),
            1,
            "one connection, kept for reuse"
        );
        // A write transaction in progress neither blocks a read nor shows in it.
        writer
            .execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (9);")
            .unwrap();
        let started = std::time::Instant::now();
        assert_eq!(readers.read(count).unwrap(), 2);
        assert!(
            started.elapsed() < BUSY_TIMEOUT,
            "the read waited for the writer"
        );
        writer.execute_batch("ROLLBACK").unwrap();
        // Read-only: a write through a reader fails and harms nothing.
        assert!(readers
            .read(|db| db.execute("INSERT INTO t VALUES (3)", []))
            .is_err());
        assert_eq!(readers.read(count).unwrap(), 2);
        readers.close();
        assert_eq!(readers.read(count).unwrap(), 2);
        assert!(readers.idle.lock().unwrap().is_empty(), "kept after close");
    }
}
