//! `device-sim idle`: open many connections, report how long until every one had its welcome,
//! then hold them (answering pings) until `--hold` ends, stdin closes, Ctrl-C or SIGTERM.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::cli::{Common, IdleArgs};
use crate::conn::{self, Target, Ws};
use crate::fleet::{self, Connector};
use crate::shutdown;
use crate::stats::{self, ErrorTally};

/// Connection attempts per device (transient refusals such as 429 or 503 are retried).
const ATTEMPTS: u32 = 3;

/// Opens and holds the connections; `Ok(false)` when some failed to open or dropped.
pub async fn idle(common: &Common, args: &IdleArgs) -> Result<bool> {
    let creds = fleet::credentials(common, args.devices, common.provision).await?;
    let connector = Connector::new(
        Target::resolve(&common.url, &common.ca).await?,
        common.connect_concurrency,
    );
    let tally = Arc::new(ErrorTally::default());
    let dropped = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let stdin_closed = CancellationToken::new();
    if !args.ignore_stdin {
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

    eprintln!(
        "idle: opening {} connections to {}, {} at a time",
        creds.len(),
        connector.url(),
        common.connect_concurrency
    );
    // One report per device, so the channel never holds more than the fleet.
    let (report, mut reports) = mpsc::channel::<Opened>(creds.len());
    let started = Instant::now();
    let mut devices = JoinSet::new();
    for (id, token) in creds {
        let (connector, tally, dropped) = (connector.clone(), tally.clone(), dropped.clone());
        let (stop, report) = (stop.clone(), report.clone());
        devices.spawn(async move {
            let (opened, ws) = tokio::select! {
                _ = stop.cancelled() => (Opened::NotTried, None),
                connected = connector.with_retries(&token, ATTEMPTS, &tally) => match connected {
                    Ok((ws, _welcome)) => (Opened::Yes, Some(ws)),
                    Err(_) => (Opened::Failed, None),
                },
            };
            let _ = report.send(opened).await;
            // Hand the sender back now: the count below ends when every sender is gone.
            drop(report);
            if let Some(ws) = ws {
                hold(ws, &id, &stop, &dropped, &tally).await;
            }
        });
    }
    drop(report);

    let (mut connected, mut failed, mut not_tried) = (0u64, 0u64, 0u64);
    // Ends when every device has reported (or its task is gone).
    while let Some(opened) = reports.recv().await {
        match opened {
            Opened::Yes => connected += 1,
            Opened::Failed => failed += 1,
            Opened::NotTried => not_tried += 1,
        }
    }
    let mut line = format!(
        "connected {connected} in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        line += &format!(" ({failed} failed)");
    }
    if not_tried > 0 {
        line += &format!(" ({not_tried} not opened: stopped early)");
    }
    println!("{line}");
    std::io::stdout().flush()?;

    let held_since = Instant::now();
    if !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(args.hold) => {}
        }
    }
    let held = held_since.elapsed();
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while devices.join_next().await.is_some() {}
    })
    .await;

    let dropped = dropped.load(Relaxed);
    println!(
        "held {connected} connections for {:.1}s; {dropped} dropped",
        held.as_secs_f64()
    );
    if failed + dropped > 0 {
        eprintln!(
            "idle: errors by kind: {}",
            stats::describe(&tally.snapshot())
        );
    }
    Ok(failed == 0 && not_tried == 0 && dropped == 0)
}

/// What became of one device's connection attempt.
#[derive(Debug, Clone, Copy)]
enum Opened {
    Yes,
    Failed,
    NotTried,
}

/// Keeps reading (tungstenite answers pings while we do) until `stop`, then closes normally.
async fn hold(
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
        let (ws, _) = conn::connect(&target, &mock::token(), Duration::from_secs(5))
            .await
            .unwrap();
        let (stop, dropped, tally) = (
            CancellationToken::new(),
            AtomicU64::new(0),
            ErrorTally::default(),
        );
        let holding = hold(ws, "sim-00001", &stop, &dropped, &tally);
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
        };
        assert!(idle(&common, &args).await.unwrap());
        assert_eq!(mock.seen.handshakes.load(SeqCst), 20);
    }

    #[tokio::test]
    async fn connections_the_gateway_closes_are_reported_as_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mock = Mock::start(
            Script {
                close_with: Some(1001),
                ..Script::default()
            },
            None,
        )
        .await;
        let common = mock::fleet(dir.path(), mock.url("ws"), 2);
        let args = IdleArgs {
            devices: 2,
            hold: Duration::from_millis(300),
            ignore_stdin: true,
        };
        assert!(!idle(&common, &args).await.unwrap());
    }
}
