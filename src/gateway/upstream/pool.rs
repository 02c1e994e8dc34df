//! Pooled keep-alive HTTP/1.1 connections to the model servers, driven by the request that
//! uses them rather than by a task of their own, speaking the gateway's own HTTP/1.1 client
//! side ([`super::h1`]).
//!
//! hyper's pooled client (`hyper_util`'s legacy `Client`) runs every connection in a spawned
//! task: a request's head went to that task through a channel, and each frame of the answer
//! came back through another, so every request crossed tasks — and on a multi-threaded runtime
//! workers — once each way, on top of the netstack driver's own hop. Measured with the
//! `MG_DIAG` timeline (issue 14, README): the hand-off into the pooled connection was 48 µs
//! p50 of the ~200 µs the gateway spends on a request's way in. Driving hyper's connection
//! from the request instead (tried twice) removed the hop but cost 1.15× the instructions per
//! token event: hyper's state machine still ran, and still passed every frame through its
//! body channel. Each of those channels also kept a second 32-slot block per pooled connection
//! after its 33rd request (issue 15's soak step).
//!
//! Here a connection is a [`TunnelStream`] and the bytes it received. [`UpstreamClient::send`]
//! writes the request and reads the head in the request's own future; the answer's body
//! ([`UpstreamBody`]) decodes from the stream's receive buffer each time it is polled, i.e. in
//! the task that sends the answer to the client, which is the task the netstack wakes when the
//! model's bytes arrive. A body read to its end puts its connection back; one dropped
//! mid-answer drops the connection (the netstack resets it, so the model stops). An idle
//! connection is polled by nobody: a checkout looks at it once ([`TunnelStream::idle_usable`])
//! and discards it if the server closed it or sent something, and a sweeper closes those idle
//! longer than [`IDLE_TIMEOUT`] (below vLLM's and uvicorn's 5 s keep-alive, so a connection
//! the server is closing is not reused).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::{Method, Request, Response};
use tokio::io::AsyncWrite;

use super::h1::{self, Decoded, Framing};
use super::UPSTREAM_RX_BUFFER;
use crate::gateway::error::ApiError;
use crate::netstack::{NetError, Netstack, TunnelStream};

/// An idle connection older than this is closed, not reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Idle connections kept per model server; one more is closed on its return.
pub const MAX_IDLE_PER_SERVER: usize = 256;
/// How often the sweeper closes expired idle connections.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// One connection to a model server: the stream, what it received and not yet parsed, and
/// how many requests it carried.
struct Conn {
    stream: TunnelStream,
    buf: BytesMut,
    uses: u32,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

struct Inner {
    ns: Netstack,
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    dialled: AtomicU64,
}

/// Keep-alive HTTP/1.1 connections to the model servers through the tunnel (see the module
/// doc). Cheap to clone: the clones share the pool.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<Inner>,
}

/// Why [`UpstreamClient::send`] got no response head.
#[derive(Debug)]
pub struct SendFailure {
    pub error: ApiError,
    /// It went over a pooled keep-alive connection that had carried requests before: a server
    /// that closed it just as it was reused (llama.cpp closes after every stream although it
    /// says keep-alive) says nothing about the server's health.
    pub reused: bool,
}

impl UpstreamClient {
    /// A pool dialling through `ns`. Inside a tokio runtime it starts its sweeper, which ends
    /// when the last clone of the pool is dropped.
    pub fn new(ns: Netstack) -> UpstreamClient {
        let inner = Arc::new(Inner {
            ns,
            idle: Mutex::new(HashMap::new()),
            dialled: AtomicU64::new(0),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep(Arc::downgrade(&inner)));
        }
        UpstreamClient { inner }
    }

    /// Connections dialled so far (each carries requests until it closes or expires).
    pub fn dialled(&self) -> u64 {
        self.inner.dialled.load(Ordering::Relaxed)
    }

    /// Idle connections in the pool now, over every server.
    pub fn idle(&self) -> usize {
        lock(&self.inner.idle).values().map(Vec::len).sum()
    }

    /// Sends `req` (an absolute `http://IP:PORT/…` URI; it goes out in origin form with a
    /// `Host` header) and waits for the response head, bounded by `timeout`. The body streams
    /// when the caller polls it.
    pub async fn send(
        &self,
        req: Request<Bytes>,
        timeout: Duration,
    ) -> Result<Response<UpstreamBody>, SendFailure> {
        let mut reused = false;
        match tokio::time::timeout(timeout, self.send_inner(req, &mut reused)).await {
            Err(_) => Err(SendFailure {
                error: ApiError::GatewayTimeout,
                reused,
            }),
            Ok(Err(error)) => Err(SendFailure { error, reused }),
            Ok(Ok(r)) => Ok(r),
        }
    }

    async fn send_inner(
        &self,
        req: Request<Bytes>,
        reused: &mut bool,
    ) -> Result<Response<UpstreamBody>, ApiError> {
        let addr = target(&req)?;
        let mut conn = match self.checkout(addr) {
            Some(c) => c,
            None => self.dial(addr).await?,
        };
        *reused = conn.uses > 0;
        conn.uses += 1;
        let (head, rest) = h1::encode_request(&req);
        let mut out = [head.freeze(), rest];
        let method = req.method().clone();
        drop(req);
        // Write the request and read the answer's head at once: a server may answer (413,
        // 400…) before it read the whole body, and then stop reading.
        let mut write_failed: Option<io::Error> = None;
        let head = std::future::poll_fn(|cx| {
            poll_exchange(&mut conn, &mut out, &mut write_failed, &method, cx)
        })
        .await?;
        let complete = out.iter().all(|b| b.is_empty());
        let h1::Head {
            response,
            framing,
            keep_alive,
        } = head;
        let (parts, ()) = response.into_parts();
        Ok(Response::from_parts(
            parts,
            UpstreamBody {
                conn: Some(conn),
                framing,
                // A connection whose request was not written to its end cannot carry another.
                keep_alive: keep_alive && complete,
                addr,
                pool: Arc::downgrade(&self.inner),
            },
        ))
    }

    /// The most recently used idle connection to `addr` that is still open and quiet.
    fn checkout(&self, addr: SocketAddr) -> Option<Conn> {
        let mut closed = Vec::new();
        let found = {
            let mut map = lock(&self.inner.idle);
            let list = map.get_mut(&addr)?;
            let mut found = None;
            while let Some(idle) = list.pop() {
                if idle.since.elapsed() < IDLE_TIMEOUT && idle.conn.stream.idle_usable() {
                    found = Some(idle.conn);
                    break;
                }
                closed.push(idle);
            }
            if list.is_empty() {
                map.remove(&addr);
            }
            found
        };
        // Dropped (closed) outside the lock.
        drop(closed);
        found
    }

    /// A new connection to `addr`.
    async fn dial(&self, addr: SocketAddr) -> Result<Conn, ApiError> {
        let stream = self
            .inner
            .ns
            .dial_with_receive_buffer(addr, UPSTREAM_RX_BUFFER)
            .await
            .map_err(ApiError::from_net)?;
        self.inner.dialled.fetch_add(1, Ordering::Relaxed);
        Ok(Conn {
            stream,
            buf: BytesMut::new(),
            uses: 0,
        })
    }
}

/// One poll of a request's exchange: writes what is left of `out` (a write error is kept and
/// told only if no head arrives), then reads until the response head is complete.
fn poll_exchange(
    conn: &mut Conn,
    out: &mut [Bytes; 2],
    write_failed: &mut Option<io::Error>,
    method: &Method,
    cx: &mut Context<'_>,
) -> Poll<Result<h1::Head, ApiError>> {
    if write_failed.is_none() {
        for part in out.iter_mut() {
            while !part.is_empty() {
                match Pin::new(&mut conn.stream).poll_write(cx, part) {
                    Poll::Ready(Ok(n)) => part.advance(n),
                    Poll::Ready(Err(e)) => {
                        *write_failed = Some(e);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if !part.is_empty() {
                break;
            }
        }
    }
    loop {
        match h1::parse_head(&mut conn.buf, method) {
            Ok(Some(head)) => return Poll::Ready(Ok(head)),
            Ok(None) => {}
            Err(e) => return Poll::Ready(Err(ApiError::BadGateway(e.to_string()))),
        }
        match conn.stream.poll_read_buf(cx, &mut conn.buf) {
            Poll::Ready(Ok(0)) => {
                return Poll::Ready(Err(match write_failed.take() {
                    Some(e) => classify(&e),
                    None => closed(),
                }))
            }
            Poll::Ready(Ok(_)) => continue,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(classify(&e))),
            Poll::Pending => {
                if let Some(e) = write_failed.take() {
                    // Nothing to wait for: the request did not go out.
                    return Poll::Ready(Err(classify(&e)));
                }
                return Poll::Pending;
            }
        }
    }
}

/// The server `req` goes to (its URI's authority, `IP:PORT`).
fn target(req: &Request<Bytes>) -> Result<SocketAddr, ApiError> {
    req.uri()
        .authority()
        .and_then(|a| a.as_str().parse().ok())
        .ok_or_else(|| ApiError::BadGateway("invalid upstream URL".into()))
}

fn closed() -> ApiError {
    ApiError::BadGateway("the model server closed the connection".into())
}

/// Maps a connection error to what the caller is told, keeping the tunnel's reason.
pub fn classify(e: &io::Error) -> ApiError {
    match NetError::of(e) {
        Some(n) => ApiError::from_net(n),
        None => closed(),
    }
}

/// A model server's answer body. Polling it reads its connection (see the module doc); once
/// it was read to its end the connection goes back to the pool, dropped earlier it is closed.
pub struct UpstreamBody {
    /// `None` once the body ended or failed.
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    addr: SocketAddr,
    pool: Weak<Inner>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("framing", &self.framing)
            .finish()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let me = &mut *self;
        loop {
            let Some(c) = me.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match h1::decode(&mut me.framing, &mut c.buf) {
                Ok(Decoded::Data(data)) => {
                    if me.framing == Framing::Done {
                        me.check_in();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    me.check_in();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => {
                    me.conn = None;
                    return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, e))));
                }
            }
            match c.stream.poll_read_buf(cx, &mut c.buf) {
                Poll::Ready(Ok(0)) => {
                    me.conn = None;
                    if me.framing == Framing::Close {
                        me.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the model server closed the connection in the middle of its answer",
                    ))));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    me.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl UpstreamBody {
    /// Puts the connection back in the pool (the answer was read to its end), when it may
    /// carry another request.
    fn check_in(&mut self) {
        let Some(mut c) = self.conn.take() else {
            return;
        };
        if !self.keep_alive || !c.buf.is_empty() || !c.stream.idle_usable() {
            return;
        }
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        // The emptied buffer may still share the allocation of frames handed on: let it go.
        c.buf = BytesMut::new();
        let now = Instant::now();
        let mut map = lock(&pool.idle);
        let list = map.entry(self.addr).or_default();
        if list.len() < MAX_IDLE_PER_SERVER {
            list.push(Idle {
                conn: c,
                since: now,
            });
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // An answer with nothing left to read (`Content-Length: 0`, or its end seen) keeps its
        // connection even when nobody polled it to the end.
        if self.framing == Framing::Done {
            self.check_in();
        }
    }
}
/// Closes idle connections older than [`IDLE_TIMEOUT`] every [`SWEEP_EVERY`], until the pool
/// is gone.
async fn sweep(pool: Weak<Inner>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let now = Instant::now();
        let expired: Vec<Idle> = {
            let mut map = lock(&pool.idle);
            let mut out = Vec::new();
            for list in map.values_mut() {
                let (keep, gone): (Vec<Idle>, Vec<Idle>) = std::mem::take(list)
                    .into_iter()
                    .partition(|i| now.duration_since(i.since) < IDLE_TIMEOUT);
                *list = keep;
                out.extend(gone);
            }
            map.retain(|_, l| !l.is_empty());
            out
        };
        // Dropped outside the lock.
        drop(expired);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
