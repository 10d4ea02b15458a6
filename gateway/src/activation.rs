//! Listening sockets handed over by a service manager (systemd socket activation).
//!
//! Under a `.socket` unit the listening socket outlives the gateway process: while the
//! gateway restarts, devices' connections wait in the kernel's accept queue instead of
//! being refused, and the new process accepts them as soon as it runs. The protocol is
//! systemd's (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`; the sockets start at descriptor
//! 3): a socket named `device` serves devices and one named `api` the operator API; unnamed
//! ones go in that order. A listener not handed over is bound from the settings as usual.

use std::net::TcpListener;

/// Why the handed-over sockets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("socket {index} from the service manager (LISTEN_FDS): {source}")]
    Socket {
        index: usize,
        source: std::io::Error,
    },
    #[error(
        "the service manager passed {count} sockets; the gateway takes two at most (device, api)"
    )]
    TooMany { count: usize },
    #[error("the service manager passed two sockets for the {which} listener")]
    Twice { which: &'static str },
}

/// The listeners a service manager handed over, if any.
#[derive(Debug, Default)]
pub struct Inherited {
    pub device: Option<TcpListener>,
    pub api: Option<TcpListener>,
}

impl Inherited {
    /// Takes the sockets the environment names and clears its variables, so that nothing
    /// the gateway starts sees them. It changes the environment: call it before any thread
    /// starts.
    pub fn from_env() -> Result<Inherited, ActivationError> {
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        std::env::remove_var("LISTEN_FDNAMES");
        let mut fds = listenfd::ListenFd::from_env();
        let count = fds.len();
        if count > 2 {
            return Err(ActivationError::TooMany { count });
        }
        let mut names = names.split(':');
        let mut inherited = Inherited::default();
        for index in 0..count {
            let socket = |source| ActivationError::Socket { index, source };
            let listener = fds
                .take_tcp_listener(index)
                .map_err(socket)?
                .ok_or_else(|| socket(std::io::ErrorKind::NotFound.into()))?;
            listener.set_nonblocking(true).map_err(socket)?;
            let (which, slot) = match names.next() {
                Some("device") => ("device", &mut inherited.device),
                Some("api") => ("API", &mut inherited.api),
                // Unnamed (systemd names a socket after its unit by default): by position.
                _ if index == 0 => ("device", &mut inherited.device),
                _ => ("API", &mut inherited.api),
            };
            if slot.replace(listener).is_some() {
                return Err(ActivationError::Twice { which });
            }
        }
        Ok(inherited)
    }
}
