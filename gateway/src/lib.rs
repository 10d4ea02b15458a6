//! An IoT device-to-cloud WebSocket gateway: devices hold TLS WebSocket connections,
//! their telemetry is acked only once it is durably in SQLite, and operators manage
//! the fleet over an HTTP API.
//!
//! # Layout
//! - [`config`]: settings with defaults; TOML, environment and flags merged in one place.
//! - [`tls`]: the rustls `ServerConfig`, from PEM files or a generated development CA,
//!   requesting client certificates when a device CA is set.
//! - [`device_certs`]: a device CA and per-device client certificates (`gateway certs`).
//! - [`device`]: the device side: `listener` (accept loop), `handshake` (upgrade and
//!   auth), `session` (one task per device), `protocol` (message types and validation),
//!   `limits` (admission and rate limits); with the `conformance` cargo feature only,
//!   `conformance` (the echo mode for the Autobahn suite, `tests/autobahn`).
//! - [`commands`]: operator commands: queueing, the delivery window, device answers,
//!   expiry and timeout timers, waiting for an outcome.
//! - [`events`]: the bounded live event log behind `GET /v1/events`.
//! - [`hub`]: who is online: device id -> handle of its live session.
//! - [`metrics`]: Prometheus counters and histograms, rendered at `/metrics`.
//! - [`store`]: the database: pools and migrations, one file per table family, and the
//!   batching `writer` that commits telemetry (group commit) before it is acked; its
//!   connection writes the WAL through `wal_vfs`, which gathers a commit's frame writes.
//! - [`api`]: the operator HTTP API: `router()`, one file per resource, `ApiError`; and
//!   `api::console`, the web console's static pages (`gateway/console/`) beside it.
//! - [`shutdown`]: signal -> cancellation; [`Gateway::run`] drains within a grace period.
//! - [`time`]: epoch milliseconds inside, RFC 3339 outside.
//!
//! The binary adds the operator CLI (`src/cli/`: `gateway devices ...`, `gateway
//! commands ...`), which talks to a running gateway over its HTTP API only.

pub mod activation;
pub mod api;
pub mod commands;
pub mod config;
pub mod device;
pub mod device_certs;
pub mod events;
pub mod hub;
pub mod metrics;
pub mod shutdown;
pub mod store;
pub mod time;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use activation::Inherited;
use config::Settings;
use device::DeviceContext;
use hub::Hub;
use store::writer::{Writer, WriterConfig};
use store::Store;

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot bind the {which} listener on {addr}: {source}")]
    Bind {
        which: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the {which} listener handed over by the service manager: {source}")]
    HandedOver {
        which: &'static str,
        source: std::io::Error,
    },
    #[error("API key file {path}: {source}")]
    ApiKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("operator API server failed: {0}")]
    Api(std::io::Error),
}

/// A gateway with its listeners bound, database open, ready to [`run`](Gateway::run).
pub struct Gateway {
    settings: Arc<Settings>,
    store: Store,
    /// TLS for devices (`None` with `no_tls`), with client certificates when a device CA is set.
    device_tls: Option<Arc<rustls::ServerConfig>>,
    /// HTTPS for the operator API (`None` unless `api_tls`).
    api_tls: Option<Arc<rustls::ServerConfig>>,
    api_key: api::key::ApiKey,
    device_listener: TcpListener,
    api_listener: TcpListener,
}

impl Gateway {
    /// Prepares TLS, opens and migrates the database, resolves the API key, binds both
    /// listeners (or takes the ones a service manager handed over).
    pub async fn bind(settings: Settings, inherited: Inherited) -> Result<Gateway, GatewayError> {
        let needs_cert = !settings.no_tls || settings.api_tls;
        let (device_tls, api_tls) = if needs_cert {
            let files = tls::resolve_cert_files(
                settings.tls_cert.as_deref(),
                settings.tls_key.as_deref(),
                &settings.certs_dir,
            )?;
            if let Some(ca) = &files.dev_ca {
                let ca = std::fs::canonicalize(ca).unwrap_or_else(|_| ca.clone());
                tracing::warn!(
                    ca = %ca.display(),
                    "no TLS certificate configured: using a generated development certificate; \
                     devices must trust this CA file (set --tls-cert/--tls-key in production)"
                );
            }
            let device_tls = match settings.no_tls {
                true => None,
                false => Some(tls::server_config(&files, settings.device_ca.as_deref())?),
            };
            let api_tls = match settings.api_tls {
                true => Some(tls::server_config(&files, None)?),
                false => None,
            };
            (device_tls, api_tls)
        } else {
            (None, None)
        };
        let store = Store::open(
            &settings.database_url,
            settings.synchronous,
            settings.wal_max_bytes,
        )
        .await?;
        let key_path = api::key::key_file(store.path());
        let (key, generated) =
            api::key::resolve(settings.api_key.as_deref(), &key_path).map_err(|source| {
                GatewayError::ApiKey {
                    path: key_path.clone(),
                    source,
                }
            })?;
        if generated {
            // Printed once, on purpose and never through the logger: the operator needs it.
            eprintln!(
                "Generated operator API key (kept in {}): {key}",
                key_path.display()
            );
        }
        let bind = |which, addr| {
            listen(addr).map_err(|source| GatewayError::Bind {
                which,
                addr,
                source,
            })
        };
        let handed_over = |listener: std::net::TcpListener, which: &'static str| {
            let listener = TcpListener::from_std(listener)
                .map_err(|source| GatewayError::HandedOver { which, source })?;
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "the {which} listener was handed over by the service manager");
            }
            Ok::<_, GatewayError>(listener)
        };
        let device_listener = match inherited.device {
            Some(listener) => handed_over(listener, "device")?,
            None => bind("device", settings.device_addr)?,
        };
        let api_listener = match inherited.api {
            Some(listener) => handed_over(listener, "API")?,
            None => bind("API", settings.api_addr)?,
        };
        Ok(Gateway {
            settings: Arc::new(settings),
            store,
            device_tls,
            api_tls,
            api_key: api::key::ApiKey::new(&key),
            device_listener,
            api_listener,
        })
    }

    /// The device and API listener addresses.
    pub fn local_addrs(&self) -> (SocketAddr, SocketAddr) {
        (
            self.device_listener.local_addr().expect("bound listener"),
            self.api_listener.local_addr().expect("bound listener"),
        )
    }

    /// `listening device=wss://.../v1/connect api=http://.../v1`.
    pub fn listening_line(&self) -> String {
        let (device, api) = self.local_addrs();
        let ws = if self.settings.no_tls { "ws" } else { "wss" };
        let http = if self.settings.api_tls {
            "https"
        } else {
            "http"
        };
        format!("listening device={ws}://{device}/v1/connect api={http}://{api}/v1")
    }

    /// Serves devices and operators until `shutdown` is cancelled, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        let Gateway {
            settings,
            store,
            device_tls,
            api_tls,
            api_key,
            device_listener,
            api_listener,
        } = self;
        #[cfg(feature = "conformance")]
        if settings.conformance_echo {
            tracing::warn!(
                "conformance echo mode: devices are NOT authenticated and every message is \
                 echoed back; for the Autobahn suite only"
            );
        }
        let stale = store.close_stale_sessions(time::now_ms()).await?;
        if stale > 0 {
            tracing::info!(
                sessions = stale,
                "closed sessions left open by an unclean stop"
            );
        }
        let events = Arc::new(events::Events::starting_now(settings.event_buffer));
        let (writer, writer_task) = Writer::spawn(
            store.clone(),
            WriterConfig {
                max_rows: settings.batch_max_rows,
                max_delay: settings.batch_max_delay,
                queue: settings.writer_queue,
                idle_checkpoint: store::writer::IDLE_CHECKPOINT,
            },
            events.clone(),
        );
        let hub = Arc::new(Hub::default());
        let commands = commands::Commands::start(
            store.clone(),
            writer.clone(),
            hub.clone(),
            events.clone(),
            settings.command_window,
            settings.command_queue,
            shutdown.clone(),
        )
        .await?;
        // Sessions close only once the listener is closed. Told at the same moment, they
        // would be answered by devices reconnecting into the listen queue before the
        // accept loop got its turn to close it, and every one queued there would be reset.
        let closing = CancellationToken::new();
        let ctx = Arc::new(DeviceContext {
            settings: settings.clone(),
            store: store.clone(),
            hub: hub.clone(),
            writer: writer.clone(),
            commands: commands.clone(),
            events: events.clone(),
            limits: device::limits::Limits::new(
                settings.max_connections,
                settings.max_connections_per_ip,
                settings.device_connects_per_min,
            ),
            shutdown: closing.clone(),
        });

        let device_endpoint = api::console::DeviceEndpoint {
            tls: device_tls.is_some(),
            addr: device_listener.local_addr().expect("bound listener"),
        };
        let sessions = TaskTracker::new();
        let device_acceptor = device_tls.map(TlsAcceptor::from);
        let accept_loop = tokio::spawn(device::listener::serve(
            device_listener,
            device_acceptor,
            ctx.clone(),
            sessions.clone(),
            shutdown.clone(),
        ));

        let router = api::router(api::ApiState {
            store: store.clone(),
            writer,
            hub,
            commands,
            events,
            api_key: Arc::new(api_key),
            shutdown: shutdown.clone(),
            device_endpoint,
        });
        let api_shutdown = shutdown.clone();
        let api_server = match api_tls {
            Some(config) => {
                let listener = api::https::TlsListener::new(
                    api_listener,
                    TlsAcceptor::from(config),
                    settings.handshake_timeout,
                )
                .map_err(GatewayError::Api)?;
                tokio::spawn(async move {
                    axum::serve(listener, router)
                        .with_graceful_shutdown(api_shutdown.cancelled_owned())
                        .await
                })
            }
            None => tokio::spawn(async move {
                axum::serve(api_listener, router)
                    .with_graceful_shutdown(api_shutdown.cancelled_owned())
                    .await
            }),
        };

        shutdown.cancelled().await;
        tracing::info!("shutting down: closing device connections");
        let _ = accept_loop.await;
        closing.cancel();
        sessions.close();
        if tokio::time::timeout(settings.shutdown_grace, sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!("some device sessions did not finish within the grace period");
        }
        // The API holds writer handles too (commands, devices created): it must finish before
        // the writer can.
        match tokio::time::timeout(settings.shutdown_grace, api_server).await {
            Ok(Ok(Err(e))) => return Err(GatewayError::Api(e)),
            Err(_) => tracing::warn!("API requests still running at the end of the grace period"),
            _ => {}
        }
        drop(ctx);
        if tokio::time::timeout(settings.shutdown_grace, writer_task)
            .await
            .is_err()
        {
            tracing::warn!("the telemetry writer did not finish within the grace period");
        }
        store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Connections the kernel may hold for the accept loop (it caps this at
/// `net.core.somaxconn`): a fleet reconnecting at once after a restart waits in the queue
/// instead of being reset while the gateway works through its handshakes. Tokio's `bind`
/// asks for 1024.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener as `TcpListener::bind` does (`SO_REUSEADDR`), with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
