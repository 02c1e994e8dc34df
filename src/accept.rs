//! The bounded accept loop every listener runs: the HTTPS gateway, the metrics listener, the
//! control socket and the daemon's `--forward` listeners.
//!
//! Owns the order that bounds memory: a connection permit is taken *before* `accept`, so
//! clients beyond the limit wait in the kernel's backlog instead of in our memory; a failed
//! `accept` (EMFILE and friends) backs off [`ACCEPT_BACKOFF`] instead of spinning; each
//! connection runs in its own task, which holds the permit to its end. It never does
//! per-connection work itself (TLS handshakes, HTTP): that runs in the connection's task, so a
//! slow client never stalls the loop. It never closes the listener either: the caller owns it
//! and decides when (the gateway closes it at once on stop, then drains).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

/// How long the loop waits after a failed `accept` before the next one.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A listening socket the loop can accept on.
pub trait Listener {
    /// What one `accept` yields.
    type Conn: Send + 'static;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>>;
}

impl Listener for TcpListener {
    type Conn = (TcpStream, SocketAddr);
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>> {
        TcpListener::poll_accept(self, cx)
    }
}

impl Listener for UnixListener {
    type Conn = (UnixStream, tokio::net::unix::SocketAddr);
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>> {
        UnixListener::poll_accept(self, cx)
    }
}

/// Accepts on `listener` until `stop` changes (or its sender goes away), with at most
/// `max_connections` connections open at once. `connection` is called in the loop for each
/// accepted connection and must return at once; the future it returns runs in a task of its
/// own. `what` names the listener in the log ("HTTPS", "metrics", …).
pub async fn run<L, F, Fut>(
    listener: &L,
    what: &str,
    max_connections: usize,
    mut stop: watch::Receiver<bool>,
    mut connection: F,
) where
    L: Listener,
    F: FnMut(L::Conn) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let conn = tokio::select! {
            r = std::future::poll_fn(|cx| listener.poll_accept(cx)) => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "{what} accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let work = connection(conn);
        tokio::spawn(async move {
            let _permit = permit;
            work.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;

    /// Two connections are served at once; the third waits in the backlog until one ends, and
    /// a stop ends the loop even while every permit is taken.
    #[tokio::test]
    async fn permits_bound_open_connections_and_stop_ends_the_loop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let served = Arc::new(AtomicUsize::new(0));
        let counter = served.clone();
        let task = tokio::spawn(async move {
            run(
                &listener,
                "test",
                2,
                stop,
                move |(mut s, _): (TcpStream, _)| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async move {
                        // Held until the client closes.
                        let mut b = [0u8; 1];
                        let _ = s.read(&mut b).await;
                    }
                },
            )
            .await;
            // The listener is still the caller's: it is dropped only here.
            drop(listener);
        });
        let wait_for = |n: usize| {
            let served = served.clone();
            async move {
                for _ in 0..200 {
                    if served.load(Ordering::SeqCst) >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("{n} connections not served");
            }
        };
        let a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        wait_for(2).await;
        // The kernel completes the third handshake, but the loop does not accept it.
        let _c = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(served.load(Ordering::SeqCst), 2);
        drop(a);
        wait_for(3).await;
        assert_eq!(served.load(Ordering::SeqCst), 3);

        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the loop stops while its permits are taken")
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }
}
