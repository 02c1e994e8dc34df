//! `modelgate status [--json]`: asks the running daemon over its control socket and prints the
//! interface, peers, upstreams, listener, certificate and active streams, laid out like
//! `wg show`. `--json` prints the daemon's [`StatusReport`] as it is: the stable form for
//! scripts (schema in the README). When no daemon answers: exit 1 naming the socket and the fix.

use clap::Args;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::CliError;
use crate::config::{Config, DEFAULT_CONTROL_SOCKET};
use crate::control::{client, HttpsStatus, ModelStatus, PeerStatus, StatusReport, UpstreamStatus};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the daemon's status as JSON (the stable form for scripts).
    #[arg(long)]
    pub json: bool,
    /// Control socket (default: server.control_socket of the config).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

pub fn execute(config_path: &Path, a: StatusArgs) -> Result<(), CliError> {
    let socket = a
        .socket
        .clone()
        .map_or_else(|| control_socket_of(config_path), Ok)?;
    let report =
        block_on(client::status(&socket))?.map_err(|e| CliError::runtime(e.to_string()))?;
    if a.json {
        // Serialising plain data cannot fail.
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// Runs a control request on a small runtime of its own (the CLI is synchronous).
pub(crate) fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, CliError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::runtime(format!("cannot start the async runtime: {e}")))?;
    Ok(rt.block_on(f))
}

/// The control socket the daemon of `config_path` uses. A config that does not validate (say,
/// one being edited before `reload`) still names its socket: `[server] control_socket` is
/// read from the raw TOML then. A file that cannot be read names none, so the default
/// applies; a file that is not TOML at all is an invalid config (exit 64 with the parse
/// error), never a silent fallback to the default socket (which would say "no daemon answers"
/// about a daemon that runs elsewhere).
pub fn control_socket_of(config_path: &Path) -> Result<PathBuf, CliError> {
    if let Ok(c) = Config::load(config_path) {
        return Ok(c.server.control_socket);
    }
    let Ok(text) = std::fs::read_to_string(config_path) else {
        return Ok(PathBuf::from(DEFAULT_CONTROL_SOCKET));
    };
    let unknown = |why: String| {
        CliError::config(format!(
            "{}: {why}, so the daemon's control socket (server.control_socket) is unknown; \
             fix: correct the file (a running daemon keeps its current config until a \
             reload succeeds), or pass --socket PATH",
            config_path.display()
        ))
    };
    let doc = text
        .parse::<toml_edit::DocumentMut>()
        .map_err(|e| unknown(format!("not valid TOML ({})", e.to_string().trim())))?;
    let raw = match doc.get("server").and_then(|t| t.get("control_socket")) {
        None => None,
        Some(v) => Some(
            v.as_str()
                .map(PathBuf::from)
                .ok_or_else(|| unknown("server.control_socket is not a string".into()))?,
        ),
    };
    Ok(match raw {
        Some(p) if p.is_absolute() => p,
        Some(p) => config_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join(p),
        None => PathBuf::from(DEFAULT_CONTROL_SOCKET),
    })
}

/// `1.23 KiB`, like `wg show`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

/// The human form.
pub fn render(s: &StatusReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "interface: modelgate (pid {}, up {} s)",
        s.pid, s.uptime_seconds
    );
    let _ = writeln!(o, "  public key: {}", s.interface.public_key);
    let _ = writeln!(o, "  listening port: {}", s.interface.listen_port);
    let _ = writeln!(o, "  address: {}", s.interface.address);
    for p in &s.peers {
        render_peer(&mut o, p);
    }
    for u in &s.upstreams {
        render_upstream(&mut o, u);
    }
    for m in &s.models {
        render_model(&mut o, m);
    }
    o.push('\n');
    render_https(&mut o, s.https.as_ref());
    if let Some(st) = &s.store {
        render_store(&mut o, st);
    }
    if let Some(m) = &s.metrics_listen {
        let _ = writeln!(o, "metrics: http://{m}/metrics");
    }
    if s.streams.is_empty() {
        let _ = writeln!(o, "active streams: none");
    } else {
        let _ = writeln!(o, "active streams:");
        for k in &s.streams {
            let _ = writeln!(o, "  {} ({}): {}", k.key_id, k.key_name, k.active);
        }
    }
    o
}

/// One `peer:` block, like `wg show`.
fn render_peer(o: &mut String, p: &PeerStatus) {
    let _ = writeln!(o, "\npeer: {} ({})", p.public_key, p.name);
    if let Some(e) = &p.endpoint {
        let _ = writeln!(o, "  endpoint: {e}");
    }
    let ips = if p.allowed_ips.is_empty() {
        "(none)".to_string()
    } else {
        p.allowed_ips.join(", ")
    };
    let _ = writeln!(o, "  allowed ips: {ips}");
    match p.latest_handshake_seconds_ago {
        Some(1) => {
            let _ = writeln!(o, "  latest handshake: 1 second ago");
        }
        Some(n) => {
            let _ = writeln!(o, "  latest handshake: {n} seconds ago");
        }
        None => {
            let _ = writeln!(o, "  latest handshake: (none)");
        }
    }
    let _ = writeln!(
        o,
        "  transfer: {} received, {} sent",
        bytes(p.rx_bytes),
        bytes(p.tx_bytes)
    );
    if let Some(k) = p.persistent_keepalive {
        let _ = writeln!(o, "  persistent keepalive: every {k} seconds");
    }
    render_peer_health(o, p);
}

/// The `last received` and (when not up) `state` lines of a peer.
fn render_peer_health(o: &mut String, p: &PeerStatus) {
    match p.last_received_seconds_ago {
        Some(1) => {
            let _ = writeln!(o, "  last received: 1 second ago");
        }
        Some(n) => {
            let _ = writeln!(o, "  last received: {n} seconds ago");
        }
        None => {}
    }
    let limit = p.silent_after_seconds;
    match p.state.as_str() {
        "" | "up" => {}
        "silent" => {
            let since = p
                .silent_since_unix
                .map(|t| crate::civil::rfc3339_unix(i64::try_from(t).unwrap_or(i64::MAX)))
                .unwrap_or_else(|| "(unknown)".into());
            let _ = writeln!(
                o,
                "  state: SILENT since {since} (nothing received, not even a keepalive, for more than {limit} s: its WireGuard is down or its NAT/firewall drops UDP; requests get 503)"
            );
        }
        "no_handshake" => {
            let _ = writeln!(
                o,
                "  state: no handshake since the daemon started (requests get 503)"
            );
        }
        "stale" => {
            let _ = writeln!(o, "  state: latest handshake too old (requests get 503)");
        }
        other => {
            let _ = writeln!(o, "  state: {other}");
        }
    }
}

/// One `upstream:` block.
fn render_upstream(o: &mut String, u: &UpstreamStatus) {
    let _ = writeln!(o, "\nupstream: {}", u.name);
    let _ = writeln!(o, "  url: {}", u.url);
    let _ = writeln!(o, "  reachable: {}", if u.reachable { "yes" } else { "no" });
    let models = if u.models.is_empty() {
        "(none known)".to_string()
    } else {
        u.models.join(", ")
    };
    let _ = writeln!(o, "  models: {models}");
    match u.max_concurrent {
        Some(max) => {
            let _ = writeln!(
                o,
                "  in flight: {} of {max} ({} waiting)",
                u.in_flight, u.queued
            );
        }
        None => {
            let _ = writeln!(o, "  in flight: {}", u.in_flight);
        }
    }
    render_health(o, u);
}

/// The health lines of an `upstream:` block.
fn render_health(o: &mut String, u: &UpstreamStatus) {
    let error = u.last_error.as_deref().map(|e| format!(": {e}"));
    match (u.health.as_str(), u.ejected_seconds_left) {
        ("healthy", _) => {
            let _ = writeln!(o, "  health: healthy");
            if let Some(e) = &error {
                let _ = writeln!(o, "  last error{e}");
            }
        }
        (h, left) => {
            let left = left.map_or(String::new(), |s| format!(" for {s} s more"));
            let _ = writeln!(o, "  health: {h}{left}{}", error.unwrap_or_default());
        }
    }
    if u.retries_total > 0 || u.ejections_total > 0 {
        let _ = writeln!(
            o,
            "  retried elsewhere: {}, ejections: {}",
            u.retries_total, u.ejections_total
        );
    }
}

/// One `model:` block: its balancing, replicas and queue.
fn render_model(o: &mut String, m: &ModelStatus) {
    let _ = writeln!(o, "\nmodel: {} ({})", m.name, m.balance);
    let _ = writeln!(
        o,
        "  replicas: {} ({} of {} healthy)",
        m.replicas.join(", "),
        m.healthy_replicas,
        m.replicas.len()
    );
    if m.queued > 0 {
        let _ = writeln!(o, "  waiting: {}", m.queued);
    }
}

/// The `store:` lines: which store, and since when it is degraded.
fn render_store(o: &mut String, st: &crate::control::StoreStatus) {
    let _ = writeln!(
        o,
        "store: {} {}{}",
        st.kind,
        st.location,
        if st.degraded { " DEGRADED" } else { "" }
    );
    if let (Some(since), Some(p)) = (&st.keys_degraded_since, &st.keys_problem) {
        let _ = writeln!(
            o,
            "  key reloads failing since {since}: {p} (the last key set stays in service)"
        );
    }
    if let (Some(since), Some(p)) = (&st.usage_degraded_since, &st.usage_problem) {
        let _ = writeln!(
            o,
            "  usage writes failing since {since}: {p} ({} rows, {} requests spooled locally)",
            st.spooled_rows, st.spooled_requests
        );
    } else if st.spooled_rows > 0 {
        let _ = writeln!(o, "  spool: {} rows waiting", st.spooled_rows);
    }
}

/// The `https:` lines: listener, certificate expiry, ACME state.
fn render_https(o: &mut String, https: Option<&HttpsStatus>) {
    match https {
        Some(h) => {
            let _ = writeln!(o, "https: {}", h.listen);
            match (&h.certificate_not_after, h.certificate_days_left) {
                (Some(t), Some(d)) if d < 0 => {
                    let _ = writeln!(o, "  certificate: EXPIRED {t} ({} days ago)", -d);
                }
                (Some(t), Some(d)) => {
                    let _ = writeln!(o, "  certificate expires: {t} ({d} days left)");
                }
                _ => {
                    let _ = writeln!(o, "  certificate expires: (unknown)");
                }
            }
            if let Some(a) = &h.acme {
                let state = if a.issued {
                    format!("issued by {}", a.directory)
                } else {
                    "not issued yet (a self-signed placeholder is served)".to_string()
                };
                let _ = writeln!(o, "  acme: {} — {state}", a.domain);
                if let Some(t) = &a.next_renewal {
                    let _ = writeln!(o, "  next renewal: {t}");
                }
                if let Some(e) = &a.last_error {
                    let _ = writeln!(o, "  last error ({} in a row): {e}", a.failures);
                }
            }
        }
        None => {
            let _ = writeln!(o, "https: off (no [tls] in the config)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::*;

    #[test]
    fn renders_like_wg_show() {
        let s = StatusReport {
            version: "0.1.0".into(),
            pid: 42,
            uptime_seconds: 7,
            config: "/etc/modelgate/modelgate.toml".into(),
            interface: InterfaceStatus {
                public_key: "APPKEY=".into(),
                listen: "0.0.0.0:51820".into(),
                listen_port: 51820,
                address: "10.99.0.1/24".into(),
            },
            peers: vec![PeerStatus {
                name: "corp".into(),
                public_key: "PEERKEY=".into(),
                endpoint: Some("192.0.2.10:40000".into()),
                allowed_ips: vec!["10.99.0.2/32".into(), "10.20.0.0/24".into()],
                latest_handshake_seconds_ago: Some(12),
                latest_handshake_unix: Some(1),
                rx_bytes: 2048,
                tx_bytes: 10,
                persistent_keepalive: Some(25),
                state: "up".into(),
                last_received_seconds_ago: Some(3),
                last_received_unix: Some(2),
                silent_since_unix: None,
                silent_after_seconds: 55,
            }],
            upstreams: vec![
                UpstreamStatus {
                    name: "vllm".into(),
                    url: "http://10.20.0.5:8000/v1".into(),
                    reachable: true,
                    models: vec!["a".into(), "b".into()],
                    in_flight: 3,
                    max_concurrent: Some(8),
                    queued: 2,
                    health: "healthy".into(),
                    ejected_until_unix: None,
                    ejected_seconds_left: None,
                    last_error: None,
                    last_error_unix: None,
                    retries_total: 0,
                    ejections_total: 0,
                },
                UpstreamStatus {
                    name: "vllm2".into(),
                    url: "http://10.30.0.5:8000/v1".into(),
                    reachable: false,
                    models: vec!["a".into()],
                    in_flight: 0,
                    max_concurrent: None,
                    queued: 0,
                    health: "ejected".into(),
                    ejected_until_unix: Some(1),
                    ejected_seconds_left: Some(4),
                    last_error: Some("the model server refused the connection".into()),
                    last_error_unix: Some(1),
                    retries_total: 6,
                    ejections_total: 3,
                },
            ],
            models: vec![ModelStatus {
                name: "a".into(),
                balance: "affinity".into(),
                replicas: vec!["vllm".into(), "vllm2".into()],
                healthy_replicas: 1,
                queued: 2,
            }],
            https: Some(HttpsStatus {
                listen: "0.0.0.0:443".into(),
                certificate_not_after: Some("2027-01-01T00:00:00Z".into()),
                certificate_not_after_unix: Some(0),
                certificate_days_left: Some(33),
                acme: Some(crate::control::AcmeStatusReport {
                    domain: "gw.example.com".into(),
                    directory: "https://acme.example/dir".into(),
                    issued: true,
                    serial: Some("0a1b".into()),
                    next_renewal: Some("2026-12-02T00:00:00Z".into()),
                    next_renewal_unix: Some(0),
                    last_issued: None,
                    last_error: Some("connection refused".into()),
                    failures: 2,
                }),
            }),
            metrics_listen: Some("127.0.0.1:9464".into()),
            streams: vec![StreamStatus {
                key_id: "abc".into(),
                key_name: "alice".into(),
                active: 3,
            }],
            store: Some(crate::control::StoreStatus {
                kind: "postgres".into(),
                location: "postgres://mg@db:5432/mg".into(),
                degraded: true,
                keys_degraded_since: None,
                keys_degraded_since_unix: None,
                keys_problem: None,
                usage_degraded_since: Some("2026-12-01T10:00:00Z".into()),
                usage_degraded_since_unix: Some(1),
                usage_problem: Some("connection refused".into()),
                spooled_rows: 12,
                spooled_requests: 340,
            }),
        };
        let t = render(&s);
        for want in [
            "store: postgres postgres://mg@db:5432/mg DEGRADED\n  usage writes failing since 2026-12-01T10:00:00Z: connection refused (12 rows, 340 requests spooled locally)\n",
            "interface: modelgate (pid 42, up 7 s)\n  public key: APPKEY=\n  listening port: 51820\n",
            "peer: PEERKEY= (corp)\n  endpoint: 192.0.2.10:40000\n  allowed ips: 10.99.0.2/32, 10.20.0.0/24\n  latest handshake: 12 seconds ago\n  transfer: 2.00 KiB received, 10 B sent\n  persistent keepalive: every 25 seconds\n",
            "upstream: vllm\n  url: http://10.20.0.5:8000/v1\n  reachable: yes\n  models: a, b\n  in flight: 3 of 8 (2 waiting)\n  health: healthy\n\n",
            "upstream: vllm2\n  url: http://10.30.0.5:8000/v1\n  reachable: no\n  models: a\n  in flight: 0\n  health: ejected for 4 s more: the model server refused the connection\n  retried elsewhere: 6, ejections: 3\n",
            "model: a (affinity)\n  replicas: vllm, vllm2 (1 of 2 healthy)\n  waiting: 2\n",
            "https: 0.0.0.0:443\n  certificate expires: 2027-01-01T00:00:00Z (33 days left)\n  acme: gw.example.com — issued by https://acme.example/dir\n  next renewal: 2026-12-02T00:00:00Z\n  last error (2 in a row): connection refused\n",
            "active streams:\n  abc (alice): 3\n",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        assert!(
            t.contains(
                "  persistent keepalive: every 25 seconds\n  last received: 3 seconds ago\n"
            ),
            "{t}"
        );
        assert!(!t.contains("state:"), "an up peer has no state line:\n{t}");
        // The JSON round-trips (the CLI prints what the daemon sent).
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<StatusReport>(&j).unwrap(), s);

        // A silent peer says since when and what it means.
        let mut silent = s.clone();
        let p = &mut silent.peers[0];
        p.state = "silent".into();
        p.last_received_seconds_ago = Some(62);
        p.silent_since_unix = Some(1_795_000_000);
        let t = render(&silent);
        assert!(
            t.contains("  last received: 62 seconds ago\n  state: SILENT since 2026-11-18T")
                && t.contains("for more than 55 s"),
            "{t}"
        );
        // A daemon from before the fields: the JSON still parses, nothing extra printed.
        let mut old: serde_json::Value = serde_json::to_value(&s).unwrap();
        for k in [
            "state",
            "last_received_seconds_ago",
            "last_received_unix",
            "silent_since_unix",
            "silent_after_seconds",
        ] {
            old["peers"][0].as_object_mut().unwrap().remove(k);
        }
        let parsed: StatusReport = serde_json::from_value(old).unwrap();
        assert_eq!(parsed.peers[0].state, "");
        assert!(!render(&parsed).contains("last received"));
    }

    #[test]
    fn socket_of_an_invalid_config_is_still_found() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("modelgate.toml");
        std::fs::write(
            &cfg,
            "[server]\ncontrol_socket = \"run/c.sock\"\nbogus = 1\n",
        )
        .unwrap();
        assert_eq!(
            control_socket_of(&cfg).unwrap(),
            dir.path().join("run/c.sock")
        );
        // Not TOML: exit 64 with the parse error, never the default socket.
        std::fs::write(&cfg, "not toml [").unwrap();
        let e = control_socket_of(&cfg).unwrap_err();
        assert_eq!(e.code, super::super::EXIT_CONFIG);
        assert!(e.message.contains("not valid TOML"), "{}", e.message);
        assert!(e.message.contains("--socket"), "{}", e.message);
        std::fs::write(&cfg, "[server]\ncontrol_socket = 7\n").unwrap();
        assert_eq!(
            control_socket_of(&cfg).unwrap_err().code,
            super::super::EXIT_CONFIG
        );
        // No file at all: nothing names a socket, the default applies.
        assert_eq!(
            control_socket_of(&dir.path().join("missing.toml")).unwrap(),
            PathBuf::from(DEFAULT_CONTROL_SOCKET)
        );
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(5 << 30), "5.00 GiB");
    }
}
