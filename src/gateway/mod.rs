//! The public HTTPS gateway: one port, TLS (rustls), HTTP/1.1 and HTTP/2, OpenAI's API.
//!
//! Owns building a gateway ([`Gateway`], the one way the daemon, the demo and the tests do it),
//! its live snapshot ([`GatewayHandle`], swapped by a reload), serving connections, the
//! per-request path (auth → policy → route → stream) and the OpenAI-shaped errors. Every
//! capacity and timeout is a setting. Connections come through the bounded loop of
//! [`crate::accept`]; the TLS handshake runs in the connection's own task, never in the
//! accept loop. It never binds its own listener: it is handed one, already bound.

mod admission;
mod affinity;
mod audit;
mod auth;
pub mod balance;
mod body;
pub mod compat;
mod conn;
mod conns;
mod drain;
pub mod error;
pub mod fair;
mod forward;
pub mod health;
mod idle;
mod inbound;
pub mod meter;
pub mod proxy;
mod request;
pub mod upstream;
mod usage;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::FromRef;
use axum::routing::{get, post};
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{GatewayConfig, ModelConfig};
use crate::keys::ledger::LedgerWriter;
use crate::keys::Keys;
use crate::netstack::Netstack;
use crate::policy::limits::{Limiter, LimiterConfig};
use crate::policy::Endpoint;
use crate::telemetry::Metrics;
use fair::Scheduler;
use upstream::{Routes, UpstreamClient, UpstreamSpec};

/// How often upstreams without static routes are asked for their models.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(30);

/// Most concurrent streams a client may open on one HTTP/2 connection.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 200;
/// Most streams an HTTP/2 client may reset before the gateway accepted them (beyond: GOAWAY).
pub const H2_MAX_PENDING_RESETS: usize = 20;

/// The client's TCP address (never a forwarded header), set per connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Everything a gateway is built from; [`Gateway::start`] serves it. The daemon, the demo and
/// the in-process tests all build their gateway here, so they run the same code.
pub struct Gateway {
    keys: Arc<Keys>,
    netstack: Netstack,
    upstreams: Vec<UpstreamSpec>,
    config: GatewayConfig,
    limiter: Limiter,
    ledger: Option<LedgerWriter>,
    /// `[[model]]` settings (balancing of each model's replicas).
    models: Vec<ModelConfig>,
}

/// A started gateway.
pub struct RunningGateway {
    /// The snapshot every new request gets; a config reload swaps it.
    pub handle: GatewayHandle,
    /// Accepts and serves until stop, then drains (bounded by `drain_timeout`) and ends.
    pub serve: JoinHandle<()>,
    /// Model discovery for upstreams without static routes; ends on stop.
    pub discovery: JoinHandle<()>,
}

impl Gateway {
    /// A gateway with a fresh limiter and no usage ledger, until [`Gateway::limiter`] and
    /// [`Gateway::ledger`] say otherwise.
    pub fn new(
        keys: Arc<Keys>,
        netstack: Netstack,
        upstreams: Vec<UpstreamSpec>,
        config: GatewayConfig,
    ) -> Gateway {
        Gateway {
            keys,
            netstack,
            upstreams,
            config,
            limiter: Limiter::new(),
            ledger: None,
            models: Vec::new(),
        }
    }

    /// Balances each model's replicas as `models` (`[[model]]`) says; others least-loaded.
    pub fn models(mut self, models: Vec<ModelConfig>) -> Gateway {
        self.models = models;
        self
    }

    /// Starts from `limiter` (e.g. seeded with the ledger's usage, so budgets survive restarts).
    pub fn limiter(mut self, limiter: Limiter) -> Gateway {
        self.limiter = limiter;
        self
    }

    /// Records settled usage with `ledger`.
    pub fn ledger(mut self, ledger: LedgerWriter) -> Gateway {
        self.ledger = Some(ledger);
        self
    }

    /// Serves HTTPS with `tls` on `listener` (already bound: by the caller, or handed over by
    /// the service manager) and starts model discovery, both until `stop` changes.
    pub fn start(
        self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        stop: watch::Receiver<bool>,
    ) -> RunningGateway {
        let peer_events = self.netstack.peer_events();
        let handle = GatewayHandle::new(Arc::new(GatewayState::first(self)));
        RunningGateway {
            discovery: handle.spawn_discovery(peer_events, stop.clone()),
            serve: tokio::spawn(serve(handle.clone(), listener, tls, stop)),
            handle,
        }
    }
}

/// One snapshot of the gateway, shared by every request that started under it. A config reload
/// builds a new snapshot ([`GatewayState::reconfigured`]) and swaps it into the
/// [`GatewayHandle`]; a request keeps the snapshot it started with to its end, so in-flight
/// streams keep their upstream and settings. Keys, the upstream client, limiter, ledger and
/// metrics are shared by all snapshots; routes and settings (config-derived) are per snapshot.
pub struct GatewayState {
    pub keys: Arc<Keys>,
    pub routes: Arc<Routes>,
    pub client: UpstreamClient,
    /// The config's `[gateway]` table.
    pub settings: GatewayConfig,
    /// Per-key RPM/TPM/concurrency/budget state. A std `Mutex`: it is held only for one O(1)
    /// `admit` or `settle` call, never across an `.await`.
    pub limiter: Arc<Mutex<Limiter>>,
    /// Where settled usage goes; `None` runs without a ledger (tests, demo).
    pub ledger: Option<LedgerWriter>,
    /// Request counters and histograms (`telemetry`), shared across reloads.
    pub metrics: Arc<Metrics>,
    /// The end of a shutdown's drain period: open bodies are cut (shared across reloads).
    pub drain: drain::DrainCut,
    /// Every replica's slots and every model's fair-share queue, shared across reloads.
    pub scheduler: Arc<Scheduler>,
}

impl GatewayState {
    /// The first snapshot of a gateway.
    fn first(g: Gateway) -> GatewayState {
        let Gateway {
            keys,
            netstack,
            upstreams,
            config,
            mut limiter,
            ledger,
            models,
        } = g;
        limiter.configure(LimiterConfig {
            default_max_tokens: config.default_max_tokens,
        });
        GatewayState {
            keys,
            routes: Arc::new(Routes::with_models(upstreams, models)),
            client: upstream::client(netstack),
            settings: config,
            limiter: Arc::new(Mutex::new(limiter)),
            ledger,
            metrics: Arc::new(Metrics::new()),
            drain: drain::DrainCut::default(),
            scheduler: Scheduler::new(),
        }
    }

    /// The snapshot for a reloaded `config`: the same keys, client, limiter, ledger and
    /// metrics; new routes (unchanged upstreams carried over, see [`Routes::reconfigured`]) and
    /// the new `[gateway]` settings. Everything config-derived is rebuilt here, so whatever
    /// the config gains rides along with a reload.
    pub fn reconfigured(
        &self,
        config: &crate::config::Config,
        upstreams: Vec<UpstreamSpec>,
    ) -> GatewayState {
        self.limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .configure(LimiterConfig {
                default_max_tokens: config.gateway.default_max_tokens,
            });
        GatewayState {
            keys: self.keys.clone(),
            routes: Arc::new(self.routes.reconfigured(upstreams, config.models.clone())),
            client: self.client.clone(),
            settings: config.gateway.clone(),
            limiter: self.limiter.clone(),
            ledger: self.ledger.clone(),
            metrics: self.metrics.clone(),
            drain: self.drain.clone(),
            scheduler: self.scheduler.clone(),
        }
    }
}

/// The current [`GatewayState`] snapshot, swapped by a config reload; made by
/// [`Gateway::start`]. Cheap to clone. It is the router's state: handlers extract `State<Arc<GatewayState>>` and get the snapshot that
/// is current when the request arrives.
#[derive(Clone)]
pub struct GatewayHandle {
    current: Arc<RwLock<Arc<GatewayState>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl GatewayHandle {
    fn new(state: Arc<GatewayState>) -> GatewayHandle {
        GatewayHandle {
            current: Arc::new(RwLock::new(state)),
            changed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// The snapshot new requests get.
    pub fn load(&self) -> Arc<GatewayState> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes `state` the snapshot of every request from now on (requests already running keep
    /// theirs) and starts a model discovery round for the new routes.
    pub fn swap(&self, state: Arc<GatewayState>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = state;
        self.changed.notify_one();
    }

    /// Model discovery and health probes over the current routes, a round at once after every
    /// swap and every time a tunnel peer comes up (`peer_events`), so no probe result from
    /// before the tunnel was up outlives its first handshake (a restart, a corp peer back from
    /// silence); a replica that answers while ejected gets its waiters at once.
    fn spawn_discovery(
        &self,
        peer_events: watch::Receiver<u64>,
        stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let me = self.clone();
        let state = self.load();
        let scheduler = state.scheduler.clone();
        let discover = upstream::discover_live(
            move || me.load().routes.clone(),
            state.client.clone(),
            DISCOVERY_INTERVAL,
            self.changed.clone(),
            move |u| scheduler.readmitted(u),
            stop.clone(),
        );
        let reprobe = probe_when_peers_come_up(peer_events, self.changed.clone(), stop);
        tokio::spawn(async move {
            tokio::join!(discover, reprobe);
        })
    }
}

/// Starts a discovery round (`changed`) whenever a tunnel peer comes up, until `stop`.
async fn probe_when_peers_come_up(
    mut peer_events: watch::Receiver<u64>,
    changed: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = peer_events.changed() => match r {
                Ok(()) => changed.notify_one(),
                Err(_) => return,
            },
            _ = stop.changed() => return,
        }
    }
}

impl FromRef<GatewayHandle> for Arc<GatewayState> {
    fn from_ref(h: &GatewayHandle) -> Arc<GatewayState> {
        h.load()
    }
}

/// The HTTP routes over `state`, whose snapshot a reload may swap. Cursor appends
/// `/chat/completions` to whatever base URL the user typed, so the paths are served with and
/// without the `/v1` prefix.
fn router(state: GatewayHandle) -> Router {
    // CORS preflight (OPTIONS) is answered on every path without auth; another method on a
    // known path is 405, any method but OPTIONS on an unknown path 404 (`proxy::fallback`),
    // both OpenAI-shaped.
    let post_ep = |ep: Endpoint| {
        post(proxy::forward)
            .layer(Extension(ep))
            .options(proxy::preflight)
            .fallback(proxy::method_not_allowed)
    };
    let models = || {
        get(proxy::list_models)
            .options(proxy::preflight)
            .fallback(proxy::method_not_allowed)
    };
    let mut r = Router::new()
        .route("/healthz", get(proxy::healthz))
        .route("/v1/models", models())
        .route("/models", models());
    for (path, ep) in [
        ("chat/completions", Endpoint::ChatCompletions),
        ("completions", Endpoint::Completions),
        ("embeddings", Endpoint::Embeddings),
        ("responses", Endpoint::Responses),
    ] {
        r = r
            .route(&format!("/v1/{path}"), post_ep(ep))
            .route(&format!("/{path}"), post_ep(ep));
    }
    r.fallback(proxy::fallback).with_state(state)
}

/// Serves HTTPS on `listener` until `stop` changes, then closes it at once and drains for
/// `drain_timeout`. The connection limit and the HTTP parser limits are the settings of the
/// snapshot current at start (a restart changes them); the TLS handshake and idle timeouts of a
/// connection, and the drain timeout, are read from the snapshot current at that time (a
/// reload changes them).
async fn serve(
    handle: GatewayHandle,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    stop: watch::Receiver<bool>,
) {
    let settings = handle.load().settings.clone();
    let app = router(handle.clone());
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .max_headers(settings.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Decoded up to a multiple of the limit, so a head over it gets a 431 on its stream
        // (`conn`) instead of h2 ending the whole connection.
        .max_header_list_size((settings.max_header_bytes * conn::H2_HEADER_LIST_FACTOR) as u32)
        // Explicit, not hyper's changeable defaults: streams per connection, and the rapid
        // reset bound (streams reset by the client before we saw them).
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    // Every open connection, for the limits per-byte timeouts cannot give (`conns`).
    let conns = conns::Conns::new(settings.max_connections);
    let relief = tokio::spawn(conns.clone().relieve(stop.clone()));
    let conn_stop = stop.clone();
    let server = conn::Server {
        acceptor,
        builder: Arc::new(builder),
        conns,
    };
    let connection = |(tcp, peer): (TcpStream, SocketAddr)| {
        let _ = tcp.set_nodelay(true);
        let live = handle.load();
        let limits = conn::Limits {
            tls_handshake_timeout: live.settings.tls_handshake_timeout,
            idle_timeout: live.settings.idle_timeout,
            header_read_timeout: settings.header_read_timeout,
            max_header_bytes: settings.max_header_bytes,
            body: inbound::BodyLimits::of(&live.settings),
        };
        conn::serve(
            server.clone(),
            tcp,
            peer,
            app.clone().layer(Extension(ClientAddr(peer))),
            limits,
            graceful.watcher(),
            conn_stop.clone(),
        )
    };
    crate::accept::run(
        &listener,
        "HTTPS",
        settings.max_connections,
        stop,
        connection,
    )
    .await;
    drop(listener);
    relief.abort();
    let live = handle.load();
    tracing::info!(
        timeout = ?live.settings.drain_timeout,
        "HTTPS listener closed (new connections wait in a socket-activated backlog or are refused); draining open requests"
    );
    drain(graceful, live.settings.drain_timeout, &live.drain).await;
}

/// How long cut connections get to send their last bytes (the error event) once the drain
/// period is over.
const CUT_FLUSH: Duration = Duration::from_secs(1);

/// Lets open connections finish for `timeout`; then cuts what is still open (streams end with
/// an error event, other answers are aborted) and gives them [`CUT_FLUSH`] to say so.
async fn drain(
    graceful: hyper_util::server::graceful::GracefulShutdown,
    timeout: Duration,
    cut: &drain::DrainCut,
) {
    let shutdown = graceful.shutdown();
    tokio::pin!(shutdown);
    if tokio::time::timeout(timeout, &mut shutdown).await.is_ok() {
        tracing::info!("all connections drained");
        return;
    }
    tracing::warn!(
        ?timeout,
        "drain timeout reached with connections still open; cutting them (streams end with a server_shutting_down error event)"
    );
    cut.cut();
    if tokio::time::timeout(CUT_FLUSH, &mut shutdown)
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the cut; closing them");
    }
}
