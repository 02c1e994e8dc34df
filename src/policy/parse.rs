//! Parsing of the policy flags of `modelgate key create` (pure; errors say what to pass).
//!
//! Each function returns `Err(message)` where the message describes the problem and ends with
//! `fix: …`; clap prefixes it with the flag and the value, so the operator sees all three.

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
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn budgets() {
        assert_eq!(
            parse_budget("1000/day"),
            Ok(Budget {
                tokens: 1000,
                period: BudgetPeriod::Day
            })
        );
        assert_eq!(
            parse_budget(" 2_000_000 / Month "),
            Ok(Budget {
                tokens: 2_000_000,
                period: BudgetPeriod::Month
            })
        );
        for bad in [
            "", "1000", "/day", "x/day", "-1/day", "0/day", "1/week", "1/", "_1/day", "1.5/day",
        ] {
            let e = parse_budget(bad).unwrap_err();
            assert!(e.contains("fix:"), "{bad}: {e}");
        }
        assert!(parse_budget("18446744073709551616/day").is_err());
    }

    #[test]
    fn limits() {
        assert_eq!(parse_limit("60"), Ok(60));
        assert_eq!(parse_limit("4_294_967_295"), Ok(u32::MAX));
        for bad in ["0", "", "-1", "4294967296", "1e3", "six"] {
            assert!(parse_limit(bad).unwrap_err().contains("fix:"), "{bad}");
        }
    }

    #[test]
    fn expires_durations() {
        assert_eq!(
            parse_expires("30d"),
            Ok(Expiry::After(Duration::from_secs(30 * 86_400)))
        );
        assert_eq!(
            parse_expires("12h"),
            Ok(Expiry::After(Duration::from_secs(12 * 3600)))
        );
        assert_eq!(
            parse_expires("1h 30m"),
            Ok(Expiry::After(Duration::from_secs(5400)))
        );
        assert!(parse_expires("0s").is_err());
        assert!(parse_expires("soon").unwrap_err().contains("fix:"));
        assert!(parse_expires("").is_err());
    }

    #[test]
    fn expires_instants() {
        let t = UNIX_EPOCH + Duration::from_secs(1_769_882_400); // 2026-01-31T18:00:00Z
        assert_eq!(parse_expires("2026-01-31T18:00:00Z"), Ok(Expiry::At(t)));
        assert_eq!(parse_expires("2026-01-31 18:00:00"), Ok(Expiry::At(t)));
        assert_eq!(
            parse_expires("2026-01-31T19:30:00+01:30"),
            Ok(Expiry::At(t))
        );
        assert_eq!(
            parse_expires("2026-01-31T13:00:00-05:00"),
            Ok(Expiry::At(t))
        );
        assert_eq!(
            parse_expires("2026-01-31"),
            Ok(Expiry::At(t - Duration::from_secs(18 * 3600)))
        );
        for bad in [
            "2026-13-01",
            "2026-01-31T18:00:00+25:00",
            "2026-01-31T18:00:00+0100",
            "2026-01-31T18:00:00éé:00",
            "31/01/2026",
        ] {
            assert!(parse_expires(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn expiry_must_be_in_the_future() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            Expiry::After(Duration::from_secs(5)).resolve(now),
            Ok(now + Duration::from_secs(5))
        );
        assert!(Expiry::At(now).resolve(now).unwrap_err().contains("fix:"));
        assert!(Expiry::At(now - Duration::from_secs(1))
            .resolve(now)
            .is_err());
        assert_eq!(
            Expiry::At(now + Duration::from_secs(1)).resolve(now),
            Ok(now + Duration::from_secs(1))
        );
    }

    #[test]
    fn grace() {
        assert_eq!(parse_grace("0"), Ok(Duration::ZERO));
        assert_eq!(parse_grace("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_grace("10m"), Ok(Duration::from_secs(600)));
        assert!(parse_grace("ten").is_err());
    }

    #[test]
    fn models() {
        assert_eq!(
            parse_models("a, b*,a,qwen?"),
            Ok(vec!["a".into(), "b*".into(), "qwen?".into()])
        );
        assert!(parse_models("").is_err());
        assert!(parse_models("a,,b").is_err());
        assert!(parse_models("a b").is_err());
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoints("chat_completions,embeddings,chat-completions"),
            Ok(vec![Endpoint::ChatCompletions, Endpoint::Embeddings])
        );
        let e = parse_endpoints("chat").unwrap_err();
        assert!(e.contains("chat_completions,completions,embeddings,responses,models"));
        assert!(parse_endpoints("").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.0.0.7/8"), Ok("10.0.0.0/8".parse().unwrap()));
        assert_eq!(
            parse_cidr("203.0.113.5"),
            Ok("203.0.113.5/32".parse().unwrap())
        );
        assert_eq!(
            parse_cidr("2001:db8::1/32"),
            Ok("2001:db8::/32".parse().unwrap())
        );
        assert_eq!(parse_cidr("::1"), Ok("::1/128".parse().unwrap()));
        for bad in ["10.0.0.0/33", "::/129", "example.com", "", "10.0.0/8"] {
            assert!(parse_cidr(bad).unwrap_err().contains("fix:"), "{bad}");
        }
    }
}
