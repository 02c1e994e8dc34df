//! `modelgate key create|list|show|revoke|rotate`: API keys for clients (Cursor).
//!
//! Owns the operator side of the key store in `<server.state_dir>/keys.db`. A secret is printed
//! exactly once, on stdout, by `create` and `rotate`; it is never logged, never stored and never
//! read from argv. A running daemon sees every change within a second (it watches the store).

use clap::{Args, Subcommand};
use ipnet::IpNet;
use serde_json::{json, Value};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::{print_json, rfc3339, CliError};
use crate::config::Config;
use crate::keys::ledger::{KeyUsage, Ledger, UsageTotals};
use crate::keys::store::check_key_name;
use crate::keys::{CreatedKey, KeyRecord, KeyStore, NewKey, StoreError};
use crate::policy::parse::{
    parse_budget, parse_cidr, parse_endpoints, parse_expires, parse_grace, parse_limit,
    parse_models, Expiry,
};
use crate::policy::{Budget, BudgetPeriod, Endpoint, KeyPolicy};

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key and print its secret once.
    Create(CreateArgs),
    /// List keys (name, id, created, expires, status, models).
    List(ListArgs),
    /// Show one key (by name or id) and its policy.
    Show(ShowArgs),
    /// Revoke a key; a running daemon refuses it within a second.
    Revoke(RevokeArgs),
    /// Give a key a new secret (same id and policy) and print it once.
    Rotate(RotateArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Key name: 1-64 of a-z A-Z 0-9 . _ @ -, starting with a letter or digit (unique among
    /// keys that are not revoked).
    #[arg(value_parser = name_arg)]
    pub name: String,
    /// Models the key may use: names or globs (`*`, `?`), comma-separated. Default: all.
    #[arg(long, value_name = "A,B*", value_parser = models_arg)]
    pub models: Option<List<String>>,
    /// Requests per minute (stored; enforced by the gateway).
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub rpm: Option<u32>,
    /// Tokens per minute (stored; enforced by the gateway).
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub tpm: Option<u32>,
    /// Concurrent requests (stored; enforced by the gateway).
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub max_concurrent: Option<u32>,
    /// Token budget per UTC day or calendar month (stored; enforced by the gateway).
    #[arg(long, value_name = "N/day|N/month", value_parser = parse_budget)]
    pub budget: Option<Budget>,
    /// Expiry: a duration from now (30d, 12h) or a time (2026-01-31, RFC 3339). Default: never.
    #[arg(long, value_name = "30d|RFC3339", value_parser = parse_expires)]
    pub expires: Option<Expiry>,
    /// Client networks allowed to use the key (repeatable; a bare IP means that host). Cursor's
    /// backend egress IPs are not published, so leave this unset for Cursor keys.
    #[arg(long = "allow-cidr", value_name = "CIDR", value_parser = parse_cidr)]
    pub allow_cidrs: Vec<IpNet>,
    /// Endpoints the key may call, comma-separated: chat_completions, completions, embeddings,
    /// responses, models. Default: all.
    #[arg(long, value_name = "E,E", value_parser = endpoints_arg)]
    pub endpoints: Option<List<Endpoint>>,
    /// Build on the named policy `[[policy]] name = NAME` of the config: the key gets its
    /// models, endpoints, limits, budget and sources, and the flags above override single
    /// fields. Editing the policy in the config (and reloading) changes every key using it.
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
    /// Print {"id","name","secret","created_at","expires_at","policy"} as JSON.
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
pub struct ShowArgs {
    /// Key name (or key id).
    pub name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Key name (or key id).
    pub name: String,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Key name (or key id).
    pub name: String,
    /// How long the old secret keeps working (e.g. 10m, 1h). Default: 0, it stops at once.
    #[arg(long, value_name = "DURATION", value_parser = parse_grace)]
    pub grace: Option<Duration>,
    /// Print {"id","name","secret","created_at","expires_at","previous_valid_until","policy"}.
    #[arg(long)]
    pub json: bool,
}

/// A comma-separated flag value parsed as one list (a bare `Vec` would make clap expect the
/// flag repeated).
#[derive(Debug, Clone)]
pub struct List<T>(pub Vec<T>);

fn models_arg(s: &str) -> Result<List<String>, String> {
    parse_models(s).map(List)
}

fn endpoints_arg(s: &str) -> Result<List<Endpoint>, String> {
    parse_endpoints(s).map(List)
}

fn name_arg(s: &str) -> Result<String, String> {
    check_key_name(s)
        .map(|()| s.to_string())
        .map_err(|p| format!("{p}; fix: use 1-64 of a-z A-Z 0-9 . _ @ -, e.g. cursor-alice"))
}

pub fn execute(config_path: &Path, cmd: KeyCommand) -> Result<(), CliError> {
    match cmd {
        KeyCommand::Create(a) => create(config_path, a),
        KeyCommand::List(a) => list(config_path, a.json),
        KeyCommand::Show(a) => show(config_path, &a.name, a.json),
        KeyCommand::Revoke(a) => revoke(config_path, &a.name, a.yes),
        KeyCommand::Rotate(a) => rotate(config_path, &a.name, a.grace, a.json),
    }
}

fn open_store(config_path: &Path) -> Result<KeyStore, CliError> {
    Ok(open_with_config(config_path)?.1)
}

/// The config (for its named policies) and the key store it points at.
fn open_with_config(config_path: &Path) -> Result<(Config, KeyStore), CliError> {
    let config = Config::load(config_path)?;
    let store = KeyStore::open_in(&config.server.state_dir, &config.store).map_err(store_error)?;
    Ok((config, store))
}

fn store_error(e: StoreError) -> CliError {
    match e {
        // The name was checked by clap already; this only guards the library path.
        StoreError::InvalidName { .. } => CliError::usage(e.to_string()),
        _ => CliError::runtime(e.to_string()),
    }
}

fn create(config_path: &Path, a: CreateArgs) -> Result<(), CliError> {
    let now = SystemTime::now();
    let expires_at = match a.expires {
        Some(e) => Some(
            e.resolve(now)
                .map_err(|m| CliError::usage(format!("--expires: {m}")))?,
        ),
        None => None,
    };
    let policy = KeyPolicy {
        models: a.models.map(|l| l.0).unwrap_or_default(),
        endpoints: a.endpoints.map(|l| l.0).unwrap_or_default(),
        expires_at,
        allow_cidrs: a.allow_cidrs,
        rpm: a.rpm,
        tpm: a.tpm,
        max_concurrent: a.max_concurrent,
        budget: a.budget,
        policy: a.policy,
        missing_policy: false,
    };
    let (config, mut store) = open_with_config(config_path)?;
    if let Some(name) = &policy.policy {
        if !config.policies.contains_key(name) {
            let defined: Vec<&str> = config.policies.keys().map(String::as_str).collect();
            return Err(CliError::usage(format!(
                "--policy {name}: {} defines no [[policy]] named {name:?} (defined: {}); fix: add one, e.g.\n  [[policy]]\n  name = \"{name}\"\n  rpm = 60\nor pick a defined name",
                config.path.display(),
                if defined.is_empty() { "none".to_string() } else { defined.join(", ") }
            )));
        }
    }
    let created = store
        .create(NewKey {
            name: a.name,
            policy,
        })
        .map_err(store_error)?;
    print_secret(&created, a.json, "created");
    Ok(())
}

fn rotate(
    config_path: &Path,
    name: &str,
    grace: Option<Duration>,
    json: bool,
) -> Result<(), CliError> {
    let mut store = open_store(config_path)?;
    let rotated = store.rotate(name, grace).map_err(store_error)?;
    print_secret(&rotated, json, "rotated");
    Ok(())
}

/// Prints a new secret: alone on stdout (so `$(modelgate key create x)` captures just the key),
/// the explanation on stderr.
fn print_secret(k: &CreatedKey, json: bool, verb: &str) {
    if json {
        print_json(&json!({
            "id": k.id,
            "name": k.name,
            "secret": k.secret.expose(),
            "created_at": rfc3339(k.created_at),
            "expires_at": k.expires_at.map(rfc3339),
            "previous_valid_until": k.previous_valid_until.map(rfc3339),
            "policy": policy_json(&k.policy),
        }));
    } else {
        println!("{}", k.secret.expose());
    }
    let old = match k.previous_valid_until {
        Some(t) => format!(" The old secret works until {}.", rfc3339(t)),
        None if verb == "rotated" => " The old secret no longer works.".to_string(),
        None => String::new(),
    };
    eprintln!(
        "key {:?} {verb} (id {}). The secret above is shown only once and cannot be recovered: \
         store it now (e.g. in Cursor: Settings → Models → OpenAI API Key).{old} A running \
         daemon picks this up within a second.",
        k.name, k.id
    );
}

/// Each key's usage from the ledger (same database), in the order of `keys`.
fn usages(
    store: KeyStore,
    keys: &[&KeyRecord],
    now: SystemTime,
) -> Result<Vec<KeyUsage>, CliError> {
    let ledger = Ledger::from_store(store).map_err(store_error)?;
    keys.iter()
        .map(|k| ledger.usage(&k.id, now).map_err(store_error))
        .collect()
}

fn list(config_path: &Path, json: bool) -> Result<(), CliError> {
    let (config, store) = open_with_config(config_path)?;
    let keys = store.list().map_err(store_error)?;
    let now = SystemTime::now();
    let usage = usages(store, &keys.iter().collect::<Vec<_>>(), now)?;
    if json {
        print_json(&Value::Array(
            keys.iter()
                .zip(&usage)
                .map(|(k, u)| record_json(k, u, now, &config))
                .collect(),
        ));
        return Ok(());
    }
    if keys.is_empty() {
        eprintln!("no keys; create one with `modelgate key create NAME`");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .zip(&usage)
        .map(|(k, u)| {
            vec![
                k.name.clone(),
                k.id.clone(),
                rfc3339(k.created_at),
                k.expires_at.map_or("never".into(), rfc3339),
                k.status(now).as_str().into(),
                k.policy.policy.clone().unwrap_or_else(|| "-".into()),
                {
                    let p = k.policy.resolve(&config.policies);
                    if p.models.is_empty() {
                        "*".into()
                    } else {
                        p.models.join(",")
                    }
                },
                u.today.tokens().to_string(),
                u.this_month.tokens().to_string(),
                u.total.tokens().to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "ID", "CREATED", "EXPIRES", "STATUS", "POLICY", "MODELS", "TODAY", "MONTH",
            "TOTAL",
        ],
        &rows,
    );
    Ok(())
}

fn show(config_path: &Path, name: &str, json: bool) -> Result<(), CliError> {
    let (config, store) = open_with_config(config_path)?;
    let k = store.get(name).map_err(store_error)?;
    let now = SystemTime::now();
    let usage = usages(store, &[&k], now)?.remove(0);
    if json {
        print_json(&record_json(&k, &usage, now, &config));
        return Ok(());
    }
    println!("name:            {}", k.name);
    println!("id:              {}", k.id);
    println!("status:          {}", k.status(now).as_str());
    print_key_times(&k);
    // What the gateway enforces: the key's own settings over its named policy.
    print_effective_policy(&k.policy.resolve(&config.policies), &config);
    print_usage(&usage);
    Ok(())
}

/// The `show` lines of the key's life: created, expires, revoked, rotated.
fn print_key_times(k: &KeyRecord) {
    println!("created:         {}", rfc3339(k.created_at));
    println!(
        "expires:         {}",
        k.expires_at.map_or("never".into(), rfc3339)
    );
    if let Some(t) = k.revoked_at {
        println!("revoked:         {}", rfc3339(t));
    }
    if let Some(t) = k.rotated_at {
        println!("rotated:         {}", rfc3339(t));
    }
    if let Some(t) = k.previous_valid_until {
        println!("old secret until {}", rfc3339(t));
    }
}

/// The `show` lines of the policy the gateway enforces for a key (already resolved).
fn print_effective_policy(p: &KeyPolicy, config: &Config) {
    let or_all = |v: Vec<String>| {
        if v.is_empty() {
            "all".to_string()
        } else {
            v.join(",")
        }
    };
    let limit = |v: Option<u32>| v.map_or("none".to_string(), |n| n.to_string());
    match (&p.policy, p.missing_policy) {
        (Some(n), false) => println!("policy:          {n} (fields set on the key override it)"),
        (Some(n), true) => println!(
            "policy:          {n} — NOT DEFINED in {}: every request is refused; fix: add [[policy]] name = \"{n}\"",
            config.path.display()
        ),
        (None, _) => println!("policy:          none (the key's own settings)"),
    }
    println!("models:          {}", or_all(p.models.clone()));
    println!(
        "endpoints:       {}",
        or_all(p.endpoints.iter().map(ToString::to_string).collect())
    );
    println!(
        "allowed sources: {}",
        if p.allow_cidrs.is_empty() {
            "any".to_string()
        } else {
            p.allow_cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        }
    );
    println!("rpm:             {}", limit(p.rpm));
    println!("tpm:             {}", limit(p.tpm));
    println!("max concurrent:  {}", limit(p.max_concurrent));
    println!(
        "budget:          {}",
        p.budget.map_or("none".into(), |b| format!(
            "{}/{}",
            b.tokens,
            period(b.period)
        ))
    );
}

/// The `show` lines of a key's token usage.
fn print_usage(usage: &KeyUsage) {
    let line = |t: &UsageTotals| {
        let mut s = format!(
            "{} tokens ({} prompt, {} completion) in {} requests",
            t.tokens(),
            t.prompt_tokens,
            t.completion_tokens,
            t.requests
        );
        if t.estimated > 0 {
            s.push_str(&format!(", {} estimated", t.estimated));
        }
        s
    };
    println!("usage today:     {}", line(&usage.today));
    println!("usage month:     {}", line(&usage.this_month));
    println!("usage total:     {}", line(&usage.total));
}

fn revoke(config_path: &Path, name: &str, yes: bool) -> Result<(), CliError> {
    let mut store = open_store(config_path)?;
    if !yes {
        // Look the key up first so a typo fails before the question.
        let k = store.get(name).map_err(store_error)?;
        if !std::io::stdin().is_terminal() {
            return Err(CliError::usage(format!(
                "key revoke {name}: needs confirmation and stdin is not a terminal; fix: pass --yes"
            )));
        }
        if !confirm(&format!(
            "Revoke key {:?} (id {})? Clients using it get 401 within a second.",
            k.name, k.id
        )) {
            return Err(CliError::runtime(format!(
                "key {name:?}: not revoked (not confirmed); fix: answer y, or pass --yes"
            )));
        }
    }
    let k = store.revoke(name).map_err(store_error)?;
    println!("revoked key {:?} (id {})", k.name, k.id);
    Ok(())
}

fn confirm(question: &str) -> bool {
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    if std::io::stdin().lock().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes")
}

fn period(p: BudgetPeriod) -> &'static str {
    match p {
        BudgetPeriod::Day => "day",
        BudgetPeriod::Month => "month",
    }
}

/// The policy as shown to operators and scripts (expiry is a top-level field). `name` is the
/// named policy the key builds on (null: none); `list`/`show` print the effective policy.
fn policy_json(p: &KeyPolicy) -> Value {
    json!({
        "name": p.policy,
        "models": p.models,
        "endpoints": p.endpoints.iter().map(|e| e.as_str()).collect::<Vec<_>>(),
        "allow_cidrs": p.allow_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "rpm": p.rpm,
        "tpm": p.tpm,
        "max_concurrent": p.max_concurrent,
        "budget": p.budget.map(|b| json!({"tokens": b.tokens, "period": period(b.period)})),
    })
}

/// Usage totals for scripts; `estimated_requests` counts requests whose upstream reported no
/// usage (their tokens are the gateway's estimate).
fn usage_json(t: &UsageTotals) -> Value {
    json!({
        "tokens": t.tokens(),
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "requests": t.requests,
        "estimated_requests": t.estimated,
    })
}

fn record_json(k: &KeyRecord, usage: &KeyUsage, now: SystemTime, config: &Config) -> Value {
    let effective = k.policy.resolve(&config.policies);
    json!({
        "id": k.id,
        "name": k.name,
        "status": k.status(now).as_str(),
        "created_at": rfc3339(k.created_at),
        "expires_at": k.expires_at.map(rfc3339),
        "revoked_at": k.revoked_at.map(rfc3339),
        "rotated_at": k.rotated_at.map(rfc3339),
        "previous_valid_until": k.previous_valid_until.map(rfc3339),
        "policy": policy_json(&effective),
        "policy_defined": !effective.missing_policy,
        "usage_today": usage_json(&usage.today),
        "usage_month": usage_json(&usage.this_month),
        "usage_total": usage_json(&usage.total),
    })
}

fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<KeyCommand, clap::Error> {
        let cli = Cli::try_parse_from(["modelgate", "key"].iter().chain(args))?;
        match cli.command {
            Command::Key(k) => Ok(k),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn create_flags_parse_into_a_policy() {
        let cmd = parse(&[
            "create",
            "alice",
            "--models",
            "a,b*",
            "--endpoints",
            "chat_completions,embeddings",
            "--allow-cidr",
            "10.0.0.0/8",
            "--allow-cidr",
            "::1",
            "--rpm",
            "1",
            "--tpm",
            "2",
            "--max-concurrent",
            "3",
            "--budget",
            "4/month",
            "--expires",
            "30d",
            "--json",
        ])
        .unwrap();
        let KeyCommand::Create(a) = cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(a.models.unwrap().0, vec!["a", "b*"]);
        assert_eq!(
            a.endpoints.unwrap().0,
            vec![Endpoint::ChatCompletions, Endpoint::Embeddings]
        );
        assert_eq!(a.allow_cidrs.len(), 2);
        assert_eq!(
            (a.rpm, a.tpm, a.max_concurrent),
            (Some(1), Some(2), Some(3))
        );
        assert_eq!(
            a.budget,
            Some(Budget {
                tokens: 4,
                period: BudgetPeriod::Month
            })
        );
        assert_eq!(
            a.expires,
            Some(Expiry::After(Duration::from_secs(30 * 86_400)))
        );
        assert!(a.json);
    }

    #[test]
    fn bad_values_are_usage_errors_naming_the_flag() {
        for args in [
            &["create", "x", "--budget", "5/week"][..],
            &["create", "x", "--rpm=-1"],
            &["create", "-bad"],
            &["rotate", "x", "--grace", "later"],
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
        let e = parse(&["create", "x", "--budget", "5/week"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--budget") && e.contains("5/week") && e.contains("fix:"),
            "{e}"
        );
    }
}
