//! The HTTPS listening socket: handed over by systemd (socket activation, `modelgate.socket`) or
//! bound by the daemon itself.
//!
//! With socket activation the listening socket belongs to systemd and outlives every daemon
//! process: while one process drains and the next starts, new connections wait in the
//! socket's backlog instead of being refused. The daemon takes the socket systemd passed
//! (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`, fd 3 on; the `listenfd` crate turns the fd into
//! a listener, so no `unsafe` is needed here) whose address is exactly `[server] listen`; one
//! that listens elsewhere is refused with the fix, because the firewall, `doctor` and `status`
//! all go by `server.listen`. Without any socket from systemd it binds `server.listen` itself,
//! as before. It never binds a socket other than the one the config names.

use std::net::SocketAddr;

/// A listening TCP socket passed by the service manager.
#[derive(Debug)]
pub struct InheritedSocket {
    /// Its `FileDescriptorName=` (`https` in `modelgate.socket`), when systemd gave one.
    pub name: Option<String>,
    pub addr: SocketAddr,
    pub listener: std::net::TcpListener,
}

/// The sockets systemd passed to this process (empty when not socket-activated).
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<InheritedSocket>,
}

impl Inherited {
    /// Takes the sockets systemd passed. Call it once, early, before other threads exist: it
    /// clears `LISTEN_PID`/`LISTEN_FDS` from the environment (so children do not inherit
    /// them). Passed fds that are not listening TCP sockets are logged and left alone.
    pub fn from_env() -> Inherited {
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|v| v.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        let mut fds = listenfd::ListenFd::from_env();
        let mut sockets = Vec::new();
        for i in 0..fds.len() {
            let name = names.get(i).filter(|n| !n.is_empty()).cloned();
            match fds.take_tcp_listener(i) {
                Ok(Some(listener)) => match listener.local_addr() {
                    Ok(addr) => sockets.push(InheritedSocket {
                        name,
                        addr,
                        listener,
                    }),
                    Err(e) => tracing::warn!(fd = 3 + i, error = %e, "socket from systemd ignored"),
                },
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    fd = 3 + i,
                    name = ?name,
                    error = %e,
                    "socket from systemd ignored: modelgate takes only a listening TCP socket (ListenStream=)"
                ),
            }
        }
        Inherited { sockets }
    }

    /// For tests: these sockets, as if systemd had passed them.
    pub fn from_sockets(sockets: Vec<InheritedSocket>) -> Inherited {
        Inherited { sockets }
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The socket for the HTTPS listener `want` (`[server] listen`): `Ok(None)` when systemd
    /// passed none (bind it yourself), an error naming the fix when it passed sockets but none
    /// on `want`. Sockets not taken are closed.
    pub fn take_https(&mut self, want: SocketAddr) -> Result<Option<InheritedSocket>, String> {
        let addrs: Vec<SocketAddr> = self.sockets.iter().map(|s| s.addr).collect();
        let pick = select(&addrs, want)?;
        let mut taken = None;
        for (i, s) in std::mem::take(&mut self.sockets).into_iter().enumerate() {
            if Some(i) == pick {
                taken = Some(s);
            } else {
                tracing::warn!(addr = %s.addr, name = ?s.name, "socket from systemd not used (it is not [server] listen); closed");
            }
        }
        Ok(taken)
    }
}

/// Which of the inherited sockets listening on `addrs` serves `want`: the one on exactly
/// `want` (`Ok(None)` without any). An inherited `[::]:443` is no `0.0.0.0:443`: a dual-stack
/// socket would show IPv4 clients as IPv4-mapped IPv6 addresses, which `--allow-cidr` and the
/// audit log would not match, so the unit must name the same address as the config.
pub fn select(addrs: &[SocketAddr], want: SocketAddr) -> Result<Option<usize>, String> {
    if addrs.is_empty() {
        return Ok(None);
    }
    if let Some(i) = addrs.iter().position(|a| *a == want) {
        return Ok(Some(i));
    }
    let got: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    Err(format!(
        "systemd passed a listening socket on {} but [server] listen is {want}; fix: make them the same, either `systemctl edit modelgate.socket` with [Socket] ListenStream= (empty, to clear the default) and ListenStream={want}, or change [server] listen to match, then `systemctl restart modelgate.socket modelgate.service`",
        got.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// No socket: bind yourself. The one on exactly `server.listen` is taken, wherever it is
    /// in the list; none on it is an error naming both addresses and the fix; a wildcard of
    /// the other family or another port is no match.
    #[test]
    fn selection() {
        assert_eq!(select(&[], a("0.0.0.0:443")), Ok(None));
        assert_eq!(select(&[a("0.0.0.0:443")], a("0.0.0.0:443")), Ok(Some(0)));
        assert_eq!(
            select(&[a("127.0.0.1:9"), a("192.0.2.1:443")], a("192.0.2.1:443")),
            Ok(Some(1))
        );
        for other in ["[::]:443", "0.0.0.0:8443", "192.0.2.1:443"] {
            let e = select(&[a(other)], a("0.0.0.0:443")).unwrap_err();
            assert!(e.contains(other) && e.contains("0.0.0.0:443"), "{e}");
            assert!(e.contains("systemctl edit modelgate.socket"), "{e}");
        }
    }

    /// A real listening socket handed over is taken as it is (same local address, still
    /// accepting); the ones not taken are closed.
    #[test]
    fn take_https_hands_over_the_matching_socket_and_closes_the_rest() {
        let listen = |addr: &str| {
            let listener = std::net::TcpListener::bind(addr).unwrap();
            InheritedSocket {
                name: Some("https".into()),
                addr: listener.local_addr().unwrap(),
                listener,
            }
        };
        let keep = listen("127.0.0.1:0");
        let drop_me = listen("127.0.0.1:0");
        let (want, other) = (keep.addr, drop_me.addr);
        let mut inh = Inherited::from_sockets(vec![drop_me, keep]);
        let got = inh.take_https(want).unwrap().expect("the matching socket");
        assert_eq!(got.listener.local_addr().unwrap(), want);
        assert!(inh.is_empty());
        assert!(
            std::net::TcpStream::connect(want).is_ok(),
            "still listening"
        );
        assert!(
            std::net::TcpStream::connect(other).is_err(),
            "the other socket was closed"
        );
        let mut none = Inherited::default();
        assert!(none.take_https(want).unwrap().is_none());
    }
}
