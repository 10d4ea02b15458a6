//! `device-sim idle`: open many connections, report how long until every one had its welcome,
//! then hold them (answering pings) until `--hold` ends, stdin closes, Ctrl-C or SIGTERM.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::cli::{Common, IdleArgs};
use crate::conn::{self, Ws};
use crate::fleet;
use crate::shards::{self, Role, Shards};
use crate::shutdown;
use crate::stats::{self, ErrorTally};
use crate::tokens::Secret;

/// Connection attempts per device (transient refusals such as 429 or 503 are retried).
const ATTEMPTS: u32 = 3;

/// Opens and holds the connections; `Ok(false)` when some failed to open or dropped.
pub async fn idle(common: &Common, args: &IdleArgs) -> Result<bool> {
    let role = args
        .sharding
        .role(args.devices, shards::connections_per_process())?;
    let provision = common.provision && !matches!(role, Role::Child(_));
    let creds = fleet::credentials(common, args.devices, provision).await?;
    // A shard's stdin is its parent's pipe: its end means stop, whatever the flags say.
    let stop = stop_token(matches!(role, Role::Child(_)) || !args.ignore_stdin);
    match role {
        Role::Alone => alone(common, args, creds, stop).await,
        Role::Child(shard) => child(common, args, shard.take(creds), stop).await,
        Role::Parent(count) => parent(common, args, count, stop).await,
    }
}

/// Cancelled on Ctrl-C, SIGTERM or (when `watch_stdin`) the end of stdin.
fn stop_token(watch_stdin: bool) -> CancellationToken {
    let stop = CancellationToken::new();
    let stdin_closed = CancellationToken::new();
    if watch_stdin {
        shutdown::cancel_at_stdin_eof(stdin_closed.clone());
    }
    tokio::spawn({
        let stop = stop.clone();
        async move {
            tokio::select! {
                _ = shutdown::signal() => eprintln!("idle: signal received, closing"),
                _ = stdin_closed.cancelled() => eprintln!(
                    "idle: stdin closed, closing (use --ignore-stdin when stdin is /dev/null)"
                ),
            }
            stop.cancel();
        }
    });
    stop
}

/// The whole fleet in this process.
async fn alone(
    common: &Common,
    args: &IdleArgs,
    creds: Vec<(String, Secret)>,
    stop: CancellationToken,
) -> Result<bool> {
    eprintln!(
        "idle: opening {} connections to {}, {} at a time",
        creds.len(),
        common.url,
        common.connect_concurrency
    );
    let started = Instant::now();
    let (holding, opened) = Holding::open(common, args.devices, creds, &stop).await?;
    opened.print(started, "")?;
    let held = hold(args.hold, &stop).await;
    let (dropped, errors) = holding.close(&stop).await;
    print_held(opened.connected, held, dropped, &errors);
    Ok(opened.complete() && dropped == 0)
}

/// One shard: opens its connections, reports, holds them until the parent says stop.
async fn child(
    common: &Common,
    args: &IdleArgs,
    creds: Vec<(String, Secret)>,
    stop: CancellationToken,
) -> Result<bool> {
    let (holding, opened) = Holding::open(common, args.devices, creds, &stop).await?;
    shards::report(&ShardReport::Opened(opened))?;
    stop.cancelled().await;
    let (dropped, errors) = holding.close(&stop).await;
    shards::report(&ShardReport::Held { dropped, errors })?;
    Ok(opened.complete() && dropped == 0)
}

/// Starts `count` shards, adds up their connections, holds, then stops them all.
async fn parent(
    common: &Common,
    args: &IdleArgs,
    count: usize,
    stop: CancellationToken,
) -> Result<bool> {
    eprintln!(
        "idle: opening {} connections to {} over {count} processes (--processes), {} at a time each",
        args.devices, common.url, common.connect_concurrency
    );
    let started = Instant::now();
    let mut children = Shards::spawn(count, stop.clone())?;
    let mut opened = Opened::default();
    for report in children.next_reports().await? {
        match report {
            ShardReport::Opened(part) => opened = opened.add(part),
            other => bail!("a shard reported {other:?} before opening"),
        }
    }
    opened.print(started, &format!(" over {count} processes"))?;
    let held = hold(args.hold, &stop).await;
    children.stop();
    let (tally, mut dropped) = (ErrorTally::default(), 0);
    for report in children.next_reports().await? {
        match report {
            ShardReport::Held { dropped: d, errors } => {
                dropped += d;
                tally.add(&errors);
            }
            other => bail!("a shard reported {other:?} instead of closing"),
        }
    }
    let children_clean = children.wait().await?;
    print_held(opened.connected, held, dropped, &tally.snapshot());
    Ok(opened.complete() && dropped == 0 && children_clean)
}

/// Waits `limit` or until `stop`; how long that was.
async fn hold(limit: Duration, stop: &CancellationToken) -> Duration {
    let since = Instant::now();
    if !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(limit) => {}
        }
    }
    since.elapsed()
}

fn print_held(connected: u64, held: Duration, dropped: u64, errors: &BTreeMap<String, u64>) {
    println!(
        "held {connected} connections for {:.1}s; {dropped} dropped",
        held.as_secs_f64()
    );
    if !errors.is_empty() {
        eprintln!("idle: errors by kind: {}", stats::describe(errors));
    }
}

/// What a shard tells its parent, one JSON line each.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "snake_case")]
enum ShardReport {
    Opened(Opened),
    Held {
        dropped: u64,
        errors: BTreeMap<String, u64>,
    },
}

/// How the connection attempts went.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Opened {
    connected: u64,
    failed: u64,
    /// Not attempted: stopped before their turn.
    not_tried: u64,
}

impl Opened {
    fn add(self, other: Opened) -> Opened {
        Opened {
            connected: self.connected + other.connected,
            failed: self.failed + other.failed,
            not_tried: self.not_tried + other.not_tried,
        }
    }

    fn complete(&self) -> bool {
        self.failed == 0 && self.not_tried == 0
    }

    /// The `connected N in S s` line on stdout, which scripts wait for.
    fn print(&self, since: Instant, how: &str) -> Result<()> {
        let mut line = format!(
            "connected {} in {:.2}s{how}",
            self.connected,
            since.elapsed().as_secs_f64()
        );
        if self.failed > 0 {
            line += &format!(" ({} failed)", self.failed);
        }
        if self.not_tried > 0 {
            line += &format!(" ({} not opened: stopped early)", self.not_tried);
        }
        println!("{line}");
        std::io::stdout().flush()?;
        Ok(())
    }
}

/// Connections being held, one task each.
struct Holding {
    devices: JoinSet<()>,
    tally: Arc<ErrorTally>,
    dropped: Arc<AtomicU64>,
}

impl Holding {
    /// Opens a connection for each of `creds` (source addresses spread for a fleet of `fleet`),
    /// and holds each until `stop`.
    async fn open(
        common: &Common,
        fleet: usize,
        creds: Vec<(String, Secret)>,
        stop: &CancellationToken,
    ) -> Result<(Holding, Opened)> {
        let connector = fleet::connector(common, fleet).await?;
        let tally = Arc::new(ErrorTally::default());
        let dropped = Arc::new(AtomicU64::new(0));
        // One report per device, so the channel never holds more than the fleet.
        let (report, mut reports) = mpsc::channel::<Attempt>(creds.len().max(1));
        let mut devices = JoinSet::new();
        for (id, token) in creds {
            let (connector, tally, dropped) = (connector.clone(), tally.clone(), dropped.clone());
            let (stop, report) = (stop.clone(), report.clone());
            devices.spawn(async move {
                let (attempt, ws) = tokio::select! {
                    _ = stop.cancelled() => (Attempt::NotTried, None),
                    connected = connector.with_retries(&id, &token, ATTEMPTS, &tally) => match connected {
                        Ok((ws, _welcome)) => (Attempt::Opened, Some(ws)),
                        Err(_) => (Attempt::Failed, None),
                    },
                };
                let _ = report.send(attempt).await;
                // Hand the sender back now: the count below ends when every sender is gone.
                drop(report);
                if let Some(ws) = ws {
                    hold_one(ws, &id, &stop, &dropped, &tally).await;
                }
            });
        }
        drop(report);
        let mut opened = Opened::default();
        // Ends when every device has reported (or its task is gone).
        while let Some(attempt) = reports.recv().await {
            match attempt {
                Attempt::Opened => opened.connected += 1,
                Attempt::Failed => opened.failed += 1,
                Attempt::NotTried => opened.not_tried += 1,
            }
        }
        let holding = Holding {
            devices,
            tally,
            dropped,
        };
        Ok((holding, opened))
    }

    /// Closes every connection; how many had dropped before, and every failure by kind.
    async fn close(mut self, stop: &CancellationToken) -> (u64, BTreeMap<String, u64>) {
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while self.devices.join_next().await.is_some() {}
        })
        .await;
        (self.dropped.load(Relaxed), self.tally.snapshot())
    }
}

/// What became of one device's connection attempt.
#[derive(Debug, Clone, Copy)]
enum Attempt {
    Opened,
    Failed,
    NotTried,
}

/// Keeps reading (tungstenite answers pings while we do) until `stop`, then closes normally.
async fn hold_one(
    mut ws: Ws,
    id: &str,
    stop: &CancellationToken,
    dropped: &AtomicU64,
    tally: &ErrorTally,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                conn::close(&mut ws).await;
                return;
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Close(frame))) => {
                    let code = conn::close_code_of(&frame).unwrap_or(1005);
                    tally.record(&format!("closed: {code}"), format!("{id} was closed by the gateway"));
                    dropped.fetch_add(1, Relaxed);
                    conn::finish_close(&mut ws).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tally.record("connection lost", format!("{id}: {e}"));
                    dropped.fetch_add(1, Relaxed);
                    return;
                }
                None => {
                    tally.record("connection lost", format!("{id}: closed without a close frame"));
                    dropped.fetch_add(1, Relaxed);
                    return;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Target;
    use crate::mock::{self, Mock, Script};
    use std::sync::atomic::Ordering::SeqCst;

    #[tokio::test]
    async fn holding_answers_pings_and_closes_on_stop() {
        let mock = Mock::start(
            Script {
                ping: true,
                ..Script::default()
            },
            None,
        )
        .await;
        let target = Target::resolve(&mock.url("ws"), std::path::Path::new("unused.pem"))
            .await
            .unwrap();
        let (ws, _) = conn::connect(&target, "sim-00001", &mock::token(), Duration::from_secs(5))
            .await
            .unwrap();
        let (stop, dropped, tally) = (
            CancellationToken::new(),
            AtomicU64::new(0),
            ErrorTally::default(),
        );
        let holding = hold_one(ws, "sim-00001", &stop, &dropped, &tally);
        let check = async {
            for _ in 0..100 {
                if mock.seen.pongs.load(SeqCst) > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.cancel();
        };
        tokio::join!(holding, check);
        assert_eq!(mock.seen.pongs.load(SeqCst), 1);
        assert_eq!(dropped.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn the_whole_subcommand_opens_holds_and_closes() {
        let dir = tempfile::tempdir().unwrap();
        let mock = Mock::start(Script::default(), None).await;
        let common = mock::fleet(dir.path(), mock.url("ws"), 20);
        let args = IdleArgs {
            devices: 20,
            hold: Duration::from_millis(200),
            ignore_stdin: true,
            sharding: crate::shards::Sharding {
                processes: None,
                shard: None,
            },
        };
        assert!(idle(&common, &args).await.unwrap());
        assert_eq!(mock.seen.handshakes.load(SeqCst), 20);
    }

    #[tokio::test]
    async fn connections_the_gateway_closes_are_reported_as_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mock = Mock::closing_with(1001).await;
        let common = mock::fleet(dir.path(), mock.url("ws"), 2);
        let args = IdleArgs {
            devices: 2,
            hold: Duration::from_millis(300),
            ignore_stdin: true,
            sharding: crate::shards::Sharding {
                processes: None,
                shard: None,
            },
        };
        assert!(!idle(&common, &args).await.unwrap());
    }
}
