//! One client connection, from its permit to its close: the TLS handshake (bounded), HTTP
//! served by hyper (HTTP/1.1 or HTTP/2), the limits of `conns` (no request for
//! `header_read_timeout`, closed to make room when the gateway is full), `idle` (no byte for
//! `idle_timeout`), and a lingering close.
//!
//! The lingering close: when the gateway ends a connection while the client may still be
//! sending (a 431 for a huge head, a 413 whose body is still coming, a timeout), closing the
//! socket at once makes the kernel answer the unread bytes with a TCP reset, and the reset can
//! destroy our last answer before the client read it. So the connection is shut down for
//! writing (TLS close_notify, then FIN) and what still arrives is read and thrown away for at
//! most [`LINGER_TIME`] / [`LINGER_BYTES`] before the socket closes. A client that closed first
//! costs nothing (its EOF ends the linger at once).
//!
//! Must never: keep a connection past its limits, or hold the connection's permit after it
//! ended (everything here runs in the connection's own task).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::{Request, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};

use super::conns::{Conns, RequestGuard};
use super::error::ApiError;
use super::idle;
use super::inbound::{self, BodyLimits};

/// Longest lingering close.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// Most bytes read and thrown away while lingering.
pub const LINGER_BYTES: usize = 1 << 20;

/// The request's place on its connection, in the request's extensions: the handler marks it
/// busy once the body is read (see `conns`).
#[derive(Clone)]
pub struct Phase(Arc<RequestGuard>);

impl Phase {
    pub fn busy(&self) {
        self.0.busy()
    }
}

/// The limits one connection is served with (the snapshot current when it was accepted).
pub struct Limits {
    pub tls_handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub header_read_timeout: Duration,
    /// `max_header_bytes`: an HTTP/2 request head over it is answered 431 here (see
    /// [`H2_HEADER_LIST_FACTOR`]); hyper answers HTTP/1.1 heads over it itself.
    pub max_header_bytes: usize,
    /// For draining the body of a request answered 431.
    pub body: BodyLimits,
}

/// The HTTP/2 header list size the gateway advertises and h2 decodes, as a multiple of
/// `max_header_bytes`. A head a little over the limit is then decoded and answered with an
/// OpenAI-shaped 431 on its stream; at the limit itself h2 would end the whole connection
/// (GOAWAY) when the head spans CONTINUATION frames, and curl reports "Connection died"
/// instead of a status.
pub const H2_HEADER_LIST_FACTOR: usize = 2;

/// The size of a request head as HTTP/2 counts it (RFC 9113 §6.5.2, RFC 7541 §4.1: name and
/// value bytes plus 32 per field, pseudo-header fields included).
fn header_list_size<B>(req: &Request<B>) -> usize {
    let fields: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum();
    let pseudo = req.method().as_str().len()
        + req.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len())
        + req.uri().scheme_str().map_or(0, str::len)
        + 4 * 40;
    fields + pseudo
}

/// What every connection of a gateway is served with.
#[derive(Clone)]
pub struct Server {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub builder: Arc<auto::Builder<TokioExecutor>>,
    pub conns: Arc<Conns>,
}

/// Serves one accepted connection to its end (see the module header).
pub async fn serve(
    server: Server,
    tcp: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    watcher: Watcher,
    stop: watch::Receiver<bool>,
) {
    let Server {
        acceptor,
        builder,
        conns,
    } = server;
    let registered = conns.open();
    let conn = registered.conn.clone();
    // The large phases (the handshake's state, hyper's connection, the linger with its read
    // buffer) are boxed, each allocated only while it lasts: inline, they made this future
    // 13,600 bytes for the connection's whole life; boxed it is 3,744 (release build,
    // 2026-12-04), and the soak's RSS is 2.9 MiB lower at 200 connections.
    let handshake = Box::pin(acceptor.accept(tcp));
    let tls = tokio::select! {
        r = tokio::time::timeout(limits.tls_handshake_timeout, handshake) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
        _ = conn.closed_for_room() => {
            tracing::debug!(%peer, "closed during its TLS handshake to make room");
            return;
        }
        // After a stop a handshake gets FIRST_REQUEST_GRACE at most (the drain waits for it).
        () = stopped_then(stop.clone(), FIRST_REQUEST_GRACE) => {
            tracing::debug!(%peer, "TLS handshake unfinished at the stop");
            return;
        }
    };
    // An ACME TLS-ALPN-01 validation (RFC 8737 §3): done once the handshake is; never HTTP.
    if crate::tls::acme::is_acme_alpn(tls.get_ref().1.alpn_protocol()) {
        tracing::info!(%peer, "ACME tls-alpn-01 validation handshake served");
        return;
    }
    let activity = Arc::new(idle::Activity::new());
    let (give_back, given_back) = oneshot::channel();
    let io = Lingering {
        io: Some(idle::IdleIo::new(tls, activity.clone())),
        give_back: Some(give_back),
    };
    let svc = hyper::service::service_fn({
        let conn = conn.clone();
        let (max_header_bytes, body_limits) = (limits.max_header_bytes, limits.body);
        move |mut req: Request<Incoming>| {
            let guard = Arc::new(conn.request());
            req.extensions_mut().insert(Phase(guard.clone()));
            let mut app = app.clone();
            async move {
                let resp = if req.version() == Version::HTTP_2
                    && header_list_size(&req) > max_header_bytes
                {
                    let (parts, body) = req.into_parts();
                    inbound::drain_in_background(&parts.headers, Body::new(body), body_limits);
                    ApiError::HeadersTooLarge(max_header_bytes).into_response()
                } else {
                    tower_service::Service::call(&mut app, req).await?
                };
                Ok::<_, Infallible>(resp.map(|body| Tracked {
                    body,
                    _guard: guard,
                }))
            }
        }
    });
    let http = Box::pin(builder.serve_connection(TokioIo::new(io), svc).into_owned());
    tokio::select! {
        r = graceful_after_first_request(http, &activity, stop, watcher) => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with error");
            }
        }
        _ = activity.idle_for(limits.idle_timeout) => {
            tracing::debug!(%peer, "closing a connection idle for {:?}", limits.idle_timeout);
        }
        _ = conn.without_request_for(limits.header_read_timeout) => {
            tracing::debug!(%peer, "closing a connection without a request for {:?}", limits.header_read_timeout);
        }
        _ = conn.closed_for_room() => {
            tracing::debug!(%peer, "closing a quiet connection to make room (the gateway is full)");
        }
    }
    if let Ok(io) = given_back.await {
        Box::pin(linger(io)).await;
    }
    drop(registered);
}

/// How long a connection accepted just before a stop gets to send its first request.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Serves `conn` to its end; once the gateway stops, asks it to finish gracefully (the request
/// in flight is answered, then it closes). A connection accepted before the stop that has not
/// sent its first request yet (still in the TLS handshake, or its request in flight) first gets
/// [`FIRST_REQUEST_GRACE`] to send it: asked at once, hyper would close it unanswered, which
/// a client sees as a reset (seen in the boot test's restart under load). `_watcher` keeps the
/// drain waiting for this connection.
async fn graceful_after_first_request<C>(
    mut conn: Pin<Box<C>>,
    activity: &idle::Activity,
    stop: watch::Receiver<bool>,
    _watcher: hyper_util::server::graceful::Watcher,
) -> Result<(), C::Error>
where
    C: hyper_util::server::graceful::GracefulConnection,
{
    tokio::select! {
        r = conn.as_mut() => return r,
        () = stopped_then(stop, Duration::ZERO) => {}
    }
    let first_request = async {
        let deadline = tokio::time::Instant::now() + FIRST_REQUEST_GRACE;
        while !activity.has_read() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        r = conn.as_mut() => return r,
        () = first_request => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// Resolves `grace` after `stop` turned true (or its sender went away).
async fn stopped_then(mut stop: watch::Receiver<bool>, grace: Duration) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            break;
        }
    }
    tokio::time::sleep(grace).await;
}

/// Shuts `io` down for writing, then reads and discards until EOF, [`LINGER_BYTES`] or
/// [`LINGER_TIME`].
async fn linger<T: AsyncRead + AsyncWrite + Unpin>(mut io: T) {
    let _ = tokio::time::timeout(LINGER_TIME, async {
        if io.shutdown().await.is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while let Ok(n @ 1..) = io.read(&mut buf).await {
            match left.checked_sub(n) {
                Some(l) => left = l,
                None => return,
            }
        }
    })
    .await;
}

/// A response body that keeps its request counted on the connection until it ends or is
/// dropped.
struct Tracked {
    body: Body,
    _guard: Arc<RequestGuard>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's IO, handed back to the connection's task when hyper drops it, so the task
/// can linger on it.
struct Lingering<T> {
    io: Option<T>,
    give_back: Option<oneshot::Sender<T>>,
}

impl<T> Drop for Lingering<T> {
    fn drop(&mut self) {
        if let (Some(io), Some(tx)) = (self.io.take(), self.give_back.take()) {
            let _ = tx.send(io);
        }
    }
}

impl<T> Lingering<T> {
    fn inner(&mut self) -> Pin<&mut T>
    where
        T: Unpin,
    {
        Pin::new(self.io.as_mut().expect("the IO is taken only on drop"))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Lingering<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner().poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Lingering<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner().poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner().poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner().poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.inner().poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// The peer still sends after we are done: lingering reads it away (so the kernel sends no
    /// reset over our last bytes) and ends at the peer's EOF, or at the limit.
    #[tokio::test(start_paused = true)]
    async fn linger_drains_until_eof_or_the_limit() {
        let (mut client, server) = tokio::io::duplex(1024);
        let t = Instant::now();
        let lingering = tokio::spawn(linger(server));
        client.write_all(&[b'x'; 3000]).await.unwrap();
        // Our side was shut down for writing: the client reads EOF.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        drop(client);
        lingering.await.unwrap();
        assert!(t.elapsed() < LINGER_TIME, "{:?}", t.elapsed());

        // A client that never stops: bounded by the time.
        let (client, server) = tokio::io::duplex(1024);
        let t = Instant::now();
        linger(server).await;
        assert!(t.elapsed() >= LINGER_TIME);
        drop(client);
    }
}
