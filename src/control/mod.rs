//! The local control API: how `modelgate status` and `modelgate reload` talk to the daemon.
//!
//! Transport: a unix stream socket at `server.control_socket` (default
//! `/run/modelgate/control.sock`), mode 0660, group `modelgate` when that group exists (else the
//! daemon's own group: then only the daemon's user and root can connect). Access to the socket
//! is the authorisation: there is no other credential.
//!
//! Protocol: HTTP/1.1 over that socket (so `curl --unix-socket PATH http://x/v1/status` works
//! too), JSON bodies:
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/status` | 200, a [`StatusReport`] |
//! | `POST /v1/reload` | 200 with a [`ReloadReport`] whose `applied` is true, or 422 with `applied: false` and the config's `errors`; the answer comes when the reload is done |
//! | anything else | 404 / 405, `{"error": "..."}` |
//!
//! Requests carry no body (one is never read). Limits: request head ≤ 16 KiB and complete
//! within 5 s, a connection lives at most 120 s, at most 16 connections at once; garbage gets a
//! 400 or a closed connection, never a panic. The JSON of [`StatusReport`] is what
//! `modelgate status --json` prints: the stable form for scripts (README "Operations").

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

/// `GET /v1/status`, and `modelgate status --json`. Fields are only ever added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// modelgate's version (`CARGO_PKG_VERSION`).
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    /// The config file the daemon runs (and reloads) from.
    pub config: String,
    pub interface: InterfaceStatus,
    pub peers: Vec<PeerStatus>,
    pub upstreams: Vec<UpstreamStatus>,
    /// Every public model served now, with its balancing and replicas.
    #[serde(default)]
    pub models: Vec<ModelStatus>,
    /// The HTTPS listener; `null` when the config has no `[tls]` (gateway off).
    pub https: Option<HttpsStatus>,
    /// Address of the Prometheus listener.
    pub metrics_listen: Option<String>,
    /// Keys with responses streaming now.
    pub streams: Vec<StreamStatus>,
    /// Where keys and usage live and whether the daemon reaches it (`null`: no gateway).
    #[serde(default)]
    pub store: Option<StoreStatus>,
}

/// The key store as the daemon sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// `sqlite` or `postgres`.
    pub kind: String,
    /// The file, or the URL without a password.
    pub location: String,
    /// Key reloads or usage writes are failing now.
    pub degraded: bool,
    /// Since when key reloads fail (RFC 3339), and the last error.
    pub keys_degraded_since: Option<String>,
    pub keys_degraded_since_unix: Option<u64>,
    pub keys_problem: Option<String>,
    /// Since when usage writes fail (RFC 3339), and the last error.
    pub usage_degraded_since: Option<String>,
    pub usage_degraded_since_unix: Option<u64>,
    pub usage_problem: Option<String>,
    /// Usage rows waiting in the local spool, and requests recorded through it so far.
    pub spooled_rows: u64,
    pub spooled_requests: u64,
}

/// The appliance's WireGuard interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub public_key: String,
    /// The bound UDP address, e.g. `0.0.0.0:51820`.
    pub listen: String,
    pub listen_port: u16,
    /// The appliance's tunnel address with its prefix, e.g. `10.99.0.1/24`.
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub public_key: String,
    /// Where its packets come from (learned) or the configured endpoint; `null` before any.
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Seconds since the latest handshake; `null` when none yet.
    pub latest_handshake_seconds_ago: Option<u64>,
    /// The latest handshake as UNIX seconds (like `wg show latest-handshakes`); `null` when none.
    pub latest_handshake_unix: Option<u64>,
    /// Inner IP bytes received from / sent to the peer.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Keepalive interval the appliance sends, seconds; `null` when off.
    pub persistent_keepalive: Option<u16>,
    /// `up`, `silent` (nothing received, not even a keepalive, for more than
    /// `silent_after_seconds`), `no_handshake` (none since the daemon started) or `stale`
    /// (the last handshake is older than 300 s). Requests to a peer that dials in and is not
    /// `up` get 503 at once. Empty from a daemon that predates the field.
    #[serde(default)]
    pub state: String,
    /// Seconds since the last authenticated packet from the peer (keepalives count); `null`
    /// before the first.
    #[serde(default)]
    pub last_received_seconds_ago: Option<u64>,
    #[serde(default)]
    pub last_received_unix: Option<u64>,
    /// When `state` is `silent`: UNIX seconds of the last packet, i.e. silent since then.
    #[serde(default)]
    pub silent_since_unix: Option<u64>,
    /// How long the peer may be silent before it is down: two of its keepalives + 5 s.
    #[serde(default)]
    pub silent_after_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub url: String,
    /// Its last `GET /models` answered (static routes: the last probe did).
    pub reachable: bool,
    /// Public model names it serves (static routes, or the discovered list).
    pub models: Vec<String>,
    /// Requests routed to it whose response has not ended.
    pub in_flight: u64,
    /// Its `max_concurrent` (fair-share capacity); `null` when unlimited.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Requests waiting for one of its slots (round-robin across keys).
    #[serde(default)]
    pub queued: u64,
    /// `healthy`, or `ejected` after a failure (passive health; see `last_error`).
    #[serde(default = "healthy")]
    pub health: String,
    /// While ejected: when it is tried again (UNIX seconds; the probe may re-admit it sooner).
    #[serde(default)]
    pub ejected_until_unix: Option<u64>,
    /// While ejected: seconds until then.
    #[serde(default)]
    pub ejected_seconds_left: Option<u64>,
    /// The last failure of a request or probe there (kept after recovery), and when.
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_error_unix: Option<u64>,
    /// Requests that failed there before their answer began and were retried on another replica.
    #[serde(default)]
    pub retries_total: u64,
    /// Times it was ejected.
    #[serde(default)]
    pub ejections_total: u64,
}

fn healthy() -> String {
    "healthy".into()
}

/// One public model and its replicas (the upstreams serving it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    pub name: String,
    /// `least_loaded` or `affinity` (`[[model]] balance`).
    pub balance: String,
    /// Upstream names, static routes first, then discovering upstreams.
    pub replicas: Vec<String>,
    /// How many of them are not ejected now.
    pub healthy_replicas: u64,
    /// Requests waiting for a slot at any of its replicas (the model-wide fair-share queue).
    pub queued: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpsStatus {
    pub listen: String,
    /// RFC 3339 UTC expiry of the certificate new handshakes get.
    pub certificate_not_after: Option<String>,
    pub certificate_not_after_unix: Option<u64>,
    /// Whole days until expiry (negative once expired).
    pub certificate_days_left: Option<i64>,
    /// `[tls] mode = "acme"` only: the ACME side; `null` otherwise.
    #[serde(default)]
    pub acme: Option<AcmeStatusReport>,
}

/// The ACME certificate's life cycle, for `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcmeStatusReport {
    pub domain: String,
    pub directory: String,
    /// False while the self-signed placeholder is served (before the first issuance).
    pub issued: bool,
    /// Serial (hex) of the certificate new handshakes get.
    pub serial: Option<String>,
    /// RFC 3339 UTC: when modelgate next tries to issue (renewal, or a retry after a failure).
    pub next_renewal: Option<String>,
    pub next_renewal_unix: Option<u64>,
    /// RFC 3339 UTC: when this process last obtained a certificate.
    pub last_issued: Option<String>,
    /// The last failure (cleared by the next success) and how many in a row.
    pub last_error: Option<String>,
    pub failures: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamStatus {
    pub key_id: String,
    pub key_name: String,
    pub active: u64,
}

/// `POST /v1/reload`, and what `modelgate reload` prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// True when the new config is running; false when it was refused (the old one runs on).
    pub applied: bool,
    /// Why the config was refused, one line per problem.
    pub errors: Vec<String>,
    /// What changed, one line each (`peer added: lab2`, `upstream removed: old`, …).
    pub changes: Vec<String>,
    /// Settings that differ from the running ones but only take effect after a restart.
    pub needs_restart: Vec<String>,
    /// Parts that could not be refreshed (the previous state of that part stays in use).
    pub warnings: Vec<String>,
}
