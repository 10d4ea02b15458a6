//! When to stop: Ctrl-C, SIGTERM, or the end of stdin.

use std::io::Read;

use tokio_util::sync::CancellationToken;

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Cancels `token` once stdin reaches its end.
///
/// A plain thread rather than tokio's stdin: a blocking read cannot be interrupted, and tokio
/// would wait for it when the runtime shuts down; a detached thread does not hold up the exit.
pub fn cancel_at_stdin_eof(token: CancellationToken) {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 1024];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        token.cancel();
    });
}

/// Ctrl-C and SIGTERM, caught from the moment this is created, for a process that has children
/// to stop in order: a signal must never take its default action (death, children orphaned).
#[cfg(unix)]
pub struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    /// Starts catching SIGINT and SIGTERM.
    pub fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The next Ctrl-C or SIGTERM; one that arrived since the last call returns at once.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// SIGUSR1, caught from the moment this is created: `run` answers it with the errors so far,
/// so a script can tell the errors before an event from those after it. Never fires
/// elsewhere, or when the handler cannot be installed.
pub struct ReportRequests {
    #[cfg(unix)]
    usr1: Option<tokio::signal::unix::Signal>,
}

impl ReportRequests {
    /// Starts catching SIGUSR1.
    pub fn catch() -> ReportRequests {
        ReportRequests {
            #[cfg(unix)]
            usr1: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                .ok(),
        }
    }

    /// The next SIGUSR1.
    pub async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(usr1) = &mut self.usr1 {
            if usr1.recv().await.is_some() {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}
