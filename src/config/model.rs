//! The validated configuration: [`Config`] and one type per table, with the defaults.
//!
//! Owns what the daemon runs on once [`super::validate`] has checked every setting: each field
//! here is already valid, so users never re-check. Never reads files and never validates (the
//! types only describe; [`super::validate`] builds them).

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::wgkey::PublicKey;

/// Where `modelgate` looks for its config unless `--config` / `MODELGATE_CONFIG` say otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/modelgate/modelgate.toml";
/// Default HTTPS listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:443";
/// Default WireGuard UDP listener.
pub const DEFAULT_WG_LISTEN: &str = "0.0.0.0:51820";
/// Default appliance tunnel address and tunnel network.
pub const DEFAULT_TUNNEL_ADDRESS: &str = "10.99.0.1/24";
/// Default state directory (keys, databases).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/modelgate";
/// Default control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/modelgate/control.sock";
/// Default metrics listener (loopback only: metrics are not for the internet).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// Default private key file name inside the state directory.
pub const DEFAULT_PRIVATE_KEY_FILE: &str = "wg.key";
/// Default tunnel MTU: wg-quick's default (1500 minus the 80 bytes of IPv6+UDP+WireGuard overhead).
pub const DEFAULT_MTU: u16 = 1420;
/// The keepalive printed in a corp peer's wg-quick file when the peer sets none: the corp side
/// dials out through NAT, and 25 s keeps virtually every NAT mapping open (wg(8) recommends 25).
pub const DEFAULT_PEER_KEEPALIVE: u16 = 25;
/// Path prefix of an upstream whose URL has none: vLLM, llama.cpp and TGI serve the OpenAI API
/// under `/v1`.
pub const DEFAULT_UPSTREAM_BASE_PATH: &str = "/v1";

/// The validated configuration. Every field has already been checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from (relative paths inside were resolved against its folder).
    pub path: PathBuf,
    pub server: ServerConfig,
    /// Where keys and usage live (`[store]`; the embedded SQLite when absent).
    pub store: crate::keys::StoreConfig,
    /// Certificate source of the HTTPS listener; `None` when the file has no `[tls]` table.
    pub tls: Option<TlsConfig>,
    pub wireguard: WireguardConfig,
    pub peers: Vec<PeerConfig>,
    /// Limits and timeouts of the public gateway (`[gateway]`; defaults when absent).
    pub gateway: GatewayConfig,
    /// Model servers inside the tunnel (`[[upstream]]`), in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// Named key policies (`[[policy]]`), by name.
    pub policies: crate::policy::Policies,
    /// Per-model settings (`[[model]]`), in file order; a model without one is balanced
    /// [`Balance::LeastLoaded`].
    pub models: Vec<ModelConfig>,
}

/// How requests for one public model are spread over the upstreams that serve it (`[[model]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    /// The public model name (what clients ask for).
    pub name: String,
    pub balance: Balance,
}

/// The balancing rule of a model's replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Balance {
    /// The healthy replica with the fewest requests outstanding (ties in turn).
    #[default]
    LeastLoaded,
    /// One conversation (same key, same leading messages) on one replica while it is healthy
    /// and has a free slot, so its prefix cache serves the growing history; else least loaded.
    Affinity,
}

impl Balance {
    /// Every value, as written in the config.
    pub const ALL: [Balance; 2] = [Balance::LeastLoaded, Balance::Affinity];

    /// The config spelling: `least_loaded`, `affinity`.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::LeastLoaded => "least_loaded",
            Balance::Affinity => "affinity",
        }
    }

    /// Parses the config spelling.
    pub fn parse(s: &str) -> Option<Balance> {
        Balance::ALL.into_iter().find(|b| b.as_str() == s)
    }
}

/// The deepest `gateway.max_json_depth` (and its default). serde_json, which parses every value
/// the gateway reads or rewrites, refuses values nested 128 deep; 100 leaves room for the
/// levels a Cursor translation adds, so a body the gateway forwards is always one it could
/// parse itself.
pub const MAX_JSON_DEPTH: usize = 100;

/// Capacities and timeouts of the public HTTPS gateway (`[gateway]`). Every one is bounded so a
/// slow or hostile client cannot hold resources forever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Largest request body; Cursor resends whole conversations, so this is generous (32 MiB).
    pub max_body_bytes: usize,
    /// Concurrent client connections (a permit is taken before accept).
    pub max_connections: usize,
    /// Deadline for the TLS handshake (kept out of the accept loop).
    pub tls_handshake_timeout: Duration,
    /// Deadline for the complete request head (slowloris).
    pub header_read_timeout: Duration,
    /// A client connection with no byte read or written for this long is closed (HTTP/2
    /// included); long because agent turns are long. Between HTTP/1.1 keep-alive requests the
    /// shorter `header_read_timeout` applies (hyper starts that timer while it waits for the
    /// next request head).
    pub idle_timeout: Duration,
    /// Largest request head in bytes (hyper needs at least 8192).
    pub max_header_bytes: usize,
    /// Most request headers.
    pub max_headers: usize,
    /// Deadline for a TCP connection to a model server through the tunnel.
    pub upstream_connect_timeout: Duration,
    /// Deadline for the first response byte from a model server (prefill of a long prompt).
    pub upstream_response_timeout: Duration,
    /// Interval of SSE comment lines sent while a streaming upstream is silent, so proxies and
    /// clients do not time the stream out.
    pub sse_keepalive: Duration,
    /// On SIGTERM, how long in-flight requests may take before they are cut.
    pub drain_timeout: Duration,
    /// Longest wait for a slot at a saturated upstream (`[[upstream]] max_concurrent`); then 503
    /// with `Retry-After`.
    pub queue_timeout: Duration,
    /// Most requests waiting for a slot at one saturated upstream; more get 503 at once.
    pub max_queued: usize,
    /// Completion tokens reserved for a request that sets no `max_tokens` (admission estimate
    /// against TPM and budgets; settled to the real count afterwards).
    pub default_max_tokens: u32,
    /// Time a client has to send a request body, extended by one second for every
    /// `body_min_rate` bytes received: a stalled or trickling body gets 408 and its connection
    /// is closed, instead of holding it (and its permit) until `idle_timeout`.
    pub body_read_timeout: Duration,
    /// Bytes per second of request body that earn one more second of `body_read_timeout`
    /// (0: the body must be complete within `body_read_timeout`).
    pub body_min_rate: usize,
    /// Deepest nesting of arrays and objects a request body may have (400 beyond): every byte
    /// that goes to a model server has been parsed by the gateway within this depth.
    pub max_json_depth: usize,
    /// Cursor compatibility switches (`compat_*`), all on by default.
    pub compat: CompatConfig,
}

/// What the gateway adapts for Cursor; each part can be switched off in `[gateway]`.
/// CORS preflight and the paths without `/v1` are always served: they change nothing for
/// other clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompatConfig {
    /// `compat_responses_translation`: a Responses-API body (`input`, `instructions`, flat
    /// tools) POSTed to `/chat/completions` is translated to Chat Completions for the upstream.
    pub responses_translation: bool,
    /// `compat_empty_content`: assistant and tool turns with `content: []` (and assistant
    /// turns with `tool_calls: []`) are normalised before they reach the upstream.
    pub empty_content: bool,
    /// `compat_context_length_error`: an upstream 400 about the context length becomes
    /// OpenAI's `context_length_exceeded` error (Cursor then summarises and retries).
    pub context_length_error: bool,
}

impl Default for CompatConfig {
    fn default() -> Self {
        CompatConfig {
            responses_translation: true,
            empty_content: true,
            context_length_error: true,
        }
    }
}

/// Default `[gateway]` values (also documented in `config/modelgate.toml`).
impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_body_bytes: 32 * 1024 * 1024,
            max_connections: 10_000,
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_response_timeout: Duration::from_secs(600),
            sse_keepalive: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(30),
            queue_timeout: Duration::from_secs(30),
            max_queued: 1024,
            default_max_tokens: 4096,
            body_read_timeout: Duration::from_secs(20),
            body_min_rate: 16 * 1024,
            max_json_depth: MAX_JSON_DEPTH,
            compat: CompatConfig::default(),
        }
    }
}

/// An OpenAI-compatible model server inside the tunnel (`[[upstream]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Unique name, `[a-z0-9][a-z0-9-]{0,31}` (logs, metrics, `upstream remove`).
    pub name: String,
    /// IP literal and port; the IP lies inside some peer's allowed networks.
    pub addr: SocketAddr,
    /// Path prefix of the OpenAI API, no trailing slash (`/v1` unless the URL says otherwise);
    /// requests go to `base_path + "/chat/completions"` etc.
    pub base_path: String,
    /// 0600 file with the key sent upstream as `Authorization: Bearer` (read by the daemon with
    /// [`super::read_api_key_file`]); `None` when the server needs none.
    pub api_key_file: Option<PathBuf>,
    /// Static routes; empty means the models are discovered from the server's `GET /v1/models`.
    pub models: Vec<ModelRoute>,
    /// Most requests in flight to this server at once; `None` for no limit.
    pub max_concurrent: Option<u32>,
}

impl UpstreamConfig {
    /// The URL as an operator would write it, e.g. `http://10.20.0.5:8000/v1`.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.base_path)
    }

    /// True when the model list comes from the server (`models` absent in the config).
    pub fn discovers_models(&self) -> bool {
        self.models.is_empty()
    }
}

/// One statically routed model: clients ask for `public`, the server is asked for `upstream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRoute {
    pub public: String,
    pub upstream: String,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// HTTPS listener (`--listen`).
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub metrics_listen: SocketAddr,
}

/// Where the public HTTPS certificate comes from (`[tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsConfig {
    /// PEM files managed by the operator (`--tls-cert`, `--tls-key`).
    Files { cert: PathBuf, key: PathBuf },
    /// A certificate generated at start for this name (tests, demos; Cursor will not trust it).
    SelfSigned { name: String },
    /// ACME (TLS-ALPN-01 on the HTTPS port).
    Acme {
        domain: String,
        email: Option<String>,
        directory: Option<String>,
        ca_root: Option<PathBuf>,
    },
}

#[derive(Debug, Clone)]
pub struct WireguardConfig {
    /// UDP address the WireGuard socket binds (`--wg-listen`).
    pub listen: SocketAddr,
    /// `HOST:PORT` that corp peers dial (`--public-endpoint`), as written.
    pub public_endpoint: String,
    /// The appliance's address inside the tunnel, with the tunnel network's prefix length.
    pub address: IpNet,
    /// 0600 file holding the appliance's private key in `wg genkey` form.
    pub private_key_file: PathBuf,
    /// Inner MTU of the tunnel (1420 like wg-quick).
    pub mtu: u16,
}

#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub name: String,
    pub public_key: PublicKey,
    /// The peer's own tunnel address (allocated by `peer add`).
    pub tunnel_address: IpAddr,
    /// Everything routed to this peer: its tunnel address /32 (or /128) plus the networks behind it.
    pub allowed_ips: Vec<IpNet>,
    /// Keepalive the appliance sends (normally none: the corp side keeps the NAT open). When set,
    /// the corp wg-quick file printed by `peer add`/`peer config` uses the same interval.
    pub keepalive: Option<u16>,
    /// Optional fixed endpoint; normally learned from the peer's authenticated packets.
    pub endpoint: Option<SocketAddr>,
}

impl PeerConfig {
    /// The networks behind the peer: the allowed IPs without the peer's own host route.
    pub fn networks_behind(&self) -> impl Iterator<Item = &IpNet> {
        let own = IpNet::from(self.tunnel_address);
        self.allowed_ips.iter().filter(move |n| **n != own)
    }
}

impl Config {
    /// The peer called `name`.
    pub fn peer(&self, name: &str) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.name == name)
    }

    /// The upstream called `name`.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// The first upstream (in file order) with a static route for the public model name
    /// `public` (exact match), and that route. Models of upstreams that discover theirs are not
    /// known here; the gateway adds those at run time.
    pub fn upstream_for_model<'a>(
        &'a self,
        public: &'a str,
    ) -> Option<(&'a UpstreamConfig, &'a ModelRoute)> {
        self.upstreams_for_model(public).next()
    }

    /// Every upstream with a static route for `public` (its statically known replicas), in
    /// file order.
    pub fn upstreams_for_model<'a>(
        &'a self,
        public: &'a str,
    ) -> impl Iterator<Item = (&'a UpstreamConfig, &'a ModelRoute)> + 'a {
        self.upstreams
            .iter()
            .filter_map(move |u| u.models.iter().find(|m| m.public == public).map(|m| (u, m)))
    }

    /// The `[[model]]` settings of `public`, if the config has a table for it.
    pub fn model(&self, public: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == public)
    }
}
