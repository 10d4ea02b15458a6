//! Store-and-forward for one device: readings wait here until they are sent, and sent messages
//! until the gateway acks them. Nothing acked is sent again; a message without an ack is sent
//! again (same id, same content) after a reconnect; readings that pile up while offline go out
//! as `points` batches; when the buffer is full the oldest reading is dropped and counted.

use std::collections::VecDeque;

use serde_json::Value;
use tokio::time::{Duration, Instant};

use crate::proto;

/// Points per telemetry message at most (the protocol's limit).
pub const MAX_POINTS: usize = 1000;
/// Room left for the envelope (`{"type":"telemetry","id":"...","points":[]}`) under the size limit.
const ENVELOPE_BYTES: usize = 256;

/// One reading as it will be sent: its own timestamp and its data.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub ts: String,
    pub data: Value,
}

/// A message sent and not acked yet.
#[derive(Debug)]
struct InFlight {
    id: String,
    points: Vec<Point>,
    sent_at: Instant,
}

/// What became of a message the gateway refused.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// Not ours (or not in flight any more).
    Unknown,
    /// Back at the head of the buffer, to go out again with the next message.
    Requeued(usize),
    /// Refused for good (`invalid_message`): these points are lost, and counted.
    Rejected(usize),
}

/// The buffer and the messages in flight of one device.
#[derive(Debug)]
pub struct Outbox {
    waiting: VecDeque<Point>,
    capacity: usize,
    in_flight: VecDeque<InFlight>,
    max_in_flight: usize,
}

impl Outbox {
    /// Keeps up to `capacity` readings waiting and `max_in_flight` messages unacked.
    pub fn new(capacity: usize, max_in_flight: usize) -> Outbox {
        Outbox {
            waiting: VecDeque::new(),
            capacity: capacity.max(1),
            in_flight: VecDeque::new(),
            max_in_flight: max_in_flight.max(1),
        }
    }

    /// Adds a reading; returns how many old readings had to be dropped to make room (0 or 1).
    pub fn push(&mut self, point: Point) -> u64 {
        self.waiting.push_back(point);
        if self.waiting.len() > self.capacity {
            self.waiting.pop_front();
            return 1;
        }
        0
    }

    /// Readings not sent yet.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Points sent and not acked yet.
    pub fn unacked_points(&self) -> usize {
        self.in_flight.iter().map(|m| m.points.len()).sum()
    }

    /// The next message to send, with the id `next_id` gives it: one reading as a single point,
    /// several as a `points` batch of at most [`MAX_POINTS`] points and `max_bytes` bytes. `None`
    /// when nothing waits or `max_in_flight` messages await their ack.
    pub fn next_message(
        &mut self,
        next_id: impl FnOnce() -> String,
        max_bytes: usize,
        now: Instant,
    ) -> Option<String> {
        if self.waiting.is_empty() || self.in_flight.len() >= self.max_in_flight {
            return None;
        }
        let budget = max_bytes.saturating_sub(ENVELOPE_BYTES);
        let mut points = Vec::new();
        let mut bytes = 0;
        while let Some(point) = self.waiting.front() {
            // ts, data and the punctuation around them.
            let size = point.ts.len() + point.data.to_string().len() + 20;
            if points.len() == MAX_POINTS || (!points.is_empty() && bytes + size > budget) {
                break;
            }
            bytes += size;
            points.extend(self.waiting.pop_front());
        }
        let id = next_id();
        let text = render(&id, &points);
        self.in_flight.push_back(InFlight {
            id,
            points,
            sent_at: now,
        });
        Some(text)
    }

    /// The gateway acked `id`: forgets it and returns how long the ack took (`None`: not ours,
    /// or acked before, as a duplicate send is).
    pub fn ack(&mut self, id: &str, now: Instant) -> Option<Duration> {
        let index = self.in_flight.iter().position(|m| m.id == id)?;
        let message = self.in_flight.remove(index)?;
        Some(now.saturating_duration_since(message.sent_at))
    }

    /// The gateway answered `id` with an `error` of `code`: the message was not stored. When
    /// retrying can help (`rate_limited`, `internal`) its points go back to the head of the
    /// buffer; otherwise they are rejected.
    pub fn refused(&mut self, id: &str, code: &str) -> Refused {
        let Some(index) = self.in_flight.iter().position(|m| m.id == id) else {
            return Refused::Unknown;
        };
        let Some(message) = self.in_flight.remove(index) else {
            return Refused::Unknown;
        };
        let count = message.points.len();
        if matches!(code, "rate_limited" | "internal") {
            for point in message.points.into_iter().rev() {
                self.waiting.push_front(point);
            }
            Refused::Requeued(count)
        } else {
            Refused::Rejected(count)
        }
    }

    /// Every message still unacked, oldest first, as sent before (same id, same content), for
    /// sending again after a reconnect; their latency now counts from now.
    pub fn resend(&mut self, now: Instant) -> Vec<String> {
        self.in_flight
            .iter_mut()
            .map(|message| {
                message.sent_at = now;
                render(&message.id, &message.points)
            })
            .collect()
    }
}

/// One point as a single telemetry message, several as a `points` batch.
fn render(id: &str, points: &[Point]) -> String {
    match points {
        [point] => proto::telemetry(id, &point.ts, &point.data),
        points => {
            let points: Vec<Value> = points
                .iter()
                .map(|p| serde_json::json!({"ts": p.ts, "data": p.data}))
                .collect();
            serde_json::json!({"type": "telemetry", "id": id, "points": points}).to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn point(n: u64) -> Point {
        Point {
            ts: format!("2026-11-25T10:00:{:02}.000Z", n % 60),
            data: json!({"counter": n}),
        }
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("m-{n}")
        }
    }

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn one_reading_goes_out_as_a_single_point() {
        let mut outbox = Outbox::new(10, 4);
        let now = Instant::now();
        assert_eq!(outbox.next_message(|| "m-0".into(), 65536, now), None);
        outbox.push(point(7));
        let text = outbox.next_message(|| "m-1".into(), 65536, now).unwrap();
        assert_eq!(
            parse(&text),
            json!({"type":"telemetry","id":"m-1","ts":"2026-11-25T10:00:07.000Z","data":{"counter":7}})
        );
        assert_eq!(outbox.waiting(), 0);
        assert_eq!(outbox.unacked_points(), 1);
        assert_eq!(
            outbox.ack("m-1", now + Duration::from_millis(5)),
            Some(Duration::from_millis(5))
        );
        assert_eq!(outbox.ack("m-1", now), None, "a second ack is a duplicate");
        assert_eq!(outbox.unacked_points(), 0);
    }

    #[test]
    fn a_backlog_goes_out_in_batches_of_at_most_1000_points_in_order() {
        let mut outbox = Outbox::new(5000, 10);
        for n in 0..2500 {
            outbox.push(point(n));
        }
        let mut next = ids();
        let now = Instant::now();
        let sizes: Vec<usize> = std::iter::from_fn(|| outbox.next_message(&mut next, 1 << 20, now))
            .map(|text| parse(&text)["points"].as_array().unwrap().len())
            .collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        let texts = outbox.resend(now);
        let counters: Vec<u64> = texts
            .iter()
            .flat_map(|t| {
                let value = parse(t);
                value["points"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["data"]["counter"].as_u64().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(counters, (0..2500).collect::<Vec<_>>());
    }

    #[test]
    fn batches_stay_under_the_message_size_limit() {
        let mut outbox = Outbox::new(5000, 100);
        for n in 0..1000 {
            outbox.push(point(n));
        }
        let mut next = ids();
        let now = Instant::now();
        let mut total = 0;
        while let Some(text) = outbox.next_message(&mut next, 4096, now) {
            assert!(text.len() <= 4096, "{} bytes", text.len());
            total += parse(&text)["points"].as_array().map_or(1, Vec::len);
        }
        assert_eq!(total, 1000);
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_and_says_so() {
        let mut outbox = Outbox::new(3, 4);
        let dropped: u64 = (0..5).map(|n| outbox.push(point(n))).sum();
        assert_eq!(dropped, 2);
        let text = outbox
            .next_message(|| "m-1".into(), 65536, Instant::now())
            .unwrap();
        let counters: Vec<_> = parse(&text)["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["data"]["counter"].clone())
            .collect();
        assert_eq!(counters, [json!(2), json!(3), json!(4)]);
    }

    #[test]
    fn no_more_than_the_window_is_in_flight() {
        let mut outbox = Outbox::new(100, 2);
        let mut next = ids();
        let now = Instant::now();
        outbox.push(point(0));
        assert!(outbox.next_message(&mut next, 65536, now).is_some());
        outbox.push(point(1));
        assert!(outbox.next_message(&mut next, 65536, now).is_some());
        outbox.push(point(2));
        assert_eq!(outbox.next_message(&mut next, 65536, now), None);
        assert_eq!(outbox.waiting(), 1);
        outbox.ack("m-1", now);
        assert!(outbox.next_message(&mut next, 65536, now).is_some());
    }

    #[test]
    fn unacked_messages_are_resent_as_they_were_and_acked_ones_never() {
        let mut outbox = Outbox::new(100, 10);
        let mut next = ids();
        let now = Instant::now();
        let mut sent = Vec::new();
        for n in 0..3 {
            outbox.push(point(n));
            sent.push(outbox.next_message(&mut next, 65536, now).unwrap());
        }
        outbox.ack("m-2", now);
        assert_eq!(outbox.resend(now), [sent[0].clone(), sent[2].clone()]);
    }

    #[test]
    fn retryable_refusals_requeue_and_others_reject() {
        let mut outbox = Outbox::new(100, 10);
        let mut next = ids();
        let now = Instant::now();
        for n in 0..2 {
            outbox.push(point(n));
        }
        outbox.next_message(&mut next, 65536, now).unwrap();
        outbox.push(point(2));
        assert_eq!(outbox.refused("m-1", "rate_limited"), Refused::Requeued(2));
        assert_eq!(outbox.refused("m-1", "rate_limited"), Refused::Unknown);
        // The requeued points go out first, in their order, with the newer one after them.
        let text = outbox.next_message(&mut next, 65536, now).unwrap();
        let counters: Vec<_> = parse(&text)["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["data"]["counter"].as_u64().unwrap())
            .collect();
        assert_eq!(counters, [0, 1, 2]);
        assert_eq!(
            outbox.refused("m-2", "invalid_message"),
            Refused::Rejected(3)
        );
        assert_eq!(outbox.unacked_points() + outbox.waiting(), 0);
    }
}
