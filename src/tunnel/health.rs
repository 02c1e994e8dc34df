//! Whether a peer is up, told from its silence: the core's clock at every peer's last
//! authenticated packet (handshakes, data and keepalives alike) against how often it promised
//! to send one.
//!
//! A corp peer configured from `peer add` sends a persistent keepalive every 25 s (or the
//! peer's `keepalive`) whenever it has nothing else to send, so a healthy peer is never silent
//! much longer than one interval. Two missed keepalives plus [`SILENCE_MARGIN`] (55 s at 25 s)
//! mean it is down — its WireGuard stopped, or its NAT/firewall drops the packets — while one
//! lost keepalive does not. The age of the last handshake cannot tell that: a session stays
//! valid for 180 s after the peer died. Never reads a clock itself and never does I/O.

use std::time::Duration;

use super::{Peer, WgCore, PEER_STALE_AFTER};
use crate::config::DEFAULT_PEER_KEEPALIVE;

/// Keepalives a peer may miss before it counts as down.
const MISSED_KEEPALIVES: u32 = 2;
/// Added to the missed keepalives: delivery jitter and the driver's 250 ms tick.
const SILENCE_MARGIN: Duration = Duration::from_secs(5);

/// A peer as requests see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerHealth {
    /// No session with this process yet (it never completed a handshake since the start).
    NoHandshake,
    /// A session, and an authenticated packet within [`silent_after`].
    Up,
    /// A session, but nothing authenticated for longer than [`silent_after`].
    Silent,
    /// The last handshake is older than [`PEER_STALE_AFTER`] (a peer that sends anything
    /// re-handshakes every 120 s).
    Stale,
}

impl PeerHealth {
    /// The `status --json` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerHealth::NoHandshake => "no_handshake",
            PeerHealth::Up => "up",
            PeerHealth::Silent => "silent",
            PeerHealth::Stale => "stale",
        }
    }
}

/// How long a peer may send nothing before it is down: two of its keepalive intervals plus
/// [`SILENCE_MARGIN`]. `keepalive` is the peer's configured one, which the wg-quick file of
/// `peer add` prints; without one the file prints [`DEFAULT_PEER_KEEPALIVE`] (25 s → 55 s).
pub fn silent_after(keepalive: Option<u16>) -> Duration {
    let every = u64::from(keepalive.unwrap_or(DEFAULT_PEER_KEEPALIVE).max(1));
    Duration::from_secs(every) * MISSED_KEEPALIVES + SILENCE_MARGIN
}

/// The health of a peer whose last handshake is `handshake_age` ago (`None`: none in this
/// process) and whose last authenticated packet is `since_rx` ago.
pub(super) fn classify(
    handshake_age: Option<Duration>,
    since_rx: Option<Duration>,
    silent_after: Duration,
) -> PeerHealth {
    match (handshake_age, since_rx) {
        (None, _) => PeerHealth::NoHandshake,
        // Silence first: it says since when, which is what the operator needs.
        (Some(_), Some(quiet)) if quiet > silent_after => PeerHealth::Silent,
        (Some(age), _) if age > PEER_STALE_AFTER => PeerHealth::Stale,
        (Some(_), _) => PeerHealth::Up,
    }
}

impl WgCore {
    /// The health of `peer` by the core's clock.
    pub(super) fn health_of(&self, peer: &Peer) -> PeerHealth {
        classify(
            peer.tunn.time_since_last_handshake(),
            peer.last_rx.map(|t| self.now.saturating_duration_since(t)),
            silent_after(peer.spec.keepalive),
        )
    }

    /// Whether a packet since the last call came from a peer that was not up (so
    /// [`WgCore::refresh_health`] should run now rather than at the next tick).
    pub fn take_recheck(&mut self) -> bool {
        std::mem::take(&mut self.recheck)
    }

    /// Recomputes every peer's health by the core's clock, logs each change, and returns
    /// whether any peer came up (a first handshake, or a packet after a silence). Runs per
    /// tick and after a batch that [`WgCore::take_recheck`] flagged; never per packet.
    pub fn refresh_health(&mut self) -> bool {
        let mut came_up = false;
        for pos in 0..self.peers.len() {
            let health = self.health_of(&self.peers[pos]);
            let peer = &mut self.peers[pos];
            let up = health == PeerHealth::Up;
            if up == peer.up {
                continue;
            }
            peer.up = up;
            if up {
                came_up = true;
                tracing::info!(peer = %peer.spec.name, endpoint = ?peer.endpoint, "peer up");
            } else if health == PeerHealth::Silent {
                tracing::warn!(
                    peer = %peer.spec.name,
                    silent_after = ?silent_after(peer.spec.keepalive),
                    "peer silent: nothing received, not even a keepalive; requests routed to it get 503 until it is heard from again (its WireGuard is down, or its NAT/firewall drops UDP)"
                );
            } else {
                tracing::warn!(peer = %peer.spec.name, state = health.as_str(), "peer down");
            }
        }
        came_up
    }
}
