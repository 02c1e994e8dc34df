//! `[[peer]]`: the corp WireGuard peers.
//!
//! Each peer needs a unique name, its own public key (never the appliance's) and its own usable
//! address in the tunnel network. Its allowed IPs follow the WireGuard paper §II ("cryptokey
//! routing"): each inner address must map to exactly one peer, so networks that overlap another
//! peer's, or the tunnel network, are refused instead of letting the last one silently win.
//! Never resolves a host name: endpoints are `IP:PORT`.

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use super::fields::q;
use super::names::{check_peer_name, NameRule};
use super::wireguard::{allocate_tunnel_address, usable_in};
use crate::config::raw::RawPeer;
use crate::config::{ConfigErrors, PeerConfig};
use crate::wgkey::PublicKey;

const NAMES: NameRule = NameRule {
    kind: "peer",
    check: check_peer_name,
    example: "corp",
    examples: "\"corp\" or \"site-2\"",
};

/// What the peers checked so far hold (by peer index), so that each later peer is checked
/// against them.
#[derive(Default)]
struct Claimed<'a> {
    names: HashMap<&'a str, usize>,
    keys: HashMap<PublicKey, usize>,
    addrs: HashMap<IpAddr, usize>,
    /// Every network behind a peer, to find overlaps across peers.
    networks: Vec<(usize, IpNet)>,
}

/// Validates every `[[peer]]` against the tunnel network (when `[wireguard] address` is
/// valid) and the appliance's own public key (when known). Peers with any bad field are left
/// out of the result; their errors are in `errs`.
pub(super) fn validate(
    errs: &mut ConfigErrors,
    raw: &[RawPeer],
    tunnel: Option<IpNet>,
    own_key: Option<&PublicKey>,
) -> Vec<PeerConfig> {
    let mut claimed = Claimed::default();
    let mut out = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        let key = |f: &str| NAMES.key(i, p.name.as_deref(), f);
        let before = errs.len();
        let name = NAMES.unique(errs, i, p.name.as_deref(), &mut claimed.names);
        let public_key = claimed.public_key(errs, &key("public_key"), i, p, own_key);
        let tunnel_address = claimed.tunnel_address(errs, &key("tunnel_address"), i, p, tunnel);
        let behind = networks_behind(errs, &key("allowed_ips"), p, tunnel_address, tunnel);
        claimed.networks(errs, &key("allowed_ips"), i, &behind, raw);
        let keepalive = keepalive(errs, &key("keepalive"), p.keepalive);
        let endpoint = endpoint(errs, &key("endpoint"), p.endpoint.as_deref());
        if errs.len() != before {
            continue;
        }
        if let (Some(name), Some(public_key), Some(tunnel_address)) =
            (name, public_key, tunnel_address)
        {
            let mut allowed_ips = vec![IpNet::from(tunnel_address)];
            allowed_ips.extend(behind);
            out.push(PeerConfig {
                name,
                public_key,
                tunnel_address,
                allowed_ips,
                keepalive,
                endpoint,
            });
        }
    }
    out
}

impl Claimed<'_> {
    /// `public_key`: present, a WireGuard key, not the appliance's own and not an earlier
    /// peer's. A reused key is reported and still returned (the peer's other fields are checked).
    fn public_key(
        &mut self,
        errs: &mut ConfigErrors,
        key: &str,
        i: usize,
        p: &RawPeer,
        own_key: Option<&PublicKey>,
    ) -> Option<PublicKey> {
        let Some(k) = p.public_key.as_deref() else {
            errs.push(
                key,
                "(missing)",
                "every peer needs a public key",
                "add public_key = \"<output of wg pubkey on the peer>\"",
            );
            return None;
        };
        let pk = match k.parse::<PublicKey>() {
            Ok(pk) => pk,
            Err(e) => {
                errs.push(
                    key,
                    q(k),
                    e.to_string(),
                    "paste the peer's `wg pubkey` output",
                );
                return None;
            }
        };
        if own_key == Some(&pk) {
            errs.push(
                key,
                q(k),
                "is the appliance's own public key",
                "use the corp peer's public key (`wg pubkey` on the peer)",
            );
        } else if let Some(first) = self.keys.insert(pk, i) {
            errs.push(
                key,
                q(k),
                format!("also used by peer #{}", first + 1),
                "each peer needs its own key pair; remove the duplicate",
            );
        }
        Some(pk)
    }

    /// `tunnel_address`: present, a bare IP address, and (when the tunnel network is known) a
    /// usable host of it that no earlier peer has. The fix names a free address when there is one.
    fn tunnel_address(
        &mut self,
        errs: &mut ConfigErrors,
        key: &str,
        i: usize,
        p: &RawPeer,
        tunnel: Option<IpNet>,
    ) -> Option<IpAddr> {
        let Some(a) = p.tunnel_address.as_deref() else {
            errs.push(
                key,
                "(missing)",
                "every peer needs a tunnel address",
                "add tunnel_address = \"10.99.0.2\" (or let `modelgate peer add` allocate one)",
            );
            return None;
        };
        let Ok(ip) = a.parse::<IpAddr>() else {
            let fix = if a.contains('/') {
                "write the bare address, without /PREFIX"
            } else {
                "write an IP address inside wireguard.address's network"
            };
            errs.push(key, q(a), "not an IP address", fix);
            return None;
        };
        let Some(t) = tunnel else {
            return Some(ip);
        };
        if !usable_in(&t, ip) {
            let problem = if ip == t.addr() {
                "is the appliance's own tunnel address".to_string()
            } else if t.trunc().contains(&ip) {
                format!("is the network or broadcast address of {}", t.trunc())
            } else {
                format!("is outside the tunnel network {}", t.trunc())
            };
            let fix = match allocate_tunnel_address(&t, self.addrs.keys().copied()) {
                Some(free) => format!("use a free address such as \"{free}\""),
                None => "widen wireguard.address's prefix".to_string(),
            };
            errs.push(key, q(a), problem, fix);
        } else if let Some(first) = self.addrs.insert(ip, i) {
            errs.push(
                key,
                q(a),
                format!("also used by peer #{}", first + 1),
                "give each peer its own tunnel address",
            );
        }
        Some(ip)
    }

    /// Refuses each of peer `i`'s networks `behind` that overlaps a network of an earlier peer
    /// (`raw` names it), then records them for the peers after it.
    fn networks(
        &mut self,
        errs: &mut ConfigErrors,
        key: &str,
        i: usize,
        behind: &[IpNet],
        raw: &[RawPeer],
    ) {
        for net in behind {
            if let Some((j, other)) = self.networks.iter().find(|(_, o)| overlaps(net, o)) {
                let other_name = raw[*j].name.as_deref().unwrap_or("?");
                errs.push(
                    key,
                    q(&net.to_string()),
                    format!("overlaps {other} of peer \"{other_name}\""),
                    "each address must route to one peer (WireGuard cryptokey routing); narrow or remove one of them",
                );
            }
        }
        self.networks.extend(behind.iter().map(|n| (i, *n)));
    }
}

/// The networks behind peer `p` from its `allowed_ips`: parsed, truncated to their network
/// (10.20.0.5/24 means 10.20.0.0/24, as `wg` itself reads it), without the peer's own host
/// route and duplicates. A network overlapping the tunnel network is refused.
fn networks_behind(
    errs: &mut ConfigErrors,
    key: &str,
    p: &RawPeer,
    tunnel_address: Option<IpAddr>,
    tunnel: Option<IpNet>,
) -> Vec<IpNet> {
    let own_host = tunnel_address.map(IpNet::from);
    let mut behind: Vec<IpNet> = Vec::new();
    for a in &p.allowed_ips {
        let Some(net) = parse_net(a) else {
            errs.push(
                key,
                q(a),
                "not a CIDR",
                "write networks behind the peer like \"10.20.0.0/24\"",
            );
            continue;
        };
        if Some(net) == own_host {
            continue; // The peer's own /32 is always included; listing it is harmless.
        }
        if let Some(t) = tunnel {
            if overlaps(&net, &t.trunc()) {
                errs.push(
                    key,
                    q(a),
                    format!("overlaps the tunnel network {}", t.trunc()),
                    "list only networks behind the peer; its tunnel address is routed to it automatically",
                );
                continue;
            }
        }
        if !behind.contains(&net) {
            behind.push(net);
        }
    }
    behind
}

/// An allowed IP as WireGuard reads it: a CIDR or a bare address (one host), truncated to
/// its network.
pub(super) fn parse_net(a: &str) -> Option<IpNet> {
    a.parse::<IpNet>()
        .or_else(|_| a.parse::<IpAddr>().map(IpNet::from))
        .ok()
        .map(|n| n.trunc())
}

/// True when `a` and `b` share at least one address.
fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn keepalive(errs: &mut ConfigErrors, key: &str, v: Option<i64>) -> Option<u16> {
    match v {
        None => None,
        Some(k) if (1..=65535).contains(&k) => Some(k as u16),
        Some(k) => {
            errs.push(
                key,
                k.to_string(),
                "must be 1..=65535 seconds",
                "use 25, or remove it to send no keepalives",
            );
            None
        }
    }
}

fn endpoint(errs: &mut ConfigErrors, key: &str, v: Option<&str>) -> Option<SocketAddr> {
    let e = v?;
    match e.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.push(
                key,
                q(e),
                "not an IP:PORT (host names are not resolved)",
                "write e.g. \"198.51.100.2:51820\", or remove it to learn the endpoint from the peer's packets",
            );
            None
        }
    }
}
