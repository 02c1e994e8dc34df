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
//!
//! Files: this one runs the hops in order; `report.rs` is the result and its `--json` shape;
//! `hops/` holds one verdict per hop; `cert.rs`, `net.rs` and `probe.rs` do the looking (TLS
//! handshakes and certificate analysis, sockets and DNS, HTTP probes with the throwaway key).

pub mod cert;
mod hops;
pub mod net;
pub mod probe;
mod report;

pub use report::{Hop, HopResult, KeyNote, Outcome, Report};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::{Config, TlsConfig};

/// WireGuard's Reject-After-Time (whitepaper §6.1): a session older than this carries nothing.
pub const REJECT_AFTER_TIME: u64 = 180;
/// Default `--min-days`.
pub const DEFAULT_MIN_DAYS: u32 = 14;
/// Default `--timeout` for each probe of hops 7 and 8.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

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
    let config = match hops::config_hop(&opts.config) {
        Ok((pass, c)) => {
            report.hops.push(pass);
            c
        }
        Err((failure, invalid)) => {
            report.config_invalid = invalid;
            report.hops.push(failure);
            for h in &Hop::ALL[1..] {
                report
                    .hops
                    .push(HopResult::skip(*h, "skipped: needs a valid config (hop 1)"));
            }
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
    let (listener, status, target) = hops::listener_hop(&config, &socket).await;
    report.hops.push(listener);

    // 3. certificate, 4. dns
    let (certificate, pin) =
        hops::certificate_hop(&config, target, &name, &opts.ca_files, opts.min_days).await;
    report.hops.push(certificate);
    report
        .hops
        .push(hops::dns_hop(&config, &name, target, pin.as_ref()).await);

    // 5. peers, 6. upstreams: from the daemon's status
    match &status {
        None => {
            const NO_STATUS: &str = "skipped: needs the daemon's status (hop 2)";
            report.hops.push(HopResult::skip(Hop::Peers, NO_STATUS));
            report.hops.push(HopResult::skip(Hop::Upstreams, NO_STATUS));
        }
        Some(s) => {
            report
                .hops
                .push(hops::peers_hop(s, &config, opts.handshake_max_age));
            report.hops.push(hops::upstreams_hop(s));
        }
    }

    // 7. models, 8. completion
    hops::probe_hops(&mut report, &config, target, pin, &name, opts, interrupt).await;

    // 9. the shared store (only with [store] url)
    if config.store.is_shared() {
        report.hops.push(match &status {
            None => HopResult::skip(Hop::Store, "skipped: needs the daemon's status (hop 2)"),
            Some(s) => hops::store_hop(s),
        });
    }

    report.elapsed = started.elapsed();
    report
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
