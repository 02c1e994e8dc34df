//! `modelgate run`: load and validate the config, then hand over to the daemon.
//!
//! Owns only the edge between the CLI and [`crate::daemon::run_until_signal`]: an invalid config
//! stops here with every error listed (exit 64) before any socket is bound. Never implements the
//! daemon itself.

use clap::Args;
use std::path::Path;

use super::CliError;
use crate::config::Config;
use crate::daemon::{run_until_signal, Forward, Inherited, RunOptions};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Debug TCP forward from a local port through the tunnel, e.g.
    /// 127.0.0.1:8080=10.20.0.5:8000 (repeatable).
    #[arg(long = "forward", value_name = "LISTEN=TARGET", value_parser = forward_arg)]
    pub forwards: Vec<Forward>,
}

/// The daemon owns the `LISTEN=TARGET` syntax ([`Forward`]'s `FromStr`); this adds the fix.
fn forward_arg(s: &str) -> Result<Forward, String> {
    s.parse::<Forward>().map_err(|e| {
        format!("{e}; fix: pass a local IP:PORT and an IP:PORT inside the tunnel joined by '='")
    })
}

pub fn execute(config_path: &Path, a: RunArgs) -> Result<(), CliError> {
    // Sockets from systemd (socket activation) are taken while this is the only thread: it
    // clears LISTEN_* from the environment.
    let inherited = Inherited::from_env();
    let config = Config::load(config_path)?;
    crate::daemon::check_forwards(&config, &a.forwards).map_err(CliError::usage)?;
    tracing::info!(
        config = %config.path.display(),
        peers = config.peers.len(),
        "configuration loaded"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("modelgate")
        .build()
        .map_err(|e| CliError::runtime(format!("cannot start the async runtime: {e}")))?;
    runtime
        .block_on(run_until_signal(
            config,
            RunOptions {
                forwards: a.forwards,
                inherited,
            },
        ))
        .map_err(|e| CliError::runtime(format!("{e:#}")))
}
