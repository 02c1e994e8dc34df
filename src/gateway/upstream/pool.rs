//! Pooled keep-alive HTTP/1.1 connections to the model servers, driven by the request that
//! uses them rather than by a task of their own.
//!
//! hyper's pooled client (`hyper_util`'s legacy `Client`) runs every connection in a spawned
//! task: a request's head went to that task through a channel, and each frame of the answer
//! came back through another, so every request crossed tasks — and on a multi-threaded runtime
//! workers — once each way, on top of the netstack driver's own hop. Measured with the
//! `MG_DIAG` timeline (issue 14, README "Where the SSE first event's time goes"): the hand-off
//! into the pooled connection was 48 µs p50 of the ~200 µs the gateway spends on a request's
//! way in, 22 µs of it with one worker: the rest was waking the second worker.
//!
//! Here a connection is a `hyper::client::conn::http1` pair (`SendRequest`, `Connection`) and
//! nobody else polls it: [`UpstreamClient::send`] writes the request and reads the head in the
//! request's own future, and the answer's body ([`UpstreamBody`]) polls the connection each
//! time it is polled, i.e. in the task that sends the answer to the client, which is the task
//! the netstack wakes when the model's bytes arrive. A body that ended cleanly puts its
//! connection back; one dropped mid-answer drops the connection (the netstack resets it, so
//! the model stops). An idle connection is polled by nobody: a checkout polls it once and
//! discards it if the server closed it, and a sweeper closes those idle longer than
//! [`IDLE_TIMEOUT`] (below vLLM's and uvicorn's 5 s keep-alive, so a connection the server is
//! closing is not reused).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, HOST};
use hyper::{Request, Response, Uri};

use super::{TunnelIo, UPSTREAM_RX_BUFFER};
use crate::gateway::error::ApiError;
use crate::netstack::{NetError, Netstack};

/// An idle connection older than this is closed, not reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Idle connections kept per model server; one more is closed on its return.
pub const MAX_IDLE_PER_SERVER: usize = 256;
/// How often the sweeper closes expired idle connections.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

type Conn = http1::Connection<TunnelIo, Full<Bytes>>;
type Sender = http1::SendRequest<Full<Bytes>>;

/// One connection to a model server: its request side, its connection state machine and how
/// many requests it carried.
struct Pooled {
    sender: Sender,
    /// Boxed once when dialled (~800 bytes), so checkouts and answers move a pointer.
    conn: Box<Conn>,
    uses: u32,
}

struct Idle {
    pooled: Pooled,
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
        req: Request<Full<Bytes>>,
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
        mut req: Request<Full<Bytes>>,
        reused: &mut bool,
    ) -> Result<Response<UpstreamBody>, ApiError> {
        let addr = target(&mut req)?;
        let mut pooled = match self.checkout(addr).await {
            Some(p) => p,
            None => self.dial(addr).await?,
        };
        *reused = pooled.uses > 0;
        pooled.uses += 1;
        let response = pooled.sender.send_request(req);
        let mut response = std::pin::pin!(response);
        let mut conn = Some(pooled.conn);
        // Drive the connection (write the request, read the head) until the head is in.
        let head = std::future::poll_fn(|cx| {
            if let Some(c) = conn.as_mut() {
                if Pin::new(&mut **c).poll(cx).is_ready() {
                    // Closed or failed: dropping it fails the response with its reason.
                    conn = None;
                }
            }
            response.as_mut().poll(cx)
        })
        .await;
        let head = head.map_err(|e| classify(&e))?;
        let (parts, body) = head.into_parts();
        Ok(Response::from_parts(
            parts,
            UpstreamBody {
                body,
                conn: conn.map(|conn| Held {
                    sender: pooled.sender,
                    conn,
                    uses: pooled.uses,
                    addr,
                    pool: Arc::downgrade(&self.inner),
                }),
                ended: false,
            },
        ))
    }

    /// The most recently used idle connection to `addr` that is still open and ready.
    async fn checkout(&self, addr: SocketAddr) -> Option<Pooled> {
        loop {
            let idle = {
                let mut map = lock(&self.inner.idle);
                let list = map.get_mut(&addr)?;
                let idle = list.pop();
                if list.is_empty() {
                    map.remove(&addr);
                }
                idle?
            };
            if idle.since.elapsed() >= IDLE_TIMEOUT {
                continue;
            }
            let mut p = idle.pooled;
            // One look: a connection the server closed (or that is not ready for another
            // request) is dropped, never waited on.
            let ready = std::future::poll_fn(|cx| Poll::Ready(poll_ready(&mut p, cx))).await;
            if ready == Poll::Ready(true) {
                return Some(p);
            }
        }
    }

    /// A new connection to `addr`, ready for its first request.
    async fn dial(&self, addr: SocketAddr) -> Result<Pooled, ApiError> {
        let stream = self
            .inner
            .ns
            .dial_with_receive_buffer(addr, UPSTREAM_RX_BUFFER)
            .await
            .map_err(ApiError::from_net)?;
        self.inner.dialled.fetch_add(1, Ordering::Relaxed);
        let (sender, conn) = http1::Builder::new()
            .handshake(TunnelIo::new(stream))
            .await
            .map_err(|e| classify(&e))?;
        let mut p = Pooled {
            sender,
            conn: Box::new(conn),
            uses: 0,
        };
        // A fresh connection wants its first request once its state machine ran once.
        match std::future::poll_fn(|cx| poll_ready(&mut p, cx)).await {
            true => Ok(p),
            false => Err(ApiError::BadGateway(
                "the model server closed the connection".into(),
            )),
        }
    }
}

/// Polls the connection once and asks whether it takes a request: `Ready(true)` it does,
/// `Ready(false)` it closed, `Pending` not yet.
fn poll_ready(p: &mut Pooled, cx: &mut Context<'_>) -> Poll<bool> {
    if Pin::new(&mut *p.conn).poll(cx).is_ready() {
        return Poll::Ready(false);
    }
    match p.sender.poll_ready(cx) {
        Poll::Ready(Ok(())) => Poll::Ready(true),
        Poll::Ready(Err(_)) => Poll::Ready(false),
        Poll::Pending => Poll::Pending,
    }
}

/// The server `req` goes to; its URI becomes origin form with a `Host` header (what hyper's
/// pooled client did for us).
fn target(req: &mut Request<Full<Bytes>>) -> Result<SocketAddr, ApiError> {
    let bad = || ApiError::BadGateway("invalid upstream URL".into());
    let authority = req.uri().authority().ok_or_else(bad)?.clone();
    let addr: SocketAddr = authority.as_str().parse().map_err(|_| bad())?;
    let host = HeaderValue::from_str(authority.as_str()).map_err(|_| bad())?;
    req.headers_mut().entry(HOST).or_insert(host);
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *req.uri_mut() = path.parse::<Uri>().map_err(|_| bad())?;
    Ok(addr)
}

/// Maps a connection error to what the caller is told, keeping the tunnel's reason.
pub fn classify(e: &hyper::Error) -> ApiError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if let Some(n) = NetError::of(io) {
                return ApiError::from_net(n);
            }
        }
        src = s.source();
    }
    ApiError::BadGateway("the model server closed the connection".into())
}

/// The connection an answer's body drives, and where it goes back to.
struct Held {
    sender: Sender,
    conn: Box<Conn>,
    uses: u32,
    addr: SocketAddr,
    pool: Weak<Inner>,
}

/// A model server's answer body. Polling it drives its connection (see the module doc); once
/// it ended cleanly the connection goes back to the pool, dropped earlier it is closed.
pub struct UpstreamBody {
    body: Incoming,
    /// `None` once the connection closed (its last frames may still be in `body`).
    conn: Option<Held>,
    ended: bool,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("ended", &self.ended)
            .finish()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let me = &mut *self;
        if let Some(h) = me.conn.as_mut() {
            if Pin::new(&mut *h.conn).poll(cx).is_ready() {
                // Closed: whatever it read is in the body's channel; dropping it ends the body.
                me.conn = None;
            }
        }
        let frame = Pin::new(&mut me.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            me.ended = true;
            me.check_in();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl UpstreamBody {
    /// Puts the connection back in the pool (when the answer was read to its end).
    fn check_in(&mut self) {
        let Some(h) = self.conn.take() else {
            return;
        };
        if h.sender.is_closed() {
            return;
        }
        let Some(pool) = h.pool.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut map = lock(&pool.idle);
        let list = map.entry(h.addr).or_default();
        list.retain(|i| now.duration_since(i.since) < IDLE_TIMEOUT);
        if list.len() < MAX_IDLE_PER_SERVER {
            list.push(Idle {
                pooled: Pooled {
                    sender: h.sender,
                    conn: h.conn,
                    uses: h.uses,
                },
                since: now,
            });
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // An answer with nothing left to read (`Content-Length: 0`, or its end seen) keeps its
        // connection even when nobody polled it to the end.
        if self.ended || self.body.is_end_stream() {
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
