//! Hand-made client traffic for hardening tests: WebSocket frames built bit by bit (RFC 6455
//! §5.2), well-formed or not, written on a [`RawConn`]; the first flight of a TLS client as
//! bytes; and a stream that trickles what it writes.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;

use crate::device::{client_config, parse_frame, RawConn};

/// Opcodes of RFC 6455 §5.2 (the others are reserved).
pub mod opcode {
    /// A continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// A text frame.
    pub const TEXT: u8 = 0x1;
    /// A binary frame.
    pub const BINARY: u8 = 0x2;
    /// A close frame.
    pub const CLOSE: u8 = 0x8;
    /// A ping.
    pub const PING: u8 = 0x9;
}

/// The masking key of every frame built here (RFC 6455 §5.7 uses it in its examples).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// One WebSocket frame as a client writes it: final and masked unless told otherwise.
#[derive(Clone, Debug)]
pub struct Frame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    payload: Vec<u8>,
}

impl Frame {
    /// A final, masked frame with any opcode (reserved ones included).
    pub fn new(opcode: u8, payload: impl Into<Vec<u8>>) -> Frame {
        Frame {
            fin: true,
            rsv: 0,
            opcode,
            masked: true,
            payload: payload.into(),
        }
    }

    /// A text frame; its payload need not be valid UTF-8.
    pub fn text(payload: impl Into<Vec<u8>>) -> Frame {
        Frame::new(opcode::TEXT, payload)
    }

    /// A binary frame.
    pub fn binary(payload: impl Into<Vec<u8>>) -> Frame {
        Frame::new(opcode::BINARY, payload)
    }

    /// A continuation frame.
    pub fn continuation(payload: impl Into<Vec<u8>>) -> Frame {
        Frame::new(opcode::CONTINUATION, payload)
    }

    /// A ping.
    pub fn ping(payload: impl Into<Vec<u8>>) -> Frame {
        Frame::new(opcode::PING, payload)
    }

    /// A close frame with a status code (valid or not) and a reason.
    pub fn close(code: u16, reason: &str) -> Frame {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        Frame::new(opcode::CLOSE, payload)
    }

    /// `text` cut into frames of at most `size` bytes: a text frame, then continuations,
    /// only the last one final.
    pub fn fragments(text: &[u8], size: usize) -> Vec<Frame> {
        let chunks: Vec<&[u8]> = text.chunks(size.max(1)).collect();
        let last = chunks.len().saturating_sub(1);
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, chunk)| {
                let op = if i == 0 {
                    opcode::TEXT
                } else {
                    opcode::CONTINUATION
                };
                Frame::new(op, chunk).fin(i == last)
            })
            .collect()
    }

    /// Sets or clears the FIN bit.
    pub fn fin(mut self, fin: bool) -> Frame {
        self.fin = fin;
        self
    }

    /// Sets reserved bits: `0b100` is RSV1, `0b010` RSV2, `0b001` RSV3.
    pub fn rsv(mut self, bits: u8) -> Frame {
        self.rsv = bits & 0b111;
        self
    }

    /// Sends the payload unmasked (which a client must never do).
    pub fn unmasked(mut self) -> Frame {
        self.masked = false;
        self
    }

    /// The frame's bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload.len() + 14);
        out.push(u8::from(self.fin) << 7 | self.rsv << 4 | (self.opcode & 0x0f));
        let mask_bit = if self.masked { 0x80 } else { 0 };
        let len = self.payload.len();
        if len < 126 {
            out.push(mask_bit | len as u8);
        } else if let Ok(len) = u16::try_from(len) {
            out.push(mask_bit | 126);
            out.extend_from_slice(&len.to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if self.masked {
            out.extend_from_slice(&MASK);
            out.extend(
                self.payload
                    .iter()
                    .zip(MASK.iter().cycle())
                    .map(|(b, m)| b ^ m),
            );
        } else {
            out.extend_from_slice(&self.payload);
        }
        out
    }
}

/// What a [`RawConn`] read next.
#[derive(Debug)]
pub enum RawEvent {
    /// A frame from the gateway.
    Frame {
        /// Its opcode.
        opcode: u8,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// The connection ended (end of stream or an error).
    Ended(String),
    /// Nothing arrived in time.
    Timeout,
}

impl RawConn {
    /// Writes `bytes` as they are and flushes.
    pub async fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tls.write_all(bytes).await?;
        self.tls.flush().await
    }

    /// Writes one frame.
    pub async fn send_frame(&mut self, frame: &Frame) -> io::Result<()> {
        self.write_bytes(&frame.encode()).await
    }

    /// The next frame, the end of the connection, or a timeout.
    pub async fn next_event(&mut self, timeout: Duration) -> RawEvent {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((opcode, payload, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return RawEvent::Frame { opcode, payload };
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.tls.read(&mut chunk)).await {
                Err(_) => return RawEvent::Timeout,
                Ok(Ok(0)) => return RawEvent::Ended("end of stream".into()),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return RawEvent::Ended(e.to_string()),
            }
        }
    }

    /// The next text frame as JSON; panics on anything else.
    pub async fn recv_json(&mut self, timeout: Duration) -> Value {
        match self.next_event(timeout).await {
            RawEvent::Frame {
                opcode: opcode::TEXT,
                payload,
            } => serde_json::from_slice(&payload).unwrap_or_else(|e| {
                panic!(
                    "gateway sent a text frame that is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&payload)
                )
            }),
            other => panic!("expected a JSON text frame, got {other:?}"),
        }
    }

    /// Reads up to the gateway's close frame (skipping pings) and returns its code and the
    /// JSON messages that came before it. Panics if the connection ends first or nothing comes
    /// within `timeout`.
    pub async fn expect_close(&mut self, timeout: Duration) -> (u16, Vec<Value>) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                RawEvent::Frame {
                    opcode: opcode::CLOSE,
                    payload,
                } => {
                    assert!(
                        payload.len() >= 2,
                        "close frame without a code: {payload:?} (after {before:?})"
                    );
                    return (u16::from_be_bytes([payload[0], payload[1]]), before);
                }
                RawEvent::Frame {
                    opcode: opcode::TEXT,
                    payload,
                } => before.push(serde_json::from_slice(&payload).unwrap_or_else(|e| {
                    panic!(
                        "gateway sent a text frame that is not JSON ({e}): {:?}",
                        String::from_utf8_lossy(&payload)
                    )
                })),
                RawEvent::Frame { opcode, .. } if opcode & 0x8 != 0 => continue,
                other => panic!("expected a close frame, got {other:?} (after {before:?})"),
            }
        }
    }

    /// Answers the gateway's close (as RFC 6455 §5.5.1 asks; a write error is ignored, the
    /// gateway may already be gone), then [`RawConn::expect_end`].
    pub async fn answer_close(&mut self, code: u16, timeout: Duration) -> Result<(), String> {
        let _ = self.send_frame(&Frame::close(code, "")).await;
        self.expect_end(timeout).await
    }

    /// Waits for the gateway to end the connection (control frames skipped); `Err` says what
    /// came instead within `timeout`.
    pub async fn expect_end(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                RawEvent::Ended(_) => return Ok(()),
                RawEvent::Timeout => {
                    return Err(format!("connection still open {timeout:?} after the close"))
                }
                RawEvent::Frame { opcode, payload } => {
                    if opcode & 0x8 == 0 {
                        return Err(format!(
                            "data frame (opcode {opcode:#x}) after the close: {:?}",
                            String::from_utf8_lossy(&payload)
                        ));
                    }
                }
            }
        }
    }
}

/// The first flight of a TLS client trusting `ca` (its ClientHello), as bytes on the wire.
pub fn client_hello(ca: &Path) -> Vec<u8> {
    let name = ServerName::try_from("127.0.0.1").expect("an IP address is a server name");
    let mut conn =
        rustls::ClientConnection::new(client_config(ca), name).expect("a TLS client connection");
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).expect("write the ClientHello");
    }
    hello
}

/// A stream whose first `slow` written bytes go out at most `chunk` bytes every `pace`;
/// writes after them, and all reads, pass straight through.
pub struct Trickle<S> {
    inner: S,
    chunk: usize,
    pace: Duration,
    slow: usize,
    wait: Option<Pin<Box<Sleep>>>,
}

impl<S> Trickle<S> {
    /// Trickles the first `slow` bytes written to `inner`.
    pub fn new(inner: S, slow: usize, chunk: usize, pace: Duration) -> Trickle<S> {
        Trickle {
            inner,
            chunk: chunk.max(1),
            pace,
            slow,
            wait: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Trickle<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Trickle<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.slow == 0 {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        if let Some(wait) = this.wait.as_mut() {
            ready!(wait.as_mut().poll(cx));
            this.wait = None;
        }
        let n = buf.len().min(this.chunk).min(this.slow);
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..n]))?;
        this.slow -= written;
        if this.slow > 0 {
            this.wait = Some(Box::pin(tokio::time::sleep(this.pace)));
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::{opcode, Frame};
    use crate::device::parse_frame;

    #[test]
    fn frames_encode_as_rfc6455_says() {
        // RFC 6455 §5.7: a masked "Hello".
        assert_eq!(
            Frame::text("Hello").encode(),
            [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
        assert_eq!(
            Frame::text("Hel").unmasked().fin(false).encode(),
            [0x01, 0x03, 0x48, 0x65, 0x6c]
        );
        assert_eq!(Frame::new(0xB, "").rsv(0b101).encode()[0], 0xDB);
        let long = Frame::ping(vec![7u8; 126]).encode();
        assert_eq!(&long[..4], [0x89, 0xFE, 0x00, 0x7E]);
        let (op, payload, used) = parse_frame(&long).expect("a whole frame");
        assert_eq!(
            (op, payload, used),
            (opcode::PING, vec![7u8; 126], long.len())
        );
        let big = Frame::binary(vec![0u8; 70_000]).unmasked().encode();
        assert_eq!(&big[..10], [0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x11, 0x70]);
    }

    #[test]
    fn fragments_are_text_then_continuations_and_only_the_last_is_final() {
        let frames = Frame::fragments(b"abcdefg", 3);
        let heads: Vec<u8> = frames.iter().map(|f| f.encode()[0]).collect();
        assert_eq!(heads, [0x01, 0x00, 0x80]);
    }
}
