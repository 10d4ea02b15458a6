//! `GET /v1/events`: the live event log as Server-Sent Events, resumable with `Last-Event-ID`.
//!
//! The stream is pulled by the HTTP connection only as fast as the client reads,
//! and each pull copies a few events out of the shared log (see `crate::events`),
//! so a slow client holds a cursor, not a queue. One that fell behind the log
//! gets a `lagged` event with the number of events it missed, then carries on.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use futures_util::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{devices::valid_device_id, ApiError, ApiState};
use crate::events::{Event, Events};
use crate::metrics::METRICS;

/// Events copied out of the log per pull.
const CHUNK: usize = 256;

/// `GET /v1/events?device=ID`, with an optional `Last-Event-ID` header.
#[utoipa::path(get, path = "/events", tag = "events",
    params(
        ("device" = Option<String>, Query, description = "Only this device's events"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses(
        (status = 200, description = "text/event-stream: events telemetry, device.connected, device.disconnected, command.updated (and lagged when this client missed events), each with an id and one JSON object as data", content_type = "text/event-stream"),
        (status = 400, description = "Invalid device or Last-Event-ID", body = super::openapi::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = super::openapi::ErrorBody)))]
pub async fn stream(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<impl IntoResponse, ApiError> {
    let device = match params.get("device") {
        None => None,
        Some(d) if valid_device_id(d) => Some(d.clone()),
        Some(_) => return Err(ApiError::bad_request("device is not a valid device id")),
    };
    let resume = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request("Last-Event-ID must be an event id"))
        })
        .transpose()?;
    let events = state.events.clone();
    let latest = events.latest_id();
    // Without Last-Event-ID only new events; an id from the future means "from now".
    let cursor = resume.map_or(latest, |id| id.min(latest));
    let reader = Reader {
        changed: events.subscribe(),
        events,
        cursor,
        device,
        pending: Vec::new().into_iter(),
        shutdown: state.shutdown.clone(),
        _open: OpenStream::new(),
    };
    Ok(Sse::new(reader.into_stream())
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Counts open streams in `gateway_sse_clients`.
struct OpenStream;

impl OpenStream {
    fn new() -> OpenStream {
        METRICS.sse_clients.inc();
        OpenStream
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        METRICS.sse_clients.dec();
    }
}

/// One client's position in the log.
struct Reader {
    events: Arc<Events>,
    changed: watch::Receiver<u64>,
    cursor: u64,
    device: Option<String>,
    pending: std::vec::IntoIter<Arc<Event>>,
    shutdown: CancellationToken,
    _open: OpenStream,
}

impl Reader {
    fn into_stream(self) -> impl Stream<Item = Result<SseEvent, Infallible>> {
        futures_util::stream::unfold(self, |mut reader| async move {
            let event = reader.next().await?;
            Some((Ok(event), reader))
        })
    }

    /// The next SSE event; `None` ends the stream (the gateway is shutting down).
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.pending.next() {
                return Some(
                    SseEvent::default()
                        .id(event.id.to_string())
                        .event(event.kind.name())
                        .data(event.data_json()),
                );
            }
            let batch = self
                .events
                .read_after(self.cursor, self.device.as_deref(), CHUNK);
            self.cursor = batch.cursor;
            self.pending = batch.events.into_iter();
            if batch.missed > 0 {
                return Some(SseEvent::default().event("lagged").data(format!(
                    r#"{{"missed":{},"message":"this client fell behind; older events are no longer kept"}}"#,
                    batch.missed
                )));
            }
            if self.pending.len() > 0 {
                continue;
            }
            // Caught up: sleep until something is published (or the gateway stops).
            self.changed.mark_unchanged();
            if *self.changed.borrow() > self.cursor {
                continue;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                changed = self.changed.changed() => changed.ok()?,
            }
        }
    }
}
