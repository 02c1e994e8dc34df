//! systemd readiness (`sd_notify(3)`) without libsystemd: one datagram per state change to the
//! unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
//!
//! The daemon sends `READY=1` once the WireGuard socket, the netstack, the HTTPS, metrics and
//! control listeners are all up; `RELOADING=1` … `READY=1` around a config reload; and
//! `STOPPING=1` when SIGTERM starts the drain. Each comes with a `STATUS=` line that
//! `systemctl status` shows. (No `MONOTONIC_USEC=`: it is required only by
//! `Type=notify-reload`; the unit uses `Type=notify` and `ExecReload=modelgate reload`.)
//! Without `$NOTIFY_SOCKET` (not under systemd) nothing is sent.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to `$NOTIFY_SOCKET`. Returns
/// `Ok(false)` when the variable is unset, so the daemon runs the same outside systemd.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(path) if !path.is_empty() => {
            notify_to(&path.to_string_lossy(), state)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// [`notify`], logging a failure instead of returning it (readiness is best effort: a daemon
/// that serves but could not say so is better than one that exits).
pub fn notify_logged(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "sd_notify failed");
    }
}

/// Sends `state` to the notification socket `socket`.
pub fn notify_to(socket: &str, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), socket)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn datagrams_reach_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("modelgate-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(notify_to(dir.path().join("absent").to_str().unwrap(), "READY=1").is_err());
    }
}
