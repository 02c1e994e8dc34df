//! `modelgate run`: starts the tunnel and netstack from a validated [`Config`] and keeps them
//! running until SIGTERM or SIGINT, then stops cleanly.
//!
//! Owns process lifetime: the HTTPS gateway, the metrics listener (`telemetry`), the control
//! socket (`control`, served by [`live::Live`]), config reloads (SIGHUP or `modelgate reload`),
//! systemd readiness ([`notify`]) and the debug `--forward` listeners. It never decides policy
//! and never logs secrets: the private key is read from its 0600 file and handed straight to the
//! tunnel.
//!
//! Stop (SIGTERM/SIGINT): `STOPPING=1`; the HTTPS listener closes at once (new connections are
//! refused) and in-flight requests get `gateway.drain_timeout` to finish; then the metrics and
//! control listeners close (the socket file is removed), the usage ledger writes what is
//! pending, and the tunnel stops.

mod listen;
mod live;
pub mod notify;
mod ready;
mod replicas;

pub use listen::{Inherited, InheritedSocket};

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::{self, Config, TlsConfig};
use crate::gateway::upstream::UpstreamSpec;
use crate::gateway::Gateway;
use crate::keys::ledger::{Ledger, LedgerOptions, LedgerTask, LedgerWriter};
use crate::keys::{KeyRing, KeyStore, Keys, StoreConfig};
use crate::netstack::{NetError, Netstack, NetstackConfig, TcpTuning};
use crate::policy::limits::Limiter;
use crate::telemetry::Metrics;
use crate::tls::TlsState;
use crate::tunnel::endpoints::EndpointStore;
use crate::tunnel::PeerSpec;
use live::{GatewayParts, Live};

/// Options of `modelgate run` that are not part of the config file.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// `--forward LISTEN=TARGET`: debug TCP forwards from a local port through the tunnel.
    pub forwards: Vec<Forward>,
    /// Sockets systemd passed (socket activation); the HTTPS one is used instead of binding.
    pub inherited: Inherited,
}

/// One `--forward 127.0.0.1:8080=10.20.0.5:8000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

impl FromStr for Forward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (l, t) = s.split_once('=').ok_or_else(|| {
            format!("--forward {s:?}: expected LISTEN=TARGET, e.g. 127.0.0.1:8080=10.20.0.5:8000")
        })?;
        let listen = l
            .parse()
            .map_err(|_| format!("--forward {s:?}: {l:?} is not an IP:PORT to listen on"))?;
        let target = t
            .parse()
            .map_err(|_| format!("--forward {s:?}: {t:?} is not an IP:PORT inside the tunnel"))?;
        Ok(Forward { listen, target })
    }
}

/// How long shutdown waits for the usage ledger's final write once the gateway has drained.
const LEDGER_FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections one `--forward` serves at once; more wait in the kernel's accept queue.
const FORWARD_MAX_CONNECTIONS: usize = 1024;
/// Copy buffer per direction of a forwarded connection.
const FORWARD_BUFFER: usize = 256 << 10;

/// Refuses forwards whose target no peer routes: the forward could never work, and saying so
/// at start beats a refused connection later.
pub fn check_forwards(config: &Config, forwards: &[Forward]) -> Result<(), String> {
    for f in forwards {
        let ip = f.target.ip();
        if !config
            .peers
            .iter()
            .any(|p| p.allowed_ips.iter().any(|n| n.contains(&ip)))
        {
            return Err(format!(
                "--forward {}={}: {} is not inside any peer's allowed IPs; fix: forward to an address behind a peer (see `modelgate peer list`) or add it with `modelgate peer add NAME --allowed-ips CIDR`",
                f.listen, f.target, ip
            ));
        }
    }
    Ok(())
}

/// Builds the netstack settings from the config (the appliance side of every peer).
pub fn netstack_config(config: &Config) -> anyhow::Result<NetstackConfig> {
    let private_key = config::load_private_key(&config.wireguard).map_err(anyhow::Error::msg)?;
    Ok(NetstackConfig {
        private_key,
        listen: config.wireguard.listen,
        addresses: vec![config.wireguard.address],
        peers: peer_specs(config),
        mtu: config.wireguard.mtu,
        tcp: TcpTuning {
            connect_timeout: config.gateway.upstream_connect_timeout,
            // Every client connection may hold one upstream connection through the tunnel,
            // and the pool keeps idle ones: room for both (8,192 capped 10,000 streams).
            max_connections: TcpTuning::default()
                .max_connections
                .max(config.gateway.max_connections.saturating_add(1024)),
            ..TcpTuning::default()
        },
    })
}

/// The tunnel's view of `[[peer]]`.
pub fn peer_specs(config: &Config) -> Vec<PeerSpec> {
    config
        .peers
        .iter()
        .map(|p| PeerSpec {
            name: p.name.clone(),
            public_key: p.public_key,
            allowed_ips: p.allowed_ips.clone(),
            keepalive: p.keepalive,
            endpoint: p.endpoint,
        })
        .collect()
}

/// The gateway's view of `[[upstream]]`, with each API key read from its 0600 file.
pub fn upstream_specs(config: &Config) -> anyhow::Result<Vec<UpstreamSpec>> {
    config
        .upstreams
        .iter()
        .map(|u| {
            let api_key =
                match &u.api_key_file {
                    Some(f) => Some(config::read_api_key_file(f).map_err(|e| {
                        anyhow::anyhow!("[[upstream]] {}: api_key_file: {e}", u.name)
                    })?),
                    None => None,
                };
            Ok(UpstreamSpec {
                name: u.name.clone(),
                addr: u.addr,
                base_path: u.base_path.clone(),
                api_key,
                models: u
                    .models
                    .iter()
                    .map(|m| (m.public.clone(), m.upstream.clone()))
                    .collect(),
                max_concurrent: u.max_concurrent,
            })
        })
        .collect()
}

/// Runs the daemon in the current tokio runtime until SIGTERM or SIGINT.
pub async fn run_until_signal(config: Config, opts: RunOptions) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        let _ = stop_tx.send(true);
    });
    let r = run(config, opts, stop_rx).await;
    signals.abort();
    r
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can only run until killed; say so and wait forever.
        tracing::error!("cannot install SIGTERM/SIGINT handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, stopping"),
        _ = int.recv() => tracing::info!("SIGINT received, stopping"),
    }
}

/// The daemon proper; `stop` turning true ends it. Tests call this directly.
pub async fn run(
    config: Config,
    mut opts: RunOptions,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    check_forwards(&config, &opts.forwards).map_err(anyhow::Error::msg)?;
    let ns_cfg = netstack_config(&config)?;
    let https_socket = match &config.tls {
        Some(_) => opts
            .inherited
            .take_https(config.server.listen)
            .map_err(anyhow::Error::msg)?,
        None => {
            if !opts.inherited.is_empty() {
                tracing::warn!("systemd passed a socket, but the config has no [tls]: the HTTPS gateway is off and the socket unused");
            }
            None
        }
    };
    // The control socket first: a second daemon on the same config is told so plainly here,
    // before it trips over the first one's ports.
    let control_path = config.server.control_socket.clone();
    let (control, guard) =
        crate::control::server::bind(&control_path).map_err(anyhow::Error::msg)?;
    // Stored endpoints: the peers are handshaken at once (see tunnel/restart.rs).
    let store = EndpointStore::in_dir(&config.server.state_dir);
    let netstack = Netstack::start_with_store(ns_cfg, Some(store)).map_err(|e| {
        anyhow::anyhow!(
            "cannot bind the WireGuard UDP socket {}: {e}; fix: free the port or change [wireguard] listen / --wg-listen",
            config.wireguard.listen
        )
    })?;
    tracing::info!(
        public_key = %netstack.public_key(),
        wireguard = %netstack.udp_addr(),
        address = %config.wireguard.address,
        peers = config.peers.len(),
        "tunnel up"
    );

    let mut tasks = Vec::new();
    let mut gateway_task = None;
    let mut ledger_task = None;
    let mut parts = None;
    let metrics;
    if let Some(tls_cfg) = &config.tls {
        let started =
            start_gateway(&config, tls_cfg, &netstack, https_socket, &stop, &mut tasks).await?;
        gateway_task = Some(started.serve);
        ledger_task = Some(started.ledger);
        metrics = started.parts.handle.load().metrics.clone();
        parts = Some(started.parts);
    } else {
        tracing::warn!(
            "no [tls] table in the config: the HTTPS gateway is off (tunnel and --forward only)"
        );
        metrics = Arc::new(Metrics::new());
    }
    for f in &opts.forwards {
        let listener = TcpListener::bind(f.listen).await.map_err(|e| {
            anyhow::anyhow!(
                "--forward {}={}: cannot listen on {}: {e}",
                f.listen,
                f.target,
                f.listen
            )
        })?;
        tracing::info!(listen = %f.listen, target = %f.target, "forward listening");
        tasks.push(tokio::spawn(forward_loop(
            listener,
            f.target,
            netstack.clone(),
            stop.clone(),
        )));
    }
    tasks.push(tokio::spawn(watch_peers(netstack.clone(), stop.clone())));

    let metrics_listen = config.server.metrics_listen;
    let live = Arc::new(Live::new(
        config,
        netstack.clone(),
        parts,
        metrics,
        opts.forwards.clone(),
    ));

    let metrics_listener = TcpListener::bind(metrics_listen).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {metrics_listen} (metrics): {e}; fix: free the port or change [server] metrics_listen"
        )
    })?;
    let metrics_addr = metrics_listener.local_addr().ok();
    *live.metrics_addr.lock().unwrap_or_else(|p| p.into_inner()) = metrics_addr;
    tracing::info!(listen = ?metrics_addr, "metrics listening (GET /metrics)");
    let scrape_live = live.clone();
    let render: crate::telemetry::server::Renderer = Arc::new(move || {
        let l = scrape_live.clone();
        Box::pin(async move { l.scrape().await })
    });
    tasks.push(tokio::spawn(crate::telemetry::server::serve(
        metrics_listener,
        render,
        stop.clone(),
    )));

    tracing::info!(socket = %control_path.display(), "control socket listening");
    tasks.push(tokio::spawn(crate::control::server::serve(
        control,
        guard,
        live.clone(),
        stop.clone(),
    )));
    tasks.push(tokio::spawn(reload_on_sighup(live.clone(), stop.clone())));

    // READY=1 once requests can work: the listeners are up and the tunnel is (or 2 s passed).
    // (Borrowed, not cloned: a handle kept here would keep the gateway snapshot, and with it
    // the ledger's writer, alive past the drain, and stall the stop by the ledger timeout.)
    let handle = live.gateway.as_ref().map(|g| &g.handle);
    let tunnel = ready::await_tunnel(&netstack, handle, ready::READY_WAIT).await;
    notify::notify_logged(&format!("READY=1\nSTATUS={}{tunnel}", live.status_line()));

    // Wait for the stop signal (or the sender going away).
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            break;
        }
    }
    notify::notify_logged("STOPPING=1\nSTATUS=draining in-flight requests");
    // The gateway drains in-flight requests (bounded by drain_timeout) while the tunnel is
    // still up; only then does the netstack stop.
    if let Some(g) = gateway_task {
        let _ = g.await;
    }
    // Everything else ends now (the control socket file is removed as its task ends). The
    // gateway snapshot (and with it a ledger writer) must be gone before the ledger can end.
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    drop(live);
    // The gateway held the only ledger writers; with it gone the ledger task writes what is
    // pending and ends. Connections still open past the drain timeout may keep a writer
    // alive, so the wait is bounded too.
    if let Some(l) = ledger_task {
        if tokio::time::timeout(LEDGER_FINAL_WRITE_TIMEOUT, l.finished())
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?LEDGER_FINAL_WRITE_TIMEOUT,
                "usage ledger did not finish its final write in time; the last usage may be lost"
            );
        }
    }
    netstack.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// What [`start_gateway`] leaves running.
struct StartedGateway {
    serve: tokio::task::JoinHandle<()>,
    ledger: LedgerTask,
    parts: GatewayParts,
}

/// Binds the HTTPS port (or takes the socket systemd passed) and starts the gateway with its
/// key ring, certificate, upstreams, limiter (seeded with this UTC day's and month's usage)
/// and usage ledger writer.
async fn start_gateway(
    config: &Config,
    tls_cfg: &TlsConfig,
    netstack: &Netstack,
    inherited: Option<InheritedSocket>,
    stop: &watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<StartedGateway> {
    let state_dir = config.server.state_dir.clone();
    let tls = Arc::new(TlsState::load(tls_cfg, &state_dir).map_err(|e| anyhow::anyhow!("{e}"))?);
    // The store calls block (a PostgreSQL store's client runs its own small runtime): never on
    // a runtime worker.
    let (dir, store_cfg, policies) = (
        state_dir.clone(),
        config.store.clone(),
        config.policies.clone(),
    );
    let ring = tokio::task::spawn_blocking(move || {
        KeyStore::open_in(&dir, &store_cfg).and_then(|s| KeyRing::load(&s, &policies))
    })
    .await
    .map_err(|e| anyhow::anyhow!("key store task failed: {e}"))?
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(store = %config.store.describe(&state_dir), "key store open");
    let keys = Keys::with_policies(ring, config.policies.clone());
    tasks.push(tokio::spawn(keys.clone().watch(
        state_dir.clone(),
        config.store.clone(),
        stop.clone(),
    )));
    tasks.push(tokio::spawn(tls.clone().watch(stop.clone())));

    let upstreams = upstream_specs(config)?;
    if upstreams.is_empty() {
        tracing::warn!("no [[upstream]] configured: every model request will get 404; add one with `modelgate upstream add`");
    }
    let (dir, store_cfg) = (state_dir.clone(), config.store.clone());
    let (limiter, ledger) = tokio::task::spawn_blocking(move || open_ledger(&dir, &store_cfg))
        .await
        .map_err(|e| anyhow::anyhow!("usage ledger task failed: {e}"))??;
    let (ledger, ledger_task) =
        LedgerWriter::start(ledger, ledger_options(&state_dir, &config.store));
    let ledger_stats = ledger.stats_handle();
    let from_systemd = inherited
        .as_ref()
        .map(|s| s.name.clone().unwrap_or_default());
    let listener = https_listener(config.server.listen, inherited).await?;
    let https = listener.local_addr().unwrap_or(config.server.listen);
    tracing::info!(
        listen = %https,
        socket_from_systemd = ?from_systemd,
        certificate_expires = ?tls.not_after().map(humantime::format_rfc3339_seconds),
        "HTTPS gateway listening"
    );
    let running = Gateway::new(
        keys.clone(),
        netstack.clone(),
        upstreams,
        config.gateway.clone(),
    )
    .limiter(limiter)
    .ledger(ledger)
    .models(config.models.clone())
    .start(listener, tls.server_config(), stop.clone());
    tasks.push(running.discovery);
    if config.store.is_shared() {
        tasks.push(tokio::spawn(crate::keys::ledger::sync_budgets(
            crate::keys::ledger::BudgetSync {
                limiter: running.handle.load().limiter.clone(),
                keys: keys.clone(),
                ledger: ledger_stats.clone(),
                state_dir: state_dir.clone(),
                store: config.store.clone(),
            },
            stop.clone(),
        )));
    }
    Ok(StartedGateway {
        serve: running.serve,
        ledger: ledger_task,
        parts: GatewayParts {
            handle: running.handle,
            tls,
            keys,
            https,
            ledger: ledger_stats,
        },
    })
}

/// The HTTPS listener: the socket systemd passed, or `listen` bound here.
async fn https_listener(
    listen: SocketAddr,
    inherited: Option<InheritedSocket>,
) -> anyhow::Result<TcpListener> {
    if let Some(s) = inherited {
        let l = s.listener;
        return l
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(l))
            .map_err(|e| anyhow::anyhow!("the HTTPS socket from systemd ({}) is unusable: {e}; fix: `systemctl restart modelgate.socket modelgate.service`", s.addr));
    }
    TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {listen} (HTTPS): {e}; fix: free the port, or change [server] listen (ports below 1024 need CAP_NET_BIND_SERVICE)"
        )
    })
}

/// Opens the usage ledger, seeds a limiter with every key's usage in the current UTC day and
/// month (so budgets survive restarts), and starts the ledger's writer task.
#[cfg(test)]
fn start_ledger(
    state_dir: &std::path::Path,
) -> anyhow::Result<(Limiter, LedgerWriter, LedgerTask)> {
    let (limiter, ledger) = open_ledger(state_dir, &StoreConfig::Sqlite)?;
    let (writer, task) = LedgerWriter::start(ledger, LedgerOptions::default());
    Ok((limiter, writer, task))
}

/// The ledger writer's settings: a shared store gets a local spool for its outages.
fn ledger_options(state_dir: &std::path::Path, store: &StoreConfig) -> LedgerOptions {
    LedgerOptions {
        spool: store
            .is_shared()
            .then(|| state_dir.join(crate::keys::ledger::SPOOL_FILE)),
        ..LedgerOptions::default()
    }
}

/// Opens the usage ledger and seeds a limiter with every key's usage in the current UTC day
/// and month (blocking).
fn open_ledger(
    state_dir: &std::path::Path,
    store: &StoreConfig,
) -> anyhow::Result<(Limiter, Ledger)> {
    let ledger = Ledger::open_in(state_dir, store).map_err(|e| anyhow::anyhow!("{e}"))?;
    let now = std::time::SystemTime::now();
    let usage = ledger
        .period_tokens(now)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut limiter = Limiter::new();
    // A shared store: budgets are admitted against leases only (from the first request on).
    limiter.set_leased(store.is_shared());
    for (key_id, today, month) in &usage {
        limiter.seed_usage(key_id, *today, *month, now);
    }
    tracing::info!(
        keys_with_usage = usage.len(),
        "usage ledger open; limiter seeded"
    );
    Ok((limiter, ledger))
}

/// SIGHUP reloads the configuration like `modelgate reload` (the result goes to the log).
/// Installed before `READY=1`, so an early SIGHUP never kills the daemon.
async fn reload_on_sighup(live: Arc<Live>, mut stop: watch::Receiver<bool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install the SIGHUP handler; reload with `modelgate reload`");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                let _ = live.reload().await;
            }
            _ = stop.changed() => return,
        }
    }
}

/// Serves one `--forward`: each connection accepted on `listener` is copied both ways to
/// `target` through the tunnel.
async fn forward_loop(
    listener: TcpListener,
    target: SocketAddr,
    netstack: Netstack,
    stop: watch::Receiver<bool>,
) {
    crate::accept::run(
        &listener,
        "forward",
        FORWARD_MAX_CONNECTIONS,
        stop,
        |(client, from)| forward_one(client, from, target, netstack.clone()),
    )
    .await
}

async fn forward_one(mut client: TcpStream, from: SocketAddr, target: SocketAddr, ns: Netstack) {
    let _ = client.set_nodelay(true);
    let mut upstream = match ns.dial(target).await {
        Ok(s) => s,
        Err(e) => {
            let level_warn = !matches!(e, NetError::Refused);
            if level_warn {
                tracing::warn!(%from, %target, error = %e, "forward: cannot reach target");
            } else {
                tracing::info!(%from, %target, error = %e, "forward: target refused");
            }
            return;
        }
    };
    match tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        FORWARD_BUFFER,
        FORWARD_BUFFER,
    )
    .await
    {
        Ok((up, down)) => tracing::debug!(%from, %target, up, down, "forward closed"),
        Err(e) => tracing::debug!(%from, %target, error = %e, "forward ended with error"),
    }
}

/// Logs peer endpoint changes, the event an operator looks for first (keyed by public key, so
/// a reload that changes the peer set does not confuse it).
async fn watch_peers(ns: Netstack, mut stop: watch::Receiver<bool>) {
    let mut known: std::collections::HashMap<[u8; 32], Option<SocketAddr>> =
        std::collections::HashMap::new();
    loop {
        if let Ok(stats) = ns.stats().await {
            let mut next = std::collections::HashMap::with_capacity(stats.peers.len());
            for p in &stats.peers {
                let before = known.get(&p.public_key.0).copied().flatten();
                if p.endpoint != before {
                    if let Some(ep) = p.endpoint {
                        tracing::info!(peer = %p.name, endpoint = %ep, "peer endpoint learned");
                    }
                }
                next.insert(p.public_key.0, p.endpoint);
            }
            known = next;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::ledger::UsageEvent;
    use crate::policy::limits::{Estimate, RefusalKind};
    use crate::policy::{Budget, BudgetPeriod, KeyPolicy};
    use std::time::{Instant, SystemTime};

    fn event(at: SystemTime, prompt: u64, completion: u64) -> UsageEvent {
        UsageEvent {
            key_id: Arc::from("k1"),
            at,
            prompt_tokens: prompt,
            completion_tokens: completion,
            estimated: false,
        }
    }

    /// A restart keeps budgets: the limiter starts from the ledger's usage, and what the
    /// writer records is on disk once its task has finished.
    #[tokio::test]
    async fn ledger_seeds_the_limiter_and_its_task_writes_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        Ledger::open(dir.path())
            .unwrap()
            .write(&[event(now, 900, 50)])
            .unwrap();
        let (mut limiter, writer, task) = start_ledger(dir.path()).unwrap();
        let policy = KeyPolicy {
            budget: Some(Budget {
                tokens: 1000,
                period: BudgetPeriod::Day,
            }),
            ..KeyPolicy::default()
        };
        // 50 tokens are left: a 50-token prompt leaves no room for one completion token.
        let too_much = Estimate {
            prompt_tokens: 50,
            max_tokens: Some(20),
        };
        let r = limiter
            .admit("k1", &policy, too_much, Instant::now(), now)
            .unwrap_err();
        assert_eq!(r.kind, RefusalKind::InsufficientQuota);
        let fits = Estimate {
            prompt_tokens: 30,
            max_tokens: Some(10),
        };
        let adm = limiter
            .admit("k1", &policy, fits, Instant::now(), now)
            .unwrap();
        limiter.settle(adm, 40, Instant::now(), now);
        assert!(writer.record(event(now, 30, 10)));
        drop(writer);
        task.finished().await;
        let usage = Ledger::open(dir.path()).unwrap().usage("k1", now).unwrap();
        assert_eq!(usage.today.tokens(), 990);
        assert_eq!(usage.today.requests, 2);
    }
}
