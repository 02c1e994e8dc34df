//! The public HTTPS gateway: one port, TLS (rustls), HTTP/1.1 and HTTP/2, OpenAI's API.
//!
//! Owns building a gateway ([`Gateway`], the one way the daemon, the demo and the tests do it),
//! its live snapshot ([`GatewayHandle`], swapped by a reload), serving connections, the
//! per-request path (auth → policy → route → stream) and the OpenAI-shaped errors. Every
//! capacity and timeout is a setting. Connections come through the bounded loop of
//! [`crate::accept`]; the TLS handshake runs in the connection's own task, never in the
//! accept loop. It never binds its own listener: it is handed one, already bound.

mod admission;
mod audit;
mod auth;
mod body;
pub mod compat;
mod drain;
pub mod error;
pub mod fair;
mod forward;
mod idle;
pub mod meter;
pub mod proxy;
mod request;
pub mod upstream;
mod usage;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::FromRef;
use axum::routing::{get, options, post};
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::GatewayConfig;
use crate::keys::ledger::LedgerWriter;
use crate::keys::Keys;
use crate::netstack::Netstack;
use crate::policy::limits::{Limiter, LimiterConfig};
use crate::policy::Endpoint;
use crate::telemetry::Metrics;
use upstream::{Routes, UpstreamClient, UpstreamSpec};

/// How often upstreams without static routes are asked for their models.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(30);

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
        }
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
        } = g;
        limiter.configure(LimiterConfig {
            default_max_tokens: config.default_max_tokens,
        });
        GatewayState {
            keys,
            routes: Arc::new(Routes::with_queues(
                upstreams,
                config.max_queued,
                config.queue_timeout,
            )),
            client: upstream::client(netstack),
            settings: config,
            limiter: Arc::new(Mutex::new(limiter)),
            ledger,
            metrics: Arc::new(Metrics::new()),
            drain: drain::DrainCut::default(),
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
            routes: Arc::new(self.routes.reconfigured(
                upstreams,
                config.gateway.max_queued,
                config.gateway.queue_timeout,
            )),
            client: self.client.clone(),
            settings: config.gateway.clone(),
            limiter: self.limiter.clone(),
            ledger: self.ledger.clone(),
            metrics: self.metrics.clone(),
            drain: self.drain.clone(),
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

    /// Model discovery over the current routes, a round at once after every swap and every
    /// time a tunnel peer comes up (`peer_events`), so no probe result from before the
    /// tunnel was up outlives its first handshake (a restart, a corp peer back from silence).
    fn spawn_discovery(
        &self,
        peer_events: watch::Receiver<u64>,
        stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let me = self.clone();
        let client = self.load().client.clone();
        let discover = upstream::discover_live(
            move || me.load().routes.clone(),
            client,
            DISCOVERY_INTERVAL,
            self.changed.clone(),
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
    // CORS preflight (OPTIONS) is answered on every path without auth.
    let post_ep = |ep: Endpoint| {
        post(proxy::forward)
            .layer(Extension(ep))
            .options(proxy::preflight)
    };
    let models = || get(proxy::list_models).options(proxy::preflight);
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
    r.route("/{*rest}", options(proxy::preflight))
        .route("/", options(proxy::preflight))
        .fallback(proxy::not_found)
        .with_state(state)
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
        .max_header_list_size(settings.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let conn_stop = stop.clone();
    let connection = |(tcp, peer): (TcpStream, SocketAddr)| {
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone().layer(Extension(ClientAddr(peer)));
        let builder = builder.clone();
        let live = handle.load();
        let hs_timeout = live.settings.tls_handshake_timeout;
        let idle_timeout = live.settings.idle_timeout;
        let watcher = graceful.watcher();
        let stop = conn_stop.clone();
        async move {
            // After a stop a handshake gets FIRST_REQUEST_GRACE at most (the drain waits for it).
            let handshake = tokio::time::timeout(hs_timeout, acceptor.accept(tcp));
            let tls = tokio::select! {
                r = handshake => r,
                () = stopped_then(stop.clone(), FIRST_REQUEST_GRACE) => {
                    tracing::debug!(%peer, "TLS handshake unfinished at the stop");
                    return;
                }
            };
            let tls = match tls {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            // An ACME TLS-ALPN-01 validation (RFC 8737 §3): done once the handshake is; never HTTP.
            if crate::tls::acme::is_acme_alpn(tls.get_ref().1.alpn_protocol()) {
                tracing::info!(%peer, "ACME tls-alpn-01 validation handshake served");
                return;
            }
            let svc = TowerToHyperService::new(app);
            let activity = Arc::new(idle::Activity::new());
            let io = idle::IdleIo::new(tls, activity.clone());
            let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
            tokio::select! {
                r = graceful_after_first_request(conn, &activity, stop, watcher) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with error");
                    }
                }
                _ = activity.idle_for(idle_timeout) => {
                    tracing::debug!(%peer, "closing a connection idle for {idle_timeout:?}");
                }
            }
        }
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
    let live = handle.load();
    tracing::info!(
        timeout = ?live.settings.drain_timeout,
        "HTTPS listener closed (new connections wait in a socket-activated backlog or are refused); draining open requests"
    );
    drain(graceful, live.settings.drain_timeout, &live.drain).await;
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
    conn: C,
    activity: &idle::Activity,
    stop: watch::Receiver<bool>,
    _watcher: hyper_util::server::graceful::Watcher,
) -> Result<(), C::Error>
where
    C: hyper_util::server::graceful::GracefulConnection,
{
    tokio::pin!(conn);
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
