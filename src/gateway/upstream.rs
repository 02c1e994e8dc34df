//! Upstream model servers inside the tunnel: a pooled HTTP/1.1 client whose connections are
//! [`TunnelStream`]s, the model → upstream route table, and model discovery.
//!
//! Owns every byte that goes to a model server. It never forwards the client's credentials:
//! requests are built from scratch with only the headers the model needs, plus the upstream's
//! own API key when one is configured.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::error::ApiError;
use super::fair::{FairConfig, FairQueue};
use crate::netstack::{NetError, Netstack, TunnelStream};

/// One model server, as the gateway needs it (built from the config's `[[upstream]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    pub name: String,
    pub addr: SocketAddr,
    /// Path prefix of the OpenAI API on that server, e.g. `/v1`.
    pub base_path: String,
    /// Sent as `Authorization: Bearer` to the model server (never the client's key).
    pub api_key: Option<String>,
    /// Static routes: (public model name, upstream model id). Empty: discover.
    pub models: Vec<(String, String)>,
    /// Most requests in flight to this server (`None`: no limit, no queue).
    pub max_concurrent: Option<u32>,
}

/// A model server and what we know about it.
#[derive(Debug)]
pub struct Upstream {
    pub spec: UpstreamSpec,
    /// Concurrency slots and the round-robin wait queue, when `max_concurrent` is set.
    pub queue: Option<Arc<FairQueue>>,
    discovered: RwLock<Vec<String>>,
    reachable: AtomicBool,
    /// Requests routed here whose response has not ended (the audit record's `Flight`).
    pub(crate) in_flight: AtomicU64,
}

impl Upstream {
    /// An upstream with the default `[gateway]` queue settings.
    pub fn new(spec: UpstreamSpec) -> Arc<Upstream> {
        let d = crate::config::GatewayConfig::default();
        Upstream::with_queue(spec, d.max_queued, d.queue_timeout)
    }

    /// An upstream whose queue (if `max_concurrent` is set) holds at most `max_queued`
    /// waiters for at most `queue_timeout` each.
    pub fn with_queue(
        spec: UpstreamSpec,
        max_queued: usize,
        queue_timeout: Duration,
    ) -> Arc<Upstream> {
        Arc::new(Upstream {
            queue: spec.max_concurrent.map(|n| {
                FairQueue::new(FairConfig {
                    capacity: n as usize,
                    max_queued,
                    timeout: queue_timeout,
                })
            }),
            spec,
            discovered: RwLock::new(Vec::new()),
            reachable: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
        })
    }

    /// Requests routed here whose response has not ended yet.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    pub fn discovered(&self) -> Vec<String> {
        self.discovered
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `http://IP:PORT/v1/<suffix>`.
    pub fn uri(&self, suffix: &str) -> Result<Uri, ApiError> {
        format!(
            "http://{}{}/{}",
            self.spec.addr,
            self.spec.base_path.trim_end_matches('/'),
            suffix
        )
        .parse()
        .map_err(|_| ApiError::BadGateway("invalid upstream URL".into()))
    }
}

/// Routes public model names to upstreams. Static routes win over discovered ones.
pub struct Routes {
    upstreams: Vec<Arc<Upstream>>,
}

impl Routes {
    /// Routes with the default `[gateway]` queue settings.
    pub fn new(specs: Vec<UpstreamSpec>) -> Routes {
        let d = crate::config::GatewayConfig::default();
        Routes::with_queues(specs, d.max_queued, d.queue_timeout)
    }

    /// Routes whose upstream queues use the gateway's queue settings.
    pub fn with_queues(specs: Vec<UpstreamSpec>, max_queued: usize, timeout: Duration) -> Routes {
        Routes {
            upstreams: specs
                .into_iter()
                .map(|s| Upstream::with_queue(s, max_queued, timeout))
                .collect(),
        }
    }

    /// The routes of a reloaded config: an upstream whose spec and queue settings did not
    /// change is carried over (the same `Arc`, so its discovered models, health, in-flight count
    /// and fair-share queue go on); the others start fresh. In-flight requests keep the
    /// `Arc<Upstream>` they were routed to either way (a replaced queue drains on its own).
    pub fn reconfigured(
        &self,
        specs: Vec<UpstreamSpec>,
        max_queued: usize,
        timeout: Duration,
    ) -> Routes {
        Routes {
            upstreams: specs
                .into_iter()
                .map(|spec| {
                    self.upstreams
                        .iter()
                        .find(|u| {
                            u.spec == spec
                                && u.queue.as_ref().is_none_or(|q| {
                                    let c = q.config();
                                    c.max_queued == max_queued && c.timeout == timeout
                                })
                        })
                        .cloned()
                        .unwrap_or_else(|| Upstream::with_queue(spec, max_queued, timeout))
                })
                .collect(),
        }
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// The upstream serving `model` and the model id to send it.
    pub fn route(&self, model: &str) -> Option<(Arc<Upstream>, String)> {
        for u in &self.upstreams {
            if let Some((_, id)) = u.spec.models.iter().find(|(public, _)| public == model) {
                return Some((u.clone(), id.clone()));
            }
        }
        for u in &self.upstreams {
            if u.spec.models.is_empty() && u.discovered().iter().any(|m| m == model) {
                return Some((u.clone(), model.to_string()));
            }
        }
        None
    }

    /// True while some upstream that discovers its models has never answered `GET /models`:
    /// a model missing from the table may then exist, so "not found" would be a lie.
    pub fn incomplete(&self) -> bool {
        self.upstreams
            .iter()
            .any(|u| u.spec.models.is_empty() && u.discovered().is_empty() && !u.reachable())
    }

    /// Every public model name with its upstream's name, sorted.
    pub fn models(&self) -> Vec<(String, String)> {
        let mut out = BTreeMap::new();
        for u in &self.upstreams {
            if u.spec.models.is_empty() {
                for m in u.discovered() {
                    out.entry(m).or_insert_with(|| u.spec.name.clone());
                }
            } else {
                for (public, _) in &u.spec.models {
                    out.insert(public.clone(), u.spec.name.clone());
                }
            }
        }
        out.into_iter().collect()
    }
}

/// hyper connector that dials through the userspace tunnel.
#[derive(Clone)]
pub struct TunnelConnector {
    ns: Netstack,
}

impl tower_service::Service<Uri> for TunnelConnector {
    type Response = TunnelIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<TunnelIo, io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let ns = self.ns.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "upstream must be IP:PORT")
                })?;
            let stream = ns
                .dial_with_receive_buffer(addr, UPSTREAM_RX_BUFFER)
                .await?;
            Ok(TunnelIo(TokioIo::new(stream)))
        })
    }
}

/// A tunnel stream as hyper's client wants it.
pub struct TunnelIo(TokioIo<TunnelStream>);

impl Connection for TunnelIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

pub type UpstreamClient = Client<TunnelConnector, Full<Bytes>>;

/// The smoltcp receive buffer of an upstream connection. Pooled connections live for hours
/// and smoltcp's receive ring never rewinds, so each one ends up resident at its full buffer:
/// with the netstack's 1 MiB that was about 1 MiB per pooled connection, growing by every byte
/// a model sent (the soak's steady 3 KB per request). Model answers are streams of small
/// events and JSON of a few KB, far below what a 64 KiB window carries (64 KiB per round trip:
/// 500 Mbit/s at 1 ms, 17 Mbit/s at 30 ms).
pub const UPSTREAM_RX_BUFFER: usize = 64 << 10;

/// Pooled keep-alive HTTP/1.1 connections to the model servers, through the tunnel.
pub fn client(ns: Netstack) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        // Below vLLM/uvicorn's 5 s keep-alive so we never reuse a connection it is closing.
        .pool_idle_timeout(Duration::from_secs(4))
        .pool_max_idle_per_host(256)
        .build(TunnelConnector { ns })
}

/// Maps a client error to what the caller is told, keeping the tunnel's reason.
pub fn classify(e: &hyper_util::client::legacy::Error) -> ApiError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            if let Some(n) = NetError::of(io) {
                return ApiError::from_net(n);
            }
        }
        src = s.source();
    }
    if e.is_connect() {
        ApiError::BadGateway("cannot connect to the model server".into())
    } else {
        ApiError::BadGateway("the model server closed the connection".into())
    }
}

/// Sends `req` and waits for the response head, bounded by `timeout`.
pub async fn send(
    client: &UpstreamClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Response<Incoming>, ApiError> {
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err(ApiError::GatewayTimeout),
        Ok(Err(e)) => Err(classify(&e)),
        Ok(Ok(r)) => Ok(r),
    }
}

/// Refreshes the model lists of upstreams without static routes, forever: quickly until the
/// first answer, then every `every`.
pub async fn discover_loop(
    routes: Arc<Routes>,
    client: UpstreamClient,
    every: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let never = Arc::new(tokio::sync::Notify::new());
    discover_live(move || routes.clone(), client, every, never, stop).await
}

/// [`discover_loop`] over whatever routes `current` returns at the start of each round (they
/// change on a config reload); `changed` starts a round at once.
pub async fn discover_live(
    current: impl Fn() -> Arc<Routes>,
    client: UpstreamClient,
    every: Duration,
    changed: Arc<tokio::sync::Notify>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let routes = current();
        let mut all_known = true;
        for u in routes.upstreams() {
            let ok = refresh(u, &client).await;
            u.reachable.store(ok, Ordering::Relaxed);
            if !ok && u.spec.models.is_empty() {
                all_known = false;
            }
        }
        let wait = if all_known {
            every
        } else {
            Duration::from_secs(2)
        };
        drop(routes);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = changed.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

async fn refresh(u: &Upstream, client: &UpstreamClient) -> bool {
    let Ok(uri) = u.uri("models") else {
        return false;
    };
    let mut req = Request::get(uri);
    if let Some(k) = &u.spec.api_key {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let Ok(req) = req.body(Full::new(Bytes::new())) else {
        return false;
    };
    let resp = match send(client, req, Duration::from_secs(10)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(upstream = %u.spec.name, error = ?e, "model discovery failed");
            return false;
        }
    };
    if !resp.status().is_success() {
        tracing::warn!(upstream = %u.spec.name, status = %resp.status(), "GET /models failed");
        return false;
    }
    // A model list is small; cap it anyway.
    let body = match http_body_util::Limited::new(resp.into_body(), 4 << 20)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return false,
    };
    #[derive(serde::Deserialize)]
    struct List {
        data: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        id: String,
    }
    match serde_json::from_slice::<List>(&body) {
        Ok(list) => {
            if u.spec.models.is_empty() {
                let ids: Vec<String> = list.data.into_iter().map(|i| i.id).collect();
                let mut cur = u.discovered.write().unwrap_or_else(|p| p.into_inner());
                if *cur != ids {
                    tracing::info!(upstream = %u.spec.name, models = ?ids, "models discovered");
                    *cur = ids;
                }
            }
            true
        }
        Err(e) => {
            tracing::warn!(upstream = %u.spec.name, error = %e, "GET /models returned an unexpected body");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, port: u16, models: &[&str]) -> UpstreamSpec {
        UpstreamSpec {
            name: name.into(),
            addr: SocketAddr::from(([10, 20, 0, 5], port)),
            base_path: "/v1".into(),
            api_key: None,
            models: models
                .iter()
                .map(|m| (m.to_string(), m.to_string()))
                .collect(),
            max_concurrent: None,
        }
    }

    /// A reload keeps the `Arc` (and with it discovery state and in-flight count) of an
    /// unchanged upstream, starts a changed one fresh, and drops a removed one from the table
    /// while requests that hold it keep it.
    #[test]
    fn reconfigured_routes_carry_unchanged_upstreams_over() {
        let old = Routes::new(vec![spec("a", 8000, &[]), spec("b", 8001, &["m"])]);
        let a = old.upstreams()[0].clone();
        *a.discovered.write().unwrap() = vec!["disc".into()];
        a.reachable.store(true, Ordering::Relaxed);
        let held_b = old.route("m").unwrap().0;

        let q = (1024, Duration::from_secs(30));
        let new = old.reconfigured(
            vec![spec("a", 8000, &[]), spec("c", 8002, &["m2"])],
            q.0,
            q.1,
        );
        assert!(
            Arc::ptr_eq(&new.upstreams()[0], &a),
            "unchanged upstream carried over"
        );
        assert_eq!(new.route("disc").unwrap().0.spec.name, "a");
        assert!(
            new.route("m").is_none(),
            "removed upstream no longer routed"
        );
        assert_eq!(new.route("m2").unwrap().1, "m2");
        assert_eq!(
            held_b.spec.name, "b",
            "a request in flight keeps its upstream"
        );

        let changed = new.reconfigured(
            vec![spec("a", 9000, &[]), spec("c", 8002, &["m2"])],
            q.0,
            q.1,
        );
        assert!(
            !Arc::ptr_eq(&changed.upstreams()[0], &a),
            "changed upstream starts fresh"
        );
        assert!(changed.upstreams()[0].discovered().is_empty());
        assert!(Arc::ptr_eq(&changed.upstreams()[1], &new.upstreams()[1]));
    }
}
