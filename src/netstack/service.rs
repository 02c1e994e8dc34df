//! Servicing one connection: moving bytes and state between a smoltcp socket and its
//! application stream, after smoltcp or the application woke it.
//!
//! This is the per-packet path. It must not allocate, take any lock but the connection's own
//! state block, or send on a channel (the one exception: handing an accepted connection to its
//! listener, once per connection).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Buf;
use smoltcp::socket::tcp;

use super::sockets::{ConnState, ConnTable, Role, Slot};
use super::stream::{lock, Inner, Phase, Shared, TunnelStream};
use super::NetError;

/// What a service pass left the connection as.
#[derive(PartialEq, Eq)]
enum Pass {
    /// Not a connection with a stream (nothing to do).
    Skipped,
    Open,
    /// Closed or aborted: retire the slot.
    Finished,
}

impl ConnTable {
    /// Moves bytes and state between one smoltcp socket and its application stream.
    pub(super) fn service(&mut self, id: usize) {
        let Some(Some(slot)) = self.slots.get_mut(id) else {
            return;
        };
        if slot.retired {
            return;
        }
        if let Role::Listen { .. } = slot.role {
            return self.service_listener(id);
        }
        let shard = slot.shard;
        let sock = self.sets[shard].get_mut::<tcp::Socket>(slot.handle);
        match service_conn(slot, sock) {
            Pass::Skipped => {}
            Pass::Finished => self.retire(id),
            Pass::Open => {
                sock.register_recv_waker(&slot.waker);
                sock.register_send_waker(&slot.waker);
                // Bytes moved either way may mean a segment or a window update to send.
                self.mark_due(shard);
            }
        }
    }

    /// Services every connection the application touched since the last round; false when
    /// there was none.
    pub(super) fn service_touched(&mut self) -> bool {
        let dirty = std::mem::take(&mut *lock(&self.wake.dirty));
        for &id in &dirty {
            self.service_app(id);
        }
        !dirty.is_empty()
    }

    /// Services every connection smoltcp woke during the poll (once each); false when there
    /// was none.
    pub(super) fn service_woken(&mut self) -> bool {
        let mut ready = std::mem::take(&mut *lock(&self.ready));
        ready.sort_unstable();
        ready.dedup();
        for &id in &ready {
            self.service(id);
        }
        !ready.is_empty()
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

    /// A listening socket: keeps the backlog full and hands an established connection over.
    fn service_listener(&mut self, id: usize) {
        let Some(Some(slot)) = self.slots.get_mut(id) else {
            return;
        };
        let Role::Listen {
            port,
            ref mut syn_seen,
        } = slot.role
        else {
            return;
        };
        let sock = self.sets[slot.shard].get_mut::<tcp::Socket>(slot.handle);
        let state = sock.state();
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
                self.accept(id, port);
                self.replenish(port);
                self.service(id);
            }
            _ => {
                // The handshake failed (RST, timeout): drop it; replenish keeps the count.
                self.retire(id);
                self.replenish(port);
            }
        }
    }

    /// The handshake on a listening socket completed: the slot becomes a connection owned by a
    /// new stream, queued on the listener, or refused like a kernel would when the backlog is
    /// full or the listener is gone.
    fn accept(&mut self, id: usize, port: u16) {
        let Some(Some(slot)) = self.slots.get_mut(id) else {
            return;
        };
        let sock = self.sets[slot.shard].get_mut::<tcp::Socket>(slot.handle);
        let endpoint = |e: smoltcp::wire::IpEndpoint| SocketAddr::new(e.addr.into(), e.port);
        let remote = sock.remote_endpoint().map(endpoint);
        let local = sock.local_endpoint().map(endpoint);
        let shared = Shared::new(self.wake.clone(), self.tcp.app_buffer, self.tcp.app_buffer);
        shared.id.store(id, Ordering::Release);
        lock(&shared.inner).phase = Phase::Open;
        slot.shared = Some(shared.clone());
        slot.role = Role::Conn(ConnState {
            established: true,
            ..ConnState::default()
        });
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
            sock.abort();
            if let Some(shared) = &slot.shared {
                lock(&shared.inner).dropped = true;
            }
        }
    }
}

/// One pass over a connection: handshake news, receive, send, close, then wake the stream.
fn service_conn(slot: &mut Slot, sock: &mut tcp::Socket<'static>) -> Pass {
    let Slot {
        shared,
        role,
        deadline,
        ..
    } = slot;
    let Some(shared) = shared.as_ref() else {
        return Pass::Skipped;
    };
    let mut inner = lock(&shared.inner);
    let Role::Conn(conn) = role else {
        return Pass::Skipped;
    };
    let state = sock.state();
    let mut pass = ConnPass {
        sock,
        inner: &mut inner,
        conn,
        woke_reader: false,
        woke_writer: false,
    };
    pass.note_established(state, deadline);
    pass.receive(state);
    pass.send();
    let aborted = pass.close_if_dropped();
    let closed = pass.finish_if_closed(deadline.is_some());
    pass.wake_stream();
    if aborted || closed {
        Pass::Finished
    } else {
        Pass::Open
    }
}

/// The pieces of one connection a service pass works on, and which side of the stream to wake.
struct ConnPass<'a> {
    sock: &'a mut tcp::Socket<'static>,
    inner: &'a mut Inner,
    conn: &'a mut ConnState,
    woke_reader: bool,
    woke_writer: bool,
}

impl ConnPass<'_> {
    /// The handshake completed: the connect timeout ends and the dialler's wait resolves.
    fn note_established(&mut self, state: tcp::State, deadline: &mut Option<Instant>) {
        if !self.conn.established
            && matches!(
                state,
                tcp::State::Established | tcp::State::CloseWait | tcp::State::FinWait1
            )
        {
            self.conn.established = true;
            *deadline = None;
            self.inner.phase = Phase::Open;
            if let Some(w) = self.inner.write_waker.take() {
                w.wake();
            }
        }
    }

    /// smoltcp → application buffer, bounded by the app buffer; then the peer's FIN, once
    /// everything before it has been handed over.
    fn receive(&mut self, state: tcp::State) {
        let sock = &mut *self.sock;
        let inner = &mut *self.inner;
        while sock.can_recv() && inner.rx.len() < inner.rx_cap {
            let room = inner.rx_cap - inner.rx.len();
            let rx = &mut inner.rx;
            match sock.recv(|b| {
                let n = b.len().min(room);
                rx.extend_from_slice(&b[..n]);
                (n, n)
            }) {
                Ok(0) | Err(_) => break,
                Ok(_) => self.woke_reader = true,
            }
        }
        if inner.dropped {
            // Nobody will read: discard so the window stays open while we close.
            inner.rx.clear();
        }
        inner.rx_blocked = sock.can_recv();
        if self.conn.established
            && !sock.may_recv()
            && matches!(
                state,
                tcp::State::CloseWait
                    | tcp::State::LastAck
                    | tcp::State::Closing
                    | tcp::State::TimeWait
            )
        {
            self.conn.fin_received = true;
        }
        if self.conn.fin_received && !inner.rx_eof && !sock.can_recv() {
            inner.rx_eof = true;
            self.woke_reader = true;
        }
    }

    /// Application buffer → smoltcp; our FIN once the application shut down and all is sent.
    fn send(&mut self) {
        let sock = &mut *self.sock;
        let inner = &mut *self.inner;
        if !inner.tx.is_empty() && sock.can_send() {
            if let Ok(n) = sock.send_slice(&inner.tx) {
                if n > 0 {
                    inner.tx.advance(n);
                    if inner.tx.is_empty() {
                        inner.tx = bytes::BytesMut::new();
                    }
                    self.woke_writer = true;
                }
            }
        }
        if inner.tx_shutdown && inner.tx.is_empty() && !self.conn.fin_sent && self.conn.established
        {
            sock.close();
            self.conn.fin_sent = true;
        }
    }

    /// The stream was dropped: reset or close. True when the connection was reset.
    fn close_if_dropped(&mut self) -> bool {
        if !self.inner.dropped {
            return false;
        }
        if !self.conn.established || !self.conn.fin_received {
            // Dropped while the server may still be sending: reset, so it stops at once
            // (a client that went away must not keep a GPU busy).
            self.sock.abort();
            return true;
        }
        if self.inner.tx.is_empty() && !self.conn.fin_sent {
            // Clean end: like close(2), queued bytes still go out, then our FIN.
            self.sock.close();
            self.conn.fin_sent = true;
        }
        false
    }

    /// The socket finished: tell the stream how it ended (a dialled connection that never got
    /// established was refused). A finished socket is kept until the reader has taken every
    /// byte it received. True when the slot can go.
    fn finish_if_closed(&mut self, dialling: bool) -> bool {
        if !matches!(self.sock.state(), tcp::State::Closed | tcp::State::TimeWait) {
            return false;
        }
        if !self.inner.dropped && self.sock.can_recv() {
            return false; // the reader has bytes left to take
        }
        let inner = &mut *self.inner;
        if inner.phase != Phase::Closed {
            if !self.conn.established {
                inner.error = Some(if dialling {
                    NetError::Refused
                } else {
                    NetError::Reset
                });
            } else if !self.conn.fin_received {
                inner.error = Some(NetError::Reset);
            } else {
                inner.rx_eof = true;
            }
            inner.phase = Phase::Closed;
            self.woke_reader = true;
            self.woke_writer = true;
        }
        true
    }

    fn wake_stream(self) {
        if self.woke_reader {
            if let Some(w) = self.inner.read_waker.take() {
                w.wake();
            }
        }
        if self.woke_writer {
            if let Some(w) = self.inner.write_waker.take() {
                w.wake();
            }
        }
    }
}
