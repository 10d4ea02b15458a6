//! Connection history and device presence columns (written by the batching writer).

use std::collections::HashMap;

use sqlx::FromRow;

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

/// Records a batch's session starts (in the writer's transaction): a row per session, and
/// each device's presence columns once, from its latest start in the batch.
pub(super) fn record_starts(
    db: &rusqlite::Connection,
    starts: &[&SessionStart],
) -> rusqlite::Result<()> {
    if starts.is_empty() {
        return Ok(());
    }
    let mut insert = db.prepare_cached(
        "INSERT OR IGNORE INTO sessions (session_id, device_pk, connected_at, remote_addr, auth) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut latest: HashMap<i64, i64> = HashMap::with_capacity(starts.len());
    for s in starts {
        insert.execute((
            &s.session_id,
            s.device_pk,
            s.connected_at,
            &s.remote_addr,
            s.auth,
        ))?;
        let at = latest.entry(s.device_pk).or_insert(s.connected_at);
        *at = (*at).max(s.connected_at);
    }
    let mut presence = db.prepare_cached(
        "UPDATE devices SET last_connected_at = ?2, last_seen_at = ?2 WHERE pk = ?1",
    )?;
    for (pk, at) in latest {
        presence.execute((pk, at))?;
    }
    Ok(())
}

/// Records a batch's session ends (in the writer's transaction): a row per session, and
/// each device's presence columns once, from its latest end in the batch.
pub(super) fn record_ends(db: &rusqlite::Connection, ends: &[&SessionEnd]) -> rusqlite::Result<()> {
    if ends.is_empty() {
        return Ok(());
    }
    let mut close = db.prepare_cached(
        "UPDATE sessions SET disconnected_at = ?2, disconnect_reason = ?3 WHERE session_id = ?1",
    )?;
    for e in ends {
        close.execute((&e.session_id, e.disconnected_at, e.reason))?;
    }
    let mut presence = db.prepare_cached(
        "UPDATE devices SET last_disconnected_at = ?2, last_disconnect_reason = ?3, \
           last_seen_at = max(coalesce(last_seen_at, 0), ?4) WHERE pk = ?1",
    )?;
    for (e, last_seen_at) in latest_per_device(ends) {
        presence.execute((e.device_pk, e.disconnected_at, e.reason, last_seen_at))?;
    }
    Ok(())
}

/// One end per device: its latest (the later in the batch on a tie), with the latest time
/// it was seen in any of its ends.
fn latest_per_device<'a>(ends: &[&'a SessionEnd]) -> Vec<(&'a SessionEnd, i64)> {
    let mut by_device: HashMap<i64, (&SessionEnd, i64)> = HashMap::with_capacity(ends.len());
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
pub(crate) mod tests {
    use super::*;
    use crate::config::Synchronous;

    pub(crate) fn start(sid: &str, pk: i64, at: i64) -> SessionStart {
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

    /// Each session gets its row, and a device's latest start or end wins when a batch
    /// holds two.
    #[tokio::test]
    async fn a_batch_of_starts_and_ends_records_each_session_and_the_latest_per_device() {
        let (_dir, store) = crate::store::tests::open(Synchronous::Normal).await;
        let a = store
            .create_device("a", None, "{}", b"ha", 1)
            .await
            .unwrap();
        let b = store
            .create_device("b", None, "{}", b"hb", 1)
            .await
            .unwrap();
        let starts = [
            start("a1", a.pk, 100),
            start("a2", a.pk, 120),
            start("b1", b.pk, 110),
        ];
        store
            .write_sync(|db| record_starts(db, &starts.iter().collect::<Vec<_>>()))
            .await
            .unwrap();
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

        let ends = [
            end("a2", a.pk, 300, "replaced", 290),
            end("a1", a.pk, 200, "closed", 295),
            end("b1", b.pk, 250, "timeout", 105),
        ];
        store
            .write_sync(|db| record_ends(db, &ends.iter().collect::<Vec<_>>()))
            .await
            .unwrap();
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
