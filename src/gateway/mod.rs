//! The public HTTPS gateway: one port, TLS (rustls), HTTP/1.1 and HTTP/2, OpenAI's API.
//!
//! Owns accepting connections, the per-request path (auth → policy → route → stream) and the
//! OpenAI-shaped errors. Every capacity and timeout is a setting. Connections come through the
//! bounded loop of [`crate::accept`]; the TLS handshake runs in the connection's own task, never
//! in the accept loop.

pub mod compat;
pub mod error;
pub mod fair;
mod idle;
pub mod meter;
pub mod proxy;
pub mod upstream;

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

use crate::keys::ledger::LedgerWriter;
use crate::keys::Keys;
use crate::netstack::Netstack;
use crate::policy::limits::{Limiter, LimiterConfig};
use crate::policy::Endpoint;
use crate::telemetry::Metrics;
use upstream::{Routes, UpstreamClient, UpstreamSpec};

/// Limits and timeouts of the public listener: the config's `[gateway]` table.
pub use crate::config::GatewayConfig as GatewaySettings;

/// How often upstreams without static routes are asked for their models.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(30);

/// The client's TCP address (never a forwarded header), set per connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// One snapshot of the gateway, shared by every request that started under it. A config reload
/// builds a new snapshot ([`GatewayState::reconfigured`]) and swaps it into the
/// [`GatewayHandle`]; a request keeps the snapshot it started with to its end, so in-flight
/// streams keep their upstream and settings. Keys, the upstream client, limiter, ledger and
/// metrics are shared by all snapshots; routes and settings (config-derived) are per snapshot.
pub struct GatewayState {
    pub keys: Arc<Keys>,
    pub routes: Arc<Routes>,
    pub client: UpstreamClient,
    pub settings: GatewaySettings,
    /// Per-key RPM/TPM/concurrency/budget state. A std `Mutex`: it is held only for one O(1)
    /// `admit` or `settle` call, never across an `.await`.
    pub limiter: Arc<Mutex<Limiter>>,
    /// Where settled usage goes; `None` runs without a ledger (tests, demo).
    pub ledger: Option<LedgerWriter>,
    /// Request counters and histograms (`telemetry`), shared across reloads.
    pub metrics: Arc<Metrics>,
}

impl GatewayState {
    /// A gateway with a fresh limiter and no usage ledger.
    pub fn new(
        keys: Arc<Keys>,
        netstack: Netstack,
        upstreams: Vec<UpstreamSpec>,
        settings: GatewaySettings,
    ) -> Arc<GatewayState> {
        GatewayState::with_accounting(keys, netstack, upstreams, settings, Limiter::new(), None)
    }

    /// A gateway with a given limiter (seeded from the ledger) and ledger writer.
    pub fn with_accounting(
        keys: Arc<Keys>,
        netstack: Netstack,
        upstreams: Vec<UpstreamSpec>,
        settings: GatewaySettings,
        mut limiter: Limiter,
        ledger: Option<LedgerWriter>,
    ) -> Arc<GatewayState> {
        limiter.configure(LimiterConfig {
            default_max_tokens: settings.default_max_tokens,
        });
        Arc::new(GatewayState {
            keys,
            routes: Arc::new(Routes::with_queues(
                upstreams,
                settings.max_queued,
                settings.queue_timeout,
            )),
            client: upstream::client(netstack),
            settings,
            limiter: Arc::new(Mutex::new(limiter)),
            ledger,
            metrics: Arc::new(Metrics::new()),
        })
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
        }
    }

    /// Starts model discovery for upstreams without static routes.
    pub fn spawn_discovery(
        self: &Arc<Self>,
        stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(upstream::discover_loop(
            self.routes.clone(),
            self.client.clone(),
            DISCOVERY_INTERVAL,
            stop,
        ))
    }
}

/// The current [`GatewayState`] snapshot, swapped by a config reload. Cheap to clone. It is
/// the router's state: handlers extract `State<Arc<GatewayState>>` and get the snapshot that
/// is current when the request arrives.
#[derive(Clone)]
pub struct GatewayHandle {
    current: Arc<RwLock<Arc<GatewayState>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl GatewayHandle {
    pub fn new(state: Arc<GatewayState>) -> GatewayHandle {
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

    /// Model discovery over the current routes, a round at once after every swap.
    pub fn spawn_discovery(&self, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let client = self.load().client.clone();
        tokio::spawn(upstream::discover_live(
            move || me.load().routes.clone(),
            client,
            DISCOVERY_INTERVAL,
            self.changed.clone(),
            stop,
        ))
    }
}

impl FromRef<GatewayHandle> for Arc<GatewayState> {
    fn from_ref(h: &GatewayHandle) -> Arc<GatewayState> {
        h.load()
    }
}

/// The HTTP routes. Cursor appends `/chat/completions` to whatever base URL the user typed,
/// so the paths are served with and without the `/v1` prefix.
pub fn router(state: Arc<GatewayState>) -> Router {
    router_live(GatewayHandle::new(state))
}

/// [`router`] over a handle whose snapshot a reload may swap.
pub fn router_live(state: GatewayHandle) -> Router {
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

/// Serves HTTPS on `listener` until `stop` turns true, then drains for `drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    settings: GatewaySettings,
    stop: watch::Receiver<bool>,
) {
    let fixed = settings.clone();
    serve_live(listener, tls, app, settings, move || fixed.clone(), stop).await
}

/// [`serve`] whose per-connection settings (TLS handshake and idle timeouts) and drain timeout
/// are read from `current` (a reload may change them); the connection limit and the HTTP
/// parser limits stay as in `settings`, fixed when the listener started.
pub async fn serve_live(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    settings: GatewaySettings,
    current: impl Fn() -> GatewaySettings,
    stop: watch::Receiver<bool>,
) {
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
    let connection = |(tcp, peer): (TcpStream, SocketAddr)| {
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone().layer(Extension(ClientAddr(peer)));
        let builder = builder.clone();
        let live = current();
        let hs_timeout = live.tls_handshake_timeout;
        let idle_timeout = live.idle_timeout;
        let watcher = graceful.watcher();
        async move {
            let tls = match tokio::time::timeout(hs_timeout, acceptor.accept(tcp)).await {
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
            let conn = builder.serve_connection(TokioIo::new(io), svc);
            tokio::select! {
                r = watcher.watch(conn.into_owned()) => {
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
    let drain_timeout = current().drain_timeout;
    tracing::info!(
        timeout = ?drain_timeout,
        "HTTPS listener closed (new connections are refused); draining open requests"
    );
    match tokio::time::timeout(drain_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!(
            timeout = ?drain_timeout,
            "drain timeout reached with connections still open; closing them"
        ),
    }
}
