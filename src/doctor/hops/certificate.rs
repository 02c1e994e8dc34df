//! Hop 3: the certificate the listener serves is valid for the public name, trusted, and not
//! near expiry (the judging is in [`crate::doctor::cert`]; this turns it into a verdict).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::config::Config;
use crate::doctor::cert::{self, CertReport, PinnedLeaf};
use crate::doctor::{tls_mode, Hop, HopResult};

/// Hop 3. Returns the verdict and the served leaf, which hops 4, 7 and 8 trust.
pub(in crate::doctor) async fn certificate_hop(
    config: &Config,
    target: Option<SocketAddr>,
    name: &str,
    ca_files: &[PathBuf],
    min_days: u32,
) -> (HopResult, Option<PinnedLeaf>) {
    let roots = cert::Roots::load(ca_files);
    match (target, roots) {
        (None, _) => (
            HopResult::skip(
                Hop::Certificate,
                "skipped: the daemon's HTTPS listener is not up (hop 2)",
            ),
            None,
        ),
        (Some(_), Err(e)) => (
            HopResult::fail(
                Hop::Certificate,
                e,
                "pass --ca-file a PEM file of CA certificates",
            ),
            None,
        ),
        (Some(t), Ok(roots)) => judge_served(config, t, name, &roots, min_days).await,
    }
}

/// Fetches the chain the listener serves and judges it.
async fn judge_served(
    config: &Config,
    target: SocketAddr,
    name: &str,
    roots: &cert::Roots,
    min_days: u32,
) -> (HopResult, Option<PinnedLeaf>) {
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
    let pin = PinnedLeaf(chain[0].clone());
    let verdict = match cert::analyse(&chain, name, roots, min_days, SystemTime::now()) {
        Err(e) => HopResult::fail(
            Hop::Certificate,
            e,
            "serve a valid X.509 certificate chain (PEM, leaf first)",
        ),
        Ok(r) => judge(config, name, &r),
    };
    (verdict, Some(pin))
}

/// The facts every verdict shows (names, issuer, expiry), then the problems, first one's fix.
fn judge(config: &Config, name: &str, r: &CertReport) -> HopResult {
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
        None => HopResult::pass(
            Hop::Certificate,
            format!("valid for {name}, trusted; {facts}"),
        ),
        Some(first) => {
            let all: Vec<String> = r.problems.iter().map(cert::Problem::describe).collect();
            HopResult::fail(
                Hop::Certificate,
                format!("{}; {facts}", all.join("; ")),
                first.fix(tls_mode(config), name),
            )
        }
    }
}
