//! Userspace TCP/IP over the WireGuard tunnel: `dial` and `listen` without a kernel interface.
//!
//! One driver task (`driver.rs`) owns the UDP socket, every peer's WireGuard state
//! ([`crate::tunnel::WgCore`]) and the smoltcp interface: nothing on the packet path takes a
//! shared lock or crosses a channel per packet. The task sleeps until a datagram arrives, an
//! application stream needs service, a command comes in, or the earlier of smoltcp's next
//! deadline and the 250 ms WireGuard tick; an idle appliance therefore wakes four times a second
//! and does nothing. Every queue is bounded. The host never gets a route into the tunnel: only
//! code holding a [`Netstack`] handle can reach the networks behind a peer.
//!
//! Files: this one is the public handle (it only sends commands to the driver); `driver.rs` the
//! task and its wake-up loop; `sockets.rs` the connection table (dial, listen, slot lifetime);
//! `service.rs` moves bytes and state between one smoltcp socket and its application stream;
//! `device.rs` the smoltcp device on the WireGuard core; `stream.rs` the application side.

mod device;
mod driver;
#[cfg(test)]
mod rewind_tests;
mod service;
mod sockets;
mod stream;

pub use device::DeviceCounters;
pub use stream::{NetError, TunnelListener, TunnelStream};

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::tunnel::endpoints::EndpointStore;
use crate::tunnel::{DropCounters, PeerChanges, PeerSpec, PeerStats};
use crate::wgkey::{PrivateKey, PublicKey};
use driver::Driver;
use stream::{lock, DriverWake, Shared};

/// TCP tuning. Every capacity and timeout is a setting.
#[derive(Debug, Clone)]
pub struct TcpTuning {
    /// smoltcp receive buffer per connection; above 64 KiB enables window scaling (RFC 7323).
    /// Pages are only touched as data flows, so an idle stream costs little real memory.
    pub rx_buffer: usize,
    /// smoltcp send buffer per connection. It also caps the bytes in flight: a larger window
    /// goes out as one burst that overflows a wireguard-go peer's default 208 KiB UDP receive
    /// buffer, and smoltcp (no SACK recovery, 1 s minimum RTO) then stalls for a second per
    /// loss. Measured in the lab, appliance→model with iperf3: 512 KiB → 141 drops, 0.39× the
    /// wireguard-go pair; 128 KiB → 19 drops, 0.48×; 96 KiB → 4 drops, 0.54×; 64 KiB → 0
    /// drops, 0.89×. Model→appliance is governed by `rx_buffer` and our 8 MiB socket.
    pub tx_buffer: usize,
    /// Bytes buffered between smoltcp and the application, per direction.
    pub app_buffer: usize,
    pub connect_timeout: Duration,
    /// Delayed-ACK timer; short, so request/response latency stays low.
    pub ack_delay: Duration,
    pub max_connections: usize,
    /// Pending connections per listening port.
    pub listen_backlog: usize,
    /// TCP keep-alive probes on a connection silent for this long (smoltcp `set_keep_alive`).
    pub keepalive: Duration,
    /// A connection whose remote sends nothing for this long — no data, no ACK, no answer to a
    /// keep-alive probe — is aborted (smoltcp `set_timeout`). Without it, a request sent on a
    /// pooled connection to a corp peer that died (router reboot) waited for the gateway's
    /// 600 s first-byte timeout; now it fails with a reset (502) after this long. Longer than
    /// one WireGuard rekey timeout (15 s), so a re-handshake does not kill streams. A model
    /// that is silent while it prefills a long prompt still answers the probes (its kernel
    /// does), so long prefills are not cut.
    pub dead_after: Duration,
}

impl Default for TcpTuning {
    fn default() -> Self {
        TcpTuning {
            rx_buffer: 1 << 20,
            tx_buffer: 64 << 10,
            app_buffer: 256 << 10,
            connect_timeout: Duration::from_secs(5),
            ack_delay: Duration::from_millis(1),
            max_connections: 8192,
            listen_backlog: 64,
            keepalive: Duration::from_secs(10),
            dead_after: Duration::from_secs(30),
        }
    }
}

/// Everything a netstack needs to start.
#[derive(Debug, Clone)]
pub struct NetstackConfig {
    pub private_key: PrivateKey,
    /// UDP address of the WireGuard socket.
    pub listen: SocketAddr,
    /// This side's addresses inside the tunnel, with the tunnel network's prefix.
    pub addresses: Vec<IpNet>,
    pub peers: Vec<PeerSpec>,
    pub mtu: u16,
    pub tcp: TcpTuning,
}

/// A snapshot for `status` and tests.
#[derive(Debug, Clone)]
pub struct NetstackStats {
    pub public_key: PublicKey,
    pub listen: SocketAddr,
    pub peers: Vec<PeerStats>,
    pub drops: DropCounters,
    pub device: DeviceCounters,
    pub connections: usize,
    /// One line per open connection (state and queue depths), for debugging stalls; filled
    /// only by [`Netstack::stats_detailed`] (it formats a line per connection).
    pub connection_detail: Vec<String>,
}

/// What the handle asks of the driver; each carries its reply.
enum Command {
    Connect {
        shared: Arc<Shared>,
        remote: SocketAddr,
        rx_buffer: usize,
        reply: oneshot::Sender<Result<SocketAddr, NetError>>,
    },
    Listen {
        port: u16,
        reply: oneshot::Sender<Result<TunnelListener, NetError>>,
    },
    Stats {
        reply: oneshot::Sender<NetstackStats>,
        detail: bool,
    },
    SetPeers {
        peers: Vec<PeerSpec>,
        reply: oneshot::Sender<PeerChanges>,
    },
}

/// Handle to a running netstack. Cheap to clone; the driver stops when [`Netstack::shutdown`]
/// is called or every handle is dropped.
#[derive(Clone)]
pub struct Netstack {
    cmd: mpsc::Sender<Command>,
    wake: Arc<DriverWake>,
    udp_addr: SocketAddr,
    public_key: PublicKey,
    tcp: Arc<TcpTuning>,
    stop: Arc<tokio::sync::Notify>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
    peer_up: watch::Receiver<u64>,
}

impl Netstack {
    /// Binds the WireGuard UDP socket and starts the driver task on the current runtime.
    pub fn start(cfg: NetstackConfig) -> io::Result<Netstack> {
        Netstack::start_with_store(cfg, None)
    }

    /// [`Netstack::start`] with the endpoint store of the state directory (the daemon): peers
    /// are handshaken at once at their stored endpoints, and learned endpoints are stored as
    /// they change (see `tunnel/restart.rs`).
    pub fn start_with_store(
        cfg: NetstackConfig,
        store: Option<EndpointStore>,
    ) -> io::Result<Netstack> {
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let wake = Arc::new(DriverWake::new());
        let tcp = Arc::new(cfg.tcp.clone());
        let (up_tx, peer_up) = watch::channel(0);
        let driver = Driver::new(&cfg, store, cmd_rx, wake.clone(), tcp.clone(), up_tx)?;
        let udp_addr = driver.udp_addr;
        let public_key = driver.core.public_key();
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(driver.run(stop.clone()));
        Ok(Netstack {
            cmd: cmd_tx,
            wake,
            udp_addr,
            public_key,
            tcp,
            stop,
            task: Arc::new(Mutex::new(Some(task))),
            peer_up,
        })
    }

    /// Changes (a counter) whenever a peer comes up: its first handshake completed, or it was
    /// heard from again after a silence. Readiness and the upstream probes wait on it.
    pub fn peer_events(&self) -> watch::Receiver<u64> {
        self.peer_up.clone()
    }

    /// The bound WireGuard UDP address (useful with port 0).
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// Opens a TCP connection through the tunnel. Fails fast with a clear reason when no peer
    /// routes `addr`, that peer has never completed a handshake, or it has fallen silent;
    /// otherwise waits up to the connect timeout.
    pub async fn dial(&self, addr: SocketAddr) -> Result<TunnelStream, NetError> {
        self.dial_with_receive_buffer(addr, self.tcp.rx_buffer)
            .await
    }

    /// [`Netstack::dial`] with a smoltcp receive buffer of `rx_buffer` bytes instead of
    /// `TcpTuning::rx_buffer`. smoltcp's receive ring does not rewind when it empties, so a
    /// long-lived connection ends up touching (making resident) its whole receive buffer; a
    /// caller that keeps many connections open for long, like the gateway's pool of upstream
    /// connections, bounds its memory with a smaller one.
    pub async fn dial_with_receive_buffer(
        &self,
        addr: SocketAddr,
        rx_buffer: usize,
    ) -> Result<TunnelStream, NetError> {
        let shared = Shared::new(self.wake.clone(), self.tcp.app_buffer, self.tcp.app_buffer);
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Command::Connect {
                shared: shared.clone(),
                remote: addr,
                rx_buffer,
                reply,
            })
            .await
            .map_err(|_| NetError::Stopped)?;
        let local = rx.await.map_err(|_| NetError::Stopped)??;
        let stream = TunnelStream {
            shared,
            local,
            peer: addr,
        };
        // The driver enforces the connect timeout; this outer bound only guards against a
        // driver that stopped mid-connect.
        match tokio::time::timeout(
            self.tcp.connect_timeout + Duration::from_secs(1),
            stream.established(),
        )
        .await
        {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NetError::TimedOut),
        }
    }

    /// Listens on `port` of this netstack's tunnel addresses.
    pub async fn listen(&self, port: u16) -> Result<TunnelListener, NetError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Command::Listen { port, reply })
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Peer and drop counters (cheap: callers may poll it every second).
    pub async fn stats(&self) -> Result<NetstackStats, NetError> {
        self.stats_with(false).await
    }

    /// [`Netstack::stats`] plus one line per open connection (for debugging stalls).
    pub async fn stats_detailed(&self) -> Result<NetstackStats, NetError> {
        self.stats_with(true).await
    }

    async fn stats_with(&self, detail: bool) -> Result<NetstackStats, NetError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Command::Stats { reply, detail })
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Replaces the peer set (config reload). Peers whose public key stays keep their
    /// WireGuard session ([`crate::tunnel::WgCore::set_peers`]); connections through a removed
    /// peer fail on their next packet or time out.
    pub async fn set_peers(&self, peers: Vec<PeerSpec>) -> Result<PeerChanges, NetError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Command::SetPeers { peers, reply })
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Stops the driver: open streams fail with `Stopped`, the UDP socket closes.
    pub async fn shutdown(&self) {
        self.stop.notify_one();
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}
