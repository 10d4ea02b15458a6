//! Echo mode for the Autobahn RFC 6455 suite: upgrade without authentication, echo every message.
//!
//! Compiled only with the `conformance` cargo feature and active only with
//! `--conformance-echo`; a default build has neither the code nor the flag. The
//! upgrade reuses the handshake parser and the WebSocket limits of real devices,
//! and the connection runs in the ordinary [`Session`] (frame reading, size
//! limits, close handling): only the identity check is skipped, and the session
//! echoes instead of decoding messages. See `tests/autobahn/README.md`.

#[cfg(not(debug_assertions))]
compile_error!(
    "the `conformance` feature turns off device authentication: it is for debug builds \
     running the Autobahn suite, never for a release build"
);

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::handshake::{self, Refusal};
use super::listener::ws_config;
use super::session::{Identity, Session};
use super::DeviceContext;

/// Upgrades any well-formed WebSocket request to `/v1/connect` and runs an echo session.
pub(super) async fn echo<S>(mut stream: S, peer: SocketAddr, ctx: Arc<DeviceContext>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Ok(_admission) = ctx.limits.admit(peer.ip()) else {
        let refusal = Refusal::unavailable("the gateway is at its connection limit", 5);
        handshake::refuse(&mut stream, &refusal).await;
        return;
    };
    let head = tokio::time::timeout(
        ctx.settings.handshake_timeout,
        handshake::read_head(&mut stream),
    )
    .await;
    let (request, leftover) = match head {
        Ok(Ok(head)) => head,
        Ok(Err(refusal)) => {
            handshake::refuse(&mut stream, &refusal).await;
            return;
        }
        Err(_) => return,
    };
    let response = handshake::accept_response(&request);
    if stream.write_all(response.as_bytes()).await.is_err() || stream.flush().await.is_err() {
        return;
    }
    let config = ws_config(ctx.settings.max_message_bytes);
    let ws =
        WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(config)).await;
    let identity = Identity {
        device_pk: 0,
        device_id: "conformance-echo".into(),
        session_id: uuid::Uuid::now_v7().to_string(),
        remote_addr: peer.to_string(),
        auth: "none",
        commands_as_of: None,
    };
    Session::new(ws, ctx, identity).run_echo().await;
}
