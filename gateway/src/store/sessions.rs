//! Connection history and device presence columns (written by the batching writer).

use sqlx::{FromRow, SqliteConnection};

use super::{Store, StoreError};

/// A device connection opened.
#[derive(Debug, Clone)]
pub struct SessionStart {
    pub session_id: String,
    pub device_pk: i64,
    pub connected_at: i64,
    pub remote_addr: String,
    pub auth: &'static str,
}

/// A device connection closed.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    pub session_id: String,
    pub device_pk: i64,
    pub disconnected_at: i64,
    pub reason: &'static str,
    pub last_seen_at: i64,
}

/// One row of `GET /v1/devices/{id}/sessions`.
#[derive(Debug, Clone, FromRow)]
pub struct SessionRow {
    pub session_id: String,
    pub connected_at: i64,
    pub disconnected_at: Option<i64>,
    pub disconnect_reason: Option<String>,
    pub remote_addr: String,
    pub auth: String,
}

pub(super) async fn record_start(
    conn: &mut SqliteConnection,
    s: &SessionStart,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT OR IGNORE INTO sessions (session_id, device_pk, connected_at, remote_addr, auth) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .bind(&s.session_id)
    .bind(s.device_pk)
    .bind(s.connected_at)
    .bind(&s.remote_addr)
    .bind(s.auth)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE devices SET last_connected_at = ?2, last_seen_at = ?2 WHERE pk = ?1")
        .bind(s.device_pk)
        .bind(s.connected_at)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(super) async fn record_end(
    conn: &mut SqliteConnection,
    e: &SessionEnd,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE sessions SET disconnected_at = ?2, disconnect_reason = ?3 WHERE session_id = ?1",
    )
    .bind(&e.session_id)
    .bind(e.disconnected_at)
    .bind(e.reason)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE devices SET last_disconnected_at = ?2, last_disconnect_reason = ?3, \
           last_seen_at = max(coalesce(last_seen_at, 0), ?4) WHERE pk = ?1",
    )
    .bind(e.device_pk)
    .bind(e.disconnected_at)
    .bind(e.reason)
    .bind(e.last_seen_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

impl Store {
    /// A device's connections, newest first, after `before` (a `connected_at`, session id pair).
    pub async fn list_sessions(
        &self,
        device_pk: i64,
        before: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<SessionRow>, StoreError> {
        let (at, sid) = before.unwrap_or((i64::MAX, ""));
        Ok(sqlx::query_as(
            "SELECT session_id, connected_at, disconnected_at, disconnect_reason, remote_addr, auth \
             FROM sessions WHERE device_pk = ?1 \
               AND (connected_at < ?2 OR (connected_at = ?2 AND session_id < ?3)) \
             ORDER BY connected_at DESC, session_id DESC LIMIT ?4",
        )
        .bind(device_pk)
        .bind(at)
        .bind(sid)
        .bind(limit)
        .fetch_all(&self.read)
        .await?)
    }

    /// Marks sessions a crash left open as closed (`connection_lost`) at start-up.
    pub async fn close_stale_sessions(&self, now: i64) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE devices SET last_disconnected_at = ?1, last_disconnect_reason = 'connection_lost' \
             WHERE pk IN (SELECT device_pk FROM sessions WHERE disconnected_at IS NULL)",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let n = sqlx::query(
            "UPDATE sessions SET disconnected_at = ?1, disconnect_reason = 'connection_lost' \
             WHERE disconnected_at IS NULL",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n)
    }
}
