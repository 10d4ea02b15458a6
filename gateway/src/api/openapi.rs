//! The OpenAPI 3 document of the operator API, served at `/v1/openapi.json`.
//!
//! Paths come from the `#[utoipa::path]` attribute on each handler, collected by
//! the same `OpenApiRouter` calls that register the routes, so a route cannot be
//! served without being documented. The response shapes below are checked
//! against what the handlers really produce by the tests at the end.

use std::sync::Arc;

use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde_json::Value;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// The document, serialized once at start-up.
#[derive(Clone)]
pub struct Document(pub Arc<Value>);

/// The frame every path is added to.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "IoT gateway operator API",
        description = "Manage devices, read their telemetry, send them commands and follow \
                       live events. Every `/v1` route except this document needs \
                       `Authorization: Bearer <api key>`.",
        license(name = "MIT OR Apache-2.0")
    ),
    modifiers(&ApiKeyAuth),
    components(schemas(ErrorBody, Device, NewDevice, DevicePage, Token, Session, SessionPage,
        TelemetryPoint, TelemetryBucket, TelemetryPage, Command, CommandPage, Health)),
    tags(
        (name = "devices", description = "The device registry and presence"),
        (name = "telemetry", description = "Stored telemetry"),
        (name = "commands", description = "Commands sent down the device's socket"),
        (name = "events", description = "Live Server-Sent Events"),
        (name = "operations", description = "Probes, metrics and this document"),
    )
)]
pub struct ApiDoc;

struct ApiKeyAuth;

impl Modify for ApiKeyAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// Marks every `/v1` operation but this document as needing the API key.
pub fn require_key_under_v1(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::SecurityRequirement;
    for (path, item) in doc.paths.paths.iter_mut() {
        if !path.starts_with("/v1/") || path == "/v1/openapi.json" {
            continue;
        }
        for op in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            op.security = Some(vec![SecurityRequirement::new(
                "api_key",
                Vec::<String>::new(),
            )]);
        }
    }
}

/// `GET /v1/openapi.json`: this document (no auth: it holds no secrets).
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3 document", content_type = "application/json"))
)]
pub async fn document(Extension(doc): Extension<Document>) -> impl IntoResponse {
    Json(doc.0.as_ref().clone())
}

/// `{"error": "<code>", "message": "<human text>"}`.
#[derive(ToSchema, serde::Serialize)]
pub struct ErrorBody {
    /// A stable code: bad_request, unauthorized, not_found, conflict, too_large, invalid, rate_limited, unavailable.
    error: String,
    message: String,
}

/// A device with its presence.
#[derive(ToSchema, serde::Serialize)]
pub struct Device {
    id: String,
    name: Option<String>,
    #[schema(value_type = Object)]
    metadata: Value,
    enabled: bool,
    /// A socket is open now.
    online: bool,
    created_at: String,
    last_connected_at: Option<String>,
    last_disconnected_at: Option<String>,
    /// Last frame of any kind.
    last_seen_at: Option<String>,
    /// client_closed, connection_lost, idle_timeout, session_replaced, disabled, token_rotated, protocol_error or server_shutdown.
    last_disconnect_reason: Option<String>,
}

/// A device just created: the device and its token, shown only this once.
#[derive(ToSchema, serde::Serialize)]
pub struct NewDevice {
    #[schema(inline)]
    #[serde(flatten)]
    device: Device,
    token: String,
}

/// A page of devices.
#[derive(ToSchema, serde::Serialize)]
pub struct DevicePage {
    items: Vec<Device>,
    next_cursor: Option<String>,
}

/// A new device token.
#[derive(ToSchema, serde::Serialize)]
pub struct Token {
    token: String,
}

/// One connection of a device.
#[derive(ToSchema, serde::Serialize)]
pub struct Session {
    session_id: String,
    connected_at: String,
    disconnected_at: Option<String>,
    disconnect_reason: Option<String>,
    remote_addr: String,
    /// token or certificate.
    auth: String,
}

/// A page of sessions, newest first.
#[derive(ToSchema, serde::Serialize)]
pub struct SessionPage {
    items: Vec<Session>,
    next_cursor: Option<String>,
}

/// One stored telemetry point.
#[derive(ToSchema, serde::Serialize)]
pub struct TelemetryPoint {
    /// The message id the device chose.
    id: String,
    /// The point's index within its message.
    seq: i64,
    ts: String,
    received_at: String,
    #[schema(value_type = Object)]
    data: Value,
}

/// One interval of an aggregate query: `{"temp": {"avg": 21.4}}`.
#[derive(ToSchema, serde::Serialize)]
pub struct TelemetryBucket {
    /// Start of the interval.
    ts: String,
    #[schema(value_type = Object)]
    values: Value,
}

/// A page of telemetry: points, or buckets when `interval` is given.
#[derive(ToSchema, serde::Serialize)]
pub struct TelemetryPage {
    #[schema(value_type = Vec<Object>)]
    items: Vec<Value>,
    next_cursor: Option<String>,
}

/// A command and its lifecycle.
#[derive(ToSchema, serde::Serialize)]
pub struct Command {
    id: String,
    device_id: String,
    name: String,
    #[schema(value_type = Object)]
    params: Value,
    /// queued, sent, delivered, succeeded, failed, rejected, expired, timed_out or canceled.
    status: String,
    created_at: String,
    sent_at: Option<String>,
    delivered_at: Option<String>,
    completed_at: Option<String>,
    expires_at: String,
    timeout_s: i64,
    #[schema(value_type = Option<Object>)]
    result: Option<Value>,
    error: Option<String>,
    idempotency_key: Option<String>,
}

/// A page of commands.
#[derive(ToSchema, serde::Serialize)]
pub struct CommandPage {
    items: Vec<Command>,
    next_cursor: Option<String>,
}

/// `/healthz` and `/readyz`.
#[derive(ToSchema, serde::Serialize)]
pub struct Health {
    /// ok or ready.
    status: String,
    /// Only on `/readyz`.
    online_devices: Option<u64>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::api::router_and_document;

    const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

    /// Every documented path and method is served (never the fallback), and every
    /// other method on those paths is refused with 405.
    #[tokio::test]
    async fn every_route_is_documented_and_served() {
        let dir = tempfile::tempdir().unwrap();
        let (router, doc) = router_and_document(crate::api::test_state(dir.path()).await.0);
        let doc = serde_json::to_value(&doc).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().unwrap();
        let documented: BTreeSet<String> = paths.keys().cloned().collect();
        for expected in [
            "/healthz",
            "/readyz",
            "/metrics",
            "/v1/openapi.json",
            "/v1/devices",
            "/v1/devices/{id}",
            "/v1/devices/{id}/token",
            "/v1/devices/{id}/sessions",
            "/v1/devices/{id}/telemetry",
            "/v1/devices/{id}/telemetry/latest",
            "/v1/devices/{id}/commands",
            "/v1/commands/{command_id}",
            "/v1/commands/{command_id}/cancel",
            "/v1/events",
        ] {
            assert!(
                documented.contains(expected),
                "{expected} is not documented"
            );
        }
        for (path, item) in paths {
            let uri = path.replace("{id}", "nope").replace("{command_id}", "nope");
            for method in METHODS {
                let request = Request::builder()
                    .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
                    .uri(&uri)
                    .header("authorization", "Bearer k")
                    .body(Body::from("{}"))
                    .unwrap();
                let response = router.clone().oneshot(request).await.unwrap();
                let status = response.status();
                // Only a 404 can be the fallback (and the event stream never ends).
                let fallback = status == StatusCode::NOT_FOUND
                    && String::from_utf8_lossy(
                        &axum::body::to_bytes(response.into_body(), 1 << 20)
                            .await
                            .unwrap(),
                    )
                    .contains("no such route");
                if item.get(method).is_some() {
                    assert!(
                        status != StatusCode::METHOD_NOT_ALLOWED && !fallback,
                        "{method} {path} is documented but not served ({status})"
                    );
                } else {
                    assert_eq!(
                        status,
                        StatusCode::METHOD_NOT_ALLOWED,
                        "{method} {path} is served but not documented"
                    );
                }
            }
        }
    }

    /// Routes can only be added through `OpenApiRouter::routes`, which documents them.
    /// The one exception is the web console (`console.rs`): pages, not API, and only at `/`
    /// and under `/console/`.
    #[test]
    fn no_route_bypasses_the_document() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("OpenApiRouter::new()", "");
            if path.ends_with("console.rs") {
                for route in text.split(".route(\"").skip(1) {
                    let route = route.split('"').next().unwrap();
                    assert!(
                        route == "/" || route.starts_with("/console/"),
                        "the console serves {route}, outside / and /console/"
                    );
                }
                continue;
            }
            for bypass in [
                ".route(",
                ".route_service(",
                ".nest_service(",
                "Router::new()",
            ] {
                assert!(
                    !text.contains(bypass) || path.ends_with("openapi.rs"),
                    "{} registers a route with `{bypass}`, outside the OpenAPI document",
                    path.display()
                );
            }
        }
    }

    fn properties(doc: &Value, schema: &str) -> BTreeSet<String> {
        let s = &doc["components"]["schemas"][schema];
        let mut keys: BTreeSet<String> = s["properties"]
            .as_object()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        for part in s["allOf"].as_array().into_iter().flatten() {
            keys.extend(
                part["properties"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k.clone()),
            );
        }
        keys
    }

    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    /// The documented shapes are the ones the handlers produce.
    #[test]
    fn schemas_match_what_the_handlers_return() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let row = crate::store::commands::CommandRow {
            id: "c-1".into(),
            device_pk: 1,
            device_id: "d".into(),
            name: "ping".into(),
            params: "{}".into(),
            status: crate::store::commands::Status::Queued,
            created_at: 0,
            sent_at: None,
            delivered_at: None,
            completed_at: None,
            expires_at: 0,
            timeout_s: 30,
            result: None,
            error: None,
            idempotency_key: None,
        };
        assert_eq!(
            properties(&doc, "Command"),
            keys(&crate::commands::command_json(&row))
        );
        assert_eq!(
            properties(&doc, "Device"),
            keys(&crate::api::devices::example_device_json())
        );
        assert_eq!(
            properties(&doc, "Session"),
            keys(&crate::api::devices::example_session_json())
        );
        assert_eq!(
            properties(&doc, "TelemetryPoint"),
            keys(&crate::api::telemetry::example_point_json())
        );
    }
}
