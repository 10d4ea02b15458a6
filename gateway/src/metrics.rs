//! Prometheus metrics: counters and histograms updated on the hot paths, rendered at `/metrics`.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A label with one static value (`outcome`, `type`, `reason`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// Label for message types.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub r#type: &'static str,
}

/// Label for rejection and disconnect reasons.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

/// Label for command statuses.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandStatus {
    pub status: &'static str,
}

/// Labels of an operator API request: its method, its route as declared (`/v1/devices/{id}`,
/// so that ids do not make new series) and its status class (`2xx` ... `5xx`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiRequest {
    pub method: &'static str,
    pub route: String,
    pub status: &'static str,
}

/// How a histogram of seconds is made: 0.1 ms doubling to 3.3 s.
type SecondsHistogram = fn() -> Histogram;

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Every metric the gateway exports.
pub struct Metrics {
    pub connections: Gauge,
    pub accept_failures: Counter,
    pub handshakes: Family<Outcome, Counter>,
    pub messages: Family<Kind, Counter>,
    /// `messages{type="telemetry"}`, resolved once: it is counted on the hot path.
    pub telemetry_messages: Counter,
    pub acks: Counter,
    pub rejections: Family<Reason, Counter>,
    pub disconnects: Family<Reason, Counter>,
    pub batch_rows: Histogram,
    pub commit_seconds: Histogram,
    pub commit_failures: Counter,
    pub wal_bytes: Gauge,
    pub wal_checkpoint_passes: Counter,
    pub wal_checkpoint_tails: Counter,
    pub commands: Family<CommandStatus, Counter>,
    pub sse_clients: Gauge,
    pub api_request_seconds: Family<ApiRequest, Histogram, SecondsHistogram>,
    registry: Registry,
}

impl Metrics {
    fn new() -> Metrics {
        let connections = Gauge::default();
        let accept_failures = Counter::default();
        let handshakes = Family::<Outcome, Counter>::default();
        let messages = Family::<Kind, Counter>::default();
        let telemetry_messages = messages
            .get_or_create(&Kind {
                r#type: "telemetry",
            })
            .clone();
        let acks = Counter::default();
        let rejections = Family::<Reason, Counter>::default();
        let disconnects = Family::<Reason, Counter>::default();
        let batch_rows = Histogram::new(exponential_buckets(1.0, 4.0, 8));
        let commit_seconds = seconds_histogram();
        let commit_failures = Counter::default();
        let wal_bytes = Gauge::default();
        let wal_checkpoint_passes = Counter::default();
        let wal_checkpoint_tails = Counter::default();
        let commands = Family::<CommandStatus, Counter>::default();
        let sse_clients = Gauge::default();
        let api_request_seconds =
            Family::new_with_constructor(seconds_histogram as SecondsHistogram);
        let mut r = Registry::with_prefix("gateway");
        r.register(
            "connections",
            "Device connections open now",
            connections.clone(),
        );
        r.register(
            "accept_failures",
            "Failed accepts of device connections (out of file descriptors, say)",
            accept_failures.clone(),
        );
        r.register(
            "handshakes",
            "Device handshakes by outcome",
            handshakes.clone(),
        );
        r.register(
            "messages",
            "Device messages received by type",
            messages.clone(),
        );
        r.register(
            "telemetry_acks",
            "Telemetry messages acked after commit",
            acks.clone(),
        );
        r.register(
            "rejections",
            "Device messages refused, by reason",
            rejections.clone(),
        );
        r.register(
            "disconnects",
            "Device sessions ended, by reason",
            disconnects.clone(),
        );
        r.register(
            "batch_rows",
            "Telemetry rows per committed batch",
            batch_rows.clone(),
        );
        r.register(
            "commit_seconds",
            "Time to commit one batch, its sync included",
            commit_seconds.clone(),
        );
        r.register(
            "commit_failures",
            "Batches whose commit failed",
            commit_failures.clone(),
        );
        r.register(
            "wal_bytes",
            "Size of the SQLite WAL file after the last commit or checkpoint",
            wal_bytes.clone(),
        );
        r.register(
            "wal_checkpoint_passes",
            "WAL checkpoint passes run beside the writer",
            wal_checkpoint_passes.clone(),
        );
        r.register(
            "wal_checkpoint_tails",
            "WAL tails the writer copied itself, after the passes, to restart the WAL",
            wal_checkpoint_tails.clone(),
        );
        r.register(
            "commands",
            "Command status transitions, by the status reached",
            commands.clone(),
        );
        r.register(
            "sse_clients",
            "Live event streams open now",
            sse_clients.clone(),
        );
        r.register(
            "api_request_seconds",
            "Operator API requests under /v1, from the request to its response's head (a command's wait_s included), by method, route and status class",
            api_request_seconds.clone(),
        );
        Metrics {
            connections,
            accept_failures,
            handshakes,
            messages,
            telemetry_messages,
            acks,
            rejections,
            disconnects,
            batch_rows,
            commit_seconds,
            commit_failures,
            wal_bytes,
            wal_checkpoint_passes,
            wal_checkpoint_tails,
            commands,
            sse_clients,
            api_request_seconds,
            registry: r,
        }
    }

    /// Counts a handshake outcome.
    pub fn handshake(&self, outcome: &'static str) {
        self.handshakes.get_or_create(&Outcome { outcome }).inc();
    }

    /// Counts a received message by type.
    pub fn message(&self, kind: &'static str) {
        self.messages.get_or_create(&Kind { r#type: kind }).inc();
    }

    /// Counts a refused message by reason.
    pub fn rejection(&self, reason: &'static str) {
        self.rejections.get_or_create(&Reason { reason }).inc();
    }

    /// Counts a command reaching a status.
    pub fn command(&self, status: &'static str) {
        self.commands.get_or_create(&CommandStatus { status }).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        METRICS.handshake("ok");
        METRICS.message("telemetry");
        let text = METRICS.render();
        assert!(text.contains("# TYPE gateway_handshakes counter"), "{text}");
        assert!(
            text.contains("gateway_handshakes_total{outcome=\"ok\"}"),
            "{text}"
        );
        assert!(
            text.contains("gateway_messages_total{type=\"telemetry\"}"),
            "{text}"
        );
    }
}
