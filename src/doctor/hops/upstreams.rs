//! Hop 6: every model has an upstream (replica) that answered the daemon's last `GET /models`
//! through the tunnel. An unreachable replica whose models are all still served by another
//! one does not fail the hop (the model works, with less capacity): the detail names it.

use crate::control::{StatusReport, UpstreamStatus};
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
    // A down upstream is covered when every model it serves has a reachable replica.
    let covered = |d: &UpstreamStatus| {
        !d.models.is_empty()
            && d.models
                .iter()
                .all(|m| up.iter().any(|u| u.models.contains(m)))
    };
    let (degraded, failed): (Vec<&UpstreamStatus>, Vec<&UpstreamStatus>) =
        down.into_iter().partition(|d| covered(d));
    if failed.is_empty() {
        let mut detail = up
            .iter()
            .map(|u| format!("{} ({} model(s))", u.name, u.models.len()))
            .collect::<Vec<_>>()
            .join(", ")
            + " reachable";
        for d in &degraded {
            let others: Vec<&str> = up
                .iter()
                .filter(|u| u.models.iter().any(|m| d.models.contains(m)))
                .map(|u| u.name.as_str())
                .collect();
            detail += &format!(
                "; {} at {} is NOT reachable, its models are served by {} alone",
                d.name,
                d.url,
                others.join(", ")
            );
        }
        return HopResult::pass(Hop::Upstreams, detail);
    }
    HopResult::fail(
        Hop::Upstreams,
        failed.iter()
            .map(|u| format!("{} at {}: its last GET /models through the tunnel failed", u.name, u.url))
            .collect::<Vec<_>>()
            .join("; "),
        format!(
            "check that the model server runs and answers on the corp side (`curl {}/models` there), that the corp peer forwards to it (PostUp of `modelgate peer config NAME`), and that the peer's allowed IPs cover it",
            failed[0].url.trim_end_matches('/')
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::InterfaceStatus;
    use crate::doctor::Outcome;

    fn upstream(name: &str, reachable: bool, models: &[&str]) -> UpstreamStatus {
        UpstreamStatus {
            name: name.into(),
            url: format!("http://10.20.0.5:8000/{name}"),
            reachable,
            models: models.iter().map(|m| m.to_string()).collect(),
            in_flight: 0,
            max_concurrent: None,
            queued: 0,
            health: "healthy".into(),
            ejected_until_unix: None,
            ejected_seconds_left: None,
            last_error: None,
            last_error_unix: None,
            retries_total: 0,
            ejections_total: 0,
        }
    }

    fn status(upstreams: Vec<UpstreamStatus>) -> StatusReport {
        StatusReport {
            version: "t".into(),
            pid: 1,
            uptime_seconds: 1,
            config: "c".into(),
            interface: InterfaceStatus {
                public_key: "k".into(),
                listen: "0.0.0.0:51820".into(),
                listen_port: 51820,
                address: "10.99.0.1/24".into(),
            },
            peers: Vec::new(),
            upstreams,
            models: Vec::new(),
            https: None,
            metrics_listen: None,
            streams: Vec::new(),
            store: None,
        }
    }

    /// One replica of two down: the model still works, the hop passes and names it; a model
    /// with no reachable replica fails the hop, naming the server.
    #[test]
    fn a_down_replica_fails_only_when_its_models_have_no_other() {
        let r = upstreams_hop(&status(vec![
            upstream("a", true, &["coder"]),
            upstream("b", false, &["coder"]),
        ]));
        assert_eq!(r.outcome, Outcome::Pass, "{r:?}");
        assert!(
            r.detail.contains(
                "b at http://10.20.0.5:8000/b is NOT reachable, its models are served by a alone"
            ),
            "{}",
            r.detail
        );
        let r = upstreams_hop(&status(vec![
            upstream("a", true, &["coder"]),
            upstream("b", false, &["coder", "small"]),
        ]));
        assert_eq!(r.outcome, Outcome::Fail, "{r:?}");
        assert!(r
            .detail
            .starts_with("b at http://10.20.0.5:8000/b: its last GET /models"));
        assert!(r
            .fix
            .unwrap()
            .contains("curl http://10.20.0.5:8000/b/models"));
        // A down server whose models are not known (never discovered) is not covered.
        let r = upstreams_hop(&status(vec![
            upstream("a", true, &["coder"]),
            upstream("c", false, &[]),
        ]));
        assert_eq!(r.outcome, Outcome::Fail);
        assert_eq!(upstreams_hop(&status(Vec::new())).outcome, Outcome::Fail);
    }
}
