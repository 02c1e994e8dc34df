//! Configuration: the validated model the daemon runs on.
//!
//! Owns reading `/etc/modelgate/modelgate.toml` into raw serde structs ([`raw`]) and validating
//! them into [`Config`] ([`validate`]), reporting every bad setting at once (exit 64), and the
//! comment-preserving edits the CLI makes ([`edit`]). Never touches the network; the only files it
//! looks at besides the config are the appliance key (to refuse a peer that reuses it) and the
//! upstreams' API key files (only their mode, never their content, at load time).

pub mod edit;
mod policies;
pub mod raw;
mod validate;

use ipnet::IpNet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::wgkey::{PrivateKey, PublicKey};

pub use validate::{
    allocate_tunnel_address, check_dns_name, check_peer_name, check_tunnel_address,
    check_upstream_name, parse_endpoint, parse_model_route, parse_upstream_url, validate,
    SecretFileCheck,
};

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
}

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
    /// Cursor compatibility switches (`compat_*`), all on by default.
    pub compat: CompatConfig,
}

/// What the gateway adapts for Cursor (issue 6); each part can be switched off in `[gateway]`.
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
    /// [`read_api_key_file`]); `None` when the server needs none.
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
    /// Reads and validates the config at `path`.
    ///
    /// When the appliance's key file is readable, peers are also checked not to reuse its public
    /// key (a missing or unreadable key file is not an error here: [`load_private_key`] reports
    /// it when the daemon starts).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml_str(&text, path)
    }

    /// Parses and validates config text as if it had been read from `path`.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig =
            toml_edit::de::from_str(text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: describe_toml_error(text, &e),
            })?;
        let own = appliance_public_key_best_effort(&raw, path);
        validate(raw, path, own.as_ref(), &check_secret_file).map_err(|errors| {
            ConfigError::Invalid {
                path: path.to_path_buf(),
                errors,
            }
        })
    }

    /// The peer called `name`.
    pub fn peer(&self, name: &str) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.name == name)
    }

    /// The upstream called `name`.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// The upstream and static route serving the public model name `public` (exact match).
    /// Validation guarantees at most one. Models of upstreams that discover theirs are not
    /// known here; the gateway consults those after the static routes.
    pub fn upstream_for_model(&self, public: &str) -> Option<(&UpstreamConfig, &ModelRoute)> {
        self.upstreams
            .iter()
            .find_map(|u| u.models.iter().find(|m| m.public == public).map(|m| (u, m)))
    }
}

/// Checks a secret file without reading it: it exists, is a regular file, and neither group nor
/// others have any permission on it. Only metadata is needed, so `modelgate` verbs run by an
/// operator who cannot read the file still validate the config. Error: `(problem, fix)`.
pub(crate) fn check_secret_file(path: &Path) -> Result<(), (String, String)> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| {
        (
            e.to_string(),
            format!("write the model server's API key to {shown} and `chmod 600 {shown}`, or remove api_key_file"),
        )
    })?;
    if !meta.is_file() {
        return Err((
            "not a regular file".into(),
            "point api_key_file at a file holding only the API key".into(),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err((
            format!("mode {mode:04o} lets group/others read the API key"),
            format!("chmod 600 {shown}"),
        ));
    }
    Ok(())
}

/// Reads an upstream's API key file: mode checked like [`read_key_file`], content trimmed, one
/// token (no inner whitespace: it becomes an HTTP header value). The error names the file and
/// the fix and never contains the file's content.
pub fn read_api_key_file(path: &Path) -> Result<String, String> {
    let shown = path.display();
    check_secret_file(path)
        .map_err(|(problem, fix)| format!("API key file {shown}: {problem}; fix: {fix}"))?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!("API key file {shown}: {e}; fix: make it readable by the modelgate user and chmod 600 {shown}")
    })?;
    let key = text.trim();
    if key.is_empty() {
        return Err(format!(
            "API key file {shown}: is empty; fix: write the model server's API key to it"
        ));
    }
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "API key file {shown}: holds more than one token (spaces, line breaks or control characters inside); fix: leave only the key in the file"
        ));
    }
    Ok(key.to_string())
}

/// Reads the appliance key only to learn its public half; any failure means "unknown".
fn appliance_public_key_best_effort(raw: &raw::RawConfig, path: &Path) -> Option<PublicKey> {
    let file = validate::private_key_path(raw, path)?;
    let text = std::fs::read_to_string(file).ok()?;
    text.trim()
        .parse::<PrivateKey>()
        .ok()
        .map(|k| k.public_key())
}

/// One line `path:line:col: message` for a TOML syntax or type error.
fn describe_toml_error(text: &str, e: &toml_edit::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {col}: {message}")
        }
        None => message,
    }
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all (missing, permissions): a runtime failure (exit 1).
    #[error("cannot read config {}: {source}; fix: create it with `modelgate init --public-endpoint HOST:PORT` or pass --config PATH", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not valid TOML, a value of the wrong type, or an unknown key (exit 64).
    #[error("invalid config {}: {message}; fix: correct that line (see config/modelgate.toml for every key)", path.display())]
    Parse { path: PathBuf, message: String },
    /// Well-formed TOML with bad settings; `errors` lists every one (exit 64).
    #[error("invalid config {}: {} error(s):\n{errors}", path.display(), errors.len())]
    Invalid { path: PathBuf, errors: ConfigErrors },
}

impl ConfigError {
    /// True for an unreadable file (exit 1); false for an invalid one (exit 64).
    pub fn is_read_error(&self) -> bool {
        matches!(self, ConfigError::Read { .. })
    }
}

/// One bad setting: the key, the value as written, what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub key: String,
    pub value: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}; fix: {}",
            self.key, self.value, self.problem, self.fix
        )
    }
}

/// Every bad setting of one config, in file order. Displays one error per line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<FieldError>);

impl ConfigErrors {
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &FieldError> {
        self.0.iter()
    }
    pub(crate) fn push(
        &mut self,
        key: impl Into<String>,
        value: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.0.push(FieldError {
            key: key.into(),
            value: value.into(),
            problem: problem.into(),
            fix: fix.into(),
        });
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Loads the appliance's private key, refusing a file that others can read.
///
/// Checks, in order: the file exists and is a regular file, it has no group/other permission
/// bits (WireGuard's own tools warn about the same), and it holds one base64 key as written by
/// `wg genkey`. The error names the file and the fix; it never contains the file's content.
pub fn load_private_key(wg: &WireguardConfig) -> Result<PrivateKey, String> {
    read_key_file(&wg.private_key_file)
}

/// [`load_private_key`] for any key file (peer keys stored by `peer add` use the same rules).
pub fn read_key_file(file: &Path) -> Result<PrivateKey, String> {
    let shown = file.display();
    let meta = std::fs::metadata(file).map_err(|e| {
        format!(
            "private key file {shown}: {e}; fix: run `modelgate init` to create it, or write the output of `wg genkey` to it and `chmod 600 {shown}`"
        )
    })?;
    if !meta.is_file() {
        return Err(format!(
            "private key file {shown}: not a regular file; fix: point wireguard.private_key_file at a file holding the output of `wg genkey`"
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "private key file {shown}: mode {mode:04o} lets group/others read the key; fix: chmod 600 {shown}"
        ));
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("private key file {shown}: {e}; fix: make it readable by the modelgate user and chmod 600 {shown}"))?;
    text.trim().parse::<PrivateKey>().map_err(|e| {
        format!(
            "private key file {shown}: {e}; fix: write the output of `wg genkey` to it (then chmod 600 {shown}), or rerun `modelgate init --force`"
        )
    })
}

#[cfg(test)]
mod tests;
