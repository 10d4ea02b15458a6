//! Connection history and device presence columns (written by the batching writer).

use sqlx::{FromRow, SqliteConnection};

use super::{values, Store, StoreError};

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

/// Most rows in one statement: within SQLite's limit of 32766 parameters.
const MAX_ROWS_PER_STATEMENT: usize = 5000;

/// Records a batch's session starts: one statement for the sessions and one for the
/// devices' presence columns per 5000 starts, not two per start.
pub(super) async fn record_starts(
    conn: &mut SqliteConnection,
    starts: &[&SessionStart],
) -> Result<(), sqlx::Error> {
    for chunk in starts.chunks(MAX_ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT OR IGNORE INTO sessions (session_id, device_pk, connected_at, remote_addr, auth) \
             VALUES {}",
            values(chunk.len(), 5)
        );
        let mut q = sqlx::query(&sql).persistent(false);
        for s in chunk {
            q = q
                .bind(&s.session_id)
                .bind(s.device_pk)
                .bind(s.connected_at)
                .bind(&s.remote_addr)
                .bind(s.auth);
        }
        q.execute(&mut *conn).await?;
        // A device that connected twice in the batch keeps its latest start.
        let sql = format!(
            "UPDATE devices SET last_connected_at = v.at, last_seen_at = v.at \
             FROM (SELECT column1 AS pk, max(column2) AS at FROM (VALUES {}) GROUP BY column1) AS v \
             WHERE devices.pk = v.pk",
            values(chunk.len(), 2)
        );
        let mut q = sqlx::query(&sql).persistent(false);
        for s in chunk {
            q = q.bind(s.device_pk).bind(s.connected_at);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Records a batch's session ends: one statement for the sessions and one for the
/// devices' presence columns per 5000 ends.
pub(super) async fn record_ends(
    conn: &mut SqliteConnection,
    ends: &[&SessionEnd],
) -> Result<(), sqlx::Error> {
    for chunk in ends.chunks(MAX_ROWS_PER_STATEMENT) {
        let sql = format!(
            "UPDATE sessions SET disconnected_at = v.column2, disconnect_reason = v.column3 \
             FROM (VALUES {}) AS v WHERE sessions.session_id = v.column1",
            values(chunk.len(), 3)
        );
        let mut q = sqlx::query(&sql).persistent(false);
        for e in chunk {
            q = q.bind(&e.session_id).bind(e.disconnected_at).bind(e.reason);
        }
        q.execute(&mut *conn).await?;
        let devices = latest_per_device(chunk);
        let sql = format!(
            "UPDATE devices SET last_disconnected_at = v.column2, last_disconnect_reason = v.column3, \
               last_seen_at = max(coalesce(last_seen_at, 0), v.column4) \
             FROM (VALUES {}) AS v WHERE devices.pk = v.column1",
            values(devices.len(), 4)
        );
        let mut q = sqlx::query(&sql).persistent(false);
        for (e, last_seen_at) in devices {
            q = q
                .bind(e.device_pk)
                .bind(e.disconnected_at)
                .bind(e.reason)
                .bind(last_seen_at);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// One end per device: its latest (the later in the batch on a tie), with the latest time
/// it was seen in any of its ends.
fn latest_per_device<'a>(ends: &[&'a SessionEnd]) -> Vec<(&'a SessionEnd, i64)> {
    let mut by_device: std::collections::HashMap<i64, (&SessionEnd, i64)> = Default::default();
    for &e in ends {
        let kept = by_device.entry(e.device_pk).or_insert((e, e.last_seen_at));
        if e.disconnected_at >= kept.0.disconnected_at {
            kept.0 = e;
        }
        kept.1 = kept.1.max(e.last_seen_at);
    }
    by_device.into_values().collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;

    fn start(sid: &str, pk: i64, at: i64) -> SessionStart {
        SessionStart {
            session_id: sid.into(),
            device_pk: pk,
            connected_at: at,
            remote_addr: "127.0.0.1:1".into(),
            auth: "token",
        }
    }

    fn end(sid: &str, pk: i64, at: i64, reason: &'static str, seen: i64) -> SessionEnd {
        SessionEnd {
            session_id: sid.into(),
            device_pk: pk,
            disconnected_at: at,
            reason,
            last_seen_at: seen,
        }
    }

    /// The multi-row statements give what one statement per start or end gave, with a
    /// device's latest start or end winning when a batch holds two.
    #[tokio::test]
    async fn a_batch_of_starts_and_ends_records_each_session_and_the_latest_per_device() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/s.db", dir.path().display());
        let store = Store::open(
            &url,
            Synchronous::Normal,
            super::super::DEFAULT_WAL_MAX_BYTES,
        )
        .await
        .unwrap();
        let a = store
            .create_device("a", None, "{}", b"ha", 1)
            .await
            .unwrap();
        let b = store
            .create_device("b", None, "{}", b"hb", 1)
            .await
            .unwrap();
        let mut tx = store.begin_write().await.unwrap();
        let starts = [
            start("a1", a.pk, 100),
            start("a2", a.pk, 120),
            start("b1", b.pk, 110),
        ];
        record_starts(&mut tx, &starts.iter().collect::<Vec<_>>())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let row = |id: &'static str| {
            let store = store.clone();
            async move { store.get_device(id).await.unwrap().unwrap() }
        };
        let ra = row("a").await;
        assert_eq!(
            (ra.last_connected_at, ra.last_seen_at),
            (Some(120), Some(120))
        );
        let rb = row("b").await;
        assert_eq!(
            (rb.last_connected_at, rb.last_seen_at),
            (Some(110), Some(110))
        );

        let mut tx = store.begin_write().await.unwrap();
        let ends = [
            end("a2", a.pk, 300, "replaced", 290),
            end("a1", a.pk, 200, "closed", 295),
            end("b1", b.pk, 250, "timeout", 105),
        ];
        record_ends(&mut tx, &ends.iter().collect::<Vec<_>>())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let ra = row("a").await;
        assert_eq!(
            (
                ra.last_disconnected_at,
                ra.last_disconnect_reason.as_deref(),
                ra.last_seen_at
            ),
            (Some(300), Some("replaced"), Some(295)),
            "the latest end, and the latest time seen in any"
        );
        let rb = row("b").await;
        assert_eq!(
            (
                rb.last_disconnected_at,
                rb.last_disconnect_reason.as_deref(),
                rb.last_seen_at
            ),
            (Some(250), Some("timeout"), Some(110)),
            "seen no earlier than its connect"
        );
        let sessions = store.list_sessions(a.pk, None, 10).await.unwrap();
        let got: Vec<_> = sessions
            .iter()
            .map(|s| {
                (
                    s.session_id.as_str(),
                    s.connected_at,
                    s.disconnected_at,
                    s.disconnect_reason.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a2", 120, Some(300), Some("replaced")),
                ("a1", 100, Some(200), Some("closed"))
            ]
        );
    }
}
