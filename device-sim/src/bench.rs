//! `device-sim bench`: acked telemetry throughput and ack latency, each device keeping a fixed
//! number of messages in flight. Every failure is counted and reported, never smoothed over.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::cli::{BenchArgs, Common};
use crate::conn::{self, Ws};
use crate::fleet;
use crate::proto::{self, Incoming};
use crate::shards::{self, Role, Shards};
use crate::stats::{self, ErrorTally};
use crate::tokens::Secret;

/// How long to wait for the acks of messages still in flight when the window closes.
pub(crate) const DRAIN: Duration = Duration::from_secs(5);
/// After an `error` answer, pause a device's sending this long rather than spin on refusals.
const ERROR_PAUSE: Duration = Duration::from_millis(50);
/// Latencies are recorded in microseconds, up to a minute.
pub(crate) const MAX_LATENCY_US: u64 = 60_000_000;

/// Runs the benchmark; `Ok(false)` means it ran but saw errors.
pub async fn bench(common: &Common, args: &BenchArgs) -> Result<bool> {
    if args.inflight == 0 || args.duration.is_zero() {
        bail!("--inflight and --duration must be positive");
    }
    let role = args
        .sharding
        .role(args.devices, shards::connections_per_process())?;
    let provision = common.provision && !matches!(role, Role::Child(_));
    let creds = fleet::credentials(common, args.devices, provision).await?;
    match role {
        Role::Alone => alone(common, args, creds).await,
        Role::Child(shard) => child(common, args, shard.take(creds)).await,
        Role::Parent(count) => parent(common, args, count).await,
    }
}

/// The whole fleet in this process.
async fn alone(common: &Common, args: &BenchArgs, creds: Vec<(String, Secret)>) -> Result<bool> {
    let tally = Arc::new(ErrorTally::default());
    let started = Instant::now();
    let (sessions, limits) = connect_all(common, args, creds, &tally).await?;
    let connected = sessions.len();
    announce(common, args, connected, started, "")?;
    limits.check(args)?;
    let plan = Plan::starting_at(
        Instant::now() + Duration::from_millis(100),
        args.warmup,
        args.duration,
    );
    let total = load(sessions, args, plan, &tally).await?;
    finish(args, connected, &total, &tally, limits)
}

/// One shard: connects its devices, reports, loads them from the instant the parent names,
/// and reports what they measured.
async fn child(common: &Common, args: &BenchArgs, creds: Vec<(String, Secret)>) -> Result<bool> {
    let mut orders = shards::parent_lines();
    let tally = Arc::new(ErrorTally::default());
    let (sessions, limits) = connect_all(common, args, creds, &tally).await?;
    let connected = sessions.len();
    shards::report(&ShardReport::Connected { connected, limits })?;
    let Some(order) = orders.recv().await else {
        // The parent is gone (or gave up): nothing to measure for.
        return Ok(false);
    };
    let start: u64 = order
        .trim()
        .parse()
        .with_context(|| format!("the parent sent `{order}`, not a start time"))?;
    let plan = Plan::starting_at(instant_of_unix_ms(start), args.warmup, args.duration);
    let total = load(sessions, args, plan, &tally).await?;
    shards::report(&ShardReport::measured(&total, tally.snapshot()))?;
    Ok(true)
}

/// Starts `count` shards, opens their measurement window at the same instant, adds up.
async fn parent(common: &Common, args: &BenchArgs, count: usize) -> Result<bool> {
    let tally = Arc::new(ErrorTally::default());
    let started = Instant::now();
    eprintln!(
        "bench: {} devices over {count} processes (--processes)",
        args.devices
    );
    // Ctrl-C reaches the children too; they stop on their own.
    let mut children = Shards::spawn(count, CancellationToken::new())?;
    let (mut connected, mut limits) = (0, Limits::default());
    for report in children.next_reports().await? {
        match report {
            ShardReport::Connected {
                connected: n,
                limits: l,
            } => {
                connected += n;
                limits = limits.merge(l);
            }
            other => bail!("a shard reported {other:?} before connecting"),
        }
    }
    announce(
        common,
        args,
        connected,
        started,
        &format!(" ({count} processes)"),
    )?;
    limits.check(args)?;
    // One clock for all: the processes share the machine's.
    let start = unix_ms() + 200;
    children.tell(&start.to_string()).await?;
    let mut total = DeviceReport::new(latency_histogram()?);
    for report in children.next_reports().await? {
        match report {
            ShardReport::Measured {
                sent,
                acked_in_window,
                unacked,
                latency_us,
                errors,
            } => {
                let mut part = DeviceReport::new(latency_histogram()?);
                part.sent = sent;
                part.acked_in_window = acked_in_window;
                part.unacked = unacked;
                for (value, count) in latency_us {
                    part.latency_us.saturating_record_n(value, count);
                }
                total.merge(&part)?;
                tally.add(&errors);
            }
            other => bail!("a shard reported {other:?} instead of its measurement"),
        }
    }
    let children_clean = children.wait().await?;
    Ok(finish(args, connected, &total, &tally, limits)? && children_clean)
}

/// Prints how many devices connected; an error when none did.
fn announce(
    common: &Common,
    args: &BenchArgs,
    connected: usize,
    since: Instant,
    how: &str,
) -> Result<()> {
    if connected == 0 {
        bail!("no device could connect to {}", common.url);
    }
    eprintln!(
        "bench: {connected}/{} devices connected to {} in {:.2}s{how}",
        args.devices,
        common.url,
        since.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prints the results; true when there was no error.
pub(crate) fn finish(
    args: &BenchArgs,
    connected: usize,
    total: &DeviceReport,
    tally: &ErrorTally,
    limits: Limits,
) -> Result<bool> {
    let results = Results::new(args, connected, total, tally, limits.rate);
    if args.json {
        eprint!("{}", results.table());
        println!("{}", results.json());
    } else {
        print!("{}", results.table());
    }
    Ok(results.errors == 0)
}

/// What a shard tells its parent, one JSON line each.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "snake_case")]
enum ShardReport {
    /// Its devices are connected (those that could).
    Connected { connected: usize, limits: Limits },
    /// What its devices measured; latencies as (microseconds, count) pairs.
    Measured {
        sent: u64,
        acked_in_window: u64,
        unacked: u64,
        latency_us: Vec<(u64, u64)>,
        errors: BTreeMap<String, u64>,
    },
}

impl ShardReport {
    fn measured(total: &DeviceReport, errors: BTreeMap<String, u64>) -> ShardReport {
        ShardReport::Measured {
            sent: total.sent,
            acked_in_window: total.acked_in_window,
            unacked: total.unacked,
            latency_us: total
                .latency_us
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
            errors,
        }
    }
}

/// The gateway's limits from the welcomes, the smallest when devices were told different ones.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct Limits {
    /// Telemetry messages per second per device.
    rate: Option<f64>,
    /// Largest message, in bytes.
    size: Option<u64>,
}

impl Limits {
    fn merge(self, other: Limits) -> Limits {
        Limits {
            rate: min_option(self.rate, other.rate),
            size: min_option(self.size, other.size),
        }
    }

    /// Refuses a message size the gateway would refuse.
    fn check(&self, args: &BenchArgs) -> Result<()> {
        if let Some(max) = self.size.filter(|max| args.payload_bytes as u64 > *max) {
            bail!(
                "--payload-bytes {} exceeds the gateway's max_message_bytes {max}",
                args.payload_bytes
            );
        }
        Ok(())
    }
}

/// Connects every device first, so connection setup does not blur the measurement.
async fn connect_all(
    common: &Common,
    args: &BenchArgs,
    creds: Vec<(String, Secret)>,
    tally: &Arc<ErrorTally>,
) -> Result<(Vec<(String, Ws)>, Limits)> {
    // Source addresses are spread for the whole fleet, whichever part of it this process runs.
    let connector = fleet::connector(common, args.devices).await?;
    let mut connecting = JoinSet::new();
    for (id, token) in creds {
        let (connector, tally) = (connector.clone(), tally.clone());
        connecting.spawn(async move {
            let connected = connector.with_retries(&id, &token, 1, &tally).await;
            connected.ok().map(|(ws, welcome)| (id, ws, welcome))
        });
    }
    let mut sessions = Vec::new();
    let mut limits = Limits::default();
    while let Some(joined) = connecting.join_next().await {
        match joined {
            Ok(Some((id, ws, welcome))) => {
                limits = limits.merge(Limits {
                    rate: welcome.limits.telemetry_per_sec,
                    size: welcome.limits.max_message_bytes,
                });
                sessions.push((id, ws));
            }
            Ok(None) => {}
            Err(e) => tally.record("internal: connect task failed", e),
        }
    }
    Ok((sessions, limits))
}

/// Drives every connected device through `plan` and adds up what they measured.
async fn load(
    sessions: Vec<(String, Ws)>,
    args: &BenchArgs,
    plan: Plan,
    tally: &Arc<ErrorTally>,
) -> Result<DeviceReport> {
    let histogram = latency_histogram()?;
    let boot = unix_ms();
    let mut load = JoinSet::new();
    for (id, ws) in sessions {
        let device = LoadedDevice {
            id,
            boot,
            inflight: args.inflight,
            payload_bytes: args.payload_bytes,
            plan,
            tally: tally.clone(),
            report: DeviceReport::new(histogram.clone()),
        };
        load.spawn(device.drive(ws));
    }
    let mut total = DeviceReport::new(histogram);
    while let Some(joined) = load.join_next().await {
        match joined {
            Ok(report) => total.merge(&report)?,
            Err(e) => tally.record("internal: device task failed", e),
        }
    }
    Ok(total)
}

pub(crate) fn latency_histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)?)
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// The monotonic instant of a wall-clock time (now, if it is long past).
fn instant_of_unix_ms(at: u64) -> Instant {
    let (now, now_ms) = (Instant::now(), unix_ms());
    if at >= now_ms {
        now + Duration::from_millis(at - now_ms)
    } else {
        now.checked_sub(Duration::from_millis(now_ms - at))
            .unwrap_or(now)
    }
}

fn min_option<T: PartialOrd + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b < a { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// When load starts, when the measurement window opens and closes, when to give up on acks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub start: Instant,
    pub measure_from: Instant,
    pub measure_until: Instant,
    pub drain_until: Instant,
}

impl Plan {
    /// Load from `start`, measured after `warmup` for `duration`.
    pub fn starting_at(start: Instant, warmup: Duration, duration: Duration) -> Plan {
        let measure_from = start + warmup;
        let measure_until = measure_from + duration;
        Plan {
            start,
            measure_from,
            measure_until,
            drain_until: measure_until + DRAIN,
        }
    }

    pub fn in_window(&self, at: Instant) -> bool {
        self.measure_from <= at && at < self.measure_until
    }
}

/// What one device measured.
pub(crate) struct DeviceReport {
    pub sent: u64,
    pub acked_in_window: u64,
    pub unacked: u64,
    pub latency_us: Histogram<u64>,
}

impl DeviceReport {
    pub fn new(latency_us: Histogram<u64>) -> DeviceReport {
        DeviceReport {
            sent: 0,
            acked_in_window: 0,
            unacked: 0,
            latency_us,
        }
    }

    pub fn merge(&mut self, other: &DeviceReport) -> Result<()> {
        self.sent += other.sent;
        self.acked_in_window += other.acked_in_window;
        self.unacked += other.unacked;
        self.latency_us
            .add(&other.latency_us)
            .map_err(|e| anyhow!("merging histograms: {e:?}"))
    }
}

/// The `data` of a benchmark message; `pad` brings the message to the requested size.
#[derive(Serialize)]
struct BenchData<'a> {
    seq: u64,
    temp: f64,
    pad: &'a str,
}

/// A telemetry message of about `target` bytes (exactly, unless the bare message is longer).
pub fn bench_message(id: &str, ts: &str, seq: u64, target: usize) -> String {
    let temp = 20.0 + (seq % 100) as f64 / 10.0;
    let bare = proto::telemetry(id, ts, &BenchData { seq, temp, pad: "" });
    let pad = "x".repeat(target.saturating_sub(bare.len()));
    if pad.is_empty() {
        return bare;
    }
    proto::telemetry(
        id,
        ts,
        &BenchData {
            seq,
            temp,
            pad: &pad,
        },
    )
}

/// What a device under load does after a frame.
enum Flow {
    Go,
    /// The gateway answered with an `error`: pause sending.
    Pause,
    /// The connection is over.
    End,
}

/// One device under load.
struct LoadedDevice {
    id: String,
    boot: u64,
    inflight: usize,
    payload_bytes: usize,
    plan: Plan,
    tally: Arc<ErrorTally>,
    report: DeviceReport,
}

impl LoadedDevice {
    /// Keeps `inflight` messages outstanding until the window closes, then collects the last acks.
    async fn drive(mut self, mut ws: Ws) -> DeviceReport {
        let prefix = format!("{}-{}-", self.id, self.boot);
        // Message number and send time of each message in flight.
        let mut pending: Vec<(u64, Instant)> = Vec::with_capacity(self.inflight);
        let mut next_seq = 0;
        let mut sending = true;
        let mut paused = false;
        let window_end = sleep_until(self.plan.measure_until);
        let drain_end = sleep_until(self.plan.drain_until);
        let pause = sleep_until(self.plan.start);
        tokio::pin!(window_end, drain_end, pause);

        sleep_until(self.plan.start).await;
        let mut healthy = true;
        'run: loop {
            if sending && !paused {
                if let Err(e) = self.fill(&mut ws, &mut pending, &mut next_seq).await {
                    self.tally
                        .record("connection lost", format!("{}: {e}", self.id));
                    healthy = false;
                    break;
                }
            }
            if !sending && pending.is_empty() {
                break;
            }
            tokio::select! {
                frame = ws.next() => {
                    // Frames that arrived together (a batch of acks) are all taken before the
                    // next fill, so the messages they make room for go out in one write.
                    let mut frame = Some(frame);
                    while let Some(this) = frame {
                        let now = Instant::now();
                        match self.on_frame(this, &prefix, &mut pending, now) {
                            Flow::Go => {}
                            Flow::Pause => {
                                paused = true;
                                pause.as_mut().reset(now + ERROR_PAUSE);
                            }
                            Flow::End => {
                                healthy = false;
                                break 'run;
                            }
                        }
                        frame = ws.next().now_or_never();
                    }
                }
                _ = &mut window_end, if sending => sending = false,
                _ = &mut pause, if paused => paused = false,
                _ = &mut drain_end => {
                    self.tally.record("unacked at the end", format!("{}: {} messages had no ack {DRAIN:?} after the window closed", self.id, pending.len()));
                    break;
                }
            }
        }
        self.report.unacked += pending.len() as u64;
        if healthy {
            conn::close(&mut ws).await;
        }
        self.report
    }

    async fn fill(
        &mut self,
        ws: &mut Ws,
        pending: &mut Vec<(u64, Instant)>,
        next_seq: &mut u64,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        if pending.len() >= self.inflight {
            return Ok(());
        }
        while pending.len() < self.inflight {
            let seq = *next_seq;
            *next_seq += 1;
            let id = proto::message_id(&self.id, self.boot, seq);
            let text = bench_message(&id, &proto::now_rfc3339(), seq, self.payload_bytes);
            let sent_at = Instant::now();
            ws.feed(Message::text(text)).await?;
            pending.push((seq, sent_at));
            self.report.sent += 1;
        }
        // One write for all of them (as a device with a backlog sends it).
        ws.flush().await
    }

    /// Handles what the socket gave: a frame, an error or its end.
    fn on_frame(
        &mut self,
        frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
        prefix: &str,
        pending: &mut Vec<(u64, Instant)>,
        now: Instant,
    ) -> Flow {
        match frame {
            Some(Ok(Message::Text(text))) => {
                if self.on_text(&text, prefix, pending, now) {
                    return Flow::Pause;
                }
                Flow::Go
            }
            Some(Ok(Message::Close(frame))) => {
                let code = conn::close_code_of(&frame).unwrap_or(1005);
                self.tally.record(
                    &format!("closed: {code}"),
                    format!("{} closed by the gateway mid-benchmark", self.id),
                );
                Flow::End
            }
            Some(Ok(_)) => Flow::Go,
            Some(Err(e)) => {
                self.tally
                    .record("connection lost", format!("{}: {e}", self.id));
                Flow::End
            }
            None => {
                self.tally.record(
                    "connection lost",
                    format!("{}: closed without a close frame", self.id),
                );
                Flow::End
            }
        }
    }

    /// Handles one text frame; true when the gateway answered with an `error`.
    fn on_text(
        &mut self,
        text: &str,
        prefix: &str,
        pending: &mut Vec<(u64, Instant)>,
        now: Instant,
    ) -> bool {
        let take = |pending: &mut Vec<(u64, Instant)>, id: &str| {
            let seq: u64 = id.strip_prefix(prefix)?.parse().ok()?;
            let index = pending.iter().position(|(s, _)| *s == seq)?;
            Some(pending.swap_remove(index).1)
        };
        match proto::parse(text) {
            Ok(Incoming::Ack { id }) => match take(pending, &id) {
                Some(sent_at) if self.plan.in_window(now) => {
                    self.report.acked_in_window += 1;
                    let micros = (now - sent_at).as_micros().min(MAX_LATENCY_US as u128) as u64;
                    self.report.latency_us.saturating_record(micros.max(1));
                }
                Some(_) => {}
                None => self.tally.record(
                    "unexpected ack",
                    format!("{}: ack for {id}, which is not in flight", self.id),
                ),
            },
            Ok(Incoming::Error(error)) => {
                // The message was not stored; its slot goes to a new one after the pause.
                if let Some(id) = &error.id {
                    take(pending, id);
                }
                let detail = format!("{} (message {:?}): {}", self.id, error.id, error.message);
                self.tally.record(&format!("error: {}", error.code), detail);
                return true;
            }
            Ok(Incoming::Command(_) | Incoming::Welcome(_) | Incoming::Other) => {}
            Err(e) => self.tally.record(
                "unparsable message from the gateway",
                format!("{}: {e}", self.id),
            ),
        }
        false
    }
}

/// The benchmark's outcome.
#[derive(Debug)]
struct Results {
    devices: usize,
    connected: usize,
    inflight: usize,
    payload_bytes: usize,
    duration_s: f64,
    warmup_s: f64,
    acked: u64,
    sent: u64,
    unacked: u64,
    msgs_per_sec: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: u64,
    error_kinds: BTreeMap<String, u64>,
    rate_limit: Option<f64>,
}

impl Results {
    fn new(
        args: &BenchArgs,
        connected: usize,
        total: &DeviceReport,
        tally: &ErrorTally,
        rate_limit: Option<f64>,
    ) -> Results {
        let latency = &total.latency_us;
        let ms = |micros: u64| round3(micros as f64 / 1000.0);
        let quantile = |q: f64| match latency.is_empty() {
            true => 0.0,
            false => ms(latency.value_at_quantile(q)),
        };
        let duration_s = args.duration.as_secs_f64();
        let error_kinds = tally.snapshot();
        Results {
            devices: args.devices,
            connected,
            inflight: args.inflight,
            payload_bytes: args.payload_bytes,
            duration_s,
            warmup_s: args.warmup.as_secs_f64(),
            acked: total.acked_in_window,
            sent: total.sent,
            unacked: total.unacked,
            msgs_per_sec: round3(total.acked_in_window as f64 / duration_s),
            p50_ms: quantile(0.50),
            p90_ms: quantile(0.90),
            p99_ms: quantile(0.99),
            max_ms: if latency.is_empty() {
                0.0
            } else {
                ms(latency.max())
            },
            errors: error_kinds.values().sum(),
            error_kinds,
            rate_limit,
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "devices": self.devices,
            "inflight": self.inflight,
            "duration_s": self.duration_s,
            "acked": self.acked,
            "msgs_per_sec": self.msgs_per_sec,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "errors": self.errors,
            "connected": self.connected,
            "payload_bytes": self.payload_bytes,
            "warmup_s": self.warmup_s,
            "sent": self.sent,
            "unacked": self.unacked,
            "error_kinds": self.error_kinds,
            "telemetry_per_sec_limit": self.rate_limit,
        })
    }

    fn table(&self) -> String {
        let mut out = format!(
            "bench: {}/{} devices, {} in flight each, ~{}-byte messages\n\
             window       {:.1} s after {:.1} s of warm-up\n\
             acked        {} ({:.1} msgs/s)\n",
            self.connected,
            self.devices,
            self.inflight,
            self.payload_bytes,
            self.duration_s,
            self.warmup_s,
            self.acked,
            self.msgs_per_sec,
        );
        if self.acked > 0 {
            out += &format!(
                "ack latency  p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms\n",
                self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms
            );
        } else {
            out += "ack latency  no acks in the window\n";
        }
        out += &format!(
            "sent         {} (warm-up and window), {} left unacked\n",
            self.sent, self.unacked
        );
        out += &format!(
            "errors       {} ({})\n",
            self.errors,
            stats::describe(&self.error_kinds)
        );
        if let Some(limit) = self.rate_limit {
            out += &format!(
                "rate limit   {limit} telemetry msgs/s per device: at most {:.0} msgs/s for {} devices\n",
                limit * self.connected as f64,
                self.connected
            );
        }
        out
    }
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{self, Mock, Script};
    use serde_json::Value;
    use std::path::Path;

    use crate::conn::Target;

    async fn drive_against(script: Script) -> (DeviceReport, Arc<ErrorTally>, Mock) {
        let mock = Mock::start(script, None).await;
        let target = Target::resolve(&mock.url("ws"), Path::new("unused.pem"))
            .await
            .unwrap();
        let (ws, _) = conn::connect(&target, "sim-00001", &mock::token(), Duration::from_secs(5))
            .await
            .unwrap();
        let tally = Arc::new(ErrorTally::default());
        let histogram = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap();
        let device = LoadedDevice {
            id: "sim-00001".into(),
            boot: 7,
            inflight: 4,
            payload_bytes: 200,
            plan: Plan::starting_at(
                Instant::now() + Duration::from_millis(100),
                Duration::from_millis(100),
                Duration::from_millis(400),
            ),
            tally: tally.clone(),
            report: DeviceReport::new(histogram),
        };
        (device.drive(ws).await, tally, mock)
    }

    #[tokio::test]
    async fn keeps_messages_in_flight_and_measures_their_acks() {
        let (report, tally, mock) = drive_against(Script::default()).await;
        assert_eq!(tally.total(), 0, "{:?}", tally.snapshot());
        assert!(report.acked_in_window > 10, "{}", report.acked_in_window);
        assert_eq!(report.latency_us.len(), report.acked_in_window);
        assert_eq!(report.unacked, 0);
        let sent = mock.seen.of_type("telemetry");
        assert_eq!(sent.len() as u64, report.sent);
        let ids: std::collections::HashSet<_> = sent.iter().map(|m| m["id"].to_string()).collect();
        assert_eq!(ids.len(), sent.len(), "ids are unique");
    }

    #[tokio::test]
    async fn error_answers_are_counted() {
        let script = Script {
            error_every: Some(3),
            ..Script::default()
        };
        let (report, tally, _mock) = drive_against(script).await;
        assert!(tally.snapshot()["error: internal"] > 0);
        assert!(report.acked_in_window > 0);
        assert_eq!(report.unacked, 0, "errored messages leave the window");
    }

    #[tokio::test]
    async fn a_close_mid_benchmark_is_an_error() {
        let script = Script {
            close_with: Some(1001),
            ..Script::default()
        };
        let (report, tally, _mock) = drive_against(script).await;
        // Seen as the close frame or, when a send hits the dropped socket first, a lost connection.
        let kinds = tally.snapshot();
        assert_eq!(tally.total(), 1, "{kinds:?}");
        assert!(kinds.contains_key("closed: 1001") || kinds.contains_key("connection lost"));
        assert_eq!(report.acked_in_window, 0);
    }

    #[tokio::test]
    async fn the_whole_subcommand_reports_a_clean_run() {
        let dir = tempfile::tempdir().unwrap();
        let mock = Mock::start(Script::default(), None).await;
        let common = mock::fleet(dir.path(), mock.url("ws"), 3);
        let args = BenchArgs {
            devices: 3,
            inflight: 2,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(100),
            payload_bytes: 200,
            json: true,
            sharding: crate::shards::Sharding {
                processes: None,
                shard: None,
            },
        };
        assert!(bench(&common, &args).await.unwrap());
        assert_eq!(
            mock.seen
                .handshakes
                .load(std::sync::atomic::Ordering::SeqCst),
            3
        );
    }

    #[test]
    fn messages_have_the_requested_size_and_stay_valid_telemetry() {
        let ts = "2026-11-25T10:00:00.000Z";
        for seq in [0, 7, 12_345, u64::MAX] {
            let text = bench_message("sim-00001-1764064800000-7", ts, seq, 200);
            assert_eq!(text.len(), 200, "{text}");
            let value: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(value["type"], "telemetry");
            assert_eq!(value["data"]["seq"], seq);
            assert!(value["data"].is_object());
        }
        // Too small a target gives the bare message rather than a truncated one.
        let bare = bench_message("sim-00001-1-0", ts, 0, 10);
        assert!(serde_json::from_str::<Value>(&bare).is_ok());
    }

    #[test]
    fn the_window_is_half_open_after_the_warmup() {
        let plan = Plan::starting_at(
            Instant::now(),
            Duration::from_secs(2),
            Duration::from_secs(20),
        );
        assert!(!plan.in_window(plan.start));
        assert!(plan.in_window(plan.measure_from));
        assert!(plan.in_window(plan.measure_until - Duration::from_millis(1)));
        assert!(!plan.in_window(plan.measure_until));
        assert_eq!(plan.drain_until - plan.measure_until, DRAIN);
    }

    #[test]
    fn min_option_keeps_the_smallest_known_limit() {
        assert_eq!(min_option(None, Some(3)), Some(3));
        assert_eq!(min_option(Some(2), Some(3)), Some(2));
        assert_eq!(min_option(Some(2), None), Some(2));
        assert_eq!(min_option::<u64>(None, None), None);
    }
}
