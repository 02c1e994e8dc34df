//! `modelgate doctor`: checks every hop between a client on the internet and the model, in the
//! order a request crosses them, and names the first one that fails together with its fix.
//!
//! | # | hop | passes when |
//! |---|---|---|
//! | 1 | `config` | the config file loads and validates |
//! | 2 | `listener` | the daemon answers on its control socket and its HTTPS address accepts TCP |
//! | 3 | `certificate` | the certificate served in a real handshake is valid for the public name, chains to a publicly trusted root, and has at least `--min-days` left |
//! | 4 | `dns` | the public name resolves to this host (skipped when no resolver answers) |
//! | 5 | `peers` | every peer's latest handshake is at most 180 s + its keepalive old |
//! | 6 | `upstreams` | every upstream answered the daemon's last `GET /models` through the tunnel |
//! | 7 | `models` | `GET /v1/models` through the public listener answers 200 with a throwaway key |
//! | 8 | `completion` | a streamed 1-token chat completion through the whole path ends with `[DONE]` |
//!
//! Every hop whose prerequisites hold is run even after an earlier one failed (a self-signed
//! certificate fails hop 3, yet the probes of hops 7 and 8 still run, trusting that one served
//! certificate), so one run shows everything that is wrong; the *first* failure is the answer,
//! because later failures are often its consequences. A hop whose prerequisite is missing (no
//! daemon: no peers to read) is reported as skipped with the reason. A skip is not a failure.
//!
//! Never changes the appliance: the only write is the throwaway key (created, then revoked).

pub mod cert;
pub mod net;
pub mod probe;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::config::{Config, ConfigError, TlsConfig, DEFAULT_PEER_KEEPALIVE};
use crate::control::{client, client::ClientError, StatusReport};

/// WireGuard's Reject-After-Time (whitepaper §6.1): a session older than this carries nothing.
pub const REJECT_AFTER_TIME: u64 = 180;
/// Default `--min-days`.
pub const DEFAULT_MIN_DAYS: u32 = 14;
/// Default `--timeout` for each probe of hops 7 and 8.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One hop of the path, in the order a request crosses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hop {
    Config,
    Listener,
    Certificate,
    Dns,
    Peers,
    Upstreams,
    Models,
    Completion,
}

impl Hop {
    pub const ALL: [Hop; 8] = [
        Hop::Config,
        Hop::Listener,
        Hop::Certificate,
        Hop::Dns,
        Hop::Peers,
        Hop::Upstreams,
        Hop::Models,
        Hop::Completion,
    ];

    pub fn number(self) -> usize {
        Hop::ALL
            .iter()
            .position(|h| *h == self)
            .map_or(0, |i| i + 1)
    }

    /// The stable identifier used in `--json` (`"listener"`, …).
    pub fn id(self) -> &'static str {
        match self {
            Hop::Config => "config",
            Hop::Listener => "listener",
            Hop::Certificate => "certificate",
            Hop::Dns => "dns",
            Hop::Peers => "peers",
            Hop::Upstreams => "upstreams",
            Hop::Models => "models",
            Hop::Completion => "completion",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Hop::Config => "config valid",
            Hop::Listener => "daemon running, HTTPS listener bound",
            Hop::Certificate => "certificate valid, trusted, not near expiry",
            Hop::Dns => "public name resolves to this host",
            Hop::Peers => "WireGuard peers' handshakes fresh",
            Hop::Upstreams => "upstreams reachable through the tunnel",
            Hop::Models => "GET /v1/models answers",
            Hop::Completion => "streamed completion through the public path",
        }
    }
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

/// The verdict on one hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopResult {
    pub hop: Hop,
    pub outcome: Outcome,
    /// One line: what was seen.
    pub detail: String,
    /// What to do; only for a failure.
    pub fix: Option<String>,
}

impl HopResult {
    fn pass(hop: Hop, detail: impl Into<String>) -> Self {
        HopResult {
            hop,
            outcome: Outcome::Pass,
            detail: detail.into(),
            fix: None,
        }
    }
    fn fail(hop: Hop, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        HopResult {
            hop,
            outcome: Outcome::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn skip(hop: Hop, why: impl Into<String>) -> Self {
        HopResult {
            hop,
            outcome: Outcome::Skip,
            detail: why.into(),
            fix: None,
        }
    }

    /// `{"hop","number","title","status","ok","detail","fix"}`; `ok` is null for a skip.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "hop": self.hop.id(),
            "number": self.hop.number(),
            "title": self.hop.title(),
            "status": self.outcome,
            "ok": match self.outcome {
                Outcome::Pass => serde_json::Value::Bool(true),
                Outcome::Fail => serde_json::Value::Bool(false),
                Outcome::Skip => serde_json::Value::Null,
            },
            "detail": self.detail,
            "fix": self.fix,
        })
    }
}

/// What doctor was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    /// The name clients use (`https://NAME/v1`); default: see [`public_name`].
    pub name: Option<String>,
    pub min_days: u32,
    /// Overrides 180 s + keepalive (tests, impatient operators).
    pub handshake_max_age: Option<u64>,
    /// Extra trust anchors (private CAs, test CAs).
    pub ca_files: Vec<PathBuf>,
    /// Model for hop 8; default: the first one `/v1/models` lists.
    pub model: Option<String>,
    /// Bound of each probe of hops 7 and 8.
    pub timeout: Duration,
    /// Control socket; default `server.control_socket`.
    pub socket: Option<PathBuf>,
}

/// The throwaway key of hops 7–8, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyNote {
    pub name: String,
    pub id: String,
    pub revoked: bool,
    pub revoke_error: Option<String>,
}

/// Everything doctor found.
#[derive(Debug, Clone)]
pub struct Report {
    pub config: PathBuf,
    /// The public name checked (`None` when the config did not load).
    pub name: Option<String>,
    pub hops: Vec<HopResult>,
    pub key: Option<KeyNote>,
    pub elapsed: Duration,
    /// True when hop 1 failed because the file is invalid (exit 64), not unreadable (exit 1).
    pub config_invalid: bool,
    /// SIGINT/SIGTERM arrived during the probes (the key was still revoked).
    pub interrupted: bool,
}

impl Report {
    /// THE answer: the first hop that failed.
    pub fn first_failure(&self) -> Option<&HopResult> {
        self.hops.iter().find(|h| h.outcome == Outcome::Fail)
    }

    /// 0 all pass (skips allowed), 64 invalid config, 1 any other failure.
    pub fn exit_code(&self) -> u8 {
        match self.first_failure() {
            None if !self.interrupted => 0,
            Some(h) if h.hop == Hop::Config && self.config_invalid => 64,
            _ => 1,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": self.exit_code() == 0,
            "first_failure": self.first_failure().map(HopResult::to_json),
            "first_failing_hop": self.first_failure().map(|h| h.hop.id()),
            "config": self.config.display().to_string(),
            "name": self.name,
            "hops": self.hops.iter().map(HopResult::to_json).collect::<Vec<_>>(),
            "throwaway_key": self.key.as_ref().map(|k| serde_json::json!({
                "name": k.name, "id": k.id, "revoked": k.revoked, "revoke_error": k.revoke_error,
            })),
            "elapsed_ms": self.elapsed.as_millis() as u64,
            "interrupted": self.interrupted,
        })
    }
}

/// The public name to check: `--name`, else the `[tls]` name (ACME domain, self-signed name),
/// else the host of `wireguard.public_endpoint` (the name the corp side dials, usually the
/// same DNS name clients use).
pub fn public_name(flag: Option<&str>, config: &Config) -> String {
    if let Some(n) = flag {
        return n.to_string();
    }
    match &config.tls {
        Some(TlsConfig::Acme { domain, .. }) => return domain.clone(),
        Some(TlsConfig::SelfSigned { name }) => return name.clone(),
        _ => {}
    }
    endpoint_host(&config.wireguard.public_endpoint)
}

/// `HOST` of `HOST:PORT` / `[V6]:PORT`.
fn endpoint_host(ep: &str) -> String {
    if let Ok(sa) = ep.parse::<SocketAddr>() {
        return sa.ip().to_string();
    }
    ep.rsplit_once(':')
        .map_or(ep, |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_string()
}

fn tls_mode(config: &Config) -> &'static str {
    match &config.tls {
        Some(TlsConfig::Files { .. }) => "files",
        Some(TlsConfig::SelfSigned { .. }) => "self-signed",
        Some(TlsConfig::Acme { .. }) => "acme",
        None => "none",
    }
}

/// Splits `problem; fix: fix` messages (the crate's error style) into detail and fix.
fn split_fix(message: &str) -> (String, Option<String>) {
    match message.split_once("; fix: ") {
        Some((d, f)) => (d.to_string(), Some(f.to_string())),
        None => (message.to_string(), None),
    }
}

/// Runs every hop. `interrupt` resolves when the run must stop early (SIGINT/SIGTERM); the
/// throwaway key is revoked then too.
pub async fn run(opts: &Options, interrupt: impl std::future::Future<Output = ()>) -> Report {
    let started = Instant::now();
    let mut hops = Vec::new();
    let mut report = Report {
        config: opts.config.clone(),
        name: None,
        hops: Vec::new(),
        key: None,
        elapsed: Duration::ZERO,
        config_invalid: false,
        interrupted: false,
    };

    // 1. config
    let config = match Config::load(&opts.config) {
        Ok(c) => {
            hops.push(HopResult::pass(
                Hop::Config,
                format!(
                    "{}: {} peer(s), {} upstream(s), tls {}",
                    c.path.display(),
                    c.peers.len(),
                    c.upstreams.len(),
                    tls_mode(&c)
                ),
            ));
            c
        }
        Err(e) => {
            report.config_invalid = !e.is_read_error();
            hops.push(config_failure(&e));
            for h in &Hop::ALL[1..] {
                hops.push(HopResult::skip(*h, "skipped: needs a valid config (hop 1)"));
            }
            report.hops = hops;
            report.elapsed = started.elapsed();
            return report;
        }
    };
    let name = public_name(opts.name.as_deref(), &config);
    report.name = Some(name.clone());

    // 2. listener
    let socket = opts
        .socket
        .clone()
        .unwrap_or_else(|| config.server.control_socket.clone());
    let (listener, status, target) = listener_hop(&config, &socket).await;
    hops.push(listener);

    // 3. certificate
    let roots = cert::Roots::load(&opts.ca_files);
    let mut pin = None;
    match (&target, roots) {
        (None, _) => hops.push(HopResult::skip(
            Hop::Certificate,
            "skipped: the daemon's HTTPS listener is not up (hop 2)",
        )),
        (Some(_), Err(e)) => hops.push(HopResult::fail(
            Hop::Certificate,
            e,
            "pass --ca-file a PEM file of CA certificates",
        )),
        (Some(t), Ok(roots)) => {
            let (h, p) = certificate_hop(&config, *t, &name, &roots, opts.min_days).await;
            hops.push(h);
            pin = p;
        }
    }

    // 4. dns
    hops.push(dns_hop(&config, &name, target, pin.as_ref()).await);

    // 5. peers, 6. upstreams
    match &status {
        None => {
            hops.push(HopResult::skip(
                Hop::Peers,
                "skipped: needs the daemon's status (hop 2)",
            ));
            hops.push(HopResult::skip(
                Hop::Upstreams,
                "skipped: needs the daemon's status (hop 2)",
            ));
        }
        Some(s) => {
            hops.push(peers_hop(s, &config, opts.handshake_max_age));
            hops.push(upstreams_hop(s, &config));
        }
    }

    // 7. models, 8. completion
    match (target, pin) {
        (Some(addr), Some(pin)) => {
            let t = probe::Target {
                addr,
                name: name.clone(),
                pin,
                timeout: opts.timeout,
            };
            let mut key = None;
            let mut done7 = None;
            let probes = probe_hops(&config, &t, opts.model.as_deref(), &mut key, &mut done7);
            let (h7, h8) = tokio::select! {
                r = probes => r,
                _ = interrupt => {
                    // A hop cut short was not judged: skipped, not failed (the run exits 1).
                    report.interrupted = true;
                    const CUT: &str = "skipped: interrupted (SIGINT/SIGTERM) before it finished";
                    (
                        done7.take().unwrap_or_else(|| HopResult::skip(Hop::Models, CUT)),
                        HopResult::skip(Hop::Completion, CUT),
                    )
                }
            };
            hops.push(h7);
            hops.push(h8);
            if let Some(mut k) = key {
                let revoke_error = k.revoke().err();
                report.key = Some(KeyNote {
                    name: k.name.clone(),
                    id: k.id.clone(),
                    revoked: k.is_revoked(),
                    revoke_error,
                });
            }
        }
        _ => {
            let why = if target.is_none() {
                "skipped: the daemon's HTTPS listener is not up (hop 2)"
            } else {
                "skipped: no certificate could be fetched from the listener (hop 3)"
            };
            hops.push(HopResult::skip(Hop::Models, why));
            hops.push(HopResult::skip(Hop::Completion, why));
        }
    }

    report.hops = hops;
    report.elapsed = started.elapsed();
    report
}

fn config_failure(e: &ConfigError) -> HopResult {
    match e {
        ConfigError::Invalid { path, errors } => HopResult::fail(
            Hop::Config,
            format!(
                "{} is invalid: {}",
                path.display(),
                errors
                    .iter()
                    .map(|e| format!("{}: {}: {}", e.key, e.value, e.problem))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            errors
                .iter()
                .map(|e| format!("{}: {}", e.key, e.fix))
                .collect::<Vec<_>>()
                .join("; ")
                + "; then `modelgate reload` (or restart the daemon)",
        ),
        e => {
            let (detail, fix) = split_fix(&e.to_string());
            HopResult::fail(
                Hop::Config,
                detail,
                fix.unwrap_or_else(|| "correct the config file".into()),
            )
        }
    }
}

/// Hop 2. Returns the verdict, the daemon's status (when it answered) and the address the
/// HTTPS listener accepts on (when it does and it is the daemon's).
async fn listener_hop(
    config: &Config,
    socket: &std::path::Path,
) -> (HopResult, Option<StatusReport>, Option<SocketAddr>) {
    let configured = config.server.listen;
    match client::status(socket).await {
        Ok(s) => {
            // The daemon on this socket must run this config: hops 5-8 mix its state with this
            // file's (key store, names) otherwise.
            let same = |a: &std::path::Path, b: &std::path::Path| match (
                a.canonicalize(),
                b.canonicalize(),
            ) {
                (Ok(a), Ok(b)) => a == b,
                _ => std::path::absolute(a).ok() == std::path::absolute(b).ok(),
            };
            if !same(std::path::Path::new(&s.config), &config.path) {
                let runs = s.config.clone();
                return (
                    HopResult::fail(
                        Hop::Listener,
                        format!(
                            "the daemon on {} (pid {}) runs {runs}, not {}",
                            socket.display(),
                            s.pid,
                            config.path.display()
                        ),
                        format!("check that one: `modelgate --config {runs} doctor`; or give this config its own server.control_socket"),
                    ),
                    None,
                    None,
                );
            }
            let Some(https) = &s.https else {
                return (
                    HopResult::fail(
                        Hop::Listener,
                        format!("the daemon (pid {}) runs without HTTPS: its config has no [tls]", s.pid),
                        "add a [tls] table (e.g. `modelgate init --force --acme-domain NAME …`, or mode = \"files\" with cert and key) and restart modelgate",
                    ),
                    Some(s),
                    None,
                );
            };
            let listen = https.listen.parse::<SocketAddr>().unwrap_or(configured);
            let target = net::dial_target(listen);
            match net::accepts(target).await {
                Ok(()) => {
                    let mut detail = format!(
                        "daemon pid {} (up {} s) accepts HTTPS on {listen}",
                        s.pid, s.uptime_seconds
                    );
                    // Port 0 in the config means "any" (tests): the daemon's real port differs.
                    if listen != configured && configured.port() != 0 {
                        detail.push_str(&format!(
                            " (the config says {configured}: restart to apply it)"
                        ));
                    }
                    (HopResult::pass(Hop::Listener, detail), Some(s), Some(target))
                }
                Err(e) => (
                    HopResult::fail(
                        Hop::Listener,
                        format!("the daemon (pid {}) runs but its HTTPS listener {listen} does not accept connections from here ({target}): {e}", s.pid),
                        "read `journalctl -u modelgate` (a full accept queue, a firewall on this host?) and restart modelgate",
                    ),
                    Some(s),
                    None,
                ),
            }
        }
        Err(ClientError::NotRunning { path, source }) => {
            let target = net::dial_target(configured);
            match net::accepts(target).await {
                Ok(()) => {
                    let owners = net::port_owners(configured.port());
                    let who = if owners.is_empty() {
                        "another program".to_string()
                    } else {
                        owners
                            .iter()
                            .map(|o| format!("pid {} ({})", o.pid, o.command))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    (
                        HopResult::fail(
                            Hop::Listener,
                            format!(
                                "listener port taken: the modelgate daemon is not running (no answer on {}) and {who} listens on {configured}",
                                path.display()
                            ),
                            format!(
                                "stop {who} (or move modelgate with server.listen), then start modelgate: `systemctl start modelgate`"
                            ),
                        ),
                        None,
                        None,
                    )
                }
                Err(_) => (
                    HopResult::fail(
                        Hop::Listener,
                        format!(
                            "the modelgate daemon is not running: no answer on {} ({source}) and nothing listens on {configured}",
                            path.display()
                        ),
                        "start it: `systemctl start modelgate` (or `modelgate run`); `journalctl -u modelgate` says why it stopped",
                    ),
                    None,
                    None,
                ),
            }
        }
        Err(e) => {
            let (detail, fix) = split_fix(&e.to_string());
            (
                HopResult::fail(
                    Hop::Listener,
                    detail,
                    fix.unwrap_or_else(|| {
                        "read `journalctl -u modelgate`; restart the daemon if it is stuck".into()
                    }),
                ),
                None,
                None,
            )
        }
    }
}

/// Hop 3.
async fn certificate_hop(
    config: &Config,
    target: SocketAddr,
    name: &str,
    roots: &cert::Roots,
    min_days: u32,
) -> (HopResult, Option<cert::PinnedLeaf>) {
    let chain = match cert::fetch_chain(target, name).await {
        Ok(c) => c,
        Err(e) => return (
            HopResult::fail(
                Hop::Certificate,
                e,
                "read `journalctl -u modelgate` for the TLS error (certificate files, key mode)",
            ),
            None,
        ),
    };
    let pin = cert::PinnedLeaf(chain[0].clone());
    match cert::analyse(&chain, name, roots, min_days, SystemTime::now()) {
        Err(e) => (
            HopResult::fail(
                Hop::Certificate,
                e,
                "serve a valid X.509 certificate chain (PEM, leaf first)",
            ),
            Some(pin),
        ),
        Ok(r) => {
            let left = if r.days_left < 0 {
                format!("expired {} days ago", -r.days_left)
            } else {
                format!("{} days left", r.days_left)
            };
            let facts = format!(
                "served for {} by {}, expires {} ({left})",
                if r.names.is_empty() {
                    r.subject.clone()
                } else {
                    r.names.join(", ")
                },
                r.issuer,
                r.not_after,
            );
            match r.problems.first() {
                None => (
                    HopResult::pass(
                        Hop::Certificate,
                        format!("valid for {name}, trusted; {facts}"),
                    ),
                    Some(pin),
                ),
                Some(first) => {
                    let all: Vec<String> = r.problems.iter().map(cert::Problem::describe).collect();
                    (
                        HopResult::fail(
                            Hop::Certificate,
                            format!("{}; {facts}", all.join("; ")),
                            first.fix(tls_mode(config), name),
                        ),
                        Some(pin),
                    )
                }
            }
        }
    }
}

/// Hop 4. The resolved addresses must include one of this host's: an interface address, the
/// listen address, or the IP of `wireguard.public_endpoint`. Behind 1:1 NAT (cloud VMs) the
/// public address is on no interface; then an address that serves the very certificate of hop 3
/// on the listener's port counts as this host.
async fn dns_hop(
    config: &Config,
    name: &str,
    target: Option<SocketAddr>,
    pin: Option<&cert::PinnedLeaf>,
) -> HopResult {
    let addrs = match net::resolve(name).await {
        net::Resolved::Unreachable(why) => {
            return HopResult::skip(
                Hop::Dns,
                format!("skipped: no resolver answered for {name} ({why}): DNS is not reachable from here, so this hop is not judged"),
            )
        }
        net::Resolved::NotFound(why) => {
            return HopResult::fail(
                Hop::Dns,
                format!("{name} does not resolve: {why}"),
                format!("create a DNS A/AAAA record for {name} pointing at this host's public address (or pass the name clients use with --name)"),
            )
        }
        net::Resolved::Addresses(a) => a,
    };
    let shown = addrs
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut mine: Vec<IpAddr> = net::local_addresses();
    if !config.server.listen.ip().is_unspecified() {
        mine.push(config.server.listen.ip());
    }
    if let Ok(ip) = endpoint_host(&config.wireguard.public_endpoint).parse::<IpAddr>() {
        mine.push(ip);
    }
    if let Some(hit) = addrs.iter().find(|a| mine.contains(a)) {
        return HopResult::pass(Hop::Dns, format!("{name} → {shown} ({hit} is this host)"));
    }
    // NAT: does the resolved address serve our certificate?
    if let (Some(t), Some(pin)) = (target, pin) {
        for a in &addrs {
            let sa = SocketAddr::new(*a, t.port());
            if let Ok(chain) = cert::fetch_chain(sa, name).await {
                if chain.first().map(|c| c.as_ref()) == Some(pin.0.as_ref()) {
                    return HopResult::pass(
                        Hop::Dns,
                        format!("{name} → {shown} ({sa} serves this listener's certificate: NAT or forwarding)"),
                    );
                }
            }
        }
    }
    let mut local: Vec<String> = mine
        .iter()
        .filter(|a| !a.is_loopback())
        .map(IpAddr::to_string)
        .collect();
    local.sort();
    local.dedup();
    HopResult::fail(
        Hop::Dns,
        format!(
            "{name} → {shown}, which is not this host (its addresses: {})",
            if local.is_empty() { "none".to_string() } else { local.join(", ") }
        ),
        format!("point the DNS record of {name} at this host's public address; behind NAT, forward TCP port {} of that address to this host", config.server.listen.port()),
    )
}

/// Hop 5.
fn peers_hop(s: &StatusReport, config: &Config, max_age: Option<u64>) -> HopResult {
    if s.peers.is_empty() {
        return HopResult::fail(
            Hop::Peers,
            "no WireGuard peers configured: nothing connects the appliance to the model",
            "add the corp side: `modelgate peer add corp --allowed-ips LAN_CIDR` and run the wg-quick file it prints there",
        );
    }
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for p in &s.peers {
        let keepalive = p
            .persistent_keepalive
            .or_else(|| config.peer(&p.name).and_then(|c| c.keepalive))
            .unwrap_or(DEFAULT_PEER_KEEPALIVE);
        let limit = max_age.unwrap_or(REJECT_AFTER_TIME + u64::from(keepalive));
        match p.latest_handshake_seconds_ago {
            Some(age) if age <= limit => ok.push(format!("{} {age} s ago", p.name)),
            Some(age) => bad.push(format!(
                "{}: latest handshake {age} s ago (more than {limit} s)",
                p.name
            )),
            None => bad.push(format!("{}: no handshake since the daemon started", p.name)),
        }
    }
    if bad.is_empty() {
        return HopResult::pass(Hop::Peers, format!("latest handshakes: {}", ok.join(", ")));
    }
    HopResult::fail(
        Hop::Peers,
        bad.join("; "),
        format!(
            "on the corp side: is its WireGuard up (`wg show` there: latest handshake, transfer)? it must reach UDP {} (outbound), and its config must be this appliance's (`modelgate peer config NAME`)",
            config.wireguard.public_endpoint
        ),
    )
}

/// Hop 6.
fn upstreams_hop(s: &StatusReport, config: &Config) -> HopResult {
    if s.upstreams.is_empty() {
        return HopResult::fail(
            Hop::Upstreams,
            "no upstreams configured: no model to route to",
            "add the model server: `modelgate upstream add NAME --url http://IP:PORT/v1`",
        );
    }
    let (up, down): (Vec<_>, Vec<_>) = s.upstreams.iter().partition(|u| u.reachable);
    if down.is_empty() {
        return HopResult::pass(
            Hop::Upstreams,
            up.iter()
                .map(|u| format!("{} ({} model(s))", u.name, u.models.len()))
                .collect::<Vec<_>>()
                .join(", ")
                + " reachable",
        );
    }
    let _ = config;
    HopResult::fail(
        Hop::Upstreams,
        down.iter()
            .map(|u| format!("{} at {}: its last GET /models through the tunnel failed", u.name, u.url))
            .collect::<Vec<_>>()
            .join("; "),
        format!(
            "check that the model server runs and answers on the corp side (`curl {}/models` there), that the corp peer forwards to it (PostUp of `modelgate peer config NAME`), and that the peer's allowed IPs cover it",
            down[0].url.trim_end_matches('/')
        ),
    )
}

/// Hops 7 and 8. `key` receives the throwaway key so the caller revokes it whatever happens;
/// `done7` hop 7's verdict as soon as it is known (kept when hop 8 is interrupted).
async fn probe_hops(
    config: &Config,
    t: &probe::Target,
    model: Option<&str>,
    key: &mut Option<probe::ThrowawayKey>,
    done7: &mut Option<HopResult>,
) -> (HopResult, HopResult) {
    let k = match probe::ThrowawayKey::create(&config.server.state_dir) {
        Ok(k) => key.insert(k),
        Err(e) => {
            return (
                HopResult::fail(
                    Hop::Models,
                    format!("cannot create a throwaway key: {e}"),
                    "run doctor as root or as the modelgate user (it writes a short-lived key to server.state_dir/keys.db)",
                ),
                HopResult::skip(Hop::Completion, "skipped: no throwaway key (hop 7)"),
            )
        }
    };
    let secret = k.secret().to_string();
    let models = match probe::models(t, &secret).await {
        Ok(m) => m,
        Err(f) => {
            return (
                HopResult::fail(Hop::Models, f.detail, f.fix),
                HopResult::skip(Hop::Completion, "skipped: GET /v1/models failed (hop 7)"),
            )
        }
    };
    let h7 = if models.is_empty() {
        HopResult::fail(
            Hop::Models,
            "GET /v1/models answered 200 with no models",
            "no upstream has models yet: give the upstream --model routes, or make its GET /v1/models answer (see hop 6)",
        )
    } else {
        HopResult::pass(
            Hop::Models,
            format!("200 with {} model(s): {}", models.len(), models.join(", ")),
        )
    };
    *done7 = Some(h7.clone());
    let Some(model) = model
        .map(str::to_string)
        .or_else(|| models.first().cloned())
    else {
        return (
            h7,
            HopResult::skip(Hop::Completion, "skipped: no model to ask (hop 7)"),
        );
    };
    let h8 = match probe::completion(t, &secret, &model).await {
        Ok(s) => HopResult::pass(
            Hop::Completion,
            format!(
                "{model}: {} chunk(s), first after {} ms, [DONE] after {} ms",
                s.chunks, s.first_chunk_ms, s.total_ms
            ),
        ),
        Err(f) => HopResult::fail(Hop::Completion, f.detail, f.fix),
    };
    (h7, h8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_hosts() {
        assert_eq!(endpoint_host("gw.example.com:51820"), "gw.example.com");
        assert_eq!(endpoint_host("192.0.2.1:51820"), "192.0.2.1");
        assert_eq!(endpoint_host("[2001:db8::1]:51820"), "2001:db8::1");
    }

    #[test]
    fn hops_are_numbered_in_path_order() {
        assert_eq!(Hop::Config.number(), 1);
        assert_eq!(Hop::Completion.number(), 8);
        assert_eq!(serde_json::to_value(Hop::Dns).unwrap(), "dns");
    }

    #[test]
    fn first_failure_and_exit_codes() {
        let mut r = Report {
            config: "/x".into(),
            name: Some("gw.test".into()),
            hops: vec![
                HopResult::pass(Hop::Config, "ok"),
                HopResult::pass(Hop::Listener, "ok"),
                HopResult::skip(Hop::Dns, "no dns"),
            ],
            key: None,
            elapsed: Duration::ZERO,
            config_invalid: false,
            interrupted: false,
        };
        assert_eq!(r.exit_code(), 0);
        assert!(r.first_failure().is_none());
        r.hops.push(HopResult::fail(Hop::Peers, "stale", "fix it"));
        r.hops
            .push(HopResult::fail(Hop::Completion, "502", "later"));
        assert_eq!(r.first_failure().unwrap().hop, Hop::Peers);
        assert_eq!(r.exit_code(), 1);
        let j = r.to_json();
        assert_eq!(j["first_failing_hop"], "peers");
        assert_eq!(j["hops"][2]["ok"], serde_json::Value::Null);
        assert_eq!(j["hops"][3]["ok"], false);
        assert_eq!(j["hops"][3]["fix"], "fix it");
        r.hops.insert(0, HopResult::fail(Hop::Config, "bad", "fix"));
        r.config_invalid = true;
        assert_eq!(r.exit_code(), 64);
    }

    #[tokio::test]
    async fn an_invalid_config_is_hop_one_and_exit_64() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("modelgate.toml");
        std::fs::write(&cfg, "[server]\nbogus = 1\n").unwrap();
        let opts = Options {
            config: cfg.clone(),
            name: None,
            min_days: DEFAULT_MIN_DAYS,
            handshake_max_age: None,
            ca_files: vec![],
            model: None,
            timeout: DEFAULT_TIMEOUT,
            socket: None,
        };
        let r = run(&opts, std::future::pending()).await;
        assert_eq!(r.first_failure().unwrap().hop, Hop::Config);
        assert_eq!(r.exit_code(), 64);
        assert!(r.hops[1..].iter().all(|h| h.outcome == Outcome::Skip));
        let missing = Options {
            config: dir.path().join("nope.toml"),
            ..opts
        };
        let r = run(&missing, std::future::pending()).await;
        assert_eq!(r.exit_code(), 1);
        assert!(r.hops[0].fix.as_deref().unwrap().contains("modelgate init"));
    }
}
