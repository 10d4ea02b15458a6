//! A WebSocket device client over rustls trusting the gateway's development CA.
//!
//! The HTTP upgrade is written and read here rather than by tungstenite, so that a refusal
//! is seen whole (status, headers and the complete JSON body) and requests tungstenite would
//! not send (no upgrade headers, tokens in the query string) can be made too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::checks::assert_error_body;

/// How long the TLS + HTTP handshake and the welcome may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Device::recv_json`] waits for a message.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// A device connection attempt, built up and then sent with [`ConnectRequest::send`].
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    addr: SocketAddr,
    server_name: String,
    path: String,
    ca: PathBuf,
    headers: Vec<(String, String)>,
    protocols: Vec<String>,
    upgrade: bool,
    /// A client certificate and its key (PEM files), for mutual TLS.
    client_cert: Option<(PathBuf, PathBuf)>,
}

/// The outcome of a handshake: an open socket or the gateway's HTTP refusal.
#[derive(Debug)]
pub enum Handshake {
    /// `101 Switching Protocols`; the welcome has been read.
    Upgraded(Box<Device>),
    /// Any other HTTP response.
    Refused(Refusal),
}

/// A refused handshake: the whole HTTP response.
#[derive(Debug)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// Headers with lower-case names.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub raw: String,
    /// The body as JSON (`Null` when not JSON).
    pub body: Value,
}

/// An open device WebSocket.
pub struct Device {
    /// The socket.
    pub ws: WebSocketStream<TlsStream<TcpStream>>,
    /// The `Sec-WebSocket-Protocol` the gateway answered with, if any.
    pub protocol: Option<String>,
    /// The gateway's first message (expected to be the welcome).
    pub welcome: Value,
}

/// What the gateway sent next.
#[derive(Debug)]
pub enum Event {
    /// A text frame holding JSON.
    Json(Value),
    /// A binary frame.
    Binary(Vec<u8>),
    /// A close frame.
    Close {
        /// Its code, when it had one.
        code: Option<u16>,
        /// Its reason.
        reason: String,
    },
    /// The connection ended without a close frame (or failed).
    Ended(String),
    /// Nothing arrived in time.
    Timeout,
}

/// A TLS connection after a `101`, read frame by frame without ever answering (no pongs).
pub struct RawConn {
    pub(crate) tls: TlsStream<TcpStream>,
    pub(crate) buf: Vec<u8>,
}

impl ConnectRequest {
    /// A request to `device_url` (`wss://127.0.0.1:PORT/v1/connect`) trusting the CA in `ca`.
    pub fn new(device_url: &str, ca: &Path) -> ConnectRequest {
        let rest = device_url
            .strip_prefix("wss://")
            .unwrap_or_else(|| panic!("device url {device_url:?} is not wss://"));
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let addr: SocketAddr = authority
            .parse()
            .unwrap_or_else(|e| panic!("device url authority {authority:?}: {e}"));
        ConnectRequest {
            addr,
            server_name: addr.ip().to_string(),
            path: path.to_string(),
            ca: ca.to_path_buf(),
            headers: Vec::new(),
            protocols: Vec::new(),
            upgrade: true,
            client_cert: None,
        }
    }

    /// Present this client certificate (PEM) with its key (PEM) in the TLS handshake.
    pub fn client_cert(mut self, cert: &Path, key: &Path) -> Self {
        self.client_cert = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }

    /// TLS and the upgrade request as [`send`](Self::send) does, but any failure (a TLS alert,
    /// a reset, EOF before a response) is returned instead of panicking: `Ok(status)` when an
    /// HTTP response head arrived.
    pub async fn try_exchange(&self) -> Result<u16, String> {
        let attempt = async {
            let tcp = TcpStream::connect(self.addr)
                .await
                .map_err(|e| e.to_string())?;
            let name = ServerName::try_from(self.server_name.clone()).map_err(|e| e.to_string())?;
            let mut tls = self
                .connector()
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let mut req = format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {}\r\n",
                self.path,
                self.addr,
                generate_key()
            );
            if !self.protocols.is_empty() {
                req += &format!("Sec-WebSocket-Protocol: {}\r\n", self.protocols.join(", "));
            }
            for (name, value) in &self.headers {
                req += &format!("{name}: {value}\r\n");
            }
            req += "\r\n";
            tls.write_all(req.as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
            tls.flush().await.map_err(|e| format!("flush: {e}"))?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                let n = tls
                    .read(&mut chunk)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    return Err("EOF before a response".to_string());
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf);
                if let Some(status) = text
                    .strip_prefix("HTTP/1.1 ")
                    .and_then(|rest| rest.get(..3))
                    .and_then(|code| code.parse().ok())
                {
                    return Ok(status);
                }
            }
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err("timed out".to_string()))
    }

    fn connector(&self) -> TlsConnector {
        let identity = self
            .client_cert
            .as_ref()
            .map(|(cert, key)| (cert.as_path(), key.as_path()));
        TlsConnector::from(client_config_with(&self.ca, identity))
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer(self, token: &str) -> Self {
        self.header("Authorization", &format!("Bearer {token}"))
    }

    /// Any extra request header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Offer these subprotocols (in this order) in `Sec-WebSocket-Protocol`.
    pub fn protocols<I, S>(mut self, protocols: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.protocols.extend(protocols.into_iter().map(Into::into));
        self
    }

    /// Append a query string (`"token=abc"`) to the path.
    pub fn query(mut self, query: &str) -> Self {
        self.path
            .push(if self.path.contains('?') { '&' } else { '?' });
        self.path.push_str(query);
        self
    }

    /// Send a plain GET without the WebSocket upgrade headers.
    pub fn without_upgrade(mut self) -> Self {
        self.upgrade = false;
        self
    }

    /// The TLS server name to verify (`127.0.0.1` by default, or e.g. `localhost`).
    pub fn server_name(mut self, name: &str) -> Self {
        self.server_name = name.to_string();
        self
    }

    /// Perform TLS and the HTTP upgrade; on `101` read the welcome.
    pub async fn send(self) -> Handshake {
        let what = format!("handshake with {}{}", self.addr, self.path);
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.send_inner())
            .await
            .unwrap_or_else(|_| panic!("{what} took longer than {HANDSHAKE_TIMEOUT:?}"))
    }

    /// Perform TLS and the HTTP upgrade and hand back the raw TLS stream (panics unless `101`).
    pub async fn send_raw(self) -> RawConn {
        let what = format!("handshake with {}{}", self.addr, self.path);
        let (tls, head, tail) = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.exchange())
            .await
            .unwrap_or_else(|_| panic!("{what} took longer than {HANDSHAKE_TIMEOUT:?}"));
        assert_eq!(head.status, 101, "{what}: expected 101, got {head:?}");
        RawConn { tls, buf: tail }
    }

    async fn send_inner(self) -> Handshake {
        let (mut tls, head, tail) = self.exchange().await;
        if head.status != 101 {
            let body = read_body(&mut tls, &head.headers, tail).await;
            let raw = String::from_utf8_lossy(&body).into_owned();
            return Handshake::Refused(Refusal {
                status: head.status,
                headers: head.headers,
                body: serde_json::from_str(&raw).unwrap_or(Value::Null),
                raw,
            });
        }
        let protocol = header(&head.headers, "sec-websocket-protocol").map(str::to_string);
        let config = WebSocketConfig::default()
            .max_message_size(Some(4 << 20))
            .max_frame_size(Some(4 << 20));
        let mut ws =
            WebSocketStream::from_partially_read(tls, tail, Role::Client, Some(config)).await;
        let welcome = match next_event(&mut ws, RECV_TIMEOUT).await {
            Event::Json(v) => v,
            other => panic!("expected a welcome after 101, got {other:?}"),
        };
        Handshake::Upgraded(Box::new(Device {
            ws,
            protocol,
            welcome,
        }))
    }

    /// Connect, write the request and read the response head; checks a `101` is a valid upgrade.
    /// The device listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Only the TCP connection and the TLS handshake, nothing sent on top.
    pub async fn tls_only(&self) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.addr));
        tcp.set_nodelay(true).expect("set TCP_NODELAY");
        let name = ServerName::try_from(self.server_name.clone())
            .unwrap_or_else(|e| panic!("server name {:?}: {e}", self.server_name));
        self.connector()
            .connect(name, tcp)
            .await
            .unwrap_or_else(|e| panic!("TLS handshake with {}: {e}", self.addr))
    }

    async fn exchange(&self) -> (TlsStream<TcpStream>, Head, Vec<u8>) {
        let mut tls = self.tls_only().await;

        let key = generate_key();
        let mut req = format!("GET {} HTTP/1.1\r\nHost: {}\r\n", self.path, self.addr);
        if self.upgrade {
            req.push_str("Connection: Upgrade\r\nUpgrade: websocket\r\n");
            req.push_str(&format!(
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
            ));
        }
        if !self.protocols.is_empty() {
            req.push_str(&format!(
                "Sec-WebSocket-Protocol: {}\r\n",
                self.protocols.join(", ")
            ));
        }
        for (name, value) in &self.headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        tls.write_all(req.as_bytes()).await.expect("write request");
        tls.flush().await.expect("flush request");

        let (head, tail) = read_head(&mut tls).await;
        if head.status == 101 {
            let upgrade = header(&head.headers, "upgrade").unwrap_or_default();
            assert!(
                upgrade.eq_ignore_ascii_case("websocket"),
                "101 without Upgrade: websocket: {head:?}"
            );
            assert_eq!(
                header(&head.headers, "sec-websocket-accept"),
                Some(derive_accept_key(key.as_bytes()).as_str()),
                "101 with a wrong Sec-WebSocket-Accept"
            );
            if let Some(p) = header(&head.headers, "sec-websocket-protocol") {
                assert!(
                    self.protocols.iter().any(|o| o == p),
                    "gateway chose subprotocol {p:?}, which was not offered ({:?})",
                    self.protocols
                );
            }
        }
        (tls, head, tail)
    }
}

impl Handshake {
    /// The open device; panics with the refusal otherwise.
    #[track_caller]
    pub fn device(self) -> Device {
        match self {
            Handshake::Upgraded(d) => *d,
            Handshake::Refused(r) => panic!(
                "expected the upgrade to succeed, got HTTP {} {}",
                r.status, r.raw
            ),
        }
    }

    /// The refusal; panics if the upgrade succeeded.
    #[track_caller]
    pub fn refusal(self) -> Refusal {
        match self {
            Handshake::Refused(r) => r,
            Handshake::Upgraded(d) => panic!(
                "expected the handshake to be refused, but it was upgraded (welcome {})",
                d.welcome
            ),
        }
    }
}

impl Refusal {
    /// Asserts the status and a JSON body `{"error": code, "message": "..."}`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status, status,
            "expected refusal {status} {code}, got {} {}",
            self.status, self.raw
        );
        let content_type = self.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "refusal {status} has Content-Type {content_type:?}, not JSON"
        );
        assert_error_body(&self.body, &self.raw, code);
    }

    /// A response header by (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("protocol", &self.protocol)
            .field("welcome", &self.welcome)
            .finish()
    }
}

impl Device {
    /// The `session_id` of the welcome.
    pub fn session_id(&self) -> &str {
        self.welcome["session_id"].as_str().unwrap_or_default()
    }

    /// Send a JSON value as one text frame.
    pub async fn send_json(&mut self, v: &Value) {
        self.send(Message::text(v.to_string())).await;
    }

    /// Send a text frame as is (it need not be JSON).
    pub async fn send_text(&mut self, text: &str) {
        self.send(Message::text(text)).await;
    }

    /// Send any frame.
    pub async fn send(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send to the gateway");
    }

    /// The next thing the gateway sends (pings and pongs skipped) within `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Event {
        next_event(&mut self.ws, timeout).await
    }

    /// The next JSON message; panics on anything else or after [`RECV_TIMEOUT`].
    #[track_caller]
    pub fn recv_json(&mut self) -> impl std::future::Future<Output = Value> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            match self.next_event(RECV_TIMEOUT).await {
                Event::Json(v) => v,
                other => panic!("{caller}: expected a JSON message, got {other:?}"),
            }
        }
    }

    /// Send `msg` and return the gateway's next JSON message.
    pub async fn request(&mut self, msg: &Value) -> Value {
        self.send_json(msg).await;
        self.recv_json().await
    }

    /// Send a JSON value as one text frame, reporting failure instead of panicking.
    pub async fn try_send_json(&mut self, v: &Value) -> Result<(), String> {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .map_err(|e| e.to_string())
    }

    /// Send raw text and return the gateway's next JSON message.
    pub async fn request_text(&mut self, text: &str) -> Value {
        self.send_text(text).await;
        self.recv_json().await
    }

    /// Send `msg` (which has an `id`) and assert the answer is `{"type":"ack","id":<id>}`.
    #[track_caller]
    pub fn send_acked<'a>(
        &'a mut self,
        msg: &'a Value,
    ) -> impl std::future::Future<Output = ()> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let reply = self.request(msg).await;
            // Unknown fields are allowed by the contract; type and id are what make an ack.
            assert!(
                reply["type"] == "ack" && reply["id"] == msg["id"],
                "{caller}: expected {{\"type\":\"ack\",\"id\":{}}}, got {reply}",
                msg["id"]
            );
        }
    }

    /// Skip JSON messages until a close frame; returns its code and reason. Panics if the
    /// connection ends without one or nothing comes within `timeout`.
    #[track_caller]
    pub fn expect_close(
        &mut self,
        timeout: Duration,
    ) -> impl std::future::Future<Output = (u16, String)> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match self.next_event(left).await {
                    Event::Json(_) | Event::Binary(_) => continue,
                    Event::Close {
                        code: Some(code),
                        reason,
                    } => {
                        // Reading on sends tungstenite's close reply, as any client would.
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while let Some(Ok(_)) = self.ws.next().await {}
                        })
                        .await;
                        return (code, reason);
                    }
                    other => panic!("{caller}: expected a close frame with a code, got {other:?}"),
                }
            }
        }
    }

    /// Close with 1000 and wait (briefly) for the gateway's answer.
    pub async fn close(mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        if self.ws.close(Some(frame)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Some(Ok(_)) = self.ws.next().await {}
            })
            .await;
        }
    }
}

impl RawConn {
    /// The next frame as `(opcode, payload)`, or `None` when the connection ends or `timeout` passes.
    pub async fn read_frame(&mut self, timeout: Duration) -> Option<(u8, Vec<u8>)> {
        tokio::time::timeout(timeout, self.read_frame_inner())
            .await
            .ok()
            .flatten()
    }

    async fn read_frame_inner(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((opcode, payload, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Some((opcode, payload));
            }
            let mut chunk = [0u8; 8192];
            match self.tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// An unmasked server frame at the start of `buf`: `(opcode, payload, bytes used)`.
pub(crate) fn parse_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let (len, mut at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    let mask = if buf[1] & 0x80 != 0 {
        let m = buf.get(at..at + 4)?.to_vec();
        at += 4;
        Some(m)
    } else {
        None
    };
    let mut payload = buf.get(at..at + len)?.to_vec();
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Some((opcode, payload, at + len))
}

async fn next_event(ws: &mut WebSocketStream<TlsStream<TcpStream>>, timeout: Duration) -> Event {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Event::Timeout,
            Ok(None) => return Event::Ended("stream ended".into()),
            Ok(Some(Err(e))) => return Event::Ended(e.to_string()),
            Ok(Some(Ok(msg))) => msg,
        };
        return match msg {
            Message::Text(text) => match serde_json::from_str(text.as_str()) {
                Ok(v) => Event::Json(v),
                Err(e) => panic!("gateway sent a text frame that is not JSON ({e}): {text:?}"),
            },
            Message::Binary(b) => Event::Binary(b.to_vec()),
            Message::Close(frame) => Event::Close {
                code: frame.as_ref().map(|f| u16::from(f.code)),
                reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
            },
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
    }
}

/// A response status line and headers (names lower-cased).
#[derive(Debug)]
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Reads up to the end of the response head; returns it and the bytes read past it.
async fn read_head(tls: &mut TlsStream<TcpStream>) -> (Head, Vec<u8>) {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        assert!(buf.len() < 64 * 1024, "response head over 64 KiB");
        let mut chunk = [0u8; 4096];
        let n = tls.read(&mut chunk).await.unwrap_or_else(|e| {
            panic!(
                "reading the response head: {e} (got {:?})",
                String::from_utf8_lossy(&buf)
            )
        });
        assert!(
            n > 0,
            "connection closed before a complete response head (got {:?})",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (Head { status, headers }, buf[end + 4..].to_vec())
}

/// Reads a complete response body: `Content-Length`, chunked, or up to the end of the stream.
async fn read_body(
    tls: &mut TlsStream<TcpStream>,
    headers: &[(String, String)],
    mut buf: Vec<u8>,
) -> Vec<u8> {
    let chunked = header(headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = header(headers, "content-length").and_then(|v| v.parse::<usize>().ok());
    loop {
        if let Some(len) = length {
            if buf.len() >= len {
                buf.truncate(len);
                return buf;
            }
        } else if chunked {
            if let Some(body) = dechunk(&buf) {
                return body;
            }
        }
        let mut chunk = [0u8; 4096];
        match tls.read(&mut chunk).await {
            Ok(0) | Err(_) => return buf,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The decoded body if `buf` holds a complete chunked encoding.
fn dechunk(buf: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + buf[at..].windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&buf[at..line_end]).into_owned();
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(buf.get(at..at + size)?);
        at += size + 2;
    }
}

/// A rustls client configuration trusting only the PEM CA in `ca`.
pub fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    client_config_with(ca, None)
}

/// As [`client_config`], presenting the client certificate `identity` (PEM cert, PEM key).
pub fn client_config_with(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .unwrap_or_else(|e| panic!("read the gateway CA {}: {e}", ca.display()));
    for cert in certs {
        let cert = cert.unwrap_or_else(|e| panic!("parse the gateway CA {}: {e}", ca.display()));
        roots
            .add(cert)
            .expect("add the gateway CA to the root store");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS protocol versions")
        .with_root_certificates(roots);
    let config = match identity {
        None => config.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .unwrap_or_else(|e| panic!("read client certificate {}: {e}", cert.display()));
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
                .unwrap_or_else(|e| panic!("read client key {}: {e}", key.display()));
            config
                .with_client_auth_cert(chain, key)
                .expect("a usable client certificate")
        }
    };
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::{dechunk, parse_frame};

    #[test]
    fn frames_and_chunks_parse() {
        assert_eq!(
            parse_frame(&[0x88, 0x02, 0x0f, 0xa0, 0xff]),
            Some((8, vec![0x0f, 0xa0], 4))
        );
        assert_eq!(parse_frame(&[0x81, 0x05, b'a']), None);
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
            Some(b"abcde".to_vec())
        );
        assert_eq!(dechunk(b"3\r\nab"), None);
    }
}
