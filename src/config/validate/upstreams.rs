//! `[[upstream]]`: the OpenAI-compatible model servers behind the peers.
//!
//! Each upstream needs a unique name and an `http://IP:PORT[/PATH]` URL whose IP lies behind a
//! peer (the no-open-proxy rule: modelgate never forwards anywhere else); optionally an API key
//! file (checked without being read), static model routes and a concurrency limit. Several
//! upstreams may route the same public model name: they are its replicas (balanced, with
//! failover), so each must be another server (another URL). Never connects to a model server:
//! models that are not listed are discovered by the gateway at run time.

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use super::fields::{q, resolve, SecretFileCheck};
use super::names::{check_upstream_name, NameRule};
use super::peers::parse_net;
use crate::config::raw::{RawPeer, RawUpstream};
use crate::config::{ConfigErrors, ModelRoute, UpstreamConfig, DEFAULT_UPSTREAM_BASE_PATH};

const NAMES: NameRule = NameRule {
    kind: "upstream",
    check: check_upstream_name,
    example: "vllm",
    examples: "\"vllm\" or \"coder-1\"",
};

/// Validates every `[[upstream]]`. `peers` (read leniently, see [`peer_networks`]) and the
/// tunnel network decide which addresses are reachable; relative `api_key_file`s resolve
/// against `base` and are checked with `secret_file`. Upstreams with any bad field are left out
/// of the result; their errors are in `errs`.
pub(super) fn validate(
    errs: &mut ConfigErrors,
    raw: &[RawUpstream],
    peers: &[RawPeer],
    tunnel: Option<IpNet>,
    base: &Path,
    secret_file: &SecretFileCheck,
) -> Vec<UpstreamConfig> {
    let nets = peer_networks(peers);
    let mut names: HashMap<&str, usize> = HashMap::new();
    // Public model name → the upstreams (indices) routing it: its replicas so far.
    let mut routed: HashMap<String, Vec<usize>> = HashMap::new();
    let mut out = Vec::new();
    for (i, u) in raw.iter().enumerate() {
        let key = |f: &str| NAMES.key(i, u.name.as_deref(), f);
        let before = errs.len();
        let name = NAMES.unique(errs, i, u.name.as_deref(), &mut names);
        let url = url(errs, &key("url"), u.url.as_deref(), tunnel, &nets);
        let api_key_file = api_key_file(
            errs,
            &key("api_key_file"),
            u.api_key_file.as_deref(),
            base,
            secret_file,
        );
        let models = models(errs, &key("models"), i, raw, &mut routed);
        let max_concurrent = max_concurrent(errs, &key("max_concurrent"), u.max_concurrent);
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

/// `url`: present, parsed by [`parse_upstream_url`] and reachable through a peer.
fn url(
    errs: &mut ConfigErrors,
    key: &str,
    v: Option<&str>,
    tunnel: Option<IpNet>,
    nets: &[(String, IpNet)],
) -> Option<(SocketAddr, String)> {
    let Some(v) = v else {
        errs.push(
            key,
            "(missing)",
            "every upstream needs the model server's URL",
            "add url = \"http://10.20.0.5:8000/v1\"",
        );
        return None;
    };
    match parse_upstream_url(v) {
        Err((problem, fix)) => {
            errs.push(key, q(v), problem, fix);
            None
        }
        Ok((addr, base_path)) => {
            reachable_upstream(errs, key, v, addr.ip(), tunnel, nets).then_some((addr, base_path))
        }
    }
}

/// `api_key_file`: not empty, resolved against the config's folder, and usable by
/// `secret_file`. The path is returned even when the file is unusable (the error is pushed).
fn api_key_file(
    errs: &mut ConfigErrors,
    key: &str,
    v: Option<&str>,
    base: &Path,
    secret_file: &SecretFileCheck,
) -> Option<PathBuf> {
    match v? {
        "" => {
            errs.push(
                key,
                "\"\"",
                "is empty",
                "point it at a 0600 file holding the model server's API key, or remove it",
            );
            None
        }
        f => {
            let p = resolve(base, f);
            if let Err((problem, fix)) = secret_file(&p) {
                errs.push(key, q(f), problem, fix);
            }
            Some(p)
        }
    }
}

/// `models` of upstream `i`: absent (discover them from the server), or a non-empty list of
/// routes, each public name listed once and not already routed by an earlier upstream at the
/// same URL (`routed` records which upstreams route each public name; other URLs are replicas).
fn models(
    errs: &mut ConfigErrors,
    key: &str,
    i: usize,
    raw: &[RawUpstream],
    routed: &mut HashMap<String, Vec<usize>>,
) -> Vec<ModelRoute> {
    let mut models: Vec<ModelRoute> = Vec::new();
    let list = match raw[i].models.as_deref() {
        None => return models,
        Some([]) => {
            errs.push(
                key,
                "[]",
                "is empty, so nothing would be routed",
                "list models like [\"coder=Qwen/Qwen2.5-Coder-32B-Instruct\"], or remove the key to discover them from the server's GET /v1/models",
            );
            return models;
        }
        Some(list) => list,
    };
    for m in list {
        let refused = match parse_model_route(m) {
            Err(problem) => Some((
                problem,
                "write PUBLIC or PUBLIC=UPSTREAM_ID, e.g. \"coder=Qwen/Qwen2.5-Coder-32B-Instruct\"",
            )),
            Ok(r) => match route_conflict(&r, i, &models, routed, raw) {
                None => {
                    routed.entry(r.public.clone()).or_default().push(i);
                    models.push(r);
                    None
                }
                conflict => conflict,
            },
        };
        if let Some((problem, fix)) = refused {
            errs.push(key, q(m), problem, fix);
        }
    }
    models
}

/// Why route `r` cannot be added to upstream `i`, which already routes `models`, given the
/// upstreams that route each public name so far (`routed`, indices into `raw`): `(problem, fix)`.
/// Another upstream routing the same name is a replica, unless it is the same server (URL).
fn route_conflict(
    r: &ModelRoute,
    i: usize,
    models: &[ModelRoute],
    routed: &HashMap<String, Vec<usize>>,
    raw: &[RawUpstream],
) -> Option<(String, &'static str)> {
    if models.iter().any(|o| o.public == r.public) {
        return Some((
            format!("public name {:?} is listed twice", r.public),
            "list each public name once",
        ));
    }
    let server = |k: usize| {
        raw[k]
            .url
            .as_deref()
            .and_then(|u| parse_upstream_url(u).ok())
    };
    let mine = server(i)?;
    let j = routed
        .get(&r.public)?
        .iter()
        .find(|&&j| server(j).as_ref() == Some(&mine))?;
    let other = raw[*j].name.as_deref().unwrap_or("?");
    Some((
        format!(
            "public name {:?} is already routed by upstream \"{other}\" at the same URL (http://{}{}), so this would be the same server twice, not a replica",
            r.public, mine.0, mine.1
        ),
        "a replica must be another model server (another IP:PORT); remove the route from one of the two upstreams",
    ))
}

fn max_concurrent(errs: &mut ConfigErrors, key: &str, v: Option<i64>) -> Option<u32> {
    match v {
        None => None,
        Some(n) if (1..=100_000).contains(&n) => Some(n as u32),
        Some(n) => {
            errs.push(
                key,
                n.to_string(),
                "must be 1..=100000",
                "use the model server's batch capacity (e.g. vLLM's --max-num-seqs), or remove it for no limit",
            );
            None
        }
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
        for net in p.allowed_ips.iter().filter_map(|a| parse_net(a)) {
            let entry = (name.clone(), net);
            if !out.contains(&entry) {
                out.push(entry);
            }
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

const URL_EXAMPLE: &str =
    "write http://IP:PORT or http://IP:PORT/PATH, e.g. \"http://10.20.0.5:8000/v1\"";

/// A refused URL: `(problem, fix)`.
fn refuse<T>(problem: &str, fix: &str) -> Result<T, (String, String)> {
    Err((problem.to_string(), fix.to_string()))
}

/// Parses an upstream URL into the socket address and the API path prefix (no trailing slash;
/// `/v1` when the URL has no path). Only `http://` with an IP literal and an explicit port: the
/// model server is reached through the WireGuard tunnel, which has no DNS and already encrypts.
/// The error is `(problem, fix)`.
pub fn parse_upstream_url(v: &str) -> Result<(SocketAddr, String), (String, String)> {
    let Some(rest) = v.strip_prefix("http://") else {
        if v.starts_with("https://") {
            return refuse(
                "https:// is not supported: the hop to the model server runs inside the WireGuard tunnel, which already encrypts it",
                "use http://IP:PORT",
            );
        }
        return refuse("must start with http://", URL_EXAMPLE);
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return refuse(
            "must not contain user:password@ (credentials in URLs end up in logs)",
            "put the API key in a 0600 file and pass it as api_key_file / --api-key-file",
        );
    }
    let addr = parse_authority(authority)?;
    let base_path = parse_base_path(path)?;
    Ok((addr, base_path))
}

/// The `IP:PORT` of an upstream URL; the error says which part is wrong.
fn parse_authority(authority: &str) -> Result<SocketAddr, (String, String)> {
    let Ok(addr) = authority.parse::<SocketAddr>() else {
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty() => h,
            _ if authority.parse::<IpAddr>().is_ok() || !authority.contains(':') => {
                return refuse(
                    "has no port",
                    "add the model server's port, e.g. \"http://10.20.0.5:8000\"",
                )
            }
            _ => authority,
        };
        let unbracketed = host.trim_start_matches('[').trim_end_matches(']');
        if unbracketed.parse::<IpAddr>().is_ok() {
            return refuse(
                "is not IP:PORT (IPv6 addresses go in brackets, ports are 1-65535)",
                "write e.g. \"http://10.20.0.5:8000\" or \"http://[fd00::5]:8000\"",
            );
        }
        return refuse(
            "the host must be an IP address: the model server is reached through the tunnel, where there is no DNS",
            "use the model server's IP address as seen from the corp peer's network, e.g. \"http://10.20.0.5:8000\"",
        );
    };
    if addr.port() == 0 {
        return refuse(
            "port 0 is not a port",
            "use the model server's port, e.g. 8000",
        );
    }
    Ok(addr)
}

/// The API path prefix of an upstream URL (`path` is empty or starts with `/`): plain segments,
/// no trailing slash, `/v1` when empty.
fn parse_base_path(path: &str) -> Result<String, (String, String)> {
    if path.contains(['?', '#']) {
        return refuse(
            "must not have a query or fragment",
            "give only the path prefix of the API, e.g. /v1",
        );
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(DEFAULT_UPSTREAM_BASE_PATH.to_string());
    }
    for seg in trimmed[1..].split('/') {
        let ok = !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b));
        if !ok {
            return refuse(
                &format!("path segment {seg:?} is not allowed (empty, dot segments or unusual characters)"),
                "give a plain path prefix, e.g. /v1 or /openai/v1",
            );
        }
    }
    Ok(trimmed.to_string())
}

/// Parses `PUBLIC` or `PUBLIC=UPSTREAM_ID`: the name clients ask for and the id the model
/// server knows (the same when `=` is absent).
pub fn parse_model_route(v: &str) -> Result<ModelRoute, String> {
    let (public, upstream) = v.split_once('=').unwrap_or((v, v));
    check_public_model_name(public)?;
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

/// 1 to `max` characters, none of them whitespace or control characters.
fn token_ok(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Checks a public model name (what clients send as `model`): 1-128 characters without
/// spaces, commas or `=` (which separates it from the upstream id in a route).
pub fn check_public_model_name(public: &str) -> Result<(), String> {
    if !token_ok(public, 128) || public.contains([',', '=']) {
        return Err(format!(
            "public model name {public:?} must be 1-128 characters without spaces, commas or '='"
        ));
    }
    Ok(())
}
