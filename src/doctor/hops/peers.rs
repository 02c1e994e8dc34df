//! Hop 5: every WireGuard peer is up, as the daemon's status reports it: heard from recently
//! (keepalives count; a silent peer is down however young its last handshake) and with a
//! fresh handshake.

use crate::config::{Config, DEFAULT_PEER_KEEPALIVE};
use crate::control::{PeerStatus, StatusReport};
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
    let mut silent = false;
    for p in &s.peers {
        match verdict(p, config, max_age) {
            Ok(line) => ok.push(line),
            Err((line, is_silent)) => {
                silent |= is_silent;
                bad.push(line);
            }
        }
    }
    if bad.is_empty() {
        return HopResult::pass(Hop::Peers, format!("latest handshakes: {}", ok.join(", ")));
    }
    let endpoint = &config.wireguard.public_endpoint;
    let fix = if silent {
        format!(
            "the corp side's WireGuard is down, or its NAT/firewall drops its UDP to {endpoint}: on the corp router check that the interface is up and `wg show` there (latest handshake, transfer growing), that it may send UDP to {endpoint} and receive the replies, and that its config is this appliance's (`modelgate peer config NAME`)"
        )
    } else {
        format!(
            "on the corp side: is its WireGuard up (`wg show` there: latest handshake, transfer)? it must reach UDP {endpoint} (outbound), and its config must be this appliance's (`modelgate peer config NAME`)"
        )
    };
    HopResult::fail(Hop::Peers, bad.join("; "), fix)
}

/// One peer: its pass line, or its failure line and whether the failure is silence.
fn verdict(
    p: &PeerStatus,
    config: &Config,
    max_age: Option<u64>,
) -> Result<String, (String, bool)> {
    let keepalive = p
        .persistent_keepalive
        .or_else(|| config.peer(&p.name).and_then(|c| c.keepalive))
        .unwrap_or(DEFAULT_PEER_KEEPALIVE);
    if p.state == "silent" {
        let quiet = p
            .last_received_seconds_ago
            .map_or_else(|| "long".to_string(), |s| format!("{s} s"));
        let since = p
            .silent_since_unix
            .map(|t| crate::civil::rfc3339_unix(i64::try_from(t).unwrap_or(i64::MAX)))
            .unwrap_or_else(|| "(unknown)".into());
        return Err((
            format!(
                "{}: silent since {since} ({quiet}: nothing received, not even the keepalive it sends every {keepalive} s; down after {} s)",
                p.name, p.silent_after_seconds
            ),
            true,
        ));
    }
    let limit = max_age.unwrap_or(REJECT_AFTER_TIME + u64::from(keepalive));
    match p.latest_handshake_seconds_ago {
        Some(age) if age <= limit => Ok(match p.last_received_seconds_ago {
            Some(rx) => format!("{} {age} s ago (last packet {rx} s ago)", p.name),
            None => format!("{} {age} s ago", p.name),
        }),
        Some(age) => Err((
            format!(
                "{}: latest handshake {age} s ago (more than {limit} s)",
                p.name
            ),
            false,
        )),
        None => Err((
            format!("{}: no handshake since the daemon started", p.name),
            false,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::InterfaceStatus;
    use crate::doctor::Outcome;
    use std::path::Path;

    const CONFIG: &str = r#"
[server]
listen = "0.0.0.0:8443"
[wireguard]
public_endpoint = "gw.example.com:51820"
address = "10.99.0.1/24"
[[peer]]
name = "corp"
public_key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
tunnel_address = "10.99.0.2"
allowed_ips = ["10.20.0.0/24", "10.99.0.2/32"]
"#;

    fn status(peer: PeerStatus) -> StatusReport {
        StatusReport {
            version: "0".into(),
            pid: 1,
            uptime_seconds: 100,
            config: "/etc/modelgate/modelgate.toml".into(),
            interface: InterfaceStatus {
                public_key: "K=".into(),
                listen: "0.0.0.0:51820".into(),
                listen_port: 51820,
                address: "10.99.0.1/24".into(),
            },
            peers: vec![peer],
            upstreams: vec![],
            models: vec![],
            https: None,
            metrics_listen: None,
            streams: vec![],
            store: None,
        }
    }

    fn peer(state: &str, handshake: Option<u64>, received: Option<u64>) -> PeerStatus {
        PeerStatus {
            name: "corp".into(),
            public_key: "P=".into(),
            endpoint: Some("198.51.100.2:53737".into()),
            allowed_ips: vec![],
            latest_handshake_seconds_ago: handshake,
            latest_handshake_unix: None,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive: None,
            state: state.into(),
            last_received_seconds_ago: received,
            last_received_unix: None,
            silent_since_unix: (state == "silent").then_some(1_795_000_000),
            silent_after_seconds: 55,
        }
    }

    /// A peer silent for 62 s fails hop 5 although its handshake (76 s) is well within
    /// 180 s + keepalive, naming since when and the corp-side fix; an up peer passes; no
    /// handshake and an old one fail as before; a daemon without the state field is judged
    /// by the handshake alone.
    #[test]
    fn silence_fails_hop_5_with_the_corp_side_fix() {
        let config = Config::from_toml_str(CONFIG, Path::new("/etc/m.toml")).unwrap();
        let r = peers_hop(&status(peer("silent", Some(76), Some(62))), &config, None);
        assert_eq!(r.outcome, Outcome::Fail);
        let detail = r.detail.clone();
        assert!(
            detail.contains("corp: silent since 2026-11-18T11:06:40Z (62 s"),
            "{detail}"
        );
        assert!(detail.contains("every 25 s"), "{detail}");
        let fix = r.fix.clone().unwrap();
        assert!(
            fix.contains("WireGuard is down") && fix.contains("NAT/firewall"),
            "{fix}"
        );
        assert!(fix.contains("gw.example.com:51820"), "{fix}");

        let up = peers_hop(&status(peer("up", Some(76), Some(3))), &config, None);
        assert_eq!(up.outcome, Outcome::Pass, "{}", up.detail);
        assert!(
            up.detail.contains("corp 76 s ago (last packet 3 s ago)"),
            "{}",
            up.detail
        );

        let none = peers_hop(&status(peer("no_handshake", None, None)), &config, None);
        assert_eq!(none.outcome, Outcome::Fail);
        assert!(none
            .detail
            .contains("no handshake since the daemon started"));
        let old = peers_hop(&status(peer("up", Some(206), Some(1))), &config, None);
        assert_eq!(old.outcome, Outcome::Fail, "180 s + 25 s");
        let older_daemon = peers_hop(&status(peer("", Some(10), None)), &config, None);
        assert_eq!(older_daemon.outcome, Outcome::Pass);
    }
}
