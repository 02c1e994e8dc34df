//! `modelgate upstream add|list|remove`: the model servers inside the tunnel.
//!
//! Owns editing `[[upstream]]` tables (through `toml_edit`, keeping the operator's comments).
//! Every edit takes the same update lock as `peer`, validates the whole resulting config (so an
//! upstream outside every peer's networks, a public model name routed twice by the same server
//! or an insecure API key file is refused with exit 2), and writes atomically; nothing is
//! written on error. Another server routing a public model that is already routed becomes a
//! replica of it.
//! Never reads an API key file's content: only its path goes into the config.

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use super::peer::{confirm, load_text, lock, print_table, write_config};
use super::{now_rfc3339, print_json, CliError};
use crate::config::edit::{self, NewUpstream};
use crate::config::{
    check_upstream_name, parse_model_route, parse_upstream_url, Config, ConfigError, UpstreamConfig,
};

#[derive(Debug, Subcommand)]
pub enum UpstreamCommand {
    /// Add a model server inside the tunnel (its IP must lie inside some peer's allowed IPs).
    Add(AddArgs),
    /// List upstreams (name, URL, models, whether an API key is configured).
    List(JsonArg),
    /// Remove an upstream.
    Remove(RemoveArgs),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Upstream name: 1-32 of a-z, 0-9, '-', starting with a letter or digit.
    #[arg(value_parser = name_arg)]
    pub name: String,
    /// The model server's OpenAI API: http://IP:PORT (meaning http://IP:PORT/v1) or
    /// http://IP:PORT/PATH. An IP address, not a name: there is no DNS inside the tunnel.
    #[arg(long, value_name = "URL", value_parser = url_arg)]
    pub url: String,
    /// File (mode 0600) holding the key modelgate sends to the model server. Stored as an
    /// absolute path; the key itself never goes into the config.
    #[arg(long, value_name = "FILE", value_parser = api_key_file_arg)]
    pub api_key_file: Option<PathBuf>,
    /// A routed model, PUBLIC or PUBLIC=UPSTREAM_ID; repeat for more. Without --model the
    /// models are discovered from the server's GET /v1/models.
    #[arg(long = "model", value_name = "PUBLIC[=UPSTREAM_ID]", value_parser = model_arg)]
    pub models: Vec<String>,
    /// Most requests in flight to this server at once (default: no limit).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent: Option<u32>,
    /// Print the added upstream as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// Upstream name.
    pub name: String,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
}

fn name_arg(s: &str) -> Result<String, String> {
    check_upstream_name(s)
        .map(|()| s.to_string())
        .map_err(|p| format!("{p}; fix: use e.g. vllm or coder-1"))
}

fn url_arg(s: &str) -> Result<String, String> {
    parse_upstream_url(s)
        .map(|_| s.to_string())
        .map_err(|(problem, fix)| format!("{problem}; fix: {fix}"))
}

fn model_arg(s: &str) -> Result<String, String> {
    parse_model_route(s).map(|_| s.to_string()).map_err(|p| {
        format!("{p}; fix: pass PUBLIC or PUBLIC=UPSTREAM_ID, e.g. coder=Qwen/Qwen2.5-Coder-32B-Instruct")
    })
}

fn api_key_file_arg(s: &str) -> Result<PathBuf, String> {
    let path = std::path::absolute(s).map_err(|e| format!("{e}; fix: pass an existing file"))?;
    if path.to_str().is_none() {
        return Err("the path is not valid UTF-8; fix: use a plain file name".into());
    }
    crate::config::check_secret_file(&path)
        .map(|()| path)
        .map_err(|(problem, fix)| format!("{problem}; fix: {fix}"))
}

pub fn execute(config_path: &Path, cmd: UpstreamCommand) -> Result<(), CliError> {
    match cmd {
        UpstreamCommand::Add(a) => add(config_path, a),
        UpstreamCommand::List(a) => list(config_path, a.json),
        UpstreamCommand::Remove(a) => remove(config_path, &a.name, a.yes),
    }
}

fn no_such_upstream(name: &str) -> CliError {
    CliError::runtime(format!(
        "upstream {name:?}: no such upstream; fix: see `modelgate upstream list`"
    ))
}

fn add(config_path: &Path, a: AddArgs) -> Result<(), CliError> {
    Config::load(config_path)?; // Report a missing/invalid file before creating a lock next to it.
    let _lock = lock(config_path)?;
    let (text, config) = load_text(config_path)?;
    if let Some(u) = config.upstream(&a.name) {
        return Err(CliError::runtime(format!(
            "upstream {:?}: already exists ({}); fix: choose another NAME, or `modelgate upstream remove {}` first",
            a.name,
            u.url(),
            a.name
        )));
    }
    let new = NewUpstream {
        name: a.name.clone(),
        url: a.url.clone(),
        // `api_key_file_arg` made it absolute and checked it is UTF-8.
        api_key_file: a
            .api_key_file
            .as_deref()
            .and_then(Path::to_str)
            .map(str::to_string),
        models: a.models.clone(),
        max_concurrent: a.max_concurrent,
    };
    let new_text = edit::add_upstream(
        &text,
        &new,
        &format!("Added by `modelgate upstream add` at {}.", now_rfc3339()),
    )
    .map_err(|e| CliError::config(format!("--config {}: {e}", config_path.display())))?;
    let new_config = match Config::from_toml_str(&new_text, config_path) {
        Ok(c) => c,
        Err(ConfigError::Invalid { errors, .. }) => {
            // The file was valid before, so these come from the flags.
            return Err(CliError::usage(format!(
                "upstream {:?} not added (nothing written):\n{errors}",
                a.name
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let u = new_config.upstream(&a.name).ok_or_else(|| {
        CliError::runtime("internal: the added upstream is missing; report this bug")
    })?;
    write_config(config_path, &new_text)?;
    if a.json {
        print_json(&upstream_json(u));
    } else {
        println!(
            "upstream {:?} added: {}, models {}, API key {}. Apply it with `modelgate reload` (a running daemon keeps its streams).",
            u.name,
            u.url(),
            models_cell(u),
            u.api_key_file
                .as_deref()
                .map_or("none".to_string(), |p| format!("from {}", p.display()))
        );
    }
    Ok(())
}

fn models_cell(u: &UpstreamConfig) -> String {
    if u.discovers_models() {
        return "(discovered)".to_string();
    }
    u.models
        .iter()
        .map(|m| {
            if m.public == m.upstream {
                m.public.clone()
            } else {
                format!("{}={}", m.public, m.upstream)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The JSON shape of one upstream (`upstream list --json`, `upstream add --json`).
pub fn upstream_json(u: &UpstreamConfig) -> Value {
    json!({
        "name": u.name,
        "url": u.url(),
        "addr": u.addr.to_string(),
        "base_path": u.base_path,
        "models": u.models.iter().map(|m| json!({"public": m.public, "upstream": m.upstream})).collect::<Vec<_>>(),
        "discovered": u.discovers_models(),
        "api_key": u.api_key_file.is_some(),
        "api_key_file": u.api_key_file.as_ref().map(|p| p.display().to_string()),
        "max_concurrent": u.max_concurrent,
    })
}

fn list(config_path: &Path, json: bool) -> Result<(), CliError> {
    let config = Config::load(config_path)?;
    if json {
        print_json(&Value::Array(
            config.upstreams.iter().map(upstream_json).collect(),
        ));
        return Ok(());
    }
    if config.upstreams.is_empty() {
        println!("no upstreams; add one with `modelgate upstream add NAME --url http://IP:PORT`");
        return Ok(());
    }
    let rows: Vec<[String; 4]> = config
        .upstreams
        .iter()
        .map(|u| {
            [
                u.name.clone(),
                u.url(),
                models_cell(u),
                if u.api_key_file.is_some() {
                    "yes"
                } else {
                    "no"
                }
                .to_string(),
            ]
        })
        .collect();
    print_table(&["NAME", "URL", "MODELS", "API KEY"], &rows);
    Ok(())
}

fn remove(config_path: &Path, name: &str, yes: bool) -> Result<(), CliError> {
    Config::load(config_path)?; // Report a missing/invalid file before creating a lock next to it.
    let _lock = lock(config_path)?;
    let (text, config) = load_text(config_path)?;
    let u = config
        .upstream(name)
        .ok_or_else(|| no_such_upstream(name))?;
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::usage(format!(
                "upstream remove {name}: needs confirmation and stdin is not a terminal; fix: pass --yes"
            )));
        }
        if !confirm(&format!(
            "Remove upstream {name:?} ({}, models {})? Requests for its models will fail.",
            u.url(),
            models_cell(u)
        )) {
            return Err(CliError::runtime(format!(
                "upstream {name:?}: not removed (not confirmed); fix: answer y, or pass --yes"
            )));
        }
    }
    let new_text = edit::remove_upstream(&text, name)
        .map_err(|e| CliError::config(format!("--config {}: {e}", config_path.display())))?;
    Config::from_toml_str(&new_text, config_path)?;
    write_config(config_path, &new_text)?;
    println!("removed upstream {name:?}; apply it with `modelgate reload`");
    Ok(())
}
