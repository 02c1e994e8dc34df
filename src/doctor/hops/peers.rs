//! Hop 5: every WireGuard peer's latest handshake is fresh, as the daemon's status reports it.

use crate::config::{Config, DEFAULT_PEER_KEEPALIVE};
use crate::control::StatusReport;
use crate::doctor::{Hop, HopResult, REJECT_AFTER_TIME};

/// Hop 5.
pub(in crate::doctor) fn peers_hop(
    s: &StatusReport,
    config: &Config,
    max_age: Option<u64>,
) -> HopResult {
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
