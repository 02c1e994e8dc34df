//! `modelgate model set|list|remove`: per-model settings, the `[[model]]` tables — how the
//! requests for one public model are spread over the upstreams that serve it (its replicas).
//!
//! Owns editing `[[model]]` tables (through `toml_edit`, keeping the operator's comments),
//! under the same update lock as `peer` and `upstream`; the whole resulting config is validated
//! before it is written atomically, and nothing is written on error. A running daemon applies
//! the change at `modelgate reload`. Never touches `[[upstream]]` tables: replicas are added
//! with `upstream add`.

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::path::Path;

use super::peer::{load_text, lock, print_table, write_config};
use super::{now_rfc3339, print_json, CliError};
use crate::config::edit;
use crate::config::{check_public_model_name, Balance, Config, ConfigError};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Set how a model's requests are balanced over its replicas (writes its [[model]] table).
    Set(SetArgs),
    /// List the models the config routes or has settings for, with balancing and replicas.
    List(ListArgs),
    /// Remove a model's [[model]] table (it goes back to least_loaded).
    Remove(RemoveArgs),
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// The public model name (what clients send as `model`).
    #[arg(value_parser = name_arg)]
    pub name: String,
    /// least_loaded: the healthy replica with the fewest requests in flight; affinity: one
    /// conversation (same key, same leading messages) on one replica, for its prompt cache.
    #[arg(long, value_name = "RULE", value_parser = balance_arg)]
    pub balance: Balance,
    /// Print the model's settings as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The public model name.
    pub name: String,
}

fn name_arg(s: &str) -> Result<String, String> {
    check_public_model_name(s)
        .map(|()| s.to_string())
        .map_err(|p| format!("{p}; fix: pass the name clients use, e.g. coder"))
}

fn balance_arg(s: &str) -> Result<Balance, String> {
    Balance::parse(s)
        .ok_or_else(|| format!("{s:?} is not a balancing rule; fix: pass least_loaded or affinity"))
}

pub fn execute(config_path: &Path, cmd: ModelCommand) -> Result<(), CliError> {
    match cmd {
        ModelCommand::Set(a) => set(config_path, a),
        ModelCommand::List(a) => list(config_path, a.json),
        ModelCommand::Remove(a) => remove(config_path, &a.name),
    }
}

/// Validates `new_text` and writes it; a refusal names what was not done.
fn commit(config_path: &Path, new_text: &str, what: &str) -> Result<Config, CliError> {
    let config = match Config::from_toml_str(new_text, config_path) {
        Ok(c) => c,
        Err(ConfigError::Invalid { errors, .. }) => {
            return Err(CliError::usage(format!(
                "{what} (nothing written):\n{errors}"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    write_config(config_path, new_text)?;
    Ok(config)
}

fn set(config_path: &Path, a: SetArgs) -> Result<(), CliError> {
    Config::load(config_path)?; // Report a missing/invalid file before creating a lock next to it.
    let _lock = lock(config_path)?;
    let (text, _) = load_text(config_path)?;
    let new_text = edit::set_model(
        &text,
        &a.name,
        a.balance.as_str(),
        &format!("Set by `modelgate model set` at {}.", now_rfc3339()),
    )
    .map_err(|e| CliError::config(format!("--config {}: {e}", config_path.display())))?;
    let config = commit(
        config_path,
        &new_text,
        &format!("model {:?} not set", a.name),
    )?;
    let row = model_row(&config, &a.name);
    if a.json {
        print_json(&row);
    } else {
        let replicas = replicas(&config, &a.name);
        println!(
            "model {:?}: balance {}, static replicas {}. `modelgate reload` applies it to a running daemon.",
            a.name,
            a.balance.as_str(),
            if replicas.is_empty() {
                "none (served only if an upstream discovers it)".to_string()
            } else {
                replicas.join(", ")
            }
        );
    }
    Ok(())
}

fn remove(config_path: &Path, name: &str) -> Result<(), CliError> {
    Config::load(config_path)?;
    let _lock = lock(config_path)?;
    let (text, _) = load_text(config_path)?;
    let new_text = edit::remove_model(&text, name).map_err(|e| match e {
        edit::EditError::NoSuchModel(_) => CliError::runtime(format!("model {name:?}: {e}")),
        e => CliError::config(format!("--config {}: {e}", config_path.display())),
    })?;
    commit(
        config_path,
        &new_text,
        &format!("model {name:?} not removed"),
    )?;
    println!(
        "model {name:?}: settings removed (balance least_loaded); `modelgate reload` applies it"
    );
    Ok(())
}

/// The upstreams with a static route for `name`, in file order.
fn replicas(config: &Config, name: &str) -> Vec<String> {
    config
        .upstreams_for_model(name)
        .map(|(u, _)| u.name.clone())
        .collect()
}

/// The JSON shape of one model (`model list --json`, `model set --json`).
fn model_row(config: &Config, name: &str) -> Value {
    let table = config.model(name);
    json!({
        "name": name,
        "balance": table.map_or(Balance::default(), |m| m.balance).as_str(),
        "configured": table.is_some(),
        "replicas": replicas(config, name),
    })
}

/// Every model the config names: statically routed ones and those with a `[[model]]` table.
fn names(config: &Config) -> Vec<String> {
    let mut out: Vec<String> = config
        .upstreams
        .iter()
        .flat_map(|u| u.models.iter().map(|m| m.public.clone()))
        .chain(config.models.iter().map(|m| m.name.clone()))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn list(config_path: &Path, json: bool) -> Result<(), CliError> {
    let config = Config::load(config_path)?;
    let names = names(&config);
    if json {
        print_json(&Value::Array(
            names.iter().map(|n| model_row(&config, n)).collect(),
        ));
        return Ok(());
    }
    if names.is_empty() {
        println!("no models routed statically and no [[model]] settings; discovered models are listed by `modelgate status`");
        return Ok(());
    }
    let rows: Vec<[String; 3]> = names
        .iter()
        .map(|n| {
            let r = replicas(&config, n);
            [
                n.clone(),
                config
                    .model(n)
                    .map_or(Balance::default(), |m| m.balance)
                    .as_str()
                    .to_string(),
                if r.is_empty() {
                    "(discovered only)".into()
                } else {
                    r.join(", ")
                },
            ]
        })
        .collect();
    print_table(&["NAME", "BALANCE", "STATIC REPLICAS"], &rows);
    if config.upstreams.iter().any(|u| u.discovers_models()) {
        println!("upstreams that discover their models add replicas at run time (see `modelgate status`)");
    }
    Ok(())
}
