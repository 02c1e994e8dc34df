//! Idle detection for client connections: no byte read or written for `idle_timeout` closes
//! the connection. A streaming response is never idle (SSE keep-alive comments every
//! `sse_keepalive`), and a request waiting for its first byte is bounded by
//! `upstream_response_timeout` anyway, so only dead connections reach this limit.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

// tokio's clock (the real one outside tests), so paused-time tests can drive it.
use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Time of the last byte moved, as milliseconds since `start`.
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// A byte of the client's request has been read (the TLS handshake is not counted).
    read: AtomicBool,
}

impl Activity {
    pub fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            read: AtomicBool::new(false),
        }
    }

    /// Whether the client sent any request bytes yet.
    pub fn has_read(&self) -> bool {
        self.read.load(Ordering::Relaxed)
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `limit` (checks at most every `limit`, no busy loop).
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Wraps a connection and records activity on every successful read or write.
pub struct IdleIo<T> {
    inner: T,
    activity: std::sync::Arc<Activity>,
}

impl<T> IdleIo<T> {
    pub fn new(inner: T, activity: std::sync::Arc<Activity>) -> Self {
        IdleIo { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
            self.activity.read.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn idle_fires_only_after_silence() {
        let (a, mut b) = tokio::io::duplex(64);
        let act = std::sync::Arc::new(Activity::new());
        let mut io = IdleIo::new(a, act.clone());
        let limit = Duration::from_secs(10);
        let idle = act.idle_for(limit);
        tokio::pin!(idle);
        // Traffic every 6 s keeps it alive.
        for _ in 0..3 {
            tokio::select! {
                _ = &mut idle => panic!("fired while active"),
                _ = tokio::time::sleep(Duration::from_secs(6)) => {}
            }
            b.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            io.read_exact(&mut one).await.unwrap();
        }
        let t = tokio::time::Instant::now();
        idle.await;
        assert!(t.elapsed() >= limit);
    }
}
