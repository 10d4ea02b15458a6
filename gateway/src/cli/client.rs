//! HTTP to the operator API: base URL, bearer key, trusted CA, error mapping, paging, SSE.

use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use eventsource_stream::{EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION};
use reqwest::{Certificate, Method, StatusCode, Url};
use serde_json::Value;

use super::{CliError, Connection};

/// Where a default gateway keeps its generated key, relative to its working directory.
const KEY_FILE: &str = "data/api-key";
/// Where a default gateway generates its development CA.
const DEFAULT_CA: &str = "certs/ca.pem";
/// TCP connect plus TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole ordinary request, body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Items per page when following `next_cursor` (the API's maximum).
const PAGE: usize = 1000;

/// A client of one gateway's operator API.
pub struct Client {
    http: reqwest::Client,
    base: Url,
}

/// A successful answer: its status and JSON body (`Null` when empty, as for `204`).
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

/// One Server-Sent Event with its `data` parsed (a string when it is not JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub id: String,
    pub data: Value,
}

type SseStream = Pin<
    Box<dyn Stream<Item = Result<eventsource_stream::Event, EventStreamError<reqwest::Error>>>>,
>;

/// A live `GET /v1/events` stream.
pub struct Events {
    inner: SseStream,
    base: String,
}

impl Client {
    /// Resolves the URL, key and CA of `conn` into a ready client (no request is made yet).
    pub fn connect(conn: &Connection) -> Result<Client, CliError> {
        let base = api_base(&conn.api_url)?;
        let key = resolve_key(conn.api_key.as_deref())?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| CliError::Usage("the API key holds characters a header cannot".into()))?;
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("gateway-cli/", env!("CARGO_PKG_VERSION")));
        if base.scheme() == "https" {
            for cert in resolve_ca(conn.ca.as_deref())? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| CliError::Usage(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Client { http, base })
    }

    /// `GET` a JSON document.
    pub async fn get(&self, path: &[&str], query: &[(&str, String)]) -> Result<Value, CliError> {
        let answer = self
            .call(Method::GET, path, query, None, REQUEST_TIMEOUT)
            .await?;
        Ok(answer.body)
    }

    /// Any request with an optional JSON body; an error status becomes [`CliError::Api`].
    pub async fn call(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Answer, CliError> {
        let url = self.url(path, query);
        let mut request = self.http.request(method, url.clone()).timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| self.unreachable(&e))?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        let body = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| {
                CliError::BadResponse(format!("{} {}: not JSON: {e}", status.as_u16(), url.path()))
            })?
        };
        Ok(Answer { status, body })
    }

    /// Every item of a list endpoint, following `next_cursor`, up to `limit` items when given.
    pub async fn list(
        &self,
        path: &[&str],
        query: &[(&str, String)],
        limit: Option<usize>,
    ) -> Result<Vec<Value>, CliError> {
        let mut items: Vec<Value> = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let want = limit.map_or(PAGE, |l| (l - items.len()).min(PAGE));
            let mut page_query = query.to_vec();
            page_query.push(("limit", want.to_string()));
            if let Some(c) = cursor.take() {
                page_query.push(("cursor", c));
            }
            let mut page = self.get(path, &page_query).await?;
            let Some(Value::Array(batch)) = page.get_mut("items").map(Value::take) else {
                return Err(CliError::BadResponse(format!(
                    "{}: no `items` array",
                    self.url(path, &[]).path()
                )));
            };
            let empty = batch.is_empty();
            items.extend(batch);
            if let Some(l) = limit.filter(|l| items.len() >= *l) {
                items.truncate(l);
                return Ok(items);
            }
            match page.get("next_cursor") {
                Some(Value::String(c)) if !empty => cursor = Some(c.clone()),
                _ => return Ok(items),
            }
        }
    }

    /// Opens `GET /v1/events` (optionally for one device); errors before the stream starts.
    pub async fn events(&self, device: Option<&str>) -> Result<Events, CliError> {
        let query: Vec<(&str, String)> = device
            .map(|d| ("device", d.to_string()))
            .into_iter()
            .collect();
        let url = self.url(&["events"], &query);
        let response = self
            .http
            .get(url)
            .header(ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        if !status.is_success() {
            let bytes = response.bytes().await.map_err(|e| self.unreachable(&e))?;
            return Err(api_error(status, &bytes));
        }
        Ok(Events {
            inner: Box::pin(response.bytes_stream().eventsource()),
            base: self.base.to_string(),
        })
    }

    /// `base` + percent-encoded path segments + query pairs.
    fn url(&self, path: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.extend(path);
        }
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (k, v)));
        }
        url
    }

    fn unreachable(&self, e: &reqwest::Error) -> CliError {
        unreachable(self.base.as_str(), e)
    }
}

impl Events {
    /// The next event; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Option<Result<Event, CliError>> {
        let item = self.inner.next().await?;
        Some(match item {
            Ok(event) => Ok(Event {
                name: if event.event.is_empty() {
                    "message".to_string()
                } else {
                    event.event
                },
                id: event.id,
                data: serde_json::from_str(&event.data).unwrap_or(Value::String(event.data)),
            }),
            Err(EventStreamError::Transport(e)) => Err(unreachable(&self.base, &e)),
            Err(e) => Err(CliError::BadResponse(format!("event stream: {e}"))),
        })
    }
}

/// The API base URL ending in `/v1`, from what the user gave (with or without `/v1`).
fn api_base(text: &str) -> Result<Url, CliError> {
    let bad = |why: String| CliError::Usage(format!("--api-url {text:?}: {why}"));
    let mut url = Url::parse(text).map_err(|e| bad(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(bad(
            "expected http://HOST:PORT/v1 or https://HOST:PORT/v1".into()
        ));
    }
    let path = url.path().trim_end_matches('/');
    let path = if path.ends_with("/v1") {
        path.to_string()
    } else {
        format!("{path}/v1")
    };
    url.set_path(&path);
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// The key from the flag or environment, else from `data/api-key` in the working directory.
fn resolve_key(given: Option<&str>) -> Result<String, CliError> {
    if let Some(key) = given.map(str::trim).filter(|k| !k.is_empty()) {
        return Ok(key.to_string());
    }
    let missing = || {
        CliError::Usage(format!(
            "no API key: pass --api-key KEY or set GATEWAY_API_KEY \
             (run from the gateway's directory to use its {KEY_FILE})"
        ))
    };
    match std::fs::read_to_string(KEY_FILE) {
        Ok(key) if !key.trim().is_empty() => Ok(key.trim().to_string()),
        Ok(_) => Err(missing()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(missing()),
        Err(e) => Err(CliError::Usage(format!("cannot read {KEY_FILE}: {e}"))),
    }
}

/// The CA certificates to trust: `--ca`, else `certs/ca.pem` when it exists, else none.
fn resolve_ca(given: Option<&Path>) -> Result<Vec<Certificate>, CliError> {
    let path = match given {
        Some(path) => path,
        None if Path::new(DEFAULT_CA).exists() => Path::new(DEFAULT_CA),
        None => return Ok(Vec::new()),
    };
    let bad = |why: String| CliError::Usage(format!("CA file {}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// An error status with the contract's `{"error","message"}` body (or whatever came instead).
fn api_error(status: StatusCode, body: &[u8]) -> CliError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(code) = parsed.as_ref().and_then(|v| v["error"].as_str()) {
        let message = parsed.as_ref().and_then(|v| v["message"].as_str());
        return CliError::Api {
            status: status.as_u16(),
            code: code.to_string(),
            message: message.unwrap_or("(no message)").to_string(),
        };
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    CliError::Api {
        status: status.as_u16(),
        code: status.canonical_reason().unwrap_or("error").to_string(),
        message: if text.is_empty() {
            "(no body)".to_string()
        } else {
            text.chars().take(200).collect()
        },
    }
}

/// A transport failure, described by its innermost cause (the one that says what happened).
fn unreachable(base: &str, e: &reqwest::Error) -> CliError {
    let reason = if e.is_timeout() {
        "timed out".to_string()
    } else {
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        cause.to_string()
    };
    CliError::Unreachable {
        url: base.to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_url_with_or_without_v1() {
        for given in [
            "http://127.0.0.1:8080/v1",
            "http://127.0.0.1:8080/v1/",
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
        ] {
            assert_eq!(
                api_base(given).unwrap().as_str(),
                "http://127.0.0.1:8080/v1",
                "{given}"
            );
        }
        assert_eq!(
            api_base("https://gw.example/ops").unwrap().as_str(),
            "https://gw.example/ops/v1"
        );
        for bad in ["127.0.0.1:8080", "ftp://h/v1", "not a url"] {
            assert!(matches!(api_base(bad), Err(CliError::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn paths_are_percent_encoded_segments() {
        let client = Client {
            http: reqwest::Client::new(),
            base: api_base("http://h:1/v1/").unwrap(),
        };
        let url = client.url(
            &["devices", "a:b/c", "commands"],
            &[("status", "queued".into()), ("cursor", "x&y=z".into())],
        );
        assert_eq!(
            url.as_str(),
            "http://h:1/v1/devices/a:b%2Fc/commands?status=queued&cursor=x%26y%3Dz"
        );
    }

    #[test]
    fn error_bodies_become_one_line_errors() {
        let e = api_error(
            StatusCode::UNAUTHORIZED,
            br#"{"error":"unauthorized","message":"missing or wrong API key"}"#,
        );
        assert_eq!(e.to_string(), "401 unauthorized: missing or wrong API key");
        let e = api_error(StatusCode::BAD_GATEWAY, b"<html>oops</html>");
        assert_eq!(e.to_string(), "502 Bad Gateway: <html>oops</html>");
        let e = api_error(StatusCode::SERVICE_UNAVAILABLE, b"");
        assert_eq!(e.to_string(), "503 Service Unavailable: (no body)");
    }
}
