//! Readers for the kinds of value every table has: paths, socket addresses, durations, bounded
//! counts and secret files.
//!
//! Each reader takes the error key and the value as written, pushes one error (with its fix) when
//! the value is unusable and returns what the caller stores. Pure: the one check that touches
//! the file system, [`SecretFileCheck`], is passed in by the caller.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::ConfigErrors;

/// Checks a secret file named in the config (resolved path); `Err((problem, fix))` when unusable.
pub type SecretFileCheck = dyn Fn(&Path) -> Result<(), (String, String)>;

/// A string value as shown in errors: quoted, like in the file.
pub(super) fn q(v: &str) -> String {
    format!("{v:?}")
}

/// The folder relative paths in the config file at `path` resolve against.
pub(super) fn config_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `p` as written, resolved against `base` when relative.
pub(super) fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// An `IP:PORT` setting (`default` when absent; host names are not resolved).
pub(super) fn socket_addr(
    errs: &mut ConfigErrors,
    key: &str,
    v: Option<&str>,
    default: &str,
) -> Option<SocketAddr> {
    let text = v.unwrap_or(default);
    match text.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.push(
                key,
                q(text),
                "not an IP:PORT socket address (host names are not resolved here)",
                format!("write it like \"{default}\" (IPv6: \"[::]:PORT\")"),
            );
            None
        }
    }
}

/// A humantime duration setting (`"10s"`, `"1m 30s"`); zero is refused (it would mean "no time
/// at all", not "no limit").
pub(super) fn duration(
    errs: &mut ConfigErrors,
    key: &str,
    v: Option<&str>,
    default: Duration,
) -> Duration {
    let Some(text) = v else {
        return default;
    };
    let shown_default = humantime::format_duration(default).to_string();
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => {
            errs.push(
                key,
                q(text),
                "must be longer than zero",
                format!("use e.g. \"{shown_default}\" (the default), or remove it"),
            );
            default
        }
        Ok(d) => d,
        Err(e) => {
            errs.push(
                key,
                q(text),
                format!("not a duration ({e})"),
                format!("write a number with a unit, e.g. \"{shown_default}\", \"90s\" or \"2m\""),
            );
            default
        }
    }
}

/// A count or size setting within `min..=max`; `why` follows the range in the error.
pub(super) fn bounded(
    errs: &mut ConfigErrors,
    key: &str,
    v: Option<i64>,
    default: usize,
    min: usize,
    max: usize,
    why: &str,
) -> usize {
    let Some(n) = v else {
        return default;
    };
    match usize::try_from(n) {
        Ok(u) if (min..=max).contains(&u) => u,
        _ => {
            errs.push(
                key,
                n.to_string(),
                format!("must be {min}..={max}{why}"),
                format!("use {default} (the default), or remove it"),
            );
            default
        }
    }
}
