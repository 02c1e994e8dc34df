//! Configuration: `modelgate.toml` read, validated and edited.
//!
//! Owns the way from the file to the model the daemon runs on: serde structs exactly as written
//! ([`raw`]), one validator per table that reports every bad setting at once (exit 64,
//! [`validate`]), the validated types and their defaults (`model`), the errors (`error`),
//! the secret files the config names (`secrets`) and the comment-preserving edits the CLI
//! makes ([`edit`]). Never touches the network; the only files it looks at besides the config
//! are the appliance key (to refuse a peer that reuses it) and the upstreams' API key files
//! (only their mode, never their content, at load time).

pub mod edit;
mod error;
mod model;
pub mod raw;
mod secrets;
mod validate;

use std::path::Path;

use crate::wgkey::{PrivateKey, PublicKey};

pub use error::{ConfigError, ConfigErrors, FieldError};
pub use model::{
    Balance, CompatConfig, Config, GatewayConfig, ModelConfig, ModelRoute, PeerConfig,
    ServerConfig, TlsConfig, UpstreamConfig, WireguardConfig, DEFAULT_CONFIG_PATH,
    DEFAULT_CONTROL_SOCKET, DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN, DEFAULT_MTU,
    DEFAULT_PEER_KEEPALIVE, DEFAULT_PRIVATE_KEY_FILE, DEFAULT_STATE_DIR, DEFAULT_TUNNEL_ADDRESS,
    DEFAULT_UPSTREAM_BASE_PATH, DEFAULT_WG_LISTEN, MAX_JSON_DEPTH,
};
pub(crate) use secrets::check_secret_file;
pub use secrets::{load_private_key, read_api_key_file, read_key_file};
pub use validate::{
    allocate_tunnel_address, check_dns_name, check_peer_name, check_public_model_name,
    check_tunnel_address, check_upstream_name, parse_endpoint, parse_model_route,
    parse_upstream_url, validate, SecretFileCheck,
};

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

#[cfg(test)]
mod tests;
