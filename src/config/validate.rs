//! Raw config → [`Config`]: a pure function that checks every setting and collects every error.
//!
//! No I/O here (the caller passes in the appliance public key when it could read it, and a probe
//! for the upstreams' API key files), so the rules are unit-tested directly. AllowedIPs rules follow the WireGuard paper §II ("cryptokey
//! routing"): each inner address must map to exactly one peer, so overlapping allowed IPs between
//! peers are rejected instead of letting the last one silently win.

use ipnet::IpNet;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{RawConfig, RawGateway, RawPeer, RawTls, RawUpstream, RawWireguard};
use super::*;
use crate::wgkey::PublicKey;

/// Checks a secret file named in the config (resolved path); `Err((problem, fix))` when unusable.
pub type SecretFileCheck = dyn Fn(&Path) -> Result<(), (String, String)>;

/// Validates `raw` (read from `path`) into a [`Config`], or returns every error found.
///
/// `own_key` is the appliance's public key when known; a peer using it is rejected.
/// `secret_file` checks an upstream's `api_key_file` (resolved path) and returns
/// `(problem, fix)` when it is unusable; [`Config::from_toml_str`] passes a check of the file's
/// existence and mode.
pub fn validate(
    raw: RawConfig,
    path: &Path,
    own_key: Option<&PublicKey>,
    secret_file: &SecretFileCheck,
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

    // [gateway]
    let gateway = validate_gateway(&mut errs, &raw.gateway);

    // [[upstream]]
    let upstreams = validate_upstreams(
        &mut errs,
        &raw.upstreams,
        &raw.peers,
        address,
        &base,
        secret_file,
    );
    let policies = super::policies::validate_policies(&mut errs, &raw.policies);

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
        gateway,
        upstreams,
        policies,
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

/// How one kind of table entry (peer, upstream) is named.
pub(super) struct NameRule {
    pub kind: &'static str,
    pub check: fn(&str) -> Result<(), String>,
    pub example: &'static str,
    pub examples: &'static str,
}

/// Validates the `name` of entry `i`: present, well-formed and unique among `names` (which
/// records the first entry using each name). Returns the name when usable.
pub(super) fn unique_name<'a>(
    errs: &mut ConfigErrors,
    rule: &NameRule,
    key: String,
    name: Option<&'a str>,
    i: usize,
    names: &mut HashMap<&'a str, usize>,
) -> Option<String> {
    let kind = rule.kind;
    let Some(n) = name else {
        errs.push(
            key,
            "(missing)",
            format!("every {kind} needs a name"),
            format!("add name = \"{}\"", rule.example),
        );
        return None;
    };
    if let Err(problem) = (rule.check)(n) {
        errs.push(
            key,
            q(n),
            problem,
            format!("rename it, e.g. {}", rule.examples),
        );
        return None;
    }
    if let Some(first) = names.insert(n, i) {
        errs.push(
            key,
            q(n),
            format!("also used by {kind} #{}", first + 1),
            format!("give each {kind} a unique name"),
        );
    }
    Some(n.to_string())
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

        let name = unique_name(
            errs,
            &NameRule {
                kind: "peer",
                check: check_peer_name,
                example: "corp",
                examples: "\"corp\" or \"site-2\"",
            },
            key("name"),
            p.name.as_deref(),
            i,
            &mut names,
        );

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

/// A humantime duration setting (`"10s"`, `"1m 30s"`); zero is refused (it would mean "no time
/// at all", not "no limit").
fn duration(errs: &mut ConfigErrors, key: &str, v: Option<&str>, default: Duration) -> Duration {
    let Some(text) = v else {
        return default;
    };
    let shown_default = humantime::format_duration(default).to_string();
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => {
            errs.push(
                key,
                q(text),
                "must be longer than zero",
                format!("use e.g. \"{shown_default}\" (the default), or remove it"),
            );
            default
        }
        Ok(d) => d,
        Err(e) => {
            errs.push(
                key,
                q(text),
                format!("not a duration ({e})"),
                format!("write a number with a unit, e.g. \"{shown_default}\", \"90s\" or \"2m\""),
            );
            default
        }
    }
}

/// A count or size setting within `min..=max`.
fn bounded(
    errs: &mut ConfigErrors,
    key: &str,
    v: Option<i64>,
    default: usize,
    min: usize,
    max: usize,
    why: &str,
) -> usize {
    let Some(n) = v else {
        return default;
    };
    match usize::try_from(n) {
        Ok(u) if (min..=max).contains(&u) => u,
        _ => {
            errs.push(
                key,
                n.to_string(),
                format!("must be {min}..={max}{why}"),
                format!("use {default} (the default), or remove it"),
            );
            default
        }
    }
}

fn validate_gateway(errs: &mut ConfigErrors, g: &RawGateway) -> GatewayConfig {
    let d = GatewayConfig::default();
    GatewayConfig {
        max_body_bytes: bounded(
            errs,
            "gateway.max_body_bytes",
            g.max_body_bytes,
            d.max_body_bytes,
            1024,
            1 << 30,
            " bytes (1 KiB to 1 GiB)",
        ),
        max_connections: bounded(
            errs,
            "gateway.max_connections",
            g.max_connections,
            d.max_connections,
            1,
            1_000_000,
            "",
        ),
        tls_handshake_timeout: duration(
            errs,
            "gateway.tls_handshake_timeout",
            g.tls_handshake_timeout.as_deref(),
            d.tls_handshake_timeout,
        ),
        header_read_timeout: duration(
            errs,
            "gateway.header_read_timeout",
            g.header_read_timeout.as_deref(),
            d.header_read_timeout,
        ),
        idle_timeout: duration(
            errs,
            "gateway.idle_timeout",
            g.idle_timeout.as_deref(),
            d.idle_timeout,
        ),
        // hyper refuses (panics on) an HTTP/1 read buffer below 8192 bytes.
        max_header_bytes: bounded(
            errs,
            "gateway.max_header_bytes",
            g.max_header_bytes,
            d.max_header_bytes,
            8192,
            1 << 20,
            " bytes (hyper needs at least 8192)",
        ),
        max_headers: bounded(
            errs,
            "gateway.max_headers",
            g.max_headers,
            d.max_headers,
            1,
            10_000,
            "",
        ),
        upstream_connect_timeout: duration(
            errs,
            "gateway.upstream_connect_timeout",
            g.upstream_connect_timeout.as_deref(),
            d.upstream_connect_timeout,
        ),
        upstream_response_timeout: duration(
            errs,
            "gateway.upstream_response_timeout",
            g.upstream_response_timeout.as_deref(),
            d.upstream_response_timeout,
        ),
        sse_keepalive: duration(
            errs,
            "gateway.sse_keepalive",
            g.sse_keepalive.as_deref(),
            d.sse_keepalive,
        ),
        drain_timeout: duration(
            errs,
            "gateway.drain_timeout",
            g.drain_timeout.as_deref(),
            d.drain_timeout,
        ),
        queue_timeout: duration(
            errs,
            "gateway.queue_timeout",
            g.queue_timeout.as_deref(),
            d.queue_timeout,
        ),
        max_queued: bounded(
            errs,
            "gateway.max_queued",
            g.max_queued,
            d.max_queued,
            0,
            1_000_000,
            " (0 refuses at once when the upstream is saturated)",
        ),
        default_max_tokens: bounded(
            errs,
            "gateway.default_max_tokens",
            g.default_max_tokens,
            d.default_max_tokens as usize,
            1,
            10_000_000,
            " tokens",
        ) as u32,
        // Booleans need no range check: TOML's types already refused anything else.
        compat: CompatConfig {
            responses_translation: g
                .compat_responses_translation
                .unwrap_or(d.compat.responses_translation),
            empty_content: g.compat_empty_content.unwrap_or(d.compat.empty_content),
            context_length_error: g
                .compat_context_length_error
                .unwrap_or(d.compat.context_length_error),
        },
    }
}

/// Checks an upstream name: same rules as peer names (it appears in logs, metrics and the CLI).
pub fn check_upstream_name(name: &str) -> Result<(), String> {
    check_peer_name(name)
}

const URL_EXAMPLE: &str =
    "write http://IP:PORT or http://IP:PORT/PATH, e.g. \"http://10.20.0.5:8000/v1\"";

/// Parses an upstream URL into the socket address and the API path prefix (no trailing slash;
/// `/v1` when the URL has no path). Only `http://` with an IP literal and an explicit port: the
/// model server is reached through the WireGuard tunnel, which has no DNS and already encrypts.
/// The error is `(problem, fix)`.
pub fn parse_upstream_url(v: &str) -> Result<(SocketAddr, String), (String, String)> {
    let err = |p: &str, f: &str| Err((p.to_string(), f.to_string()));
    let Some(rest) = v.strip_prefix("http://") else {
        if v.starts_with("https://") {
            return err(
                "https:// is not supported: the hop to the model server runs inside the WireGuard tunnel, which already encrypts it",
                "use http://IP:PORT",
            );
        }
        return err("must start with http://", URL_EXAMPLE);
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return err(
            "must not contain user:password@ (credentials in URLs end up in logs)",
            "put the API key in a 0600 file and pass it as api_key_file / --api-key-file",
        );
    }
    let addr: SocketAddr = match authority.parse() {
        Ok(a) => a,
        Err(_) => {
            let host = match authority.rsplit_once(':') {
                Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty() => h,
                _ if authority.parse::<IpAddr>().is_ok() || !authority.contains(':') => {
                    return err(
                        "has no port",
                        "add the model server's port, e.g. \"http://10.20.0.5:8000\"",
                    )
                }
                _ => authority,
            };
            let unbracketed = host.trim_start_matches('[').trim_end_matches(']');
            if unbracketed.parse::<IpAddr>().is_ok() {
                return err(
                    "is not IP:PORT (IPv6 addresses go in brackets, ports are 1-65535)",
                    "write e.g. \"http://10.20.0.5:8000\" or \"http://[fd00::5]:8000\"",
                );
            }
            return err(
                "the host must be an IP address: the model server is reached through the tunnel, where there is no DNS",
                "use the model server's IP address as seen from the corp peer's network, e.g. \"http://10.20.0.5:8000\"",
            );
        }
    };
    if addr.port() == 0 {
        return err(
            "port 0 is not a port",
            "use the model server's port, e.g. 8000",
        );
    }
    if path.contains(['?', '#']) {
        return err(
            "must not have a query or fragment",
            "give only the path prefix of the API, e.g. /v1",
        );
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok((addr, DEFAULT_UPSTREAM_BASE_PATH.to_string()));
    }
    for seg in trimmed[1..].split('/') {
        let ok = !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b));
        if !ok {
            return err(
                &format!("path segment {seg:?} is not allowed (empty, dot segments or unusual characters)"),
                "give a plain path prefix, e.g. /v1 or /openai/v1",
            );
        }
    }
    Ok((addr, trimmed.to_string()))
}

/// Parses `PUBLIC` or `PUBLIC=UPSTREAM_ID`: the name clients ask for and the id the model
/// server knows (the same when `=` is absent).
pub fn parse_model_route(v: &str) -> Result<ModelRoute, String> {
    let (public, upstream) = v.split_once('=').unwrap_or((v, v));
    let token_ok = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && !s.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    if !token_ok(public, 128) || public.contains(',') {
        return Err(format!(
            "public model name {public:?} must be 1-128 characters without spaces or commas"
        ));
    }
    if !token_ok(upstream, 256) {
        return Err(format!(
            "upstream model id {upstream:?} must be 1-256 characters without spaces"
        ));
    }
    Ok(ModelRoute {
        public: public.to_string(),
        upstream: upstream.to_string(),
    })
}

fn upstream_key(i: usize, u: &RawUpstream, field: &str) -> String {
    match u.name.as_deref() {
        Some(n) if check_upstream_name(n).is_ok() => format!("upstream \"{n}\".{field}"),
        _ => format!("upstream #{}.{field}", i + 1),
    }
}

/// The networks each raw peer routes (its tunnel address and its allowed IPs), read leniently:
/// a peer with a typo still counts for the upstream check, whose error would otherwise mislead
/// (the peer's own error is reported anyway).
fn peer_networks(peers: &[RawPeer]) -> Vec<(String, IpNet)> {
    let mut out = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let name = p.name.clone().unwrap_or_else(|| format!("#{}", i + 1));
        if let Some(ip) = p
            .tunnel_address
            .as_deref()
            .and_then(|a| a.parse::<IpAddr>().ok())
        {
            out.push((name.clone(), IpNet::from(ip)));
        }
        for a in &p.allowed_ips {
            let parsed = a
                .parse::<IpNet>()
                .or_else(|_| a.parse::<IpAddr>().map(IpNet::from));
            if let Ok(net) = parsed {
                let entry = (name.clone(), net.trunc());
                if !out.contains(&entry) {
                    out.push(entry);
                }
            }
        }
    }
    out
}

fn validate_upstreams(
    errs: &mut ConfigErrors,
    raw: &[RawUpstream],
    peers: &[RawPeer],
    tunnel: Option<IpNet>,
    base: &Path,
    secret_file: &SecretFileCheck,
) -> Vec<UpstreamConfig> {
    let nets = peer_networks(peers);
    let mut names: HashMap<&str, usize> = HashMap::new();
    // Public model name → the upstream (index) routing it.
    let mut routed: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();

    for (i, u) in raw.iter().enumerate() {
        let key = |f: &str| upstream_key(i, u, f);
        let before = errs.len();

        let name = unique_name(
            errs,
            &NameRule {
                kind: "upstream",
                check: check_upstream_name,
                example: "vllm",
                examples: "\"vllm\" or \"coder-1\"",
            },
            key("name"),
            u.name.as_deref(),
            i,
            &mut names,
        );

        let url = match u.url.as_deref() {
            None => {
                errs.push(
                    key("url"),
                    "(missing)",
                    "every upstream needs the model server's URL",
                    "add url = \"http://10.20.0.5:8000/v1\"",
                );
                None
            }
            Some(v) => match parse_upstream_url(v) {
                Err((problem, fix)) => {
                    errs.push(key("url"), q(v), problem, fix);
                    None
                }
                Ok((addr, base_path)) => {
                    if reachable_upstream(errs, &key("url"), v, addr.ip(), tunnel, &nets) {
                        Some((addr, base_path))
                    } else {
                        None
                    }
                }
            },
        };

        let api_key_file = match u.api_key_file.as_deref() {
            None => None,
            Some("") => {
                errs.push(
                    key("api_key_file"),
                    "\"\"",
                    "is empty",
                    "point it at a 0600 file holding the model server's API key, or remove it",
                );
                None
            }
            Some(f) => {
                let p = resolve(base, f);
                if let Err((problem, fix)) = secret_file(&p) {
                    errs.push(key("api_key_file"), q(f), problem, fix);
                }
                Some(p)
            }
        };

        let mut models: Vec<ModelRoute> = Vec::new();
        match &u.models {
            None => {}
            Some(list) if list.is_empty() => errs.push(
                key("models"),
                "[]",
                "is empty, so nothing would be routed",
                "list models like [\"coder=Qwen/Qwen2.5-Coder-32B-Instruct\"], or remove the key to discover them from the server's GET /v1/models",
            ),
            Some(list) => {
                for m in list {
                    match parse_model_route(m) {
                        Err(problem) => errs.push(
                            key("models"),
                            q(m),
                            problem,
                            "write PUBLIC or PUBLIC=UPSTREAM_ID, e.g. \"coder=Qwen/Qwen2.5-Coder-32B-Instruct\"",
                        ),
                        Ok(r) => {
                            if models.iter().any(|o| o.public == r.public) {
                                errs.push(
                                    key("models"),
                                    q(m),
                                    format!("public name {:?} is listed twice", r.public),
                                    "list each public name once",
                                );
                                continue;
                            }
                            if let Some(j) = routed.get(&r.public) {
                                let other = raw[*j].name.as_deref().unwrap_or("?");
                                errs.push(
                                    key("models"),
                                    q(m),
                                    format!("public name {:?} is already routed by upstream \"{other}\"", r.public),
                                    "each public model name must map to one upstream; rename one (PUBLIC=UPSTREAM_ID)",
                                );
                                continue;
                            }
                            routed.insert(r.public.clone(), i);
                            models.push(r);
                        }
                    }
                }
            }
        }

        let max_concurrent = match u.max_concurrent {
            None => None,
            Some(n) if (1..=100_000).contains(&n) => Some(n as u32),
            Some(n) => {
                errs.push(
                    key("max_concurrent"),
                    n.to_string(),
                    "must be 1..=100000",
                    "use the model server's batch capacity (e.g. vLLM's --max-num-seqs), or remove it for no limit",
                );
                None
            }
        };

        if errs.len() != before {
            continue;
        }
        if let (Some(name), Some((addr, base_path))) = (name, url) {
            out.push(UpstreamConfig {
                name,
                addr,
                base_path,
                api_key_file,
                models,
                max_concurrent,
            });
        }
    }
    out
}

/// The no-open-proxy rule: an upstream must sit behind a peer, i.e. inside some peer's allowed
/// networks (its tunnel address counts: a model on the corp WireGuard host itself). Anything
/// else (public addresses, the appliance itself, loopback) is refused. Pushes the error and
/// returns false when refused.
fn reachable_upstream(
    errs: &mut ConfigErrors,
    key: &str,
    v: &str,
    ip: IpAddr,
    tunnel: Option<IpNet>,
    nets: &[(String, IpNet)],
) -> bool {
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        errs.push(
            key,
            q(v),
            format!("{ip} is not a model server address (unspecified, loopback or multicast)"),
            "use the model server's address inside the corp network, e.g. \"http://10.20.0.5:8000\"",
        );
        return false;
    }
    if tunnel.is_some_and(|t| t.addr() == ip) {
        errs.push(
            key,
            q(v),
            format!("{ip} is the appliance's own tunnel address"),
            "use the address of a model server behind a peer",
        );
        return false;
    }
    if nets.iter().any(|(_, n)| n.contains(&ip)) {
        return true;
    }
    let listed = if nets.is_empty() {
        "there are no peers".to_string()
    } else {
        let shown: Vec<String> = nets.iter().map(|(p, n)| format!("{p}: {n}")).collect();
        format!("peers route {}", shown.join(", "))
    };
    let host = IpNet::from(ip);
    errs.push(
        key,
        q(v),
        format!("{ip} is not inside any peer's allowed networks ({listed}); modelgate only forwards to model servers behind a WireGuard peer, never elsewhere"),
        format!("use the model server's address inside a peer's networks, or add its network to the allowed_ips of the peer it sits behind (new peer: `modelgate peer add NAME --allowed-ips {host}`)"),
    );
    false
}
