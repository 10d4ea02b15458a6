//! The accept loop: accepts only; TLS, upgrade and the session run in a task per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::handshake::{self, Refusal};
use super::held_write::HeldWrite;
use super::limits::Refused;
use super::session::{Identity, Session};
use super::DeviceContext;
use crate::metrics::METRICS;
use crate::store::devices::TokenOwner;

/// Accepts device connections until `stop` is cancelled, then closes the listener; each
/// connection runs in its own tracked task.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: Arc<DeviceContext>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let mut failing = AcceptFailures::default();
    // A slot per connection still in its handshakes, taken before accepting: a flood of
    // stalled handshakes waits in the listen backlog instead of taking every descriptor.
    let slots = Arc::new(Semaphore::new(ctx.settings.max_handshakes));
    loop {
        let slot = tokio::select! {
            _ = stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                failing.recovered();
                let _ = tcp.set_nodelay(true);
                // Every log line of the connection carries these (JSON: in `span`/`spans`).
                let span = tracing::info_span!(
                    "conn",
                    %peer,
                    device_id = tracing::field::Empty,
                    session_id = tracing::field::Empty,
                    auth = tracing::field::Empty,
                );
                tracker.spawn(
                    handle(tcp, peer, slot, tls.clone(), ctx.clone(), tracker.clone())
                        .instrument(span),
                );
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning; the
                // connections being served are unaffected.
                failing.failed(&e);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// How long the accept loop sleeps after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// While accepts keep failing, one warning per this interval (with the count) is enough.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// Runs of failed accepts: each counted in metrics; warned about at most once per
/// [`ACCEPT_WARN_EVERY`], however often descriptors run out and come back.
#[derive(Default)]
struct AcceptFailures {
    /// Failures in the current run, and whether it was warned about.
    run: Option<(u64, bool)>,
    last_warned: Option<tokio::time::Instant>,
}

impl AcceptFailures {
    fn failed(&mut self, error: &std::io::Error) {
        METRICS.accept_failures.inc();
        let now = tokio::time::Instant::now();
        let (count, warned) = self.run.get_or_insert((0, false));
        *count += 1;
        if *warned
            || self
                .last_warned
                .is_some_and(|at| now.duration_since(at) < ACCEPT_WARN_EVERY)
        {
            return;
        }
        tracing::warn!(
            %error,
            "accept failed; backing off (out of file descriptors? raise `ulimit -n`)"
        );
        *warned = true;
        self.last_warned = Some(now);
    }

    fn recovered(&mut self) {
        if let Some((failures, true)) = self.run.take() {
            tracing::info!(failures, "accepting connections again");
        }
    }
}

async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    tls: Option<TlsAcceptor>,
    ctx: Arc<DeviceContext>,
    tracker: TaskTracker,
) {
    // One budget for TLS and the upgrade together, from the accept.
    let deadline = tokio::time::Instant::now() + ctx.settings.handshake_timeout;
    match tls {
        Some(acceptor) => {
            let stream = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    METRICS.handshake("tls_failed");
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    METRICS.handshake("timeout");
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            };
            // Verified by rustls against the device CA; only its CN is read here.
            let certified = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| crate::tls::device_id_of(cert).ok_or(()));
            upgrade(stream, peer, certified, (deadline, slot), ctx, tracker).await;
        }
        None => upgrade(tcp, peer, None, (deadline, slot), ctx, tracker).await,
    }
}

/// The device id of a verified client certificate (`Err` when it names none).
type Certified = Option<Result<String, ()>>;

/// Authenticates and upgrades by `deadline`; refusals are answered with their HTTP status.
async fn upgrade<S>(
    mut stream: S,
    peer: SocketAddr,
    certified: Certified,
    (deadline, slot): (tokio::time::Instant, OwnedSemaphorePermit),
    ctx: Arc<DeviceContext>,
    tracker: TaskTracker,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    #[cfg(feature = "conformance")]
    if ctx.settings.conformance_echo {
        return super::conformance::echo(stream, peer, ctx).await;
    }
    let admission = match ctx.limits.admit(peer.ip()) {
        Ok(a) => a,
        Err(refused) => {
            let refusal = match refused {
                Refused::PerIp => Refusal::too_many("too many connections from this address", 10),
                _ => Refusal::unavailable("the gateway is at its connection limit", 5),
            };
            METRICS.handshake(refusal.error);
            handshake::refuse(&mut stream, &refusal).await;
            return;
        }
    };
    // Read before the device is looked up (see `Commands::queued_since`).
    let queued_count = ctx.commands.queued_count();
    let accepted =
        tokio::time::timeout_at(deadline, authenticate(&mut stream, certified, &ctx)).await;
    let (owner, auth, request, leftover) = match accepted {
        Ok(Ok(ok)) => ok,
        Ok(Err(refusal)) => {
            tracing::debug!(
                status = refusal.status,
                error = refusal.error,
                "upgrade refused"
            );
            METRICS.handshake(refusal.error);
            handshake::refuse(&mut stream, &refusal).await;
            return;
        }
        Err(_) => {
            METRICS.handshake("timeout");
            tracing::debug!("upgrade timed out");
            return;
        }
    };
    tracing::Span::current().record("device_id", owner.id.as_str());
    // Sent with the welcome, once the session is on record (see `HeldWrite`).
    let stream = HeldWrite::new(stream, handshake::accept_response(&request).into_bytes());
    let config = ws_config(ctx.settings.max_message_bytes);
    let ws = if leftover.is_empty() {
        WebSocketStream::from_raw_socket(stream, Role::Server, Some(config)).await
    } else {
        WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(config)).await
    };
    METRICS.handshake("ok");
    let identity = Identity {
        device_pk: owner.pk,
        device_id: owner.id,
        session_id: uuid::Uuid::now_v7().to_string(),
        remote_addr: peer.to_string(),
        auth,
        commands_as_of: (!owner.commands_waiting).then_some(queued_count),
    };
    let span = tracing::Span::current();
    span.record("session_id", identity.session_id.as_str());
    span.record("auth", auth);
    // Through the handshakes: the slot goes to the next connection.
    drop(slot);
    // The session gets a task of its own, sized for it alone: this one's future also holds
    // every handshake state (about three times the session's), and it ends here, so an idle
    // connection keeps only the session's memory.
    let session = Session::new(ws, ctx, identity);
    tracker.spawn(
        async move {
            session.run().await;
            drop(admission);
        }
        .in_current_span(),
    );
}

/// The device, how it proved itself (`token` or `certificate`), its upgrade request, and bytes
/// that followed the request head.
type Authenticated = (TokenOwner, &'static str, handshake::UpgradeRequest, Vec<u8>);

async fn authenticate<S>(
    stream: &mut S,
    certified: Certified,
    ctx: &DeviceContext,
) -> Result<Authenticated, Refusal>
where
    S: AsyncRead + Unpin,
{
    let (request, leftover) = handshake::read_head(stream).await?;
    if ctx.shutdown.is_cancelled() {
        return Err(Refusal::unavailable("the gateway is shutting down", 5));
    }
    if !handshake::origin_allowed(request.origin.as_deref(), &ctx.settings.allowed_origins) {
        return Err(Refusal::ORIGIN_NOT_ALLOWED);
    }
    let storage_down = |e: crate::store::StoreError| {
        tracing::error!(error = %e, "device lookup failed");
        Refusal::unavailable("storage unavailable", 5)
    };
    let (owner, auth) = match (request.token.as_deref(), certified) {
        (_, Some(Err(()))) => {
            return Err(Refusal::unauthorized(
                "the client certificate has no subject CN naming a device",
            ))
        }
        (Some(token), certified) => {
            let owner = ctx
                .store
                .device_by_token(&hash_token(token))
                .map_err(storage_down)?
                .ok_or(Refusal::unauthorized("unknown or wrong token"))?;
            if certified.is_some_and(|id| id.ok() != Some(owner.id.clone())) {
                return Err(Refusal::unauthorized(
                    "the token and the client certificate name different devices",
                ));
            }
            (owner, "token")
        }
        (None, Some(Ok(id))) => {
            let owner = ctx
                .store
                .get_device(&id)
                .await
                .map_err(storage_down)?
                .map(|row| TokenOwner {
                    pk: row.pk,
                    id: row.id,
                    enabled: row.enabled,
                    commands_waiting: true,
                })
                .ok_or(Refusal::unauthorized(
                    "the client certificate names no registered device",
                ))?;
            (owner, "certificate")
        }
        (None, None) => {
            return Err(Refusal::unauthorized(
                "no credentials: send Authorization: Bearer <token> or a client certificate",
            ))
        }
    };
    if !owner.enabled {
        return Err(Refusal::DISABLED);
    }
    if let Err(Refused::Flapping { retry_after }) = ctx
        .limits
        .device_connect(owner.pk, tokio::time::Instant::now())
    {
        return Err(Refusal::too_many(
            "this device connects too often; wait before reconnecting",
            retry_after,
        ));
    }
    Ok((owner, auth, request, leftover))
}

/// SHA-256 of a token: what the registry stores and looks up.
pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// WebSocket buffers sized for small device messages, not tungstenite's defaults.
///
/// The read buffer is what an idle connection keeps: 512 bytes holds a typical telemetry
/// message whole, and a bigger frame is read in several steps into a buffer reserved for
/// its length (measured: 2,048 -> 512 bytes took RSS per idle connection from 17.0 to
/// 14.5 KiB at 4,000 connections, with no change in ingest throughput).
pub fn ws_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(8192)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}
