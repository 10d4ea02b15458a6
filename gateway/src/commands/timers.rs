//! Expiry and result-timeout timers: one delay queue fed over a channel, never a polling loop.
//!
//! Each open command has at most one timer: `expires_at` while it is queued or
//! sent, `delivered_at + timeout_s` once delivered. A timer that fires after the
//! command moved on finds nothing to change (the transitions are conditional).

use std::sync::Weak;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;

use super::Commands;
use crate::time::now_ms;

/// Which deadline a timer stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// `expires_at`: not delivered in time.
    Expire,
    /// `delivered_at + timeout_s`: no result in time.
    TimeOut,
}

/// The longest timer the delay queue is asked to hold; later deadlines re-arm when it fires.
const MAX_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

type Request = (Deadline, String, i64);

/// Arms timers; cloned into the command service.
#[derive(Debug, Clone)]
pub struct Timers {
    tx: mpsc::Sender<Request>,
}

impl Timers {
    /// The handle and the receiving end for [`run`].
    pub fn channel(capacity: usize) -> (Timers, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Timers { tx }, rx)
    }

    /// Fires `deadline` for command `id` at `at` (epoch ms), or at once if that is past.
    pub async fn arm(&self, deadline: Deadline, id: &str, at: i64) {
        // Only fails once the timer task has stopped, i.e. during shutdown.
        let _ = self.tx.send((deadline, id.to_owned(), at)).await;
    }
}

/// The timer task: sleeps until the next deadline and hands it to the command service.
pub async fn run(
    mut requests: mpsc::Receiver<Request>,
    commands: Weak<Commands>,
    shutdown: CancellationToken,
) {
    let mut queue: DelayQueue<Request> = DelayQueue::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            request = requests.recv() => {
                let Some(request) = request else { break };
                let delay = Duration::from_millis((request.2 - now_ms()).max(0) as u64);
                queue.insert(request, delay.min(MAX_DELAY));
            }
            Some(expired) = queue.next(), if !queue.is_empty() => {
                let (deadline, id, at) = expired.into_inner();
                if at > now_ms() {
                    // Beyond MAX_DELAY, or the wall clock moved back: wait the rest.
                    let rest = Duration::from_millis((at - now_ms()) as u64);
                    queue.insert((deadline, id, at), rest.min(MAX_DELAY));
                    continue;
                }
                let Some(commands) = commands.upgrade() else { break };
                commands.deadline_passed(deadline, &id).await;
            }
        }
    }
}
