//! Commands: each device's queue of operator commands and every status transition.
//!
//! A transition is one conditional `UPDATE ... RETURNING`: it names the statuses
//! it may leave, so a late timer, a second session or a duplicate answer finds
//! nothing to change instead of undoing a newer state.

use rusqlite::OptionalExtension;
use sqlx::FromRow;

use super::{Store, StoreError};

/// A command's status, as stored and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "TEXT", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Sent,
    Delivered,
    Succeeded,
    Failed,
    Rejected,
    Expired,
    TimedOut,
    Canceled,
}

impl Status {
    /// Every status, in lifecycle order.
    pub const ALL: [Status; 9] = [
        Status::Queued,
        Status::Sent,
        Status::Delivered,
        Status::Succeeded,
        Status::Failed,
        Status::Rejected,
        Status::Expired,
        Status::TimedOut,
        Status::Canceled,
    ];

    /// The name on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Sent => "sent",
            Status::Delivered => "delivered",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Rejected => "rejected",
            Status::Expired => "expired",
            Status::TimedOut => "timed_out",
            Status::Canceled => "canceled",
        }
    }

    /// Parses a status name.
    pub fn parse(text: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// True once nothing can change the command any more.
    pub fn is_final(self) -> bool {
        !matches!(self, Status::Queued | Status::Sent | Status::Delivered)
    }
}

/// A stored command.
#[derive(Debug, Clone, FromRow)]
pub struct CommandRow {
    pub id: String,
    pub device_pk: i64,
    pub device_id: String,
    pub name: String,
    /// JSON text.
    pub params: String,
    pub status: Status,
    pub created_at: i64,
    pub sent_at: Option<i64>,
    pub delivered_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub expires_at: i64,
    pub timeout_s: i64,
    /// JSON text.
    pub result: Option<String>,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
}

/// See [`Store::connect_listing`].
#[derive(Debug)]
pub struct ConnectListing {
    /// Sent but not acked, oldest first: they go out again.
    pub unacked: Vec<CommandRow>,
    /// Some commands wait in the queue.
    pub any_queued: bool,
}

impl CommandRow {
    /// When a delivered command times out (epoch ms).
    pub fn result_deadline(&self) -> Option<i64> {
        self.delivered_at
            .map(|d| d.saturating_add(self.timeout_s.saturating_mul(1000)))
    }
}

/// A command to queue.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub id: String,
    /// The device's id; the queueing transaction finds its row (and sees it still exists).
    pub device_id: String,
    pub name: String,
    pub params: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub timeout_s: i64,
    pub idempotency_key: Option<String>,
}

/// What queueing a command did.
#[derive(Debug)]
pub enum Queued {
    /// A new command.
    New(CommandRow),
    /// The command created earlier with the same idempotency key.
    Existing(CommandRow),
    /// The device already has `queue_max` commands that are not final.
    QueueFull,
    /// No device has this id (it never existed, or was deleted).
    NoDevice,
}

/// What a device's answer (ack or result) did.
#[derive(Debug)]
pub enum Answer {
    /// The command moved to a new status.
    Changed(Box<CommandRow>),
    /// The device has this command, but it was already past that point.
    Unchanged,
    /// This device has no command with that id.
    Unknown,
}

/// What a cancel did.
#[derive(Debug)]
pub enum Cancel {
    Canceled(CommandRow),
    AlreadyFinal(CommandRow),
    NotFound,
}

/// A page of a device's commands.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub device_pk: i64,
    pub statuses: Vec<Status>,
    pub descending: bool,
    /// Row id of the last command on the previous page.
    pub after: Option<i64>,
    pub limit: u32,
}

const OPEN: &str = "('queued', 'sent', 'delivered')";

/// A change to commands. The gateway hands these to the batching writer, so they
/// commit together with telemetry (group commit) instead of one fsync each.
#[derive(Debug)]
pub enum CommandOp {
    /// Queue a command, unless its idempotency key was seen or the queue is full; with
    /// `deliver_window` (its device is online), also take what the window lets through now.
    Queue {
        new: NewCommand,
        queue_max: u32,
        deliver_window: Option<u32>,
    },
    /// Mark the device's oldest queued commands sent, leaving at most `window` in flight.
    TakeForDelivery {
        device_pk: i64,
        window: u32,
        now: i64,
    },
    /// Commands marked sent that their session never wrote out: `sent` -> `queued`.
    Requeue { ids: Vec<String> },
    /// The device acked a command: `queued`/`sent` -> `delivered`.
    Delivered {
        device_pk: i64,
        id: String,
        now: i64,
    },
    /// The device answered a command: any open status -> its final status.
    Completed {
        device_pk: i64,
        id: String,
        status: Status,
        result: Option<String>,
        error: Option<String>,
        now: i64,
    },
    /// Not delivered before `expires_at`: `queued`/`sent` -> `expired`.
    Expire { id: String, now: i64 },
    /// Delivered, no result within `timeout_s`: `delivered` -> `timed_out`.
    TimeOut { id: String, now: i64 },
    /// An operator cancels a command that is not final.
    Cancel { id: String, now: i64 },
}

/// What a [`CommandOp`] did.
#[derive(Debug)]
pub enum CommandOutcome {
    /// What queueing did, and the commands it marked sent (oldest first).
    Queued(Queued, Vec<CommandRow>),
    /// Commands marked sent (oldest first), or back to queued.
    Taken(Vec<CommandRow>),
    /// Commands marked sent for delivery.
    Delivery(Delivery),
    Answer(Answer),
    /// The expired or timed-out command, if the deadline still applied.
    Finished(Option<CommandRow>),
    Cancel(Cancel),
}

impl CommandOp {
    /// Applies the change inside the caller's transaction (the writer's, on its thread).
    pub fn apply(&self, db: &rusqlite::Connection) -> rusqlite::Result<CommandOutcome> {
        Ok(match self {
            CommandOp::Queue {
                new,
                queue_max,
                deliver_window,
            } => {
                let queued = queue(db, new, *queue_max)?;
                let taken = match (&queued, deliver_window) {
                    (Queued::New(row), Some(window)) => {
                        take_for_delivery(db, row.device_pk, *window, new.created_at)?.rows
                    }
                    _ => Vec::new(),
                };
                CommandOutcome::Queued(queued, taken)
            }
            CommandOp::TakeForDelivery {
                device_pk,
                window,
                now,
            } => CommandOutcome::Delivery(take_for_delivery(db, *device_pk, *window, *now)?),
            CommandOp::Requeue { ids } => {
                let mut requeue = db.prepare_cached(
                    "UPDATE commands SET status = 'queued', sent_at = NULL \
                     WHERE id = ?1 AND status = 'sent' RETURNING *",
                )?;
                let mut rows = Vec::with_capacity(ids.len());
                for id in ids {
                    rows.extend(requeue.query_row([id], CommandRow::read).optional()?);
                }
                CommandOutcome::Taken(rows)
            }
            CommandOp::Delivered { device_pk, id, now } => {
                let row = db
                    .prepare_cached(
                        "UPDATE commands SET status = 'delivered', delivered_at = ?3 \
                         WHERE id = ?1 AND device_pk = ?2 AND status IN ('queued', 'sent') \
                         RETURNING *",
                    )?
                    .query_row((id, device_pk, now), CommandRow::read)
                    .optional()?;
                CommandOutcome::Answer(answer(db, row, *device_pk, id)?)
            }
            CommandOp::Completed {
                device_pk,
                id,
                status,
                result,
                error,
                now,
            } => {
                let row = db
                    .prepare_cached(&format!(
                        "UPDATE commands SET status = ?3, result = ?4, error = ?5, completed_at = ?6, \
                         delivered_at = coalesce(delivered_at, ?6) \
                         WHERE id = ?1 AND device_pk = ?2 AND status IN {OPEN} RETURNING *"
                    ))?
                    .query_row(
                        (id, device_pk, status.as_str(), result, error, now),
                        CommandRow::read,
                    )
                    .optional()?;
                CommandOutcome::Answer(answer(db, row, *device_pk, id)?)
            }
            CommandOp::Expire { id, now } => CommandOutcome::Finished(finish_if(
                db,
                id,
                "('queued', 'sent')",
                Status::Expired,
                *now,
            )?),
            CommandOp::TimeOut { id, now } => CommandOutcome::Finished(finish_if(
                db,
                id,
                "('delivered')",
                Status::TimedOut,
                *now,
            )?),
            CommandOp::Cancel { id, now } => {
                CommandOutcome::Cancel(match finish_if(db, id, OPEN, Status::Canceled, *now)? {
                    Some(row) => Cancel::Canceled(row),
                    None => match db
                        .prepare_cached("SELECT * FROM commands WHERE id = ?1")?
                        .query_row([id], CommandRow::read)
                        .optional()?
                    {
                        Some(row) => Cancel::AlreadyFinal(row),
                        None => Cancel::NotFound,
                    },
                })
            }
        })
    }
}

impl CommandRow {
    /// A `SELECT *` or `RETURNING *` row, read by column name.
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<CommandRow> {
        let status: String = row.get("status")?;
        Ok(CommandRow {
            id: row.get("id")?,
            device_pk: row.get("device_pk")?,
            device_id: row.get("device_id")?,
            name: row.get("name")?,
            params: row.get("params")?,
            status: Status::parse(&status).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    format!("unknown command status {status:?}").into(),
                )
            })?,
            created_at: row.get("created_at")?,
            sent_at: row.get("sent_at")?,
            delivered_at: row.get("delivered_at")?,
            completed_at: row.get("completed_at")?,
            expires_at: row.get("expires_at")?,
            timeout_s: row.get("timeout_s")?,
            result: row.get("result")?,
            error: row.get("error")?,
            idempotency_key: row.get("idempotency_key")?,
        })
    }
}

/// Queues `new` for its device, found by id in the same transaction: a device deleted
/// meanwhile gets nothing queued, and the lookup reads the writer's own warm page cache.
fn queue(db: &rusqlite::Connection, new: &NewCommand, queue_max: u32) -> rusqlite::Result<Queued> {
    let device_pk: Option<i64> = db
        .prepare_cached("SELECT pk FROM devices WHERE id = ?1")?
        .query_row([&new.device_id], |r| r.get(0))
        .optional()?;
    let Some(device_pk) = device_pk else {
        return Ok(Queued::NoDevice);
    };
    if let Some(key) = &new.idempotency_key {
        let existing = db
            .prepare_cached("SELECT * FROM commands WHERE device_pk = ?1 AND idempotency_key = ?2")?
            .query_row((device_pk, key), CommandRow::read)
            .optional()?;
        if let Some(row) = existing {
            return Ok(Queued::Existing(row));
        }
    }
    let open: i64 = db
        .prepare_cached(&format!(
            "SELECT count(*) FROM commands WHERE device_pk = ?1 AND status IN {OPEN}"
        ))?
        .query_row([device_pk], |r| r.get(0))?;
    if open >= i64::from(queue_max) {
        return Ok(Queued::QueueFull);
    }
    let row = db
        .prepare_cached(
            "INSERT INTO commands (id, device_pk, device_id, name, params, status, created_at, \
             expires_at, timeout_s, idempotency_key) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7, ?8, ?9) RETURNING *",
        )?
        .query_row(
            (
                &new.id,
                device_pk,
                &new.device_id,
                &new.name,
                &new.params,
                new.created_at,
                new.expires_at,
                new.timeout_s,
                &new.idempotency_key,
            ),
            CommandRow::read,
        )?;
    Ok(Queued::New(row))
}

fn take_for_delivery(
    db: &rusqlite::Connection,
    device_pk: i64,
    window: u32,
    now: i64,
) -> rusqlite::Result<Delivery> {
    let in_flight: i64 = db
        .prepare_cached(
            "SELECT count(*) FROM commands WHERE device_pk = ?1 AND status IN ('sent', 'delivered')",
        )?
        .query_row([device_pk], |r| r.get(0))?;
    let free = i64::from(window) - in_flight;
    if free <= 0 {
        return Ok(Delivery {
            rows: Vec::new(),
            maybe_more: true,
        });
    }
    let mut rows = db
        .prepare_cached(
            "UPDATE commands SET status = 'sent', sent_at = ?2 WHERE rowid IN \
             (SELECT rowid FROM commands WHERE device_pk = ?1 AND status = 'queued' \
              AND expires_at > ?2 ORDER BY rowid LIMIT ?3) RETURNING *",
        )?
        .query_map((device_pk, now, free), CommandRow::read)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    // RETURNING gives no order guarantee; creation order is the contract.
    rows.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let maybe_more = rows.len() as i64 == free;
    Ok(Delivery { rows, maybe_more })
}

/// Commands marked sent for delivery (oldest first), and whether more may still be queued
/// (the window filled up): when not, the device's queue is empty.
#[derive(Debug)]
pub struct Delivery {
    pub rows: Vec<CommandRow>,
    pub maybe_more: bool,
}

fn finish_if(
    db: &rusqlite::Connection,
    id: &str,
    from: &str,
    to: Status,
    now: i64,
) -> rusqlite::Result<Option<CommandRow>> {
    db.prepare_cached(&format!(
        "UPDATE commands SET status = ?2, completed_at = ?3 \
         WHERE id = ?1 AND status IN {from} RETURNING *"
    ))?
    .query_row((id, to.as_str(), now), CommandRow::read)
    .optional()
}

/// Tells "already past that point" from "not this device's command".
fn answer(
    db: &rusqlite::Connection,
    row: Option<CommandRow>,
    device_pk: i64,
    id: &str,
) -> rusqlite::Result<Answer> {
    if let Some(row) = row {
        return Ok(Answer::Changed(Box::new(row)));
    }
    let known: bool = db
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM commands WHERE id = ?1 AND device_pk = ?2)")?
        .query_row((id, device_pk), |r| r.get(0))?;
    Ok(if known {
        Answer::Unchanged
    } else {
        Answer::Unknown
    })
}

impl Store {
    /// Applies one change in a transaction of its own (the gateway batches them in the
    /// writer; the tests apply them one at a time).
    #[cfg(test)]
    pub async fn apply_command_op(&self, op: &CommandOp) -> Result<CommandOutcome, StoreError> {
        self.write_sync(|db| op.apply(db)).await
    }

    /// One command by id.
    pub async fn get_command(&self, id: &str) -> Result<Option<CommandRow>, StoreError> {
        Ok(sqlx::query_as("SELECT * FROM commands WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.read)
            .await?)
    }

    /// A page of a device's commands with their row ids (for the cursor), in creation order.
    pub async fn list_commands(&self, q: &ListQuery) -> Result<Vec<(i64, CommandRow)>, StoreError> {
        #[derive(FromRow)]
        struct Listed {
            rowid: i64,
            #[sqlx(flatten)]
            row: CommandRow,
        }
        let statuses = if q.statuses.is_empty() {
            String::new()
        } else {
            let names: Vec<String> = q
                .statuses
                .iter()
                .map(|s| format!("'{}'", s.as_str()))
                .collect();
            format!("AND status IN ({})", names.join(", "))
        };
        let (cmp, order) = if q.descending {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        let sql = format!(
            "SELECT rowid, * FROM commands WHERE device_pk = ?1 {statuses} \
             AND (?2 IS NULL OR rowid {cmp} ?2) ORDER BY rowid {order} LIMIT ?3"
        );
        let rows: Vec<Listed> = sqlx::query_as(&sql)
            .bind(q.device_pk)
            .bind(q.after)
            .bind(q.limit)
            .fetch_all(&self.read)
            .await?;
        Ok(rows.into_iter().map(|l| (l.rowid, l.row)).collect())
    }

    /// What a connecting device is owed, in one read: its commands that were sent but not
    /// acked (oldest first), and whether any wait in its queue.
    pub async fn connect_listing(&self, device_pk: i64) -> Result<ConnectListing, StoreError> {
        // The oldest queued command, if any, comes along to say that there are some.
        let rows: Vec<CommandRow> = sqlx::query_as(
            "SELECT rowid AS n, * FROM commands WHERE device_pk = ?1 AND status = 'sent' \
             UNION ALL \
             SELECT * FROM (SELECT rowid AS n, * FROM commands \
                            WHERE device_pk = ?1 AND status = 'queued' ORDER BY rowid LIMIT 1) \
             ORDER BY n",
        )
        .bind(device_pk)
        .fetch_all(&self.read)
        .await?;
        let any_queued = rows.iter().any(|r| r.status == Status::Queued);
        let unacked = rows
            .into_iter()
            .filter(|r| r.status == Status::Sent)
            .collect();
        Ok(ConnectListing {
            unacked,
            any_queued,
        })
    }

    /// Commands that are not final, for re-arming their timers at start-up.
    pub async fn open_commands(&self) -> Result<Vec<CommandRow>, StoreError> {
        Ok(
            sqlx::query_as(&format!("SELECT * FROM commands WHERE status IN {OPEN}"))
                .fetch_all(&self.read)
                .await?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;

    /// A fresh store with devices `d1` and `d2` (pks 1 and 2), which [`new`] refers to.
    async fn store() -> (tempfile::TempDir, Store) {
        let (dir, store) = crate::store::tests::open(Synchronous::Normal).await;
        for pk in [1, 2] {
            let id = format!("d{pk}");
            let device = store.create_device(&id, None, "{}", id.as_bytes(), 1);
            assert_eq!(device.await.unwrap().pk, pk);
        }
        (dir, store)
    }

    /// The ops one at a time, as the tests below read best.
    impl Store {
        async fn op(&self, op: CommandOp) -> CommandOutcome {
            self.apply_command_op(&op).await.unwrap()
        }
        async fn queue_command(&self, new: &NewCommand, queue_max: u32) -> Result<Queued, ()> {
            let new = new.clone();
            let op = CommandOp::Queue {
                new,
                queue_max,
                deliver_window: None,
            };
            match self.op(op).await {
                CommandOutcome::Queued(q, _) => Ok(q),
                o => panic!("{o:?}"),
            }
        }
        async fn take_for_delivery(
            &self,
            device_pk: i64,
            window: u32,
            now: i64,
        ) -> Result<Delivery, ()> {
            match self
                .op(CommandOp::TakeForDelivery {
                    device_pk,
                    window,
                    now,
                })
                .await
            {
                CommandOutcome::Delivery(d) => Ok(d),
                o => panic!("{o:?}"),
            }
        }
        async fn command_delivered(
            &self,
            device_pk: i64,
            id: &str,
            now: i64,
        ) -> Result<Answer, ()> {
            let id = id.to_owned();
            match self.op(CommandOp::Delivered { device_pk, id, now }).await {
                CommandOutcome::Answer(a) => Ok(a),
                o => panic!("{o:?}"),
            }
        }
        async fn command_completed(
            &self,
            device_pk: i64,
            id: &str,
            status: Status,
            result: Option<&str>,
            error: Option<&str>,
            now: i64,
        ) -> Result<Answer, ()> {
            let op = CommandOp::Completed {
                device_pk,
                id: id.to_owned(),
                status,
                result: result.map(str::to_owned),
                error: error.map(str::to_owned),
                now,
            };
            match self.op(op).await {
                CommandOutcome::Answer(a) => Ok(a),
                o => panic!("{o:?}"),
            }
        }
        async fn expire_command(&self, id: &str, now: i64) -> Result<Option<CommandRow>, ()> {
            match self
                .op(CommandOp::Expire {
                    id: id.to_owned(),
                    now,
                })
                .await
            {
                CommandOutcome::Finished(r) => Ok(r),
                o => panic!("{o:?}"),
            }
        }
        async fn time_out_command(&self, id: &str, now: i64) -> Result<Option<CommandRow>, ()> {
            match self
                .op(CommandOp::TimeOut {
                    id: id.to_owned(),
                    now,
                })
                .await
            {
                CommandOutcome::Finished(r) => Ok(r),
                o => panic!("{o:?}"),
            }
        }
        async fn cancel_command(&self, id: &str, now: i64) -> Result<Cancel, ()> {
            match self
                .op(CommandOp::Cancel {
                    id: id.to_owned(),
                    now,
                })
                .await
            {
                CommandOutcome::Cancel(c) => Ok(c),
                o => panic!("{o:?}"),
            }
        }
    }

    /// A command for device `d{pk}`.
    fn new(id: &str, pk: i64, created_at: i64) -> NewCommand {
        NewCommand {
            id: id.into(),
            device_id: format!("d{pk}"),
            name: "ping".into(),
            params: "{}".into(),
            created_at,
            expires_at: created_at + 60_000,
            timeout_s: 30,
            idempotency_key: None,
        }
    }

    #[test]
    fn final_statuses() {
        let open: Vec<_> = Status::ALL.into_iter().filter(|s| !s.is_final()).collect();
        assert_eq!(open, [Status::Queued, Status::Sent, Status::Delivered]);
        assert_eq!(Status::parse("timed_out"), Some(Status::TimedOut));
        assert_eq!(Status::parse("done"), None);
    }

    #[tokio::test]
    async fn delivery_takes_the_oldest_up_to_the_window() {
        let (_d, store) = store().await;
        for i in 0..5 {
            let q = store
                .queue_command(&new(&format!("c{i}"), 1, 10 + i), 100)
                .await;
            assert!(matches!(q.unwrap(), Queued::New(_)));
        }
        let first = store.take_for_delivery(1, 3, 20).await.unwrap();
        assert!(first.maybe_more, "the window filled up");
        let first = first.rows;
        let ids: Vec<_> = first.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["c0", "c1", "c2"]);
        assert!(first
            .iter()
            .all(|r| r.status == Status::Sent && r.sent_at == Some(20)));
        let full = store.take_for_delivery(1, 3, 21).await.unwrap();
        assert!(full.rows.is_empty(), "window full");
        assert!(full.maybe_more, "a full window says nothing of the queue");
        let done = store
            .command_completed(1, "c1", Status::Succeeded, Some("{}"), None, 22)
            .await
            .unwrap();
        let Answer::Changed(row) = done else {
            panic!("{done:?}")
        };
        assert_eq!(
            (row.status, row.delivered_at, row.completed_at),
            (Status::Succeeded, Some(22), Some(22))
        );
        let next = store.take_for_delivery(1, 3, 23).await.unwrap();
        assert_eq!(
            next.rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["c3"]
        );
        assert!(next.maybe_more, "one slot was free and one was taken");
        for id in ["c0", "c2"] {
            store
                .command_completed(1, id, Status::Succeeded, Some("{}"), None, 24)
                .await
                .unwrap();
        }
        let last = store.take_for_delivery(1, 3, 25).await.unwrap();
        assert_eq!(
            last.rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["c4"]
        );
        assert!(!last.maybe_more, "two slots were free, the queue is empty");
    }

    #[tokio::test]
    async fn the_connect_listing_has_the_unacked_and_says_whether_any_are_queued() {
        let (_d, store) = store().await;
        let ids = |l: &ConnectListing| l.unacked.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        let empty = store.connect_listing(1).await.unwrap();
        assert!(ids(&empty).is_empty() && !empty.any_queued);
        for i in 0..4 {
            store
                .queue_command(&new(&format!("c{i}"), 1, 10 + i), 100)
                .await
                .unwrap();
        }
        store
            .queue_command(&new("other", 2, 10), 100)
            .await
            .unwrap();
        let queued = store.connect_listing(1).await.unwrap();
        assert!(ids(&queued).is_empty(), "queued commands are not unacked");
        assert!(queued.any_queued);
        store.take_for_delivery(1, 3, 20).await.unwrap();
        store
            .command_completed(1, "c1", Status::Succeeded, Some("{}"), None, 22)
            .await
            .unwrap();
        let both = store.connect_listing(1).await.unwrap();
        assert_eq!(ids(&both), ["c0", "c2"], "sent and not acked, oldest first");
        assert!(both.any_queued, "c3 waits");
        store.take_for_delivery(1, 3, 23).await.unwrap();
        let sent = store.connect_listing(1).await.unwrap();
        assert_eq!(ids(&sent), ["c0", "c2", "c3"]);
        assert!(!sent.any_queued, "device 2's command is not device 1's");
    }

    #[tokio::test]
    async fn answers_are_scoped_to_the_device_and_never_undo_a_final_status() {
        let (_d, store) = store().await;
        store.queue_command(&new("c1", 1, 10), 100).await.unwrap();
        store.take_for_delivery(1, 8, 11).await.unwrap();
        assert!(matches!(
            store.command_delivered(2, "c1", 12).await.unwrap(),
            Answer::Unknown
        ));
        assert!(matches!(
            store.command_delivered(1, "c1", 12).await.unwrap(),
            Answer::Changed(r) if r.status == Status::Delivered
        ));
        assert!(matches!(
            store.command_delivered(1, "c1", 13).await.unwrap(),
            Answer::Unchanged
        ));
        assert!(
            store.expire_command("c1", 14).await.unwrap().is_none(),
            "delivered does not expire"
        );
        assert!(store.time_out_command("c1", 15).await.unwrap().is_some());
        assert!(matches!(
            store
                .command_completed(1, "c1", Status::Succeeded, None, None, 16)
                .await
                .unwrap(),
            Answer::Unchanged
        ));
        assert_eq!(
            store.get_command("c1").await.unwrap().unwrap().status,
            Status::TimedOut
        );
        assert!(matches!(
            store.cancel_command("c1", 17).await.unwrap(),
            Cancel::AlreadyFinal(_)
        ));
        assert!(matches!(
            store.cancel_command("nope", 17).await.unwrap(),
            Cancel::NotFound
        ));
    }

    /// The queueing transaction finds the device itself: no device, or one deleted since
    /// the operator's request arrived, gets nothing queued.
    #[tokio::test]
    async fn a_command_for_a_device_that_is_not_there_is_not_queued() {
        let (_d, store) = store().await;
        assert!(matches!(
            store.queue_command(&new("c1", 3, 10), 100).await.unwrap(),
            Queued::NoDevice
        ));
        assert_eq!(store.delete_device("d2").await.unwrap(), Some(2));
        let mut keyed = new("c2", 2, 10);
        keyed.idempotency_key = Some("k".into());
        assert!(matches!(
            store.queue_command(&keyed, 100).await.unwrap(),
            Queued::NoDevice
        ));
        for id in ["c1", "c2"] {
            assert!(store.get_command(id).await.unwrap().is_none());
        }
        assert!(matches!(
            store.queue_command(&new("c3", 1, 10), 100).await.unwrap(),
            Queued::New(r) if r.device_pk == 1
        ));
    }

    #[tokio::test]
    async fn idempotency_and_the_queue_bound() {
        let (_d, store) = store().await;
        let mut keyed = new("c1", 1, 10);
        keyed.idempotency_key = Some("k".into());
        assert!(matches!(
            store.queue_command(&keyed, 2).await.unwrap(),
            Queued::New(_)
        ));
        keyed.id = "c2".into();
        assert!(matches!(
            store.queue_command(&keyed, 2).await.unwrap(),
            Queued::Existing(r) if r.id == "c1"
        ));
        store.queue_command(&new("c3", 1, 11), 2).await.unwrap();
        assert!(matches!(
            store.queue_command(&new("c4", 1, 12), 2).await.unwrap(),
            Queued::QueueFull
        ));
        assert!(matches!(
            store.queue_command(&new("c5", 2, 12), 2).await.unwrap(),
            Queued::New(r) if r.device_pk == 2 && r.device_id == "d2"
        ));
        let page = store
            .list_commands(&ListQuery {
                device_pk: 1,
                statuses: vec![Status::Queued],
                descending: true,
                after: None,
                limit: 1,
            })
            .await
            .unwrap();
        assert_eq!(page[0].1.id, "c3", "newest first");
    }
}
