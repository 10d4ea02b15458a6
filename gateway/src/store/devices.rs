//! The device registry table: create, read, update, delete, token hashes.

use rusqlite::OptionalExtension;
use sqlx::FromRow;

use super::{Store, StoreError};

/// A device as stored.
#[derive(Debug, Clone, FromRow)]
pub struct DeviceRow {
    pub pk: i64,
    pub id: String,
    pub name: Option<String>,
    pub metadata: String,
    pub enabled: bool,
    pub created_at: i64,
    pub last_connected_at: Option<i64>,
    pub last_disconnected_at: Option<i64>,
    pub last_seen_at: Option<i64>,
    pub last_disconnect_reason: Option<String>,
}

/// What a device's token resolves to.
#[derive(Debug, Clone)]
pub struct TokenOwner {
    pub pk: i64,
    pub id: String,
    pub enabled: bool,
    /// Whether the device had queued or unacknowledged commands when it was looked up
    /// (`true` where that was not asked): with none, its connect listing can be skipped.
    pub commands_waiting: bool,
}

impl DeviceRow {
    /// A row selected (or returned) as [`COLUMNS`].
    fn read(r: &rusqlite::Row) -> rusqlite::Result<DeviceRow> {
        Ok(DeviceRow {
            pk: r.get(0)?,
            id: r.get(1)?,
            name: r.get(2)?,
            metadata: r.get(3)?,
            enabled: r.get(4)?,
            created_at: r.get(5)?,
            last_connected_at: r.get(6)?,
            last_disconnected_at: r.get(7)?,
            last_seen_at: r.get(8)?,
            last_disconnect_reason: r.get(9)?,
        })
    }
}

/// A device to create, committed by the batching writer: devices created together (a fleet
/// provisioned through the API) share a commit and its sync.
#[derive(Debug)]
pub struct NewDevice {
    pub id: String,
    pub name: Option<String>,
    pub metadata: String,
    pub token_hash: Vec<u8>,
    pub now: i64,
}

/// The device's id is taken (or its token hash, which a random token never repeats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken;

impl NewDevice {
    /// Inserts the device in the caller's transaction. A taken id undoes this statement
    /// only: the devices created beside it in the batch stay.
    pub(super) fn insert(
        &self,
        db: &rusqlite::Connection,
    ) -> rusqlite::Result<Result<DeviceRow, Taken>> {
        let sql = format!(
            "INSERT INTO devices (id, name, metadata, enabled, token_hash, created_at, updated_at) \
             VALUES (?1, ?2, ?3, 1, ?4, ?5, ?5) RETURNING {COLUMNS}"
        );
        let inserted = db.prepare_cached(&sql)?.query_row(
            (
                &self.id,
                &self.name,
                &self.metadata,
                &self.token_hash,
                self.now,
            ),
            DeviceRow::read,
        );
        match inserted {
            Ok(row) => Ok(Ok(row)),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
            {
                Ok(Err(Taken))
            }
            Err(e) => Err(e),
        }
    }
}

/// Changes to a device; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct DevicePatch {
    pub name: Option<Option<String>>,
    pub metadata: Option<String>,
    pub enabled: Option<bool>,
}

const COLUMNS: &str = "pk, id, name, metadata, enabled, created_at, last_connected_at, \
     last_disconnected_at, last_seen_at, last_disconnect_reason";

impl Store {
    /// Inserts a device outside the batching writer, for the tests' set-up (the gateway
    /// creates devices through it: [`super::writer::Writer::create_device`]). Panics if the
    /// id is taken.
    #[cfg(test)]
    pub async fn create_device(
        &self,
        id: &str,
        name: Option<&str>,
        metadata: &str,
        token_hash: &[u8],
        now: i64,
    ) -> Result<DeviceRow, StoreError> {
        let new = NewDevice {
            id: id.into(),
            name: name.map(Into::into),
            metadata: metadata.into(),
            token_hash: token_hash.into(),
            now,
        };
        let inserted = self.write_sync(|db| new.insert(db)).await?;
        Ok(inserted.unwrap_or_else(|Taken| panic!("device `{id}` exists already")))
    }

    /// One device by id.
    pub async fn get_device(&self, id: &str) -> Result<Option<DeviceRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM devices WHERE id = ?1");
        Ok(sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&self.read)
            .await?)
    }

    /// Devices ordered by id, after `after`.
    pub async fn list_devices(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DeviceRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM devices WHERE id > ?1 ORDER BY id LIMIT ?2");
        Ok(sqlx::query_as(&sql)
            .bind(after.unwrap_or(""))
            .bind(limit)
            .fetch_all(&self.read)
            .await?)
    }

    /// Applies a patch; `None` when the device does not exist.
    pub async fn update_device(
        &self,
        id: &str,
        patch: &DevicePatch,
        now: i64,
    ) -> Result<Option<DeviceRow>, StoreError> {
        let sql = format!(
            "UPDATE devices SET \
               name = CASE WHEN ?2 THEN ?3 ELSE name END, \
               metadata = COALESCE(?4, metadata), \
               enabled = COALESCE(?5, enabled), \
               updated_at = ?6 \
             WHERE id = ?1 RETURNING {COLUMNS}"
        );
        let mut tx = self.begin_write().await?;
        let row = sqlx::query_as(&sql)
            .bind(id)
            .bind(patch.name.is_some())
            .bind(patch.name.clone().flatten())
            .bind(patch.metadata.as_deref())
            .bind(patch.enabled)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Deletes a device and its history; `false` when it did not exist.
    ///
    /// Telemetry is removed in chunks afterwards by [`Store::purge_telemetry`], so a
    /// device with millions of points does not hold the write lock for long.
    pub async fn delete_device(&self, id: &str) -> Result<Option<i64>, StoreError> {
        let mut tx = self.begin_write().await?;
        let pk: Option<i64> = sqlx::query_scalar("DELETE FROM devices WHERE id = ?1 RETURNING pk")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(pk) = pk {
            sqlx::query("DELETE FROM sessions WHERE device_pk = ?1")
                .bind(pk)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM commands WHERE device_pk = ?1")
                .bind(pk)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(pk)
    }

    /// Replaces a device's token hash; `false` when the device does not exist.
    pub async fn set_token_hash(
        &self,
        id: &str,
        token_hash: &[u8],
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("UPDATE devices SET token_hash = ?2, updated_at = ?3 WHERE id = ?1")
            .bind(id)
            .bind(token_hash)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(done)
    }

    /// The device a token hash belongs to. Asked for every connecting device, so it runs on
    /// the caller's thread (see [`super::readers`]).
    pub fn device_by_token(&self, token_hash: &[u8]) -> Result<Option<TokenOwner>, StoreError> {
        // One read answers both questions a connecting device raises: who it is, and whether
        // there are commands to list for it (one database round trip fewer per connection).
        self.readers.read(|db| {
            db.prepare_cached(
                "SELECT pk, id, enabled, EXISTS (SELECT 1 FROM commands \
                     WHERE device_pk = devices.pk AND status IN ('queued', 'sent')) \
                 FROM devices WHERE token_hash = ?1",
            )?
            .query_row([token_hash], |r| {
                Ok(TokenOwner {
                    pk: r.get(0)?,
                    id: r.get(1)?,
                    enabled: r.get(2)?,
                    commands_waiting: r.get(3)?,
                })
            })
            .optional()
        })
    }
}
