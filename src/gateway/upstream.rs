//! Upstream model servers inside the tunnel: pooled HTTP/1.1 connections over tunnel streams,
//! driven by the requests that use them (`pool`, `h1`), the model → replicas route table, model
//! discovery and the health probe.
//!
//! Owns every byte that goes to a model server. It never forwards the client's credentials:
//! requests are built from scratch with only the headers the model needs, plus the upstream's
//! own API key when one is configured.
//!
//! A public model name may be served by several upstreams, its **replicas**: every upstream
//! with a static route for it, then every upstream that discovers its models and listed it.
//! Each upstream keeps its own passive health ([`Health`]), in-flight count and slots; which
//! replica a request takes is decided per request (`forward`, `fair`, `balance`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Request, Response, Uri};

use super::balance::name_hash;
use super::error::ApiError;
use super::health::Health;
use crate::config::{Balance, ModelConfig};
use crate::netstack::Netstack;

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
    discovered: RwLock<Vec<String>>,
    reachable: AtomicBool,
    /// Requests holding one of its slots (`fair::Slot`): routed here, response not ended.
    pub(crate) in_flight: AtomicU64,
    /// When it was last picked (`fair`'s counter), for ties in turn.
    pub(crate) last_pick: AtomicU64,
    /// Passive health: ejected after failures, re-admitted by the probe or a success.
    pub health: Health,
    /// Requests that failed here before their answer began and were retried elsewhere.
    retries: AtomicU64,
    /// [`name_hash`] of its name: its identity for affinity (rendezvous hashing).
    pub(crate) name_hash: u64,
}

impl Upstream {
    pub fn new(spec: UpstreamSpec) -> Arc<Upstream> {
        Arc::new(Upstream {
            name_hash: name_hash(&spec.name),
            spec,
            discovered: RwLock::new(Vec::new()),
            reachable: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            last_pick: AtomicU64::new(0),
            health: Health::default(),
            retries: AtomicU64::new(0),
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

    /// Public model names it serves now: its static routes, or what it discovered.
    pub fn serves(&self) -> Vec<String> {
        if self.spec.models.is_empty() {
            self.discovered()
        } else {
            self.spec.models.iter().map(|(p, _)| p.clone()).collect()
        }
    }

    /// The id this server knows the public model `public` by, if it serves it.
    fn model_id(&self, public: &str) -> Option<String> {
        if self.spec.models.is_empty() {
            self.discovered
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|m| m == public)
                .then(|| public.to_string())
        } else {
            self.spec
                .models
                .iter()
                .find(|(p, _)| p == public)
                .map(|(_, id)| id.clone())
        }
    }

    /// A request failed here and was retried on another replica.
    pub(crate) fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests that failed here before their answer began and were retried elsewhere.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
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

/// One server of a model, and the model's id there.
#[derive(Debug, Clone)]
pub struct Replica {
    pub upstream: Arc<Upstream>,
    pub model_id: String,
}

/// Routes public model names to their replicas. Static routes come first (file order), then
/// discovering upstreams that listed the model.
pub struct Routes {
    upstreams: Vec<Arc<Upstream>>,
    models: Vec<ModelConfig>,
}

impl Routes {
    /// Routes over `specs` with every model balanced least-loaded.
    pub fn new(specs: Vec<UpstreamSpec>) -> Routes {
        Routes::with_models(specs, Vec::new())
    }

    /// Routes over `specs` with the per-model settings `models` (`[[model]]`).
    pub fn with_models(specs: Vec<UpstreamSpec>, models: Vec<ModelConfig>) -> Routes {
        Routes {
            upstreams: specs.into_iter().map(Upstream::new).collect(),
            models,
        }
    }

    /// The routes of a reloaded config: an upstream whose spec did not change is carried over
    /// (the same `Arc`, so its discovered models, health, in-flight count, slots and place in
    /// the waiters' lists go on); the others start fresh. In-flight requests keep the
    /// `Arc<Upstream>` they were routed to either way.
    pub fn reconfigured(&self, specs: Vec<UpstreamSpec>, models: Vec<ModelConfig>) -> Routes {
        Routes {
            upstreams: specs
                .into_iter()
                .map(|spec| {
                    self.upstreams
                        .iter()
                        .find(|u| u.spec == spec)
                        .cloned()
                        .unwrap_or_else(|| Upstream::new(spec))
                })
                .collect(),
            models,
        }
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// How `model`'s replicas are balanced.
    pub fn balance(&self, model: &str) -> Balance {
        self.models
            .iter()
            .find(|m| m.name == model)
            .map_or(Balance::default(), |m| m.balance)
    }

    /// The `[[model]]` settings these routes run with.
    pub fn model_settings(&self) -> &[ModelConfig] {
        &self.models
    }

    /// Every server of `model` with the model's id there; empty when none serves it.
    pub fn replicas(&self, model: &str) -> Vec<Replica> {
        let fixed = self.upstreams.iter().filter(|u| !u.spec.models.is_empty());
        let found = self.upstreams.iter().filter(|u| u.spec.models.is_empty());
        fixed
            .chain(found)
            .filter_map(|u| {
                u.model_id(model).map(|model_id| Replica {
                    upstream: u.clone(),
                    model_id,
                })
            })
            .collect()
    }

    /// True when some upstream serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.upstreams.iter().any(|u| u.model_id(model).is_some())
    }

    /// True while some upstream that discovers its models has never answered `GET /models`:
    /// a model missing from the table may then exist, so "not found" would be a lie.
    pub fn incomplete(&self) -> bool {
        self.upstreams
            .iter()
            .any(|u| u.spec.models.is_empty() && u.discovered().is_empty() && !u.reachable())
    }

    /// Every public model name with the names of its replicas, sorted.
    pub fn models(&self) -> Vec<(String, Vec<String>)> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for u in self
            .upstreams
            .iter()
            .filter(|u| !u.spec.models.is_empty())
            .chain(self.upstreams.iter().filter(|u| u.spec.models.is_empty()))
        {
            for m in u.serves() {
                let names = out.entry(m).or_default();
                if !names.contains(&u.spec.name) {
                    names.push(u.spec.name.clone());
                }
            }
        }
        out.into_iter().collect()
    }
}

/// The smoltcp receive buffer of an upstream connection. Pooled connections live for hours;
/// with smoltcp's receive ring as published (it never rewound) each one ended up resident at its
/// full buffer: with the netstack's 1 MiB that was about 1 MiB per pooled connection, growing
/// by every byte a model sent (the soak's steady 3 KB per request). The vendored smoltcp
/// rewinds an emptied ring (vendor/README.md), so a connection now touches only as much of its
/// buffer as it holds at once; 16 KiB bounds even that: model answers are streams of small
/// events and JSON of a few KB, within one 16 KiB window (16 KiB per round trip: 130 Mbit/s at
/// 1 ms, 4.4 Mbit/s = 550 KB/s at 30 ms, far above a model's token rate; a non-streamed answer
/// of 100 KB over a 30 ms tunnel takes ~7 round trips instead of ~2).
/// Measured, 5-minute soaks (README): 64 KiB → RSS 47.4 → 52.2 MiB; 16 KiB → 39.1 → 42.3 MiB;
/// 16 KiB with the rewinding ring → 36.0 → 39.4 MiB (6 minutes: 39.6).
/// Retiring a pooled connection once its 64 KiB ring had gone round was tried and was worse
/// (47.3 → 60.0 MiB: every replacement connection's buffers came back resident).
pub const UPSTREAM_RX_BUFFER: usize = 16 << 10;

/// Pooled keep-alive HTTP/1.1 connections to the model servers, through the tunnel.
pub fn client(ns: Netstack) -> UpstreamClient {
    UpstreamClient::new(ns)
}

/// Sends `req` and waits for the response head, bounded by `timeout`.
pub async fn send(
    client: &UpstreamClient,
    req: Request<Bytes>,
    timeout: Duration,
) -> Result<Response<UpstreamBody>, ApiError> {
    client.send(req, timeout).await.map_err(|f| f.error)
}

/// [`send`], telling whether a failed request went over a reused connection.
pub async fn send_counted(
    client: &UpstreamClient,
    req: Request<Bytes>,
    timeout: Duration,
) -> Result<Response<UpstreamBody>, SendFailure> {
    client.send(req, timeout).await
}

/// How often an ejected upstream is probed, so a server that is back is re-admitted within
/// about this long (and not only when its backoff ends).
pub const EJECTED_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Refreshes the model lists of upstreams without static routes and probes every upstream's
/// health, forever: quickly until the first answer, then every `every`.
pub async fn discover_loop(
    routes: Arc<Routes>,
    client: UpstreamClient,
    every: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let never = Arc::new(tokio::sync::Notify::new());
    discover_live(move || routes.clone(), client, every, never, |_| {}, stop).await
}

/// [`discover_loop`] over whatever routes `current` returns at the start of each round (they
/// change on a config reload); `changed` starts a full round at once. Every upstream is
/// probed each `every` (each 2 s while a discovering one has not answered yet); an ejected
/// one each [`EJECTED_PROBE_INTERVAL`] in between, and `readmitted` is called for each that
/// answered while ejected. The probes of one round run concurrently.
pub async fn discover_live(
    current: impl Fn() -> Arc<Routes>,
    client: UpstreamClient,
    every: Duration,
    changed: Arc<tokio::sync::Notify>,
    readmitted: impl Fn(&Arc<Upstream>),
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut full_due = Instant::now();
    loop {
        let routes = current();
        let now = Instant::now();
        let full = full_due <= now;
        let mut probes = tokio::task::JoinSet::new();
        for u in routes.upstreams() {
            if full || u.health.ejected_until(now).is_some() {
                let (u, client) = (u.clone(), client.clone());
                probes.spawn(async move {
                    let back = probe(&u, &client).await;
                    (u, back)
                });
            }
        }
        while let Some(done) = probes.join_next().await {
            if let Ok((u, true)) = done {
                readmitted(&u);
            }
        }
        let all_known = routes
            .upstreams()
            .iter()
            .all(|u| !u.spec.models.is_empty() || u.reachable());
        let now = Instant::now();
        if full {
            full_due = now
                + if all_known {
                    every
                } else {
                    Duration::from_secs(2)
                };
        }
        let ejected = routes
            .upstreams()
            .iter()
            .any(|u| u.health.ejected_until(now).is_some());
        let wait = if ejected {
            EJECTED_PROBE_INTERVAL.min(full_due.saturating_duration_since(now))
        } else {
            full_due.saturating_duration_since(now)
        };
        drop(routes);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = changed.notified() => full_due = Instant::now(),
            _ = stop.changed() => return,
        }
    }
}

/// One probe of `u` (`GET /models`): sets `reachable` and the discovered models; an answer
/// re-admits an ejected server. Health is passive: a failed probe ejects nothing (requests
/// do). True when it was ejected and is re-admitted now.
async fn probe(u: &Upstream, client: &UpstreamClient) -> bool {
    let answered = refresh(u, client).await;
    u.reachable.store(answered, Ordering::Relaxed);
    let back = answered && u.health.probe_answered(Instant::now());
    if back {
        tracing::info!(upstream = %u.spec.name, "upstream answered its probe: re-admitted");
    }
    back
}

/// A failure as `status` shows it (`last_error`): what went wrong, without the error's type.
pub fn failure_reason(e: &ApiError) -> String {
    match e {
        ApiError::BadGateway(m) => m.clone(),
        ApiError::TunnelDown => "the tunnel to its peer is down (no fresh handshake)".into(),
        ApiError::GatewayTimeout => "no answer in time".into(),
        other => format!("{other:?}"),
    }
}

/// `GET /models` of `u`: true when it answered with a model list (kept when it discovers).
async fn refresh(u: &Upstream, client: &UpstreamClient) -> bool {
    let Ok(uri) = u.uri("models") else {
        return false;
    };
    let mut req = Request::get(uri);
    if let Some(k) = &u.spec.api_key {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let Ok(req) = req.body(Bytes::new()) else {
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

mod h1;
mod pool;
pub use pool::{classify, SendFailure, UpstreamBody, UpstreamClient, IDLE_TIMEOUT};

#[cfg(test)]
mod tests;
