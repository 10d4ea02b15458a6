//! `/v1/devices/{id}/commands` and `/v1/commands/{command_id}`: queue, wait, list, show, cancel.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::devices::{find, no_device};
use super::{cursor, parse_limit, ApiError, ApiState, JsonBody};
use crate::commands::{command_json, CommandRequest};
use crate::store::commands::{Cancel, ListQuery, Queued, Status};

/// Longest `ttl_s`: 30 days.
const MAX_TTL_S: i64 = 30 * 24 * 3600;
/// Longest `timeout_s`: 1 day.
const MAX_TIMEOUT_S: i64 = 24 * 3600;
/// Longest `wait_s`.
const MAX_WAIT_S: f64 = 60.0;
/// Longest command name and idempotency key, in bytes.
const MAX_NAME_BYTES: usize = 128;
const MAX_KEY_BYTES: usize = 256;

/// The body of `POST /v1/devices/{id}/commands`.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct CreateCommand {
    /// Required, 1 to 128 bytes.
    #[serde(default)]
    #[schema(value_type = String)]
    name: Option<String>,
    /// A JSON object, `{}` by default.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    params: Option<Box<RawValue>>,
    /// Seconds to deliver it before it expires: 1 to 2592000, default 3600.
    #[serde(default)]
    ttl_s: Option<i64>,
    /// Seconds from delivery to the result before it times out: 1 to 86400, default 30.
    #[serde(default)]
    timeout_s: Option<i64>,
    /// Seconds (0 to 60) to wait for a final status before answering.
    #[serde(default)]
    wait_s: Option<f64>,
    /// The same key for the same device returns the command created first.
    #[serde(default)]
    idempotency_key: Option<String>,
}

impl CreateCommand {
    /// Checks every field; `422` names the first one that is wrong.
    fn validate(self) -> Result<(CommandRequest, Duration), ApiError> {
        let name = match self.name {
            Some(n) if !n.is_empty() && n.len() <= MAX_NAME_BYTES => n,
            _ => {
                return Err(ApiError::invalid(
                    "name is required: a string of 1 to 128 bytes",
                ))
            }
        };
        let params = match self.params {
            None => "{}".to_owned(),
            Some(raw) if raw.get() == "null" => "{}".to_owned(),
            Some(raw) if raw.get().starts_with('{') => raw.get().to_owned(),
            Some(_) => return Err(ApiError::invalid("params must be a JSON object")),
        };
        let ttl_s = self.ttl_s.unwrap_or(3600);
        if !(1..=MAX_TTL_S).contains(&ttl_s) {
            return Err(ApiError::invalid(
                "ttl_s must be a whole number of seconds from 1 to 2592000",
            ));
        }
        let timeout_s = self.timeout_s.unwrap_or(30);
        if !(1..=MAX_TIMEOUT_S).contains(&timeout_s) {
            return Err(ApiError::invalid(
                "timeout_s must be a whole number of seconds from 1 to 86400",
            ));
        }
        let wait_s = self.wait_s.unwrap_or(0.0);
        if !(0.0..=MAX_WAIT_S).contains(&wait_s) {
            return Err(ApiError::invalid("wait_s must be from 0 to 60"));
        }
        if let Some(k) = &self.idempotency_key {
            if k.is_empty() || k.len() > MAX_KEY_BYTES {
                return Err(ApiError::invalid(
                    "idempotency_key must be a string of 1 to 256 bytes",
                ));
            }
        }
        let request = CommandRequest {
            name,
            params,
            ttl_s,
            timeout_s,
            idempotency_key: self.idempotency_key,
        };
        Ok((request, Duration::from_secs_f64(wait_s)))
    }
}

/// `POST /v1/devices/{id}/commands`: `201` new, `202` when `wait_s` ran out first,
/// `200` for an idempotency-key repeat, `429` when the device's queue is full.
#[utoipa::path(post, path = "/devices/{id}/commands", tag = "commands", params(("id" = String, Path, description = "Device id")), request_body = CreateCommand,
    responses(
        (status = 201, description = "Queued (and final, if it became final within wait_s)", body = super::openapi::Command),
        (status = 200, description = "The command created earlier with the same idempotency_key", body = super::openapi::Command),
        (status = 202, description = "wait_s ran out first: the status so far", body = super::openapi::Command),
        (status = 400, description = "Malformed JSON", body = super::openapi::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = super::openapi::ErrorBody), (status = 404, description = "No such device", body = super::openapi::ErrorBody),
        (status = 422, description = "Invalid field", body = super::openapi::ErrorBody),
        (status = 429, description = "The device's queue of commands that are not final is full", body = super::openapi::ErrorBody)))]
pub async fn create(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<CreateCommand>,
) -> Result<impl IntoResponse, ApiError> {
    let (request, wait) = match body.validate() {
        Ok(valid) => valid,
        // An unknown device is reported before the body's faults, as everywhere else.
        Err(invalid) => {
            find(&state, &id).await?;
            return Err(invalid);
        }
    };
    // The queueing transaction looks the device up itself (no read beforehand).
    let (queued, waited_out) = state.commands.queue_and_wait(&id, request, wait).await?;
    let (row, fresh) = match queued {
        Queued::New(row) => (row, true),
        Queued::Existing(row) => (row, false),
        Queued::QueueFull => {
            return Err(ApiError::rate_limited(
                "the device has too many commands that are not final; retry later",
            ))
        }
        Queued::NoDevice => return Err(no_device(&id)),
    };
    let status = match (fresh, waited_out) {
        (false, _) => StatusCode::OK,
        (true, false) => StatusCode::CREATED,
        (true, true) => StatusCode::ACCEPTED,
    };
    Ok((status, Json(command_json(&row))))
}

/// `GET /v1/devices/{id}/commands?status=&limit=&cursor=&order=`: newest first by default.
#[utoipa::path(get, path = "/devices/{id}/commands", tag = "commands",
    params(("id" = String, Path, description = "Device id"),
        ("status" = Option<String>, Query, description = "Only these statuses, comma-separated"),
        ("order" = Option<String>, Query, description = "desc (newest first, default) or asc"),
        ("limit" = Option<u32>, Query, description = "1 to 1000, default 100"), ("cursor" = Option<String>, Query, description = "next_cursor of the previous page")),
    responses(
        (status = 200, description = "A page of the device's commands", body = super::openapi::CommandPage),
        (status = 400, description = "Invalid query value", body = super::openapi::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = super::openapi::ErrorBody), (status = 404, description = "No such device", body = super::openapi::ErrorBody)))]
pub async fn list(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = parse_limit(params.get("limit").map(String::as_str))?;
    let descending = match params.get("order").map(String::as_str) {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(_) => return Err(ApiError::bad_request("order must be asc or desc")),
    };
    let statuses = match params.get("status").map(String::as_str) {
        None | Some("") => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|s| {
                Status::parse(s.trim()).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "unknown status `{s}`; one of queued, sent, delivered, succeeded, \
                         failed, rejected, expired, timed_out, canceled"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let after = match params.get("cursor") {
        None => None,
        Some(c) => Some(
            cursor::decode(c)
                .and_then(|t| t.parse::<i64>().ok())
                .ok_or_else(|| ApiError::bad_request("invalid cursor"))?,
        ),
    };
    let device = find(&state, &id).await?;
    let mut rows = state
        .store
        .list_commands(&ListQuery {
            device_pk: device.pk,
            statuses,
            descending,
            after,
            limit: limit + 1,
        })
        .await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last()
            .map(|(rowid, _)| cursor::encode(&rowid.to_string()))
    } else {
        None
    };
    let items: Vec<Value> = rows.iter().map(|(_, r)| command_json(r)).collect();
    Ok(Json(json!({"items": items, "next_cursor": next_cursor})))
}

/// `GET /v1/commands/{command_id}`.
#[utoipa::path(get, path = "/commands/{command_id}", tag = "commands", params(("command_id" = String, Path, description = "Command id")),
    responses(
        (status = 200, description = "The command", body = super::openapi::Command),
        (status = 401, description = "Missing or wrong API key", body = super::openapi::ErrorBody),
        (status = 404, description = "No such command", body = super::openapi::ErrorBody)))]
pub async fn show(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match state.store.get_command(&id).await? {
        Some(row) => Ok(Json(command_json(&row))),
        None => Err(ApiError::not_found(format!("no command `{id}`"))),
    }
}

/// `POST /v1/commands/{command_id}/cancel`: `200` canceled, `409` if already final.
#[utoipa::path(post, path = "/commands/{command_id}/cancel", tag = "commands", params(("command_id" = String, Path, description = "Command id")),
    responses(
        (status = 200, description = "Canceled", body = super::openapi::Command),
        (status = 401, description = "Missing or wrong API key", body = super::openapi::ErrorBody),
        (status = 404, description = "No such command", body = super::openapi::ErrorBody),
        (status = 409, description = "Already final", body = super::openapi::ErrorBody)))]
pub async fn cancel(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match state.commands.cancel(&id).await? {
        Cancel::Canceled(row) => {
            tracing::info!(command = %row.id, device_id = %row.device_id, "command canceled");
            Ok(Json(command_json(&row)))
        }
        Cancel::AlreadyFinal(row) => Err(ApiError::conflict(format!(
            "command `{id}` is already {}",
            row.status.as_str()
        ))),
        Cancel::NotFound => Err(ApiError::not_found(format!("no command `{id}`"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> Result<(CommandRequest, Duration), ApiError> {
        serde_json::from_str::<CreateCommand>(json)
            .unwrap()
            .validate()
    }

    #[test]
    fn defaults_and_limits() {
        let (r, wait) = body(r#"{"name":"reboot"}"#).unwrap();
        assert_eq!((r.params.as_str(), r.ttl_s, r.timeout_s), ("{}", 3600, 30));
        assert!(wait.is_zero());
        let (r, wait) =
            body(r#"{"name":"x","params":{"a":1},"wait_s":2.5,"ttl_s":5,"timeout_s":1}"#).unwrap();
        assert_eq!((r.params.as_str(), r.ttl_s), (r#"{"a":1}"#, 5));
        assert_eq!(wait, Duration::from_millis(2500));
        for bad in [
            r#"{}"#,
            r#"{"name":""}"#,
            r#"{"name":"x","params":[1]}"#,
            r#"{"name":"x","wait_s":61}"#,
            r#"{"name":"x","wait_s":-1}"#,
            r#"{"name":"x","ttl_s":0}"#,
            r#"{"name":"x","timeout_s":-5}"#,
            r#"{"name":"x","idempotency_key":""}"#,
        ] {
            assert!(body(bad).is_err(), "{bad}");
        }
    }
}
