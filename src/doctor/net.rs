//! Hops 2 and 4 at the socket level: does the HTTPS address accept TCP, who holds a port when
//! the daemon does not, what the public name resolves to, and which addresses are this host's.
//!
//! Read-only: connects, reads `/proc`, asks the resolver; never binds or changes anything.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

/// Longest wait for one TCP connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for the resolver; past it DNS counts as unreachable (hop skipped).
pub const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a local client reaches a listener bound to `listen`: the wildcard addresses map to the
/// loopback address of their family.
pub fn dial_target(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(a) if a.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(a) if a.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

/// TCP connect to `target`, bounded by [`CONNECT_TIMEOUT`].
pub async fn accepts(target: SocketAddr) -> io::Result<()> {
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
        Ok(r) => r.map(drop),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {CONNECT_TIMEOUT:?}"),
        )),
    }
}

/// A process holding a listening TCP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortOwner {
    pub pid: u32,
    pub command: String,
}

/// Who listens on TCP `port` in this network namespace: the socket inodes of LISTEN entries in
/// `/proc/net/tcp{,6}` matched against the processes' `/proc/PID/fd` links. Best effort (a
/// process of another user may be hidden without root); bounded by the process and fd count.
pub fn port_owners(port: u16) -> Vec<PortOwner> {
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut owners = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return owners;
    };
    for p in procs.flatten().take(100_000) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().take(1_000_000).any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| socket_inode(&l))
                .is_some_and(|i| inodes.contains(&i))
        });
        if holds {
            let command = std::fs::read_to_string(p.path().join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            owners.push(PortOwner { pid, command });
        }
    }
    owners
}

fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Inodes of the LISTEN (state 0A) sockets on `port` in a `/proc/net/tcp` style table.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1)?;
            let st = f.get(3)?;
            let inode = f.get(9)?.parse::<u64>().ok()?;
            let p = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (p == port && *st == "0A" && inode != 0).then_some(inode)
        })
        .collect()
}

/// The addresses of this host's interfaces (`getifaddrs`).
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(s) = a.address else { continue };
            if let Some(v4) = s.as_sockaddr_in() {
                out.push(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = s.as_sockaddr_in6() {
                out.push(IpAddr::V6(v6.ip()));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// What resolving the public name gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    Addresses(Vec<IpAddr>),
    /// The name does not exist or has no address: a real failure.
    NotFound(String),
    /// No resolver answered (no network, no DNS server reachable): not judged.
    Unreachable(String),
}

/// Resolves `name` through the system resolver (`/etc/hosts`, then DNS, as nsswitch says),
/// bounded by [`DNS_TIMEOUT`]. An IP literal resolves to itself.
pub async fn resolve(name: &str) -> Resolved {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Resolved::Addresses(vec![ip]);
    }
    let lookup = tokio::net::lookup_host((name.to_string(), 443));
    match tokio::time::timeout(DNS_TIMEOUT, lookup).await {
        Err(_) => Resolved::Unreachable(format!("no DNS answer within {DNS_TIMEOUT:?}")),
        Ok(Err(e)) => classify_lookup_error(&e.to_string()),
        Ok(Ok(addrs)) => {
            let mut v: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            v.sort();
            v.dedup();
            if v.is_empty() {
                Resolved::NotFound("no addresses".into())
            } else {
                Resolved::Addresses(v)
            }
        }
    }
}

/// getaddrinfo's errors as text (std exposes no code): `EAI_AGAIN` ("Temporary failure in name
/// resolution") means no server answered, which is how "no network" looks; everything else
/// (`EAI_NONAME` "Name or service not known", `EAI_NODATA`, `EAI_FAIL`) is an answer about the
/// name.
fn classify_lookup_error(message: &str) -> Resolved {
    let m = message.to_ascii_lowercase();
    if m.contains("temporary failure") || m.contains("try again") || m.contains("timed out") {
        Resolved::Unreachable(message.to_string())
    } else {
        Resolved::NotFound(message.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_dial_loopback() {
        assert_eq!(
            dial_target("0.0.0.0:443".parse().unwrap()),
            "127.0.0.1:443".parse().unwrap()
        );
        assert_eq!(
            dial_target("[::]:8443".parse().unwrap()),
            "[::1]:8443".parse().unwrap()
        );
        assert_eq!(
            dial_target("192.0.2.1:443".parse().unwrap()),
            "192.0.2.1:443".parse().unwrap()
        );
    }

    #[test]
    fn proc_net_tcp_listeners() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100020C:01BB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:01BB 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(listening_inodes(table, 443), [4242]);
        assert_eq!(listening_inodes(table, 8080), [4444]);
        assert!(listening_inodes(table, 22).is_empty());
        assert!(listening_inodes("garbage\n: : :", 443).is_empty());
        assert_eq!(socket_inode(Path::new("socket:[4242]")), Some(4242));
        assert_eq!(socket_inode(Path::new("pipe:[1]")), None);
    }

    #[test]
    fn our_own_listener_is_found_by_pid() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let owners = port_owners(port);
        assert!(
            owners.iter().any(|o| o.pid == std::process::id()),
            "{owners:?}"
        );
    }

    #[test]
    fn resolver_errors_are_classified() {
        assert!(matches!(
            classify_lookup_error(
                "failed to lookup address information: Temporary failure in name resolution"
            ),
            Resolved::Unreachable(_)
        ));
        assert!(matches!(
            classify_lookup_error(
                "failed to lookup address information: Name or service not known"
            ),
            Resolved::NotFound(_)
        ));
    }

    #[tokio::test]
    async fn literals_and_localhost_resolve() {
        assert_eq!(
            resolve("192.0.2.1").await,
            Resolved::Addresses(vec!["192.0.2.1".parse().unwrap()])
        );
        match resolve("localhost").await {
            Resolved::Addresses(a) => assert!(a.iter().any(|ip| ip.is_loopback()), "{a:?}"),
            other => panic!("{other:?}"),
        }
        assert!(local_addresses().iter().any(|ip| ip.is_loopback()));
    }
}
