//! The `modelgate` command line: clap definitions, verb dispatch, exit codes.
//!
//! Owns the operator-facing contract the README documents (verbs, flags, `--json`, exit codes
//! 0/1/2/64) and turns every failure into one line that names the flag or key, the value and
//! the fix.
//! One file per verb group; [`wgquick`] renders the corp-side file. Never logs secrets, never
//! puts them in argv (keys are generated here or read from 0600 files), never panics on input.

pub mod demo;
pub mod doctor;
pub mod firewall;
pub mod generate;
pub mod init;
pub mod key;
pub mod model;
pub mod peer;
pub mod reload;
pub mod run;
pub mod status;
pub mod store;
pub mod upstream;
pub mod wgquick;

use clap::{Parser, Subcommand};
use std::fmt;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::config::{ConfigError, DEFAULT_CONFIG_PATH};

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: the command was valid but failed at run time (I/O, existing file, no peer…).
pub const EXIT_RUNTIME: u8 = 1;
/// Exit status: bad flags or flag values (clap's own errors use 2 as well).
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the config file is invalid (sysexits `EX_USAGE`, as linkerd does).
pub const EXIT_CONFIG: u8 = 64;

/// modelgate: public HTTPS gateway to an on-prem OpenAI-compatible model over WireGuard.
///
/// Exit status: 0 success, 1 runtime failure, 2 usage error, 64 invalid config file.
#[derive(Debug, Parser)]
#[command(name = "modelgate", version, propagate_version = true)]
pub struct Cli {
    /// Config file.
    #[arg(long, global = true, value_name = "PATH", env = "MODELGATE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process; boxing the large `init` flags would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the config, the state directory and the appliance's WireGuard key pair.
    Init(init::InitArgs),
    /// Manage corp WireGuard peers (add prints their wg-quick file).
    #[command(subcommand)]
    Peer(peer::PeerCommand),
    /// Manage API keys (create prints the secret once; changes reach the daemon within 1 s).
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// The shared store: `store migrate --to URL` copies this appliance's SQLite store to
    /// PostgreSQL.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Manage the model servers inside the tunnel and their model routes.
    #[command(subcommand)]
    Upstream(upstream::UpstreamCommand),
    /// Per-model settings: how a model's requests are balanced over its replicas.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Run the daemon in the foreground until SIGTERM/SIGINT (SIGHUP reloads the config).
    Run(run::RunArgs),
    /// Show the running daemon's interface, peers, upstreams, listener and streams (like wg show).
    Status(status::StatusArgs),
    /// Make the running daemon re-read its config; prints what changed (exit 64 if refused).
    Reload(reload::ReloadArgs),
    /// Check every hop from the public name to the model; names the first failing one and its fix.
    Doctor(doctor::DoctorArgs),
    /// Try it: appliance + corp peer + echo model over real WireGuard on loopback, no setup.
    Demo(demo::DemoArgs),
    /// Host firewall: nftables table inet modelgate, default drop inbound (print needs no root).
    #[command(subcommand)]
    Firewall(firewall::FirewallCommand),
    /// Man pages and shell completions from these definitions (packaging; hidden).
    #[command(subcommand, hide = true)]
    Generate(generate::GenerateCommand),
}

impl Command {
    /// True for the long-running daemon (logs go to stdout for journald); CLI verbs keep stdout
    /// for their output (wg-quick files, JSON) and log to stderr.
    pub fn is_daemon(&self) -> bool {
        matches!(self, Command::Run(_) | Command::Demo(_))
    }
}

/// A failed command: the exit status and one line per problem for stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn runtime(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_RUNTIME,
            message: message.into(),
        }
    }
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }
    pub fn config(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_CONFIG,
            message: message.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        if e.is_read_error() {
            CliError::runtime(e.to_string())
        } else {
            CliError::config(e.to_string())
        }
    }
}

/// Runs the parsed command. `main` maps the error to its exit status.
///
/// Verbs that may create files in the state directory (keys, peers, init, doctor's throwaway
/// key) give them to the directory's owner afterwards, so `sudo modelgate key create` does not
/// leave root-owned files that lock out a daemon running as `modelgate`
/// ([`crate::fsutil::adopt_dir_owner`]).
pub fn execute(cli: Cli) -> Result<(), CliError> {
    let touches_state = matches!(
        cli.command,
        Command::Init(_)
            | Command::Peer(_)
            | Command::Key(_)
            | Command::Doctor(_)
            | Command::Store(_)
    );
    let config = cli.config.clone();
    let result = dispatch(cli);
    if touches_state {
        if let Ok(c) = crate::config::Config::load(&config) {
            let n = crate::fsutil::adopt_dir_owner(&c.server.state_dir);
            if n > 0 {
                tracing::debug!(files = n, dir = %c.server.state_dir.display(), "gave new state files to the state directory's owner");
            }
        }
    }
    result
}

fn dispatch(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Init(args) => init::execute(&cli.config, args),
        Command::Peer(cmd) => peer::execute(&cli.config, cmd),
        Command::Key(cmd) => key::execute(&cli.config, cmd),
        Command::Store(cmd) => store::execute(&cli.config, cmd),
        Command::Upstream(cmd) => upstream::execute(&cli.config, cmd),
        Command::Model(cmd) => model::execute(&cli.config, cmd),
        Command::Run(args) => run::execute(&cli.config, args),
        Command::Status(args) => status::execute(&cli.config, args),
        Command::Reload(args) => reload::execute(&cli.config, args),
        Command::Doctor(args) => doctor::execute(&cli.config, args),
        Command::Demo(args) => demo::execute(args),
        Command::Firewall(cmd) => firewall::execute(&cli.config, cmd),
        Command::Generate(cmd) => generate::execute(cmd),
    }
}

/// Prints `value` as pretty JSON on stdout.
pub(crate) fn print_json(value: &serde_json::Value) {
    // Serialising a `serde_json::Value` cannot fail.
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// Current UTC time as RFC 3339, e.g. `2025-01-02T03:04:05Z`.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

pub(crate) use crate::civil::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
