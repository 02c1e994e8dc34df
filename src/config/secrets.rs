//! Secret files named by the config: the appliance's WireGuard key, peer keys and the upstreams'
//! API key files.
//!
//! Owns the rule every secret file follows (a regular file, no group or other permission) and
//! reading the secret once that holds. Never puts a secret's content into an error or a log.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::WireguardConfig;
use crate::wgkey::PrivateKey;

/// Checks a secret file without reading it: it exists, is a regular file, and neither group nor
/// others have any permission on it. Only metadata is needed, so `modelgate` verbs run by an
/// operator who cannot read the file still validate the config. Error: `(problem, fix)`.
pub(crate) fn check_secret_file(path: &Path) -> Result<(), (String, String)> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| {
        (
            e.to_string(),
            format!("write the model server's API key to {shown} and `chmod 600 {shown}`, or remove api_key_file"),
        )
    })?;
    if !meta.is_file() {
        return Err((
            "not a regular file".into(),
            "point api_key_file at a file holding only the API key".into(),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err((
            format!("mode {mode:04o} lets group/others read the API key"),
            format!("chmod 600 {shown}"),
        ));
    }
    Ok(())
}

/// Reads an upstream's API key file: mode checked like [`read_key_file`], content trimmed, one
/// token (no inner whitespace: it becomes an HTTP header value). The error names the file and
/// the fix and never contains the file's content.
pub fn read_api_key_file(path: &Path) -> Result<String, String> {
    let shown = path.display();
    check_secret_file(path)
        .map_err(|(problem, fix)| format!("API key file {shown}: {problem}; fix: {fix}"))?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!("API key file {shown}: {e}; fix: make it readable by the modelgate user and chmod 600 {shown}")
    })?;
    let key = text.trim();
    if key.is_empty() {
        return Err(format!(
            "API key file {shown}: is empty; fix: write the model server's API key to it"
        ));
    }
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "API key file {shown}: holds more than one token (spaces, line breaks or control characters inside); fix: leave only the key in the file"
        ));
    }
    Ok(key.to_string())
}

/// Loads the appliance's private key, refusing a file that others can read.
///
/// Checks, in order: the file exists and is a regular file, it has no group/other permission
/// bits (WireGuard's own tools warn about the same), and it holds one base64 key as written by
/// `wg genkey`. The error names the file and the fix; it never contains the file's content.
pub fn load_private_key(wg: &WireguardConfig) -> Result<PrivateKey, String> {
    read_key_file(&wg.private_key_file)
}

/// [`load_private_key`] for any key file (peer keys stored by `peer add` use the same rules).
pub fn read_key_file(file: &Path) -> Result<PrivateKey, String> {
    let shown = file.display();
    let meta = std::fs::metadata(file).map_err(|e| {
        format!(
            "private key file {shown}: {e}; fix: run `modelgate init` to create it, or write the output of `wg genkey` to it and `chmod 600 {shown}`"
        )
    })?;
    if !meta.is_file() {
        return Err(format!(
            "private key file {shown}: not a regular file; fix: point wireguard.private_key_file at a file holding the output of `wg genkey`"
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "private key file {shown}: mode {mode:04o} lets group/others read the key; fix: chmod 600 {shown}"
        ));
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("private key file {shown}: {e}; fix: make it readable by the modelgate user and chmod 600 {shown}"))?;
    text.trim().parse::<PrivateKey>().map_err(|e| {
        format!(
            "private key file {shown}: {e}; fix: write the output of `wg genkey` to it (then chmod 600 {shown}), or rerun `modelgate init --force`"
        )
    })
}
