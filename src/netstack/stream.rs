//! The application side of a tunnel TCP connection: [`TunnelStream`] (tokio `AsyncRead` +
//! `AsyncWrite`) and [`TunnelListener`].
//!
//! A stream and the driver share one small, bounded state block per connection. The stream only
//! copies bytes in or out of it and tells the driver which connection needs service; it never
//! touches smoltcp or the tunnel, so no lock is held across the packet path.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Notify};

/// Why a tunnel connection failed. Carried inside `io::Error` (see [`NetError::of`]), so
/// callers such as the gateway can map it to 502/503/504.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("no WireGuard peer's AllowedIPs contains this address (add it with `modelgate peer add --allowed-ips`)")]
    NoRoute,
    #[error("the WireGuard peer that routes this address has not completed a handshake yet (is the corp side up and dialling this appliance?)")]
    NoHandshake,
    #[error("the WireGuard peer that routes this address has sent nothing, not even a keepalive, for longer than its keepalive allows (is the corp side's WireGuard up, and do its NAT and firewall let its UDP out to this appliance?)")]
    PeerSilent,
    #[error("connection refused by the server inside the tunnel")]
    Refused,
    #[error("connection reset by the server inside the tunnel")]
    Reset,
    #[error("timed out connecting through the tunnel (peer down, or nothing listening?)")]
    TimedOut,
    #[error("too many tunnel connections open (limit reached)")]
    TooManyConnections,
    #[error("the tunnel netstack has stopped")]
    Stopped,
    #[error("port already in use inside the tunnel")]
    AddrInUse,
}

impl NetError {
    pub fn kind(self) -> io::ErrorKind {
        match self {
            NetError::NoRoute => io::ErrorKind::HostUnreachable,
            NetError::NoHandshake | NetError::PeerSilent => io::ErrorKind::NotConnected,
            NetError::Refused => io::ErrorKind::ConnectionRefused,
            NetError::Reset => io::ErrorKind::ConnectionReset,
            NetError::TimedOut => io::ErrorKind::TimedOut,
            NetError::TooManyConnections => io::ErrorKind::OutOfMemory,
            NetError::Stopped => io::ErrorKind::BrokenPipe,
            NetError::AddrInUse => io::ErrorKind::AddrInUse,
        }
    }

    /// Recovers the tunnel reason from an `io::Error` produced by this module.
    pub fn of(err: &io::Error) -> Option<NetError> {
        err.get_ref()?.downcast_ref::<NetError>().copied()
    }
}

impl From<NetError> for io::Error {
    fn from(e: NetError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// How the app wakes the driver: a list of connections that need service and a notification.
pub(crate) struct DriverWake {
    pub(crate) notify: Notify,
    pub(crate) dirty: Mutex<Vec<usize>>,
}

impl DriverWake {
    pub(crate) fn new() -> Self {
        DriverWake {
            notify: Notify::new(),
            dirty: Mutex::new(Vec::new()),
        }
    }
    fn mark(&self, id: usize) {
        lock(&self.dirty).push(id);
        self.notify.notify_one();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Connecting,
    Open,
    Closed,
}

/// State shared between a [`TunnelStream`] and the driver. Bounded by `rx_cap`/`tx_cap`.
pub(crate) struct Inner {
    pub(crate) phase: Phase,
    pub(crate) error: Option<NetError>,
    pub(crate) rx: BytesMut,
    pub(crate) rx_cap: usize,
    pub(crate) rx_eof: bool,
    /// The driver left data in smoltcp because `rx` was full: the reader must wake it.
    pub(crate) rx_blocked: bool,
    pub(crate) tx: BytesMut,
    pub(crate) tx_cap: usize,
    pub(crate) tx_shutdown: bool,
    pub(crate) dropped: bool,
    /// Already in the driver's dirty list.
    pub(crate) queued: bool,
    pub(crate) read_waker: Option<Waker>,
    pub(crate) write_waker: Option<Waker>,
}

pub(crate) struct Shared {
    /// Slot in the driver's table, set by the driver before the stream is handed out.
    pub(crate) id: AtomicUsize,
    pub(crate) inner: Mutex<Inner>,
    pub(crate) wake: Arc<DriverWake>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the byte queues inconsistent in a way that
    // matters more than stopping the whole netstack would, so recover the guard.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Wakes the reader and the writer (the connection ended).
    pub(crate) fn wake_both(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

impl Shared {
    pub(crate) fn new(wake: Arc<DriverWake>, rx_cap: usize, tx_cap: usize) -> Arc<Self> {
        Arc::new(Shared {
            id: AtomicUsize::new(usize::MAX),
            inner: Mutex::new(Inner {
                phase: Phase::Connecting,
                error: None,
                rx: BytesMut::new(),
                rx_cap,
                rx_eof: false,
                rx_blocked: false,
                tx: BytesMut::new(),
                tx_cap,
                tx_shutdown: false,
                dropped: false,
                queued: false,
                read_waker: None,
                write_waker: None,
            }),
            wake,
        })
    }

    /// Puts this connection on the driver's list (once) and wakes the driver.
    fn poke(&self, inner: &mut Inner) {
        if !inner.queued {
            let id = self.id.load(Ordering::Acquire);
            if id != usize::MAX {
                inner.queued = true;
                self.wake.mark(id);
            }
        }
    }
}

/// A TCP connection through the WireGuard tunnel.
pub struct TunnelStream {
    pub(crate) shared: Arc<Shared>,
    pub(crate) local: SocketAddr,
    pub(crate) peer: SocketAddr,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish()
    }
}

impl TunnelStream {
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Resolves when the driver has connected or failed this stream.
    pub(crate) async fn established(&self) -> Result<(), NetError> {
        std::future::poll_fn(|cx| {
            let mut inner = lock(&self.shared.inner);
            match (inner.phase, inner.error) {
                (_, Some(e)) => Poll::Ready(Err(e)),
                (Phase::Connecting, None) => {
                    inner.write_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                (Phase::Open, None) => Poll::Ready(Ok(())),
                (Phase::Closed, None) => Poll::Ready(Err(NetError::Reset)),
            }
        })
        .await
    }
}

impl TunnelStream {
    /// Moves everything received and not yet read onto the end of `into` (without a copy when
    /// `into` is empty, the usual case): `Ready(Ok(n))` with the bytes moved, `Ready(Ok(0))` at
    /// the peer's FIN (or once the connection closed), `Pending` until more arrives. The
    /// upstream HTTP client reads this way (`gateway::upstream::h1`): it parses and splits the
    /// very buffer the driver filled.
    pub fn poll_read_buf(
        &self,
        cx: &mut Context<'_>,
        into: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        let shared = &self.shared;
        let mut inner = lock(&shared.inner);
        if !inner.rx.is_empty() {
            let n = inner.rx.len();
            if into.is_empty() {
                *into = std::mem::take(&mut inner.rx);
            } else {
                into.extend_from_slice(&inner.rx);
                inner.rx = BytesMut::new();
            }
            if inner.rx_blocked {
                inner.rx_blocked = false;
                shared.poke(&mut inner);
            }
            return Poll::Ready(Ok(n));
        }
        if inner.rx_eof {
            return Poll::Ready(Ok(0));
        }
        if let Some(e) = inner.error {
            return Poll::Ready(Err(e.into()));
        }
        if inner.phase == Phase::Closed {
            return Poll::Ready(Ok(0));
        }
        inner.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// True while the connection is open both ways with nothing unread and nothing left to
    /// send: what an idle keep-alive connection must be before it carries another request.
    pub fn idle_usable(&self) -> bool {
        let inner = lock(&self.shared.inner);
        inner.phase == Phase::Open
            && inner.error.is_none()
            && !inner.rx_eof
            && inner.rx.is_empty()
            && !inner.rx_blocked
            && !inner.tx_shutdown
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let shared = &self.shared;
        let mut inner = lock(&shared.inner);
        if !inner.rx.is_empty() {
            let n = inner.rx.len().min(buf.remaining());
            buf.put_slice(&inner.rx[..n]);
            inner.rx.advance(n);
            if inner.rx.is_empty() {
                // Give the memory back between bursts: idle streams stay small.
                inner.rx = BytesMut::new();
            }
            if inner.rx_blocked {
                inner.rx_blocked = false;
                shared.poke(&mut inner);
            }
            return Poll::Ready(Ok(()));
        }
        if inner.rx_eof {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = inner.error {
            return Poll::Ready(Err(e.into()));
        }
        if inner.phase == Phase::Closed {
            return Poll::Ready(Ok(()));
        }
        inner.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let shared = &self.shared;
        let mut inner = lock(&shared.inner);
        if let Some(e) = inner.error {
            return Poll::Ready(Err(e.into()));
        }
        if inner.tx_shutdown || inner.phase == Phase::Closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let room = inner.tx_cap.saturating_sub(inner.tx.len());
        if room == 0 {
            inner.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(data.len());
        inner.tx.extend_from_slice(&data[..n]);
        shared.poke(&mut inner);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bytes handed to the netstack are sent as soon as the window allows (Nagle is off).
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &self.shared;
        let mut inner = lock(&shared.inner);
        if !inner.tx_shutdown {
            inner.tx_shutdown = true;
            shared.poke(&mut inner);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let shared = &self.shared;
        let mut inner = lock(&shared.inner);
        inner.dropped = true;
        inner.read_waker = None;
        inner.write_waker = None;
        shared.poke(&mut inner);
    }
}

/// Accepts TCP connections made to a port of this netstack's tunnel address.
pub struct TunnelListener {
    pub(crate) port: u16,
    pub(crate) rx: mpsc::Receiver<TunnelStream>,
}

impl std::fmt::Debug for TunnelListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelListener")
            .field("port", &self.port)
            .finish()
    }
}

impl TunnelListener {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next connection, or `Stopped` when the netstack has shut down.
    pub async fn accept(&mut self) -> Result<(TunnelStream, SocketAddr), NetError> {
        match self.rx.recv().await {
            Some(s) => {
                let peer = s.peer;
                Ok((s, peer))
            }
            None => Err(NetError::Stopped),
        }
    }
}
