//! The accept loop: accepts only; TLS, upgrade and the session run in a task per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::handshake::{self, Refusal};
use super::limits::Refused;
use super::session::{Identity, Session};
use super::DeviceContext;
use crate::metrics::METRICS;
use crate::store::devices::TokenOwner;

/// Accepts device connections until shutdown; each runs in its own tracked task.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: Arc<DeviceContext>,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                let span = tracing::debug_span!("conn", %peer, device_id = tracing::field::Empty);
                tracker.spawn(handle(tcp, peer, tls.clone(), ctx.clone()).instrument(span));
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning; the
                // connections being served are unaffected.
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    ctx: Arc<DeviceContext>,
) {
    let timeout = ctx.settings.handshake_timeout;
    match tls {
        Some(acceptor) => {
            let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
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
            upgrade(stream, peer, ctx).await;
        }
        None => upgrade(tcp, peer, ctx).await,
    }
}

/// Authenticates and upgrades; refusals are answered with their HTTP status.
async fn upgrade<S>(mut stream: S, peer: SocketAddr, ctx: Arc<DeviceContext>)
where
    S: AsyncRead + AsyncWrite + Unpin,
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
    let deadline = tokio::time::Instant::now() + ctx.settings.handshake_timeout;
    let accepted = tokio::time::timeout_at(deadline, authenticate(&mut stream, &ctx)).await;
    let (owner, request, leftover) = match accepted {
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
    let response = handshake::accept_response(&request);
    if stream.write_all(response.as_bytes()).await.is_err() || stream.flush().await.is_err() {
        return;
    }
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
        auth: "token",
    };
    Session::new(ws, ctx, identity).run().await;
    drop(admission);
}

/// The device, its upgrade request, and bytes that followed the request head.
type Authenticated = (TokenOwner, handshake::UpgradeRequest, Vec<u8>);

async fn authenticate<S>(stream: &mut S, ctx: &DeviceContext) -> Result<Authenticated, Refusal>
where
    S: AsyncRead + Unpin,
{
    let (request, leftover) = handshake::read_head(stream).await?;
    if ctx.shutdown.is_cancelled() {
        return Err(Refusal::unavailable("the gateway is shutting down", 5));
    }
    let token = request.token.as_deref().ok_or(Refusal::unauthorized(
        "no credentials: send Authorization: Bearer <token>",
    ))?;
    let owner = ctx
        .store
        .device_by_token(&hash_token(token))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "token lookup failed");
            Refusal::unavailable("storage unavailable", 5)
        })?
        .ok_or(Refusal::unauthorized("unknown or wrong token"))?;
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
    Ok((owner, request, leftover))
}

/// SHA-256 of a token: what the registry stores and looks up.
pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// WebSocket buffers sized for small device messages, not tungstenite's defaults.
pub fn ws_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(8192)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}
