//! The connection table ([`ConnTable`]): every smoltcp socket with its [`Slot`] (dialled
//! connection, accepted connection or listening socket), how slots are made (dial, listen, the
//! listening backlog) and how they end (fail, retire until the next poll, remove).
//!
//! Used only inside the driver task. It never blocks and never grows without bound:
//! connections are capped by `max_connections`, listening sockets per port by `listen_backlog`.
//!
//! The sockets are spread over [`SHARDS`] smoltcp socket sets by local port (`port %
//! SHARDS`): smoltcp finds the socket of an inbound segment, dispatches egress and computes its
//! next deadline by walking every socket of the set it is given, so with one set the cost of
//! each event grew with the number of open connections (measured: 41 µs of CPU per token
//! event at 100 streams, 74 µs at 1,000). An inbound TCP segment goes to the set of its
//! destination port (every socket with that local port lives there: a dialled connection's
//! ephemeral port, a listening port and the connections accepted on it); a set is polled only
//! when it has packets, a socket in it was serviced, or its deadline came.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use smoltcp::iface::{Context, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::IpEndpoint;
use tokio::sync::mpsc;

use super::stream::{lock, DriverWake, NetError, Phase, Shared, TunnelListener, TunnelStream};
use super::TcpTuning;

/// Socket sets the connection table is split into (see the module comment).
pub(super) const SHARDS: usize = 256;

/// The set a local port's sockets live in.
pub(super) fn shard_of_port(port: u16) -> usize {
    usize::from(port) % SHARDS
}

/// The set an inbound IP packet belongs to: its TCP destination port's; anything else (ICMP,
/// UDP, fragments, IPv6 extension headers) goes to set 0, whose poll answers it as before.
pub(super) fn shard_of_packet(p: &[u8]) -> usize {
    let Some(&first) = p.first() else {
        return 0;
    };
    let port_at = match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            let frag = p
                .get(6..8)
                .map(|f| u16::from_be_bytes([f[0], f[1]]) & 0x3fff);
            if p.get(9) != Some(&6) || frag != Some(0) || ihl < 20 {
                return 0;
            }
            ihl + 2
        }
        6 if p.get(6) == Some(&6) => 42,
        _ => return 0,
    };
    match p.get(port_at..port_at + 2) {
        Some(b) => shard_of_port(u16::from_be_bytes([b[0], b[1]])),
        None => 0,
    }
}

/// Wakes the driver for one connection when smoltcp has news for it.
pub(super) struct SocketWaker {
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

/// Where a connection stands, as far as the driver has seen.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ConnState {
    pub(super) established: bool,
    pub(super) fin_sent: bool,
    /// The peer's FIN arrived (it may still sit behind unread data).
    pub(super) fin_received: bool,
}

pub(super) enum Role {
    /// A connection that an application stream owns.
    Conn(ConnState),
    /// A listening socket waiting for a SYN on `port`; `syn_seen` once it left Listen and a
    /// replacement was started.
    Listen { port: u16, syn_seen: bool },
}

pub(super) struct Slot {
    pub(super) handle: SocketHandle,
    /// The socket set `handle` belongs to ([`shard_of_port`] of `local_port`).
    pub(super) shard: usize,
    pub(super) shared: Option<Arc<Shared>>,
    pub(super) waker: Waker,
    pub(super) role: Role,
    pub(super) local_port: u16,
    /// The connect timeout of a dialled connection, until it is established.
    pub(super) deadline: Option<Instant>,
    /// Waiting for the next poll to flush its last RST/ACK before removal.
    pub(super) retired: bool,
}

pub(super) struct ListenerEntry {
    pub(super) tx: mpsc::Sender<TunnelStream>,
    /// Listening sockets currently waiting for a SYN.
    pub(super) waiting: usize,
}

/// Every smoltcp socket of the netstack and what the driver knows about each.
pub(super) struct ConnTable {
    /// The smoltcp sockets, [`SHARDS`] sets.
    pub(super) sets: Vec<SocketSet<'static>>,
    /// Decrypted inbound packets waiting for their set's poll, per set.
    pub(super) rx: Vec<std::collections::VecDeque<Vec<u8>>>,
    /// Packets in all of `rx` (bounded by the device's `RX_QUEUE_MAX`).
    pub(super) rx_total: usize,
    /// Sets that need a poll (packets, a serviced socket, a socket to flush), and their flags.
    pub(super) due: Vec<usize>,
    due_flag: Vec<bool>,
    /// Each set's next smoltcp deadline, as of its last poll.
    pub(super) poll_at: Vec<Option<smoltcp::time::Instant>>,
    /// Indexed by the id a stream and its waker carry.
    pub(super) slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Slots in use (connections and listening sockets).
    pub(super) live: usize,
    /// Connections smoltcp woke (their [`SocketWaker`]s push here).
    pub(super) ready: Arc<Mutex<Vec<usize>>>,
    /// Connections the application touched, and the driver's wake-up.
    pub(super) wake: Arc<DriverWake>,
    pub(super) listeners: HashMap<u16, ListenerEntry>,
    used_ports: HashSet<u16>,
    next_port: u16,
    /// Dialled connections still inside their connect timeout.
    connecting: Vec<usize>,
    /// Slots to remove after the next poll has flushed their final segment.
    reap: Vec<usize>,
    pub(super) tcp: Arc<TcpTuning>,
}

impl ConnTable {
    /// An empty table; ephemeral ports start at `first_port` (random, in 49152..65151).
    pub(super) fn new(wake: Arc<DriverWake>, tcp: Arc<TcpTuning>, first_port: u16) -> Self {
        ConnTable {
            sets: (0..SHARDS).map(|_| SocketSet::new(Vec::new())).collect(),
            rx: (0..SHARDS)
                .map(|_| std::collections::VecDeque::new())
                .collect(),
            rx_total: 0,
            due: Vec::new(),
            due_flag: vec![false; SHARDS],
            poll_at: vec![None; SHARDS],
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            ready: Arc::new(Mutex::new(Vec::new())),
            wake,
            listeners: HashMap::new(),
            used_ports: HashSet::new(),
            next_port: first_port,
            connecting: Vec::new(),
            reap: Vec::new(),
            tcp,
        }
    }

    /// Opens a connection to `remote` (whose route the caller checked) from the first of
    /// `local_addrs` of its family; the dialler's wait ends when [`Self::service`] sees it
    /// established, or at the connect timeout.
    pub(super) fn connect(
        &mut self,
        cx: &mut Context,
        local_addrs: &[IpAddr],
        shared: Arc<Shared>,
        remote: SocketAddr,
        rx_buffer: usize,
    ) -> Result<SocketAddr, NetError> {
        if self.live >= self.tcp.max_connections {
            return Err(NetError::TooManyConnections);
        }
        let local_ip = local_addrs
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == remote.is_ipv4())
            .ok_or(NetError::NoRoute)?;
        let port = self.ephemeral_port().ok_or(NetError::TooManyConnections)?;
        let mut sock = self.new_socket(rx_buffer);
        sock.connect(cx, IpEndpoint::new(remote.ip().into(), remote.port()), port)
            .map_err(|_| NetError::NoRoute)?;
        let shard = shard_of_port(port);
        let handle = self.sets[shard].add(sock);
        self.mark_due(shard);
        self.used_ports.insert(port);
        let deadline = Instant::now() + self.tcp.connect_timeout;
        let id = self.alloc_slot(|_, waker| Slot {
            handle,
            shard,
            shared: Some(shared.clone()),
            waker,
            role: Role::Conn(ConnState::default()),
            local_port: port,
            deadline: Some(deadline),
            retired: false,
        });
        shared.id.store(id, Ordering::Release);
        self.connecting.push(id);
        self.service(id);
        Ok(SocketAddr::new(local_ip, port))
    }

    pub(super) fn listen(&mut self, port: u16) -> Result<TunnelListener, NetError> {
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
    pub(super) fn replenish(&mut self, port: u16) {
        loop {
            let Some(entry) = self.listeners.get(&port) else {
                return;
            };
            if entry.waiting >= self.tcp.listen_backlog.max(1)
                || self.live >= self.tcp.max_connections
            {
                return;
            }
            let mut sock = self.new_socket(self.tcp.rx_buffer);
            if sock.listen(port).is_err() {
                return;
            }
            let shard = shard_of_port(port);
            let handle = self.sets[shard].add(sock);
            let id = self.alloc_slot(|_, waker| Slot {
                handle,
                shard,
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

    fn new_socket(&self, rx_buffer: usize) -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; rx_buffer]),
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

    pub(super) fn register_wakers(&mut self, id: usize) {
        if let Some(Some(slot)) = self.slots.get(id) {
            let sock = self.sets[slot.shard].get_mut::<tcp::Socket>(slot.handle);
            sock.register_recv_waker(&slot.waker);
            sock.register_send_waker(&slot.waker);
        }
    }

    /// Fails every dialled connection whose connect timeout passed; forgets the established.
    pub(super) fn expire_connects(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.connecting.len() {
            let id = self.connecting[i];
            let expired = match self.slots.get(id).and_then(|s| s.as_ref()) {
                Some(slot) => {
                    let done = matches!(
                        slot.role,
                        Role::Conn(ConnState {
                            established: true,
                            ..
                        })
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

    fn fail(&mut self, id: usize, err: NetError) {
        if let Some(Some(slot)) = self.slots.get(id) {
            self.sets[slot.shard]
                .get_mut::<tcp::Socket>(slot.handle)
                .abort();
            if let Some(shared) = &slot.shared {
                let mut inner = lock(&shared.inner);
                inner.error = Some(err);
                inner.phase = Phase::Closed;
                inner.wake_both();
            }
        }
        self.retire(id);
    }

    /// Removes a slot after the next poll, so a pending RST or final ACK still goes out.
    pub(super) fn retire(&mut self, id: usize) {
        if let Some(Some(slot)) = self.slots.get_mut(id) {
            if !slot.retired {
                slot.retired = true;
                let shard = slot.shard;
                self.reap.push(id);
                self.mark_due(shard);
            }
        }
    }

    /// The set needs a poll at the next round.
    pub(super) fn mark_due(&mut self, shard: usize) {
        if !self.due_flag[shard] {
            self.due_flag[shard] = true;
            self.due.push(shard);
        }
    }

    /// Queues an inbound packet for its set's poll; false when the queues are full.
    pub(super) fn queue_packet(&mut self, p: &[u8], max: usize) -> bool {
        if self.rx_total >= max {
            return false;
        }
        let shard = shard_of_packet(p);
        self.rx[shard].push_back(p.to_vec());
        self.rx_total += 1;
        self.mark_due(shard);
        true
    }

    /// The sets to poll now (due, or their deadline passed); their flags are cleared.
    pub(super) fn take_due(&mut self, now: smoltcp::time::Instant) -> Vec<usize> {
        for (shard, at) in self.poll_at.iter().enumerate() {
            if at.is_some_and(|t| t <= now) && !self.due_flag[shard] {
                self.due_flag[shard] = true;
                self.due.push(shard);
            }
        }
        let due = std::mem::take(&mut self.due);
        for &s in &due {
            self.due_flag[s] = false;
        }
        due
    }

    /// Gives the list [`Self::take_due`] returned back (no allocation per round).
    pub(super) fn recycle_due(&mut self, mut due: Vec<usize>) {
        if self.due.is_empty() {
            due.clear();
            self.due = due;
        }
    }

    /// The earliest deadline of any set; now when a set is due.
    pub(super) fn next_poll(&self, now: smoltcp::time::Instant) -> Option<smoltcp::time::Instant> {
        if !self.due.is_empty() {
            return Some(now);
        }
        self.poll_at.iter().flatten().min().copied()
    }

    /// Removes the slots retired before the last poll.
    pub(super) fn reap_retired(&mut self) {
        for id in std::mem::take(&mut self.reap) {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: usize) {
        if let Some(slot) = self.slots.get_mut(id).and_then(|s| s.take()) {
            self.sets[slot.shard].remove(slot.handle);
            if matches!(slot.role, Role::Conn(_)) && !self.listeners.contains_key(&slot.local_port)
            {
                self.used_ports.remove(&slot.local_port);
            }
            self.free.push(id);
            self.live -= 1;
        }
    }

    /// The driver is stopping: every open stream ends (with `Stopped` unless it already has
    /// its end), every listener closes.
    pub(super) fn stop_all(&mut self) {
        for slot in self.slots.iter().flatten() {
            if let Some(shared) = &slot.shared {
                let mut inner = lock(&shared.inner);
                if inner.error.is_none() && !inner.rx_eof {
                    inner.error = Some(NetError::Stopped);
                }
                inner.phase = Phase::Closed;
                inner.wake_both();
            }
        }
        self.listeners.clear();
    }

    /// One line per open connection: socket state and queue depths, then the application side.
    pub(super) fn detail(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (id, slot) in self.slots.iter().enumerate() {
            let Some(slot) = slot else { continue };
            if matches!(slot.role, Role::Listen { .. }) {
                continue;
            }
            let sock = self.sets[slot.shard].get::<tcp::Socket>(slot.handle);
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
}

#[cfg(test)]
mod tests {
    use super::{shard_of_packet, shard_of_port, SHARDS};

    /// An IPv4 header (IHL 5, given protocol and fragment field) followed by `ports`.
    fn v4(proto: u8, frag: u16, ports: [u16; 2]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[9] = proto;
        p.extend_from_slice(&ports[0].to_be_bytes());
        p.extend_from_slice(&ports[1].to_be_bytes());
        p.extend_from_slice(&[0u8; 16]);
        p
    }

    #[test]
    fn a_tcp_segment_goes_to_the_set_of_its_destination_port() {
        let port = 50_123;
        assert_eq!(
            shard_of_packet(&v4(6, 0, [8000, port])),
            shard_of_port(port)
        );
        assert_ne!(shard_of_port(port), shard_of_port(port + 1));
        // Don't-fragment set: still a whole segment.
        assert_eq!(
            shard_of_packet(&v4(6, 0x4000, [8000, port])),
            shard_of_port(port)
        );
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[6] = 6;
        v6.extend_from_slice(&8000u16.to_be_bytes());
        v6.extend_from_slice(&port.to_be_bytes());
        assert_eq!(shard_of_packet(&v6), shard_of_port(port));
        assert!(shard_of_port(u16::MAX) < SHARDS);
    }

    #[test]
    fn anything_else_goes_to_set_zero_without_panicking() {
        let port = 50_123;
        assert_eq!(shard_of_packet(&v4(1, 0, [8000, port])), 0); // ICMP
        assert_eq!(shard_of_packet(&v4(17, 0, [8000, port])), 0); // UDP
        assert_eq!(shard_of_packet(&v4(6, 0x2000, [8000, port])), 0); // first fragment
        assert_eq!(shard_of_packet(&v4(6, 3, [8000, port])), 0); // later fragment
        for len in 0..24 {
            let p = v4(6, 0, [8000, port]);
            let _ = shard_of_packet(&p[..len]);
        }
        assert_eq!(shard_of_packet(&[0x45, 0, 0]), 0);
        assert_eq!(shard_of_packet(&[0x4f; 30]), 0); // IHL 60 beyond the packet
        assert_eq!(shard_of_packet(&[]), 0);
        assert_eq!(shard_of_packet(&[0x70; 60]), 0);
    }
}
