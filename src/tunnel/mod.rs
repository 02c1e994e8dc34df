//! WireGuard peers: the sans-IO core that turns UDP datagrams into inner IP packets and back.
//!
//! Owns the boringtun [`Tunn`] of every peer, AllowedIPs routing (longest prefix), the inner-source
//! check, endpoint learning (roaming/NAT) and the handshake rate limiter shared by all peers.
//! It never does I/O and never blocks: the netstack driver feeds it datagrams and packets and
//! acts on the [`Output`]s it emits. It never lets a decrypted packet through whose inner source
//! lies outside the sending peer's AllowedIPs (WireGuard paper §II, "cryptokey routing").
//!
//! Restarts (`restart.rs`): each peer's last authenticated endpoint is handed out for the
//! endpoint store and restored from it, so a restarted appliance handshakes at once instead of
//! waiting up to two minutes for the corp side's rekey; a data packet on a session this process
//! does not have, arriving from such a known endpoint, starts a handshake there (rate-limited,
//! never towards an address only an unauthenticated packet named). Health (`health.rs`): the
//! time of every peer's last authenticated packet, keepalives included, tells a dead peer from
//! its silence. Time comes from the core's clock ([`WgCore::set_now`]), which the driver sets
//! once per batch, so tests inject it and the packet path reads no clock.

pub mod endpoints;
mod health;
mod restart;
pub mod udp;

pub use health::{silent_after, PeerHealth};
pub use restart::LearnedEndpoint;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::IpNet;

use crate::wgkey::{PrivateKey, PublicKey};

/// Handshake messages per second accepted before cookies are demanded (boringtun's default
/// per-device figure; under load a peer must prove its address first, WireGuard paper §V-D).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// A dialling peer with keepalives re-handshakes at least every REKEY_AFTER_TIME (120 s) while
/// it sends anything (keepalives included); 300 s without one means it is gone (WireGuard
/// paper §6.1 timers).
pub const PEER_STALE_AFTER: Duration = Duration::from_secs(300);

/// Largest buffer a datagram or an inner packet may need (IPv4/IPv6 total length is 16 bits).
pub const MAX_PACKET: usize = 65_536 + 64;

/// What a peer looks like to the core: its key, what it may route, how to reach it.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    pub name: String,
    pub public_key: PublicKey,
    pub allowed_ips: Vec<IpNet>,
    pub keepalive: Option<u16>,
    pub endpoint: Option<SocketAddr>,
}

/// Counters and state of one peer, for `status` and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStats {
    pub name: String,
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub keepalive: Option<u16>,
    /// Time since the last authenticated packet of any kind (keepalives included) arrived from
    /// the peer in this process; `None` before the first.
    pub last_received: Option<Duration>,
    /// Up, silent, or without a (fresh) handshake (see [`PeerHealth`]).
    pub health: PeerHealth,
    /// How long the peer may be silent before it counts as down ([`silent_after`]).
    pub silent_after: Duration,
}

/// Something the caller must do after calling into the core.
#[derive(Debug)]
pub enum Output<'a> {
    /// Send this datagram to `to`, from local address `from` when known (the address the
    /// peer dialled, so a stateful firewall in front of the peer sees the reply it expects).
    Udp {
        to: SocketAddr,
        from: Option<IpAddr>,
        data: &'a [u8],
    },
    /// A decrypted, source-checked inner IP packet for the netstack.
    Ip(&'a [u8]),
}

/// Why an outgoing packet could not be sent; the netstack turns this into a dial error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// No peer's AllowedIPs contains the destination.
    NoRoute,
    /// The peer exists but has never been heard from and has no configured endpoint.
    NoEndpoint,
    /// The peer dials us and has sent nothing, not even a keepalive, for longer than its
    /// [`silent_after`]: its WireGuard is down or a firewall drops its packets.
    Silent,
}

/// What [`WgCore::set_peers`] did, by peer name (for the reload answer and the log).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Same key, new name, allowed IPs or endpoint: the session was kept.
    pub updated: Vec<String>,
    /// Same key, new keepalive: a fresh session (boringtun fixes keepalive per `Tunn`).
    pub restarted: Vec<String>,
    /// Nothing changed; the session was kept.
    pub unchanged: Vec<String>,
}

struct Peer {
    spec: PeerSpec,
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    local_ip: Option<IpAddr>,
    rx_bytes: u64,
    tx_bytes: u64,
    /// Receiver-index prefix boringtun uses for this peer's sessions (`index << 8`).
    #[cfg_attr(not(test), allow(dead_code))]
    index: u32,
    /// When `endpoint` was learned from an authenticated packet (or when the stored one was);
    /// `None` while it is only the configured one (never stored).
    learned: Option<SystemTime>,
    /// The core's clock at the last authenticated packet (handshake, data or keepalive).
    last_rx: Option<Instant>,
    /// Health was [`PeerHealth::Up`] when last computed; a packet from a peer that was not up
    /// asks for a new computation (the way back up is noticed within the same batch).
    up: bool,
    /// The last handshake started because data arrived on a session this process lacks.
    last_rekick: Option<Instant>,
}

/// Counters for packets the core refused, for `status` and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DropCounters {
    /// Datagrams that did not parse as WireGuard messages or failed MAC/AEAD checks.
    pub invalid: u64,
    /// Handshakes from keys that are not configured peers.
    pub unknown_peer: u64,
    /// Decrypted packets whose inner source is outside the peer's AllowedIPs.
    pub bad_source: u64,
    /// Outgoing packets with no route or no endpoint.
    pub unroutable: u64,
}

/// All peers of one WireGuard interface.
pub struct WgCore {
    private: x25519_dalek::StaticSecret,
    public: x25519_dalek::PublicKey,
    rate_limiter: Arc<RateLimiter>,
    peers: Vec<Peer>,
    by_key: HashMap<[u8; 32], usize>,
    by_index: HashMap<u32, usize>,
    /// (network, peer position), longest prefix first.
    routes: Vec<(IpNet, usize)>,
    next_index: u32,
    last_limiter_reset: Instant,
    drops: DropCounters,
    buf: Vec<u8>,
    /// The core's clock: set by the driver once per batch ([`WgCore::set_now`]).
    now: Instant,
    /// A peer's learned endpoint changed since [`WgCore::take_endpoint_changes`] last looked.
    endpoints_dirty: bool,
    /// A peer that was not up sent an authenticated packet: [`WgCore::refresh_health`] is due.
    recheck: bool,
}

impl WgCore {
    pub fn new(private_key: &PrivateKey, peers: Vec<PeerSpec>) -> Self {
        let private = private_key.to_dalek();
        let public = x25519_dalek::PublicKey::from(&private);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        let mut core = WgCore {
            private,
            public,
            rate_limiter,
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            routes: Vec::new(),
            // Start at a random index so a restarted appliance does not reuse session ids.
            next_index: random_u32() & 0x00ff_ffff,
            last_limiter_reset: Instant::now(),
            drops: DropCounters::default(),
            buf: vec![0u8; MAX_PACKET],
            now: Instant::now(),
            endpoints_dirty: false,
            recheck: false,
        };
        for spec in peers {
            core.add_peer(spec);
        }
        core
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.public.to_bytes())
    }

    /// Sets the core's clock (the driver calls it once per batch of datagrams, per tick and
    /// before a route check; tests move it to inject time).
    pub fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    fn add_peer(&mut self, spec: PeerSpec) {
        if self.by_key.contains_key(&spec.public_key.0) {
            return; // validated config never has duplicates; stay safe anyway
        }
        let index = self.next_index & 0x00ff_ffff;
        self.next_index = self.next_index.wrapping_add(1);
        let tunn = Tunn::new(
            self.private.clone(),
            spec.public_key.to_dalek(),
            None,
            spec.keepalive,
            index,
            Some(self.rate_limiter.clone()),
        );
        self.insert_peer(Peer {
            endpoint: spec.endpoint,
            local_ip: None,
            spec,
            tunn,
            rx_bytes: 0,
            tx_bytes: 0,
            index,
            learned: None,
            last_rx: None,
            up: false,
            last_rekick: None,
        });
    }

    /// Replaces the peer set with `specs` (a config reload) without touching the sessions of
    /// peers that stay: a peer whose public key is in both sets keeps its `Tunn` (session,
    /// counters, learned endpoint, receiver index) and only takes the new name, allowed IPs and
    /// configured endpoint. A changed keepalive is the exception: boringtun fixes it when the
    /// `Tunn` is created, so that peer gets a fresh `Tunn` and re-handshakes. Peers no longer
    /// listed are dropped (their receiver indexes stop matching); new ones are added and, when
    /// they have an endpoint, handshaken at once through `out`.
    pub fn set_peers(
        &mut self,
        specs: Vec<PeerSpec>,
        out: &mut dyn FnMut(Output<'_>),
    ) -> PeerChanges {
        let mut changes = PeerChanges::default();
        let mut old: HashMap<[u8; 32], Peer> = self
            .peers
            .drain(..)
            .map(|p| (p.spec.public_key.0, p))
            .collect();
        self.by_key.clear();
        self.by_index.clear();
        self.routes.clear();
        let mut fresh = Vec::new();
        for spec in specs {
            if self.by_key.contains_key(&spec.public_key.0) {
                continue; // validated config never has duplicates
            }
            match old.remove(&spec.public_key.0) {
                Some(mut peer) if peer.spec.keepalive == spec.keepalive => {
                    let same = peer.spec.name == spec.name
                        && peer.spec.allowed_ips == spec.allowed_ips
                        && peer.spec.endpoint == spec.endpoint;
                    if spec.endpoint.is_some() && spec.endpoint != peer.spec.endpoint {
                        peer.endpoint = spec.endpoint;
                        peer.local_ip = None;
                        peer.learned = None;
                    }
                    if same {
                        changes.unchanged.push(spec.name.clone());
                    } else {
                        changes.updated.push(spec.name.clone());
                    }
                    peer.spec = spec;
                    self.insert_peer(peer);
                }
                Some(old) => {
                    changes.restarted.push(spec.name.clone());
                    let pos = self.peers.len();
                    fresh.push(pos);
                    let configured = spec.endpoint;
                    self.add_peer(spec);
                    // The fresh session starts where the old one was last heard from (unless
                    // the endpoint is configured): the peer keeps sending on its old session,
                    // which nobody here can decrypt any more, until it hears from us.
                    if configured.is_none() && old.learned.is_some() {
                        let peer = &mut self.peers[pos];
                        peer.endpoint = old.endpoint;
                        peer.local_ip = old.local_ip;
                        peer.learned = old.learned;
                    }
                }
                None => {
                    changes.added.push(spec.name.clone());
                    fresh.push(self.peers.len());
                    self.add_peer(spec);
                }
            }
        }
        changes.removed = old.into_values().map(|p| p.spec.name).collect();
        changes.removed.sort();
        // The store follows the peer set (removed peers leave it, moved endpoints change).
        self.endpoints_dirty = true;
        for pos in fresh {
            self.initiate_one(pos, out);
        }
        changes
    }

    /// Puts an existing peer (with its `Tunn`) back into the tables.
    fn insert_peer(&mut self, peer: Peer) {
        let pos = self.peers.len();
        self.by_key.insert(peer.spec.public_key.0, pos);
        self.by_index.insert(peer.index, pos);
        for net in &peer.spec.allowed_ips {
            self.routes.push((net.trunc(), pos));
        }
        self.routes
            .sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        self.peers.push(peer);
    }

    fn initiate_one(&mut self, pos: usize, out: &mut dyn FnMut(Output<'_>)) {
        let Some(peer) = self.peers.get_mut(pos) else {
            return;
        };
        let Some(to) = peer.endpoint else { return };
        if let TunnResult::WriteToNetwork(data) =
            peer.tunn.format_handshake_initiation(&mut self.buf, false)
        {
            out(Output::Udp {
                to,
                from: peer.local_ip,
                data,
            });
        }
    }

    fn route(&self, dst: IpAddr) -> Option<usize> {
        self.routes
            .iter()
            .find(|(net, _)| net.contains(&dst))
            .map(|&(_, pos)| pos)
    }

    /// Whether a packet to `dst` could leave now (for fast, clear dial errors), by the core's
    /// clock.
    ///
    /// A peer that dials us (no configured endpoint) counts as down when it has never completed
    /// a handshake, its last one is older than [`PEER_STALE_AFTER`], or it has been silent
    /// (nothing authenticated, not even a keepalive) for longer than its [`silent_after`]: its
    /// WireGuard or its NAT is gone and only it can bring the tunnel back, so callers fail at
    /// once (HTTP 503) instead of waiting out a connect timeout. A peer with a configured
    /// endpoint is never refused here: we can handshake it ourselves, and traffic is what
    /// makes us try.
    pub fn check_route(&self, dst: IpAddr) -> Result<(), RouteError> {
        let pos = self.route(dst).ok_or(RouteError::NoRoute)?;
        let peer = &self.peers[pos];
        if peer.endpoint.is_none() {
            return Err(RouteError::NoEndpoint);
        }
        if peer.spec.endpoint.is_none() {
            match self.health_of(peer) {
                PeerHealth::Up => {}
                PeerHealth::Silent => return Err(RouteError::Silent),
                PeerHealth::NoHandshake | PeerHealth::Stale => return Err(RouteError::NoEndpoint),
            }
        }
        Ok(())
    }

    pub fn drops(&self) -> DropCounters {
        self.drops
    }

    pub fn stats(&self) -> Vec<PeerStats> {
        self.peers
            .iter()
            .map(|p| {
                let (hs, _, _, _, _) = p.tunn.stats();
                PeerStats {
                    name: p.spec.name.clone(),
                    public_key: p.spec.public_key,
                    endpoint: p.endpoint,
                    allowed_ips: p.spec.allowed_ips.clone(),
                    last_handshake: hs,
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    keepalive: p.spec.keepalive,
                    last_received: p.last_rx.map(|t| self.now.saturating_duration_since(t)),
                    health: self.health_of(p),
                    silent_after: silent_after(p.spec.keepalive),
                }
            })
            .collect()
    }

    /// Handles one datagram that arrived from `from` on local address `local`.
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
        out: &mut dyn FnMut(Output<'_>),
    ) {
        let Some(pos) = self.find_peer(from, local, datagram, out) else {
            return;
        };
        let peer = &mut self.peers[pos];
        let mut authenticated = false;
        match peer
            .tunn
            .decapsulate(Some(from.ip()), datagram, &mut self.buf)
        {
            TunnResult::Done => authenticated = true,
            TunnResult::Err(_) => self.drops.invalid += 1,
            TunnResult::WriteToNetwork(data) => {
                authenticated = true;
                // Reply to where the packet came from (learned below as well).
                out(Output::Udp {
                    to: from,
                    from: local,
                    data,
                });
                // Flush packets queued while the handshake was pending.
                while let TunnResult::WriteToNetwork(data) =
                    peer.tunn.decapsulate(None, &[], &mut self.buf)
                {
                    out(Output::Udp {
                        to: from,
                        from: local,
                        data,
                    });
                }
            }
            TunnResult::WriteToTunnelV4(packet, src) => {
                authenticated = true;
                deliver(peer, &mut self.drops, packet, IpAddr::V4(src), out);
            }
            TunnResult::WriteToTunnelV6(packet, src) => {
                authenticated = true;
                deliver(peer, &mut self.drops, packet, IpAddr::V6(src), out);
            }
        }
        if authenticated {
            // Roaming (WireGuard paper §II-C): the latest authenticated packet sets the endpoint.
            if peer.endpoint != Some(from) || peer.local_ip != local || peer.learned.is_none() {
                peer.endpoint = Some(from);
                peer.local_ip = local;
                peer.learned = Some(SystemTime::now());
                self.endpoints_dirty = true;
            }
            peer.last_rx = Some(self.now);
            if !peer.up {
                self.recheck = true;
            }
        }
    }

    /// The peer a datagram belongs to, found before any expensive work: by the receiver index
    /// of a response, cookie or data packet, and for a handshake initiation (MAC-checked and
    /// rate limited before the Diffie-Hellman that identifies the sender) by its static key.
    /// `None` when it belongs to nobody (counted) or was answered with a cookie.
    fn find_peer(
        &mut self,
        from: SocketAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
        out: &mut dyn FnMut(Output<'_>),
    ) -> Option<usize> {
        let receiver_idx = match Tunn::parse_incoming_packet(datagram) {
            Err(_) => {
                self.drops.invalid += 1;
                return None;
            }
            Ok(Packet::HandshakeInit(ref init)) => {
                match self
                    .rate_limiter
                    .verify_packet(Some(from.ip()), datagram, &mut self.buf)
                {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        out(Output::Udp {
                            to: from,
                            from: local,
                            data: cookie,
                        });
                        return None;
                    }
                    Err(_) => {
                        self.drops.invalid += 1;
                        return None;
                    }
                }
                let Ok(half) = parse_handshake_anon(&self.private, &self.public, init) else {
                    self.drops.invalid += 1;
                    return None;
                };
                let pos = self.by_key.get(&half.peer_static_public).copied();
                if pos.is_none() {
                    self.drops.unknown_peer += 1;
                }
                return pos;
            }
            Ok(Packet::HandshakeResponse(p)) => p.receiver_idx,
            Ok(Packet::PacketCookieReply(p)) => p.receiver_idx,
            Ok(Packet::PacketData(p)) => {
                let pos = self.by_index.get(&(p.receiver_idx >> 8)).copied();
                if pos.is_none() {
                    self.drops.invalid += 1;
                    // Data on a session this process does not have: the peer is still on the
                    // session of a previous run. See `restart.rs`.
                    self.rekick(from, out);
                }
                return pos;
            }
        };
        let pos = self.by_index.get(&(receiver_idx >> 8)).copied();
        if pos.is_none() {
            self.drops.invalid += 1;
        }
        pos
    }

    /// Encrypts one inner IP packet to the peer that routes its destination.
    pub fn send_ip(
        &mut self,
        packet: &[u8],
        out: &mut dyn FnMut(Output<'_>),
    ) -> Result<(), RouteError> {
        let Some(dst) = Tunn::dst_address(packet) else {
            self.drops.unroutable += 1;
            return Err(RouteError::NoRoute);
        };
        let Some(pos) = self.route(dst) else {
            self.drops.unroutable += 1;
            return Err(RouteError::NoRoute);
        };
        let peer = &mut self.peers[pos];
        let Some(to) = peer.endpoint else {
            self.drops.unroutable += 1;
            return Err(RouteError::NoEndpoint);
        };
        // Anything else means boringtun queued the packet while a handshake is in progress.
        if let TunnResult::WriteToNetwork(data) = peer.tunn.encapsulate(packet, &mut self.buf) {
            peer.tx_bytes += packet.len() as u64;
            out(Output::Udp {
                to,
                from: peer.local_ip,
                data,
            });
        }
        Ok(())
    }

    /// Starts a handshake with every peer whose endpoint is configured, so a side that dials
    /// out (the corp peer, or the in-process one in the demo) is reachable at once instead of
    /// after its first keepalive interval.
    pub fn initiate_handshakes(&mut self, out: &mut dyn FnMut(Output<'_>)) {
        for pos in 0..self.peers.len() {
            self.initiate_one(pos, out);
        }
    }

    /// Advances WireGuard timers (call every 250 ms): rekeys, keepalives, handshake retries.
    pub fn tick(&mut self, out: &mut dyn FnMut(Output<'_>)) {
        let now = Instant::now();
        self.now = now;
        if now.duration_since(self.last_limiter_reset) >= Duration::from_secs(1) {
            self.rate_limiter.reset_count();
            self.last_limiter_reset = now;
        }
        for peer in &mut self.peers {
            match peer.tunn.update_timers(&mut self.buf) {
                TunnResult::WriteToNetwork(data) => {
                    if let Some(to) = peer.endpoint {
                        out(Output::Udp {
                            to,
                            from: peer.local_ip,
                            data,
                        });
                    }
                }
                TunnResult::Err(boringtun::noise::errors::WireGuardError::ConnectionExpired) => {
                    // Session gone after REJECT_AFTER_TIME*3 without a handshake; keep the
                    // endpoint so traffic can trigger a new handshake.
                }
                _ => {}
            }
        }
    }

    /// The peer index prefix, exposed for tests that forge packets.
    #[cfg(test)]
    fn peer_index(&self, pos: usize) -> u32 {
        self.peers[pos].index
    }
}

/// Hands a decrypted packet to the netstack if its inner source is one the peer may use
/// (cryptokey routing); otherwise drops it, counted.
fn deliver(
    peer: &mut Peer,
    drops: &mut DropCounters,
    packet: &[u8],
    src: IpAddr,
    out: &mut dyn FnMut(Output<'_>),
) {
    if peer.spec.allowed_ips.iter().any(|n| n.contains(&src)) {
        peer.rx_bytes += packet.len() as u64;
        out(Output::Ip(packet));
    } else {
        drops.bad_source += 1;
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("the OS random source is unavailable");
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests;
