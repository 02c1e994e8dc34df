//! The driver task: the one owner of the WireGuard UDP socket, every peer's [`WgCore`] state, the
//! smoltcp interface and the connection table ([`ConnTable`]).
//!
//! Each wake-up is one round of named steps: drain a batch of datagrams (up to [`UDP_BATCH`]),
//! take commands, service the connections the application touched, poll smoltcp once, reap
//! finished sockets, service the connections smoltcp woke. Per packet it copies the decrypted
//! packet into the bounded smoltcp queue and crosses no channel; the only locks are the two wake
//! lists and the state block of the connection being serviced. It never blocks: every socket
//! call is non-blocking and every loop is bounded.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config as IfaceConfig, Interface, PollResult};
use smoltcp::wire::{HardwareAddress, IpCidr};
use tokio::sync::{mpsc, watch};

use super::device::{self, DeviceCounters, TunnelDevice};
use super::sockets::ConnTable;
use super::stream::{DriverWake, NetError, Shared};
use super::{Command, NetstackConfig, NetstackStats, TcpTuning};
use crate::tunnel::endpoints::{EndpointStore, EndpointWriter};
use crate::tunnel::udp::UdpEndpoint;
use crate::tunnel::{Output, RouteError, WgCore, MAX_PACKET};

/// Datagrams read per wake-up before smoltcp runs: one poll then handles the whole batch.
const UDP_BATCH: usize = 256;
const WG_TICK: Duration = Duration::from_millis(250);
/// Rounds of [`Driver::process`] per wake-up, and commands taken per round: a fixed amount of
/// work, leftovers wait for the next wake.
const ROUNDS: usize = 8;
const COMMANDS_PER_ROUND: usize = 64;

pub(super) struct Driver {
    pub(super) core: WgCore,
    udp: UdpEndpoint,
    pub(super) udp_addr: SocketAddr,
    iface: Interface,
    /// Every TCP socket and its slot.
    conns: ConnTable,
    /// Ciphertext buffer for outgoing packets.
    scratch: Vec<u8>,
    /// Receive buffer for one datagram.
    recv_buf: Vec<u8>,
    counters: DeviceCounters,
    mtu: usize,
    epoch: std::time::Instant,
    local_addrs: Vec<IpAddr>,
    cmd_rx: mpsc::Receiver<Command>,
    /// Stores the peers' learned endpoints off the packet path (the daemon; not the demo).
    endpoints: Option<EndpointWriter>,
    /// Bumped whenever a peer comes up ([`super::Netstack::peer_events`]).
    peer_up: watch::Sender<u64>,
}

/// Why the driver woke.
enum Event {
    Stop,
    Udp,
    Wake,
    Cmd(Option<Command>),
    Tick,
    Timer,
}

impl Driver {
    /// Binds the UDP socket and builds the smoltcp interface on the tunnel addresses. With a
    /// `store`, the peers' stored endpoints are restored (and handshaken when the driver
    /// runs) and their learned endpoints are written back as they change.
    pub(super) fn new(
        cfg: &NetstackConfig,
        store: Option<EndpointStore>,
        cmd_rx: mpsc::Receiver<Command>,
        wake: Arc<DriverWake>,
        tcp: Arc<TcpTuning>,
        peer_up: watch::Sender<u64>,
    ) -> io::Result<Driver> {
        let udp = UdpEndpoint::bind(cfg.listen)?;
        let udp_addr = udp.local_addr()?;
        let mut core = WgCore::new(&cfg.private_key, cfg.peers.clone());
        let endpoints = store.map(|store| {
            let restored = core.restore_endpoints(&store.load_logged());
            if !restored.is_empty() {
                tracing::info!(
                    peers = ?restored,
                    file = %store.path().display(),
                    "handshaking the peers at their stored endpoints"
                );
            }
            EndpointWriter::start(store)
        });
        let mtu = usize::from(cfg.mtu);

        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| io::Error::other(e.to_string()))?;
        let mut iface_cfg = IfaceConfig::new(HardwareAddress::Ip);
        iface_cfg.random_seed = u64::from_le_bytes(seed);
        let epoch = std::time::Instant::now();
        let mut rx_queue = VecDeque::new();
        let mut scratch = vec![0u8; MAX_PACKET];
        let mut counters = DeviceCounters::default();
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

        let first_port = 49152 + (u16::from_le_bytes([seed[0], seed[1]]) % 16000);
        Ok(Driver {
            core,
            udp,
            udp_addr,
            iface,
            conns: ConnTable::new(wake, tcp, first_port),
            scratch,
            recv_buf: vec![0u8; MAX_PACKET],
            counters,
            mtu,
            epoch,
            local_addrs: cfg.addresses.iter().map(|a| a.addr()).collect(),
            cmd_rx,
            endpoints,
            peer_up,
        })
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    pub(super) async fn run(mut self, stop: Arc<tokio::sync::Notify>) {
        let mut tick = tokio::time::interval(WG_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.initiate_handshakes();
        loop {
            match self.next_event(&stop, &mut tick).await {
                Event::Stop | Event::Cmd(None) => break,
                Event::Udp => self.drain_udp(),
                Event::Cmd(Some(c)) => self.command(c),
                Event::Tick => self.tick(),
                Event::Wake | Event::Timer => {}
            }
            self.process();
        }
        self.conns.stop_all();
        if let Some(w) = self.endpoints.take() {
            w.finish().await;
        }
    }

    fn initiate_handshakes(&mut self) {
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

    /// Sleeps until a datagram, an application wake-up, a command, the WireGuard tick or
    /// smoltcp's next deadline, whichever comes first (in that order of priority).
    async fn next_event(
        &mut self,
        stop: &tokio::sync::Notify,
        tick: &mut tokio::time::Interval,
    ) -> Event {
        let now = self.now();
        let delay = self
            .conns
            .next_poll(now)
            // smoltcp's `Instant - Instant` is the absolute difference: a past deadline is 0.
            .map(|at| {
                if at > now {
                    Duration::from_micros((at - now).total_micros())
                } else {
                    Duration::ZERO
                }
            })
            .unwrap_or(WG_TICK)
            .min(WG_TICK);
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        tokio::select! {
            biased;
            _ = stop.notified() => Event::Stop,
            r = self.udp.readable() => match r {
                Ok(()) => Event::Udp,
                Err(_) => Event::Timer,
            },
            _ = self.conns.wake.notify.notified() => Event::Wake,
            c = self.cmd_rx.recv() => Event::Cmd(c),
            _ = tick.tick() => Event::Tick,
            _ = &mut sleep => Event::Timer,
        }
    }

    /// Reads up to [`UDP_BATCH`] datagrams into the core; handshake replies go straight out,
    /// decrypted packets wait in their socket set's queue for its next poll.
    fn drain_udp(&mut self) {
        self.core.set_now(Instant::now());
        for _ in 0..UDP_BATCH {
            let (n, from, local) = match self.udp.try_recv(&mut self.recv_buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ICMP errors surface as ECONNREFUSED etc. on the next read; ignore them.
                    tracing::trace!(error = %e, "WireGuard UDP receive error");
                    continue;
                }
            };
            let udp = &self.udp;
            let conns = &mut self.conns;
            let counters = &mut self.counters;
            self.core
                .handle_datagram(from, local, &self.recv_buf[..n], &mut |o| match o {
                    Output::Udp { to, from, data } => send_or_count(udp, counters, data, to, from),
                    Output::Ip(p) => {
                        if !conns.queue_packet(p, device::RX_QUEUE_MAX) {
                            counters.rx_queue_drops += 1;
                        }
                    }
                });
        }
        // A peer that was not up spoke: see at once whether it is up now (a first handshake
        // completes here), not only at the next tick.
        if self.core.take_recheck() {
            self.refresh_health();
        }
    }

    /// Recomputes peer health; announces a peer coming up.
    fn refresh_health(&mut self) {
        if self.core.refresh_health() {
            self.peer_up.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The WireGuard timers (handshakes, keepalives) and the connect timeouts.
    fn tick(&mut self) {
        let udp = &self.udp;
        let counters = &mut self.counters;
        self.core.tick(&mut |o| {
            if let Output::Udp { to, from, data } = o {
                send_or_count(udp, counters, data, to, from);
            }
        });
        self.conns.expire_connects(std::time::Instant::now());
        self.refresh_health();
        if let (Some(w), Some(snapshot)) = (&self.endpoints, self.core.take_endpoint_changes()) {
            w.offer(snapshot);
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Connect {
                shared,
                remote,
                rx_buffer,
                reply,
            } => {
                let r = self.connect(shared, remote, rx_buffer);
                let _ = reply.send(r);
            }
            Command::Listen { port, reply } => {
                let r = self.conns.listen(port);
                let _ = reply.send(r);
            }
            Command::Stats { reply, detail } => {
                self.core.set_now(Instant::now());
                let _ = reply.send(self.stats(detail));
            }
            Command::SetPeers { peers, reply } => {
                let udp = &self.udp;
                let counters = &mut self.counters;
                let changes = self.core.set_peers(peers, &mut |o| {
                    if let Output::Udp { to, from, data } = o {
                        send_or_count(udp, counters, data, to, from);
                    }
                });
                let _ = reply.send(changes);
            }
        }
    }

    /// A dial: fails fast when no peer routes `remote`, or that peer never shook hands or fell
    /// silent.
    fn connect(
        &mut self,
        shared: Arc<Shared>,
        remote: SocketAddr,
        rx_buffer: usize,
    ) -> Result<SocketAddr, NetError> {
        self.core.set_now(Instant::now());
        match self.core.check_route(remote.ip()) {
            Err(RouteError::NoRoute) => return Err(NetError::NoRoute),
            Err(RouteError::NoEndpoint) => return Err(NetError::NoHandshake),
            Err(RouteError::Silent) => return Err(NetError::PeerSilent),
            Ok(()) => {}
        }
        let cx = self.iface.context();
        self.conns
            .connect(cx, &self.local_addrs, shared, remote, rx_buffer)
    }

    fn stats(&self, detail: bool) -> NetstackStats {
        NetstackStats {
            public_key: self.core.public_key(),
            listen: self.udp_addr,
            peers: self.core.stats(),
            drops: self.core.drops(),
            device: self.counters,
            connections: self.conns.live,
            connection_detail: if detail {
                self.conns.detail()
            } else {
                Vec::new()
            },
        }
    }

    /// Runs rounds until nothing is left to do (or [`ROUNDS`] is reached).
    fn process(&mut self) {
        for _ in 0..ROUNDS {
            self.take_commands();
            let touched = self.conns.service_touched();
            let polled = self.poll_iface();
            self.conns.reap_retired();
            let woken = self.conns.service_woken();
            if !touched && !woken && polled == PollResult::None && self.conns.rx_total == 0 {
                break;
            }
        }
    }

    fn take_commands(&mut self) {
        for _ in 0..COMMANDS_PER_ROUND {
            match self.cmd_rx.try_recv() {
                Ok(c) => self.command(c),
                Err(_) => break,
            }
        }
    }

    /// One smoltcp poll of every socket set that is due: its queued inbound packets in, its
    /// sockets' segments out, then its next deadline.
    fn poll_iface(&mut self) -> PollResult {
        let now = self.now();
        let mut result = PollResult::None;
        let due = self.conns.take_due(now);
        for &shard in &due {
            let conns = &mut self.conns;
            let rx = &mut conns.rx[shard];
            let queued = rx.len();
            let mut dev = TunnelDevice {
                rx,
                core: &mut self.core,
                udp: &self.udp,
                scratch: &mut self.scratch,
                mtu: self.mtu,
                counters: &mut self.counters,
            };
            let set = &mut conns.sets[shard];
            if self.iface.poll(now, &mut dev, set) == PollResult::SocketStateChanged {
                result = PollResult::SocketStateChanged;
            }
            conns.rx_total -= queued - conns.rx[shard].len();
            conns.poll_at[shard] = self.iface.poll_at(now, &conns.sets[shard]);
        }
        self.conns.recycle_due(due);
        result
    }
}

/// Sends a datagram the core produced; a failure is only counted (the core's timers retry).
fn send_or_count(
    udp: &UdpEndpoint,
    counters: &mut DeviceCounters,
    data: &[u8],
    to: SocketAddr,
    from: Option<IpAddr>,
) {
    if udp.try_send(data, to, from).is_err() {
        counters.udp_send_errors += 1;
    }
}
