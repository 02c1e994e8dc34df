//! Hop 1: the config file loads and validates.

use std::path::Path;

use crate::config::{Config, ConfigError};
use crate::doctor::{split_fix, tls_mode, Hop, HopResult};

/// Hop 1. The loaded config with its verdict, or the failure and whether the file is invalid
/// (exit 64) rather than unreadable (exit 1).
pub(in crate::doctor) fn config_hop(path: &Path) -> Result<(HopResult, Config), (HopResult, bool)> {
    match Config::load(path) {
        Ok(c) => {
            let pass = HopResult::pass(
                Hop::Config,
                format!(
                    "{}: {} peer(s), {} upstream(s), tls {}",
                    c.path.display(),
                    c.peers.len(),
                    c.upstreams.len(),
                    tls_mode(&c)
                ),
            );
            Ok((pass, c))
        }
        Err(e) => Err((config_failure(&e), !e.is_read_error())),
    }
}

fn config_failure(e: &ConfigError) -> HopResult {
    match e {
        ConfigError::Invalid { path, errors } => HopResult::fail(
            Hop::Config,
            format!(
                "{} is invalid: {}",
                path.display(),
                errors
                    .iter()
                    .map(|e| format!("{}: {}: {}", e.key, e.value, e.problem))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            errors
                .iter()
                .map(|e| format!("{}: {}", e.key, e.fix))
                .collect::<Vec<_>>()
                .join("; ")
                + "; then `modelgate reload` (or restart the daemon)",
        ),
        e => {
            let (detail, fix) = split_fix(&e.to_string());
            HopResult::fail(
                Hop::Config,
                detail,
                fix.unwrap_or_else(|| "correct the config file".into()),
            )
        }
    }
}
