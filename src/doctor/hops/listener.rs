//! Hop 2: the daemon answers on its control socket, runs this config, and its HTTPS address
//! accepts TCP from here. When the daemon does not answer, says who holds the port instead.

use std::net::SocketAddr;
use std::path::Path;

use crate::config::Config;
use crate::control::{client, client::ClientError, StatusReport};
use crate::doctor::{net, split_fix, Hop, HopResult};

/// What hop 2 found: the verdict, the daemon's status (when it answered) and the address the
/// HTTPS listener accepts on (when it does and it is the daemon's).
type Found = (HopResult, Option<StatusReport>, Option<SocketAddr>);

/// Hop 2.
pub(in crate::doctor) async fn listener_hop(config: &Config, socket: &Path) -> Found {
    match client::status(socket).await {
        Ok(s) => daemon_answered(config, socket, s).await,
        Err(ClientError::NotRunning { path, source }) => {
            (no_daemon(config, &path, &source).await, None, None)
        }
        Err(e) => {
            let (detail, fix) = split_fix(&e.to_string());
            (
                HopResult::fail(
                    Hop::Listener,
                    detail,
                    fix.unwrap_or_else(|| {
                        "read `journalctl -u modelgate`; restart the daemon if it is stuck".into()
                    }),
                ),
                None,
                None,
            )
        }
    }
}

/// The daemon answered: it must run this config, serve HTTPS, and accept on that address.
async fn daemon_answered(config: &Config, socket: &Path, s: StatusReport) -> Found {
    let configured = config.server.listen;
    // The daemon on this socket must run this config: hops 5-8 mix its state with this
    // file's (key store, names) otherwise.
    if !same_file(Path::new(&s.config), &config.path) {
        let runs = s.config.clone();
        return (
            HopResult::fail(
                Hop::Listener,
                format!(
                    "the daemon on {} (pid {}) runs {runs}, not {}",
                    socket.display(),
                    s.pid,
                    config.path.display()
                ),
                format!("check that one: `modelgate --config {runs} doctor`; or give this config its own server.control_socket"),
            ),
            None,
            None,
        );
    }
    let Some(https) = &s.https else {
        return (
            HopResult::fail(
                Hop::Listener,
                format!("the daemon (pid {}) runs without HTTPS: its config has no [tls]", s.pid),
                "add a [tls] table (e.g. `modelgate init --force --acme-domain NAME …`, or mode = \"files\" with cert and key) and restart modelgate",
            ),
            Some(s),
            None,
        );
    };
    let listen = https.listen.parse::<SocketAddr>().unwrap_or(configured);
    let target = net::dial_target(listen);
    match net::accepts(target).await {
        Ok(()) => {
            let mut detail = format!(
                "daemon pid {} (up {} s) accepts HTTPS on {listen}",
                s.pid, s.uptime_seconds
            );
            // Port 0 in the config means "any" (tests): the daemon's real port differs.
            if listen != configured && configured.port() != 0 {
                detail.push_str(&format!(
                    " (the config says {configured}: restart to apply it)"
                ));
            }
            (HopResult::pass(Hop::Listener, detail), Some(s), Some(target))
        }
        Err(e) => (
            HopResult::fail(
                Hop::Listener,
                format!("the daemon (pid {}) runs but its HTTPS listener {listen} does not accept connections from here ({target}): {e}", s.pid),
                "read `journalctl -u modelgate` (a full accept queue, a firewall on this host?) and restart modelgate",
            ),
            Some(s),
            None,
        ),
    }
}

/// Both paths name the same file (or, when one does not exist, the same absolute path).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => std::path::absolute(a).ok() == std::path::absolute(b).ok(),
    }
}

/// Nothing answers on the control socket: is the port free (the daemon is down) or held by
/// another program (name it)?
async fn no_daemon(config: &Config, path: &Path, source: &std::io::Error) -> HopResult {
    let configured = config.server.listen;
    let target = net::dial_target(configured);
    if net::accepts(target).await.is_err() {
        return HopResult::fail(
            Hop::Listener,
            format!(
                "the modelgate daemon is not running: no answer on {} ({source}) and nothing listens on {configured}",
                path.display()
            ),
            "start it: `systemctl start modelgate` (or `modelgate run`); `journalctl -u modelgate` says why it stopped",
        );
    }
    let owners = net::port_owners(configured.port());
    let who = if owners.is_empty() {
        "another program".to_string()
    } else {
        owners
            .iter()
            .map(|o| format!("pid {} ({})", o.pid, o.command))
            .collect::<Vec<_>>()
            .join(", ")
    };
    HopResult::fail(
        Hop::Listener,
        format!(
            "listener port taken: the modelgate daemon is not running (no answer on {}) and {who} listens on {configured}",
            path.display()
        ),
        format!(
            "stop {who} (or move modelgate with server.listen), then start modelgate: `systemctl start modelgate`"
        ),
    )
}
