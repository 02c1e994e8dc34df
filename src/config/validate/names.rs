//! The names the config uses: entry names (`[[peer]]`, `[[upstream]]`, `[[policy]]`) and DNS
//! host names.
//!
//! Owns their syntax, the uniqueness of entry names within a table, and how errors refer to a
//! field of an entry (by its name while that is valid, by position otherwise). Shared by every
//! table validator; depends on none of them.

use std::collections::HashMap;

use super::fields::q;
use crate::config::ConfigErrors;

/// Checks a peer name: `[a-z0-9][a-z0-9-]{0,31}` (it becomes a file name and a wg interface hint).
pub fn check_peer_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ok {
        Ok(())
    } else {
        Err("must be 1-32 characters of a-z, 0-9 and '-', starting with a letter or digit".into())
    }
}

/// Checks an upstream name: same rules as peer names (it appears in logs, metrics and the CLI).
pub fn check_upstream_name(name: &str) -> Result<(), String> {
    check_peer_name(name)
}

/// Checks a DNS host name: dot-separated labels of letters, digits and inner hyphens.
pub fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the host name is empty".into());
    }
    if name.len() > 253 {
        return Err("the host name is longer than 253 characters".into());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{name:?} is not a valid DNS name (label {label:?})"
            ));
        }
    }
    Ok(())
}

/// How the entries of one array of tables (peer, upstream, policy) are named.
pub(super) struct NameRule {
    /// The table, as errors call an entry: `peer`, `upstream`, `policy`.
    pub kind: &'static str,
    pub check: fn(&str) -> Result<(), String>,
    /// Shown in `add name = "…"` when the name is missing.
    pub example: &'static str,
    /// Shown in `rename it, e.g. …` when the name is malformed.
    pub examples: &'static str,
}

impl NameRule {
    /// The error key of `field` in entry `i` (0-based) called `name`: `peer "corp".public_key`,
    /// or `peer #2.public_key` while the name is missing or malformed.
    pub fn key(&self, i: usize, name: Option<&str>, field: &str) -> String {
        match name {
            Some(n) if (self.check)(n).is_ok() => format!("{} \"{n}\".{field}", self.kind),
            _ => format!("{} #{}.{field}", self.kind, i + 1),
        }
    }

    /// Validates the `name` of entry `i`: present, well-formed and unique among `names` (which
    /// records the first entry using each name). Returns the name when usable; a duplicate is
    /// reported and still returned (the other fields are checked under it).
    pub fn unique<'a>(
        &self,
        errs: &mut ConfigErrors,
        i: usize,
        name: Option<&'a str>,
        names: &mut HashMap<&'a str, usize>,
    ) -> Option<String> {
        let (kind, key) = (self.kind, self.key(i, name, "name"));
        let Some(n) = name else {
            errs.push(
                key,
                "(missing)",
                format!("every {kind} needs a name"),
                format!("add name = \"{}\"", self.example),
            );
            return None;
        };
        if let Err(problem) = (self.check)(n) {
            errs.push(
                key,
                q(n),
                problem,
                format!("rename it, e.g. {}", self.examples),
            );
            return None;
        }
        if let Some(first) = names.insert(n, i) {
            errs.push(
                key,
                q(n),
                format!("also used by {kind} #{}", first + 1),
                format!("give each {kind} a unique name"),
            );
        }
        Some(n.to_string())
    }
}
