//! Direct reads of a gateway's SQLite file, for what the API cannot show (its integrity).

use std::path::Path;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

/// `PRAGMA integrity_check` of the database at `path`, one string per line (`["ok"]` when sound).
///
/// The file is opened read-only: a WAL left by a crash is read as the gateway would read it,
/// and closing does not checkpoint it, so the next gateway start sees the same files.
pub async fn integrity_check(path: &Path) -> Vec<String> {
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", path.display()));
    let lines: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("integrity_check of {}: {e}", path.display()));
    let _ = conn.close().await;
    lines
}
