//! The config file exactly as written: serde structs with no meaning attached yet.
//!
//! Every value that needs checking is kept as a string (or a wide integer) here, so that a typo in
//! one field does not hide the errors in the others: [`super::validate`] reports them all at once.
//! Unknown keys are rejected (`deny_unknown_fields`) because a misspelt key silently ignored is a
//! setting silently not applied. Never checks a value here.

use serde::Deserialize;

/// The whole `modelgate.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Listeners and local paths of the daemon.
    #[serde(default)]
    pub server: RawServer,
    /// Where keys and usage live: the embedded SQLite (absent) or a shared PostgreSQL.
    pub store: Option<RawStore>,
    /// Certificate source of the public HTTPS listener.
    pub tls: Option<RawTls>,
    /// The appliance's WireGuard interface.
    pub wireguard: Option<RawWireguard>,
    /// Corporate WireGuard peers, `[[peer]]` tables.
    #[serde(default, rename = "peer")]
    pub peers: Vec<RawPeer>,
    /// Limits and timeouts of the public HTTPS gateway (all optional).
    #[serde(default)]
    pub gateway: RawGateway,
    /// Model servers behind the peers, `[[upstream]]` tables.
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<RawUpstream>,
    /// Named key policies, `[[policy]]` tables.
    #[serde(default, rename = "policy")]
    pub policies: Vec<RawPolicy>,
    /// Per-model settings (balancing across replicas), `[[model]]` tables.
    #[serde(default, rename = "model")]
    pub models: Vec<RawModel>,
}

/// One `[[model]]`: how requests for one public model name are spread over the upstreams that
/// serve it (its replicas). Every field but `name` is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// The public model name clients ask for (as routed by `[[upstream]] models` or discovered).
    pub name: Option<String>,
    /// `"least_loaded"` (default) or `"affinity"`.
    pub balance: Option<String>,
}

/// One `[[policy]]`: limits that keys created with `--policy NAME` share. Every field is
/// optional and written like the matching `key create` flag.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// Unique name, `[a-z0-9][a-z0-9-]{0,31}`.
    pub name: Option<String>,
    /// Model names or globs (`--models`).
    pub models: Option<Vec<String>>,
    /// Endpoints (`--endpoints`): chat_completions, completions, embeddings, responses, models.
    pub endpoints: Option<Vec<String>>,
    /// Requests per minute (`--rpm`).
    pub rpm: Option<i64>,
    /// Tokens per minute (`--tpm`).
    pub tpm: Option<i64>,
    /// Concurrent requests (`--max-concurrent`).
    pub max_concurrent: Option<i64>,
    /// `"N/day"` or `"N/month"` (`--budget`).
    pub budget: Option<String>,
    /// Client networks (`--allow-cidr`).
    pub allow_cidrs: Option<Vec<String>>,
}

/// `[server]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// HTTPS listener, `ADDR:PORT` (default `0.0.0.0:443`).
    pub listen: Option<String>,
    /// Directory for keys and state (default `/var/lib/modelgate`); relative to the config file.
    pub state_dir: Option<String>,
    /// Unix socket of the local control API (default `/run/modelgate/control.sock`).
    pub control_socket: Option<String>,
    /// Prometheus metrics listener, `ADDR:PORT` (default `127.0.0.1:9464`).
    pub metrics_listen: Option<String>,
}

/// `[store]`: the shared PostgreSQL store (absent: `<state_dir>/keys.db`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// `postgres://USER@HOST:PORT/DB?sslmode=require` (no password in it).
    pub url: Option<String>,
    /// File with the password, mode 0600; relative to the config file.
    pub password_file: Option<String>,
    /// PEM of the CA that signed the server's certificate; relative to the config file.
    pub ca_file: Option<String>,
}

/// `[tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// `"files"`, `"self-signed"` or `"acme"`.
    pub mode: Option<String>,
    /// PEM certificate chain (mode `files`); relative to the config file.
    pub cert: Option<String>,
    /// PEM private key (mode `files`); relative to the config file.
    pub key: Option<String>,
    /// DNS name (or IP) put in the generated certificate (mode `self-signed`).
    pub self_signed_name: Option<String>,
    /// Public DNS name to obtain a certificate for (mode `acme`).
    pub acme_domain: Option<String>,
    /// Contact address given to the ACME CA (mode `acme`, optional).
    pub acme_email: Option<String>,
    /// ACME directory URL (mode `acme`, optional; default Let's Encrypt production).
    pub acme_directory: Option<String>,
    /// Extra PEM root to trust for the ACME directory, for test CAs (mode `acme`, optional).
    pub acme_ca_root: Option<String>,
}

/// `[wireguard]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWireguard {
    /// UDP listener, `ADDR:PORT` (default `0.0.0.0:51820`).
    pub listen: Option<String>,
    /// `HOST:PORT` the corp peers dial (required).
    pub public_endpoint: Option<String>,
    /// Appliance tunnel address with the tunnel network prefix, e.g. `10.99.0.1/24` (required).
    pub address: Option<String>,
    /// The appliance's private key file, mode 0600 (default `wg.key`); relative to `state_dir`.
    pub private_key_file: Option<String>,
    /// Tunnel MTU (default 1420).
    pub mtu: Option<i64>,
}

/// One `[[peer]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    /// Unique name, `[a-z0-9][a-z0-9-]{0,31}`.
    pub name: Option<String>,
    /// The peer's public key, base64 as printed by `wg pubkey`.
    pub public_key: Option<String>,
    /// The peer's own address in the tunnel network.
    pub tunnel_address: Option<String>,
    /// Networks behind the peer (CIDRs); the peer's tunnel address is added implicitly.
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// Persistent keepalive interval in seconds (optional).
    pub keepalive: Option<i64>,
    /// Fixed `IP:PORT` of the peer (optional; normally learned from its packets).
    pub endpoint: Option<String>,
}

/// `[gateway]`: every capacity and timeout of the public listener. Durations are humantime
/// strings (`"10s"`, `"1m 30s"`, `"600s"`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    /// Largest request body accepted, in bytes (default 33554432 = 32 MiB); larger gets 413.
    pub max_body_bytes: Option<i64>,
    /// Concurrent client connections; further connections wait in the kernel backlog
    /// (default 10000).
    pub max_connections: Option<i64>,
    /// Time a client has to complete the TLS handshake (default "10s").
    pub tls_handshake_timeout: Option<String>,
    /// Time a client has to send the complete request head (default "30s").
    pub header_read_timeout: Option<String>,
    /// An idle keep-alive connection is closed after this long (default "600s").
    pub idle_timeout: Option<String>,
    /// Largest request head (request line + headers), in bytes (default 65536).
    pub max_header_bytes: Option<i64>,
    /// Most request headers accepted (default 100).
    pub max_headers: Option<i64>,
    /// Time to open a TCP connection to a model server through the tunnel (default "5s").
    pub upstream_connect_timeout: Option<String>,
    /// Time a model server has to send the first byte of its response (default "600s").
    pub upstream_response_timeout: Option<String>,
    /// While a streaming upstream is silent, an SSE comment is sent this often (default "15s").
    pub sse_keepalive: Option<String>,
    /// On SIGTERM, in-flight requests get this long to finish (default "30s").
    pub drain_timeout: Option<String>,
    /// Longest wait for a slot at a saturated upstream (default "30s").
    pub queue_timeout: Option<String>,
    /// Most requests waiting at one saturated upstream (default 1024).
    pub max_queued: Option<i64>,
    /// Completion tokens reserved when a request sets no max_tokens (default 4096).
    pub default_max_tokens: Option<i64>,
    /// Time a client has to send a request body, extended by one second for every
    /// `body_min_rate` bytes that arrive (default "20s").
    pub body_read_timeout: Option<String>,
    /// Bytes per second that extend `body_read_timeout` (default 16384; 0: no extension).
    pub body_min_rate: Option<i64>,
    /// Deepest nesting of arrays and objects in a request body (default 100).
    pub max_json_depth: Option<i64>,
    /// Translate Responses-API bodies sent to /chat/completions (default true).
    pub compat_responses_translation: Option<bool>,
    /// Normalise `content: []` in assistant and tool turns (default true).
    pub compat_empty_content: Option<bool>,
    /// Map an upstream context-length 400 to `context_length_exceeded` (default true).
    pub compat_context_length_error: Option<bool>,
}

/// One `[[upstream]]`: an OpenAI-compatible model server reached through the tunnel.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Unique name, `[a-z0-9][a-z0-9-]{0,31}`.
    pub name: Option<String>,
    /// `http://IP:PORT` or `http://IP:PORT/PATH` (no path means `/v1`); the IP must lie inside
    /// some peer's allowed networks.
    pub url: Option<String>,
    /// File holding the model server's API key, mode 0600 (optional); relative to the config
    /// file's folder.
    pub api_key_file: Option<String>,
    /// Routed models, `PUBLIC` or `PUBLIC=UPSTREAM_ID` (optional; absent means discovered from
    /// the server's `GET /v1/models`).
    pub models: Option<Vec<String>>,
    /// Most requests in flight to this server at once (optional; default unlimited).
    pub max_concurrent: Option<i64>,
}
