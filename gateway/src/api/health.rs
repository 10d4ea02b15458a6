//! Liveness and readiness probes (no auth).

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::{ApiError, ApiState};

/// `GET /metrics`: Prometheus text format, no auth.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::METRICS.render(),
    )
}

/// `GET /healthz`: the process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is up", body = super::openapi::Health)))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: the database answers and takes writes, and the gateway is not shutting down.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "The database answers", body = super::openapi::Health),
        (status = 503, description = "Shutting down, or the database does not answer or cannot be written", body = super::openapi::ErrorBody)))]
pub async fn readyz(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::unavailable("shutting down"));
    }
    state.store.ping().await?;
    if state.commands.storage_failing() {
        return Err(ApiError::unavailable(
            "the database cannot be written (disk full or I/O error?): nothing is acked until it can",
        ));
    }
    Ok(Json(
        json!({"status": "ready", "online_devices": state.hub.online_count()}),
    ))
}
