//! Surviving a restart of this process with the corp side untouched.
//!
//! A corp peer behind NAT dials the appliance; after a restart the new process has no session
//! and does not know where the peer is, while the peer keeps sending (keepalives every 25 s) on
//! its old session until its own rekey timer fires — up to two minutes without service. Two
//! mechanisms close that gap:
//!
//! - **Stored endpoints.** Each peer's last *authenticated* endpoint (and the local address it
//!   dialled) is handed to the endpoint store ([`WgCore::take_endpoint_changes`]; the driver
//!   writes it off the packet path) and given back at start ([`WgCore::restore_endpoints`]),
//!   and the driver handshakes those endpoints at once. The corp NAT still maps that address to
//!   the peer (its keepalives keep the mapping open), so the first initiation gets through.
//!   A fresh authenticated packet always replaces a stored endpoint; a stored one replaces a
//!   configured endpoint only when the configured one is unchanged since the stored one was
//!   learned (the most recently learned wins).
//! - **Unknown sessions.** A data packet whose receiver index no session of this process has,
//!   coming from the endpoint a peer is known at, means that peer is still on a previous run's
//!   session: a handshake initiation goes to that endpoint, at most one per [`REKICK_EVERY`]
//!   per peer and only while the peer has no live session here ([`WgCore::rekick`]). The
//!   source address of such a packet is never trusted by itself: only an endpoint learned from
//!   an authenticated packet (or configured) is ever sent to, so spoofed packets cannot turn
//!   the appliance into an amplifier or make it talk to anyone new.
//!
//! Never does I/O and never reads a clock: the core's clock is the driver's.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use super::{Output, WgCore};
use crate::wgkey::PublicKey;

/// At most one handshake per peer started by an unknown session, per this long (WireGuard's
/// REKEY_TIMEOUT: boringtun retries its own initiations at the same pace).
pub const REKICK_EVERY: Duration = Duration::from_secs(5);

/// A session younger than this (WireGuard's REJECT_AFTER_TIME) is live: an unknown session
/// next to it is noise (or a spoof), not a reason to handshake again.
const SESSION_LIVE: Duration = Duration::from_secs(180);

/// A peer's endpoint as the endpoint store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedEndpoint {
    pub public_key: PublicKey,
    /// Where its last authenticated packet came from.
    pub endpoint: SocketAddr,
    /// The local address that packet was sent to (wildcard binds reply from it).
    pub local: Option<IpAddr>,
    /// When the endpoint was learned.
    pub learned: SystemTime,
    /// The peer's configured endpoint at the time (a changed one wins over this record).
    pub configured: Option<SocketAddr>,
}

impl WgCore {
    /// Puts stored endpoints back (at start, before the first handshake): a peer with a
    /// record gets its endpoint unless its configured endpoint changed since the record was
    /// made. Records of unknown keys are ignored. Returns the names of the peers restored.
    pub fn restore_endpoints(&mut self, stored: &[LearnedEndpoint]) -> Vec<String> {
        let mut restored = Vec::new();
        for rec in stored {
            let Some(&pos) = self.by_key.get(&rec.public_key.0) else {
                continue;
            };
            let peer = &mut self.peers[pos];
            if peer.spec.endpoint.is_some() && peer.spec.endpoint != rec.configured {
                continue; // the operator configured another endpoint since: it is newer
            }
            peer.endpoint = Some(rec.endpoint);
            peer.local_ip = rec.local;
            peer.learned = Some(rec.learned);
            restored.push(peer.spec.name.clone());
        }
        restored
    }

    /// The learned endpoints of every peer, when any changed since the last call (for the
    /// endpoint store; the driver asks once per tick).
    pub fn take_endpoint_changes(&mut self) -> Option<Vec<LearnedEndpoint>> {
        if !std::mem::take(&mut self.endpoints_dirty) {
            return None;
        }
        Some(
            self.peers
                .iter()
                .filter_map(|p| {
                    Some(LearnedEndpoint {
                        public_key: p.spec.public_key,
                        endpoint: p.endpoint?,
                        local: p.local_ip,
                        learned: p.learned?,
                        configured: p.spec.endpoint,
                    })
                })
                .collect(),
        )
    }

    /// A data packet from `from` named a session this process does not have. When `from` is
    /// the endpoint a peer is known at (learned from an authenticated packet, stored, or
    /// configured) and that peer has no live session here, start a handshake towards it — at
    /// most one per [`REKICK_EVERY`], and none while one is in progress (boringtun).
    pub(super) fn rekick(&mut self, from: SocketAddr, out: &mut dyn FnMut(Output<'_>)) {
        let Some(pos) = self.peers.iter().position(|p| p.endpoint == Some(from)) else {
            return; // an address nobody authenticated: never answered
        };
        let now = self.now;
        let peer = &mut self.peers[pos];
        if peer
            .last_rekick
            .is_some_and(|t| now.saturating_duration_since(t) < REKICK_EVERY)
        {
            return;
        }
        let live = peer
            .tunn
            .time_since_last_handshake()
            .is_some_and(|age| age < SESSION_LIVE);
        if live {
            return;
        }
        peer.last_rekick = Some(now);
        tracing::debug!(
            peer = %peer.spec.name,
            %from,
            "data on an unknown session from the peer's endpoint: handshaking"
        );
        self.initiate_one(pos, out);
    }
}
