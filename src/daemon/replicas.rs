//! What `status` and the metrics show of the upstreams (replicas) and the models they serve:
//! reachability, in flight, queue, health (ejected until when and why), retries, ejections.
//!
//! Reads the live gateway snapshot only; never changes it.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::control::{ModelStatus, UpstreamStatus};
use crate::gateway::upstream::Upstream;
use crate::gateway::GatewayState;
use crate::telemetry::ReplicaGauges;

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Every configured upstream, as `status` shows it.
pub(super) fn upstreams(state: &GatewayState) -> Vec<UpstreamStatus> {
    let (now, wall) = (Instant::now(), SystemTime::now());
    state
        .routes
        .upstreams()
        .iter()
        .map(|u| {
            let h = u.health.view(now);
            UpstreamStatus {
                name: u.spec.name.clone(),
                url: format!("http://{}{}", u.spec.addr, u.spec.base_path),
                reachable: u.reachable(),
                models: u.serves(),
                in_flight: u.in_flight(),
                max_concurrent: u.spec.max_concurrent,
                queued: state.scheduler.waiting_for(u) as u64,
                health: if h.healthy { "healthy" } else { "ejected" }.into(),
                ejected_until_unix: h.ejected_for.map(|d| unix(wall + d)),
                ejected_seconds_left: h.ejected_for.map(|d| d.as_secs_f64().ceil() as u64),
                last_error_unix: h.last_error.as_ref().map(|e| unix(e.1)),
                last_error: h.last_error.map(|e| e.0),
                retries_total: u.retries(),
                ejections_total: h.ejections,
            }
        })
        .collect()
}

/// Every public model served now, with its balancing, replicas and queue.
pub(super) fn models(state: &GatewayState) -> Vec<ModelStatus> {
    let now = Instant::now();
    let routes = &state.routes;
    let by_name = |n: &str| -> Option<&std::sync::Arc<Upstream>> {
        routes.upstreams().iter().find(|u| u.spec.name == n)
    };
    routes
        .models()
        .into_iter()
        .map(|(name, replicas)| ModelStatus {
            balance: routes.balance(&name).as_str().into(),
            healthy_replicas: replicas
                .iter()
                .filter_map(|r| by_name(r))
                .filter(|u| u.health.available(now))
                .count() as u64,
            queued: state.scheduler.queued(&name) as u64,
            replicas,
            name,
        })
        .collect()
}

/// The replica gauges and model queues of a scrape.
pub(super) fn gauges(state: &GatewayState) -> (Vec<ReplicaGauges>, Vec<(String, u64)>) {
    let now = Instant::now();
    let replicas = state
        .routes
        .upstreams()
        .iter()
        .map(|u| ReplicaGauges {
            upstream: u.spec.name.clone(),
            healthy: u.health.available(now),
            ejections: u.health.ejections(),
            retries: u.retries(),
        })
        .collect();
    let queued = state
        .routes
        .models()
        .into_iter()
        .map(|(m, _)| {
            let n = state.scheduler.queued(&m) as u64;
            (m, n)
        })
        .collect();
    (replicas, queued)
}
