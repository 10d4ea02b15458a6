//! The operator HTTP API (axum): `router()`, the error type, auth and body extraction.

mod commands;
pub mod console;
mod devices;
pub use devices::valid_device_id;
mod events;
mod health;
pub mod https;
pub mod key;
pub mod openapi;
mod telemetry;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::commands::Commands;
use crate::events::Events;
use crate::hub::Hub;
use crate::store::writer::Writer;
use crate::store::{Store, StoreError};

/// Largest request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub store: Store,
    /// The batching writer, which creates devices (they share commits with each other).
    pub writer: Writer,
    pub hub: Arc<Hub>,
    pub commands: Arc<Commands>,
    pub events: Arc<Events>,
    pub api_key: Arc<key::ApiKey>,
    pub shutdown: CancellationToken,
    /// The device listener, for the console's browser device page.
    pub device_endpoint: console::DeviceEndpoint,
}

/// An API error: a status and the contract's `{"error","message"}` body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }
    /// 422 `invalid`.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    }
    /// 401 `unauthorized`.
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API key: send Authorization: Bearer <api key>",
        )
    }
    /// 429 `rate_limited`.
    pub fn rate_limited(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
    }
    /// 503 `unavailable`.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        // The details stay in the log.
        tracing::error!(error = %e, "storage error while serving the API");
        ApiError::unavailable("storage unavailable, retry later")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({"error": self.code, "message": self.message}));
        (self.status, body).into_response()
    }
}

/// A JSON body: malformed is `400`, well-formed but wrong is `422`, over 1 MiB is `413`.
/// The content type is not enforced, so `curl -d` works as people expect.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too_large",
                        "request body larger than 1 MiB",
                    )
                } else {
                    ApiError::bad_request("could not read the request body")
                }
            })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => ApiError::invalid(e.to_string()),
                _ => ApiError::bad_request(format!("malformed JSON: {e}")),
            }
        })
    }
}

async fn require_api_key(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    match presented {
        Some(k) if state.api_key.matches(k) => next.run(req).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

/// Times each request to a route under `/v1` into `gateway_api_request_seconds`: from the
/// request's arrival here to its response's head (an event stream's body is not included).
async fn observe(req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let response = next.run(req).await;
    if let Some(route) = route {
        let status = match response.status().as_u16() / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        };
        crate::metrics::METRICS
            .api_request_seconds
            .get_or_create(&crate::metrics::ApiRequest {
                method,
                route,
                status,
            })
            .observe(started.elapsed().as_secs_f64());
    }
    response
}

/// A method as a label value; the API serves only these.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// The whole operator API.
pub fn router(state: ApiState) -> Router {
    router_and_document(state).0
}

/// The operator API and its OpenAPI document, built from the same route list.
pub fn router_and_document(state: ApiState) -> (Router, utoipa::openapi::OpenApi) {
    let protected = OpenApiRouter::new()
        .routes(routes!(devices::create, devices::list))
        .routes(routes!(devices::show, devices::update, devices::remove))
        .routes(routes!(devices::rotate_token))
        .routes(routes!(devices::sessions))
        .routes(routes!(telemetry::query))
        .routes(routes!(telemetry::latest))
        .routes(routes!(commands::create, commands::list))
        .routes(routes!(commands::show))
        .routes(routes!(commands::cancel))
        .routes(routes!(events::stream))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let v1 = OpenApiRouter::new()
        .routes(routes!(openapi::document))
        .merge(protected)
        .route_layer(middleware::from_fn(observe))
        .fallback(not_found);
    let (router, mut doc) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
        .nest("/v1", v1)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state.clone())
        .split_for_parts();
    // The console's pages are not API: served beside it, left out of the document.
    let router = router.merge(console::router(state));
    openapi::require_key_under_v1(&mut doc);
    let document = openapi::Document(Arc::new(
        serde_json::to_value(&doc).expect("the OpenAPI document serializes"),
    ));
    (router.layer(Extension(document)), doc)
}

/// Parses an optional `limit` query value: 1..=1000, default 100.
pub(crate) fn parse_limit(raw: Option<&str>) -> Result<u32, ApiError> {
    match raw {
        None => Ok(100),
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                "limit must be an integer from 1 to 1000",
            )),
        },
    }
}

/// Opaque cursors: base64url text.
pub(crate) mod cursor {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    /// Encodes a cursor.
    pub fn encode(text: &str) -> String {
        URL_SAFE_NO_PAD.encode(text)
    }

    /// Decodes a cursor made by [`encode`].
    pub fn decode(cursor: &str) -> Option<String> {
        String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).ok()?).ok()
    }
}

/// An API state over a fresh database in `dir`, with the writer handle, for unit tests.
#[cfg(test)]
pub(crate) async fn test_state(dir: &std::path::Path) -> (ApiState, crate::store::writer::Writer) {
    let url = format!("sqlite://{}/api.db", dir.display());
    let store = Store::open(
        &url,
        crate::config::Synchronous::Normal,
        crate::store::DEFAULT_WAL_MAX_BYTES,
    )
    .await
    .unwrap();
    let hub = Arc::new(Hub::default());
    let events = Arc::new(Events::new(10, 1));
    let shutdown = CancellationToken::new();
    let (writer, _) = crate::store::writer::Writer::spawn(
        store.clone(),
        crate::store::writer::WriterConfig {
            max_rows: 100,
            max_delay: std::time::Duration::ZERO,
            queue: 16,
            idle_checkpoint: crate::store::writer::IDLE_CHECKPOINT,
        },
        events.clone(),
    );
    let commands = Commands::start(
        store.clone(),
        writer.clone(),
        hub.clone(),
        events.clone(),
        8,
        10,
        shutdown.clone(),
    )
    .await
    .unwrap();
    let state = ApiState {
        store,
        writer: writer.clone(),
        hub,
        commands,
        events,
        api_key: Arc::new(key::ApiKey::new("k")),
        shutdown,
        device_endpoint: console::DeviceEndpoint {
            tls: true,
            addr: "0.0.0.0:8443".parse().unwrap(),
        },
    };
    (state, writer)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    /// `gateway_api_request_seconds_count` for one series, 0 before its first request.
    fn requests(method: &str, route: &str, status: &str) -> u64 {
        let series = format!(
            "gateway_api_request_seconds_count{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} "
        );
        let text = crate::metrics::METRICS.render();
        text.lines()
            .find_map(|line| line.strip_prefix(&series))
            .map_or(0, |n| n.parse().unwrap())
    }

    async fn call(router: &Router, method: Method, uri: &str, key: &str, body: &str) -> StatusCode {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .body(Body::from(body.to_owned()))
            .unwrap();
        router.clone().oneshot(request).await.unwrap().status()
    }

    #[tokio::test]
    async fn api_requests_are_timed_by_route_as_declared_and_status_class() {
        let dir = tempfile::tempdir().unwrap();
        let (state, _writer) = test_state(dir.path()).await;
        let router = router(state);
        let created = requests("POST", "/v1/devices", "2xx");
        let missing = requests("GET", "/v1/devices/{id}", "4xx");
        let refused = requests("GET", "/v1/devices", "4xx");

        let body = r#"{"id":"timed-device-1"}"#;
        assert_eq!(
            call(&router, Method::POST, "/v1/devices", "k", body).await,
            StatusCode::CREATED
        );
        let uri = "/v1/devices/timed-device-2";
        assert_eq!(
            call(&router, Method::GET, uri, "k", "").await,
            StatusCode::NOT_FOUND
        );
        // A wrong key is answered by the route's auth, and timed under the route.
        assert_eq!(
            call(&router, Method::GET, "/v1/devices", "wrong", "").await,
            StatusCode::UNAUTHORIZED
        );
        // No route: not an API request of any route, so no series (ids would make new ones).
        assert_eq!(
            call(&router, Method::GET, "/v1/nope/timed", "k", "").await,
            StatusCode::NOT_FOUND
        );

        // Other tests run in this process too: counts only grow.
        assert!(requests("POST", "/v1/devices", "2xx") > created);
        assert!(requests("GET", "/v1/devices/{id}", "4xx") > missing);
        assert!(requests("GET", "/v1/devices", "4xx") > refused);
        let text = crate::metrics::METRICS.render();
        assert!(!text.contains("timed-device"), "an id made a series");
        assert!(!text.contains("/v1/nope"), "an unrouted path made a series");
        assert!(
            text.contains("# TYPE gateway_api_request_seconds histogram"),
            "{text}"
        );
    }
}
