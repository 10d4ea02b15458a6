//! Opening one device connection: TCP, TLS when the URL says `wss`, the WebSocket upgrade with
//! the device's token, then the gateway's `welcome`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::header::{
    HeaderValue, AUTHORIZATION, RETRY_AFTER, SEC_WEBSOCKET_PROTOCOL,
};
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::proto::{self, Incoming, Welcome};
use crate::tls;
use crate::tokens::Secret;

/// An open device connection.
pub type Ws = WebSocketStream<Transport>;

/// Close codes after which a device must not reconnect on its own.
pub const FINAL_CLOSE_CODES: [u16; 2] = [4001, 4003];

/// Connections one source address is given before `auto` adds another: well under the
/// 28,232 ephemeral ports Linux has by default for one source and destination.
pub const CONNECTIONS_PER_SOURCE: usize = 16_000;

/// Where devices connect, resolved once for the whole fleet.
pub struct Target {
    uri: Uri,
    addr: SocketAddr,
    tls: Option<Tls>,
    /// Local addresses the connections are spread over, in turn (none: the system picks).
    sources: Vec<IpAddr>,
    next_source: AtomicUsize,
}

/// TLS to the gateway: whom to trust, the name to check, and, for mutual TLS, where each
/// device's client certificate is.
struct Tls {
    /// The CA, and the verdict on the gateway's chain all the process's devices share.
    verifier: Arc<tls::ChainVerifiedOnce>,
    /// The connector of devices without a client certificate.
    plain: TlsConnector,
    name: ServerName<'static>,
    client_certs: Option<PathBuf>,
}

impl Tls {
    /// The connector for device `id`: with its client certificate under mutual TLS.
    fn connector(&self, id: &str) -> Result<TlsConnector, ConnectError> {
        match &self.client_certs {
            None => Ok(self.plain.clone()),
            Some(dir) => tls::Identity::load(dir, id)
                .and_then(|identity| tls::connector_for(self.verifier.clone(), Some(identity)))
                .map_err(|e| ConnectError::ClientCert(format!("{e:#}"))),
        }
    }
}

/// `--source-ips`: which local addresses connections come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceIps {
    /// The system's choice, except that a fleet too big for one loopback source address's
    /// ports is spread over 127.0.0.1, 127.0.0.2, ... ([`CONNECTIONS_PER_SOURCE`] each).
    Auto,
    /// These addresses, in turn.
    List(Vec<IpAddr>),
}

impl FromStr for SourceIps {
    type Err = String;

    /// `auto`, `127.0.0.1,127.0.0.2`, or an IPv4 range `127.0.0.1-127.0.0.8`.
    fn from_str(text: &str) -> Result<SourceIps, String> {
        if text == "auto" {
            return Ok(SourceIps::Auto);
        }
        if let Some((first, last)) = text.split_once('-') {
            let parse = |ip: &str| {
                Ipv4Addr::from_str(ip.trim())
                    .map(u32::from)
                    .map_err(|_| format!("`{ip}` is not an IPv4 address"))
            };
            let (first, last) = (parse(first)?, parse(last)?);
            if last < first || last - first >= 65_536 {
                return Err(format!(
                    "`{text}` is not a range of at most 65536 addresses"
                ));
            }
            return Ok(SourceIps::List(
                (first..=last).map(|n| Ipv4Addr::from(n).into()).collect(),
            ));
        }
        text.split(',')
            .map(|ip| {
                IpAddr::from_str(ip.trim()).map_err(|_| format!("`{ip}` is not an IP address"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(SourceIps::List)
    }
}

impl SourceIps {
    /// The addresses `connections` connections to `to` come from.
    pub fn for_fleet(&self, to: SocketAddr, connections: usize) -> Vec<IpAddr> {
        match self {
            SourceIps::List(list) => list.clone(),
            SourceIps::Auto => match to.ip() {
                IpAddr::V4(ip) if ip.is_loopback() && connections > CONNECTIONS_PER_SOURCE => {
                    let count = connections.div_ceil(CONNECTIONS_PER_SOURCE).min(254) as u32;
                    (1..=count)
                        .map(|n| Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + n).into())
                        .collect()
                }
                _ => Vec::new(),
            },
        }
    }
}

impl Target {
    /// Parses the device URL, resolves its host and, for `wss://`, loads the CA.
    pub async fn resolve(url: &str, ca: &Path) -> Result<Target> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--url `{url}` is not a URL"))?;
        let secure = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => bail!("--url `{url}` must start with wss:// or ws://"),
        };
        let host = uri.host().context("--url has no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let addr = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .next()
            .with_context(|| format!("{host} has no address"))?;
        let tls = match secure {
            true => {
                // rustls checks IP addresses against the certificate's IP SANs, names against DNS SANs.
                let name = ServerName::try_from(host.to_owned())
                    .with_context(|| format!("`{host}` is not a valid TLS server name"))?;
                let verifier = tls::ChainVerifiedOnce::new(Arc::new(tls::roots(ca)?))?;
                Some(Tls {
                    plain: tls::connector_for(verifier.clone(), None)?,
                    verifier,
                    name,
                    client_certs: None,
                })
            }
            false => None,
        };
        Ok(Target {
            uri,
            addr,
            tls,
            sources: Vec::new(),
            next_source: AtomicUsize::new(0),
        })
    }

    /// Devices authenticate with the client certificates in `dir` (`{id}.pem`,
    /// `{id}-key.pem`) instead of their tokens.
    pub fn with_client_certs(mut self, dir: Option<PathBuf>) -> Result<Target> {
        match (&mut self.tls, dir) {
            (_, None) => {}
            (Some(tls), Some(dir)) => tls.client_certs = Some(dir),
            (None, Some(_)) => bail!("--client-certs needs a wss:// URL (mutual TLS)"),
        }
        Ok(self)
    }

    /// True when devices authenticate by client certificate.
    fn by_certificate(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.client_certs.is_some())
    }

    /// Spreads connections over these local addresses, in turn.
    pub fn with_sources(mut self, sources: Vec<IpAddr>) -> Target {
        self.sources = sources;
        self
    }

    /// The gateway's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A TCP connection, from the next source address if there are any.
    async fn tcp(&self) -> io::Result<TcpStream> {
        if self.sources.is_empty() {
            return TcpStream::connect(self.addr).await;
        }
        let source = self.sources[self.next_source.fetch_add(1, Relaxed) % self.sources.len()];
        let socket = match source {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // A port of an earlier run's connection in TIME_WAIT may be taken again.
        socket.set_reuseaddr(true)?;
        defer_port_choice(&socket)?;
        socket.bind(SocketAddr::new(source, 0)).map_err(|e| {
            io::Error::new(e.kind(), format!("binding source address {source}: {e}"))
        })?;
        socket.connect(self.addr).await
    }

    /// The device URL, for messages.
    pub fn url(&self) -> String {
        self.uri.to_string()
    }
}

/// Leaves the choice of the local port to `connect` (Linux's `IP_BIND_ADDRESS_NO_PORT`).
///
/// Binding a source address with port 0 makes the kernel pick a port that is free for every
/// destination, searching the ports bound so far: with thousands of connections held from one
/// address, each search costs more than the TLS handshake that follows (a fleet's connects
/// slowed to a few hundred a second, with the simulator's CPU in `bind`). Chosen at
/// `connect`, a port only has to be unique for its destination.
#[cfg(target_os = "linux")]
fn defer_port_choice(socket: &TcpSocket) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
    setsockopt(socket, IpBindAddressNoPort, &true).map_err(io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn defer_port_choice(_: &TcpSocket) -> io::Result<()> {
    Ok(())
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("refused with HTTP {status} `{code}`")]
    Refused {
        status: u16,
        code: String,
        retry_after: Option<Duration>,
    },
    #[error("timed out")]
    Timeout,
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("WebSocket handshake failed: {0}")]
    Handshake(tungstenite::Error),
    #[error("closed before the welcome (close code {0:?})")]
    ClosedBeforeWelcome(Option<u16>),
    #[error("expected a welcome, got {0}")]
    BadWelcome(String),
    #[error("the token is not a valid HTTP header value")]
    BadToken,
    #[error("client certificate: {0}")]
    ClientCert(String),
}

impl ConnectError {
    /// True when retrying cannot help: the credentials are refused or the device is disabled.
    pub fn is_final(&self) -> bool {
        match self {
            ConnectError::Refused { status, .. } => matches!(status, 401 | 403),
            ConnectError::ClosedBeforeWelcome(Some(code)) => FINAL_CLOSE_CODES.contains(code),
            ConnectError::BadToken | ConnectError::ClientCert(_) => true,
            _ => false,
        }
    }

    /// How long the gateway asked us to wait (`Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ConnectError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A short label for counting failures by kind.
    pub fn kind(&self) -> String {
        match self {
            ConnectError::Refused { status, code, .. } if code.is_empty() => {
                format!("connect: http {status}")
            }
            ConnectError::Refused { status, code, .. } => format!("connect: http {status} {code}"),
            ConnectError::Timeout => "connect: timeout".into(),
            ConnectError::Io(_) => "connect: tcp".into(),
            ConnectError::Tls(_) => "connect: tls".into(),
            ConnectError::Handshake(_) => "connect: websocket handshake".into(),
            ConnectError::ClosedBeforeWelcome(_) => "connect: closed before welcome".into(),
            ConnectError::BadWelcome(_) => "connect: bad welcome".into(),
            ConnectError::BadToken => "connect: bad token".into(),
            ConnectError::ClientCert(_) => "connect: client certificate".into(),
        }
    }

    fn from_handshake(error: tungstenite::Error) -> ConnectError {
        match error {
            tungstenite::Error::Http(response) => {
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let code = response
                    .body()
                    .as_deref()
                    .and_then(|body| serde_json::from_slice::<serde_json::Value>(body).ok())
                    .and_then(|body| body.get("error")?.as_str().map(str::to_owned))
                    .unwrap_or_default();
                ConnectError::Refused {
                    status: response.status().as_u16(),
                    code,
                    retry_after,
                }
            }
            // The TCP connection (and TLS) stood: a failure now is one of the upgrade (the
            // gateway closing it at its handshake deadline, say), not `connect: tcp`.
            other => ConnectError::Handshake(other),
        }
    }
}

/// Connects device `id` and waits for its welcome, all within `limit`. It proves itself with
/// `token`, or with its client certificate when the target has them (the token unused).
pub async fn connect(
    target: &Target,
    id: &str,
    token: &Secret,
    limit: Duration,
) -> Result<(Ws, Welcome), ConnectError> {
    tokio::time::timeout(limit, connect_unbounded(target, id, token))
        .await
        .map_err(|_| ConnectError::Timeout)?
}

async fn connect_unbounded(
    target: &Target,
    id: &str,
    token: &Secret,
) -> Result<(Ws, Welcome), ConnectError> {
    let token = (!target.by_certificate()).then_some(token);
    let mut ws = open(target, id, token, proto::SUBPROTOCOL).await?;
    let welcome = read_welcome(&mut ws).await?;
    Ok((ws, welcome))
}

/// TCP, TLS when the URL says `wss` (with device `id`'s client certificate under mutual TLS),
/// and the WebSocket upgrade asking for `subprotocol`, with `token` as a bearer token if given.
/// Nothing is read after the upgrade: this is also the transport of `bench-mqtt`.
pub async fn open(
    target: &Target,
    id: &str,
    token: Option<&Secret>,
    subprotocol: &'static str,
) -> Result<Ws, ConnectError> {
    let tcp = target.tcp().await?;
    // Small messages, latency measured: do not let Nagle hold them back.
    tcp.set_nodelay(true)?;
    let stream = match &target.tls {
        Some(tls) => {
            let stream = tls
                .connector(id)?
                .connect(tls.name.clone(), tcp)
                .await
                .map_err(ConnectError::Tls)?;
            Transport::Tls(Box::new(stream))
        }
        None => Transport::Plain(tcp),
    };
    let request = upgrade_request(&target.uri, token, subprotocol)?;
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config()))
            .await
            .map_err(ConnectError::from_handshake)?;
    Ok(ws)
}

fn upgrade_request(
    uri: &Uri,
    token: Option<&Secret>,
    subprotocol: &'static str,
) -> Result<Request, ConnectError> {
    let mut request = uri
        .clone()
        .into_client_request()
        .map_err(ConnectError::Handshake)?;
    let headers = request.headers_mut();
    if let Some(token) = token {
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| ConnectError::BadToken)?;
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
    }
    headers.insert(
        SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(subprotocol),
    );
    Ok(request)
}

/// Buffers sized for small messages and thousands of connections per process,
/// not tungstenite's 128 KiB buffers and 64 MiB messages. Frames fed without a flush wait
/// for it (up to 4 KiB), so that what a device sends together (a command's ack and result)
/// goes out in one TLS record and one write, as a device's TCP stack would coalesce it.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

async fn read_welcome(ws: &mut Ws) -> Result<Welcome, ConnectError> {
    let mut close_code = None;
    while let Some(frame) = ws.next().await {
        let frame = match frame {
            Ok(frame) => frame,
            // The gateway may drop the connection right after its close frame.
            Err(_) if close_code.is_some() => break,
            Err(e) => return Err(ConnectError::Handshake(e)),
        };
        match frame {
            Message::Text(text) => {
                return match proto::parse(&text) {
                    Ok(Incoming::Welcome(welcome)) => Ok(welcome),
                    Ok(other) => Err(ConnectError::BadWelcome(format!("{other:?}"))),
                    Err(e) => Err(ConnectError::BadWelcome(format!(
                        "unparsable message ({e})"
                    ))),
                };
            }
            Message::Close(frame) => close_code = close_code_of(&frame),
            Message::Binary(_) => return Err(ConnectError::BadWelcome("a binary frame".into())),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
    Err(ConnectError::ClosedBeforeWelcome(close_code))
}

/// The numeric code of a close frame.
pub fn close_code_of(frame: &Option<CloseFrame>) -> Option<u16> {
    frame.as_ref().map(|f| u16::from(f.code))
}

/// Closes normally (1000) and waits briefly for the gateway's side of the close handshake.
pub async fn close(ws: &mut Ws) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// After the gateway's close frame: keeps reading briefly so tungstenite can send its reply.
pub async fn finish_close(ws: &mut Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// A TCP stream, with or without TLS.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{self, Mock, Script};

    #[test]
    fn a_connection_cut_during_the_upgrade_is_a_failed_handshake_not_a_refused_connect() {
        let cut = tungstenite::Error::Io(io::Error::from(io::ErrorKind::UnexpectedEof));
        assert_eq!(
            ConnectError::from_handshake(cut).kind(),
            "connect: websocket handshake"
        );
        let refused = ConnectError::from(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(refused.kind(), "connect: tcp");
    }

    #[tokio::test]
    async fn connects_over_tls_and_reads_the_welcome() {
        let dir = tempfile::tempdir().unwrap();
        let (acceptor, ca) = mock::tls_pair(dir.path());
        let mock = Mock::start(Script::default(), Some(acceptor)).await;
        let target = Target::resolve(&mock.url("wss"), &ca).await.unwrap();
        let (mut ws, welcome) = connect(&target, "mock", &mock::token(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(welcome.device_id, "mock");
        assert_eq!(welcome.limits.telemetry_per_sec, Some(100.0));
        close(&mut ws).await;
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_fails_the_tls_handshake() {
        let (server_dir, client_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (acceptor, _) = mock::tls_pair(server_dir.path());
        let (_, other_ca) = mock::tls_pair(client_dir.path());
        let mock = Mock::start(Script::default(), Some(acceptor)).await;
        let target = Target::resolve(&mock.url("wss"), &other_ca).await.unwrap();
        let error = connect(&target, "mock", &mock::token(), Duration::from_secs(5))
            .await
            .err()
            .unwrap();
        assert!(matches!(error, ConnectError::Tls(_)), "{error:?}");
        assert!(!error.is_final());
    }

    #[tokio::test]
    async fn a_wrong_token_is_a_final_refusal() {
        let mock = Mock::start(Script::default(), None).await;
        let target = Target::resolve(&mock.url("ws"), Path::new("unused.pem"))
            .await
            .unwrap();
        let wrong = Secret::from("wrong".to_string());
        let error = connect(&target, "mock", &wrong, Duration::from_secs(5))
            .await
            .err()
            .unwrap();
        assert_eq!(error.kind(), "connect: http 401 unauthorized");
        assert!(error.is_final());
    }

    #[tokio::test]
    async fn urls_without_a_websocket_scheme_are_refused() {
        for url in ["http://127.0.0.1:1/v1/connect", "127.0.0.1:1", "wss://"] {
            assert!(
                Target::resolve(url, Path::new("unused.pem")).await.is_err(),
                "{url}"
            );
        }
    }

    #[test]
    fn source_ips_are_auto_a_list_or_a_range() {
        let v4 = |text: &str| IpAddr::from_str(text).unwrap();
        assert_eq!("auto".parse(), Ok(SourceIps::Auto));
        assert_eq!(
            "127.0.0.1, ::1".parse(),
            Ok(SourceIps::List(vec![v4("127.0.0.1"), v4("::1")]))
        );
        assert_eq!(
            "127.0.0.254-127.0.1.1".parse(),
            Ok(SourceIps::List(
                ["127.0.0.254", "127.0.0.255", "127.0.1.0", "127.0.1.1"]
                    .map(v4)
                    .to_vec()
            ))
        );
        for bad in ["", "127.0.0.9-127.0.0.1", "localhost", "127.0.0.1-::1"] {
            assert!(bad.parse::<SourceIps>().is_err(), "{bad}");
        }

        let loopback: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let remote: SocketAddr = "10.0.0.5:8443".parse().unwrap();
        assert!(SourceIps::Auto.for_fleet(loopback, 16_000).is_empty());
        assert_eq!(
            SourceIps::Auto.for_fleet(loopback, 40_000),
            ["127.0.0.1", "127.0.0.2", "127.0.0.3"].map(v4).to_vec()
        );
        assert!(SourceIps::Auto.for_fleet(remote, 40_000).is_empty());
    }

    #[tokio::test]
    async fn connections_take_the_source_addresses_in_turn() {
        let mock = Mock::start(Script::default(), None).await;
        let sources: Vec<IpAddr> = ["127.0.0.2", "127.0.0.3"]
            .map(|ip| ip.parse().unwrap())
            .to_vec();
        let target = Target::resolve(&mock.url("ws"), Path::new("unused.pem"))
            .await
            .unwrap()
            .with_sources(sources.clone());
        let mut seen = Vec::new();
        for _ in 0..4 {
            let tcp = target.tcp().await.unwrap();
            seen.push(tcp.local_addr().unwrap().ip());
        }
        assert_eq!(seen, [&sources[..], &sources[..]].concat());
    }

    #[test]
    fn only_credential_refusals_and_final_close_codes_stop_retries() {
        let refused = |status| ConnectError::Refused {
            status,
            code: String::new(),
            retry_after: None,
        };
        assert!(refused(401).is_final());
        assert!(refused(403).is_final());
        assert!(!refused(429).is_final());
        assert!(!refused(503).is_final());
        assert!(ConnectError::ClosedBeforeWelcome(Some(4003)).is_final());
        assert!(!ConnectError::ClosedBeforeWelcome(Some(1001)).is_final());
        assert!(!ConnectError::Timeout.is_final());
    }

    #[test]
    fn http_refusals_keep_status_code_and_retry_after() {
        let response = tungstenite::http::Response::builder()
            .status(429)
            .header(RETRY_AFTER, "7")
            .body(Some(
                br#"{"error":"too_many_connections","message":"slow"}"#.to_vec(),
            ))
            .unwrap();
        let error = ConnectError::from_handshake(tungstenite::Error::Http(Box::new(response)));
        assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(error.kind(), "connect: http 429 too_many_connections");

        let garbage = tungstenite::http::Response::builder()
            .status(502)
            .body(Some(b"<html>".to_vec()))
            .unwrap();
        let error = ConnectError::from_handshake(tungstenite::Error::Http(Box::new(garbage)));
        assert_eq!(error.retry_after(), None);
        assert_eq!(error.kind(), "connect: http 502");
    }

    #[test]
    fn upgrade_request_carries_token_and_subprotocol() {
        let uri: Uri = "wss://127.0.0.1:8443/v1/connect".parse().unwrap();
        let token = Secret::from("tok_1".to_string());
        let request = upgrade_request(&uri, Some(&token), proto::SUBPROTOCOL).unwrap();
        assert_eq!(request.headers()[AUTHORIZATION], "Bearer tok_1");
        assert!(request.headers()[AUTHORIZATION].is_sensitive());
        assert_eq!(request.headers()[SEC_WEBSOCKET_PROTOCOL], "iot-gateway.v1");
        let mqtt = upgrade_request(&uri, None, "mqtt").unwrap();
        assert!(!mqtt.headers().contains_key(AUTHORIZATION));
        assert_eq!(mqtt.headers()[SEC_WEBSOCKET_PROTOCOL], "mqtt");
        let bad = upgrade_request(&uri, Some(&Secret::from("a\nb".to_string())), "mqtt");
        assert!(matches!(bad, Err(ConnectError::BadToken)));
    }
}
