//! Per-key access policy: pure decisions with an injected clock.
//!
//! Owns "may this principal do this now?" and the parsing of the policy flags of `modelgate key
//! create` ([`parse`]). Never does I/O and never reads a clock itself: callers pass `now`.
//! Rate limits, concurrency and budgets are decided by [`limits::Limiter`], which the gateway
//! consults after [`check_access`].

pub mod limits;
pub mod parse;

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

impl Endpoint {
    /// Every endpoint, in the order `--endpoints` documents them.
    pub const ALL: [Endpoint; 5] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
        Endpoint::Models,
    ];

    /// The name used in `--endpoints`, JSON and the store (`chat_completions`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Models => "models",
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    /// Accepts the snake_case name, with `-` for `_`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        Endpoint::ALL
            .into_iter()
            .find(|e| e.as_str() == norm)
            .ok_or_else(|| {
                format!(
                    "unknown endpoint {s:?}; fix: use some of {}",
                    Endpoint::ALL.map(Endpoint::as_str).join(",")
                )
            })
    }
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
///
/// Stored as JSON (serde) in the key store; `expires_at` mirrors the store's `expires_at`
/// column, which is authoritative when the key ring is loaded.
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
    /// Named policy (`[[policy]]` in the config) this key builds on; the fields set on the key
    /// itself override the named policy's (see [`KeyPolicy::overlay`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Set when the key names a policy the config does not define: every request is refused
    /// (fail closed) until the config or the key is fixed. Never stored.
    #[serde(skip)]
    pub missing_policy: bool,
}

/// Named policies from the config, by name.
pub type Policies = std::collections::BTreeMap<String, KeyPolicy>;

impl KeyPolicy {
    /// The effective policy of a key that names a policy: each field the key sets (a `Some`, a
    /// non-empty list) wins, every other field comes from `base`. Expiry is always the key's
    /// own. So `--policy dev --rpm 120` is the `dev` policy with a higher RPM.
    pub fn overlay(&self, base: &KeyPolicy) -> KeyPolicy {
        fn list<T: Clone>(own: &[T], base: &[T]) -> Vec<T> {
            if own.is_empty() {
                base.to_vec()
            } else {
                own.to_vec()
            }
        }
        KeyPolicy {
            models: list(&self.models, &base.models),
            endpoints: list(&self.endpoints, &base.endpoints),
            expires_at: self.expires_at,
            allow_cidrs: list(&self.allow_cidrs, &base.allow_cidrs),
            rpm: self.rpm.or(base.rpm),
            tpm: self.tpm.or(base.tpm),
            max_concurrent: self.max_concurrent.or(base.max_concurrent),
            budget: self.budget.or(base.budget),
            policy: self.policy.clone(),
            missing_policy: false,
        }
    }

    /// This key's effective policy given the config's named `policies`.
    pub fn resolve(&self, policies: &Policies) -> KeyPolicy {
        match &self.policy {
            None => self.clone(),
            Some(name) => match policies.get(name) {
                Some(base) => self.overlay(base),
                None => KeyPolicy {
                    missing_policy: true,
                    ..self.clone()
                },
            },
        }
    }
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
    #[error("this API key refers to policy `{0}`, which the gateway does not define; ask your administrator to fix the key or the config")]
    UnknownPolicy(String),
}

/// Decides whether `p` may call `endpoint` for `model` from `client` at `now`.
///
/// A key expires at `expires_at` exactly (`now >= expires_at`). An IPv4-mapped IPv6 client
/// (`::ffff:a.b.c.d`, what a dual-stack `[::]` listener reports) is matched as IPv4.
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
    if pol.missing_policy {
        return Err(Deny::UnknownPolicy(pol.policy.clone().unwrap_or_default()));
    }
    let client = client.to_canonical();
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
    // Model names are ASCII in practice: match bytes without allocating (this runs for every
    // request and every glob of the key). Anything else is matched by characters.
    if pattern.is_ascii() && text.is_ascii() {
        glob(pattern.as_bytes(), text.as_bytes(), b'*', b'?')
    } else {
        let p: Vec<char> = pattern.chars().collect();
        let t: Vec<char> = text.chars().collect();
        glob(&p, &t, '*', '?')
    }
}

/// Iterative wildcard matching with one backtrack point (linear for a single `*`, O(p·t) at
/// worst), no recursion.
fn glob<T: PartialEq + Copy>(p: &[T], t: &[T], any_run: T, any_one: T) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == any_one || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == any_run {
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
    while pi < p.len() && p[pi] == any_run {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests;
