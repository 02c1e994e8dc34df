//! What doctor reports: the hops in path order, the verdict on each, and the whole run.
//!
//! The JSON shape here (`doctor --json`) is documented in the README: keep it stable.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// One hop of the path, in the order a request crosses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hop {
    Config,
    Listener,
    Certificate,
    Dns,
    Peers,
    Upstreams,
    Models,
    Completion,
    /// Only with a shared store (`[store] url`): after the path, so the path's numbers stay.
    Store,
}

impl Hop {
    pub const ALL: [Hop; 8] = [
        Hop::Config,
        Hop::Listener,
        Hop::Certificate,
        Hop::Dns,
        Hop::Peers,
        Hop::Upstreams,
        Hop::Models,
        Hop::Completion,
    ];

    pub fn number(self) -> usize {
        if self == Hop::Store {
            return Hop::ALL.len() + 1;
        }
        Hop::ALL
            .iter()
            .position(|h| *h == self)
            .map_or(0, |i| i + 1)
    }

    /// The stable identifier used in `--json` (`"listener"`, …).
    pub fn id(self) -> &'static str {
        match self {
            Hop::Config => "config",
            Hop::Listener => "listener",
            Hop::Certificate => "certificate",
            Hop::Dns => "dns",
            Hop::Peers => "peers",
            Hop::Upstreams => "upstreams",
            Hop::Models => "models",
            Hop::Completion => "completion",
            Hop::Store => "store",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Hop::Config => "config valid",
            Hop::Listener => "daemon running, HTTPS listener bound",
            Hop::Certificate => "certificate valid, trusted, not near expiry",
            Hop::Dns => "public name resolves to this host",
            Hop::Peers => "WireGuard peers' handshakes fresh",
            Hop::Upstreams => "upstreams reachable through the tunnel",
            Hop::Models => "GET /v1/models answers",
            Hop::Completion => "streamed completion through the public path",
            Hop::Store => "shared store reachable (keys and usage in step)",
        }
    }
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

/// The verdict on one hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopResult {
    pub hop: Hop,
    pub outcome: Outcome,
    /// One line: what was seen.
    pub detail: String,
    /// What to do; only for a failure.
    pub fix: Option<String>,
}

impl HopResult {
    pub(super) fn pass(hop: Hop, detail: impl Into<String>) -> Self {
        HopResult {
            hop,
            outcome: Outcome::Pass,
            detail: detail.into(),
            fix: None,
        }
    }
    pub(super) fn fail(hop: Hop, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        HopResult {
            hop,
            outcome: Outcome::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    pub(super) fn skip(hop: Hop, why: impl Into<String>) -> Self {
        HopResult {
            hop,
            outcome: Outcome::Skip,
            detail: why.into(),
            fix: None,
        }
    }

    /// `{"hop","number","title","status","ok","detail","fix"}`; `ok` is null for a skip.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "hop": self.hop.id(),
            "number": self.hop.number(),
            "title": self.hop.title(),
            "status": self.outcome,
            "ok": match self.outcome {
                Outcome::Pass => serde_json::Value::Bool(true),
                Outcome::Fail => serde_json::Value::Bool(false),
                Outcome::Skip => serde_json::Value::Null,
            },
            "detail": self.detail,
            "fix": self.fix,
        })
    }
}

/// The throwaway key of hops 7–8, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyNote {
    pub name: String,
    pub id: String,
    pub revoked: bool,
    pub revoke_error: Option<String>,
}

/// Everything doctor found.
#[derive(Debug, Clone)]
pub struct Report {
    pub config: PathBuf,
    /// The public name checked (`None` when the config did not load).
    pub name: Option<String>,
    pub hops: Vec<HopResult>,
    pub key: Option<KeyNote>,
    pub elapsed: Duration,
    /// True when hop 1 failed because the file is invalid (exit 64), not unreadable (exit 1).
    pub config_invalid: bool,
    /// SIGINT/SIGTERM arrived during the probes (the key was still revoked).
    pub interrupted: bool,
}

impl Report {
    /// THE answer: the first hop that failed.
    pub fn first_failure(&self) -> Option<&HopResult> {
        self.hops.iter().find(|h| h.outcome == Outcome::Fail)
    }

    /// 0 all pass (skips allowed), 64 invalid config, 1 any other failure.
    pub fn exit_code(&self) -> u8 {
        match self.first_failure() {
            None if !self.interrupted => 0,
            Some(h) if h.hop == Hop::Config && self.config_invalid => 64,
            _ => 1,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": self.exit_code() == 0,
            "first_failure": self.first_failure().map(HopResult::to_json),
            "first_failing_hop": self.first_failure().map(|h| h.hop.id()),
            "config": self.config.display().to_string(),
            "name": self.name,
            "hops": self.hops.iter().map(HopResult::to_json).collect::<Vec<_>>(),
            "throwaway_key": self.key.as_ref().map(|k| serde_json::json!({
                "name": k.name, "id": k.id, "revoked": k.revoked, "revoke_error": k.revoke_error,
            })),
            "elapsed_ms": self.elapsed.as_millis() as u64,
            "interrupted": self.interrupted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_are_numbered_in_path_order() {
        assert_eq!(Hop::Config.number(), 1);
        assert_eq!(Hop::Completion.number(), 8);
        assert_eq!(serde_json::to_value(Hop::Dns).unwrap(), "dns");
    }

    #[test]
    fn first_failure_and_exit_codes() {
        let mut r = Report {
            config: "/x".into(),
            name: Some("gw.test".into()),
            hops: vec![
                HopResult::pass(Hop::Config, "ok"),
                HopResult::pass(Hop::Listener, "ok"),
                HopResult::skip(Hop::Dns, "no dns"),
            ],
            key: None,
            elapsed: Duration::ZERO,
            config_invalid: false,
            interrupted: false,
        };
        assert_eq!(r.exit_code(), 0);
        assert!(r.first_failure().is_none());
        r.hops.push(HopResult::fail(Hop::Peers, "stale", "fix it"));
        r.hops
            .push(HopResult::fail(Hop::Completion, "502", "later"));
        assert_eq!(r.first_failure().unwrap().hop, Hop::Peers);
        assert_eq!(r.exit_code(), 1);
        let j = r.to_json();
        assert_eq!(j["first_failing_hop"], "peers");
        assert_eq!(j["hops"][2]["ok"], serde_json::Value::Null);
        assert_eq!(j["hops"][3]["ok"], false);
        assert_eq!(j["hops"][3]["fix"], "fix it");
        r.hops.insert(0, HopResult::fail(Hop::Config, "bad", "fix"));
        r.config_invalid = true;
        assert_eq!(r.exit_code(), 64);
    }
}
