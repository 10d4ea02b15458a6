//! The operator API, as far as the simulator needs it: create devices and rotate tokens (many
//! requests at a time), and plain JSON calls for the command benchmark.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, Result};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde::Deserialize;

use crate::backoff::Backoff;
use crate::tokens::Secret;

/// Requests in flight at once while provisioning.
pub const CONCURRENCY: usize = 32;

const ATTEMPTS: u32 = 6;

/// A client of the operator API.
pub struct Api {
    client: reqwest::Client,
    base: String,
    key: Secret,
}

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("HTTP {status} {code}: {message}")]
    Status {
        status: u16,
        code: String,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("request failed: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("unexpected response: {0}")]
    BadBody(String),
}

impl ApiError {
    fn is_transient(&self) -> bool {
        match self {
            ApiError::Status { status, .. } => matches!(status, 429 | 500..=599),
            ApiError::Transport(e) => e.is_connect() || e.is_timeout(),
            ApiError::BadBody(_) => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct TokenBody {
    token: String,
}

/// One page of `GET /v1/devices`, as far as ids go.
#[derive(Deserialize)]
struct DevicesPage {
    items: Vec<DeviceItem>,
    next_cursor: Option<String>,
}

#[derive(Deserialize)]
struct DeviceItem {
    id: String,
}

#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    message: String,
}

/// What creating a device gave.
enum Created {
    Token(String),
    AlreadyExists,
}

impl Api {
    /// A client for the API at `base` (e.g. `http://127.0.0.1:8080/v1`), for provisioning.
    pub fn new(base: &str, key: Secret) -> Result<Api> {
        Api::with_limits(base, key, Duration::from_secs(15), CONCURRENCY)
    }

    /// A client whose requests time out after `timeout` and which keeps up to `connections`
    /// idle connections (as many as requests run at once, so none is reopened).
    pub fn with_limits(
        base: &str,
        key: Secret,
        timeout: Duration,
        connections: usize,
    ) -> Result<Api> {
        if !base.starts_with("http://") {
            bail!("--api-url `{base}` must be http:// (device-sim talks plain HTTP to the loopback operator API)");
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(connections)
            .tcp_nodelay(true)
            .build()?;
        Ok(Api {
            client,
            base: base.trim_end_matches('/').to_owned(),
            key,
        })
    }

    /// `GET {base}{path}`: the status and the JSON body (`null` when the body is not JSON).
    pub async fn get(&self, path: &str) -> Result<(u16, serde_json::Value), ApiError> {
        let request = self.client.get(format!("{}{path}", self.base));
        self.call(request).await
    }

    /// The server's Prometheus text at `/metrics`, beside the API's `/v1` (no auth).
    pub async fn metrics_text(&self) -> Result<String, ApiError> {
        let root = self.base.strip_suffix("/v1").unwrap_or(&self.base);
        let response = self.client.get(format!("{root}/metrics")).send().await?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(ApiError::BadBody(format!("/metrics answered {status}")));
        }
        Ok(response.text().await?)
    }

    /// `POST {base}{path}` with a JSON body: the status and the JSON body.
    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value), ApiError> {
        let request = self.client.post(format!("{}{path}", self.base)).json(body);
        self.call(request).await
    }

    async fn call(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, serde_json::Value), ApiError> {
        let response = request.bearer_auth(self.key.expose()).send().await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok((status, body))
    }

    async fn devices_page(&self, cursor: Option<&str>) -> Result<DevicesPage, ApiError> {
        let mut request = self
            .client
            .get(format!("{}/devices", self.base))
            .query(&[("limit", "1000")]);
        if let Some(cursor) = cursor {
            request = request.query(&[("cursor", cursor)]);
        }
        let response = request.bearer_auth(self.key.expose()).send().await?;
        if response.status() != StatusCode::OK {
            return Err(status_error(response).await);
        }
        let status = response.status();
        response
            .json()
            .await
            .map_err(|e| ApiError::BadBody(format!("HTTP {status} without a device list ({e})")))
    }

    async fn create_device(&self, id: &str) -> Result<Created, ApiError> {
        let body = serde_json::json!({"id": id, "name": id, "metadata": {"simulated": true}});
        let response = self
            .client
            .post(format!("{}/devices", self.base))
            .bearer_auth(self.key.expose())
            .json(&body)
            .send()
            .await?;
        match response.status() {
            StatusCode::CREATED | StatusCode::OK => Ok(Created::Token(token_of(response).await?)),
            StatusCode::CONFLICT => Ok(Created::AlreadyExists),
            _ => Err(status_error(response).await),
        }
    }

    async fn rotate_token(&self, id: &str) -> Result<String, ApiError> {
        let response = self
            .client
            .post(format!("{}/devices/{id}/token", self.base))
            .bearer_auth(self.key.expose())
            .send()
            .await?;
        match response.status() {
            StatusCode::OK | StatusCode::CREATED => token_of(response).await,
            _ => Err(status_error(response).await),
        }
    }
}

async fn token_of(response: reqwest::Response) -> Result<String, ApiError> {
    let status = response.status();
    let body: TokenBody = response
        .json()
        .await
        .map_err(|e| ApiError::BadBody(format!("HTTP {status} without a token ({e})")))?;
    if body.token.is_empty() {
        return Err(ApiError::BadBody(format!(
            "HTTP {status} with an empty token"
        )));
    }
    Ok(body.token)
}

async fn status_error(response: reqwest::Response) -> ApiError {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .map(Duration::from_secs);
    let body: ErrorBody = response.json().await.unwrap_or_default();
    ApiError::Status {
        status,
        code: body.error,
        message: body.message,
        retry_after,
    }
}

/// Calls `call` until it succeeds, fails for good, or runs out of attempts.
async fn with_retries<T, F, Fut>(mut call: F) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                let jitter = backoff.next_delay(&mut rand::thread_rng());
                tokio::time::sleep(e.retry_after().unwrap_or(jitter)).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// The ids of every device the gateway has, following `next_cursor` to the last page.
pub async fn existing_ids(api: &Api) -> Result<HashSet<String>, ApiError> {
    let mut ids = HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = with_retries(|| api.devices_page(cursor.as_deref())).await?;
        ids.extend(page.items.into_iter().map(|device| device.id));
        match page.next_cursor {
            Some(next) if cursor.as_ref() != Some(&next) => cursor = Some(next),
            _ => return Ok(ids),
        }
    }
}

/// The outcome of provisioning a set of devices.
#[derive(Debug, Default)]
pub struct Provisioned {
    /// New tokens, by device id.
    pub tokens: Vec<(String, String)>,
    /// Devices created.
    pub created: usize,
    /// Devices that already existed and got a new token.
    pub rotated: usize,
    /// Devices that could not be provisioned, with why.
    pub failures: Vec<(String, ApiError)>,
}

/// Creates each device (or, when it exists already, rotates its token), `CONCURRENCY` at a time.
pub async fn provision(api: &Api, ids: &[&str]) -> Provisioned {
    let results: Vec<_> = futures_util::stream::iter(ids)
        .map(|id| async move { (*id, provision_one(api, id).await) })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut outcome = Provisioned::default();
    for (id, result) in results {
        match result {
            Ok((token, rotated)) => {
                if rotated {
                    outcome.rotated += 1;
                } else {
                    outcome.created += 1;
                }
                outcome.tokens.push((id.to_owned(), token));
            }
            Err(e) => outcome.failures.push((id.to_owned(), e)),
        }
    }
    outcome
}

async fn provision_one(api: &Api, id: &str) -> Result<(String, bool), ApiError> {
    match with_retries(|| api.create_device(id)).await? {
        Created::Token(token) => Ok((token, false)),
        // Its token is not in our file, so the only way to get one is a new one.
        Created::AlreadyExists => Ok((with_retries(|| api.rotate_token(id)).await?, true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use axum::extract::{Path, Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use axum::{Json, Router};
    use serde_json::{json, Value};

    /// A stand-in for the gateway's device registry: id -> current token.
    #[derive(Clone, Default)]
    struct Registry {
        devices: Arc<Mutex<HashMap<String, String>>>,
        busy_once: Arc<Mutex<bool>>,
    }

    fn authorized(headers: &HeaderMap) -> bool {
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer key-1")
    }

    async fn create(
        State(registry): State<Registry>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> Response {
        if !authorized(&headers) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "unauthorized"})),
            )
                .into_response();
        }
        {
            // One transient refusal, to exercise the retry.
            let mut busy = registry.busy_once.lock().unwrap();
            if *busy {
                *busy = false;
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "0")],
                    Json(json!({"error": "rate_limited"})),
                )
                    .into_response();
            }
        }
        let id = body["id"].as_str().unwrap().to_owned();
        let mut devices = registry.devices.lock().unwrap();
        if devices.contains_key(&id) {
            return (StatusCode::CONFLICT, Json(json!({"error": "conflict"}))).into_response();
        }
        let token = format!("tok-{id}");
        devices.insert(id.clone(), token.clone());
        (StatusCode::CREATED, Json(json!({"id": id, "token": token}))).into_response()
    }

    async fn rotate(
        State(registry): State<Registry>,
        headers: HeaderMap,
        Path(id): Path<String>,
    ) -> Response {
        if !authorized(&headers) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let token = format!("rotated-{id}");
        registry.devices.lock().unwrap().insert(id, token.clone());
        Json(json!({"token": token})).into_response()
    }

    /// Two devices per page, in id order, the cursor being the index of the next one.
    async fn list(
        State(registry): State<Registry>,
        headers: HeaderMap,
        Query(query): Query<HashMap<String, String>>,
    ) -> Response {
        if !authorized(&headers) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        assert_eq!(query.get("limit").map(String::as_str), Some("1000"));
        let mut ids: Vec<String> = registry.devices.lock().unwrap().keys().cloned().collect();
        ids.sort();
        let from: usize = query.get("cursor").map_or(0, |c| c.parse().unwrap());
        let to = (from + 2).min(ids.len());
        let items: Vec<Value> = ids[from..to].iter().map(|id| json!({"id": id})).collect();
        let next = (to < ids.len()).then(|| to.to_string());
        Json(json!({"items": items, "next_cursor": next})).into_response()
    }

    async fn serve(registry: Registry) -> String {
        let app = Router::new()
            .route("/v1/devices", post(create).get(list))
            .route("/v1/devices/{id}/token", post(rotate))
            .with_state(registry);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/v1")
    }

    #[tokio::test]
    async fn creates_new_devices_and_rotates_existing_ones() {
        let registry = Registry::default();
        registry
            .devices
            .lock()
            .unwrap()
            .insert("sim-00002".into(), "lost".into());
        *registry.busy_once.lock().unwrap() = true;
        let api = Api::new(
            &serve(registry.clone()).await,
            Secret::from("key-1".to_string()),
        )
        .unwrap();

        let mut outcome = provision(&api, &["sim-00001", "sim-00002", "sim-00003"]).await;

        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
        assert_eq!((outcome.created, outcome.rotated), (2, 1));
        outcome.tokens.sort();
        assert_eq!(
            outcome.tokens,
            [
                ("sim-00001".to_string(), "tok-sim-00001".to_string()),
                ("sim-00002".to_string(), "rotated-sim-00002".to_string()),
                ("sim-00003".to_string(), "tok-sim-00003".to_string()),
            ]
        );
    }

    #[tokio::test]
    async fn a_wrong_key_fails_without_retrying() {
        let api = Api::new(
            &serve(Registry::default()).await,
            Secret::from("wrong".to_string()),
        )
        .unwrap();
        let outcome = provision(&api, &["sim-00001"]).await;
        assert_eq!(outcome.tokens.len(), 0);
        assert!(matches!(
            outcome.failures[0].1,
            ApiError::Status { status: 401, .. }
        ));
    }

    #[tokio::test]
    async fn existing_ids_follow_the_cursor_to_the_last_page() {
        let registry = Registry::default();
        for n in 1..=5 {
            let id = format!("sim-{n:05}");
            registry.devices.lock().unwrap().insert(id, "t".into());
        }
        let api = Api::new(
            &serve(registry.clone()).await,
            Secret::from("key-1".to_string()),
        )
        .unwrap();
        let ids = existing_ids(&api).await.unwrap();
        assert_eq!(ids.len(), 5, "{ids:?}");
        assert!(ids.contains("sim-00005"));

        let wrong = Api::new(&api.base, Secret::from("wrong".to_string())).unwrap();
        assert!(matches!(
            existing_ids(&wrong).await,
            Err(ApiError::Status { status: 401, .. })
        ));
    }

    #[test]
    fn https_api_urls_are_refused_up_front() {
        assert!(Api::new("https://127.0.0.1:8080/v1", Secret::from("k".to_string())).is_err());
    }
}
