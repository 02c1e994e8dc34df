//! Hop 4: the public name resolves to this host (skipped when no resolver answers).

use std::net::{IpAddr, SocketAddr};

use crate::config::Config;
use crate::doctor::{cert, endpoint_host, net, Hop, HopResult};

/// Hop 4. The resolved addresses must include one of this host's: an interface address, the
/// listen address, or the IP of `wireguard.public_endpoint`. Behind 1:1 NAT (cloud VMs) the
/// public address is on no interface; then an address that serves the very certificate of hop 3
/// on the listener's port counts as this host.
pub(in crate::doctor) async fn dns_hop(
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
