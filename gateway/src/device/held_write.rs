//! A stream that holds back the upgrade's `101` response until the first flush after it.
//!
//! Written on its own, the response is a TLS record and a send of its own, and the device
//! wakes once for it and once more for the welcome that follows. Held back, both go out in
//! one record and one send when the welcome is flushed (measured: the gateway's sends per
//! connection went from 3 to 2 while a fleet connects).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `S`, with bytes written to it before the first flush kept until that flush.
#[derive(Debug)]
pub struct HeldWrite<S> {
    inner: S,
    /// Empty once flushed; its allocation is freed then, so an idle session keeps none.
    held: Vec<u8>,
}

impl<S> HeldWrite<S> {
    /// Wraps `inner` with `first` held as the start of what the first flush sends.
    pub fn new(inner: S, first: Vec<u8>) -> HeldWrite<S> {
        HeldWrite { inner, held: first }
    }

    #[cfg(test)]
    fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncWrite + Unpin> HeldWrite<S> {
    /// Sends what is held, as few writes as the stream takes it in.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        self.held = Vec::new();
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeldWrite<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeldWrite<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.held.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        // Until the flush, writes join what is held (tungstenite flushes after each
        // message it sends, so this is the welcome and nothing more).
        this.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Records each write it is given, taking at most `per_write` bytes of it.
    struct Recorder {
        writes: Vec<Vec<u8>>,
        per_write: usize,
        flushes: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.per_write);
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn recorder(per_write: usize) -> Recorder {
        Recorder {
            writes: Vec::new(),
            per_write,
            flushes: 0,
        }
    }

    #[tokio::test]
    async fn the_held_bytes_and_the_next_message_go_out_in_one_write_at_the_flush() {
        let mut s = HeldWrite::new(recorder(usize::MAX), b"HTTP/1.1 101\r\n\r\n".to_vec());
        s.write_all(b"welcome").await.unwrap();
        assert!(
            s.get_ref().writes.is_empty(),
            "nothing is sent before the flush"
        );
        s.flush().await.unwrap();
        assert_eq!(
            s.get_ref().writes,
            vec![b"HTTP/1.1 101\r\n\r\nwelcome".to_vec()]
        );
        assert_eq!(s.get_ref().flushes, 1);
        assert_eq!(s.held.capacity(), 0, "the buffer is freed once sent");

        // From then on every write goes straight through.
        s.write_all(b"next").await.unwrap();
        assert_eq!(s.get_ref().writes.len(), 2);
        assert_eq!(s.get_ref().writes[1], b"next");
    }

    #[tokio::test]
    async fn a_stream_taking_a_few_bytes_at_a_time_still_gets_everything_in_order() {
        let mut s = HeldWrite::new(recorder(3), b"0123456".to_vec());
        s.write_all(b"789").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(s.get_ref().writes.concat(), b"0123456789");
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = HeldWrite::new(a, b"held".to_vec());
        b.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        s.flush().await.unwrap();
        let mut held = [0u8; 4];
        b.read_exact(&mut held).await.unwrap();
        assert_eq!(&held, b"held");
    }
}
