//! What `READY=1` waits for: the listeners are up (the caller sends it after binding them)
//! **and** the tunnel can carry requests — every peer this process knows an endpoint for (a
//! stored or configured one) completed its handshake and the upstreams' model lists are known —
//! or [`READY_WAIT`] passed. A restart under systemd thus reports ready once requests work
//! again, not merely once the sockets are bound, and never waits long for a corp side that is
//! really down (the log says which peer did not answer). Peers without any endpoint can only
//! dial in on their own, so they are not waited for.

use std::time::{Duration, Instant};

use crate::gateway::GatewayHandle;
use crate::netstack::Netstack;
use crate::tunnel::PeerHealth;

/// The longest `READY=1` waits for the tunnel after the listeners are up.
pub const READY_WAIT: Duration = Duration::from_secs(2);

/// Waits (at most `within`) for the peers with an endpoint to be up and for the model lists
/// to be known; logs the outcome and returns it as a suffix for the `STATUS=` line ("" when
/// there was nothing to wait for).
pub async fn await_tunnel(
    netstack: &Netstack,
    gateway: Option<&GatewayHandle>,
    within: Duration,
) -> String {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + within;
    let mut events = netstack.peer_events();
    let Ok(first) = netstack.stats().await else {
        return "; tunnel stopped".into();
    };
    let waited: Vec<String> = first
        .peers
        .iter()
        .filter(|p| p.endpoint.is_some())
        .map(|p| p.name.clone())
        .collect();
    loop {
        let stats = match netstack.stats().await {
            Ok(s) => s,
            Err(_) => return "; tunnel stopped".into(),
        };
        let pending: Vec<String> = stats
            .peers
            .iter()
            .filter(|p| waited.contains(&p.name) && p.health != PeerHealth::Up)
            .map(|p| match p.endpoint {
                Some(e) => format!("{} (at {e})", p.name),
                None => p.name.clone(),
            })
            .collect();
        // The model list only comes through a tunnel we wait for.
        let models_pending = pending.is_empty()
            && !waited.is_empty()
            && gateway.is_some_and(|g| g.load().routes.incomplete());
        if pending.is_empty() && !models_pending {
            let took = start.elapsed();
            if waited.is_empty() {
                return String::new();
            }
            tracing::info!(peers = ?waited, ?took, "ready: tunnel up, models known");
            return format!("; tunnel up in {} ms", took.as_millis());
        }
        let sleep = tokio::time::sleep_until(deadline);
        tokio::select! {
            _ = sleep => {
                if pending.is_empty() {
                    tracing::warn!(?within, "ready without the model list: no upstream answered GET /models yet (see `modelgate status`)");
                    return "; model list not known yet".into();
                }
                tracing::warn!(
                    ?within,
                    peers = ?pending,
                    "ready without these peers: no handshake yet at their last endpoint; requests routed to them get 503 until they dial in (their keepalive or rekey brings them back)"
                );
                return format!("; no handshake yet: {}", pending.join(", "));
            }
            // A peer came up; or, for the model list, look again shortly.
            _ = events.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)), if models_pending => {}
        }
    }
}
