//! `device-sim run`: a fleet of devices sending telemetry and answering commands until Ctrl-C or
//! `--duration`; on a terminal, one live status line; at the end, a summary (or JSON). With
//! `--processes`, the fleet is spread over child processes (see [`crate::shards`]): the parent
//! asks them for their figures once a second and shows the sums, as one process would.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::chaos::{Chaos, Clock};
use crate::cli::{Common, RunArgs};
use crate::device::{Counters, Device, Profile};
use crate::fleet;
use crate::shards::{self, Role, Shard, Shards};
use crate::shutdown;
use crate::stats::{self, ErrorTally, Latency};
use crate::tokens::Secret;

/// How often the figures are taken: shown live on a terminal, and as a log line every
/// [`PROGRESS_TICKS`] otherwise.
const LIVE_EVERY: Duration = Duration::from_secs(1);
const PROGRESS_TICKS: u32 = 10;
/// What a parent sends a shard to have its figures.
const STATUS_REQUEST: &str = "status";

/// Runs the fleet until Ctrl-C, SIGTERM or `--duration`, in this process or spread over
/// `--processes`; prints a summary line (or JSON). `Ok(false)` when it ended by itself because
/// every device had stopped (refused for good), or a shard process failed.
pub async fn run(common: &Common, args: &RunArgs) -> Result<bool> {
    match args
        .sharding
        .role(args.devices, shards::connections_per_process())?
    {
        Role::Alone => run_until(common, args, shutdown::signal()).await,
        Role::Child(shard) => child(common, args, shard).await,
        Role::Parent(count) => parent(common, args, count).await,
    }
}

/// Runs the fleet in this process until `stop` resolves (or `--duration` ends, or every device
/// stopped); prints a summary line (or JSON) once the devices have closed their connections.
/// `Ok(false)` when every device had stopped by itself (refused for good: a wrong token, a
/// disabled device).
pub async fn run_until(
    common: &Common,
    args: &RunArgs,
    stop: impl Future<Output = ()>,
) -> Result<bool> {
    let creds = fleet::credentials(common, args.devices, common.provision).await?;
    let devices = Devices::start(common, args, creds).await?;
    eprintln!(
        "run: {} devices -> {}, {} msgs/s each",
        args.devices, devices.url, args.rate
    );
    watch(Running::Here(devices), args, stop).await
}

/// Starts `count` shards (after provisioning the whole fleet once) and shows their sums.
async fn parent(common: &Common, args: &RunArgs, count: usize) -> Result<bool> {
    profile(args)?;
    // The children are started without --provision.
    fleet::credentials(common, args.devices, common.provision).await?;
    eprintln!(
        "run: {} devices -> {} over {count} processes (--processes), {} msgs/s each, {} \
         connecting at a time each",
        args.devices, common.url, args.rate, common.connect_concurrency
    );
    // Cancelled on Ctrl-C or SIGTERM: the children are told to finish even while the parent
    // waits for their figures.
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown::signal().await;
            stop.cancel();
        }
    });
    let children = Shards::spawn(count, stop.clone())?;
    watch(Running::Shards(children), args, stop.cancelled()).await
}

/// One shard: runs its part of the fleet, reports its figures whenever the parent asks (a line
/// on stdin), and a last time once its stdin closes. Signals are left to the parent, which
/// stops its shards in order.
async fn child(common: &Common, args: &RunArgs, shard: Shard) -> Result<bool> {
    tokio::spawn(async {
        loop {
            shutdown::signal().await;
        }
    });
    let creds = fleet::credentials(common, args.devices, false).await?;
    let mut orders = shards::parent_lines();
    let mut devices = Devices::start(common, args, shard.take(creds)).await?;
    loop {
        tokio::select! {
            order = orders.recv() => match order {
                Some(order) if order == STATUS_REQUEST => shards::report(&devices.snapshot())?,
                Some(order) => bail!("the parent sent `{order}`, not `{STATUS_REQUEST}`"),
                None => break,
            },
            _ = devices.all_stopped(), if !devices.every_device_stopped => {}
        }
    }
    let last = devices.stop().await;
    shards::report(&last)?;
    Ok(!last.every_device_stopped)
}

/// Shows the status until `stop`, `--duration` or every device stopped; then stops the
/// devices and prints the summary.
async fn watch(mut fleet: Running, args: &RunArgs, stop: impl Future<Output = ()>) -> Result<bool> {
    let started = Instant::now();
    let deadline = async {
        match args.duration {
            Some(duration) => tokio::time::sleep(duration).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline, stop);
    let mut reports = shutdown::ReportRequests::catch();
    let live = std::io::stderr().is_terminal();
    let mut status = tokio::time::interval(LIVE_EVERY);
    // Shards busy connecting may answer late: no burst of rounds to catch up.
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    status.tick().await;
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = &mut deadline => break,
            _ = fleet.all_stopped() => break,
            _ = reports.next() => {
                let snapshot = fleet.snapshot().await?;
                if live {
                    eprintln!();
                }
                eprintln!(
                    "run: at {:.1}s; errors by kind: {}",
                    started.elapsed().as_secs_f64(),
                    stats::describe(&snapshot.errors)
                );
            }
            _ = status.tick() => {
                let snapshot = fleet.snapshot().await?;
                if snapshot.every_device_stopped {
                    break;
                }
                ticks += 1;
                let line = snapshot.summary(args.devices).line();
                if live {
                    // One line, rewritten in place.
                    eprint!("\r\x1b[2K{line}");
                    let _ = std::io::stderr().flush();
                } else if ticks % PROGRESS_TICKS == 0 {
                    eprintln!("run: {line}");
                }
            }
        }
    }
    if live {
        eprintln!();
    }
    let (last, children_clean) = fleet.stop().await?;
    if last.every_device_stopped {
        eprintln!("run: every device has stopped");
    }
    eprintln!(
        "run: stopped after {:.1}s; errors by kind: {}",
        started.elapsed().as_secs_f64(),
        stats::describe(&last.errors)
    );
    let summary = last.summary(args.devices);
    if args.json {
        println!("{}", summary.json());
    } else {
        println!("{}", summary.line());
    }
    Ok(!last.every_device_stopped && children_clean)
}

/// The reporting interval and the device profile from the options, checked.
fn profile(args: &RunArgs) -> Result<(Option<Duration>, Profile)> {
    let period = match args.rate {
        0.0 => None,
        rate if rate.is_finite() && rate > 0.0 && rate <= 10_000.0 => {
            Some(Duration::from_secs_f64(1.0 / rate))
        }
        rate => bail!("--rate {rate} must be between 0 and 10000 messages per second"),
    };
    if args.buffer == 0 {
        bail!("--buffer must be at least 1");
    }
    let profile = Profile {
        buffer: args.buffer,
        chaos: Chaos {
            disconnect_rate: args.chaos_disconnect_rate,
            duplicate_rate: args.chaos_duplicate_rate,
        },
        clock: Clock {
            skew: args.clock_skew,
        },
    };
    Ok((period, profile))
}

/// Where the figures come from: this process's devices, or the shards'.
enum Running {
    Here(Devices),
    Shards(Shards),
}

impl Running {
    /// The figures now (the shards are asked for theirs).
    async fn snapshot(&mut self) -> Result<Snapshot> {
        match self {
            Running::Here(devices) => Ok(devices.snapshot()),
            Running::Shards(shards) => {
                shards.tell(STATUS_REQUEST).await?;
                Ok(Snapshot::merge(shards.next_reports().await?))
            }
        }
    }

    /// Resolves when every device of this process has stopped by itself (the shards tell in
    /// their snapshots instead).
    async fn all_stopped(&mut self) {
        match self {
            Running::Here(devices) if !devices.every_device_stopped => devices.all_stopped().await,
            _ => std::future::pending().await,
        }
    }

    /// Stops every device; the last figures, and whether every shard process ended cleanly.
    async fn stop(self) -> Result<(Snapshot, bool)> {
        match self {
            Running::Here(devices) => Ok((devices.stop().await, true)),
            Running::Shards(mut shards) => {
                shards.stop();
                let last = Snapshot::merge(shards.next_reports().await?);
                Ok((last, shards.wait().await?))
            }
        }
    }
}

/// The devices of this process, one task each.
struct Devices {
    tasks: JoinSet<()>,
    counters: Arc<Counters>,
    tally: Arc<ErrorTally>,
    cancel: CancellationToken,
    url: String,
    /// Every task has ended by itself (refused for good).
    every_device_stopped: bool,
}

impl Devices {
    /// Starts a device for each of `creds` (source addresses spread for the whole fleet).
    async fn start(
        common: &Common,
        args: &RunArgs,
        creds: Vec<(String, Secret)>,
    ) -> Result<Devices> {
        let (period, profile) = profile(args)?;
        let connector = fleet::connector(common, args.devices).await?;
        let (counters, tally) = (
            Arc::new(Counters::default()),
            Arc::new(ErrorTally::default()),
        );
        let cancel = CancellationToken::new();
        let boot = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let mut tasks = JoinSet::new();
        for (id, token) in creds {
            let device = Device {
                id,
                token,
                boot,
                period,
                profile,
                connector: connector.clone(),
                counters: counters.clone(),
                tally: tally.clone(),
                cancel: cancel.clone(),
            };
            tasks.spawn(device.run());
        }
        Ok(Devices {
            tasks,
            counters,
            tally,
            cancel,
            url: connector.url(),
            every_device_stopped: false,
        })
    }

    /// Resolves when every task has ended (cancel-safe).
    async fn all_stopped(&mut self) {
        while self.tasks.join_next().await.is_some() {}
        self.every_device_stopped = true;
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot::take(&self.counters, &self.tally, self.every_device_stopped)
    }

    /// Stops the devices, which close their connections (not waiting forever for a gateway
    /// that does not answer); the figures, with those online as they were before the stop.
    async fn stop(mut self) -> Snapshot {
        let online_at_end = self.counters.connected.load(Relaxed);
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        Snapshot {
            online: online_at_end,
            ..self.snapshot()
        }
    }
}

/// The figures of a fleet at one moment, as a shard reports them to its parent (one JSON line).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Snapshot {
    online: i64,
    sent: u64,
    acked: u64,
    /// Ack latencies, as (microseconds, count) pairs.
    latency_us: Vec<(u64, u64)>,
    reconnects: u64,
    commands: u64,
    resent: u64,
    dropped: u64,
    rejected: u64,
    unsent: u64,
    chaos_disconnects: u64,
    duplicates_sent: u64,
    errors: BTreeMap<String, u64>,
    /// Every device has stopped by itself (refused for good).
    every_device_stopped: bool,
}

impl Snapshot {
    fn take(counters: &Counters, tally: &ErrorTally, every_device_stopped: bool) -> Snapshot {
        Snapshot {
            online: counters.connected.load(Relaxed),
            sent: counters.sent.load(Relaxed),
            acked: counters.acked.load(Relaxed),
            latency_us: counters.latency.recorded(),
            reconnects: counters.reconnects.load(Relaxed),
            commands: counters.commands.load(Relaxed),
            resent: counters.resent.load(Relaxed),
            dropped: counters.dropped.load(Relaxed),
            rejected: counters.rejected.load(Relaxed),
            unsent: counters.unsent.load(Relaxed),
            chaos_disconnects: counters.chaos_disconnects.load(Relaxed),
            duplicates_sent: counters.duplicates_sent.load(Relaxed),
            errors: tally.snapshot(),
            every_device_stopped,
        }
    }

    /// The shards' figures added up; every device has stopped when every shard's has.
    fn merge(parts: Vec<Snapshot>) -> Snapshot {
        let every_device_stopped =
            !parts.is_empty() && parts.iter().all(|p| p.every_device_stopped);
        let mut total = Snapshot {
            every_device_stopped,
            ..Snapshot::default()
        };
        let errors = ErrorTally::default();
        for part in parts {
            total.online += part.online;
            total.latency_us.extend(part.latency_us);
            errors.add(&part.errors);
            for (sum, value) in [
                (&mut total.sent, part.sent),
                (&mut total.acked, part.acked),
                (&mut total.reconnects, part.reconnects),
                (&mut total.commands, part.commands),
                (&mut total.resent, part.resent),
                (&mut total.dropped, part.dropped),
                (&mut total.rejected, part.rejected),
                (&mut total.unsent, part.unsent),
                (&mut total.chaos_disconnects, part.chaos_disconnects),
                (&mut total.duplicates_sent, part.duplicates_sent),
            ] {
                *sum += value;
            }
        }
        total.errors = errors.snapshot();
        total
    }

    /// What the status and summary lines show, for a fleet of `devices`.
    fn summary(&self, devices: usize) -> Summary {
        let latency = Latency::default();
        latency.add_recorded(&self.latency_us);
        Summary {
            devices,
            online: self.online,
            sent: self.sent,
            acked: self.acked,
            latency_ms: latency.p50_p99_ms(),
            errors: self.errors.values().sum(),
            reconnects: self.reconnects,
            commands: self.commands,
            resent: self.resent,
            dropped: self.dropped,
            rejected: self.rejected,
            unsent: self.unsent,
            chaos_disconnects: self.chaos_disconnects,
            duplicates_sent: self.duplicates_sent,
        }
    }
}

/// The counters at one moment.
#[derive(Debug, Default, PartialEq)]
struct Summary {
    devices: usize,
    online: i64,
    sent: u64,
    acked: u64,
    /// Ack latency p50 and p99 in ms, once there are acks.
    latency_ms: Option<(f64, f64)>,
    errors: u64,
    reconnects: u64,
    commands: u64,
    resent: u64,
    dropped: u64,
    rejected: u64,
    unsent: u64,
    chaos_disconnects: u64,
    duplicates_sent: u64,
}

impl Summary {
    /// The main figures; the store-and-forward and chaos ones only when not zero.
    fn line(&self) -> String {
        let latency = match self.latency_ms {
            Some((p50, p99)) => format!("ack p50={p50:.1}ms p99={p99:.1}ms"),
            None => "ack p50=- p99=-".into(),
        };
        let mut line = format!(
            "online={}/{} sent={} acked={} {latency} errors={} reconnects={} commands={}",
            self.online,
            self.devices,
            self.sent,
            self.acked,
            self.errors,
            self.reconnects,
            self.commands
        );
        for (name, value) in [
            ("resent", self.resent),
            ("dropped", self.dropped),
            ("rejected", self.rejected),
            ("unsent", self.unsent),
            ("chaos_disconnects", self.chaos_disconnects),
            ("duplicates_sent", self.duplicates_sent),
        ] {
            if value > 0 {
                line += &format!(" {name}={value}");
            }
        }
        line
    }

    fn json(&self) -> serde_json::Value {
        let (p50, p99) = self.latency_ms.unzip();
        serde_json::json!({
            "devices": self.devices,
            "online": self.online,
            "sent": self.sent,
            "acked": self.acked,
            "ack_p50_ms": p50,
            "ack_p99_ms": p99,
            "errors": self.errors,
            "reconnects": self.reconnects,
            "commands": self.commands,
            "resent": self.resent,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "unsent": self.unsent,
            "chaos_disconnects": self.chaos_disconnects,
            "duplicates_sent": self.duplicates_sent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::mock::{self, Mock, Script};
    use clap::Parser;

    fn run_args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["device-sim", "run"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(args) => args,
            _ => panic!("not run"),
        }
    }

    #[tokio::test]
    async fn a_fleet_refused_for_good_ends_by_itself_as_a_failure() {
        let gateway = Mock::start(Script::default(), None).await;
        let dir = tempfile::tempdir().unwrap();
        let common = mock::fleet(dir.path(), gateway.url("ws"), 2);
        let wrong = crate::tokens::device_ids("sim", 2)
            .unwrap()
            .into_iter()
            .map(|id| (id, "not-the-token".to_string()))
            .collect();
        crate::tokens::save(&common.tokens, &wrong).unwrap();

        let ran = tokio::time::timeout(
            Duration::from_secs(10),
            run_until(
                &common,
                &run_args(&["--devices", "2"]),
                std::future::pending(),
            ),
        )
        .await
        .expect("a fleet whose every device stopped ends by itself");
        assert!(!ran.unwrap(), "and says it failed");
    }

    #[tokio::test]
    async fn a_fleet_stopped_on_request_ran_fine() {
        let gateway = Mock::start(Script::default(), None).await;
        let dir = tempfile::tempdir().unwrap();
        let common = mock::fleet(dir.path(), gateway.url("ws"), 2);
        let stop = tokio::time::sleep(Duration::from_millis(500));
        let ran = run_until(
            &common,
            &run_args(&["--devices", "2", "--rate", "20"]),
            stop,
        )
        .await;
        assert!(ran.unwrap());
        assert!(!gateway.seen.of_type("telemetry").is_empty());
    }

    #[test]
    fn run_takes_processes() {
        assert_eq!(run_args(&[]).sharding.processes, None);
        assert_eq!(run_args(&["--processes", "4"]).sharding.processes, Some(4));
    }

    #[test]
    fn the_shards_figures_add_up() {
        let (one, two) = (Counters::default(), Counters::default());
        let (tally_one, tally_two) = (ErrorTally::default(), ErrorTally::default());
        one.connected.store(3, Relaxed);
        two.connected.store(4, Relaxed);
        one.sent.store(10, Relaxed);
        two.sent.store(5, Relaxed);
        two.acked.store(5, Relaxed);
        one.dropped.store(2, Relaxed);
        for n in 1..=50 {
            one.latency.record(Duration::from_micros(n * 10));
            two.latency.record(Duration::from_micros((n + 50) * 10));
        }
        tally_one.record("connect: tcp", "x");
        tally_one.record("connect: tls", "y");
        tally_two.record("connect: tcp", "z");
        let parts = vec![
            Snapshot::take(&one, &tally_one, true),
            Snapshot::take(&two, &tally_two, false),
        ];
        let total = Snapshot::merge(parts.clone());
        let summary = total.summary(9);
        assert_eq!(
            summary.line(),
            "online=7/9 sent=15 acked=5 ack p50=0.5ms p99=1.0ms errors=3 reconnects=0 \
             commands=0 dropped=2"
        );
        assert_eq!(
            stats::describe(&total.errors),
            "connect: tcp=2, connect: tls=1"
        );
        assert!(!total.every_device_stopped, "one shard still has devices");
        let stopped = parts.into_iter().map(|p| Snapshot {
            every_device_stopped: true,
            ..p
        });
        assert!(Snapshot::merge(stopped.collect()).every_device_stopped);
        assert!(!Snapshot::merge(Vec::new()).every_device_stopped);
    }

    #[test]
    fn a_snapshot_travels_as_one_json_line() {
        let counters = Counters::default();
        counters.acked.store(2, Relaxed);
        counters.latency.record(Duration::from_millis(3));
        let tally = ErrorTally::default();
        tally.record("closed: 1001", "sim-00001");
        let snapshot = Snapshot::take(&counters, &tally, false);
        let line = serde_json::to_string(&snapshot).unwrap();
        assert!(!line.contains('\n'), "{line}");
        let back: Snapshot = serde_json::from_str(&line).unwrap();
        assert_eq!(back, snapshot);
        assert_eq!(
            back.summary(1).latency_ms,
            counters.latency.p50_p99_ms(),
            "the latencies survive the trip"
        );
        assert!(back.summary(1).latency_ms.is_some());
    }

    #[test]
    fn the_line_shows_the_main_figures_and_only_the_losses_there_are() {
        let mut summary = Summary {
            devices: 3,
            online: 2,
            sent: 10,
            acked: 9,
            latency_ms: Some((1.25, 7.5)),
            errors: 1,
            reconnects: 4,
            commands: 5,
            ..Summary::default()
        };
        assert_eq!(
            summary.line(),
            "online=2/3 sent=10 acked=9 ack p50=1.2ms p99=7.5ms errors=1 reconnects=4 commands=5"
        );
        summary.dropped = 6;
        summary.unsent = 2;
        assert!(summary.line().ends_with(" commands=5 dropped=6 unsent=2"));
    }

    #[test]
    fn json_has_every_field() {
        let summary = Summary {
            devices: 3,
            acked: 9,
            dropped: 6,
            ..Summary::default()
        };
        let json = summary.json();
        assert_eq!(json["devices"], 3);
        assert_eq!(json["acked"], 9);
        assert_eq!(json["dropped"], 6);
        assert_eq!(json["ack_p50_ms"], serde_json::Value::Null);
        assert_eq!(json.as_object().unwrap().len(), 15);
    }
}
