//! `/v1/devices`: the registry (create, list, show, update, delete, token rotation) and sessions.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::{cursor, parse_limit, ApiError, ApiState, JsonBody};
use crate::device::listener::hash_token;
use crate::hub::{CloseOrder, SessionHandle};
use crate::store::devices::{DevicePatch, DeviceRow, NewDevice};
use crate::store::sessions::SessionRow;
use crate::time::{format_ms, now_ms};

/// Longest device name, in characters.
const MAX_NAME_CHARS: usize = 256;

/// Checks `[A-Za-z0-9][A-Za-z0-9._:-]{0,127}`.
pub fn valid_device_id(id: &str) -> bool {
    let mut bytes = id.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
        && id.len() <= 128
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn opt_time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |ms| Value::String(format_ms(ms)))
}

/// The device as the API shows it, with presence from the hub.
///
/// A session leaves the hub only after its end is committed, but the row may have been
/// read before that commit: a row that still looks connected while the hub has no
/// session is read again, so `online: false` always comes with its disconnect fields.
async fn device_json(state: &ApiState, row: &DeviceRow) -> Result<Value, ApiError> {
    let live = state.hub.get(&row.id);
    if live.is_none() && looks_connected(row) {
        if let Some(fresh) = state.store.get_device(&row.id).await? {
            return Ok(device_value(&fresh, None));
        }
    }
    Ok(device_value(row, live.as_deref()))
}

/// Whether the row's last session has no recorded end yet.
fn looks_connected(row: &DeviceRow) -> bool {
    row.last_connected_at
        .is_some_and(|c| row.last_disconnected_at.is_none_or(|d| d < c))
}

/// The device as the API shows it, given its live session if it has one.
fn device_value(row: &DeviceRow, live: Option<&SessionHandle>) -> Value {
    // A live session knows more than the row: the writer records presence asynchronously.
    let (last_connected, last_seen) = match &live {
        Some(h) => (
            Some(h.connected_at.max(row.last_connected_at.unwrap_or(0))),
            Some(h.last_seen().max(row.last_seen_at.unwrap_or(0))),
        ),
        None => (row.last_connected_at, row.last_seen_at),
    };
    let metadata = RawValue::from_string(row.metadata.clone())
        .ok()
        .and_then(|raw| serde_json::to_value(raw).ok())
        .unwrap_or_else(|| json!({}));
    json!({
        "id": row.id,
        "name": row.name,
        "metadata": metadata,
        "enabled": row.enabled,
        "online": live.is_some(),
        "created_at": format_ms(row.created_at),
        "last_connected_at": opt_time(last_connected),
        "last_disconnected_at": opt_time(row.last_disconnected_at),
        "last_seen_at": opt_time(last_seen),
        "last_disconnect_reason": row.last_disconnect_reason,
    })
}

fn check_name(name: Option<&str>) -> Result<(), ApiError> {
    match name {
        Some(n) if n.chars().count() > MAX_NAME_CHARS => {
            Err(ApiError::invalid("name is at most 256 characters"))
        }
        _ => Ok(()),
    }
}

pub(super) async fn find(state: &ApiState, id: &str) -> Result<DeviceRow, ApiError> {
    state
        .store
        .get_device(id)
        .await?
        .ok_or_else(|| no_device(id))
}

/// The `404` for a device id that names no device.
pub(super) fn no_device(id: &str) -> ApiError {
    ApiError::not_found(format!("no device `{id}`"))
}

/// The body of `POST /v1/devices`.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct CreateDevice {
    /// `[A-Za-z0-9][A-Za-z0-9._:-]{0,127}`
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    metadata: Option<Map<String, Value>>,
}

/// `POST /v1/devices`: `201` with the device and its token (shown only here).
#[utoipa::path(post, path = "/devices", tag = "devices", request_body = CreateDevice,
    responses(
        (status = 201, description = "Created; the token is shown only here", body = super::openapi::NewDevice),
        (status = 400, description = "Malformed JSON", body = super::openapi::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = super::openapi::ErrorBody),
        (status = 409, description = "The id exists", body = super::openapi::ErrorBody),
        (status = 422, description = "Invalid id, name or metadata", body = super::openapi::ErrorBody)))]
pub async fn create(
    State(state): State<ApiState>,
    JsonBody(body): JsonBody<CreateDevice>,
) -> Result<impl IntoResponse, ApiError> {
    if !valid_device_id(&body.id) {
        return Err(ApiError::invalid(
            "id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}",
        ));
    }
    check_name(body.name.as_deref())?;
    let metadata = Value::Object(body.metadata.unwrap_or_default()).to_string();
    let token = super::key::random_secret();
    let new = NewDevice {
        id: body.id,
        name: body.name,
        metadata,
        token_hash: hash_token(&token),
        now: now_ms(),
    };
    let id = new.id.clone();
    let Ok(row) = state.writer.create_device(new).await? else {
        return Err(ApiError::conflict(format!("device `{id}` already exists")));
    };
    let mut device = device_json(&state, &row).await?;
    device["token"] = Value::String(token);
    tracing::info!(device_id = %row.id, "device created");
    Ok((StatusCode::CREATED, Json(device)))
}

/// `GET /v1/devices?online=&limit=&cursor=`.
#[utoipa::path(get, path = "/devices", tag = "devices",
    params(("online" = Option<bool>, Query, description = "Only devices online (true) or offline (false)"), ("limit" = Option<u32>, Query, description = "1 to 1000, default 100"), ("cursor" = Option<String>, Query, description = "next_cursor of the previous page")),
    responses(
        (status = 200, description = "A page of devices, by id", body = super::openapi::DevicePage),
        (status = 400, description = "Invalid query value", body = super::openapi::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = super::openapi::ErrorBody)))]
pub async fn list(
    State(state): State<ApiState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = parse_limit(params.get("limit").map(String::as_str))?;
    let online = match params.get("online").map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return Err(ApiError::bad_request("online must be true or false")),
    };
    let mut after = match params.get("cursor") {
        None => None,
        Some(c) => Some(cursor::decode(c).ok_or_else(|| ApiError::bad_request("invalid cursor"))?),
    };
    let want = limit as usize + 1;
    let mut rows = Vec::with_capacity(want);
    loop {
        let page = state
            .store
            .list_devices(after.as_deref(), (want as u32).max(200))
            .await?;
        let exhausted = page.len() < (want).max(200);
        after = page.last().map(|r| r.id.clone());
        rows.extend(
            page.into_iter()
                .filter(|r| online.is_none_or(|o| state.hub.get(&r.id).is_some() == o)),
        );
        if rows.len() >= want || exhausted {
            break;
        }
    }
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|r| cursor::encode(&r.id))
    } else {
        None
    };
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        items.push(device_json(&state, row).await?);
    }
    Ok(Json(json!({"items": items, "next_cursor": next_cursor})))
}

/// `GET /v1/devices/{id}`.
#[utoipa::path(get, path = "/devices/{id}", tag = "devices", params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The device with its presence", body = super::openapi::Device),
        (status = 401, description = "Missing or wrong API key", body = super::openapi::ErrorBody), (status = 404, description = "No such device", body = super::openapi::ErrorBody)))]
pub async fn show(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = find(&state, &id).await?;
    Ok(Json(device_json(&state, &row).await?))
}

/// Distinguishes an absent field from an explicit `null`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// The body of `PATCH /v1/devices/{id}`: only the fields given change.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct UpdateDevice {
    /// `null` clears the name.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    name: Option<Option<String>>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    metadata: Option<Map<String, Value>>,
    #[serde(default)]
    enabled: Option<bool>,
}

/// `PATCH /v1/devices/{id}`: name, metadata, enabled; disabling closes a live session (4003).
#[utoipa::path(patch, path = "/devices/{id}", tag = "devices", params(("id" = String, Path, description = "Device id")), request_body = UpdateDevice,
    responses(
        (status = 200, description = "The updated device; disabling closes a live session with 4003", body = super::openapi::Device),
        (status = 400, description = "Malformed JSON", body = super::openapi::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = super::openapi::ErrorBody), (status = 404, description = "No such device", body = super::openapi::ErrorBody),
        (status = 422, description = "Invalid field", body = super::openapi::ErrorBody)))]
pub async fn update(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UpdateDevice>,
) -> Result<Json<Value>, ApiError> {
    check_name(body.name.as_ref().and_then(|n| n.as_deref()))?;
    let patch = DevicePatch {
        name: body.name,
        metadata: body.metadata.map(|m| Value::Object(m).to_string()),
        enabled: body.enabled,
    };
    let row = state
        .store
        .update_device(&id, &patch, now_ms())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device `{id}`")))?;
    if !row.enabled {
        state.hub.close(&row.id, CloseOrder::DISABLED);
    }
    Ok(Json(device_json(&state, &row).await?))
}

/// `DELETE /v1/devices/{id}`: `204`; a live session is closed (4003).
#[utoipa::path(delete, path = "/devices/{id}", tag = "devices", params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 204, description = "Deleted, with its telemetry, sessions and commands; a live session is closed with 4003"),
        (status = 401, description = "Missing or wrong API key", body = super::openapi::ErrorBody), (status = 404, description = "No such device", body = super::openapi::ErrorBody)))]
pub async fn remove(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let pk = state
        .store
        .delete_device(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device `{id}`")))?;
    state.hub.close(&id, CloseOrder::DISABLED);
    tracing::info!(device_id = %id, "device deleted");
    let store = state.store.clone();
    tokio::spawn(async move {
        if let Err(e) = store.purge_telemetry(pk).await {
            tracing::warn!(error = %e, "purging a deleted device's telemetry failed");
        }
    });
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/devices/{id}/token`: a new token; the old one stops working, a live session is closed (4003).
#[utoipa::path(post, path = "/devices/{id}/token", tag = "devices", params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "A new token; the old one stops working and a live session is closed with 4003", body = super::openapi::Token),
        (status = 401, description = "Missing or wrong API key", body = super::openapi::ErrorBody), (status = 404, description = "No such device", body = super::openapi::ErrorBody)))]
pub async fn rotate_token(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let token = super::key::random_secret();
    if !state
        .store
        .set_token_hash(&id, &hash_token(&token), now_ms())
        .await?
    {
        return Err(ApiError::not_found(format!("no device `{id}`")));
    }
    state.hub.close(&id, CloseOrder::TOKEN_ROTATED);
    tracing::info!(device_id = %id, "device token rotated");
    Ok(Json(json!({"token": token})))
}

/// `GET /v1/devices/{id}/sessions`: connection history, newest first.
#[utoipa::path(get, path = "/devices/{id}/sessions", tag = "devices", params(("id" = String, Path, description = "Device id"), ("limit" = Option<u32>, Query, description = "1 to 1000, default 100"), ("cursor" = Option<String>, Query, description = "next_cursor of the previous page")),
    responses(
        (status = 200, description = "Connection history, newest first", body = super::openapi::SessionPage),
        (status = 400, description = "Invalid query value", body = super::openapi::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = super::openapi::ErrorBody), (status = 404, description = "No such device", body = super::openapi::ErrorBody)))]
pub async fn sessions(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = parse_limit(params.get("limit").map(String::as_str))?;
    let device = find(&state, &id).await?;
    let before = match params.get("cursor") {
        None => None,
        Some(c) => {
            let text = cursor::decode(c).ok_or_else(|| ApiError::bad_request("invalid cursor"))?;
            let (at, sid) = text
                .split_once('|')
                .and_then(|(at, sid)| Some((at.parse::<i64>().ok()?, sid.to_owned())))
                .ok_or_else(|| ApiError::bad_request("invalid cursor"))?;
            Some((at, sid))
        }
    };
    let mut rows = state
        .store
        .list_sessions(
            device.pk,
            before.as_ref().map(|(at, sid)| (*at, sid.as_str())),
            limit + 1,
        )
        .await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last()
            .map(|r| cursor::encode(&format!("{}|{}", r.connected_at, r.session_id)))
    } else {
        None
    };
    let items: Vec<Value> = rows.iter().map(session_json).collect();
    Ok(Json(json!({"items": items, "next_cursor": next_cursor})))
}

fn session_json(r: &SessionRow) -> Value {
    json!({
        "session_id": r.session_id,
        "connected_at": format_ms(r.connected_at),
        "disconnected_at": opt_time(r.disconnected_at),
        "disconnect_reason": r.disconnect_reason,
        "remote_addr": r.remote_addr,
        "auth": r.auth,
    })
}

/// A device as shown, for checking the documented schema.
#[cfg(test)]
pub(crate) fn example_device_json() -> Value {
    let row = DeviceRow {
        pk: 1,
        id: "d".into(),
        name: None,
        metadata: "{}".into(),
        enabled: true,
        created_at: 0,
        last_connected_at: None,
        last_disconnected_at: None,
        last_seen_at: None,
        last_disconnect_reason: None,
    };
    device_value(&row, None)
}

/// A session as shown, for checking the documented schema.
#[cfg(test)]
pub(crate) fn example_session_json() -> Value {
    session_json(&SessionRow {
        session_id: "s".into(),
        connected_at: 0,
        disconnected_at: None,
        disconnect_reason: None,
        remote_addr: "127.0.0.1:1".into(),
        auth: "token".into(),
    })
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;
    use crate::store::sessions::{SessionEnd, SessionStart};
    use crate::store::writer::WriteJob;

    /// A row read before the session's end was committed, shown after the session left
    /// the hub: the device reads offline *with* its disconnect fields, never without.
    #[tokio::test]
    async fn offline_device_always_shows_its_disconnect() {
        let dir = tempfile::tempdir().unwrap();
        let (state, writer) = crate::api::test_state(dir.path()).await;
        let row = state
            .store
            .create_device("d1", None, "{}", &[0; 32], 1_000)
            .await
            .unwrap();
        let (done, recorded) = oneshot::channel();
        let start = SessionStart {
            session_id: "s1".into(),
            device_pk: row.pk,
            connected_at: 2_000,
            remote_addr: "127.0.0.1:9".into(),
            auth: "token",
        };
        writer
            .submit(WriteJob::SessionStart(start, done))
            .await
            .unwrap();
        assert!(recorded.await.unwrap());
        let stale = state.store.get_device("d1").await.unwrap().unwrap();
        assert!(looks_connected(&stale));

        let (done, recorded) = oneshot::channel();
        let end = SessionEnd {
            session_id: "s1".into(),
            device_pk: row.pk,
            disconnected_at: 3_000,
            reason: "disabled",
            last_seen_at: 2_500,
        };
        writer
            .submit(WriteJob::SessionEnd(end, done))
            .await
            .unwrap();
        assert!(recorded.await.unwrap());

        let shown = device_json(&state, &stale).await.unwrap();
        assert_eq!(shown["online"], false);
        assert_eq!(shown["last_disconnect_reason"], "disabled");
        assert_eq!(shown["last_disconnected_at"], format_ms(3_000));
        assert_eq!(shown["last_seen_at"], format_ms(2_500));
    }

    #[test]
    fn device_ids() {
        assert!(valid_device_id("sensor-1"));
        assert!(valid_device_id("a"));
        assert!(valid_device_id("A.b_c:d-9"));
        assert!(valid_device_id(&"x".repeat(128)));
        assert!(!valid_device_id(&"x".repeat(129)));
        assert!(!valid_device_id(""));
        assert!(!valid_device_id("-leading"));
        assert!(!valid_device_id("bad id!"));
        assert!(!valid_device_id("slash/no"));
    }
}
