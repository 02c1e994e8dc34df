//! Hop 6: every upstream answered the daemon's last `GET /models` through the tunnel.

use crate::control::StatusReport;
use crate::doctor::{Hop, HopResult};

/// Hop 6.
pub(in crate::doctor) fn upstreams_hop(s: &StatusReport) -> HopResult {
    if s.upstreams.is_empty() {
        return HopResult::fail(
            Hop::Upstreams,
            "no upstreams configured: no model to route to",
            "add the model server: `modelgate upstream add NAME --url http://IP:PORT/v1`",
        );
    }
    let (up, down): (Vec<_>, Vec<_>) = s.upstreams.iter().partition(|u| u.reachable);
    if down.is_empty() {
        return HopResult::pass(
            Hop::Upstreams,
            up.iter()
                .map(|u| format!("{} ({} model(s))", u.name, u.models.len()))
                .collect::<Vec<_>>()
                .join(", ")
                + " reachable",
        );
    }
    HopResult::fail(
        Hop::Upstreams,
        down.iter()
            .map(|u| format!("{} at {}: its last GET /models through the tunnel failed", u.name, u.url))
            .collect::<Vec<_>>()
            .join("; "),
        format!(
            "check that the model server runs and answers on the corp side (`curl {}/models` there), that the corp peer forwards to it (PostUp of `modelgate peer config NAME`), and that the peer's allowed IPs cover it",
            down[0].url.trim_end_matches('/')
        ),
    )
}
