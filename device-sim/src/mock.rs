//! A stand-in gateway for tests: just enough of the device protocol, over real sockets
//! (plain or TLS), to exercise the simulator's connection and session code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::tokens::Secret;

/// The one token the mock accepts.
pub const TOKEN: &str = "good-token";

/// What the mock does on each connection.
#[derive(Clone, Default)]
pub struct Script {
    /// Commands sent right after the welcome.
    pub commands: Vec<Value>,
    /// Close with this code right after the welcome.
    pub close_with: Option<u16>,
    /// Answer every n-th telemetry message with an `error` instead of an ack.
    pub error_every: Option<u64>,
    /// Ping right after the welcome.
    pub ping: bool,
    /// Refuse the first n handshakes with `503` and `Retry-After: retry_after_s`.
    pub refuse_first: usize,
    pub retry_after_s: u64,
    /// On the first connection only: ack this many telemetry messages, leave the next three
    /// unanswered, then drop the connection without a close frame.
    pub first_session_acks: Option<usize>,
    /// The code of the scripted `error` answers (default `internal`).
    pub error_code: Option<&'static str>,
}

/// What the mock saw.
#[derive(Default)]
pub struct Seen {
    pub handshakes: AtomicUsize,
    /// When each connection was accepted.
    pub accepted_at: Mutex<Vec<std::time::Instant>>,
    pub pongs: AtomicUsize,
    pub messages: Mutex<Vec<Value>>,
    /// Close codes the devices sent.
    pub closes: Mutex<Vec<u16>>,
}

impl Seen {
    /// The messages received so far whose `type` is `kind`.
    pub fn of_type(&self, kind: &str) -> Vec<Value> {
        let messages = self.messages.lock().unwrap();
        messages
            .iter()
            .filter(|m| m["type"] == kind)
            .cloned()
            .collect()
    }
}

/// A running mock gateway.
pub struct Mock {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    accepting: tokio::task::AbortHandle,
}

impl Mock {
    /// Starts a mock on a free loopback port; with `tls`, connections are TLS.
    pub async fn start(script: Script, tls: Option<TlsAcceptor>) -> Mock {
        Mock::start_at("127.0.0.1:0".parse().unwrap(), script, tls).await
    }

    /// Starts a mock (plain TCP) that closes every session with `code` right after the
    /// welcome.
    pub async fn closing_with(code: u16) -> Mock {
        let script = Script {
            close_with: Some(code),
            ..Script::default()
        };
        Mock::start(script, None).await
    }

    /// Starts a mock listening on `addr` (a port another mock used before, say).
    pub async fn start_at(addr: SocketAddr, script: Script, tls: Option<TlsAcceptor>) -> Mock {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let mock_seen = seen.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (script, seen, tls) = (script.clone(), seen.clone(), tls.clone());
                tokio::spawn(async move {
                    let connection = seen.handshakes.fetch_add(1, SeqCst) + 1;
                    seen.accepted_at
                        .lock()
                        .unwrap()
                        .push(std::time::Instant::now());
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve(stream, script, seen, connection).await;
                            }
                        }
                        None => serve(tcp, script, seen, connection).await,
                    }
                });
            }
        });
        Mock {
            addr,
            seen: mock_seen,
            accepting: accepting.abort_handle(),
        }
    }

    /// Closes the listener: connections are refused from now on, as by a gateway that has
    /// exited (the sessions already open go on).
    pub fn stop_listening(&self) {
        self.accepting.abort();
    }

    /// The device URL of this mock.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}/v1/connect", self.addr)
    }
}

/// The token as the simulator holds it.
pub fn token() -> Secret {
    Secret::from(TOKEN.to_string())
}

// The signature is tungstenite's handshake callback, large error variant and all.
#[allow(clippy::result_large_err)]
fn check_upgrade(
    request: &Request,
    mut response: Response,
    retry_after: Option<u64>,
) -> Result<Response, ErrorResponse> {
    if let Some(seconds) = retry_after {
        let mut refusal = ErrorResponse::new(Some(
            r#"{"error":"unavailable","message":"scripted"}"#.into(),
        ));
        *refusal.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        refusal
            .headers_mut()
            .insert("retry-after", HeaderValue::from(seconds));
        return Err(refusal);
    }
    let expected = format!("Bearer {TOKEN}");
    if request.headers().get("authorization").map(|v| v.as_bytes()) != Some(expected.as_bytes()) {
        let mut refusal = ErrorResponse::new(Some(
            r#"{"error":"unauthorized","message":"bad token"}"#.into(),
        ));
        *refusal.status_mut() = StatusCode::UNAUTHORIZED;
        return Err(refusal);
    }
    let offered = request
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if offered.split(',').any(|p| p.trim() == "iot-gateway.v1") {
        response.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("iot-gateway.v1"),
        );
    }
    Ok(response)
}

async fn serve<S>(stream: S, script: Script, seen: Arc<Seen>, connection: usize)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let refuse = (connection <= script.refuse_first).then_some(script.retry_after_s);
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response| check_upgrade(request, response, refuse);
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
        return;
    };
    // On the first connection, with `first_session_acks`: how many more to ack, to ignore.
    let mut acks_left = script.first_session_acks.filter(|_| connection == 1);
    let mut ignore_left = 3;
    let welcome = json!({"type":"welcome","device_id":"mock","session_id":"s-1",
        "server_time":"2026-11-25T10:00:00.000Z","limits":{"max_message_bytes":65536,"telemetry_per_sec":100}});
    if ws.send(Message::text(welcome.to_string())).await.is_err() {
        return;
    }
    if let Some(code) = script.close_with {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "scripted".into(),
        };
        // Then drop the connection at once, without waiting for the device's reply (and,
        // over TLS, without a close_notify), as a gateway in a hurry may.
        let _ = ws.send(Message::Close(Some(frame))).await;
        return;
    }
    for command in &script.commands {
        let _ = ws.send(Message::text(command.to_string())).await;
    }
    if script.ping {
        let _ = ws
            .send(Message::Ping(b"are you there".to_vec().into()))
            .await;
    }
    let mut telemetry = 0u64;
    while let Some(Ok(frame)) = ws.next().await {
        let text = match frame {
            Message::Text(text) => text,
            Message::Pong(_) => {
                seen.pongs.fetch_add(1, SeqCst);
                continue;
            }
            Message::Close(frame) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                seen.closes.lock().unwrap().push(code);
                continue;
            }
            _ => continue,
        };
        let Ok(message) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let id = message["id"].clone();
        let reply = match message["type"].as_str() {
            Some("telemetry") if acks_left == Some(0) => {
                seen.messages.lock().unwrap().push(message);
                ignore_left -= 1;
                if ignore_left == 0 {
                    // Dropped without a close frame.
                    return;
                }
                continue;
            }
            Some("telemetry") => {
                telemetry += 1;
                if let Some(left) = &mut acks_left {
                    *left -= 1;
                }
                let code = script.error_code.unwrap_or("internal");
                match script.error_every {
                    Some(n) if telemetry % n == 0 => {
                        Some(json!({"type":"error","id":id,"code":code,"message":"scripted"}))
                    }
                    _ => Some(json!({"type":"ack","id":id})),
                }
            }
            Some("command_result") => Some(json!({"type":"ack","id":id})),
            _ => None,
        };
        seen.messages.lock().unwrap().push(message);
        if let Some(reply) = reply {
            if ws.send(Message::text(reply.to_string())).await.is_err() {
                return;
            }
        }
    }
}

/// A CA and a server certificate for 127.0.0.1; returns the acceptor and the CA's PEM file.
pub fn tls_pair(dir: &Path) -> (TlsAcceptor, PathBuf) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();

    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![server_cert.der().clone()], key)
        .unwrap();

    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    (TlsAcceptor::from(Arc::new(config)), ca_pem)
}

/// Common options for a fleet of `devices` that all hold the mock's token.
pub fn fleet(dir: &Path, url: String, devices: usize) -> crate::cli::Common {
    let tokens = dir.join("tokens.json");
    let map = crate::tokens::device_ids("sim", devices)
        .unwrap()
        .into_iter()
        .map(|id| (id, TOKEN.to_string()))
        .collect();
    crate::tokens::save(&tokens, &map).unwrap();
    crate::cli::Common {
        url,
        ca: dir.join("ca.pem"),
        api_url: "http://127.0.0.1:9/v1".into(),
        api_key: None,
        tokens,
        provision: false,
        prefix: "sim".into(),
        connect_concurrency: 8,
        source_ips: crate::conn::SourceIps::Auto,
        client_certs: None,
    }
}
