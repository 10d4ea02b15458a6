//! `device-sim run`: a fleet of devices sending telemetry until Ctrl-C or `--duration`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cli::{Common, RunArgs};
use crate::conn::Target;
use crate::device::{Counters, Device};
use crate::fleet::{self, Connector};
use crate::shutdown;
use crate::stats::{self, ErrorTally};

const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Runs the fleet; prints a summary line (or JSON) when it stops.
pub async fn run(common: &Common, args: &RunArgs) -> Result<()> {
    let period = match args.rate {
        0.0 => None,
        rate if rate.is_finite() && rate > 0.0 && rate <= 10_000.0 => {
            Some(Duration::from_secs_f64(1.0 / rate))
        }
        rate => bail!("--rate {rate} must be between 0 and 10000 messages per second"),
    };
    let creds = fleet::credentials(common, args.devices, common.provision).await?;
    let connector = Connector::new(
        Target::resolve(&common.url, &common.ca).await?,
        common.connect_concurrency,
    );
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
    let signal = shutdown::signal();
    tokio::pin!(deadline, signal);
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.tick().await;
    loop {
        tokio::select! {
            _ = &mut signal => break,
            _ = &mut deadline => break,
            _ = progress.tick() => eprintln!("run: {}", Summary::take(args.devices, &counters, &tally).line()),
            joined = devices.join_next() => {
                if joined.is_none() {
                    eprintln!("run: every device has stopped");
                    break;
                }
            }
        }
    }

    let summary = Summary::take(args.devices, &counters, &tally);
    cancel.cancel();
    // Devices close their sockets; do not wait forever for a gateway that does not answer.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while devices.join_next().await.is_some() {}
    })
    .await;

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
    Ok(())
}

/// The counters at one moment.
#[derive(Debug, PartialEq)]
struct Summary {
    devices: usize,
    connected: i64,
    sent: u64,
    acked: u64,
    errors: u64,
    reconnects: u64,
    commands: u64,
}

impl Summary {
    fn take(devices: usize, counters: &Counters, tally: &ErrorTally) -> Summary {
        Summary {
            devices,
            connected: counters.connected.load(Relaxed),
            sent: counters.sent.load(Relaxed),
            acked: counters.acked.load(Relaxed),
            errors: tally.total(),
            reconnects: counters.reconnects.load(Relaxed),
            commands: counters.commands.load(Relaxed),
        }
    }

    fn line(&self) -> String {
        format!(
            "devices={} connected={} sent={} acked={} errors={} reconnects={} commands={}",
            self.devices,
            self.connected,
            self.sent,
            self.acked,
            self.errors,
            self.reconnects,
            self.commands
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "devices": self.devices,
            "connected": self.connected,
            "sent": self.sent,
            "acked": self.acked,
            "errors": self.errors,
            "reconnects": self.reconnects,
            "commands": self.commands,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_has_the_documented_fields() {
        let summary = Summary {
            devices: 3,
            connected: 2,
            sent: 10,
            acked: 9,
            errors: 1,
            reconnects: 4,
            commands: 5,
        };
        assert_eq!(
            summary.line(),
            "devices=3 connected=2 sent=10 acked=9 errors=1 reconnects=4 commands=5"
        );
        assert_eq!(
            summary.json(),
            serde_json::json!({"devices":3,"connected":2,"sent":10,"acked":9,"errors":1,"reconnects":4,"commands":5})
        );
    }
}
