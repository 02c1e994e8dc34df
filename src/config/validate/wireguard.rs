//! `[wireguard]`: the appliance's WireGuard interface, and the tunnel network arithmetic that
//! `[[peer]]` validation and `modelgate peer add` share (which addresses a peer may use, the
//! next free one). Never reads the private key file: only its path is resolved here.

use ipnet::IpNet;
use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::fields::{q, resolve, socket_addr};
use super::names::check_dns_name;
use crate::config::raw::RawWireguard;
use crate::config::{
    ConfigErrors, WireguardConfig, DEFAULT_MTU, DEFAULT_PRIVATE_KEY_FILE, DEFAULT_TUNNEL_ADDRESS,
    DEFAULT_WG_LISTEN,
};

/// Validates `[wireguard]` (`wg` is `None` when the table is absent: it is required). The key
/// file resolves against `state_dir`.
///
/// Returns the table when every field is present, and the tunnel network on its own: peers and
/// upstreams are checked against it even when another field of the table is bad.
pub(super) fn validate(
    errs: &mut ConfigErrors,
    wg: Option<&RawWireguard>,
    state_dir: &Path,
) -> (Option<WireguardConfig>, Option<IpNet>) {
    let present = wg.is_some();
    if !present {
        errs.push(
            "wireguard",
            "(missing)",
            "the [wireguard] table is required",
            "run `modelgate init --public-endpoint HOST:PORT` or copy [wireguard] from config/modelgate.toml",
        );
    }
    let absent = RawWireguard::default();
    let wg = wg.unwrap_or(&absent);
    let listen = socket_addr(
        errs,
        "wireguard.listen",
        wg.listen.as_deref(),
        DEFAULT_WG_LISTEN,
    );
    let public_endpoint = public_endpoint(errs, wg.public_endpoint.as_deref(), present);
    let address = address(errs, wg.address.as_deref(), present);
    let private_key_file = private_key_file(errs, wg.private_key_file.as_deref(), state_dir);
    let mtu = mtu(errs, wg.mtu);
    let config = match (listen, public_endpoint, address) {
        (Some(listen), Some(public_endpoint), Some(address)) => Some(WireguardConfig {
            listen,
            public_endpoint,
            address,
            private_key_file,
            mtu,
        }),
        _ => None,
    };
    (config, address)
}

/// `public_endpoint`: required when the table is present (its absence is reported once, for
/// the whole table, otherwise).
fn public_endpoint(errs: &mut ConfigErrors, v: Option<&str>, present: bool) -> Option<String> {
    let key = "wireguard.public_endpoint";
    match v {
        None if present => {
            errs.push(
                key,
                "(missing)",
                "required: the HOST:PORT corp peers dial",
                "add public_endpoint = \"gw.example.com:51820\" (the appliance's public name or IP and UDP port)",
            );
            None
        }
        None => None,
        Some(v) => match parse_endpoint(v) {
            Ok(_) => Some(v.to_string()),
            Err(problem) => {
                errs.push(
                    key,
                    q(v),
                    problem,
                    "write HOST:PORT, e.g. \"gw.example.com:51820\" or \"[2001:db8::1]:51820\"",
                );
                None
            }
        },
    }
}

/// `address`: required like `public_endpoint`.
fn address(errs: &mut ConfigErrors, v: Option<&str>, present: bool) -> Option<IpNet> {
    match v {
        None if present => {
            errs.push(
                "wireguard.address",
                "(missing)",
                "required: the appliance's tunnel address with the tunnel network prefix",
                format!("add address = \"{DEFAULT_TUNNEL_ADDRESS}\""),
            );
            None
        }
        None => None,
        Some(v) => match check_tunnel_address(v) {
            Ok(n) => Some(n),
            Err((problem, fix)) => {
                errs.push("wireguard.address", q(v), problem, fix);
                None
            }
        },
    }
}

fn private_key_file(errs: &mut ConfigErrors, v: Option<&str>, state_dir: &Path) -> PathBuf {
    match v {
        Some("") => {
            errs.push(
                "wireguard.private_key_file",
                "\"\"",
                "is empty",
                format!("omit it to use \"{DEFAULT_PRIVATE_KEY_FILE}\" in state_dir"),
            );
            PathBuf::new()
        }
        v => resolve(state_dir, v.unwrap_or(DEFAULT_PRIVATE_KEY_FILE)),
    }
}

fn mtu(errs: &mut ConfigErrors, v: Option<i64>) -> u16 {
    match v {
        None => DEFAULT_MTU,
        Some(m) if (1280..=9000).contains(&m) => m as u16,
        Some(m) => {
            errs.push(
                "wireguard.mtu",
                m.to_string(),
                "must be 1280..=9000 (1280 is the IPv6 minimum)",
                format!("use {DEFAULT_MTU}, the wg-quick default"),
            );
            DEFAULT_MTU
        }
    }
}

/// Parses `HOST:PORT` (IPv6 hosts in brackets) and returns the host and the port.
pub fn parse_endpoint(v: &str) -> Result<(String, u16), String> {
    let (host, port) = v
        .rsplit_once(':')
        .ok_or_else(|| "has no :PORT".to_string())?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {port:?} is not 1-65535"))?;
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| "IPv6 host has '[' but no closing ']'".to_string())?;
        inner
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{inner:?} in brackets is not an IPv6 address"))?;
        return Ok((inner.to_string(), port));
    }
    if host.contains(':') {
        return Err("an IPv6 host must be written in brackets".into());
    }
    if host.parse::<std::net::Ipv4Addr>().is_err() {
        check_dns_name(host)?;
    }
    Ok((host.to_string(), port))
}

/// The appliance's `IP/PREFIX`: a CIDR whose host part is a usable address with room for peers.
/// The error is `(problem, fix)`.
pub fn check_tunnel_address(v: &str) -> Result<IpNet, (String, String)> {
    let example = format!(
        "write the appliance's address with the network prefix, e.g. \"{DEFAULT_TUNNEL_ADDRESS}\""
    );
    let net: IpNet = v
        .parse()
        .map_err(|_| ("not an IP/PREFIX CIDR".to_string(), example.clone()))?;
    let (max_prefix, fam) = match net {
        IpNet::V4(_) => (30, "IPv4"),
        IpNet::V6(_) => (126, "IPv6"),
    };
    if net.prefix_len() > max_prefix {
        return Err((
            format!(
                "an {fam} /{} tunnel network leaves no address for peers",
                net.prefix_len()
            ),
            format!("use a /{max_prefix} or shorter prefix, e.g. \"{DEFAULT_TUNNEL_ADDRESS}\""),
        ));
    }
    if net.addr() == net.network() || (net.addr() == net.broadcast() && net.addr().is_ipv4()) {
        return Err((
            format!(
                "{} is the network/broadcast address of {}, not a host inside it",
                net.addr(),
                net.trunc()
            ),
            format!(
                "use a host address, e.g. \"{}/{}\"",
                first_host(&net),
                net.prefix_len()
            ),
        ));
    }
    Ok(net)
}

fn first_host(net: &IpNet) -> IpAddr {
    net.hosts().next().unwrap_or(net.addr())
}

/// Is `ip` usable as a peer address in the tunnel network `tunnel` (appliance address excluded)?
pub(super) fn usable_in(tunnel: &IpNet, ip: IpAddr) -> bool {
    let net = tunnel.trunc();
    net.contains(&ip)
        && ip != tunnel.addr()
        && ip != net.network()
        && !(ip.is_ipv4() && ip == net.broadcast())
}

/// The lowest address of the tunnel network that is neither the network, the broadcast, the
/// appliance's own address nor in `used`. `None` when the network is full.
pub fn allocate_tunnel_address(
    tunnel: &IpNet,
    used: impl IntoIterator<Item = IpAddr>,
) -> Option<IpAddr> {
    let used: HashSet<IpAddr> = used.into_iter().collect();
    // `hosts()` is lazy, so even an IPv6 /64 only walks as far as the first gap.
    tunnel
        .trunc()
        .hosts()
        .find(|ip| usable_in(tunnel, *ip) && !used.contains(ip))
}
