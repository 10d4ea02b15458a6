//! `/v1/devices/{id}/telemetry`: range queries with cursors, key filters, aggregates, latest.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::Json;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::{cursor, parse_limit, ApiError, ApiState};
use crate::config::parse_duration;
use crate::store::telemetry::{Agg, AggQuery, AggRow, Position, RangeQuery, TelemetryRow};
use crate::time::{format_ms, parse_time_param};

/// The parsed query string.
struct Params {
    from: i64,
    to: i64,
    limit: u32,
    descending: bool,
    cursor: Option<String>,
    keys: Option<Vec<String>>,
    aggregate: Option<(i64, Agg)>,
}

fn time_param(params: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    params
        .get(name)
        .map(|v| {
            parse_time_param(v).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "{name} must be an RFC 3339 time or epoch milliseconds"
                ))
            })
        })
        .transpose()
}

/// `keys=a,b`: the keys of `data` to keep.
fn parse_keys(params: &HashMap<String, String>) -> Option<Vec<String>> {
    params.get("keys").map(|k| {
        k.split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

fn parse_params(params: &HashMap<String, String>) -> Result<Params, ApiError> {
    let descending = match params.get("order").map(String::as_str) {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(_) => return Err(ApiError::bad_request("order must be asc or desc")),
    };
    let keys = parse_keys(params);
    let agg = params
        .get("agg")
        .map(|a| {
            Agg::parse(a).ok_or_else(|| {
                ApiError::bad_request("agg must be one of avg, min, max, sum, count, last")
            })
        })
        .transpose()?;
    let aggregate = match (params.get("interval"), agg) {
        (None, None) => None,
        (None, Some(_)) => return Err(ApiError::bad_request("agg needs an interval")),
        (Some(iv), agg) => {
            let ms = parse_duration(iv)
                .ok()
                .map(|d| d.as_millis())
                .filter(|ms| *ms >= 1 && *ms <= i64::MAX as u128)
                .ok_or_else(|| {
                    ApiError::bad_request("interval must be a duration such as 60s, 5m or 1h")
                })?;
            Some((ms as i64, agg.unwrap_or(Agg::Avg)))
        }
    };
    Ok(Params {
        from: time_param(params, "from")?.unwrap_or(0),
        to: time_param(params, "to")?.unwrap_or(i64::MAX),
        limit: parse_limit(params.get("limit").map(String::as_str))?,
        descending,
        cursor: params.get("cursor").cloned(),
        keys,
        aggregate,
    })
}

/// Keeps only the requested keys of a stored `data` object.
fn data_value(data: &str, keys: Option<&[String]>) -> Value {
    match keys {
        None => RawValue::from_string(data.to_owned())
            .ok()
            .and_then(|raw| serde_json::to_value(raw).ok())
            .unwrap_or(Value::Null),
        Some(keys) => {
            let mut map: Map<String, Value> = serde_json::from_str(data).unwrap_or_default();
            map.retain(|k, _| keys.iter().any(|want| want == k));
            Value::Object(map)
        }
    }
}

fn item(row: &TelemetryRow, keys: Option<&[String]>) -> Value {
    json!({
        "id": row.msg_id,
        "seq": row.seq,
        "ts": format_ms(row.ts),
        "received_at": format_ms(row.received_at),
        "data": data_value(&row.data, keys),
    })
}

/// A point as shown, for checking the documented schema.
#[cfg(test)]
pub(crate) fn example_point_json() -> Value {
    item(
        &TelemetryRow {
            rowid: 1,
            msg_id: "m".into(),
            seq: 0,
            ts: 0,
            received_at: 0,
            data: "{}".into(),
        },
        None,
    )
}

fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

async fn device_pk(state: &ApiState, id: &str) -> Result<i64, ApiError> {
    Ok(state
        .store
        .get_device(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device `{id}`")))?
        .pk)
}

/// `GET /v1/devices/{id}/telemetry?from=&to=&limit=&order=&cursor=&keys=&interval=&agg=`.
#[utoipa::path(get, path = "/devices/{id}/telemetry", tag = "telemetry",
    params(("id" = String, Path, description = "Device id"),
        ("from" = Option<String>, Query, description = "Inclusive lower bound of ts: RFC 3339 or epoch ms"),
        ("to" = Option<String>, Query, description = "Exclusive upper bound of ts: RFC 3339 or epoch ms"),
        ("order" = Option<String>, Query, description = "asc or desc (default)"),
        ("keys" = Option<String>, Query, description = "Comma-separated keys of data to keep"),
        ("interval" = Option<String>, Query, description = "Aggregate into intervals such as 60s, 5m, 1h"),
        ("agg" = Option<String>, Query, description = "avg (default), min, max, sum, count or last"),
        ("limit" = Option<u32>, Query, description = "1 to 1000, default 100"), ("cursor" = Option<String>, Query, description = "next_cursor of the previous page")),
    responses(
        (status = 200, description = "Points ({id, seq, ts, received_at, data}), or buckets ({ts, values}) with interval", body = super::openapi::TelemetryPage),
        (status = 400, description = "Invalid query value", body = super::openapi::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = super::openapi::ErrorBody), (status = 404, description = "No such device", body = super::openapi::ErrorBody)))]
pub async fn query(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let p = parse_params(&raw)?;
    let pk = device_pk(&state, &id).await?;
    match p.aggregate {
        None => points(&state, pk, &p).await,
        Some((interval_ms, agg)) => aggregates(&state, pk, &p, interval_ms, agg).await,
    }
}

async fn points(state: &ApiState, pk: i64, p: &Params) -> Result<Json<Value>, ApiError> {
    let bad = || ApiError::bad_request("invalid cursor");
    let order = if p.descending { "d" } else { "a" };
    let after = match &p.cursor {
        None => None,
        Some(c) => {
            let text = cursor::decode(c).ok_or_else(bad)?;
            let mut parts = text.split(':');
            let (o, ts, rowid) = (parts.next(), parts.next(), parts.next());
            if o != Some(order) || parts.next().is_some() {
                return Err(bad());
            }
            Some(Position {
                ts: ts.and_then(|t| t.parse().ok()).ok_or_else(bad)?,
                rowid: rowid.and_then(|r| r.parse().ok()).ok_or_else(bad)?,
            })
        }
    };
    let mut rows = state
        .store
        .query_telemetry(&RangeQuery {
            device_pk: pk,
            from: p.from,
            to: p.to,
            descending: p.descending,
            after,
            limit: p.limit + 1,
        })
        .await?;
    let next_cursor = if rows.len() > p.limit as usize {
        rows.truncate(p.limit as usize);
        rows.last()
            .map(|r| cursor::encode(&format!("{order}:{}:{}", r.ts, r.rowid)))
    } else {
        None
    };
    let items: Vec<Value> = rows.iter().map(|r| item(r, p.keys.as_deref())).collect();
    Ok(Json(json!({"items": items, "next_cursor": next_cursor})))
}

async fn aggregates(
    state: &ApiState,
    pk: i64,
    p: &Params,
    interval_ms: i64,
    agg: Agg,
) -> Result<Json<Value>, ApiError> {
    let (mut from, mut to) = (p.from, p.to);
    if let Some(c) = &p.cursor {
        // The cursor is the last bucket returned; the next page starts beyond it.
        let bucket = cursor::decode(c)
            .and_then(|t| t.strip_prefix('b').and_then(|b| b.parse::<i64>().ok()))
            .ok_or_else(|| ApiError::bad_request("invalid cursor"))?;
        if p.descending {
            to = to.min(bucket);
        } else {
            from = from.max(bucket.saturating_add(interval_ms));
        }
    }
    let rows = state
        .store
        .aggregate_telemetry(&AggQuery {
            device_pk: pk,
            from,
            to,
            interval_ms,
            agg,
            descending: p.descending,
            limit: p.limit + 1,
            keys: p.keys.clone(),
        })
        .await?;
    let mut buckets: Vec<(i64, BTreeMap<String, Value>)> = Vec::new();
    for AggRow { bucket, key, value } in rows {
        if buckets.last().map(|b| b.0) != Some(bucket) {
            buckets.push((bucket, BTreeMap::new()));
        }
        let values = &mut buckets.last_mut().expect("just pushed").1;
        values.insert(key, json!({ agg.name(): number(value) }));
    }
    let next_cursor = if buckets.len() > p.limit as usize {
        buckets.truncate(p.limit as usize);
        buckets.last().map(|b| cursor::encode(&format!("b{}", b.0)))
    } else {
        None
    };
    let items: Vec<Value> = buckets
        .into_iter()
        .map(|(ts, values)| json!({"ts": format_ms(ts), "values": values}))
        .collect();
    Ok(Json(json!({"items": items, "next_cursor": next_cursor})))
}

/// `GET /v1/devices/{id}/telemetry/latest`: the newest point, `404` if none.
#[utoipa::path(get, path = "/devices/{id}/telemetry/latest", tag = "telemetry",
    params(("id" = String, Path, description = "Device id"), ("keys" = Option<String>, Query, description = "Comma-separated keys of data to keep")),
    responses(
        (status = 200, description = "The point with the newest ts", body = super::openapi::TelemetryPoint),
        (status = 401, description = "Missing or wrong API key", body = super::openapi::ErrorBody),
        (status = 404, description = "No such device, or no telemetry yet", body = super::openapi::ErrorBody)))]
pub async fn latest(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let keys = parse_keys(&raw);
    let pk = device_pk(&state, &id).await?;
    let row = state
        .store
        .latest_telemetry(pk)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device `{id}` has no telemetry")))?;
    Ok(Json(item(&row, keys.as_deref())))
}
