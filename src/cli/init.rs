//! `modelgate init`: first-time setup of one appliance.
//!
//! Owns creating the state directory (0700), the appliance key pair (private key in a 0600
//! file, written atomically) and the commented config file. Refuses to overwrite a config
//! without `--force`. An existing valid `wg.key` is kept, never replaced: peers already trust its
//! public key (delete the file to rotate the identity). The private key is never printed.

use clap::Args;
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{now_rfc3339, print_json, CliError};
use crate::config::edit::{render_initial, InitSettings, InitTls};
use crate::config::{
    check_dns_name, check_tunnel_address, parse_endpoint, read_key_file, Config,
    DEFAULT_CONTROL_SOCKET, DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN, DEFAULT_PRIVATE_KEY_FILE,
    DEFAULT_STATE_DIR, DEFAULT_TUNNEL_ADDRESS, DEFAULT_WG_LISTEN,
};
use crate::fsutil::{create_dir_with_mode, write_atomic};
use crate::wgkey::PrivateKey;

#[derive(Debug, Args)]
pub struct InitArgs {
    /// HOST:PORT that corp peers dial: this appliance's public DNS name or IP and UDP port.
    #[arg(long, value_name = "HOST:PORT", value_parser = endpoint_arg)]
    pub public_endpoint: String,
    /// HTTPS listener.
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_LISTEN, value_parser = socket_arg)]
    pub listen: SocketAddr,
    /// WireGuard UDP listener.
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_WG_LISTEN, value_parser = socket_arg)]
    pub wg_listen: SocketAddr,
    /// The appliance's tunnel address and the tunnel network peers are allocated from.
    #[arg(long, value_name = "IP/PREFIX", default_value = DEFAULT_TUNNEL_ADDRESS, value_parser = tunnel_arg)]
    pub tunnel_address: String,
    /// State directory (created mode 0700; holds wg.key and peer keys).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Unix socket of the local control API.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,
    /// Prometheus metrics listener.
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_METRICS_LISTEN, value_parser = socket_arg)]
    pub metrics_listen: SocketAddr,
    /// TLS from PEM files: certificate chain (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key", conflicts_with_all = ["self_signed", "acme_domain"])]
    pub tls_cert: Option<PathBuf>,
    /// TLS from PEM files: private key (with --tls-cert).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// TLS with a self-signed certificate for DNSNAME (tests only; the default, named after
    /// the --public-endpoint host).
    #[arg(long, value_name = "DNSNAME", value_parser = dns_arg, conflicts_with = "acme_domain")]
    pub self_signed: Option<String>,
    /// TLS from ACME (TLS-ALPN-01) for this public DNS name.
    #[arg(long, value_name = "DNSNAME", value_parser = dns_arg)]
    pub acme_domain: Option<String>,
    /// ACME account contact.
    #[arg(long, value_name = "EMAIL", requires = "acme_domain", value_parser = email_arg)]
    pub acme_email: Option<String>,
    /// ACME directory URL (default: Let's Encrypt production).
    #[arg(long, value_name = "URL", requires = "acme_domain", value_parser = url_arg)]
    pub acme_directory: Option<String>,
    /// Extra PEM root CA for the ACME directory (test CAs such as Pebble).
    #[arg(long, value_name = "PEMFILE", requires = "acme_domain")]
    pub acme_ca_root: Option<PathBuf>,
    /// Use a shared PostgreSQL store (several appliances): postgres://USER@HOST:PORT/DB
    /// (no password in it). The first appliance records its keys.secret's fingerprint there;
    /// copy that keys.secret into the --state-dir of every other appliance before its init.
    #[arg(long, value_name = "URL", value_parser = super::store::url_arg)]
    pub store_url: Option<String>,
    /// File with the store's database password, mode 0600 (with --store-url).
    #[arg(long, value_name = "FILE", requires = "store_url")]
    pub store_password_file: Option<PathBuf>,
    /// PEM of the CA that signed the database server's certificate (with --store-url).
    #[arg(long, value_name = "FILE", requires = "store_url")]
    pub store_ca_file: Option<PathBuf>,
    /// Overwrite an existing config file (its peers are dropped; wg.key is kept).
    #[arg(long)]
    pub force: bool,
    /// Print {"public_key","config","endpoint",…} as JSON.
    #[arg(long)]
    pub json: bool,
}

fn endpoint_arg(s: &str) -> Result<String, String> {
    parse_endpoint(s).map(|_| s.to_string()).map_err(|p| {
        format!("{p}; fix: pass HOST:PORT, e.g. gw.example.com:51820 or [2001:db8::1]:51820")
    })
}

pub(crate) fn socket_arg(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        "not an IP:PORT socket address; fix: pass e.g. 0.0.0.0:443 or [::]:443 (no host names)"
            .to_string()
    })
}

fn tunnel_arg(s: &str) -> Result<String, String> {
    check_tunnel_address(s)
        .map(|_| s.to_string())
        .map_err(|(problem, fix)| format!("{problem}; fix: {fix}"))
}

fn dns_arg(s: &str) -> Result<String, String> {
    check_dns_name(s)
        .map(|()| s.to_string())
        .map_err(|p| format!("{p}; fix: pass the DNS name clients use, e.g. gw.example.com"))
}

fn email_arg(s: &str) -> Result<String, String> {
    match s.split_once('@') {
        Some((l, d)) if !l.is_empty() && !d.is_empty() => Ok(s.to_string()),
        _ => Err("not an e-mail address; fix: pass e.g. ops@example.com".into()),
    }
}

fn url_arg(s: &str) -> Result<String, String> {
    if s.starts_with("https://") || s.starts_with("http://") {
        Ok(s.to_string())
    } else {
        Err(
            "not an http(s) URL; fix: pass e.g. https://acme-v02.api.letsencrypt.org/directory"
                .into(),
        )
    }
}

fn absolute(p: &Path, flag: &str) -> Result<PathBuf, CliError> {
    std::path::absolute(p).map_err(|e| {
        CliError::usage(format!(
            "{flag} {}: {e}; fix: pass an absolute path",
            p.display()
        ))
    })
}

fn path_str(p: &Path, flag: &str) -> Result<String, CliError> {
    p.to_str().map(str::to_string).ok_or_else(|| {
        CliError::usage(format!(
            "{flag} {}: not valid UTF-8; fix: use a UTF-8 path",
            p.display()
        ))
    })
}

/// An existing state directory is not chmod'ed (it may be shared); say so if others can read it.
fn warn_if_open(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(dir) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            eprintln!(
                "warning: --state-dir {}: mode {mode:04o} lets others list it; fix: chmod 700 {}",
                dir.display(),
                dir.display()
            );
        }
    }
}

pub fn execute(config_path: &Path, a: InitArgs) -> Result<(), CliError> {
    if config_path.exists() && !a.force {
        return Err(CliError::runtime(format!(
            "--config {}: already exists; fix: pass --force to overwrite it (its [[peer]] tables are dropped), or choose another --config",
            config_path.display()
        )));
    }
    let state_dir = absolute(&a.state_dir, "--state-dir")?;
    let tls = tls_choice(&a)?;
    let (key_file, key, reused) = prepare_state_dir(&state_dir)?;
    let public_key = key.public_key();

    let settings = InitSettings {
        listen: a.listen.to_string(),
        state_dir: path_str(&state_dir, "--state-dir")?,
        control_socket: path_str(&a.control_socket, "--control-socket")?,
        metrics_listen: a.metrics_listen.to_string(),
        tls,
        wg_listen: a.wg_listen.to_string(),
        public_endpoint: a.public_endpoint.clone(),
        tunnel_address: a.tunnel_address.clone(),
        public_key: public_key.to_base64(),
        generated: now_rfc3339(),
    };
    let mut text = render_initial(&settings);
    if let Some(url) = &a.store_url {
        let pw = a
            .store_password_file
            .as_deref()
            .map(|p| super::store::absolute_path(p, "--store-password-file"))
            .transpose()?;
        let ca = a
            .store_ca_file
            .as_deref()
            .map(|p| super::store::absolute_path(p, "--store-ca-file"))
            .transpose()?;
        text = crate::config::edit::set_store(&text, url, pw.as_deref(), ca.as_deref())
            .map_err(|e| CliError::usage(e.to_string()))?;
        // Reach the store now (and record or check the server secret's fingerprint), so a
        // wrong URL, password or secret is said here, before a config is written.
        let store = crate::keys::StoreConfig::Postgres(crate::keys::PgStoreConfig {
            url: url.clone(),
            password_file: pw.map(PathBuf::from),
            ca_file: ca.map(PathBuf::from),
        });
        crate::keys::KeyStore::open_in(&state_dir, &store)
            .map_err(|e| CliError::runtime(format!("--store-url: {e} (no config written)")))?;
    }
    // The flags were checked one by one; this catches combinations (and keeps init honest).
    Config::from_toml_str(&text, config_path).map_err(|e| CliError::usage(e.to_string()))?;
    write_config(config_path, &text)?;

    let config_shown = std::path::absolute(config_path).unwrap_or(config_path.to_path_buf());
    if a.json {
        print_json(&json!({
            "public_key": public_key.to_base64(),
            "config": config_shown,
            "endpoint": a.public_endpoint,
            "private_key_file": key_file,
            "private_key_reused": reused,
        }));
    } else {
        println!("wrote {}", config_shown.display());
        println!(
            "private key: {} (mode 0600, {})",
            key_file.display(),
            if reused {
                "existing key kept"
            } else {
                "generated"
            }
        );
        println!("public key: {public_key}");
        println!("endpoint: {}", a.public_endpoint);
        println!(
            "next: modelgate --config {} peer add corp --allowed-ips 10.20.0.0/24 > corp.conf",
            config_shown.display()
        );
    }
    Ok(())
}

/// The `[tls]` table the flags ask for: files, ACME, a self-signed name, or by default a
/// self-signed certificate for the name peers and clients already use.
fn tls_choice(a: &InitArgs) -> Result<InitTls, CliError> {
    Ok(
        match (&a.tls_cert, &a.tls_key, &a.self_signed, &a.acme_domain) {
            (Some(cert), Some(key), _, _) => InitTls::Files {
                cert: path_str(&absolute(cert, "--tls-cert")?, "--tls-cert")?,
                key: path_str(&absolute(key, "--tls-key")?, "--tls-key")?,
            },
            (_, _, _, Some(domain)) => InitTls::Acme {
                domain: domain.clone(),
                email: a.acme_email.clone(),
                directory: a.acme_directory.clone(),
                ca_root: match &a.acme_ca_root {
                    Some(p) => Some(path_str(&absolute(p, "--acme-ca-root")?, "--acme-ca-root")?),
                    None => None,
                },
            },
            (_, _, Some(name), _) => InitTls::SelfSigned { name: name.clone() },
            _ => {
                let (host, _) = parse_endpoint(&a.public_endpoint).map_err(CliError::usage)?;
                InitTls::SelfSigned { name: host }
            }
        },
    )
}

/// Creates the state directory (0700) and its WireGuard private key, or keeps the key that is
/// there. Returns the key file, the key, and whether it was kept.
fn prepare_state_dir(state_dir: &Path) -> Result<(PathBuf, PrivateKey, bool), CliError> {
    let created = create_dir_with_mode(state_dir, 0o700).map_err(|e| {
        CliError::runtime(format!(
            "--state-dir {}: cannot create it: {e}; fix: run as root or pass a writable --state-dir",
            state_dir.display()
        ))
    })?;
    if !created {
        warn_if_open(state_dir);
    }
    let key_file = state_dir.join(DEFAULT_PRIVATE_KEY_FILE);
    if key_file.exists() {
        let key = read_key_file(&key_file).map_err(|e| {
            CliError::runtime(format!(
                "{e} (init keeps an existing key; delete the file to generate a new one)"
            ))
        })?;
        return Ok((key_file, key, true));
    }
    let key = PrivateKey::generate();
    write_atomic(
        &key_file,
        format!("{}\n", key.to_base64()).as_bytes(),
        0o600,
    )
    .map_err(|e| {
        CliError::runtime(format!(
            "cannot write {}: {e}; fix: make --state-dir writable",
            key_file.display()
        ))
    })?;
    Ok((key_file, key, false))
}

/// Writes the config file atomically (mode 0644), creating its directory.
fn write_config(config_path: &Path, text: &str) -> Result<(), CliError> {
    if let Some(dir) = config_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dir_with_mode(dir, 0o755).map_err(|e| {
            CliError::runtime(format!(
                "--config {}: cannot create {}: {e}; fix: run as root or choose a writable --config",
                config_path.display(),
                dir.display()
            ))
        })?;
    }
    write_atomic(config_path, text.as_bytes(), 0o644).map_err(|e| {
        CliError::runtime(format!(
            "--config {}: cannot write: {e}; fix: run as root or choose a writable --config",
            config_path.display()
        ))
    })
}
