//! Raw config → [`Config`]: a pure function that checks every setting and collects every error.
//!
//! No I/O here (the caller passes in the appliance public key when it could read it), so the rules
//! are unit-tested directly. AllowedIPs rules follow the WireGuard paper §II ("cryptokey
//! routing"): each inner address must map to exactly one peer, so overlapping allowed IPs between
//! peers are rejected instead of letting the last one silently win.

use ipnet::IpNet;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use super::raw::{RawConfig, RawPeer, RawTls, RawWireguard};
use super::*;
use crate::wgkey::PublicKey;

/// Validates `raw` (read from `path`) into a [`Config`], or returns every error found.
///
/// `own_key` is the appliance's public key when known; a peer using it is rejected.
pub fn validate(
    raw: RawConfig,
    path: &Path,
    own_key: Option<&PublicKey>,
) -> Result<Config, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let base = config_dir(path);

    // [server]
    let s = &raw.server;
    let listen = socket_addr(
        &mut errs,
        "server.listen",
        s.listen.as_deref(),
        DEFAULT_LISTEN,
    );
    let state_dir = resolve(&base, s.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR));
    if s.state_dir.as_deref() == Some("") {
        errs.push(
            "server.state_dir",
            "\"\"",
            "is empty",
            format!("set it to a directory, e.g. \"{DEFAULT_STATE_DIR}\""),
        );
    }
    let control_socket = resolve(
        &base,
        s.control_socket
            .as_deref()
            .unwrap_or(DEFAULT_CONTROL_SOCKET),
    );
    if s.control_socket.as_deref() == Some("") {
        errs.push(
            "server.control_socket",
            "\"\"",
            "is empty",
            format!("set it to a socket path, e.g. \"{DEFAULT_CONTROL_SOCKET}\""),
        );
    }
    let metrics_listen = socket_addr(
        &mut errs,
        "server.metrics_listen",
        s.metrics_listen.as_deref(),
        DEFAULT_METRICS_LISTEN,
    );

    // [tls]
    let tls = raw
        .tls
        .as_ref()
        .and_then(|t| validate_tls(&mut errs, t, &base));

    // [wireguard]
    let absent = RawWireguard::default();
    let wg = raw.wireguard.as_ref().unwrap_or(&absent);
    if raw.wireguard.is_none() {
        errs.push(
            "wireguard",
            "(missing)",
            "the [wireguard] table is required",
            "run `modelgate init --public-endpoint HOST:PORT` or copy [wireguard] from config/modelgate.toml",
        );
    }
    let wg_listen = socket_addr(
        &mut errs,
        "wireguard.listen",
        wg.listen.as_deref(),
        DEFAULT_WG_LISTEN,
    );
    let public_endpoint = match wg.public_endpoint.as_deref() {
        None if raw.wireguard.is_some() => {
            errs.push(
                "wireguard.public_endpoint",
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
                    "wireguard.public_endpoint",
                    q(v),
                    problem,
                    "write HOST:PORT, e.g. \"gw.example.com:51820\" or \"[2001:db8::1]:51820\"",
                );
                None
            }
        },
    };
    let address = match wg.address.as_deref() {
        None if raw.wireguard.is_some() => {
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
    };
    let private_key_file = match wg.private_key_file.as_deref() {
        Some("") => {
            errs.push(
                "wireguard.private_key_file",
                "\"\"",
                "is empty",
                format!("omit it to use \"{DEFAULT_PRIVATE_KEY_FILE}\" in state_dir"),
            );
            PathBuf::new()
        }
        v => resolve(&state_dir, v.unwrap_or(DEFAULT_PRIVATE_KEY_FILE)),
    };
    let mtu = match wg.mtu {
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
    };

    // [[peer]]
    let peers = validate_peers(&mut errs, &raw.peers, address, own_key);

    if !errs.is_empty() {
        return Err(errs);
    }
    // Every `None` above pushed an error, so these are present here.
    let (Some(listen), Some(metrics_listen), Some(wg_listen), Some(public_endpoint), Some(address)) =
        (listen, metrics_listen, wg_listen, public_endpoint, address)
    else {
        errs.push(
            "config",
            "",
            "internal: a setting failed without an error",
            "report this bug",
        );
        return Err(errs);
    };
    Ok(Config {
        path: path.to_path_buf(),
        server: ServerConfig {
            listen,
            state_dir,
            control_socket,
            metrics_listen,
        },
        tls,
        wireguard: WireguardConfig {
            listen: wg_listen,
            public_endpoint,
            address,
            private_key_file,
            mtu,
        },
        peers,
    })
}

/// The appliance private key path `raw` names, if it can be worked out (for best-effort reads).
pub(super) fn private_key_path(raw: &RawConfig, path: &Path) -> Option<PathBuf> {
    let base = config_dir(path);
    let state_dir = resolve(
        &base,
        raw.server.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR),
    );
    let file = raw
        .wireguard
        .as_ref()
        .and_then(|w| w.private_key_file.as_deref())
        .unwrap_or(DEFAULT_PRIVATE_KEY_FILE);
    (!file.is_empty()).then(|| resolve(&state_dir, file))
}

fn config_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// A string value as shown in errors: quoted, like in the file.
fn q(v: &str) -> String {
    format!("{v:?}")
}

fn socket_addr(
    errs: &mut ConfigErrors,
    key: &str,
    v: Option<&str>,
    default: &str,
) -> Option<SocketAddr> {
    let text = v.unwrap_or(default);
    match text.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.push(
                key,
                q(text),
                "not an IP:PORT socket address (host names are not resolved here)",
                format!("write it like \"{default}\" (IPv6: \"[::]:PORT\")"),
            );
            None
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

/// Checks a DNS host name: dot-separated labels of letters, digits and inner hyphens.
pub fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the host name is empty".into());
    }
    if name.len() > 253 {
        return Err("the host name is longer than 253 characters".into());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{name:?} is not a valid DNS name (label {label:?})"
            ));
        }
    }
    Ok(())
}

/// Checks a peer name: `[a-z0-9][a-z0-9-]{0,31}` (it becomes a file name and a wg interface hint).
pub fn check_peer_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ok {
        Ok(())
    } else {
        Err("must be 1-32 characters of a-z, 0-9 and '-', starting with a letter or digit".into())
    }
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

/// True when `a` and `b` share at least one address.
fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Is `ip` usable as a peer address in the tunnel network `tunnel` (appliance address excluded)?
fn usable_in(tunnel: &IpNet, ip: IpAddr) -> bool {
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

fn validate_tls(errs: &mut ConfigErrors, t: &RawTls, base: &Path) -> Option<TlsConfig> {
    let fields: [(&str, &Option<String>); 8] = [
        ("cert", &t.cert),
        ("key", &t.key),
        ("self_signed_name", &t.self_signed_name),
        ("acme_domain", &t.acme_domain),
        ("acme_email", &t.acme_email),
        ("acme_directory", &t.acme_directory),
        ("acme_ca_root", &t.acme_ca_root),
        ("mode", &t.mode),
    ];
    let Some(mode) = t.mode.as_deref() else {
        errs.push(
            "tls.mode",
            "(missing)",
            "required in [tls]",
            "set mode = \"files\", \"self-signed\" or \"acme\"",
        );
        return None;
    };
    let allowed: &[&str] = match mode {
        "files" => &["cert", "key", "mode"],
        "self-signed" => &["self_signed_name", "mode"],
        "acme" => &[
            "acme_domain",
            "acme_email",
            "acme_directory",
            "acme_ca_root",
            "mode",
        ],
        _ => {
            errs.push(
                "tls.mode",
                q(mode),
                "unknown TLS mode",
                "set mode = \"files\", \"self-signed\" or \"acme\"",
            );
            return None;
        }
    };
    let before = errs.len();
    for (name, v) in fields {
        if let Some(v) = v {
            if !allowed.contains(&name) {
                errs.push(
                    format!("tls.{name}"),
                    q(v),
                    format!("is not used with mode = \"{mode}\""),
                    "remove it, or change tls.mode",
                );
            }
        }
    }
    let mut required = |key: &str, v: &Option<String>, example: &str| -> Option<String> {
        match v.as_deref() {
            Some(s) if !s.is_empty() => Some(s.to_string()),
            _ => {
                errs.push(
                    format!("tls.{key}"),
                    v.as_deref().map(q).unwrap_or("(missing)".into()),
                    format!("required with mode = \"{mode}\""),
                    format!("add {key} = {example}"),
                );
                None
            }
        }
    };
    let result = match mode {
        "files" => {
            let cert = required("cert", &t.cert, "\"/etc/modelgate/tls/fullchain.pem\"");
            let key = required("key", &t.key, "\"/etc/modelgate/tls/privkey.pem\"");
            Some(TlsConfig::Files {
                cert: resolve(base, &cert?),
                key: resolve(base, &key?),
            })
        }
        "self-signed" => {
            let name = required(
                "self_signed_name",
                &t.self_signed_name,
                "\"gw.example.com\"",
            )?;
            if name.parse::<IpAddr>().is_err() {
                if let Err(p) = check_dns_name(&name) {
                    errs.push(
                        "tls.self_signed_name",
                        q(&name),
                        p,
                        "use the DNS name (or IP) clients connect to",
                    );
                }
            }
            Some(TlsConfig::SelfSigned { name })
        }
        _ => {
            let domain = required("acme_domain", &t.acme_domain, "\"gw.example.com\"")?;
            if let Err(p) = check_dns_name(&domain) {
                errs.push(
                    "tls.acme_domain",
                    q(&domain),
                    p,
                    "use the public DNS name that points at this appliance",
                );
            }
            if let Some(e) = &t.acme_email {
                let ok = e
                    .split_once('@')
                    .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty());
                if !ok {
                    errs.push(
                        "tls.acme_email",
                        q(e),
                        "not an e-mail address",
                        "use an address like \"ops@example.com\", or remove it",
                    );
                }
            }
            if let Some(d) = &t.acme_directory {
                if !(d.starts_with("https://") || d.starts_with("http://")) {
                    errs.push("tls.acme_directory", q(d), "not an http(s) URL", "use e.g. \"https://acme-v02.api.letsencrypt.org/directory\", or remove it for the default");
                }
            }
            Some(TlsConfig::Acme {
                domain,
                email: t.acme_email.clone(),
                directory: t.acme_directory.clone(),
                ca_root: t.acme_ca_root.as_deref().map(|p| resolve(base, p)),
            })
        }
    };
    (errs.len() == before).then_some(result).flatten()
}

fn peer_key(i: usize, p: &RawPeer, field: &str) -> String {
    match p.name.as_deref() {
        Some(n) if check_peer_name(n).is_ok() => format!("peer \"{n}\".{field}"),
        _ => format!("peer #{}.{field}", i + 1),
    }
}

fn validate_peers(
    errs: &mut ConfigErrors,
    raw: &[RawPeer],
    tunnel: Option<IpNet>,
    own_key: Option<&PublicKey>,
) -> Vec<PeerConfig> {
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut keys: HashMap<PublicKey, usize> = HashMap::new();
    let mut addrs: HashMap<IpAddr, usize> = HashMap::new();
    // (peer index, network) of every network behind a peer, to find overlaps across peers.
    let mut claimed: Vec<(usize, IpNet)> = Vec::new();
    let mut out = Vec::new();

    for (i, p) in raw.iter().enumerate() {
        let key = |f: &str| peer_key(i, p, f);
        let before = errs.len();

        let name = match p.name.as_deref() {
            None => {
                errs.push(
                    key("name"),
                    "(missing)",
                    "every peer needs a name",
                    "add name = \"corp\"",
                );
                None
            }
            Some(n) => match check_peer_name(n) {
                Err(problem) => {
                    errs.push(
                        key("name"),
                        q(n),
                        problem,
                        "rename it, e.g. \"corp\" or \"site-2\"",
                    );
                    None
                }
                Ok(()) => {
                    if let Some(first) = names.insert(n, i) {
                        errs.push(
                            key("name"),
                            q(n),
                            format!("also used by peer #{}", first + 1),
                            "give each peer a unique name",
                        );
                    }
                    Some(n.to_string())
                }
            },
        };

        let public_key = match p.public_key.as_deref() {
            None => {
                errs.push(
                    key("public_key"),
                    "(missing)",
                    "every peer needs a public key",
                    "add public_key = \"<output of wg pubkey on the peer>\"",
                );
                None
            }
            Some(k) => match k.parse::<PublicKey>() {
                Err(e) => {
                    errs.push(
                        key("public_key"),
                        q(k),
                        e.to_string(),
                        "paste the peer's `wg pubkey` output",
                    );
                    None
                }
                Ok(pk) => {
                    if own_key == Some(&pk) {
                        errs.push(
                            key("public_key"),
                            q(k),
                            "is the appliance's own public key",
                            "use the corp peer's public key (`wg pubkey` on the peer)",
                        );
                    } else if let Some(first) = keys.insert(pk, i) {
                        errs.push(
                            key("public_key"),
                            q(k),
                            format!("also used by peer #{}", first + 1),
                            "each peer needs its own key pair; remove the duplicate",
                        );
                    }
                    Some(pk)
                }
            },
        };

        let tunnel_address = match p.tunnel_address.as_deref() {
            None => {
                errs.push(
                    key("tunnel_address"),
                    "(missing)",
                    "every peer needs a tunnel address",
                    "add tunnel_address = \"10.99.0.2\" (or let `modelgate peer add` allocate one)",
                );
                None
            }
            Some(a) => match a.parse::<IpAddr>() {
                Err(_) => {
                    let fix = if a.contains('/') {
                        "write the bare address, without /PREFIX"
                    } else {
                        "write an IP address inside wireguard.address's network"
                    };
                    errs.push(key("tunnel_address"), q(a), "not an IP address", fix);
                    None
                }
                Ok(ip) => {
                    if let Some(t) = tunnel {
                        if !usable_in(&t, ip) {
                            let problem = if ip == t.addr() {
                                "is the appliance's own tunnel address".to_string()
                            } else if t.trunc().contains(&ip) {
                                format!("is the network or broadcast address of {}", t.trunc())
                            } else {
                                format!("is outside the tunnel network {}", t.trunc())
                            };
                            let fix = match allocate_tunnel_address(&t, addrs.keys().copied()) {
                                Some(free) => format!("use a free address such as \"{free}\""),
                                None => "widen wireguard.address's prefix".to_string(),
                            };
                            errs.push(key("tunnel_address"), q(a), problem, fix);
                        } else if let Some(first) = addrs.insert(ip, i) {
                            errs.push(
                                key("tunnel_address"),
                                q(a),
                                format!("also used by peer #{}", first + 1),
                                "give each peer its own tunnel address",
                            );
                        }
                    }
                    Some(ip)
                }
            },
        };

        let own_host = tunnel_address.map(IpNet::from);
        let mut behind: Vec<IpNet> = Vec::new();
        for a in &p.allowed_ips {
            let parsed = a
                .parse::<IpNet>()
                .or_else(|_| a.parse::<IpAddr>().map(IpNet::from));
            let Ok(net) = parsed else {
                errs.push(
                    key("allowed_ips"),
                    q(a),
                    "not a CIDR",
                    "write networks behind the peer like \"10.20.0.0/24\"",
                );
                continue;
            };
            // AllowedIPs are networks: 10.20.0.5/24 means 10.20.0.0/24 (as `wg` itself does).
            let net = net.trunc();
            if Some(net) == own_host {
                continue; // The peer's own /32 is always included; listing it is harmless.
            }
            if let Some(t) = tunnel {
                if overlaps(&net, &t.trunc()) {
                    errs.push(
                        key("allowed_ips"),
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
        for net in &behind {
            if let Some((j, other)) = claimed.iter().find(|(_, o)| overlaps(net, o)) {
                let other_name = raw[*j].name.as_deref().unwrap_or("?");
                errs.push(
                    key("allowed_ips"),
                    q(&net.to_string()),
                    format!("overlaps {other} of peer \"{other_name}\""),
                    "each address must route to one peer (WireGuard cryptokey routing); narrow or remove one of them",
                );
            }
        }
        claimed.extend(behind.iter().map(|n| (i, *n)));

        let keepalive = match p.keepalive {
            None => None,
            Some(k) if (1..=65535).contains(&k) => Some(k as u16),
            Some(k) => {
                errs.push(
                    key("keepalive"),
                    k.to_string(),
                    "must be 1..=65535 seconds",
                    "use 25, or remove it to send no keepalives",
                );
                None
            }
        };
        let endpoint = match p.endpoint.as_deref() {
            None => None,
            Some(e) => match e.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    errs.push(key("endpoint"), q(e), "not an IP:PORT (host names are not resolved)", "write e.g. \"198.51.100.2:51820\", or remove it to learn the endpoint from the peer's packets");
                    None
                }
            },
        };

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
