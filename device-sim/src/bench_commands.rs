//! `device-sim bench-commands`: command round trips through the operator API. Devices that answer
//! at once are connected and online first; operators then POST `ping` commands with `wait_s`,
//! round-robin over the devices, and time each call from sending the request to reading the whole
//! answer. Anything but `201` with status `succeeded` is counted as an error, never dropped.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use chrono::DateTime;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::background::{Background, Pace};
use crate::bench_report::{Background as BackgroundReport, Report};
use crate::cli::{BenchCommandsArgs, Common};
use crate::device::{Counters, Device, Profile};
use crate::fleet::{self, Connector};
use crate::stats::{self, ErrorTally};

/// Latencies are recorded in microseconds, up to a minute.
const MAX_LATENCY_US: u64 = 60_000_000;
/// Requests of the online check in flight at once.
const ONLINE_CHECKS: usize = 16;

/// What the operators measured of the commands that succeeded (the others are errors).
pub struct Measured {
    /// Client-side round trips, in microseconds.
    pub round_trip_us: Histogram<u64>,
    /// The gateway's own `created_at` -> `completed_at`, in milliseconds (its timestamps' unit).
    pub gateway_ms: Histogram<u64>,
    pub succeeded: u64,
}

impl Measured {
    fn new() -> Result<Measured> {
        Ok(Measured {
            round_trip_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?,
            gateway_ms: Histogram::new_with_bounds(1, MAX_LATENCY_US / 1000, 3)?,
            succeeded: 0,
        })
    }

    fn merge(&mut self, other: &Measured) -> Result<()> {
        let merge = |e| anyhow!("merging histograms: {e:?}");
        self.round_trip_us
            .add(&other.round_trip_us)
            .map_err(merge)?;
        self.gateway_ms.add(&other.gateway_ms).map_err(merge)?;
        self.succeeded += other.succeeded;
        Ok(())
    }
}

/// Where the operators count what went wrong, and with which label.
#[derive(Clone)]
struct Errors {
    tally: Arc<ErrorTally>,
    label: &'static str,
}

impl Errors {
    fn record(&self, kind: &str, detail: impl std::fmt::Display) {
        self.tally.record(&format!("{}{kind}", self.label), detail);
    }
}

/// Runs the benchmark and prints the results; `Ok(false)` means it ran but saw errors.
pub async fn bench_commands(common: &Common, args: &BenchCommandsArgs) -> Result<bool> {
    let report = measure(common, args).await?;
    if args.json {
        eprint!("{}", report.table());
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    Ok(report.errors() == 0)
}

/// The background pace the options ask for, if any.
fn background_pace(args: &BenchCommandsArgs) -> Result<Option<Pace>> {
    match (
        args.background_devices,
        args.background_rate,
        args.background_inflight,
    ) {
        (0, None, None) => Ok(None),
        (0, _, _) => bail!("--background-rate and --background-inflight need --background-devices"),
        (_, Some(rate), None) if rate.is_finite() && rate > 0.0 && rate <= 10_000.0 => {
            Ok(Some(Pace::Every(Duration::from_secs_f64(1.0 / rate))))
        }
        (_, Some(rate), None) => bail!("--background-rate {rate} must be between 0 and 10000"),
        (_, None, Some(window)) if window > 0 => Ok(Some(Pace::InFlight(window))),
        (_, None, Some(_)) => bail!("--background-inflight must be at least 1"),
        _ => bail!("--background-devices needs --background-rate or --background-inflight"),
    }
}

/// Everything but the printing.
pub async fn measure(common: &Common, args: &BenchCommandsArgs) -> Result<Report> {
    let pace = background_pace(args)?;
    let concurrency = args.concurrency.unwrap_or(args.devices);
    let warmup = args.warmup_commands.unwrap_or(concurrency);
    if args.commands == 0 || concurrency == 0 {
        bail!("--commands and --concurrency must be at least 1");
    }
    if args.wait_s > 60 {
        bail!("--wait-s must be between 0 and 60");
    }
    let key = common
        .api_key
        .clone()
        .context("bench-commands needs the operator API key (--api-key or GATEWAY_API_KEY)")?;
    // The request may wait `wait_s` at the gateway; the client allows for more than that.
    let timeout = Duration::from_secs(args.wait_s + 15);
    let new_api =
        || Api::with_limits(&common.api_url, key.clone(), timeout, concurrency).map(Arc::new);
    let api = new_api()?;
    // The operators' own client: its connections are made, and driven, on their thread.
    let operators_api = new_api()?;

    // Devices missing from the tokens file are created: the API key is needed anyway.
    let creds = fleet::credentials(common, args.devices, true).await?;
    let ids: Arc<[String]> = creds.iter().map(|(id, _)| id.clone()).collect();
    let background_creds = match pace {
        Some(_) => {
            let prefix = format!("{}-bg", common.prefix);
            fleet::credentials_with_prefix(common, &prefix, args.background_devices, true).await?
        }
        None => Vec::new(),
    };
    let connector = fleet::connector(common, args.devices).await?;

    let device_errors = Arc::new(ErrorTally::default());
    let counters = Arc::new(Counters::default());
    let cancel = CancellationToken::new();
    let devices = start_devices(creds, &connector, &counters, &device_errors, &cancel);
    let started = Instant::now();
    wait_online(&api, &ids, args.online_timeout, &device_errors).await?;
    eprintln!(
        "bench-commands: {} devices online at {} after {:.2}s",
        ids.len(),
        connector.url(),
        started.elapsed().as_secs_f64()
    );

    let mut background = match pace {
        Some(pace) => Some(
            BackgroundRun::start(&connector, background_creds, pace, args, &device_errors).await,
        ),
        None => None,
    };

    let command_errors = Arc::new(ErrorTally::default());
    let operators = Operators {
        api: operators_api,
        ids,
        concurrency,
        wait_s: args.wait_s,
    };
    let apart = Apart::start()?;
    let label = |label| Errors {
        tally: command_errors.clone(),
        label,
    };
    let run = |commands, errors: Errors| {
        let operators = operators.clone();
        apart.run(async move { operators.run(commands, &errors).await })
    };
    run(warmup, label("warm-up: ")).await??;
    if let Some(background) = &mut background {
        background.mark();
    }
    let api_before = command_posts(&api).await;
    let measuring = Instant::now();
    let measured = run(args.commands, label("")).await??;
    let elapsed = measuring.elapsed();
    let api_after = command_posts(&api).await;
    let background_report = match background {
        Some(background) => Some(background.stop(elapsed).await),
        None => None,
    };
    cancel.cancel();
    stop_devices(devices).await;

    Ok(Report {
        devices: args.devices,
        commands: args.commands,
        concurrency,
        warmup_commands: warmup,
        wait_s: args.wait_s,
        elapsed,
        measured,
        command_errors: command_errors.snapshot(),
        device_errors: device_errors.snapshot(),
        background: background_report,
        gateway_api_mean_ms: api_before
            .zip(api_after)
            .and_then(|(before, after)| after.mean_ms_since(before)),
    })
}

/// The gateway's `gateway_api_request_seconds` for command `POST`s answered 2xx.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApiSeconds {
    sum: f64,
    count: u64,
}

impl ApiSeconds {
    /// The series in a Prometheus text; `None` if it is not there (another server, or none
    /// answered yet).
    pub fn parse(text: &str) -> Option<ApiSeconds> {
        const LABELS: &str = r#"{method="POST",route="/v1/devices/{id}/commands",status="2xx"} "#;
        let value = |name: &str| {
            let prefix = format!("gateway_api_request_seconds_{name}{LABELS}");
            text.lines()
                .find_map(|line| line.strip_prefix(&prefix)?.trim().parse::<f64>().ok())
        };
        Some(ApiSeconds {
            sum: value("sum")?,
            count: value("count")? as u64,
        })
    }

    /// The mean in milliseconds of the requests answered since `before`.
    pub fn mean_ms_since(self, before: ApiSeconds) -> Option<f64> {
        let count = self.count.checked_sub(before.count).filter(|n| *n > 0)?;
        Some((self.sum - before.sum) / count as f64 * 1000.0)
    }
}

/// The command `POST`s' time in the gateway so far, if it says.
async fn command_posts(api: &Api) -> Option<ApiSeconds> {
    ApiSeconds::parse(&api.metrics_text().await.ok()?)
}

/// The background telemetry of one benchmark run.
struct BackgroundRun {
    fleet: Background,
    pace: Pace,
    devices: usize,
    connected: usize,
    acked_before: u64,
}

impl BackgroundRun {
    /// Starts the fleet, waits until it is connected, then lets it warm up.
    async fn start(
        connector: &Arc<Connector>,
        creds: Vec<(String, crate::tokens::Secret)>,
        pace: Pace,
        args: &BenchCommandsArgs,
        tally: &Arc<ErrorTally>,
    ) -> BackgroundRun {
        let devices = creds.len();
        let fleet = Background::start(connector.clone(), creds, pace, tally.clone());
        let connected = fleet.wait_connected(fleet::CONNECT_TIMEOUT).await;
        eprintln!(
            "bench-commands: background: {connected}/{devices} devices streaming, {}; {:.1}s of warm-up",
            pace.describe(),
            args.background_warmup.as_secs_f64()
        );
        tokio::time::sleep(args.background_warmup).await;
        BackgroundRun {
            fleet,
            pace,
            devices,
            connected,
            acked_before: 0,
        }
    }

    /// The measurement starts now.
    fn mark(&mut self) {
        self.acked_before = self.fleet.load.acked.load(Relaxed);
    }

    /// Stops the fleet and reports what it did in the `elapsed` since [`BackgroundRun::mark`].
    async fn stop(self, elapsed: Duration) -> BackgroundReport {
        let acked = self.fleet.load.acked.load(Relaxed) - self.acked_before;
        self.fleet.stop().await;
        BackgroundReport {
            devices: self.devices,
            connected: self.connected,
            pace: self.pace.describe(),
            acked,
            msgs_per_sec: acked as f64 / elapsed.as_secs_f64(),
        }
    }
}

/// Starts the devices that answer commands: `run` devices without telemetry.
fn start_devices(
    creds: Vec<(String, crate::tokens::Secret)>,
    connector: &Arc<Connector>,
    counters: &Arc<Counters>,
    tally: &Arc<ErrorTally>,
    cancel: &CancellationToken,
) -> JoinSet<()> {
    let boot = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let mut devices = JoinSet::new();
    for (id, token) in creds {
        let device = Device {
            id,
            token,
            boot,
            period: None,
            profile: Profile::default(),
            connector: connector.clone(),
            counters: counters.clone(),
            tally: tally.clone(),
            cancel: cancel.clone(),
        };
        devices.spawn(device.run());
    }
    devices
}

async fn stop_devices(mut devices: JoinSet<()>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while devices.join_next().await.is_some() {}
    })
    .await;
}

/// Polls `GET /devices/{id}` until every device is `online`, or fails after `limit`.
async fn wait_online(api: &Api, ids: &[String], limit: Duration, tally: &ErrorTally) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut offline: Vec<&String> = ids.iter().collect();
    loop {
        let checks: Vec<(&String, Result<bool, String>)> = futures_util::stream::iter(offline)
            .map(|id| async move { (id, is_online(api, id).await) })
            .buffer_unordered(ONLINE_CHECKS)
            .collect()
            .await;
        let mut last_error = None;
        offline = Vec::new();
        for (id, check) in checks {
            match check {
                Ok(true) => {}
                Ok(false) => offline.push(id),
                Err(e) => {
                    last_error = Some(format!("{id}: {e}"));
                    offline.push(id);
                }
            }
        }
        if offline.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} of {} devices not online after {:.1}s (first: {}{}; device errors: {})",
                offline.len(),
                ids.len(),
                limit.as_secs_f64(),
                offline[0],
                last_error
                    .map(|e| format!("; last API error: {e}"))
                    .unwrap_or_default(),
                stats::describe(&tally.snapshot())
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn is_online(api: &Api, id: &str) -> Result<bool, String> {
    match api.get(&format!("/devices/{id}")).await {
        Ok((200, body)) => Ok(body["online"] == true),
        Ok((status, body)) => Err(format!("HTTP {status} {}", body["error"])),
        Err(e) => Err(e.to_string()),
    }
}

/// The command indices operator `operator` of `operators` sends: every `operators`-th from its
/// own number. Command `i` goes to device `i % devices`, so with as many operators as devices
/// each operator always talks to the same device: one command outstanding per device.
pub fn indices(operator: usize, operators: usize, commands: usize) -> impl Iterator<Item = usize> {
    (operator..commands).step_by(operators.max(1))
}

/// A single-threaded runtime on a thread of its own, where the operators send their commands
/// and read the answers: the simulated devices (the ones that answer, and the background) run
/// on the process's other runtime, so the client being timed does not wait behind them for a
/// turn, as an operator's client on another machine would not.
pub(crate) struct Apart {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Apart {
    pub(crate) fn start() -> Result<Apart> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("the operators' runtime")?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("operators".into())
            // Drives the tasks spawned through `handle` until told to stop.
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })
            .context("the operators' thread")?;
        Ok(Apart {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `task` to its end on the operators' thread.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        task: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        self.handle
            .spawn(task)
            .await
            .context("the operators' thread failed")
    }
}

impl Drop for Apart {
    /// Stops the thread and waits for it: it ends at once (its runtime, dropped there, closes
    /// the operators' connections), so the wait is short even on an async thread.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Operators sending commands to devices, each waiting for its answer before the next.
#[derive(Clone)]
struct Operators {
    api: Arc<Api>,
    ids: Arc<[String]>,
    concurrency: usize,
    wait_s: u64,
}

impl Operators {
    /// Sends `commands` commands and measures those that succeed.
    async fn run(&self, commands: usize, errors: &Errors) -> Result<Measured> {
        let mut operators = JoinSet::new();
        for operator in 0..self.concurrency.min(commands) {
            let (api, ids, errors) = (self.api.clone(), self.ids.clone(), errors.clone());
            let (concurrency, wait_s) = (self.concurrency, self.wait_s);
            operators.spawn(async move {
                let mut measured = Measured::new()?;
                for i in indices(operator, concurrency, commands) {
                    let device = &ids[i % ids.len()];
                    one_command(&api, device, wait_s, &mut measured, &errors).await;
                }
                Ok::<_, anyhow::Error>(measured)
            });
        }
        let mut total = Measured::new()?;
        while let Some(joined) = operators.join_next().await {
            total.merge(&joined.context("operator task failed")??)?;
        }
        Ok(total)
    }
}

async fn one_command(
    api: &Api,
    device: &str,
    wait_s: u64,
    measured: &mut Measured,
    errors: &Errors,
) {
    let body = json!({"name": "ping", "wait_s": wait_s});
    let path = format!("/devices/{device}/commands");
    let sent = Instant::now();
    let answer = api.post(&path, &body).await;
    let micros = (sent.elapsed().as_micros() as u64).clamp(1, MAX_LATENCY_US);
    match answer {
        Ok((201, command)) if command["status"] == "succeeded" => {
            measured.succeeded += 1;
            measured.round_trip_us.saturating_record(micros);
            if let Some(gateway) = gateway_time_ms(&command) {
                measured.gateway_ms.saturating_record(gateway);
            }
        }
        Ok((status, command)) => {
            let what = command["status"].as_str().or(command["error"].as_str());
            let kind = format!("HTTP {status} {}", what.unwrap_or("(no status)"));
            errors.record(&kind, format!("{device}: {command}"));
        }
        Err(e) => errors.record("request failed", format!("{device}: {e}")),
    }
}

/// `completed_at - created_at` of a command, in milliseconds.
fn gateway_time_ms(command: &Value) -> Option<u64> {
    let time = |field: &str| DateTime::parse_from_rfc3339(command[field].as_str()?).ok();
    let elapsed = time("completed_at")? - time("created_at")?;
    u64::try_from(elapsed.num_milliseconds()).ok()
}

#[cfg(test)]
mod tests;
