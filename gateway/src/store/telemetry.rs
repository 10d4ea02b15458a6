//! The telemetry table: batched inserts (for the writer), range queries, aggregates, purge.

use futures_util::TryStreamExt;
use sqlx::{FromRow, Row};

use super::{Store, StoreError};

/// One stored point.
#[derive(Debug, Clone, FromRow)]
pub struct TelemetryRow {
    pub rowid: i64,
    pub msg_id: String,
    pub seq: i64,
    pub ts: i64,
    pub received_at: i64,
    pub data: String,
}

/// Where a page of telemetry starts: after this `(ts, rowid)` in the query's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub ts: i64,
    pub rowid: i64,
}

/// A telemetry range query.
#[derive(Debug, Clone)]
pub struct RangeQuery {
    pub device_pk: i64,
    /// Inclusive lower bound of `ts`.
    pub from: i64,
    /// Exclusive upper bound of `ts`.
    pub to: i64,
    pub descending: bool,
    pub after: Option<Position>,
    pub limit: u32,
}

/// Aggregate functions over numeric values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    Avg,
    Min,
    Max,
    Sum,
    Count,
    Last,
}

impl Agg {
    /// Parses `avg`, `min`, `max`, `sum`, `count`, `last`.
    pub fn parse(s: &str) -> Option<Agg> {
        Some(match s {
            "avg" => Agg::Avg,
            "min" => Agg::Min,
            "max" => Agg::Max,
            "sum" => Agg::Sum,
            "count" => Agg::Count,
            "last" => Agg::Last,
            _ => return None,
        })
    }

    /// The name used in responses.
    pub fn name(self) -> &'static str {
        match self {
            Agg::Avg => "avg",
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::Sum => "sum",
            Agg::Count => "count",
            Agg::Last => "last",
        }
    }

    /// The select-list entry producing column `v` (as REAL).
    fn sql(self) -> &'static str {
        match self {
            Agg::Avg => "CAST(avg(j.value) AS REAL) AS v",
            Agg::Min => "CAST(min(j.value) AS REAL) AS v",
            Agg::Max => "CAST(max(j.value) AS REAL) AS v",
            Agg::Sum => "total(j.value) AS v",
            Agg::Count => "CAST(count(*) AS REAL) AS v",
            // SQLite takes a bare column from the row that holds max(): the newest value.
            Agg::Last => "CAST(j.value AS REAL) AS v, max(t.ts) AS newest",
        }
    }
}

/// One aggregated value: the bucket start, the key, the value.
#[derive(Debug, Clone, PartialEq)]
pub struct AggRow {
    pub bucket: i64,
    pub key: String,
    pub value: f64,
}

/// An aggregate query: numeric keys of `data`, one row per (interval, key).
#[derive(Debug, Clone)]
pub struct AggQuery {
    pub device_pk: i64,
    pub from: i64,
    pub to: i64,
    pub interval_ms: i64,
    pub agg: Agg,
    pub descending: bool,
    /// At most this many intervals.
    pub limit: u32,
    /// Only these keys of `data` (all when `None`).
    pub keys: Option<Vec<String>>,
}

/// One row for [`insert_rows`].
#[derive(Debug, Clone, Copy)]
pub(super) struct NewRow<'a> {
    pub device_pk: i64,
    pub msg_id: &'a str,
    pub seq: i64,
    pub ts: i64,
    pub received_at: i64,
    pub data: &'a str,
}

/// Rows per multi-row insert: one statement step inserts this many (the rest go one by one).
const ROWS_PER_INSERT: usize = 32;

/// `INSERT OR IGNORE` of `n` rows, six parameters each.
fn insert_sql(n: usize) -> String {
    let values = vec!["(?, ?, ?, ?, ?, ?)"; n].join(", ");
    format!(
        "INSERT OR IGNORE INTO telemetry (device_pk, msg_id, seq, ts, received_at, data) \
         VALUES {values}"
    )
}

/// Inserts rows (a re-sent message is ignored), in order; returns how many were new.
/// Called in the writer's transaction, on its thread: prepared statements of
/// [`ROWS_PER_INSERT`] rows, then of one row for the rest.
pub(super) fn insert_rows(db: &rusqlite::Connection, rows: &[NewRow<'_>]) -> rusqlite::Result<u64> {
    static MANY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static ONE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let mut inserted = 0;
    let mut chunks = rows.chunks_exact(ROWS_PER_INSERT);
    if chunks.len() > 0 {
        let mut many = db.prepare_cached(MANY.get_or_init(|| insert_sql(ROWS_PER_INSERT)))?;
        for chunk in &mut chunks {
            bind_rows(&mut many, chunk)?;
            inserted += many.raw_execute()?;
        }
    }
    if !chunks.remainder().is_empty() {
        let mut one = db.prepare_cached(ONE.get_or_init(|| insert_sql(1)))?;
        for row in chunks.remainder() {
            bind_rows(&mut one, std::slice::from_ref(row))?;
            inserted += one.raw_execute()?;
        }
    }
    Ok(inserted as u64)
}

/// Binds `rows` to a statement of as many rows, in order.
fn bind_rows(
    stmt: &mut rusqlite::CachedStatement<'_>,
    rows: &[NewRow<'_>],
) -> rusqlite::Result<()> {
    for (i, r) in rows.iter().enumerate() {
        let at = i * 6;
        stmt.raw_bind_parameter(at + 1, r.device_pk)?;
        stmt.raw_bind_parameter(at + 2, r.msg_id)?;
        stmt.raw_bind_parameter(at + 3, r.seq)?;
        stmt.raw_bind_parameter(at + 4, r.ts)?;
        stmt.raw_bind_parameter(at + 5, r.received_at)?;
        stmt.raw_bind_parameter(at + 6, r.data)?;
    }
    Ok(())
}

impl Store {
    /// A page of points in `ts` order (ties broken by insertion order).
    pub async fn query_telemetry(&self, q: &RangeQuery) -> Result<Vec<TelemetryRow>, StoreError> {
        let sql = if q.descending {
            "SELECT rowid, msg_id, seq, ts, received_at, data FROM telemetry \
             WHERE device_pk = ?1 AND ts >= ?2 AND ts < ?3 \
               AND (?4 IS NULL OR ts < ?4 OR (ts = ?4 AND rowid < ?5)) \
             ORDER BY ts DESC, rowid DESC LIMIT ?6"
        } else {
            "SELECT rowid, msg_id, seq, ts, received_at, data FROM telemetry \
             WHERE device_pk = ?1 AND ts >= ?2 AND ts < ?3 \
               AND (?4 IS NULL OR ts > ?4 OR (ts = ?4 AND rowid > ?5)) \
             ORDER BY ts ASC, rowid ASC LIMIT ?6"
        };
        Ok(sqlx::query_as(sql)
            .bind(q.device_pk)
            .bind(q.from)
            .bind(q.to)
            .bind(q.after.map(|p| p.ts))
            .bind(q.after.map(|p| p.rowid))
            .bind(q.limit)
            .fetch_all(&self.read)
            .await?)
    }

    /// The point with the newest `ts`.
    pub async fn latest_telemetry(
        &self,
        device_pk: i64,
    ) -> Result<Option<TelemetryRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT rowid, msg_id, seq, ts, received_at, data FROM telemetry \
             WHERE device_pk = ?1 ORDER BY ts DESC, rowid DESC LIMIT 1",
        )
        .bind(device_pk)
        .fetch_optional(&self.read)
        .await?)
    }

    /// Aggregates numeric values per interval; at most `limit` intervals, in order.
    pub async fn aggregate_telemetry(&self, q: &AggQuery) -> Result<Vec<AggRow>, StoreError> {
        let order = if q.descending { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT (t.ts / ?4) * ?4 AS bucket, j.key AS key, {} \
             FROM telemetry t, json_each(t.data) j \
             WHERE t.device_pk = ?1 AND t.ts >= ?2 AND t.ts < ?3 \
               AND j.type IN ('integer', 'real') \
               AND (?5 IS NULL OR j.key IN (SELECT value FROM json_each(?5))) \
             GROUP BY bucket, j.key ORDER BY bucket {order}, j.key",
            q.agg.sql()
        );
        let mut rows = sqlx::query(&sql)
            .bind(q.device_pk)
            .bind(q.from)
            .bind(q.to)
            .bind(q.interval_ms)
            .bind(
                q.keys
                    .as_ref()
                    .map(|k| serde_json::to_string(k).expect("strings serialize")),
            )
            .fetch(&self.read);
        let mut out: Vec<AggRow> = Vec::new();
        let mut buckets = 0u32;
        while let Some(row) = rows.try_next().await? {
            let bucket: i64 = row.try_get("bucket")?;
            if out.last().map(|r| r.bucket) != Some(bucket) {
                buckets += 1;
                if buckets > q.limit {
                    break;
                }
            }
            out.push(AggRow {
                bucket,
                key: row.try_get("key")?,
                value: row.try_get("v")?,
            });
        }
        Ok(out)
    }

    /// Deletes the telemetry of a deleted device, a chunk per transaction.
    pub async fn purge_telemetry(&self, device_pk: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let mut tx = self.begin_write().await?;
            let n = sqlx::query(
                "DELETE FROM telemetry WHERE rowid IN \
                 (SELECT rowid FROM telemetry WHERE device_pk = ?1 LIMIT 5000)",
            )
            .bind(device_pk)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;

    /// Rows in full multi-row statements and one by one after them: each stored once, in the
    /// order given, and a repeat (in the same statement, a later one, or a later call) ignored.
    #[tokio::test]
    async fn rows_are_stored_once_in_order_across_statements() {
        let (_dir, store) = crate::store::tests::open(Synchronous::Full).await;
        let ids: Vec<String> = (0..ROWS_PER_INSERT * 2 + 6)
            .map(|i| format!("m{i}"))
            .collect();
        let data = |i: usize| format!(r#"{{"i":{i}}}"#);
        let datas: Vec<String> = (0..ids.len()).map(data).collect();
        let mut rows: Vec<NewRow<'_>> = ids
            .iter()
            .zip(&datas)
            .enumerate()
            .map(|(i, (id, data))| NewRow {
                device_pk: 1,
                msg_id: id,
                seq: 0,
                ts: 1000 - i as i64,
                received_at: 5,
                data,
            })
            .collect();
        // Repeats: within the first statement, in the second one, and among the last rows.
        rows[3] = rows[1];
        rows[ROWS_PER_INSERT + 2] = rows[0];
        rows[ROWS_PER_INSERT * 2 + 4] = rows[ROWS_PER_INSERT * 2];
        let expected: Vec<String> = {
            let mut seen = std::collections::HashSet::new();
            rows.iter()
                .filter(|r| seen.insert(r.msg_id))
                .map(|r| r.msg_id.to_owned())
                .collect()
        };
        let all = rows.clone();
        let inserted = store.write_sync(|db| insert_rows(db, &all)).await.unwrap();
        assert_eq!(inserted, expected.len() as u64);
        let again = store.write_sync(|db| insert_rows(db, &all)).await.unwrap();
        assert_eq!(again, 0, "everything was stored already");
        let stored: Vec<(String, String)> =
            sqlx::query_as("SELECT msg_id, data FROM telemetry ORDER BY rowid")
                .fetch_all(&store.read)
                .await
                .unwrap();
        let order: Vec<&str> = stored.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(order, expected, "stored once each, in the order given");
        for (id, data) in &stored {
            assert_eq!(data, &format!(r#"{{"i":{}}}"#, &id[1..]), "{id}");
        }
    }
}
