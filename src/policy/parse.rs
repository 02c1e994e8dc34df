//! Parsing of the policy flags of `modelgate key create` (pure; errors say what to pass).
//!
//! Each function returns `Err(message)` where the message describes the problem and ends with
//! `fix: …`; clap prefixes it with the flag and the value, so the operator sees all three.
//! Never reads a clock: [`Expiry::resolve`] takes `now`.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use super::{Budget, BudgetPeriod, Endpoint};

/// `--expires`: a duration from now (`30d`, `12h`) or an instant (RFC 3339).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    After(Duration),
    At(SystemTime),
}

impl Expiry {
    /// The instant the key expires, which must lie after `now`.
    pub fn resolve(self, now: SystemTime) -> Result<SystemTime, String> {
        let at = match self {
            Expiry::After(d) => now.checked_add(d).ok_or_else(|| {
                "is too far in the future; fix: pass e.g. 365d, or omit --expires".to_string()
            })?,
            Expiry::At(t) => t,
        };
        if at <= now {
            return Err(format!(
                "{} is not in the future; fix: pass a later time or a duration such as 30d",
                humantime::format_rfc3339_seconds(at)
            ));
        }
        Ok(at)
    }
}

/// `--expires 30d|12h|2026-01-31|2026-01-31T18:00:00Z|2026-01-31T18:00:00+01:00`.
pub fn parse_expires(s: &str) -> Result<Expiry, String> {
    let s = s.trim();
    if let Ok(d) = humantime::parse_duration(s) {
        if d.is_zero() {
            return Err(
                "a zero duration expires at once; fix: pass e.g. 30d, or omit --expires".into(),
            );
        }
        return Ok(Expiry::After(d));
    }
    parse_instant(s).map(Expiry::At).ok_or_else(|| {
        "neither a duration nor an RFC 3339 time; fix: pass e.g. 30d, 12h, 2026-01-31 or \
         2026-01-31T18:00:00Z"
            .to_string()
    })
}

/// RFC 3339 with `Z` or a numeric offset, `T` or a space; a bare date means 00:00 UTC.
fn parse_instant(s: &str) -> Option<SystemTime> {
    if s.len() == 10 {
        return humantime::parse_rfc3339(&format!("{s}T00:00:00Z")).ok();
    }
    // A trailing `±HH:MM` offset (humantime only knows UTC).
    if s.len() > 19 && s.is_char_boundary(s.len() - 6) {
        let (base, off) = s.split_at(s.len() - 6);
        let ob = off.as_bytes();
        if (ob[0] == b'+' || ob[0] == b'-')
            && ob[3] == b':'
            && [1, 2, 4, 5].iter().all(|&i| ob[i].is_ascii_digit())
        {
            let h = u64::from((ob[1] - b'0') * 10 + (ob[2] - b'0'));
            let m = u64::from((ob[4] - b'0') * 10 + (ob[5] - b'0'));
            if h > 23 || m > 59 {
                return None;
            }
            let local = humantime::parse_rfc3339_weak(base).ok()?;
            let off = Duration::from_secs(h * 3600 + m * 60);
            // Local time = UTC + offset, so UTC = local - offset.
            return if ob[0] == b'+' {
                local.checked_sub(off)
            } else {
                local.checked_add(off)
            };
        }
    }
    humantime::parse_rfc3339_weak(s).ok()
}

/// `--grace 10m`: a duration, `0` allowed (the old secret stops working at once).
pub fn parse_grace(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|_| "not a duration; fix: pass e.g. 10m, 1h or 0".to_string())
}

/// `--budget N/day|N/month` (tokens per UTC day or calendar month; `_` separators allowed).
pub fn parse_budget(s: &str) -> Result<Budget, String> {
    const FIX: &str = "fix: pass tokens per period, e.g. 2000000/day or 50000000/month";
    let (n, period) = s
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("missing /day or /month; {FIX}"))?;
    let period = match period.trim().to_ascii_lowercase().as_str() {
        "day" | "d" => BudgetPeriod::Day,
        "month" | "mo" => BudgetPeriod::Month,
        other => return Err(format!("unknown period {other:?}; {FIX}")),
    };
    let tokens = parse_count(n.trim()).ok_or_else(|| format!("not a token count; {FIX}"))?;
    if tokens == 0 {
        return Err(format!("a zero budget refuses every request; {FIX}"));
    }
    Ok(Budget { tokens, period })
}

fn parse_count(s: &str) -> Option<u64> {
    if s.is_empty() || s.starts_with('_') || s.ends_with('_') {
        return None;
    }
    if !s.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
        return None;
    }
    s.replace('_', "").parse().ok()
}

/// `--rpm`, `--tpm`, `--max-concurrent`: a positive count.
pub fn parse_limit(s: &str) -> Result<u32, String> {
    match parse_count(s.trim()).map(u32::try_from) {
        Some(Ok(n)) if n > 0 => Ok(n),
        Some(Ok(_)) => Err(
            "0 would refuse every request; fix: pass a positive number, or omit the flag".into(),
        ),
        _ => Err(format!(
            "not a whole number from 1 to {}; fix: pass e.g. 60",
            u32::MAX
        )),
    }
}

/// `--models a,b*`: comma-separated model names or globs (`*`, `?`).
pub fn parse_models(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for m in s.split(',').map(str::trim) {
        if m.is_empty() {
            return Err("empty model name; fix: pass e.g. llama-3.1-70b,qwen*".into());
        }
        if m.len() > 256 || m.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{m:?} is not a model name or glob; fix: no spaces, at most 256 characters"
            ));
        }
        if !out.iter().any(|x| x == m) {
            out.push(m.to_string());
        }
    }
    Ok(out)
}

/// `--endpoints chat_completions,embeddings,…`.
pub fn parse_endpoints(s: &str) -> Result<Vec<Endpoint>, String> {
    let mut out = Vec::new();
    for e in s.split(',') {
        let e: Endpoint = e.parse()?;
        if !out.contains(&e) {
            out.push(e);
        }
    }
    Ok(out)
}

/// `--allow-cidr CIDR`: a network, or a bare address meaning just that host. Host bits are
/// cleared (`10.0.0.7/8` → `10.0.0.0/8`).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(a));
    }
    Err("not a CIDR or IP address; fix: pass e.g. 203.0.113.0/24 or 2001:db8::/32".into())
}

#[cfg(test)]
mod tests;
