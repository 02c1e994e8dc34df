//! `modelgate store migrate --to URL`: move an appliance's keys and usage from the embedded
//! SQLite store to a shared PostgreSQL one, and point the config at it.
//!
//! Owns the command: the copy itself is [`crate::keys::migrate`]'s. Writes `[store]` into the
//! config (under the update lock, validated first) only after the copy succeeded; the SQLite
//! file stays as it was (the rollback: remove `[store]` again). Safe to run again: keys are
//! replaced by id and usage is added as a difference, never twice.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde_json::json;

use super::peer::{lock, write_config};
use super::{print_json, CliError};
use crate::config::{edit, Config, ConfigError};
use crate::keys::{migrate, PgStoreConfig};

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy this appliance's SQLite store (keys, usage) into PostgreSQL and set [store] url.
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// postgres://USER@HOST:PORT/DB?sslmode=require (no password in it).
    #[arg(long, value_name = "URL", value_parser = url_arg)]
    pub to: String,
    /// File with the database password, mode 0600.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// PEM of the CA that signed the database server's certificate.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Copy only; leave the config's [store] as it is.
    #[arg(long)]
    pub no_config: bool,
    #[arg(long)]
    pub json: bool,
}

pub(super) fn url_arg(s: &str) -> Result<String, String> {
    PgStoreConfig::check_url(s)
        .map(|()| s.to_string())
        .map_err(|(problem, fix)| format!("{problem}; fix: {fix}"))
}

pub(super) fn absolute_path(p: &Path, flag: &str) -> Result<String, CliError> {
    let abs = std::path::absolute(p).map_err(|e| {
        CliError::usage(format!(
            "{flag} {}: {e}; fix: pass an absolute path",
            p.display()
        ))
    })?;
    abs.to_str().map(str::to_string).ok_or_else(|| {
        CliError::usage(format!(
            "{flag} {}: not valid UTF-8; fix: use a UTF-8 path",
            p.display()
        ))
    })
}

pub fn execute(config_path: &Path, cmd: StoreCommand) -> Result<(), CliError> {
    match cmd {
        StoreCommand::Migrate(a) => run_migrate(config_path, a),
    }
}

fn run_migrate(config_path: &Path, a: MigrateArgs) -> Result<(), CliError> {
    let config = Config::load(config_path)?;
    let password_file = a
        .password_file
        .as_deref()
        .map(|p| absolute_path(p, "--password-file"))
        .transpose()?;
    let ca_file = a
        .ca_file
        .as_deref()
        .map(|p| absolute_path(p, "--ca-file"))
        .transpose()?;
    let to = PgStoreConfig {
        url: a.to.clone(),
        password_file: password_file.as_ref().map(PathBuf::from),
        ca_file: ca_file.as_ref().map(PathBuf::from),
    };
    let report = migrate::sqlite_to_postgres(&config.server.state_dir, &to).map_err(|e| {
        CliError::runtime(format!(
            "store migrate: {e} (nothing changed in the config)"
        ))
    })?;
    let mut config_written = false;
    if !a.no_config {
        let _lock = lock(config_path)?;
        let text = std::fs::read_to_string(config_path).map_err(|source| ConfigError::Read {
            path: config_path.to_path_buf(),
            source,
        })?;
        let new_text = edit::set_store(&text, &a.to, password_file.as_deref(), ca_file.as_deref())
            .map_err(|e| CliError::config(format!("--config {}: {e}", config_path.display())))?;
        Config::from_toml_str(&new_text, config_path)
            .map_err(|e| CliError::usage(format!("[store] not written (the copy is done): {e}")))?;
        write_config(config_path, &new_text)?;
        config_written = true;
    }
    if a.json {
        print_json(&json!({
            "to": to.display_url(),
            "keys": report.keys,
            "usage_rows": report.usage_rows,
            "tokens": report.tokens,
            "requests": report.requests,
            "config_written": config_written,
        }));
    } else {
        println!(
            "copied {} keys and {} usage rows ({} tokens, {} requests) to {}",
            report.keys,
            report.usage_rows,
            report.tokens,
            report.requests,
            to.display_url()
        );
        if config_written {
            println!(
                "wrote [store] to {}; restart modelgate to use the shared store",
                config_path.display()
            );
        }
        println!(
            "other appliances: copy {}/keys.secret (mode 0600) to their state directory before pointing them at this store",
            config.server.state_dir.display()
        );
    }
    Ok(())
}
