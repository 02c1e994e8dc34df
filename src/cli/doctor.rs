//! `modelgate doctor [--json]`: runs the hop checks of [`crate::doctor`] and prints them as a
//! checklist (✓ pass, ✗ fail with its fix underneath, - skipped), or as JSON. Exit 0 when
//! nothing failed, 64 when the config is invalid (hop 1), 1 for any other failing hop.

use clap::Args;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{print_json, CliError};
use crate::doctor::{self, Options, Outcome, Report};

#[derive(Debug, Args)]
#[command(after_long_help = "\
Hops, in the order a request crosses them (the first failure is THE answer; later hops still
run when they can, so one run shows everything):
  1 config       the config loads and validates (exit 64 when it does not)
  2 listener     the daemon answers on its control socket and its HTTPS address accepts TCP
                 (\"listener port taken\" when the daemon is down and another program holds the port)
  3 certificate  the certificate served in a real TLS handshake is valid for the public name,
                 chains to a publicly trusted root (Mozilla's, plus --ca-file) and has at least
                 --min-days left; self-signed fails: Cursor will refuse it
  4 dns          the public name resolves to this host (skipped when no resolver answers)
  5 peers        every peer's latest handshake is at most 180 s + keepalive old
  6 upstreams    every upstream answered the daemon's last GET /models through the tunnel
  7 models       GET /v1/models through the public listener answers, with a throwaway key
  8 completion   one streamed 1-token chat completion through the whole public path
The throwaway key (doctor-XXXXXXXX, 10-minute expiry) is revoked when doctor ends, also on
failure, panic, SIGINT and SIGTERM. Probes trust only the certificate hop 3 saw.

Exit status: 0 nothing failed (skips allowed), 1 a hop failed, 64 invalid config.")]
pub struct DoctorArgs {
    /// Print {"ok", "first_failing_hop", "first_failure", "hops": [{"hop", "number", "title",
    /// "status", "ok", "detail", "fix"}…], "throwaway_key", "elapsed_ms"} (schema in the README).
    #[arg(long)]
    pub json: bool,
    /// The public name clients use (https://NAME/v1). Default: the [tls] ACME domain or
    /// self-signed name, else the host of wireguard.public_endpoint.
    #[arg(long, value_name = "DNSNAME")]
    pub name: Option<String>,
    /// Fail when the certificate has fewer days left than this.
    #[arg(long, value_name = "DAYS", default_value_t = doctor::DEFAULT_MIN_DAYS)]
    pub min_days: u32,
    /// Also trust this CA (PEM; repeatable): for private or test CAs. Cursor does not trust
    /// them, so a pass with --ca-file says nothing about Cursor.
    #[arg(long = "ca-file", value_name = "PEM")]
    pub ca_files: Vec<PathBuf>,
    /// Model for the streamed completion (default: the first one /v1/models lists).
    #[arg(long, value_name = "MODEL")]
    pub model: Option<String>,
    /// Bound of each request of hops 7 and 8.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration_arg)]
    pub timeout: Duration,
    /// Control socket (default: server.control_socket of the config).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Largest handshake age in seconds counted as fresh (default: 180 + the peer's keepalive).
    /// For tests and quick checks.
    #[arg(long, value_name = "SECONDS", hide = true)]
    pub handshake_max_age: Option<u64>,
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e}; fix: e.g. 30s or 2m"))?;
    if d.is_zero() {
        return Err("must be more than 0; fix: e.g. 30s".into());
    }
    Ok(d)
}

pub fn execute(config_path: &Path, a: DoctorArgs) -> Result<(), CliError> {
    let opts = Options {
        config: config_path.to_path_buf(),
        name: a.name,
        min_days: a.min_days,
        handshake_max_age: a.handshake_max_age,
        ca_files: a.ca_files,
        model: a.model,
        timeout: a.timeout,
        socket: a.socket,
    };
    let report = super::status::block_on(async {
        let interrupt = async {
            let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
            match term {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        doctor::run(&opts, interrupt).await
    })?;
    if a.json {
        print_json(&report.to_json());
    } else {
        print!("{}", render(&report));
    }
    match report.exit_code() {
        0 => Ok(()),
        code => {
            let message = match report.first_failure() {
                Some(h) => format!(
                    "doctor: hop {} ({}) failed: {}",
                    h.hop.number(),
                    h.hop,
                    h.detail
                ),
                None => "doctor: interrupted".to_string(),
            };
            Err(CliError { code, message })
        }
    }
}

/// The checklist.
pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "modelgate doctor: {}{}",
        r.config.display(),
        r.name
            .as_ref()
            .map(|n| format!(", public name {n}"))
            .unwrap_or_default()
    );
    for h in &r.hops {
        let mark = match h.outcome {
            Outcome::Pass => "✓",
            Outcome::Fail => "✗",
            Outcome::Skip => "-",
        };
        let _ = writeln!(
            o,
            "{mark} {} {:<12} {}",
            h.hop.number(),
            h.hop.id(),
            h.detail
        );
        if let Some(fix) = &h.fix {
            let _ = writeln!(o, "      fix: {fix}");
        }
    }
    if let Some(k) = &r.key {
        match &k.revoke_error {
            None => {
                let _ = writeln!(o, "throwaway key {} ({}) revoked", k.name, k.id);
            }
            Some(e) => {
                let _ = writeln!(o, "throwaway key {} ({}) NOT revoked: {e}; it expires within 10 minutes, or `modelgate key revoke {} --yes`", k.name, k.id, k.id);
            }
        }
    }
    let secs = r.elapsed.as_secs_f64();
    match r.first_failure() {
        Some(h) => {
            let _ = writeln!(
                o,
                "FAILED at hop {} ({}): {}\n  fix: {}  ({secs:.1} s)",
                h.hop.number(),
                h.hop,
                h.detail,
                h.fix.as_deref().unwrap_or("-")
            );
        }
        None if r.interrupted => {
            let _ = writeln!(o, "interrupted ({secs:.1} s)");
        }
        None => {
            let skipped = r.hops.iter().filter(|h| h.outcome == Outcome::Skip).count();
            let passed = r.hops.len() - skipped;
            let _ = writeln!(
                o,
                "OK: {passed} hops pass{} ({secs:.1} s)",
                if skipped > 0 {
                    format!(", {skipped} skipped")
                } else {
                    String::new()
                }
            );
        }
    }
    o
}
