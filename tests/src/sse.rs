//! A Server-Sent Events client for `GET /v1/events`: real HTTP through reqwest's streaming body
//! and a small parser for the `text/event-stream` format.

use std::collections::VecDeque;
use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION};
use serde_json::Value;

use crate::api::Resp;
use crate::gateway::Gateway;

/// How long [`SseStream::recv`] waits for the next event.
pub const SSE_TIMEOUT: Duration = Duration::from_secs(10);

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field (`message` when absent, as the SSE format says).
    pub event: String,
    /// The `id:` field of this event itself (not inherited from an earlier one), if it had one.
    pub id: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

impl SseEvent {
    /// The data as JSON; panics if it is not.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {self:?}"))
    }

    /// The id as a number; panics unless the event has a decimal `id:`.
    #[track_caller]
    pub fn id_num(&self) -> u64 {
        let id = self
            .id
            .as_deref()
            .unwrap_or_else(|| panic!("event without an id: {self:?}"));
        assert!(
            !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
            "event id {id:?} is not decimal: {self:?}"
        );
        id.parse()
            .unwrap_or_else(|e| panic!("event id {id:?}: {e}"))
    }
}

/// What the stream yielded next.
#[derive(Debug)]
pub enum SseNext {
    /// A complete event.
    Event(SseEvent),
    /// The response body ended (`Ok(None)`) or failed; the text says which.
    Ended(String),
    /// Nothing complete arrived in time.
    Timeout,
}

/// An open `text/event-stream` response, read only when asked to (an unread stream stalls).
pub struct SseStream {
    /// HTTP status (200).
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    resp: reqwest::Response,
    parser: Parser,
    ready: VecDeque<SseEvent>,
    ended: Option<String>,
}

/// Opens `GET {api_url}/events{query}` with `key` as bearer and an optional `Last-Event-ID`.
/// A non-200 answer comes back as the whole response.
pub async fn open(
    api_url: &str,
    key: Option<&str>,
    query: &str,
    last_event_id: Option<&str>,
) -> Result<SseStream, Resp> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("build HTTP client");
    let url = format!("{api_url}/events{query}");
    let mut req = client.get(&url).header(ACCEPT, "text/event-stream");
    if let Some(key) = key {
        req = req.header(AUTHORIZATION, format!("Bearer {key}"));
    }
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let resp = tokio::time::timeout(SSE_TIMEOUT, req.send())
        .await
        .unwrap_or_else(|_| panic!("GET {url}: no response head within {SSE_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    if status != 200 {
        let raw = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
        return Err(Resp {
            status,
            headers,
            raw,
            body,
        });
    }
    Ok(SseStream {
        status,
        headers,
        resp,
        parser: Parser::default(),
        ready: VecDeque::new(),
        ended: None,
    })
}

/// Subscribes to the gateway's events (`query` is `""` or e.g. `"?device=a"`), asserting a `200`
/// `text/event-stream` answer.
pub async fn subscribe(gw: &Gateway, query: &str) -> SseStream {
    resume(gw, query, None).await
}

/// Like [`subscribe`], sending `Last-Event-ID: last_event_id` when given.
pub async fn resume(gw: &Gateway, query: &str, last_event_id: Option<&str>) -> SseStream {
    let stream = open(&gw.api_url, Some(&gw.api_key), query, last_event_id)
        .await
        .unwrap_or_else(|r| panic!("GET /v1/events{query}: HTTP {} {}", r.status, r.raw));
    let content_type = stream
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("text/event-stream"),
        "GET /v1/events has Content-Type {content_type:?}"
    );
    stream
}

impl SseStream {
    /// The next event within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> SseNext {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(event) = self.ready.pop_front() {
                return SseNext::Event(event);
            }
            if let Some(why) = &self.ended {
                return SseNext::Ended(why.clone());
            }
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Err(_) => return SseNext::Timeout,
                Ok(Ok(Some(bytes))) => self.parser.feed(&bytes, &mut self.ready),
                Ok(Ok(None)) => self.ended = Some("end of body".into()),
                Ok(Err(e)) => self.ended = Some(format!("body error: {e}")),
            }
        }
    }

    /// The next event; panics if the stream ends or nothing comes within [`SSE_TIMEOUT`].
    #[track_caller]
    pub fn recv(&mut self) -> impl std::future::Future<Output = SseEvent> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            match self.next(SSE_TIMEOUT).await {
                SseNext::Event(e) => e,
                other => panic!("{caller}: expected an SSE event, got {other:?}"),
            }
        }
    }

    /// Every event up to and including the first one `done` accepts; panics naming `what` if
    /// the stream ends or `timeout` passes first.
    #[track_caller]
    pub fn recv_until<'a, F>(
        &'a mut self,
        what: &'a str,
        timeout: Duration,
        mut done: F,
    ) -> impl std::future::Future<Output = Vec<SseEvent>> + 'a
    where
        F: FnMut(&SseEvent) -> bool + 'a,
    {
        let caller = std::panic::Location::caller();
        async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut seen = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match self.next(left).await {
                    SseNext::Event(e) => {
                        let stop = done(&e);
                        seen.push(e);
                        if stop {
                            return seen;
                        }
                    }
                    other => panic!(
                        "{caller}: waiting for {what}: {other:?} after {} events (last: {:?})",
                        seen.len(),
                        seen.last()
                    ),
                }
            }
        }
    }
}

/// The incremental `text/event-stream` parser: bytes in, complete events out.
#[derive(Default)]
struct Parser {
    buf: Vec<u8>,
    event: Option<String>,
    id: Option<String>,
    data: Vec<String>,
}

impl Parser {
    fn feed(&mut self, bytes: &[u8], out: &mut VecDeque<SseEvent>) {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(len) = self.buf[start..].iter().position(|b| *b == b'\n') {
            let mut line = &self.buf[start..start + len];
            start += len + 1;
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            let line = String::from_utf8(line.to_vec())
                .unwrap_or_else(|e| panic!("event stream line is not UTF-8: {e}"));
            self.line(&line, out);
        }
        self.buf.drain(..start);
    }

    fn line(&mut self, line: &str, out: &mut VecDeque<SseEvent>) {
        if line.is_empty() {
            let event = self.event.take();
            let id = self.id.take();
            // An event without data is not dispatched (the SSE processing model).
            if !self.data.is_empty() {
                out.push_back(SseEvent {
                    event: event.unwrap_or_else(|| "message".into()),
                    id,
                    data: std::mem::take(&mut self.data).join("\n"),
                });
            }
            return;
        }
        if line.starts_with(':') {
            return; // a comment, e.g. a keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => self.data.push(value.to_string()),
            "id" => self.id = Some(value.to_string()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&str]) -> Vec<SseEvent> {
        let mut p = Parser::default();
        let mut out = VecDeque::new();
        for c in chunks {
            p.feed(c.as_bytes(), &mut out);
        }
        out.into()
    }

    #[test]
    fn events_split_across_chunks_and_comments() {
        let events = parse(&[
            ": keep-alive\n\nevent: tele",
            "metry\r\nid: 7\ndata: {\"a\":",
            "1}\n\ndata:x\ndata: y\n\nid: 9\n\n",
        ]);
        assert_eq!(
            events,
            vec![
                SseEvent {
                    event: "telemetry".into(),
                    id: Some("7".into()),
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    event: "message".into(),
                    id: None,
                    data: "x\ny".into()
                },
            ]
        );
        assert_eq!(events[0].id_num(), 7);
        assert_eq!(events[0].json()["a"], 1);
    }
}
