//! The WireGuard UDP socket: non-blocking receive and send that keep track of which local
//! address a peer dialled.
//!
//! Bound to a specific address, plain `recvfrom`/`sendto` suffice. Bound to a wildcard
//! (`0.0.0.0` or `[::]`), the kernel would pick the reply's source address by route, which on a
//! multi-address host may differ from the address the peer dialled, and a stateful firewall in
//! front of the peer then drops the reply (seen with onetun, LAB.md). So on a wildcard socket we
//! read the destination address of each datagram with `IP_PKTINFO`/`IPV6_PKTINFO` and send
//! replies from that address. Never blocks: callers get `WouldBlock` and wait for readiness.

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Socket buffer we ask for. A peer sends a whole TCP window of datagrams back to back (up to
/// 1 MiB with our default window); the default 208 KiB receive buffer holds only ~90 of them,
/// and every overflow costs TCP a retransmission (smoltcp's minimum RTO is 1 s). wireguard-go
/// does the same for the same reason.
const SOCKET_BUFFER: usize = 8 << 20;

/// Below this, losses under load are likely: say so once, with the fix.
const SOCKET_BUFFER_WARN: usize = 2 << 20;

fn size_buffers(sock: &std::net::UdpSocket) {
    // SO_RCVBUFFORCE needs CAP_NET_ADMIN (tests, root); otherwise the kernel caps SO_RCVBUF at
    // net.core.rmem_max, which the install script raises through /etc/sysctl.d.
    if setsockopt(sock, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(sock, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if setsockopt(sock, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(sock, sockopt::SndBuf, &SOCKET_BUFFER);
    }
    let rcv = nix::sys::socket::getsockopt(sock, sockopt::RcvBuf).unwrap_or(0);
    if rcv < SOCKET_BUFFER_WARN {
        tracing::warn!(
            bytes = rcv,
            "WireGuard UDP receive buffer is small; bursts will be dropped. Fix: sysctl -w net.core.rmem_max={SOCKET_BUFFER} net.core.wmem_max={SOCKET_BUFFER} (the install script sets this in /etc/sysctl.d/60-modelgate.conf)"
        );
    }
}

pub struct UdpEndpoint {
    sock: UdpSocket,
    /// The same socket for sending. Sends go straight to the kernel: tokio's `try_send_*`
    /// report `WouldBlock` until its reactor has seen the socket writable, which silently ate
    /// the first handshake initiation of a freshly bound socket (a 5 s REKEY_TIMEOUT stall).
    send: std::net::UdpSocket,
    pktinfo: bool,
    cmsg: Vec<u8>,
}

impl UdpEndpoint {
    /// Binds the WireGuard port. A wildcard address turns on per-packet source tracking.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let std_sock = std::net::UdpSocket::bind(addr)?;
        std_sock.set_nonblocking(true)?;
        let pktinfo = addr.ip().is_unspecified();
        if pktinfo {
            let r = match addr {
                SocketAddr::V4(_) => setsockopt(&std_sock, sockopt::Ipv4PacketInfo, &true),
                SocketAddr::V6(_) => setsockopt(&std_sock, sockopt::Ipv6RecvPacketInfo, &true),
            };
            r.map_err(io::Error::from)?;
        }
        size_buffers(&std_sock);
        let send = std_sock.try_clone()?;
        let sock = UdpSocket::from_std(std_sock)?;
        Ok(UdpEndpoint {
            sock,
            send,
            pktinfo,
            cmsg: nix::cmsg_space!(nix::libc::in6_pktinfo),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Waits until a datagram may be read.
    pub async fn readable(&self) -> io::Result<()> {
        self.sock.readable().await
    }

    /// Reads one datagram without blocking: `(len, from, local address it was sent to)`.
    pub fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
        if !self.pktinfo {
            let (n, from) = self.sock.try_recv_from(buf)?;
            return Ok((n, from, None));
        }
        let fd = self.sock.as_raw_fd();
        let cmsg = &mut self.cmsg;
        self.sock.try_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(buf)];
            let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(cmsg), MsgFlags::empty())
                .map_err(io::Error::from)?;
            let from = msg
                .address
                .and_then(|a| {
                    if let Some(v4) = a.as_sockaddr_in() {
                        Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                    } else {
                        a.as_sockaddr_in6()
                            .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                    }
                })
                .ok_or_else(|| io::Error::other("datagram without a source address"))?;
            let mut local = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    match c {
                        ControlMessageOwned::Ipv4PacketInfo(info) => {
                            local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                                info.ipi_spec_dst.s_addr,
                            ))));
                        }
                        ControlMessageOwned::Ipv6PacketInfo(info) => {
                            local = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                        }
                        _ => {}
                    }
                }
            }
            Ok((msg.bytes, from, local))
        })
    }

    /// Sends one datagram without blocking, from `local` when the socket is a wildcard.
    pub fn try_send(&self, data: &[u8], to: SocketAddr, local: Option<IpAddr>) -> io::Result<()> {
        match (self.pktinfo, local) {
            (true, Some(local)) => {
                let fd = self.send.as_raw_fd();
                let dest = SockaddrStorage::from(to);
                {
                    let iov = [IoSlice::new(data)];
                    let r = match local {
                        IpAddr::V4(l) => {
                            let info = nix::libc::in_pktinfo {
                                ipi_ifindex: 0,
                                ipi_spec_dst: nix::libc::in_addr {
                                    s_addr: u32::from(l).to_be(),
                                },
                                ipi_addr: nix::libc::in_addr { s_addr: 0 },
                            };
                            sendmsg(
                                fd,
                                &iov,
                                &[ControlMessage::Ipv4PacketInfo(&info)],
                                MsgFlags::empty(),
                                Some(&dest),
                            )
                        }
                        IpAddr::V6(l) => {
                            let info = nix::libc::in6_pktinfo {
                                ipi6_addr: nix::libc::in6_addr {
                                    s6_addr: l.octets(),
                                },
                                ipi6_ifindex: 0,
                            };
                            sendmsg(
                                fd,
                                &iov,
                                &[ControlMessage::Ipv6PacketInfo(&info)],
                                MsgFlags::empty(),
                                Some(&dest),
                            )
                        }
                    };
                    r.map(|_| ()).map_err(io::Error::from)
                }
            }
            _ => self.send.send_to(data, to).map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wildcard_socket_reports_the_dialled_address_and_replies_from_it() {
        let mut server = UdpEndpoint::bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = server.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // 127.0.0.2 is loopback too: the reply must come from it, not from 127.0.0.1.
        client.send_to(b"ping", ("127.0.0.2", port)).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, from, local) = loop {
            server.readable().await.unwrap();
            match server.try_recv(&mut buf) {
                Ok(r) => break r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(local, Some("127.0.0.2".parse().unwrap()));
        server.try_send(b"pong", from, local).unwrap();
        let (n, reply_from) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.recv_from(&mut buf),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(&buf[..n], b"pong");
        assert_eq!(reply_from.ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
    }
}
