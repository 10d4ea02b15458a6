//! The database: SQLite pools, embedded migrations, and every SQL statement the gateway runs.
//!
//! Writes go through a pool holding one connection, so in-process writers queue
//! instead of failing with `SQLITE_BUSY`; reads use a separate pool of read-only
//! connections that WAL lets run beside the writer. Telemetry and presence reach
//! the write connection through the batching [`writer`] (group commit).

pub mod commands;
pub mod devices;
pub mod sessions;
pub mod telemetry;
pub mod writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use crate::config::Synchronous;

/// A database failure; the details are logged, never sent to clients.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create the database folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the row already exists")]
    Conflict,
    #[error("the telemetry writer has stopped")]
    WriterGone,
}

/// True when the error is a UNIQUE constraint violation.
fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Both pools of one SQLite database file.
#[derive(Clone, Debug)]
pub struct Store {
    write: SqlitePool,
    read: SqlitePool,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `url`.
    pub async fn open(url: &str, synchronous: Synchronous) -> Result<Store, StoreError> {
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
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(
                base.clone()
                    .create_if_missing(true)
                    // Index pages of recent telemetry stay cached instead of being re-read.
                    .pragma("cache_size", "-16384")
                    // Checkpoint every ~40 MB of WAL rather than 4 MB: pages that many
                    // commits dirty are copied back once, and the WAL stays bounded.
                    .pragma("wal_autocheckpoint", "10000")
                    .pragma("journal_size_limit", "67108864"),
            )
            .await?;
        sqlx::migrate!("../migrations").run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(base.read_only(true).pragma("query_only", "true"))
            .await?;
        Ok(Store { write, read, path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A write transaction that takes the write lock at once (`BEGIN IMMEDIATE`).
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.write.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Checks that the database answers; used by `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    /// Closes both pools, checkpointing the WAL.
    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open(sync: Synchronous) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/data/g.db", dir.path().display());
        let store = Store::open(&url, sync).await.unwrap();
        (dir, store)
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
            let got: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&store.write)
                .await
                .unwrap();
            assert_eq!(got, level, "{sync:?}");
            assert!(store.path().ends_with("data/g.db"), "the folder is created");
        }
    }

    #[tokio::test]
    async fn migrations_apply_once_and_reopen_cleanly() {
        let (dir, store) = open(Synchronous::Full).await;
        store.close().await;
        let url = format!("sqlite://{}/data/g.db", dir.path().display());
        let again = Store::open(&url, Synchronous::Full).await.unwrap();
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
