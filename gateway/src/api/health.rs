//! Liveness and readiness probes (no auth).

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::{ApiError, ApiState};

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
