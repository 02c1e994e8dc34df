//! `[server]`: the HTTPS and metrics listeners, the state directory and the control socket.
//! Only parsed and resolved here: never creates the directory, never binds (the daemon does).

use std::path::{Path, PathBuf};

use super::fields::{resolve, socket_addr};
use crate::config::raw::RawServer;
use crate::config::{
    ConfigErrors, ServerConfig, DEFAULT_CONTROL_SOCKET, DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN,
    DEFAULT_STATE_DIR,
};

/// The state directory `s` names, resolved against the config's folder `base`. Other tables'
/// paths (the WireGuard key) resolve against it even when another `[server]` field is bad.
pub(super) fn state_dir(s: &RawServer, base: &Path) -> PathBuf {
    resolve(base, s.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR))
}

/// Validates `[server]` (every key has a default). `None` when a listener is unusable.
pub(super) fn validate(
    errs: &mut ConfigErrors,
    s: &RawServer,
    base: &Path,
) -> Option<ServerConfig> {
    let listen = socket_addr(errs, "server.listen", s.listen.as_deref(), DEFAULT_LISTEN);
    let state_dir = state_dir(s, base);
    if s.state_dir.as_deref() == Some("") {
        errs.push(
            "server.state_dir",
            "\"\"",
            "is empty",
            format!("set it to a directory, e.g. \"{DEFAULT_STATE_DIR}\""),
        );
    }
    let control_socket = resolve(
        base,
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
        errs,
        "server.metrics_listen",
        s.metrics_listen.as_deref(),
        DEFAULT_METRICS_LISTEN,
    );
    Some(ServerConfig {
        listen: listen?,
        state_dir,
        control_socket,
        metrics_listen: metrics_listen?,
    })
}
