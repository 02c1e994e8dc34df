//! `modelgate reload`: asks the running daemon to re-read its config, waits for the result and
//! prints it. Exit 0 when the new config runs (changes, restart-only settings and warnings are
//! listed), 64 when the daemon refused it (the reasons are printed; the old config keeps
//! running; also when the config file is not TOML, so its control socket is unknown), 1 when no
//! daemon answers. SIGHUP does the same without the answer.

use clap::Args;
use std::path::{Path, PathBuf};

use super::status::{block_on, control_socket_of};
use super::{CliError, EXIT_CONFIG};
use crate::control::{client, ReloadReport};

#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Print the daemon's answer as JSON ({applied, errors, changes, needs_restart, warnings}).
    #[arg(long)]
    pub json: bool,
    /// Control socket (default: server.control_socket of the config).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

pub fn execute(config_path: &Path, a: ReloadArgs) -> Result<(), CliError> {
    let socket = a
        .socket
        .clone()
        .map_or_else(|| control_socket_of(config_path), Ok)?;
    let report =
        block_on(client::reload(&socket))?.map_err(|e| CliError::runtime(e.to_string()))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else if report.applied {
        print!("{}", render(&report));
    }
    if report.applied {
        Ok(())
    } else {
        Err(CliError {
            code: EXIT_CONFIG,
            message: format!(
                "the daemon refused the new config and keeps running the previous one:\n  {}",
                report.errors.join("\n  ")
            ),
        })
    }
}

/// The human form of an applied reload.
pub fn render(r: &ReloadReport) -> String {
    let mut o = String::from("reloaded\n");
    if r.changes.is_empty() {
        o.push_str("  no changes\n");
    }
    for c in &r.changes {
        o.push_str(&format!("  {c}\n"));
    }
    for n in &r.needs_restart {
        o.push_str(&format!("  needs restart: {n}\n"));
    }
    for w in &r.warnings {
        o.push_str(&format!("  warning: {w}\n"));
    }
    o
}
