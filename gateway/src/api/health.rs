//! Liveness and readiness probes (no auth).

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::{ApiError, ApiState};

/// `GET /metrics`: Prometheus text format, no auth.
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
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: the database answers and the gateway is not shutting down.
pub async fn readyz(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::unavailable("shutting down"));
    }
    state.store.ping().await?;
    Ok(Json(
        json!({"status": "ready", "online_devices": state.hub.online_count()}),
    ))
}
