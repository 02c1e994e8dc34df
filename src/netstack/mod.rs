//! Userspace TCP/IP over the WireGuard tunnel: `dial` and `listen` without a kernel interface.
//!
//! One driver task owns the UDP socket, every peer's WireGuard state ([`WgCore`]) and the smoltcp
//! interface: nothing on the packet path takes a shared lock or crosses a channel per packet.
//! The task sleeps until a datagram arrives, an application stream needs service, a command
//! comes in, or the earlier of smoltcp's next deadline and the 250 ms WireGuard tick (DESIGN.md
//! data-plane rules); an idle appliance therefore wakes four times a second and does nothing.
//! Every queue is bounded. The host never gets a route into the tunnel: only code holding a
//! [`Netstack`] handle can reach the networks behind a peer.

mod device;
mod stream;

pub use device::DeviceCounters;
pub use stream::{NetError, TunnelListener, TunnelStream};

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};
use std::time::Duration;

use ipnet::IpNet;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpCidr, IpEndpoint};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::tunnel::udp::UdpEndpoint;
use crate::tunnel::{
    DropCounters, Output, PeerChanges, PeerSpec, PeerStats, RouteError, WgCore, MAX_PACKET,
};
use crate::wgkey::{PrivateKey, PublicKey};
use device::TunnelDevice;
use stream::{lock, DriverWake, Phase, Shared};

/// TCP tuning. Every capacity and timeout is a setting (STYLE.md).
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

enum Command {
    Connect {
        shared: Arc<Shared>,
        remote: SocketAddr,
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
}

impl Netstack {
    /// Binds the WireGuard UDP socket and starts the driver task on the current runtime.
    pub fn start(cfg: NetstackConfig) -> io::Result<Netstack> {
        let udp = UdpEndpoint::bind(cfg.listen)?;
        let udp_addr = udp.local_addr()?;
        let core = WgCore::new(&cfg.private_key, cfg.peers.clone());
        let public_key = core.public_key();
        let mtu = usize::from(cfg.mtu);

        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| io::Error::other(e.to_string()))?;
        let mut iface_cfg = IfaceConfig::new(HardwareAddress::Ip);
        iface_cfg.random_seed = u64::from_le_bytes(seed);
        let epoch = std::time::Instant::now();
        let mut rx_queue = VecDeque::new();
        let mut scratch = vec![0u8; MAX_PACKET];
        let mut counters = DeviceCounters::default();
        let mut core = core;
        let mut iface = {
            let mut dev = TunnelDevice {
                rx: &mut rx_queue,
                core: &mut core,
                udp: &udp,
                scratch: &mut scratch,
                mtu,
                counters: &mut counters,
            };
            Interface::new(iface_cfg, &mut dev, smoltcp::time::Instant::from_millis(0))
        };
        iface.update_ip_addrs(|addrs| {
            for a in &cfg.addresses {
                let _ = addrs.push(IpCidr::new(a.addr().into(), a.prefix_len()));
            }
        });
        // Medium::Ip has no neighbours to resolve, so a default route via our own address is
        // enough for smoltcp to emit packets to any destination; WgCore then picks the peer.
        for a in &cfg.addresses {
            match a.addr() {
                IpAddr::V4(v4) => {
                    let _ = iface.routes_mut().add_default_ipv4_route(v4);
                }
                IpAddr::V6(v6) => {
                    let _ = iface.routes_mut().add_default_ipv6_route(v6);
                }
            }
        }

        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let wake = Arc::new(DriverWake::new());
        let stop = Arc::new(tokio::sync::Notify::new());
        let tcp = Arc::new(cfg.tcp.clone());
        let local_addrs = cfg.addresses.iter().map(|a| a.addr()).collect();
        let driver = Driver {
            core,
            udp,
            iface,
            sockets: SocketSet::new(Vec::new()),
            rx_queue,
            scratch,
            recv_buf: vec![0u8; MAX_PACKET],
            counters,
            mtu,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            ready: Arc::new(Mutex::new(Vec::new())),
            wake: wake.clone(),
            listeners: HashMap::new(),
            used_ports: HashSet::new(),
            next_port: 49152 + (u16::from_le_bytes([seed[0], seed[1]]) % 16000),
            connecting: Vec::new(),
            reap: Vec::new(),
            epoch,
            tcp: tcp.clone(),
            local_addrs,
            cmd_rx,
            udp_addr,
        };
        let stop2 = stop.clone();
        let task = tokio::spawn(driver.run(stop2));
        Ok(Netstack {
            cmd: cmd_tx,
            wake,
            udp_addr,
            public_key,
            tcp,
            stop,
            task: Arc::new(Mutex::new(Some(task))),
        })
    }

    /// The bound WireGuard UDP address (useful with port 0).
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// Opens a TCP connection through the tunnel. Fails fast with a clear reason when no peer
    /// routes `addr` or that peer has never completed a handshake; otherwise waits up to the
    /// connect timeout.
    pub async fn dial(&self, addr: SocketAddr) -> Result<TunnelStream, NetError> {
        let shared = Shared::new(self.wake.clone(), self.tcp.app_buffer, self.tcp.app_buffer);
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Command::Connect {
                shared: shared.clone(),
                remote: addr,
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
    /// WireGuard session ([`WgCore::set_peers`]); connections through a removed peer fail on
    /// their next packet or time out.
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

/// Wakes the driver for one connection when smoltcp has news for it.
struct SocketWaker {
    id: usize,
    ready: Arc<Mutex<Vec<usize>>>,
}

impl Wake for SocketWaker {
    fn wake(self: Arc<Self>) {
        lock(&self.ready).push(self.id);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        lock(&self.ready).push(self.id);
    }
}

enum Role {
    /// A connection that an application stream owns.
    Conn {
        established: bool,
        fin_sent: bool,
        /// The peer's FIN arrived (it may still sit behind unread data).
        fin_received: bool,
    },
    /// A listening socket waiting for a SYN on `port`; `syn_seen` once it left Listen and a
    /// replacement was started.
    Listen { port: u16, syn_seen: bool },
}

struct Slot {
    handle: SocketHandle,
    shared: Option<Arc<Shared>>,
    waker: Waker,
    role: Role,
    local_port: u16,
    deadline: Option<std::time::Instant>,
    /// Waiting for the next poll to flush its last RST/ACK before removal.
    retired: bool,
}

struct ListenerEntry {
    tx: mpsc::Sender<TunnelStream>,
    /// Listening sockets currently waiting for a SYN.
    waiting: usize,
}

struct Driver {
    core: WgCore,
    udp: UdpEndpoint,
    iface: Interface,
    sockets: SocketSet<'static>,
    rx_queue: VecDeque<Vec<u8>>,
    scratch: Vec<u8>,
    recv_buf: Vec<u8>,
    counters: DeviceCounters,
    mtu: usize,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    live: usize,
    ready: Arc<Mutex<Vec<usize>>>,
    wake: Arc<DriverWake>,
    listeners: HashMap<u16, ListenerEntry>,
    used_ports: HashSet<u16>,
    next_port: u16,
    connecting: Vec<usize>,
    /// Slots to remove after the next poll has flushed their final segment.
    reap: Vec<usize>,
    epoch: std::time::Instant,
    tcp: Arc<TcpTuning>,
    local_addrs: Vec<IpAddr>,
    cmd_rx: mpsc::Receiver<Command>,
    udp_addr: SocketAddr,
}

enum Event {
    Stop,
    Udp,
    Wake,
    Cmd(Option<Command>),
    Tick,
    Timer,
}

/// Datagrams read per wake-up before smoltcp runs (batching, DESIGN.md).
const UDP_BATCH: usize = 256;
const WG_TICK: Duration = Duration::from_millis(250);

impl Driver {
    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    async fn run(mut self, stop: Arc<tokio::sync::Notify>) {
        let mut tick = tokio::time::interval(WG_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        {
            let udp = &self.udp;
            let counters = &mut self.counters;
            self.core.initiate_handshakes(&mut |o| {
                if let Output::Udp { to, from, data } = o {
                    if let Err(e) = udp.try_send(data, to, from) {
                        tracing::debug!(%to, error = %e, "handshake initiation not sent");
                        counters.udp_send_errors += 1;
                    }
                }
            });
        }
        loop {
            let now = self.now();
            let delay = self
                .iface
                .poll_delay(now, &self.sockets)
                .map(|d| Duration::from_micros(d.total_micros()))
                .unwrap_or(WG_TICK)
                .min(WG_TICK);
            let ev = {
                let sleep = tokio::time::sleep(delay);
                tokio::pin!(sleep);
                tokio::select! {
                    biased;
                    _ = stop.notified() => Event::Stop,
                    r = self.udp.readable() => match r {
                        Ok(()) => Event::Udp,
                        Err(_) => Event::Timer,
                    },
                    _ = self.wake.notify.notified() => Event::Wake,
                    c = self.cmd_rx.recv() => Event::Cmd(c),
                    _ = tick.tick() => Event::Tick,
                    _ = &mut sleep => Event::Timer,
                }
            };
            match ev {
                Event::Stop | Event::Cmd(None) => break,
                Event::Udp => self.drain_udp(),
                Event::Cmd(Some(c)) => self.command(c),
                Event::Tick => self.tick(),
                Event::Wake | Event::Timer => {}
            }
            self.process();
        }
        self.stop_all();
    }

    fn drain_udp(&mut self) {
        for _ in 0..UDP_BATCH {
            let (n, from, local) = match self.udp.try_recv(&mut self.recv_buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // ICMP errors surface as ECONNREFUSED etc. on the next read; ignore them.
                    tracing::trace!(error = %e, "WireGuard UDP receive error");
                    continue;
                }
            };
            let udp = &self.udp;
            let rx_queue = &mut self.rx_queue;
            let counters = &mut self.counters;
            self.core
                .handle_datagram(from, local, &self.recv_buf[..n], &mut |o| match o {
                    Output::Udp { to, from, data } => {
                        if udp.try_send(data, to, from).is_err() {
                            counters.udp_send_errors += 1;
                        }
                    }
                    Output::Ip(p) => {
                        if rx_queue.len() < device::RX_QUEUE_MAX {
                            rx_queue.push_back(p.to_vec());
                        } else {
                            counters.rx_queue_drops += 1;
                        }
                    }
                });
        }
    }

    fn tick(&mut self) {
        let udp = &self.udp;
        let counters = &mut self.counters;
        self.core.tick(&mut |o| {
            if let Output::Udp { to, from, data } = o {
                if udp.try_send(data, to, from).is_err() {
                    counters.udp_send_errors += 1;
                }
            }
        });
        // Connect timeouts.
        let now = std::time::Instant::now();
        let mut i = 0;
        while i < self.connecting.len() {
            let id = self.connecting[i];
            let expired = match self.slots.get(id).and_then(|s| s.as_ref()) {
                Some(slot) => {
                    let done = matches!(
                        slot.role,
                        Role::Conn {
                            established: true,
                            ..
                        }
                    );
                    if done {
                        self.connecting.swap_remove(i);
                        continue;
                    }
                    slot.deadline.is_some_and(|d| now >= d)
                }
                None => {
                    self.connecting.swap_remove(i);
                    continue;
                }
            };
            if expired {
                self.connecting.swap_remove(i);
                self.fail(id, NetError::TimedOut);
            } else {
                i += 1;
            }
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Connect {
                shared,
                remote,
                reply,
            } => {
                let r = self.connect(shared, remote);
                let _ = reply.send(r);
            }
            Command::Listen { port, reply } => {
                let r = self.listen(port);
                let _ = reply.send(r);
            }
            Command::Stats { reply, detail } => {
                let _ = reply.send(NetstackStats {
                    public_key: self.core.public_key(),
                    listen: self.udp_addr,
                    peers: self.core.stats(),
                    drops: self.core.drops(),
                    device: self.counters,
                    connections: self.live,
                    connection_detail: if detail { self.detail() } else { Vec::new() },
                });
            }
            Command::SetPeers { peers, reply } => {
                let udp = &self.udp;
                let counters = &mut self.counters;
                let changes = self.core.set_peers(peers, &mut |o| {
                    if let Output::Udp { to, from, data } = o {
                        if udp.try_send(data, to, from).is_err() {
                            counters.udp_send_errors += 1;
                        }
                    }
                });
                let _ = reply.send(changes);
            }
        }
    }

    fn detail(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for (id, slot) in self.slots.iter().enumerate() {
            let Some(slot) = slot else { continue };
            if matches!(slot.role, Role::Listen { .. }) {
                continue;
            }
            let sock = self.sockets.get::<tcp::Socket>(slot.handle);
            let app = slot.shared.as_ref().map(|sh| {
                let i = lock(&sh.inner);
                format!(
                    "app rx={} tx={} rx_blocked={} queued={} eof={} shut={} reader_waiting={} writer_waiting={}",
                    i.rx.len(),
                    i.tx.len(),
                    i.rx_blocked,
                    i.queued,
                    i.rx_eof,
                    i.tx_shutdown,
                    i.read_waker.is_some(),
                    i.write_waker.is_some()
                )
            });
            out.push(format!(
                "#{id} {:?}->{:?} {} send_q={} recv_q={} can_send={} can_recv={} | {}",
                sock.local_endpoint(),
                sock.remote_endpoint(),
                sock.state(),
                sock.send_queue(),
                sock.recv_queue(),
                sock.can_send(),
                sock.can_recv(),
                app.unwrap_or_default()
            ));
        }
        out
    }

    fn alloc_slot(&mut self, slot_fn: impl FnOnce(usize, Waker) -> Slot) -> usize {
        let id = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let waker = Waker::from(Arc::new(SocketWaker {
            id,
            ready: self.ready.clone(),
        }));
        self.slots[id] = Some(slot_fn(id, waker));
        self.live += 1;
        id
    }

    fn new_socket(&self) -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; self.tcp.rx_buffer]),
            tcp::SocketBuffer::new(vec![0u8; self.tcp.tx_buffer]),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(Some(smoltcp::time::Duration::from_micros(
            self.tcp.ack_delay.as_micros() as u64,
        )));
        s.set_congestion_control(tcp::CongestionControl::Cubic);
        let d = |d: Duration| smoltcp::time::Duration::from_millis(d.as_millis() as u64);
        s.set_keep_alive(Some(d(self.tcp.keepalive)));
        s.set_timeout(Some(d(self.tcp.dead_after)));
        s
    }

    fn ephemeral_port(&mut self) -> Option<u16> {
        for _ in 0..16384 {
            let p = self.next_port;
            self.next_port = if self.next_port == u16::MAX {
                49152
            } else {
                self.next_port + 1
            };
            if !self.used_ports.contains(&p) && !self.listeners.contains_key(&p) {
                return Some(p);
            }
        }
        None
    }

    fn connect(&mut self, shared: Arc<Shared>, remote: SocketAddr) -> Result<SocketAddr, NetError> {
        match self.core.check_route(remote.ip()) {
            Err(RouteError::NoRoute) => return Err(NetError::NoRoute),
            Err(RouteError::NoEndpoint) => return Err(NetError::NoHandshake),
            Ok(()) => {}
        }
        if self.live >= self.tcp.max_connections {
            return Err(NetError::TooManyConnections);
        }
        let local_ip = self
            .local_addrs
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == remote.is_ipv4())
            .ok_or(NetError::NoRoute)?;
        let port = self.ephemeral_port().ok_or(NetError::TooManyConnections)?;
        let mut sock = self.new_socket();
        let cx = self.iface.context();
        sock.connect(cx, IpEndpoint::new(remote.ip().into(), remote.port()), port)
            .map_err(|_| NetError::NoRoute)?;
        let handle = self.sockets.add(sock);
        self.used_ports.insert(port);
        let deadline = std::time::Instant::now() + self.tcp.connect_timeout;
        let id = self.alloc_slot(|_, waker| Slot {
            handle,
            shared: Some(shared.clone()),
            waker,
            role: Role::Conn {
                established: false,
                fin_sent: false,
                fin_received: false,
            },
            local_port: port,
            deadline: Some(deadline),
            retired: false,
        });
        shared.id.store(id, Ordering::Release);
        self.connecting.push(id);
        self.service(id);
        Ok(SocketAddr::new(local_ip, port))
    }

    fn listen(&mut self, port: u16) -> Result<TunnelListener, NetError> {
        if port == 0 || self.listeners.contains_key(&port) || self.used_ports.contains(&port) {
            return Err(NetError::AddrInUse);
        }
        let (tx, rx) = mpsc::channel(self.tcp.listen_backlog.max(1));
        self.listeners
            .insert(port, ListenerEntry { tx, waiting: 0 });
        self.replenish(port);
        Ok(TunnelListener { port, rx })
    }

    /// Keeps `listen_backlog` sockets listening on `port`.
    fn replenish(&mut self, port: u16) {
        loop {
            let Some(entry) = self.listeners.get(&port) else {
                return;
            };
            if entry.waiting >= self.tcp.listen_backlog.max(1)
                || self.live >= self.tcp.max_connections
            {
                return;
            }
            let mut sock = self.new_socket();
            if sock.listen(port).is_err() {
                return;
            }
            let handle = self.sockets.add(sock);
            let id = self.alloc_slot(|_, waker| Slot {
                handle,
                shared: None,
                waker,
                role: Role::Listen {
                    port,
                    syn_seen: false,
                },
                local_port: port,
                deadline: None,
                retired: false,
            });
            if let Some(e) = self.listeners.get_mut(&port) {
                e.waiting += 1;
            }
            self.register_wakers(id);
        }
    }

    fn register_wakers(&mut self, id: usize) {
        if let Some(Some(slot)) = self.slots.get(id) {
            let sock = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            sock.register_recv_waker(&slot.waker);
            sock.register_send_waker(&slot.waker);
        }
    }

    fn process(&mut self) {
        // Bounded: each round does a fixed amount of work; leftovers wait for the next wake.
        for _ in 0..8 {
            for _ in 0..64 {
                match self.cmd_rx.try_recv() {
                    Ok(c) => self.command(c),
                    Err(_) => break,
                }
            }
            let dirty = std::mem::take(&mut *lock(&self.wake.dirty));
            for &id in &dirty {
                self.service_app(id);
            }
            let now = self.now();
            let polled = {
                let mut dev = TunnelDevice {
                    rx: &mut self.rx_queue,
                    core: &mut self.core,
                    udp: &self.udp,
                    scratch: &mut self.scratch,
                    mtu: self.mtu,
                    counters: &mut self.counters,
                };
                self.iface.poll(now, &mut dev, &mut self.sockets)
            };
            for id in std::mem::take(&mut self.reap) {
                self.remove(id);
            }
            let mut ready = std::mem::take(&mut *lock(&self.ready));
            ready.sort_unstable();
            ready.dedup();
            for &id in &ready {
                self.service(id);
            }
            if dirty.is_empty()
                && ready.is_empty()
                && polled == smoltcp::iface::PollResult::None
                && self.rx_queue.is_empty()
            {
                break;
            }
        }
    }

    /// The application touched this connection: clear its queued flag, then service it.
    fn service_app(&mut self, id: usize) {
        if let Some(Some(slot)) = self.slots.get(id) {
            if let Some(shared) = &slot.shared {
                lock(&shared.inner).queued = false;
            }
            self.service(id);
        }
    }

    /// Moves bytes and state between one smoltcp socket and its application stream.
    fn service(&mut self, id: usize) {
        let Some(Some(slot)) = self.slots.get_mut(id) else {
            return;
        };
        if slot.retired {
            return;
        }
        let sock = self.sockets.get_mut::<tcp::Socket>(slot.handle);
        let state = sock.state();

        if let Role::Listen {
            port,
            ref mut syn_seen,
        } = slot.role
        {
            // A socket that left Listen no longer waits for SYNs: start its replacement now, so
            // a burst of connections finds listeners (smoltcp has no SYN queue).
            let first_departure = state != tcp::State::Listen && !*syn_seen;
            if first_departure {
                *syn_seen = true;
                if let Some(e) = self.listeners.get_mut(&port) {
                    e.waiting = e.waiting.saturating_sub(1);
                }
            }
            match state {
                tcp::State::Listen | tcp::State::SynReceived => {
                    sock.register_recv_waker(&slot.waker);
                    sock.register_send_waker(&slot.waker);
                    if first_departure {
                        self.replenish(port);
                    }
                }
                tcp::State::Established | tcp::State::CloseWait => {
                    // Hand the connection to the listener and put another socket in its place.
                    let remote = sock
                        .remote_endpoint()
                        .map(|e| SocketAddr::new(e.addr.into(), e.port));
                    let local = sock
                        .local_endpoint()
                        .map(|e| SocketAddr::new(e.addr.into(), e.port));
                    let shared =
                        Shared::new(self.wake.clone(), self.tcp.app_buffer, self.tcp.app_buffer);
                    shared.id.store(id, Ordering::Release);
                    lock(&shared.inner).phase = Phase::Open;
                    slot.shared = Some(shared.clone());
                    slot.role = Role::Conn {
                        established: true,
                        fin_sent: false,
                        fin_received: false,
                    };
                    let handed = match (remote, local, self.listeners.get(&port)) {
                        (Some(peer), Some(local), Some(entry)) => entry
                            .tx
                            .try_send(TunnelStream {
                                shared,
                                local,
                                peer,
                            })
                            .is_ok(),
                        _ => false,
                    };
                    if !handed {
                        // Backlog full or listener gone: refuse like a kernel would.
                        self.sockets.get_mut::<tcp::Socket>(slot.handle).abort();
                        lock(&slot.shared.as_ref().expect("set above").inner).dropped = true;
                    }
                    self.replenish(port);
                    self.service(id);
                }
                _ => {
                    // The handshake failed (RST, timeout): drop it; replenish keeps the count.
                    self.retire(id);
                    self.replenish(port);
                }
            }
            return;
        }

        let Some(shared) = slot.shared.clone() else {
            return;
        };
        let mut inner = lock(&shared.inner);
        let Role::Conn {
            ref mut established,
            ref mut fin_sent,
            ref mut fin_received,
        } = slot.role
        else {
            return;
        };

        if !*established
            && matches!(
                state,
                tcp::State::Established | tcp::State::CloseWait | tcp::State::FinWait1
            )
        {
            *established = true;
            slot.deadline = None;
            inner.phase = Phase::Open;
            if let Some(w) = inner.write_waker.take() {
                w.wake();
            }
        }

        // Receive: smoltcp → application buffer, bounded by the app buffer.
        let mut woke_reader = false;
        while sock.can_recv() && inner.rx.len() < inner.rx_cap {
            let room = inner.rx_cap - inner.rx.len();
            let rx = &mut inner.rx;
            match sock.recv(|b| {
                let n = b.len().min(room);
                rx.extend_from_slice(&b[..n]);
                (n, n)
            }) {
                Ok(0) | Err(_) => break,
                Ok(_) => woke_reader = true,
            }
        }
        if inner.dropped {
            // Nobody will read: discard so the window stays open while we close.
            inner.rx.clear();
        }
        inner.rx_blocked = sock.can_recv();
        if *established
            && !sock.may_recv()
            && matches!(
                state,
                tcp::State::CloseWait
                    | tcp::State::LastAck
                    | tcp::State::Closing
                    | tcp::State::TimeWait
            )
        {
            *fin_received = true;
        }
        if *fin_received && !inner.rx_eof && !sock.can_recv() {
            // End of stream once everything before the FIN has been handed over.
            inner.rx_eof = true;
            woke_reader = true;
        }

        // Send: application buffer → smoltcp.
        let mut woke_writer = false;
        if !inner.tx.is_empty() && sock.can_send() {
            if let Ok(n) = sock.send_slice(&inner.tx) {
                if n > 0 {
                    use bytes::Buf;
                    inner.tx.advance(n);
                    if inner.tx.is_empty() {
                        inner.tx = bytes::BytesMut::new();
                    }
                    woke_writer = true;
                }
            }
        }
        if inner.tx_shutdown && inner.tx.is_empty() && !*fin_sent && *established {
            sock.close();
            *fin_sent = true;
        }

        let mut remove = false;
        if inner.dropped {
            if !*established || !*fin_received {
                // Dropped while the server may still be sending: reset, so it stops at once
                // (a client that went away must not keep a GPU busy).
                sock.abort();
                remove = true;
            } else if inner.tx.is_empty() && !*fin_sent {
                // Clean end: like close(2), queued bytes still go out, then our FIN.
                sock.close();
                *fin_sent = true;
            }
        }

        let state = sock.state();
        let finished = matches!(state, tcp::State::Closed | tcp::State::TimeWait);
        // Keep a finished socket until the reader has taken every byte it received.
        if finished && (inner.dropped || !sock.can_recv()) {
            if inner.phase != Phase::Closed {
                if !*established {
                    inner.error = Some(if slot.deadline.is_some() {
                        NetError::Refused
                    } else {
                        NetError::Reset
                    });
                } else if !*fin_received {
                    inner.error = Some(NetError::Reset);
                } else {
                    inner.rx_eof = true;
                }
                inner.phase = Phase::Closed;
                woke_reader = true;
                woke_writer = true;
            }
            remove = true;
        }

        if woke_reader {
            if let Some(w) = inner.read_waker.take() {
                w.wake();
            }
        }
        if woke_writer {
            if let Some(w) = inner.write_waker.take() {
                w.wake();
            }
        }
        drop(inner);
        if remove {
            self.retire(id);
        } else {
            let sock = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            sock.register_recv_waker(&slot.waker);
            sock.register_send_waker(&slot.waker);
        }
    }

    fn fail(&mut self, id: usize, err: NetError) {
        if let Some(Some(slot)) = self.slots.get(id) {
            self.sockets.get_mut::<tcp::Socket>(slot.handle).abort();
            if let Some(shared) = &slot.shared {
                let mut inner = lock(&shared.inner);
                inner.error = Some(err);
                inner.phase = Phase::Closed;
                if let Some(w) = inner.read_waker.take() {
                    w.wake();
                }
                if let Some(w) = inner.write_waker.take() {
                    w.wake();
                }
            }
        }
        self.retire(id);
    }

    /// Removes a slot after the next poll, so a pending RST or final ACK still goes out.
    fn retire(&mut self, id: usize) {
        if let Some(Some(slot)) = self.slots.get_mut(id) {
            if !slot.retired {
                slot.retired = true;
                self.reap.push(id);
            }
        }
    }

    fn remove(&mut self, id: usize) {
        if let Some(slot) = self.slots.get_mut(id).and_then(|s| s.take()) {
            self.sockets.remove(slot.handle);
            if matches!(slot.role, Role::Conn { .. })
                && !self.listeners.contains_key(&slot.local_port)
            {
                self.used_ports.remove(&slot.local_port);
            }
            self.free.push(id);
            self.live -= 1;
        }
    }

    fn stop_all(&mut self) {
        for slot in self.slots.iter().flatten() {
            if let Some(shared) = &slot.shared {
                let mut inner = lock(&shared.inner);
                if inner.error.is_none() && !inner.rx_eof {
                    inner.error = Some(NetError::Stopped);
                }
                inner.phase = Phase::Closed;
                if let Some(w) = inner.read_waker.take() {
                    w.wake();
                }
                if let Some(w) = inner.write_waker.take() {
                    w.wake();
                }
            }
        }
        self.listeners.clear();
    }
}
