//! `modelgate peer add|list|show|remove|config`: the corp WireGuard peers.
//!
//! Owns editing `[[peer]]` tables (through `toml_edit`, keeping the operator's comments), the
//! tunnel address allocation, and printing the corp side's wg-quick file. Every edit validates
//! the whole resulting config before it is written atomically; nothing is written on error.
//!
//! Peer private keys: when `peer add` generates the key pair (no `--public-key`), the private
//! key is stored at `<state_dir>/peers/NAME.key` (0600, directory 0700) so that `peer config
//! NAME` can print the complete file again later (lost file, re-provisioned corp host). This
//! keeps a second copy of the corp side's secret on the appliance, which already holds the
//! root of trust for the link; operators who do not want that pass `--public-key` with a key
//! generated on the corp host (`wg genkey | tee key | wg pubkey`), and nothing is stored.
//! `peer remove` deletes the stored key.

use clap::{Args, Subcommand};
use ipnet::IpNet;
use serde_json::{json, Value};
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::wgquick::{self, CorpPeerFile};
use super::{now_rfc3339, print_json, CliError};
use crate::config::edit::{self, NewPeer};
use crate::config::{
    allocate_tunnel_address, check_peer_name, load_private_key, read_key_file, Config, ConfigError,
    PeerConfig, DEFAULT_PEER_KEEPALIVE,
};
use crate::fsutil::{create_dir_with_mode, lock_for_update, write_atomic};
use crate::wgkey::{PrivateKey, PublicKey};

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Add a corp peer and print its wg-quick file on stdout.
    Add(AddArgs),
    /// List peers (name, public key, tunnel address, allowed IPs).
    List(JsonArg),
    /// Show one peer.
    Show(NameJson),
    /// Remove a peer (and its stored private key).
    Remove(RemoveArgs),
    /// Print a peer's wg-quick file again.
    Config(ConfigArgs),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Peer name: 1-32 of a-z, 0-9, '-', starting with a letter or digit.
    #[arg(value_parser = name_arg)]
    pub name: String,
    /// Networks behind the peer the appliance may reach (comma-separated CIDRs).
    #[arg(long, value_name = "CIDR[,CIDR…]", value_delimiter = ',', required = true, num_args = 1.., value_parser = cidr_arg)]
    pub allowed_ips: Vec<IpNet>,
    /// Use this public key (generated on the corp host) instead of generating a key pair here.
    #[arg(long, value_name = "B64", value_parser = public_key_arg)]
    pub public_key: Option<PublicKey>,
    /// Persistent keepalive in seconds for this link (stored in the config; also printed in
    /// the wg-quick file, which uses 25 when not given).
    #[arg(long, value_name = "S", value_parser = keepalive_arg)]
    pub keepalive: Option<u16>,
    /// The corp router's interface this file is for (`/etc/wireguard/NAME.conf`). One corp
    /// router serving several appliances runs one interface per appliance (each appliance
    /// with its own tunnel network, `init --tunnel-address`); the PostUp rules are per
    /// interface, so they do not collide.
    #[arg(long, value_name = "NAME", default_value = wgquick::SUGGESTED_INTERFACE, value_parser = interface_arg)]
    pub interface: String,
    /// Print JSON (with the wg-quick text in "wg_quick") instead of the bare file.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Peer name.
    pub name: String,
    /// The corp router's interface this file is for (see `peer add --interface`).
    #[arg(long, value_name = "NAME", default_value = wgquick::SUGGESTED_INTERFACE, value_parser = interface_arg)]
    pub interface: String,
}

/// A Linux interface name wg-quick accepts: 1-15 of a-z A-Z 0-9 _ = + . -
fn interface_arg(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'=' | b'+' | b'.' | b'-'));
    if ok {
        Ok(s.to_string())
    } else {
        Err("not an interface name wg-quick accepts; fix: pass 1-15 of a-z A-Z 0-9 _ = + . -, e.g. modelgate-b".into())
    }
}

#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct NameJson {
    /// Peer name.
    pub name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct NameArg {
    /// Peer name.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// Peer name.
    pub name: String,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
}

fn name_arg(s: &str) -> Result<String, String> {
    check_peer_name(s)
        .map(|()| s.to_string())
        .map_err(|p| format!("{p}; fix: use e.g. corp or site-2"))
}

fn cidr_arg(s: &str) -> Result<IpNet, String> {
    s.trim()
        .parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| "not a CIDR; fix: pass networks behind the peer like 10.20.0.0/24".to_string())
}

fn keepalive_arg(s: &str) -> Result<u16, String> {
    s.parse::<u16>().ok().filter(|k| *k > 0).ok_or_else(|| {
        "must be 1-65535 seconds; fix: pass e.g. 25, or omit --keepalive".to_string()
    })
}

fn public_key_arg(s: &str) -> Result<PublicKey, String> {
    s.parse::<PublicKey>()
        .map_err(|e| format!("{e}; fix: pass the output of `wg pubkey` on the corp host"))
}

pub fn execute(config_path: &Path, cmd: PeerCommand) -> Result<(), CliError> {
    match cmd {
        PeerCommand::Add(a) => add(config_path, a),
        PeerCommand::List(a) => list(config_path, a.json),
        PeerCommand::Show(a) => show(config_path, &a.name, a.json),
        PeerCommand::Remove(a) => remove(config_path, &a.name, a.yes),
        PeerCommand::Config(a) => print_config(config_path, &a.name, &a.interface),
    }
}

/// Where `peer add` keeps a private key it generated.
pub fn peer_key_path(config: &Config, name: &str) -> PathBuf {
    config
        .server
        .state_dir
        .join("peers")
        .join(format!("{name}.key"))
}

/// Takes the config's update lock (held until the returned guard drops).
pub(super) fn lock(config_path: &Path) -> Result<std::fs::File, CliError> {
    lock_for_update(config_path).map_err(|e| {
        CliError::runtime(format!(
            "--config {}: cannot take the update lock: {e}; fix: run as root (or as the config's owner)",
            config_path.display()
        ))
    })
}

/// Reads the config file's text and validates it (edits start from a valid file).
pub(super) fn load_text(config_path: &Path) -> Result<(String, Config), CliError> {
    let text = std::fs::read_to_string(config_path).map_err(|source| ConfigError::Read {
        path: config_path.to_path_buf(),
        source,
    })?;
    let config = Config::from_toml_str(&text, config_path)?;
    Ok((text, config))
}

fn no_such_peer(name: &str) -> CliError {
    CliError::runtime(format!(
        "peer {name:?}: no such peer; fix: see `modelgate peer list`"
    ))
}

fn appliance_key(config: &Config) -> Result<PrivateKey, CliError> {
    load_private_key(&config.wireguard).map_err(CliError::runtime)
}

/// Writes the edited config with the mode the file already has.
pub(super) fn write_config(path: &Path, text: &str) -> Result<(), CliError> {
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    write_atomic(path, text.as_bytes(), mode).map_err(|e| {
        CliError::runtime(format!(
            "--config {}: cannot write: {e}; fix: run as root (or as the config's owner)",
            path.display()
        ))
    })
}

fn add(config_path: &Path, a: AddArgs) -> Result<(), CliError> {
    Config::load(config_path)?; // Report a missing/invalid file before creating a lock next to it.
    let _lock = lock(config_path)?;
    let (text, config) = load_text(config_path)?;
    if let Some(p) = config.peer(&a.name) {
        return Err(CliError::runtime(format!(
            "peer {:?}: already exists (tunnel address {}); fix: choose another NAME, or `modelgate peer remove {}` first",
            a.name, p.tunnel_address, a.name
        )));
    }
    let appliance = appliance_key(&config)?;
    let appliance_pub = appliance.public_key();

    let (public_key, private_key) = match a.public_key {
        Some(pk) => (pk, None),
        None => {
            let k = PrivateKey::generate();
            (k.public_key(), Some(k))
        }
    };
    if public_key == appliance_pub {
        return Err(CliError::usage(format!(
            "--public-key {public_key}: is the appliance's own public key; fix: pass the corp host's `wg pubkey` output"
        )));
    }
    let tunnel = config.wireguard.address;
    let address = allocate_tunnel_address(&tunnel, config.peers.iter().map(|p| p.tunnel_address))
        .ok_or_else(|| {
            CliError::runtime(format!(
                "wireguard.address {tunnel}: the tunnel network has no free address; fix: remove a peer or widen the prefix"
            ))
        })?;

    let generated = now_rfc3339();
    let new_peer = NewPeer {
        name: a.name.clone(),
        public_key: public_key.to_base64(),
        tunnel_address: address.to_string(),
        allowed_ips: a.allowed_ips.iter().map(ToString::to_string).collect(),
        keepalive: a.keepalive,
    };
    let (new_text, new_config) = with_peer(config_path, &text, &new_peer, &generated)?;
    let peer = new_config
        .peer(&a.name)
        .ok_or_else(|| CliError::runtime("internal: the added peer is missing; report this bug"))?;

    // Key first, then config: a config pointing at a peer whose key we failed to keep is worse
    // than a stray key file, which is cleaned up below when the config write fails.
    let key_path = peer_key_path(&new_config, &a.name);
    store_peer_key(&key_path, private_key.as_ref())?;
    if let Err(e) = write_config(config_path, &new_text) {
        if private_key.is_some() {
            let _ = std::fs::remove_file(&key_path);
        }
        return Err(e);
    }

    let file = render_peer_file(
        &new_config,
        peer,
        &appliance_pub,
        private_key.as_ref(),
        &generated,
        &a.interface,
    );
    if a.json {
        let mut v = peer_json(&new_config, peer);
        v["wg_quick"] = Value::String(file);
        print_json(&v);
    } else {
        print!("{file}");
        eprintln!(
            "peer {:?} added: tunnel address {}, allowed IPs {}{}. Apply it with `modelgate reload` (a running daemon keeps its streams).",
            peer.name,
            peer.tunnel_address,
            join(&peer.allowed_ips),
            if private_key.is_some() {
                "; the file above contains its private key"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// The config text with `peer` added, and its validation (errors name the flags: the file was
/// valid before).
fn with_peer(
    config_path: &Path,
    text: &str,
    peer: &NewPeer,
    generated: &str,
) -> Result<(String, Config), CliError> {
    let new_text = edit::add_peer(
        text,
        peer,
        &format!("Added by `modelgate peer add` at {generated}."),
    )
    .map_err(|e| CliError::config(format!("--config {}: {e}", config_path.display())))?;
    match Config::from_toml_str(&new_text, config_path) {
        Ok(c) => Ok((new_text, c)),
        Err(ConfigError::Invalid { errors, .. }) => Err(CliError::usage(format!(
            "peer {:?} not added (nothing written):\n{errors}",
            peer.name
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Stores a generated peer key (0600, in a 0700 directory); with none, removes a stale one.
fn store_peer_key(key_path: &Path, private_key: Option<&PrivateKey>) -> Result<(), CliError> {
    let Some(k) = private_key else {
        return remove_stale_key(key_path);
    };
    let dir = key_path.parent().unwrap_or(Path::new("."));
    create_dir_with_mode(dir, 0o700)
        .and_then(|_| write_atomic(key_path, format!("{}\n", k.to_base64()).as_bytes(), 0o600))
        .map_err(|e| {
            CliError::runtime(format!(
                "cannot store the peer key {}: {e}; fix: make server.state_dir writable (run as root)",
                key_path.display()
            ))
        })
}

fn remove_stale_key(path: &Path) -> Result<(), CliError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CliError::runtime(format!(
            "cannot remove the stored peer key {}: {e}; fix: delete it by hand",
            path.display()
        ))),
    }
}

fn render_peer_file(
    config: &Config,
    peer: &PeerConfig,
    appliance: &PublicKey,
    private_key: Option<&PrivateKey>,
    generated: &str,
    interface: &str,
) -> String {
    let behind: Vec<IpNet> = peer.networks_behind().copied().collect();
    wgquick::render(&CorpPeerFile {
        name: &peer.name,
        generated,
        tunnel_address: peer.tunnel_address,
        private_key,
        mtu: config.wireguard.mtu,
        networks_behind: &behind,
        appliance_public_key: appliance,
        appliance_address: config.wireguard.address.addr(),
        endpoint: &config.wireguard.public_endpoint,
        keepalive: peer.keepalive.unwrap_or(DEFAULT_PEER_KEEPALIVE),
        interface,
    })
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn peer_json(config: &Config, p: &PeerConfig) -> Value {
    json!({
        "name": p.name,
        "public_key": p.public_key.to_base64(),
        "tunnel_address": p.tunnel_address.to_string(),
        "allowed_ips": p.allowed_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "networks": p.networks_behind().map(ToString::to_string).collect::<Vec<_>>(),
        "keepalive": p.keepalive,
        "endpoint": p.endpoint.map(|e| e.to_string()),
        "private_key_stored": peer_key_path(config, &p.name).is_file(),
    })
}

fn list(config_path: &Path, json: bool) -> Result<(), CliError> {
    let config = Config::load(config_path)?;
    if json {
        let v: Vec<Value> = config.peers.iter().map(|p| peer_json(&config, p)).collect();
        print_json(&Value::Array(v));
        return Ok(());
    }
    if config.peers.is_empty() {
        println!("no peers; add one with `modelgate peer add NAME --allowed-ips CIDR`");
        return Ok(());
    }
    let rows: Vec<[String; 4]> = config
        .peers
        .iter()
        .map(|p| {
            [
                p.name.clone(),
                p.public_key.to_base64(),
                p.tunnel_address.to_string(),
                join(&p.allowed_ips),
            ]
        })
        .collect();
    print_table(
        &["NAME", "PUBLIC KEY", "TUNNEL ADDRESS", "ALLOWED IPS"],
        &rows,
    );
    Ok(())
}

pub(super) fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut width = header.map(str::len);
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn show(config_path: &Path, name: &str, json: bool) -> Result<(), CliError> {
    let config = Config::load(config_path)?;
    let p = config.peer(name).ok_or_else(|| no_such_peer(name))?;
    if json {
        print_json(&peer_json(&config, p));
        return Ok(());
    }
    let stored = peer_key_path(&config, name);
    println!("name:            {}", p.name);
    println!("public key:      {}", p.public_key);
    println!("tunnel address:  {}", p.tunnel_address);
    println!("allowed ips:     {}", join(&p.allowed_ips));
    println!(
        "keepalive:       {}",
        p.keepalive
            .map_or("none (corp file uses 25)".to_string(), |k| format!("{k} s"))
    );
    println!(
        "endpoint:        {}",
        p.endpoint
            .map_or("learned from the peer's packets".to_string(), |e| e
                .to_string())
    );
    println!(
        "private key:     {}",
        if stored.is_file() {
            format!(
                "stored in {} (`modelgate peer config {name}` prints the file)",
                stored.display()
            )
        } else {
            "not stored (the peer brought its own key pair)".to_string()
        }
    );
    Ok(())
}

pub(super) fn confirm(question: &str) -> bool {
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    if std::io::stdin().lock().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes")
}

fn remove(config_path: &Path, name: &str, yes: bool) -> Result<(), CliError> {
    Config::load(config_path)?; // Report a missing/invalid file before creating a lock next to it.
    let _lock = lock(config_path)?;
    let (text, config) = load_text(config_path)?;
    let p = config.peer(name).ok_or_else(|| no_such_peer(name))?;
    // An upstream reached through this peer would be left with no route (and the config
    // invalid): say which, and what to do, before asking anything.
    let dependents: Vec<&str> = config
        .upstreams
        .iter()
        .filter(|u| p.allowed_ips.iter().any(|n| n.contains(&u.addr.ip())))
        .map(|u| u.name.as_str())
        .collect();
    if !dependents.is_empty() {
        return Err(CliError::runtime(format!(
            "peer remove {name}: upstream(s) {} are reached through this peer; fix: `modelgate upstream remove NAME` first",
            dependents.join(", ")
        )));
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::usage(format!(
                "peer remove {name}: needs confirmation and stdin is not a terminal; fix: pass --yes"
            )));
        }
        if !confirm(&format!(
            "Remove peer {name:?} ({}, {})? Its tunnel stops working.",
            p.tunnel_address, p.public_key
        )) {
            return Err(CliError::runtime(format!(
                "peer {name:?}: not removed (not confirmed); fix: answer y, or pass --yes"
            )));
        }
    }
    let new_text = edit::remove_peer(&text, name)
        .map_err(|e| CliError::config(format!("--config {}: {e}", config_path.display())))?;
    Config::from_toml_str(&new_text, config_path)?;
    write_config(config_path, &new_text)?;
    remove_stale_key(&peer_key_path(&config, name))?;
    println!("removed peer {name:?}; apply it with `modelgate reload`");
    Ok(())
}

fn print_config(config_path: &Path, name: &str, interface: &str) -> Result<(), CliError> {
    let config = Config::load(config_path)?;
    let p = config.peer(name).ok_or_else(|| no_such_peer(name))?;
    let appliance = appliance_key(&config)?.public_key();
    let key_path = peer_key_path(&config, name);
    let private_key = if key_path.exists() {
        let k = read_key_file(&key_path).map_err(CliError::runtime)?;
        if k.public_key() == p.public_key {
            Some(k)
        } else {
            eprintln!(
                "warning: {} does not match peer {name:?}'s public key and was ignored; fix: delete it",
                key_path.display()
            );
            None
        }
    } else {
        None
    };
    print!(
        "{}",
        render_peer_file(
            &config,
            p,
            &appliance,
            private_key.as_ref(),
            &now_rfc3339(),
            interface
        )
    );
    Ok(())
}
