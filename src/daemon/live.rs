//! The running daemon as the control API sees it: status snapshots and config reloads.
//!
//! A reload re-reads and validates the config file the daemon started from. An invalid file is
//! refused with its errors and the running config stays. A valid one is applied part by part:
//! the peer set (sessions of peers whose key stayed are kept), the gateway snapshot (routes,
//! `[gateway]` settings and whatever else the config defines, swapped at once; requests in
//! flight keep the snapshot they started with), the certificate and the key ring. Settings
//! that only a restart can change (listen addresses, state_dir, the private key, …) are listed
//! in `needs_restart`, never silently ignored. Reloads are serialised.

use crate::civil::rfc3339;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::config::{self, Config, GatewayConfig};
use crate::control::server::ControlApi;
use crate::control::{
    HttpsStatus, InterfaceStatus, PeerStatus, ReloadReport, StatusReport, StreamStatus,
};
use crate::gateway::upstream::UpstreamSpec;
use crate::gateway::{GatewayHandle, GatewayState};
use crate::keys::{KeyRing, KeyStore, Keys};
use crate::netstack::Netstack;
use crate::telemetry::{self, Metrics, Scrape};
use crate::tls::TlsState;
use crate::tunnel::{PeerChanges, PeerHealth};

use super::{check_forwards, notify, peer_specs, replicas, upstream_specs, Forward};

/// One peer of `status`, from the tunnel's stats at `now`.
fn peer_status(p: &crate::tunnel::PeerStats, now: SystemTime) -> PeerStatus {
    let ago = |d: Option<std::time::Duration>| d.and_then(|d| now.checked_sub(d)).map(unix);
    let last_received_unix = ago(p.last_received);
    PeerStatus {
        name: p.name.clone(),
        public_key: p.public_key.to_string(),
        endpoint: p.endpoint.map(|e| e.to_string()),
        allowed_ips: p.allowed_ips.iter().map(|n| n.to_string()).collect(),
        latest_handshake_seconds_ago: p.last_handshake.map(|d| d.as_secs()),
        latest_handshake_unix: ago(p.last_handshake),
        rx_bytes: p.rx_bytes,
        tx_bytes: p.tx_bytes,
        persistent_keepalive: p.keepalive,
        state: p.health.as_str().to_string(),
        last_received_seconds_ago: p.last_received.map(|d| d.as_secs()),
        last_received_unix,
        silent_since_unix: last_received_unix.filter(|_| p.health == PeerHealth::Silent),
        silent_after_seconds: p.silent_after.as_secs(),
    }
}

/// The gateway's parts that a reload touches.
pub(crate) struct GatewayParts {
    pub handle: GatewayHandle,
    pub tls: Arc<TlsState>,
    pub keys: Arc<Keys>,
    /// The bound HTTPS address.
    pub https: SocketAddr,
    /// The usage ledger writer's counters (store health, spool).
    pub ledger: Arc<crate::keys::ledger::LedgerStats>,
}

pub(crate) struct Live {
    pub started: Instant,
    pub config: Mutex<Config>,
    pub netstack: Netstack,
    pub gateway: Option<GatewayParts>,
    pub metrics: Arc<Metrics>,
    pub metrics_addr: Mutex<Option<SocketAddr>>,
    pub forwards: Vec<Forward>,
    reload_lock: tokio::sync::Mutex<()>,
}

impl Live {
    pub fn new(
        config: Config,
        netstack: Netstack,
        gateway: Option<GatewayParts>,
        metrics: Arc<Metrics>,
        forwards: Vec<Forward>,
    ) -> Live {
        Live {
            started: Instant::now(),
            config: Mutex::new(config),
            netstack,
            gateway,
            metrics,
            metrics_addr: Mutex::new(None),
            forwards,
            reload_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn config(&self) -> Config {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The snapshot `modelgate status` prints.
    pub async fn status(&self) -> StatusReport {
        let cfg = self.config();
        let stats = self.netstack.stats().await.ok();
        let now = SystemTime::now();
        let peers = stats
            .as_ref()
            .map(|s| s.peers.iter().map(|p| peer_status(p, now)).collect())
            .unwrap_or_default();
        let udp = self.netstack.udp_addr();
        let (upstreams, models, https) = match &self.gateway {
            None => (Vec::new(), Vec::new(), None),
            Some(g) => {
                let state = g.handle.load();
                let ups = replicas::upstreams(&state);
                let models = replicas::models(&state);
                let not_after = g.tls.not_after();
                let https = HttpsStatus {
                    listen: g.https.to_string(),
                    certificate_not_after: not_after.map(rfc3339),
                    certificate_not_after_unix: not_after.map(unix),
                    certificate_days_left: not_after.map(|t| days_left(t, now)),
                    acme: g
                        .tls
                        .acme_status()
                        .map(|a| crate::control::AcmeStatusReport {
                            domain: a.domain,
                            directory: a.directory,
                            issued: a.issued,
                            serial: a.serial,
                            next_renewal: a.next_renewal.map(rfc3339),
                            next_renewal_unix: a.next_renewal.map(unix),
                            last_issued: a.last_issued.map(rfc3339),
                            last_error: a.last_error,
                            failures: a.failures,
                        }),
                };
                (ups, models, Some(https))
            }
        };
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            config: std::path::absolute(&cfg.path)
                .unwrap_or(cfg.path.clone())
                .display()
                .to_string(),
            interface: InterfaceStatus {
                public_key: self.netstack.public_key().to_string(),
                listen: udp.to_string(),
                listen_port: udp.port(),
                address: cfg.wireguard.address.to_string(),
            },
            peers,
            upstreams,
            models,
            https,
            metrics_listen: self
                .metrics_addr
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .map(|a| a.to_string()),
            store: self.gateway.as_ref().map(|g| store_status(&cfg, g)),
            streams: self
                .metrics
                .active_streams()
                .into_iter()
                .map(|a| StreamStatus {
                    key_id: a.key_id,
                    key_name: a.key_name,
                    active: a.count,
                })
                .collect(),
        }
    }

    /// The Prometheus exposition (request metrics plus live peer, upstream and certificate
    /// gauges).
    pub async fn scrape(&self) -> String {
        let peers = self
            .netstack
            .stats()
            .await
            .map(|s| s.peers)
            .unwrap_or_default();
        let (upstreams, certificate_not_after, (replicas, models_queued)) = match &self.gateway {
            None => (Vec::new(), None, Default::default()),
            Some(g) => {
                let state = g.handle.load();
                let upstreams = state
                    .routes
                    .upstreams()
                    .iter()
                    .map(|u| {
                        let queued = state.scheduler.waiting_for(u) as u64;
                        (u.spec.name.clone(), u.reachable(), u.in_flight(), queued)
                    })
                    .collect();
                (upstreams, g.tls.not_after(), replicas::gauges(&state))
            }
        };
        telemetry::render(
            &self.metrics,
            &Scrape {
                peers,
                upstreams,
                certificate_not_after,
                replicas,
                models_queued,
            },
        )
    }

    /// Re-reads the config file and applies it (see the module doc). Serialised.
    pub async fn reload(&self) -> ReloadReport {
        let _one_at_a_time = self.reload_lock.lock().await;
        notify::notify_logged("RELOADING=1\nSTATUS=reloading the configuration");
        let report = self.reload_inner().await;
        self.metrics.reload(report.applied);
        if report.applied {
            tracing::info!(
                changes = ?report.changes,
                needs_restart = ?report.needs_restart,
                warnings = ?report.warnings,
                "configuration reloaded"
            );
            for w in report.needs_restart.iter().chain(&report.warnings) {
                tracing::warn!("reload: {w}");
            }
        } else {
            tracing::error!(errors = ?report.errors, "configuration reload refused; the previous configuration stays in service");
        }
        notify::notify_logged(&format!("READY=1\nSTATUS={}", self.status_line()));
        report
    }

    /// One line for `systemctl status`.
    pub fn status_line(&self) -> String {
        let c = self.config();
        format!(
            "serving: {} peer(s), {} upstream(s)",
            c.peers.len(),
            c.upstreams.len()
        )
    }

    async fn reload_inner(&self) -> ReloadReport {
        let mut report = ReloadReport::default();
        let old = self.config();
        let path = old.path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let new = Config::load(&path).map_err(|e| error_lines(&e.to_string()))?;
            let ups = upstream_specs(&new).map_err(|e| vec![format!("{e:#}")])?;
            let key = config::load_private_key(&new.wireguard);
            Ok::<_, Vec<String>>((new, ups, key))
        })
        .await;
        let (new, ups, key) = match loaded {
            Ok(Ok(v)) => v,
            Ok(Err(errors)) => {
                report.errors = errors;
                return report;
            }
            Err(e) => {
                report.errors = vec![format!("reload task failed: {e}")];
                return report;
            }
        };
        report.needs_restart = needs_restart(&old, &new);
        match key {
            Ok(k) if k.public_key() != self.netstack.public_key() => report.needs_restart.push(
                "wireguard private key: the key file now holds another key; the running interface keeps the old one until a restart".into(),
            ),
            Ok(_) => {}
            Err(e) => report.warnings.push(format!("{e} (the running interface keeps its key)")),
        }

        // Peers.
        match self.netstack.set_peers(peer_specs(&new)).await {
            Ok(c) => report.changes.extend(peer_change_lines(&c)),
            Err(e) => {
                report.errors = vec![format!("the tunnel is stopping ({e}); nothing was applied")];
                return report;
            }
        }

        // Gateway snapshot: routes, settings and everything else derived from the config.
        match &self.gateway {
            Some(g) => {
                let cur = g.handle.load();
                report.changes.extend(upstream_change_lines(&cur, &ups));
                if cur.settings != new.gateway {
                    report.changes.push("[gateway] settings updated".into());
                }
                let next = cur.reconfigured(&new, ups);
                g.handle.swap(Arc::new(next));

                if old.tls == new.tls {
                    let tls = g.tls.clone();
                    match tokio::task::spawn_blocking(move || {
                        tls.reload().map(|()| tls.not_after())
                    })
                    .await
                    {
                        Ok(Ok(not_after)) => report.changes.push(format!(
                            "certificate reloaded (expires {})",
                            not_after
                                .filter(|t| *t >= UNIX_EPOCH)
                                .map_or_else(|| "?".into(), rfc3339)
                        )),
                        Ok(Err(e)) => report.warnings.push(format!(
                            "certificate not reloaded: {e}; the previous certificate stays in use"
                        )),
                        Err(e) => report
                            .warnings
                            .push(format!("certificate reload failed: {e}")),
                    }
                }

                if old.models != new.models {
                    report.changes.push("[[model]] balancing updated".into());
                }
                if old.policies != new.policies {
                    report
                        .changes
                        .push("[[policy]] named policies updated".into());
                }
                // The keys are resolved against the new named policies from now on.
                cur.keys.set_policies(new.policies.clone());
                let dir = new.server.state_dir.clone();
                // The watcher keeps the store it started with; moving stores takes a restart.
                if old.store != new.store {
                    report.warnings.push(
                        "[store] changed: restart modelgate to use the new store (the running daemon keeps the old one)".into(),
                    );
                }
                let store = old.store.clone();
                let policies = new.policies.clone();
                let loaded = tokio::task::spawn_blocking(move || {
                    KeyStore::open_in(&dir, &store).and_then(|s| KeyRing::load(&s, &policies))
                })
                .await;
                match loaded {
                    Ok(Ok(ring)) => {
                        let c = ring.counts(SystemTime::now());
                        g.keys.replace(ring);
                        report
                            .changes
                            .push(format!("keys reloaded: {} active of {}", c.active, c.total));
                    }
                    Ok(Err(e)) => report.warnings.push(format!(
                        "keys not reloaded: {e}; the previous key set stays in use"
                    )),
                    Err(e) => report.warnings.push(format!("keys reload failed: {e}")),
                }
            }
            None => {
                if !new.upstreams.is_empty() {
                    report.warnings.push(
                        "the HTTPS gateway is off (no [tls] when the daemon started): upstreams are not served until a restart".into(),
                    );
                }
            }
        }
        if let Err(e) = check_forwards(&new, &self.forwards) {
            report.warnings.push(e);
        }
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = new;
        report.applied = true;
        report
    }
}

impl ControlApi for Live {
    fn status(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = StatusReport> + Send + '_>> {
        Box::pin(Live::status(self))
    }
    fn reload(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ReloadReport> + Send + '_>> {
        Box::pin(Live::reload(self))
    }
}

/// Seconds since the Unix epoch; 0 for an earlier time.
fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Whole days from `now` until `t` (negative once past).
fn days_left(t: SystemTime, now: SystemTime) -> i64 {
    match t.duration_since(now) {
        Ok(d) => (d.as_secs() / 86_400) as i64,
        Err(e) => -(e.duration().as_secs().div_ceil(86_400) as i64),
    }
}

/// A config error as lines without indentation.
fn error_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Settings that differ between `old` and `new` but only a restart applies.
pub(crate) fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut differs = |key: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{key}: {a} → {b} (takes effect after a restart)"));
        }
    };
    differs(
        "server.listen",
        old.server.listen.to_string(),
        new.server.listen.to_string(),
    );
    differs(
        "server.state_dir",
        old.server.state_dir.display().to_string(),
        new.server.state_dir.display().to_string(),
    );
    differs(
        "server.control_socket",
        old.server.control_socket.display().to_string(),
        new.server.control_socket.display().to_string(),
    );
    differs(
        "server.metrics_listen",
        old.server.metrics_listen.to_string(),
        new.server.metrics_listen.to_string(),
    );
    differs(
        "wireguard.listen",
        old.wireguard.listen.to_string(),
        new.wireguard.listen.to_string(),
    );
    differs(
        "wireguard.address",
        old.wireguard.address.to_string(),
        new.wireguard.address.to_string(),
    );
    differs(
        "wireguard.private_key_file",
        old.wireguard.private_key_file.display().to_string(),
        new.wireguard.private_key_file.display().to_string(),
    );
    differs(
        "wireguard.mtu",
        old.wireguard.mtu.to_string(),
        new.wireguard.mtu.to_string(),
    );
    differs("[tls]", format!("{:?}", old.tls), format!("{:?}", new.tls));
    let (a, b): (&GatewayConfig, &GatewayConfig) = (&old.gateway, &new.gateway);
    let mut g = |key: &str, x: String, y: String| differs(&format!("gateway.{key}"), x, y);
    g(
        "max_connections",
        a.max_connections.to_string(),
        b.max_connections.to_string(),
    );
    g(
        "header_read_timeout",
        format!("{:?}", a.header_read_timeout),
        format!("{:?}", b.header_read_timeout),
    );
    g(
        "max_header_bytes",
        a.max_header_bytes.to_string(),
        b.max_header_bytes.to_string(),
    );
    g(
        "max_headers",
        a.max_headers.to_string(),
        b.max_headers.to_string(),
    );
    g(
        "upstream_connect_timeout",
        format!("{:?}", a.upstream_connect_timeout),
        format!("{:?}", b.upstream_connect_timeout),
    );
    out
}

fn peer_change_lines(c: &PeerChanges) -> Vec<String> {
    let mut out = Vec::new();
    for (what, names) in [
        ("peer added", &c.added),
        ("peer removed", &c.removed),
        ("peer updated (session kept)", &c.updated),
        ("peer keepalive changed (session restarted)", &c.restarted),
    ] {
        for n in names {
            out.push(format!("{what}: {n}"));
        }
    }
    out
}

fn upstream_change_lines(cur: &GatewayState, new: &[UpstreamSpec]) -> Vec<String> {
    let old = cur.routes.upstreams();
    let mut out = Vec::new();
    for s in new {
        match old.iter().find(|u| u.spec.name == s.name) {
            None => out.push(format!("upstream added: {}", s.name)),
            Some(u) if u.spec != *s => out.push(format!("upstream changed: {}", s.name)),
            Some(_) => {}
        }
    }
    for u in old {
        if !new.iter().any(|s| s.name == u.spec.name) {
            out.push(format!("upstream removed: {}", u.spec.name));
        }
    }
    out
}

/// The store's kind, location and health for `status`.
fn store_status(cfg: &Config, g: &GatewayParts) -> crate::control::StoreStatus {
    use crate::keys::StoreConfig;
    use std::sync::atomic::Ordering;
    let (kind, location) = match &cfg.store {
        StoreConfig::Sqlite => (
            "sqlite",
            cfg.server
                .state_dir
                .join(crate::keys::DB_FILE)
                .display()
                .to_string(),
        ),
        StoreConfig::Postgres(pg) => ("postgres", pg.display_url()),
    };
    let keys = g.keys.degraded();
    let usage = g.ledger.degraded();
    let spooled_rows = g.ledger.spool_rows.load(Ordering::Acquire);
    crate::control::StoreStatus {
        kind: kind.into(),
        location,
        degraded: keys.is_some() || usage.is_some() || spooled_rows > 0,
        keys_degraded_since: keys.as_ref().map(|(t, _)| rfc3339(*t)),
        keys_degraded_since_unix: keys.as_ref().map(|(t, _)| unix(*t)),
        keys_problem: keys.map(|(_, p)| p),
        usage_degraded_since: usage.as_ref().map(|(t, _)| rfc3339(*t)),
        usage_degraded_since_unix: usage.as_ref().map(|(t, _)| unix(*t)),
        usage_problem: usage.map(|(_, p)| p),
        spooled_rows,
        spooled_requests: g.ledger.spooled.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn days_left_rounds_towards_expiry() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(days_left(now + Duration::from_secs(86_400 * 3 + 5), now), 3);
        assert_eq!(days_left(now + Duration::from_secs(100), now), 0);
        assert_eq!(days_left(now - Duration::from_secs(100), now), -1);
    }

    #[test]
    fn restart_only_settings_are_reported() {
        let text = |listen: &str, mtu: u16, body: &str| {
            format!(
                "[server]\nlisten = \"{listen}\"\nstate_dir = \"/tmp/mg-none\"\n[wireguard]\npublic_endpoint = \"gw.example.com:51820\"\naddress = \"10.99.0.1/24\"\nmtu = {mtu}\n[gateway]\nmax_body_bytes = {body}\n"
            )
        };
        let p = std::path::Path::new("/tmp/mg-none/modelgate.toml");
        let a = Config::from_toml_str(&text("0.0.0.0:443", 1420, "100000"), p).unwrap();
        let b = Config::from_toml_str(&text("0.0.0.0:8443", 1280, "200000"), p).unwrap();
        let r = needs_restart(&a, &b);
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0].starts_with("server.listen: 0.0.0.0:443 → 0.0.0.0:8443"));
        assert!(r[1].starts_with("wireguard.mtu: 1420 → 1280"));
        assert!(needs_restart(&a, &a).is_empty());
    }

    #[test]
    fn config_errors_become_lines() {
        assert_eq!(
            error_lines("invalid config x: 2 error(s):\n  a: 1\n\n  b: 2\n"),
            vec!["invalid config x: 2 error(s):", "a: 1", "b: 2"]
        );
    }
}
