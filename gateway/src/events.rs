//! Live events for `GET /v1/events`: a bounded in-memory log that readers follow at their own pace.
//!
//! Producers append under a short lock and bump a `watch` value; nothing is
//! sent to readers. Each reader (an SSE client) keeps only a cursor, the id of
//! the last event it saw, and copies events out when it is ready to write them.
//! A slow reader therefore costs no memory and slows nobody down: when it comes
//! back after the log has moved past its cursor, it learns how many events it
//! missed and carries on from the oldest one kept.
//!
//! Event ids grow across restarts: the first id of a run is its start time in
//! milliseconds times 1000, so a `Last-Event-ID` from an earlier run is always
//! older than anything kept now (and is reported as a gap, not misread).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::watch;

use crate::time::format_ms;

/// What happened, as the SSE event name says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Telemetry,
    DeviceConnected,
    DeviceDisconnected,
    CommandUpdated,
}

impl EventKind {
    /// The SSE `event:` name.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Telemetry => "telemetry",
            EventKind::DeviceConnected => "device.connected",
            EventKind::DeviceDisconnected => "device.disconnected",
            EventKind::CommandUpdated => "command.updated",
        }
    }
}

/// An event's content, kept as compact as it arrived; JSON is made when a reader takes it.
#[derive(Debug)]
pub enum Payload {
    /// One telemetry point, already committed.
    Telemetry {
        msg_id: Arc<str>,
        seq: u32,
        ts: i64,
        received_at: i64,
        data: Box<RawValue>,
    },
    /// A device connected or disconnected.
    Presence {
        session_id: String,
        at: i64,
        reason: Option<&'static str>,
    },
    /// Already serialized JSON (a command).
    Json(String),
}

/// One live event.
#[derive(Debug)]
pub struct Event {
    /// Increasing; the SSE `id:`.
    pub id: u64,
    pub kind: EventKind,
    pub device_id: Arc<str>,
    pub payload: Payload,
}

impl Event {
    /// The SSE `data:`: one JSON object.
    pub fn data_json(&self) -> String {
        #[derive(Serialize)]
        struct Telemetry<'a> {
            device_id: &'a str,
            id: &'a str,
            seq: u32,
            ts: String,
            received_at: String,
            data: &'a RawValue,
        }
        #[derive(Serialize)]
        struct Presence<'a> {
            device_id: &'a str,
            session_id: &'a str,
            at: String,
            reason: Option<&'a str>,
        }
        match &self.payload {
            Payload::Telemetry {
                msg_id,
                seq,
                ts,
                received_at,
                data,
            } => serde_json::to_string(&Telemetry {
                device_id: &self.device_id,
                id: msg_id,
                seq: *seq,
                ts: format_ms(*ts),
                received_at: format_ms(*received_at),
                data,
            }),
            Payload::Presence {
                session_id,
                at,
                reason,
            } => serde_json::to_string(&Presence {
                device_id: &self.device_id,
                session_id,
                at: format_ms(*at),
                reason: *reason,
            }),
            Payload::Json(text) => return text.clone(),
        }
        .expect("events always serialize")
    }
}

/// What a reader got from [`Events::read_after`].
#[derive(Debug, Default)]
pub struct Batch {
    /// Matching events, oldest first.
    pub events: Vec<Arc<Event>>,
    /// Events that left the log before the reader got to them (any device).
    pub missed: u64,
    /// The reader's new cursor.
    pub cursor: u64,
}

#[derive(Debug)]
struct Ring {
    events: VecDeque<Arc<Event>>,
    capacity: usize,
    next_id: u64,
}

/// The event log, shared by every producer and reader.
#[derive(Debug)]
pub struct Events {
    ring: Mutex<Ring>,
    latest: watch::Sender<u64>,
    first_id: u64,
}

/// Events a reader examines per call, so a filtered reader far behind never holds the lock long.
const SCAN_LIMIT: usize = 1024;

impl Events {
    /// A log keeping the last `capacity` events, numbering them from `first_id`.
    pub fn new(capacity: usize, first_id: u64) -> Events {
        let capacity = capacity.max(1);
        Events {
            ring: Mutex::new(Ring {
                events: VecDeque::with_capacity(capacity.min(65_536)),
                capacity,
                next_id: first_id,
            }),
            latest: watch::Sender::new(first_id - 1),
            first_id,
        }
    }

    /// A log whose ids start above every id an earlier run could have used.
    pub fn starting_now(capacity: usize) -> Events {
        let now = crate::time::now_ms().max(1) as u64;
        Events::new(capacity, now * 1000)
    }

    /// Appends one event.
    pub fn publish(&self, kind: EventKind, device_id: Arc<str>, payload: Payload) {
        self.publish_all([(kind, device_id, payload)]);
    }

    /// Appends several events under one lock, waking readers once.
    pub fn publish_all(&self, items: impl IntoIterator<Item = (EventKind, Arc<str>, Payload)>) {
        let newest = {
            let mut ring = self.ring.lock().expect("events lock");
            let mut appended = false;
            for (kind, device_id, payload) in items {
                let id = ring.next_id;
                ring.next_id += 1;
                if ring.events.len() == ring.capacity {
                    ring.events.pop_front();
                }
                ring.events.push_back(Arc::new(Event {
                    id,
                    kind,
                    device_id,
                    payload,
                }));
                appended = true;
            }
            if !appended {
                return;
            }
            ring.next_id - 1
        };
        self.latest.send_replace(newest);
    }

    /// The id of the newest event (the cursor of a reader that wants only new ones).
    pub fn latest_id(&self) -> u64 {
        *self.latest.borrow()
    }

    /// A receiver that changes whenever events are appended.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// Events after `cursor` (for `device` only, if given), up to `max`.
    pub fn read_after(&self, cursor: u64, device: Option<&str>, max: usize) -> Batch {
        let ring = self.ring.lock().expect("events lock");
        let newest = ring.next_id - 1;
        let Some(oldest) = ring.events.front().map(|e| e.id) else {
            return Batch {
                cursor: cursor.max(newest),
                // Nothing was published in this run yet; an id from before it names lost events.
                missed: u64::from(cursor < self.first_id - 1),
                ..Batch::default()
            };
        };
        let (missed, start) = if cursor + 1 < oldest {
            let missed = if cursor + 1 >= self.first_id {
                oldest - cursor - 1
            } else {
                // From an earlier run: how many is unknown, say at least one.
                1.max(oldest - self.first_id)
            };
            (missed, 0)
        } else {
            (0, (cursor + 1 - oldest) as usize)
        };
        let mut batch = Batch {
            missed,
            cursor: cursor.max(oldest - 1),
            events: Vec::new(),
        };
        for event in ring
            .events
            .range(start.min(ring.events.len())..)
            .take(SCAN_LIMIT)
        {
            batch.cursor = event.id;
            if device.is_none_or(|d| *event.device_id == *d) {
                batch.events.push(event.clone());
                if batch.events.len() == max {
                    break;
                }
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(device: &str) -> (EventKind, Arc<str>, Payload) {
        (
            EventKind::DeviceConnected,
            Arc::from(device),
            Payload::Presence {
                session_id: "s".into(),
                at: 0,
                reason: None,
            },
        )
    }

    #[test]
    fn readers_resume_after_their_cursor_and_filter_by_device() {
        let log = Events::new(10, 100);
        assert_eq!(log.latest_id(), 99);
        log.publish_all([presence("a"), presence("b"), presence("a")]);
        assert_eq!(log.latest_id(), 102);
        let all = log.read_after(99, None, 100);
        assert_eq!(
            all.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            [100, 101, 102]
        );
        assert_eq!((all.missed, all.cursor), (0, 102));
        let a = log.read_after(100, Some("a"), 100);
        assert_eq!(a.events.iter().map(|e| e.id).collect::<Vec<_>>(), [102]);
        assert!(log.read_after(102, None, 100).events.is_empty());
    }

    #[test]
    fn a_reader_behind_the_log_is_told_how_many_it_missed() {
        let log = Events::new(3, 1);
        for _ in 0..10 {
            log.publish_all([presence("a")]);
        }
        let b = log.read_after(2, None, 100);
        assert_eq!(b.missed, 5, "events 3..=7 are gone");
        assert_eq!(b.events.first().map(|e| e.id), Some(8));
        assert_eq!(b.cursor, 10);
        let capped = log.read_after(7, None, 2);
        assert_eq!(capped.events.len(), 2);
        assert_eq!(
            capped.cursor, 9,
            "the cursor stops where the reader stopped"
        );
    }

    #[test]
    fn an_id_from_an_earlier_run_is_a_gap_not_a_position() {
        let log = Events::new(5, 1000);
        let empty = log.read_after(10, None, 100);
        assert_eq!((empty.missed, empty.cursor), (1, 999));
        log.publish_all([presence("a")]);
        let b = log.read_after(10, None, 100);
        assert!(b.missed >= 1);
        assert_eq!(b.events.len(), 1);
    }

    #[test]
    fn telemetry_data_is_the_contract_shape() {
        let log = Events::new(5, 1);
        log.publish(
            EventKind::Telemetry,
            Arc::from("d1"),
            Payload::Telemetry {
                msg_id: Arc::from("m-1"),
                seq: 2,
                ts: 0,
                received_at: 1,
                data: RawValue::from_string(r#"{"t":1}"#.into()).unwrap(),
            },
        );
        let e = &log.read_after(0, None, 1).events[0];
        assert_eq!(e.kind.name(), "telemetry");
        assert_eq!(
            e.data_json(),
            r#"{"device_id":"d1","id":"m-1","seq":2,"ts":"1970-01-01T00:00:00.000Z","received_at":"1970-01-01T00:00:00.001Z","data":{"t":1}}"#
        );
    }
}
