//! `device-sim run`: a fleet of devices sending telemetry and answering commands until Ctrl-C or
//! `--duration`; on a terminal, one live status line; at the end, a summary (or JSON).

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::chaos::{Chaos, Clock};
use crate::cli::{Common, RunArgs};
use crate::device::{Counters, Device, Profile};
use crate::fleet;
use crate::shutdown;
use crate::stats::{self, ErrorTally};

/// How often the status is shown: live on a terminal, as a log line otherwise.
const LIVE_EVERY: Duration = Duration::from_secs(1);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Runs the fleet until Ctrl-C, SIGTERM or `--duration`; prints a summary line (or JSON).
/// `Ok(false)` when it ended by itself because every device had stopped (refused for good).
pub async fn run(common: &Common, args: &RunArgs) -> Result<bool> {
    run_until(common, args, shutdown::signal()).await
}

/// Runs the fleet until `stop` resolves (or `--duration` ends, or every device stopped); prints
/// a summary line (or JSON) once the devices have closed their connections. `Ok(false)` when
/// every device had stopped by itself (refused for good: a wrong token, a disabled device).
pub async fn run_until(
    common: &Common,
    args: &RunArgs,
    stop: impl Future<Output = ()>,
) -> Result<bool> {
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
    let creds = fleet::credentials(common, args.devices, common.provision).await?;
    let connector = fleet::connector(common, args.devices).await?;
    let counters = Arc::new(Counters::default());
    let tally = Arc::new(ErrorTally::default());
    let cancel = CancellationToken::new();
    let boot = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;

    eprintln!(
        "run: {} devices -> {}, {} msgs/s each",
        creds.len(),
        connector.url(),
        args.rate
    );
    let started = Instant::now();
    let mut devices = JoinSet::new();
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
        devices.spawn(device.run());
    }

    let deadline = async {
        match args.duration {
            Some(duration) => tokio::time::sleep(duration).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline, stop);
    let live = std::io::stderr().is_terminal();
    let mut status = tokio::time::interval(if live { LIVE_EVERY } else { PROGRESS_EVERY });
    status.tick().await;
    let mut every_device_stopped = false;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = &mut deadline => break,
            _ = status.tick() => {
                let line = Summary::take(args.devices, &counters, &tally).line();
                if live {
                    // One line, rewritten in place.
                    eprint!("\r\x1b[2K{line}");
                    let _ = std::io::stderr().flush();
                } else {
                    eprintln!("run: {line}");
                }
            }
            joined = devices.join_next() => {
                if joined.is_none() {
                    eprintln!("\nrun: every device has stopped");
                    every_device_stopped = true;
                    break;
                }
            }
        }
    }
    if live {
        eprintln!();
    }

    let online_at_end = counters.connected.load(Relaxed);
    cancel.cancel();
    // Devices close their sockets; do not wait forever for a gateway that does not answer.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while devices.join_next().await.is_some() {}
    })
    .await;
    let mut summary = Summary::take(args.devices, &counters, &tally);
    summary.online = online_at_end;

    eprintln!(
        "run: stopped after {:.1}s; errors by kind: {}",
        started.elapsed().as_secs_f64(),
        stats::describe(&tally.snapshot())
    );
    if args.json {
        println!("{}", summary.json());
    } else {
        println!("{}", summary.line());
    }
    Ok(!every_device_stopped)
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
    fn take(devices: usize, counters: &Counters, tally: &ErrorTally) -> Summary {
        Summary {
            devices,
            online: counters.connected.load(Relaxed),
            sent: counters.sent.load(Relaxed),
            acked: counters.acked.load(Relaxed),
            latency_ms: counters.latency.p50_p99_ms(),
            errors: tally.total(),
            reconnects: counters.reconnects.load(Relaxed),
            commands: counters.commands.load(Relaxed),
            resent: counters.resent.load(Relaxed),
            dropped: counters.dropped.load(Relaxed),
            rejected: counters.rejected.load(Relaxed),
            unsent: counters.unsent.load(Relaxed),
            chaos_disconnects: counters.chaos_disconnects.load(Relaxed),
            duplicates_sent: counters.duplicates_sent.load(Relaxed),
        }
    }

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
