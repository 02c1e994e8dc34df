//! Raw config → [`Config`]: a pure function that checks every setting and collects every error.
//!
//! One file per table: [`server`], [`tls`], [`wireguard`], [`peers`], [`gateway`],
//! [`upstreams`], [`policies`], [`models`]. Each validates its table, pushes one error per bad setting
//! (key, value, problem, fix) and goes on, so the operator sees every error at once; [`validate`]
//! calls them in a fixed order and builds the [`Config`] only when none failed. Shared pieces:
//! [`fields`] (readers for paths, addresses, durations, counts) and [`names`] (entry and host
//! names). A new table is a new file here, one call in [`validate`] and one field in
//! [`Config`].
//!
//! No I/O here: the caller passes in the appliance public key when it could read it, and a probe
//! for the secret files the config names, so the rules are unit-tested directly.

mod fields;
mod gateway;
mod models;
mod names;
mod peers;
mod policies;
mod server;
mod store;
mod tls;
mod upstreams;
mod wireguard;

use std::path::{Path, PathBuf};

use super::raw::RawConfig;
use super::{Config, ConfigErrors, DEFAULT_PRIVATE_KEY_FILE};
use crate::wgkey::PublicKey;

pub use fields::SecretFileCheck;
pub use names::{check_dns_name, check_peer_name, check_upstream_name};
pub use upstreams::{check_public_model_name, parse_model_route, parse_upstream_url};
pub use wireguard::{allocate_tunnel_address, check_tunnel_address, parse_endpoint};

/// Validates `raw` (read from `path`) into a [`Config`], or returns every error found.
///
/// `own_key` is the appliance's public key when known; a peer using it is rejected.
/// `secret_file` checks an upstream's `api_key_file` (resolved path) and returns
/// `(problem, fix)` when it is unusable; [`Config::from_toml_str`] passes a check of the file's
/// existence and mode.
pub fn validate(
    raw: RawConfig,
    path: &Path,
    own_key: Option<&PublicKey>,
    secret_file: &SecretFileCheck,
) -> Result<Config, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let base = fields::config_dir(path);
    let state_dir = server::state_dir(&raw.server, &base);

    let server = server::validate(&mut errs, &raw.server, &base);
    let store = store::validate(&mut errs, raw.store.as_ref(), &base);
    let tls = raw
        .tls
        .as_ref()
        .and_then(|t| tls::validate(&mut errs, t, &base));
    let (wireguard, tunnel) = wireguard::validate(&mut errs, raw.wireguard.as_ref(), &state_dir);
    let peers = peers::validate(&mut errs, &raw.peers, tunnel, own_key);
    let gateway = gateway::validate(&mut errs, &raw.gateway);
    let upstreams = upstreams::validate(
        &mut errs,
        &raw.upstreams,
        &raw.peers,
        tunnel,
        &base,
        secret_file,
    );
    let policies = policies::validate(&mut errs, &raw.policies);
    let models = models::validate(&mut errs, &raw.models);

    if !errs.is_empty() {
        return Err(errs);
    }
    // Every `None` above pushed an error, so these are present here.
    let (Some(server), Some(wireguard)) = (server, wireguard) else {
        errs.push(
            "config",
            "",
            "internal: a setting failed without an error",
            "report this bug",
        );
        return Err(errs);
    };
    Ok(Config {
        path: path.to_path_buf(),
        server,
        store,
        tls,
        wireguard,
        peers,
        gateway,
        upstreams,
        policies,
        models,
    })
}

/// The appliance private key path `raw` names, if it can be worked out (for best-effort reads).
pub(super) fn private_key_path(raw: &RawConfig, path: &Path) -> Option<PathBuf> {
    let state_dir = server::state_dir(&raw.server, &fields::config_dir(path));
    let file = raw
        .wireguard
        .as_ref()
        .and_then(|w| w.private_key_file.as_deref())
        .unwrap_or(DEFAULT_PRIVATE_KEY_FILE);
    (!file.is_empty()).then(|| fields::resolve(&state_dir, file))
}
