//! The HTTP upgrade at `/v1/connect`: request parsing, credentials, refusals, the `101` answer.
//!
//! The upgrade is handled here rather than in tungstenite's callback because
//! authentication needs the database (async) and every refusal must be a plain
//! HTTP response with a JSON body before any `101`.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The subprotocol the gateway speaks.
pub const SUBPROTOCOL: &str = "iot-gateway.v1";
/// Prefix of the subprotocol that carries a token for clients that cannot set headers.
const BEARER_PREFIX: &str = "bearer.";
/// Largest request head accepted.
const MAX_HEAD_BYTES: usize = 8192;

/// A valid upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// `Sec-WebSocket-Key`.
    pub key: String,
    /// The client offered `iot-gateway.v1` (so it is echoed).
    pub offers_subprotocol: bool,
    /// The bearer token from the header or the `bearer.` subprotocol.
    pub token: Option<String>,
    /// `Origin`, for browser devices.
    pub origin: Option<String>,
}

/// A handshake refusal: an HTTP status with the contract's JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub error: &'static str,
    pub message: &'static str,
    pub retry_after: Option<u64>,
}

impl Refusal {
    /// 400 `bad_request`.
    pub const fn bad_request(message: &'static str) -> Refusal {
        Refusal {
            status: 400,
            error: "bad_request",
            message,
            retry_after: None,
        }
    }
    /// 401 `unauthorized`.
    pub const fn unauthorized(message: &'static str) -> Refusal {
        Refusal {
            status: 401,
            error: "unauthorized",
            message,
            retry_after: None,
        }
    }
    /// 403 `device_disabled`.
    pub const DISABLED: Refusal = Refusal {
        status: 403,
        error: "device_disabled",
        message: "the device is disabled",
        retry_after: None,
    };
    /// 403 `origin_not_allowed`: a browser page from an origin not in `allowed_origins`.
    pub const ORIGIN_NOT_ALLOWED: Refusal = Refusal {
        status: 403,
        error: "origin_not_allowed",
        message: "this Origin may not connect devices (see the gateway's allowed_origins)",
        retry_after: None,
    };
    /// 404 `not_found` for paths other than `/v1/connect`.
    pub const NOT_FOUND: Refusal = Refusal {
        status: 404,
        error: "not_found",
        message: "devices connect at /v1/connect",
        retry_after: None,
    };
    /// 429 `too_many_connections`.
    pub const fn too_many(message: &'static str, retry_after: u64) -> Refusal {
        Refusal {
            status: 429,
            error: "too_many_connections",
            message,
            retry_after: Some(retry_after),
        }
    }
    /// 503 `unavailable`.
    pub const fn unavailable(message: &'static str, retry_after: u64) -> Refusal {
        Refusal {
            status: 503,
            error: "unavailable",
            message,
            retry_after: Some(retry_after),
        }
    }

    fn reason_phrase(&self) -> &'static str {
        match self.status {
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            429 => "Too Many Requests",
            503 => "Service Unavailable",
            _ => "Error",
        }
    }

    /// The full HTTP response.
    pub fn response(&self) -> String {
        let body = serde_json::json!({"error": self.error, "message": self.message}).to_string();
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.reason_phrase(),
            body.len()
        );
        if self.status == 400 {
            head.push_str("Sec-WebSocket-Version: 13\r\n");
        }
        if let Some(secs) = self.retry_after {
            head.push_str(&format!("Retry-After: {secs}\r\n"));
        }
        head + "\r\n" + &body
    }
}

/// Reads the request head; returns it with any bytes that followed it.
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(UpgradeRequest, Vec<u8>), Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| Refusal::bad_request("connection failed while reading the request"))?;
        if n == 0 {
            return Err(Refusal::bad_request(
                "connection closed before the request ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(result) = parse_head(&buf)? {
            return Ok(result);
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(Refusal::bad_request("request head too large"));
        }
    }
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> impl Iterator<Item = &'a str> {
    let name = name.to_owned();
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(&name))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
}

fn has_token(values: impl Iterator<Item = impl AsRef<str>>, token: &str) -> bool {
    values
        .flat_map(|v| {
            v.as_ref()
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .any(|t| t == token)
}

/// True for a token made only of `[A-Za-z0-9_-]`.
fn plausible_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 512
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Parses a complete head (`Ok(None)` while it is incomplete) and checks the upgrade.
pub fn parse_head(buf: &[u8]) -> Result<Option<(UpgradeRequest, Vec<u8>)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Refusal::bad_request("malformed HTTP request")),
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/v1/connect" {
        return Err(Refusal::NOT_FOUND);
    }
    let query_has_token = query.split('&').any(|pair| {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        key == "token" || key == "access_token"
    });
    if query_has_token {
        return Err(Refusal::bad_request(
            "tokens are not accepted in the query string (they leak into logs); \
             send `Authorization: Bearer <token>` or the `bearer.<token>` subprotocol",
        ));
    }
    let headers = req.headers;
    if req.method != Some("GET")
        || !has_token(header(headers, "upgrade"), "websocket")
        || !has_token(header(headers, "connection"), "upgrade")
    {
        return Err(Refusal::bad_request(
            "not a WebSocket upgrade: expected GET with Upgrade: websocket and Connection: Upgrade",
        ));
    }
    if header(headers, "sec-websocket-version")
        .next()
        .map(str::trim)
        != Some("13")
    {
        return Err(Refusal::bad_request("Sec-WebSocket-Version must be 13"));
    }
    let key = match header(headers, "sec-websocket-key").next().map(str::trim) {
        Some(k) if !k.is_empty() => k.to_owned(),
        _ => return Err(Refusal::bad_request("Sec-WebSocket-Key is missing")),
    };
    let protocols: Vec<&str> = header(headers, "sec-websocket-protocol")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let offers_subprotocol = protocols.contains(&SUBPROTOCOL);
    let from_header = header(headers, "authorization").next().and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned())
    });
    let from_protocol = protocols
        .iter()
        .find_map(|p| p.strip_prefix(BEARER_PREFIX))
        .map(str::to_owned);
    let token = from_header.or(from_protocol);
    if token.as_deref().is_some_and(|t| !plausible_token(t)) {
        return Err(Refusal::unauthorized("malformed token"));
    }
    let origin = header(headers, "origin").next().map(str::to_owned);
    Ok(Some((
        UpgradeRequest {
            key,
            offers_subprotocol,
            token,
            origin,
        },
        buf[len..].to_vec(),
    )))
}

/// Whether an upgrade's `Origin` may connect: any when `allowed` is empty, and always when
/// there is none (devices that are not browsers send none). Compared as origins are:
/// scheme and host without case, no trailing slash.
pub fn origin_allowed(origin: Option<&str>, allowed: &[String]) -> bool {
    match origin {
        _ if allowed.is_empty() => true,
        None => true,
        Some(origin) => {
            let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
            allowed.contains(&origin)
        }
    }
}

/// The `101 Switching Protocols` answer.
pub fn accept_response(req: &UpgradeRequest) -> String {
    let accept = tungstenite::handshake::derive_accept_key(req.key.as_bytes());
    let protocol = if req.offers_subprotocol {
        format!("Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n")
    } else {
        String::new()
    };
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
    )
}

/// Writes a refusal and closes the write side.
pub async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, refusal: &Refusal) {
    let _ = stream.write_all(refusal.response().as_bytes()).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_only_against_a_list_and_only_when_sent() {
        let allowed = vec!["https://app.example.com".to_string()];
        assert!(origin_allowed(Some("https://evil.example"), &[]));
        assert!(origin_allowed(None, &allowed));
        assert!(origin_allowed(Some("https://app.example.com"), &allowed));
        assert!(origin_allowed(Some("HTTPS://App.Example.com/"), &allowed));
        assert!(!origin_allowed(
            Some("https://app.example.com.evil"),
            &allowed
        ));
        assert!(!origin_allowed(Some("http://app.example.com"), &allowed));
        assert!(!origin_allowed(Some("null"), &allowed));
    }

    fn request(extra: &str) -> String {
        format!(
            "GET /v1/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
    }

    fn parse(text: &str) -> Result<UpgradeRequest, Refusal> {
        parse_head(text.as_bytes()).map(|r| r.expect("complete").0)
    }

    #[test]
    fn header_token() {
        let r = parse(&request("Authorization: Bearer abc_DEF-123\r\n")).unwrap();
        assert_eq!(r.token.as_deref(), Some("abc_DEF-123"));
        assert!(!r.offers_subprotocol);
    }

    #[test]
    fn subprotocol_token_is_never_echoed() {
        let r = parse(&request(
            "Sec-WebSocket-Protocol: iot-gateway.v1, bearer.tok\r\n",
        ))
        .unwrap();
        assert_eq!(r.token.as_deref(), Some("tok"));
        assert!(r.offers_subprotocol);
        let resp = accept_response(&r);
        assert!(resp.contains("Sec-WebSocket-Protocol: iot-gateway.v1\r\n"));
        assert!(!resp.contains("bearer"));
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn no_credentials_parse_but_carry_no_token() {
        assert_eq!(parse(&request("")).unwrap().token, None);
    }

    #[test]
    fn query_tokens_are_refused() {
        let text = request("").replace("/v1/connect", "/v1/connect?access_token=abc");
        assert_eq!(parse(&text).unwrap_err().status, 400);
        let text = request("").replace("/v1/connect", "/v1/connect?x=1&token=abc");
        assert_eq!(parse(&text).unwrap_err().status, 400);
    }

    #[test]
    fn not_an_upgrade() {
        let plain = "GET /v1/connect HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n";
        let e = parse(plain).unwrap_err();
        assert_eq!((e.status, e.error), (400, "bad_request"));
        assert_eq!(parse("GARBAGE\r\n\r\n").unwrap_err().status, 400);
        assert_eq!(
            parse(&request("").replace("/v1/connect", "/other"))
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            parse(&request("").replace("Version: 13", "Version: 8"))
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn incomplete_head_waits_for_more() {
        assert_eq!(parse_head(b"GET /v1/connect HTTP/1.1\r\nHost:"), Ok(None));
    }

    #[test]
    fn bytes_after_the_head_are_kept() {
        let mut text = request("Authorization: Bearer t\r\n").into_bytes();
        text.extend_from_slice(b"\x81\x00");
        let (_, rest) = parse_head(&text).unwrap().unwrap();
        assert_eq!(rest, b"\x81\x00");
    }

    #[test]
    fn refusal_is_json_with_retry_after() {
        let r = Refusal::too_many("slow down", 12).response();
        assert!(r.starts_with("HTTP/1.1 429 Too Many Requests\r\n"));
        assert!(r.contains("Retry-After: 12\r\n"));
        let body = r.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "too_many_connections");
        assert_eq!(v["message"], "slow down");
    }
}
