//! `modelgate firewall print|apply|remove`: the host firewall table `inet modelgate`.
//!
//! Owns the CLI edge of [`crate::firewall`]: reads the listeners from the config, parses
//! `--ssh-from`, prints the ruleset or applies/removes it through the real `nft`. Never touches
//! another nftables table.

use clap::{Args, Subcommand};
use ipnet::IpNet;
use serde_json::json;
use std::path::Path;

use super::{print_json, CliError};
use crate::config::Config;
use crate::firewall::{
    self, desired,
    render::{apply_batch, to_json, to_nft_text},
    FirewallSpec, NftCommand, RemoveOutcome, DEFAULT_SSH_PORT,
};

#[derive(Debug, Subcommand)]
pub enum FirewallCommand {
    /// Print the ruleset `apply` loads: nft text for `nft -f` (or with --json the libnftables
    /// JSON batch for `nft -j -f`). Needs no privileges.
    Print(RulesArgs),
    /// Load table inet modelgate (default drop inbound; HTTPS, WireGuard, --ssh-from open),
    /// replacing the previous version atomically. Needs root.
    Apply(RulesArgs),
    /// Delete table inet modelgate (a no-op when it is absent). Needs root.
    Remove(RemoveArgs),
}

#[derive(Debug, Args)]
pub struct RulesArgs {
    /// Also accept SSH from this network (IPv4 or IPv6 CIDR, or one address); repeatable or
    /// comma-separated. Without it SSH is dropped: keep your own address in here on a remote box.
    #[arg(
        long = "ssh-from",
        value_name = "CIDR",
        env = "MODELGATE_SSH_FROM",
        value_delimiter = ',',
        value_parser = ssh_from_arg
    )]
    pub ssh_from: Vec<Option<IpNet>>,
    /// TCP port of SSH for --ssh-from.
    #[arg(long, value_name = "PORT", env = "MODELGATE_SSH_PORT", default_value_t = DEFAULT_SSH_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub ssh_port: u16,
    /// print: the libnftables JSON batch instead of nft text; apply: a JSON result.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// A JSON result instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

pub fn execute(config_path: &Path, cmd: FirewallCommand) -> Result<(), CliError> {
    match cmd {
        FirewallCommand::Print(a) => {
            let ruleset = desired(&spec(config_path, &a)?);
            if a.json {
                println!("{}", to_json(&apply_batch(&ruleset)));
            } else {
                print!("{}", to_nft_text(&ruleset));
            }
            Ok(())
        }
        FirewallCommand::Apply(a) => {
            let spec = spec(config_path, &a)?;
            let ruleset = desired(&spec);
            let nft = NftCommand::locate().map_err(runtime)?;
            let report = firewall::apply(&nft, &ruleset).map_err(runtime)?;
            if let Some(w) = firewall::ssh_lockout_warning(
                &spec,
                std::env::var("SSH_CONNECTION").ok().as_deref(),
            ) {
                eprintln!("modelgate: {w}");
            }
            let ssh: Vec<String> = spec.ssh_from.iter().map(ToString::to_string).collect();
            if a.json {
                print_json(&json!({
                    "table": "inet modelgate",
                    "action": if report.replaced { "replaced" } else { "created" },
                    "rules": report.rules,
                    "https_port": spec.https.port(),
                    "wireguard_port": spec.wireguard.port(),
                    "ssh_from": ssh,
                    "ssh_port": spec.ssh_port,
                }));
            } else {
                println!(
                    "firewall: table inet modelgate {} ({} rules): inbound dropped except \
                     established, loopback, ICMP essentials, tcp/{} (HTTPS), udp/{} (WireGuard){}",
                    if report.replaced {
                        "replaced"
                    } else {
                        "created"
                    },
                    report.rules,
                    spec.https.port(),
                    spec.wireguard.port(),
                    if ssh.is_empty() {
                        ", no SSH".to_string()
                    } else {
                        format!(", tcp/{} (SSH) from {}", spec.ssh_port, ssh.join(", "))
                    }
                );
            }
            Ok(())
        }
        FirewallCommand::Remove(a) => {
            let nft = NftCommand::locate().map_err(runtime)?;
            let outcome = firewall::remove(&nft).map_err(runtime)?;
            let removed = outcome == RemoveOutcome::Removed;
            if a.json {
                print_json(&json!({ "table": "inet modelgate", "removed": removed }));
            } else if removed {
                println!("firewall: table inet modelgate removed (other tables untouched)");
            } else {
                println!("firewall: table inet modelgate is not loaded; nothing to remove");
            }
            Ok(())
        }
    }
}

/// An empty value (`MODELGATE_SSH_FROM=` in firewall.env) means no network, not an error: a
/// firewall unit that fails to start would leave the host without its firewall.
fn ssh_from_arg(s: &str) -> Result<Option<IpNet>, String> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    firewall::parse_ssh_from(s).map(Some)
}

fn runtime(e: firewall::NftError) -> CliError {
    CliError::runtime(e.to_string())
}

fn spec(config_path: &Path, a: &RulesArgs) -> Result<FirewallSpec, CliError> {
    let config = Config::load(config_path)?;
    Ok(FirewallSpec::from_config(
        &config,
        a.ssh_from.iter().flatten().copied().collect(),
        a.ssh_port,
    ))
}
