//! `[tls]`: where the HTTPS certificate comes from. `mode` picks the source and only that
//! mode's keys may be present, so a leftover key of another mode cannot look as if it applied.
//! Never reads the PEM files nor contacts the ACME directory: the TLS plane does, at start.

use std::net::IpAddr;
use std::path::Path;

use super::fields::{q, resolve};
use super::names::check_dns_name;
use crate::config::raw::RawTls;
use crate::config::{ConfigErrors, TlsConfig};

/// Validates `[tls]` (only called when the table is present). `None` when any field is bad.
pub(super) fn validate(errs: &mut ConfigErrors, t: &RawTls, base: &Path) -> Option<TlsConfig> {
    let Some(mode) = t.mode.as_deref() else {
        errs.push(
            "tls.mode",
            "(missing)",
            "required in [tls]",
            "set mode = \"files\", \"self-signed\" or \"acme\"",
        );
        return None;
    };
    let Some(allowed) = keys_of(mode) else {
        errs.push(
            "tls.mode",
            q(mode),
            "unknown TLS mode",
            "set mode = \"files\", \"self-signed\" or \"acme\"",
        );
        return None;
    };
    let before = errs.len();
    for (name, v) in fields(t) {
        if let Some(v) = v {
            if !allowed.contains(&name) {
                errs.push(
                    format!("tls.{name}"),
                    q(v),
                    format!("is not used with mode = \"{mode}\""),
                    "remove it, or change tls.mode",
                );
            }
        }
    }
    let tls = match mode {
        "files" => files(errs, t, base),
        "self-signed" => self_signed(errs, t),
        _ => acme(errs, t, base),
    };
    (errs.len() == before).then_some(tls).flatten()
}

/// The keys a mode uses; `None` for an unknown mode.
fn keys_of(mode: &str) -> Option<&'static [&'static str]> {
    Some(match mode {
        "files" => &["cert", "key", "mode"],
        "self-signed" => &["self_signed_name", "mode"],
        "acme" => &[
            "acme_domain",
            "acme_email",
            "acme_directory",
            "acme_ca_root",
            "mode",
        ],
        _ => return None,
    })
}

/// Every key of the table with its value, in the order unused keys are reported.
fn fields(t: &RawTls) -> [(&'static str, &Option<String>); 8] {
    [
        ("cert", &t.cert),
        ("key", &t.key),
        ("self_signed_name", &t.self_signed_name),
        ("acme_domain", &t.acme_domain),
        ("acme_email", &t.acme_email),
        ("acme_directory", &t.acme_directory),
        ("acme_ca_root", &t.acme_ca_root),
        ("mode", &t.mode),
    ]
}

/// A key `mode` cannot do without: present and not empty.
fn required(
    errs: &mut ConfigErrors,
    mode: &str,
    key: &str,
    v: &Option<String>,
    example: &str,
) -> Option<String> {
    match v.as_deref() {
        Some(s) if !s.is_empty() => Some(s.to_string()),
        _ => {
            errs.push(
                format!("tls.{key}"),
                v.as_deref().map(q).unwrap_or("(missing)".into()),
                format!("required with mode = \"{mode}\""),
                format!("add {key} = {example}"),
            );
            None
        }
    }
}

fn files(errs: &mut ConfigErrors, t: &RawTls, base: &Path) -> Option<TlsConfig> {
    let mode = "files";
    let cert = required(
        errs,
        mode,
        "cert",
        &t.cert,
        "\"/etc/modelgate/tls/fullchain.pem\"",
    );
    let key = required(
        errs,
        mode,
        "key",
        &t.key,
        "\"/etc/modelgate/tls/privkey.pem\"",
    );
    Some(TlsConfig::Files {
        cert: resolve(base, &cert?),
        key: resolve(base, &key?),
    })
}

fn self_signed(errs: &mut ConfigErrors, t: &RawTls) -> Option<TlsConfig> {
    let name = required(
        errs,
        "self-signed",
        "self_signed_name",
        &t.self_signed_name,
        "\"gw.example.com\"",
    )?;
    if name.parse::<IpAddr>().is_err() {
        if let Err(p) = check_dns_name(&name) {
            errs.push(
                "tls.self_signed_name",
                q(&name),
                p,
                "use the DNS name (or IP) clients connect to",
            );
        }
    }
    Some(TlsConfig::SelfSigned { name })
}

fn acme(errs: &mut ConfigErrors, t: &RawTls, base: &Path) -> Option<TlsConfig> {
    let domain = required(
        errs,
        "acme",
        "acme_domain",
        &t.acme_domain,
        "\"gw.example.com\"",
    )?;
    if let Err(p) = check_dns_name(&domain) {
        errs.push(
            "tls.acme_domain",
            q(&domain),
            p,
            "use the public DNS name that points at this appliance",
        );
    }
    if let Some(e) = &t.acme_email {
        let ok = e
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty());
        if !ok {
            errs.push(
                "tls.acme_email",
                q(e),
                "not an e-mail address",
                "use an address like \"ops@example.com\", or remove it",
            );
        }
    }
    if let Some(d) = &t.acme_directory {
        if !(d.starts_with("https://") || d.starts_with("http://")) {
            errs.push(
                "tls.acme_directory",
                q(d),
                "not an http(s) URL",
                "use e.g. \"https://acme-v02.api.letsencrypt.org/directory\", or remove it for the default",
            );
        }
    }
    Some(TlsConfig::Acme {
        domain,
        email: t.acme_email.clone(),
        directory: t.acme_directory.clone(),
        ca_root: t.acme_ca_root.as_deref().map(|p| resolve(base, p)),
    })
}
