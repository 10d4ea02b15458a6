//! A stand-in gateway with commands, for tests of the command benchmark: device sessions known by
//! their token (`tok-{id}`), and the API calls the benchmark makes (`GET /v1/devices` and
//! `/v1/devices/{id}`, `POST /v1/devices/{id}/commands` with `wait_s`) routed to those sessions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode as WsStatus};
use tokio_tungstenite::tungstenite::Message;

use crate::proto;

/// The operator API key the mock accepts.
pub const API_KEY: &str = "key-1";

/// The mock's state, shared by its device sessions and its API.
#[derive(Default)]
pub struct Shared {
    /// Answer every n-th command POST with `500` instead of delivering it.
    pub fail_every: Option<u64>,
    sessions: Mutex<HashMap<String, mpsc::Sender<String>>>,
    waiting: Mutex<HashMap<String, oneshot::Sender<Value>>>,
    outstanding: Mutex<HashMap<String, usize>>,
    /// Command POSTs received.
    pub posts: AtomicU64,
    /// Commands sent to each device.
    pub per_device: Mutex<HashMap<String, u64>>,
    /// The most commands one device had outstanding at once.
    pub max_outstanding: AtomicUsize,
    /// The devices `GET /v1/devices` lists (sessions are accepted for any `tok-{id}` anyway).
    pub registered: Mutex<Vec<String>>,
}

/// A running mock: device endpoint and API.
pub struct CommandMock {
    pub device_url: String,
    pub api_url: String,
    pub shared: Arc<Shared>,
}

impl CommandMock {
    /// Starts both listeners on free loopback ports.
    pub async fn start(fail_every: Option<u64>) -> CommandMock {
        let shared = Arc::new(Shared {
            fail_every,
            ..Shared::default()
        });
        let devices = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let device_url = format!("ws://{}/v1/connect", devices.local_addr().unwrap());
        tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((tcp, _)) = devices.accept().await {
                    tokio::spawn(session(tcp, shared.clone()));
                }
            }
        });
        let app = Router::new()
            .route("/v1/devices", get(list))
            .route("/v1/devices/{id}", get(device))
            .route("/v1/devices/{id}/commands", post(command))
            .with_state(shared.clone());
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_url = format!("http://{}/v1", api.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(api, app).await });
        CommandMock {
            device_url,
            api_url,
            shared,
        }
    }
}

/// The tokens file entries for devices `ids`.
pub fn tokens(ids: &[String]) -> crate::tokens::TokenMap {
    ids.iter()
        .map(|id| (id.clone(), format!("tok-{id}")))
        .collect()
}

async fn session(tcp: TcpStream, shared: Arc<Shared>) {
    let device = Arc::new(Mutex::new(None));
    let seen = device.clone();
    #[allow(clippy::result_large_err)]
    let check =
        move |request: &Request, mut response: WsResponse| -> Result<WsResponse, ErrorResponse> {
            // The device offers the protocol's subprotocol and insists on hearing it back.
            let subprotocol = HeaderValue::from_static(proto::SUBPROTOCOL);
            response
                .headers_mut()
                .insert("sec-websocket-protocol", subprotocol);
            let auth = request
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            match auth.and_then(|v| v.strip_prefix("Bearer tok-")) {
                Some(id) => {
                    *seen.lock().unwrap() = Some(id.to_owned());
                    Ok(response)
                }
                None => {
                    let mut refusal = ErrorResponse::new(None);
                    *refusal.status_mut() = WsStatus::UNAUTHORIZED;
                    Err(refusal)
                }
            }
        };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
        return;
    };
    let Some(id) = device.lock().unwrap().clone() else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let (outgoing, mut queue) = mpsc::channel::<String>(64);
    let welcome = json!({"type":"welcome","device_id":id,"session_id":"s-1",
        "server_time":proto::now_rfc3339(),"limits":{"max_message_bytes":65536,"telemetry_per_sec":100}});
    let _ = outgoing.send(welcome.to_string()).await;
    tokio::spawn(async move {
        while let Some(text) = queue.recv().await {
            if sink.send(Message::text(text)).await.is_err() {
                return;
            }
        }
    });
    shared
        .sessions
        .lock()
        .unwrap()
        .insert(id.clone(), outgoing.clone());
    while let Some(Ok(frame)) = stream.next().await {
        let Message::Text(text) = frame else { continue };
        let Ok(message) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let message_id = message["id"].as_str().unwrap_or_default().to_owned();
        match message["type"].as_str() {
            Some("telemetry") => {
                let _ = outgoing
                    .send(json!({"type":"ack","id":message_id}).to_string())
                    .await;
            }
            Some("command_result") => {
                let _ = outgoing
                    .send(json!({"type":"ack","id":message_id}).to_string())
                    .await;
                if let Some(waiter) = shared.waiting.lock().unwrap().remove(&message_id) {
                    let _ = waiter.send(message);
                }
            }
            _ => {}
        }
    }
    shared.sessions.lock().unwrap().remove(&id);
}

fn authorized(headers: &HeaderMap) -> bool {
    let expected = format!("Bearer {API_KEY}");
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str())
}

async fn list(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let registered = shared.registered.lock().unwrap();
    let items: Vec<Value> = registered.iter().map(|id| json!({"id": id})).collect();
    Json(json!({"items": items, "next_cursor": null})).into_response()
}

async fn device(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let online = shared.sessions.lock().unwrap().contains_key(&id);
    Json(json!({"id": id, "online": online})).into_response()
}

async fn command(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let n = shared.posts.fetch_add(1, SeqCst) + 1;
    if shared.fail_every.is_some_and(|every| n % every == 0) {
        let error = json!({"error": "internal", "message": "scripted"});
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(error)).into_response();
    }
    let session = shared.sessions.lock().unwrap().get(&id).cloned();
    let Some(session) = session else {
        return (StatusCode::ACCEPTED, Json(json!({"status": "queued"}))).into_response();
    };
    let command_id = format!("c-{n}");
    let created_at = proto::now_rfc3339();
    let (waiter, result) = oneshot::channel();
    shared
        .waiting
        .lock()
        .unwrap()
        .insert(command_id.clone(), waiter);
    *shared
        .per_device
        .lock()
        .unwrap()
        .entry(id.clone())
        .or_default() += 1;
    let outstanding = {
        let mut outstanding = shared.outstanding.lock().unwrap();
        let count = outstanding.entry(id.clone()).or_default();
        *count += 1;
        *count
    };
    shared.max_outstanding.fetch_max(outstanding, SeqCst);
    let name = body["name"].clone();
    let message = json!({"type":"command","id":command_id,"name":name,"params":{},"expires_at":"2099-01-01T00:00:00Z"});
    let _ = session.send(message.to_string()).await;
    let wait = Duration::from_secs(body["wait_s"].as_u64().unwrap_or(0));
    let answer = tokio::time::timeout(wait, result).await;
    *shared
        .outstanding
        .lock()
        .unwrap()
        .entry(id.clone())
        .or_default() -= 1;
    match answer {
        Ok(Ok(result)) => {
            let command = json!({"id": command_id, "device_id": id, "name": name,
                "status": result["status"], "result": result["result"], "error": result["error"],
                "created_at": created_at, "completed_at": proto::now_rfc3339()});
            (StatusCode::CREATED, Json(command)).into_response()
        }
        _ => (
            StatusCode::ACCEPTED,
            Json(json!({"id": command_id, "status": "sent"})),
        )
            .into_response(),
    }
}
