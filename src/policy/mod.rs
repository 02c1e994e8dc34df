//! Per-key access policy: pure decisions with an injected clock. (Being built.)
//!
//! Owns "may this principal do this now?"; never does I/O and never reads a clock itself.

use std::net::IpAddr;
use std::time::SystemTime;

use ipnet::IpNet;

/// The OpenAI endpoints the gateway serves; keys may be limited to some of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Models,
}

/// Token budget period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    Day,
    Month,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Budget {
    pub tokens: u64,
    pub period: BudgetPeriod,
}

/// What one key may do. Empty lists mean "no restriction".
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeyPolicy {
    /// Model globs (`*` and `?`), matched against the public model name.
    pub models: Vec<String>,
    pub endpoints: Vec<Endpoint>,
    pub expires_at: Option<SystemTime>,
    pub allow_cidrs: Vec<IpNet>,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub budget: Option<Budget>,
}

/// An authenticated caller. `id` is the public key id (safe to log); the secret is never here.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub id: String,
    pub name: String,
    pub policy: KeyPolicy,
}

/// Why a request was refused; each maps to one HTTP status in the gateway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Deny {
    #[error("this API key has expired")]
    Expired,
    #[error("this API key may not use the model `{0}`")]
    ModelNotAllowed(String),
    #[error("this API key may not use this endpoint")]
    EndpointNotAllowed,
    #[error("requests with this API key are not allowed from this address")]
    SourceNotAllowed,
}

/// Decides whether `p` may call `endpoint` for `model` from `client` at `now`.
pub fn check_access(
    p: &Principal,
    endpoint: Endpoint,
    model: Option<&str>,
    client: IpAddr,
    now: SystemTime,
) -> Result<(), Deny> {
    let pol = &p.policy;
    if pol.expires_at.is_some_and(|t| now >= t) {
        return Err(Deny::Expired);
    }
    if !pol.allow_cidrs.is_empty() && !pol.allow_cidrs.iter().any(|n| n.contains(&client)) {
        return Err(Deny::SourceNotAllowed);
    }
    if !pol.endpoints.is_empty() && !pol.endpoints.contains(&endpoint) {
        return Err(Deny::EndpointNotAllowed);
    }
    if let Some(m) = model {
        if !model_allowed(pol, m) {
            return Err(Deny::ModelNotAllowed(m.to_string()));
        }
    }
    Ok(())
}

/// Whether the policy's model globs admit `model`.
pub fn model_allowed(pol: &KeyPolicy, model: &str) -> bool {
    pol.models.is_empty() || pol.models.iter().any(|g| glob_match(g, model))
}

/// `*` matches any run (also empty), `?` one character; everything else literally.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}
