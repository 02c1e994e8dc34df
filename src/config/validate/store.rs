//! `[store]`: the embedded SQLite store (no table, or no `url`) or a shared PostgreSQL one.
//! Only parsed here: never connects and never reads the password file (the store does, at
//! open, and refuses a file other users can read).

use std::path::Path;

use super::fields::{q, resolve};
use crate::config::raw::RawStore;
use crate::config::ConfigErrors;
use crate::keys::{PgStoreConfig, StoreConfig};

pub(super) fn validate(errs: &mut ConfigErrors, s: Option<&RawStore>, base: &Path) -> StoreConfig {
    let Some(s) = s else {
        return StoreConfig::Sqlite;
    };
    let Some(url) = s.url.as_deref() else {
        for (name, v) in [("password_file", &s.password_file), ("ca_file", &s.ca_file)] {
            if let Some(v) = v {
                errs.push(
                    format!("store.{name}"),
                    q(v),
                    "is only used with store.url",
                    "set store.url = \"postgres://…\", or remove it",
                );
            }
        }
        return StoreConfig::Sqlite;
    };
    if let Err((problem, fix)) = PgStoreConfig::check_url(url) {
        // Never echo a URL that holds a password.
        let shown = PgStoreConfig {
            url: url.to_string(),
            password_file: None,
            ca_file: None,
        }
        .display_url();
        errs.push("store.url", q(&shown), problem, fix);
    }
    let path = |name: &str, v: &Option<String>, errs: &mut ConfigErrors| match v.as_deref() {
        Some("") => {
            errs.push(
                format!("store.{name}"),
                "\"\"",
                "is empty",
                "set a path or remove it",
            );
            None
        }
        Some(p) => Some(resolve(base, p)),
        None => None,
    };
    let password_file = path("password_file", &s.password_file, errs);
    let ca_file = path("ca_file", &s.ca_file, errs);
    StoreConfig::Postgres(PgStoreConfig {
        url: url.to_string(),
        password_file,
        ca_file,
    })
}
