//! TLS for the public listener: the certificate source (PEM files or self-signed) and hot reload.
//!
//! Owns turning a validated [`TlsConfig`] into an `Arc<rustls::ServerConfig>` whose certificate
//! comes from a swappable resolver: [`TlsState::reload`] (SIGHUP, the control API) and
//! [`TlsState::watch`] (file changes, e.g. certbot renewals) replace the certificate for NEW
//! handshakes, while established connections keep the session they negotiated. A failed reload
//! keeps serving the previous certificate.
//!
//! Must never: log or return key material, accept a private key file that group/others can read,
//! install a process-wide crypto provider (every config names ring explicitly), or block an async
//! task on file I/O (the watcher reloads on the blocking pool).
//!
//! `mode = "acme"` ([`acme`]): the certificate is obtained and renewed over ACME with
//! TLS-ALPN-01 answered by this same listener; [`TlsState::watch`] runs the renewal task
//! instead of watching files, and the resolver serves challenge certificates to validation
//! handshakes (`acme-tls/1`).

pub mod acme;
pub(crate) mod x509;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::fmt;
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use crate::config::TlsConfig;
use crate::fsutil::{create_dir_with_mode, write_atomic};

/// File name of the generated certificate inside the state directory (mode `self-signed`).
pub const SELF_SIGNED_CERT_FILE: &str = "self-signed.crt";
/// File name of the generated private key inside the state directory (mode 0600).
pub const SELF_SIGNED_KEY_FILE: &str = "self-signed.key";
/// How often [`TlsState::watch`] looks at the certificate files' modification times.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);
/// Validity of a generated self-signed certificate.
const SELF_SIGNED_VALIDITY_DAYS: i64 = 365;
/// A self-signed certificate this close to expiry is replaced (at load, reload or by the
/// watcher), so a restart never starts serving one that is about to lapse.
const SELF_SIGNED_RENEW_BEFORE: Duration = Duration::from_secs(24 * 3600);
/// Certificate and key files larger than this are refused (a chain is a few KiB).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Why a certificate could not be loaded. Every message is one line: what, which file, the fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file is missing, unreadable, insecure or unusable.
    #[error("{what} {}: {problem}; fix: {fix}", path.display())]
    File {
        /// "TLS certificate file" or "TLS private key file".
        what: &'static str,
        path: PathBuf,
        problem: String,
        fix: String,
    },
    /// `tls.mode = "acme"`: the stored ACME state is unusable.
    #[error("ACME: {problem}; fix: {fix}")]
    Acme { problem: String, fix: String },
    /// Generating or storing the self-signed certificate failed.
    #[error("self-signed certificate for {name:?}: {problem}; fix: {fix}")]
    SelfSigned {
        name: String,
        problem: String,
        fix: String,
    },
    /// rustls refused the configuration (a bug, not an operator mistake).
    #[error("TLS setup: {0}; fix: report this bug")]
    Internal(String),
}

const CERT: &str = "TLS certificate file";
const KEY: &str = "TLS private key file";

fn file_err(
    what: &'static str,
    path: &Path,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> TlsError {
    TlsError::File {
        what,
        path: path.to_path_buf(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// Where the certificate comes from, with every path resolved.
#[derive(Debug, Clone)]
enum Source {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    SelfSigned {
        name: String,
        dir: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    /// The ACME task's files (`STATE_DIR/acme/cert.pem`, `key.pem`).
    Acme {
        cert: PathBuf,
        key: PathBuf,
    },
}

impl Source {
    fn files(&self) -> [&Path; 2] {
        match self {
            Source::Files { cert, key }
            | Source::SelfSigned { cert, key, .. }
            | Source::Acme { cert, key } => [cert, key],
        }
    }
}

/// A loaded certificate: what handshakes get, and the leaf's expiry for status.
struct Loaded {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

/// The resolver handed to rustls: every handshake takes the current certificate. rustls keeps
/// the `Arc<CertifiedKey>` it got for the lifetime of that connection, so swapping never
/// disturbs established sessions.
#[derive(Debug)]
struct SwapResolver {
    current: RwLock<Arc<CertifiedKey>>,
    /// TLS-ALPN-01 challenge certificates (mode `acme` only).
    challenges: Option<Arc<acme::Challenges>>,
}

impl ResolvesServerCert for SwapResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(ch) = &self.challenges {
            if acme::offers_only_acme(hello.alpn()) {
                // An ACME validation: its challenge certificate, or no certificate at all
                // (the handshake fails) when no challenge for that name is in progress.
                return ch.resolve(&hello);
            }
        }
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// Identity of a file version as seen by `stat`: a rename over it (certbot, `write_atomic`)
/// changes the inode, an in-place rewrite the mtime or size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    mtime: SystemTime,
    len: u64,
    ino: u64,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    // `metadata` follows symlinks: certbot's live/ links change target on renewal.
    let m = std::fs::metadata(path).ok()?;
    Some(Fingerprint {
        mtime: m.modified().ok()?,
        len: m.len(),
        ino: m.ino(),
    })
}

/// The public listener's TLS: a rustls server config with a swappable certificate.
pub struct TlsState {
    source: Source,
    provider: Arc<CryptoProvider>,
    resolver: Arc<SwapResolver>,
    server_config: Arc<ServerConfig>,
    not_after: RwLock<SystemTime>,
    /// Serialises reloads (watcher and SIGHUP) and holds the files' fingerprints as of the last
    /// attempt, so the watcher reloads once per change, not every tick after a failure.
    reload: Mutex<[Option<Fingerprint>; 2]>,
    /// The ACME account and renewal task (mode `acme`).
    acme: Option<Arc<acme::Acme>>,
}

impl fmt::Debug for TlsState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsState")
            .field("source", &self.source)
            .field("not_after", &self.not_after())
            .finish_non_exhaustive()
    }
}

/// Where the certificate of `tls` comes from, and the ACME manager in mode `acme`.
fn source_of(
    tls: &TlsConfig,
    state_dir: &Path,
    provider: &Arc<CryptoProvider>,
) -> (Source, Option<Arc<acme::Acme>>) {
    match tls {
        TlsConfig::Files { cert, key } => (
            Source::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            None,
        ),
        TlsConfig::SelfSigned { name } => (
            Source::SelfSigned {
                name: name.clone(),
                dir: state_dir.to_path_buf(),
                cert: state_dir.join(SELF_SIGNED_CERT_FILE),
                key: state_dir.join(SELF_SIGNED_KEY_FILE),
            },
            None,
        ),
        TlsConfig::Acme {
            domain,
            email,
            directory,
            ca_root,
        } => {
            let acme = acme::Acme::new(
                domain,
                email.as_deref(),
                directory.as_deref(),
                ca_root.as_deref(),
                state_dir,
                provider.clone(),
            );
            let source = Source::Acme {
                cert: state_dir.join(acme::ACME_DIR).join(acme::CERT_FILE),
                key: state_dir.join(acme::ACME_DIR).join(acme::KEY_FILE),
            };
            (source, Some(Arc::new(acme)))
        }
    }
}

/// The rustls server configuration: safe defaults, no client auth, certificates from
/// `resolver`, ALPN h2 then http/1.1 (then acme-tls/1 in mode `acme`).
fn server_config(
    provider: &Arc<CryptoProvider>,
    resolver: Arc<SwapResolver>,
    acme: bool,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Internal(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    // HTTP/2 first: Cursor's backend and most clients multiplex over one connection.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if acme {
        // Last, so it is only ever chosen by a client that offers nothing else: the ACME
        // validation server (RFC 8737 §3). The accept loop closes those connections.
        config.alpn_protocols.push(acme::ACME_TLS_ALPN.to_vec());
    }
    Ok(config)
}

impl TlsState {
    /// Loads the certificate `tls` describes. `state_dir` holds the self-signed certificate.
    pub fn load(tls: &TlsConfig, state_dir: &Path) -> Result<TlsState, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (source, acme_state) = source_of(tls, state_dir, &provider);
        let fps = source.files().map(fingerprint);
        let (loaded, wrote) = match &acme_state {
            Some(a) => (a.load_initial()?, false),
            None => load_source(&source, &provider)?,
        };
        let fps = if wrote {
            source.files().map(fingerprint)
        } else {
            fps
        };
        let resolver = Arc::new(SwapResolver {
            current: RwLock::new(loaded.key),
            challenges: acme_state.as_ref().map(|a| a.challenges()),
        });
        let config = server_config(&provider, resolver.clone(), acme_state.is_some())?;
        if acme_state.as_ref().is_none_or(|a| a.status().issued) {
            // (The ACME placeholder was announced as such by `acme`.)
            log_loaded(&source, loaded.not_after, "TLS certificate loaded");
        }
        Ok(TlsState {
            source,
            provider,
            resolver,
            server_config: Arc::new(config),
            not_after: RwLock::new(loaded.not_after),
            reload: Mutex::new(fps),
            acme: acme_state,
        })
    }

    /// The ACME certificate's state for `status` (mode `acme` only): expiry, serial, next
    /// renewal, last error.
    pub fn acme_status(&self) -> Option<acme::AcmeStatus> {
        self.acme.as_ref().map(|a| a.status())
    }

    /// Serves `loaded` to new handshakes from now on; open connections keep theirs.
    fn install(&self, loaded: Loaded) {
        *self
            .resolver
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = loaded.key;
        *self
            .not_after
            .write()
            .unwrap_or_else(PoisonError::into_inner) = loaded.not_after;
    }

    /// The rustls config for the listener (cheap to clone; the certificate inside is live).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config.clone()
    }

    /// Expiry of the certificate new handshakes get.
    pub fn not_after(&self) -> Option<SystemTime> {
        Some(
            *self
                .not_after
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Loads the certificate again (changed files; an expiring self-signed one is replaced).
    /// On error the previous certificate stays in use and the reason is returned.
    pub fn reload(&self) -> Result<(), TlsError> {
        let mut fps = self.reload.lock().unwrap_or_else(PoisonError::into_inner);
        self.reload_locked(&mut fps)
    }

    fn reload_locked(&self, fps: &mut [Option<Fingerprint>; 2]) -> Result<(), TlsError> {
        *fps = self.source.files().map(fingerprint);
        if let Some(acme) = &self.acme {
            // The renewal task owns these files; a reload re-reads what it stored (e.g. after
            // an operator restored a backup) and otherwise keeps what is served.
            if let Some(loaded) = acme.load_stored()? {
                let not_after = loaded.not_after;
                self.install(loaded);
                log_loaded(&self.source, not_after, "TLS certificate reloaded");
            }
            return Ok(());
        }
        let (loaded, wrote) = load_source(&self.source, &self.provider)?;
        if wrote {
            *fps = self.source.files().map(fingerprint);
        }
        let not_after = loaded.not_after;
        self.install(loaded);
        log_loaded(&self.source, not_after, "TLS certificate reloaded");
        Ok(())
    }

    /// Reloads when a file changed since the last attempt or a self-signed certificate is due
    /// for renewal. `None` when nothing had to be done.
    fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let mut fps = self.reload.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = self.source.files().map(fingerprint) != *fps;
        let due = matches!(self.source, Source::SelfSigned { .. })
            && self.not_after().is_some_and(renewal_due);
        (changed || due).then(|| self.reload_locked(&mut fps))
    }

    /// Polls the certificate files every [`WATCH_INTERVAL`] and reloads when they change
    /// (atomic renames and in-place rewrites alike), until `stop` becomes `true` or its sender
    /// is dropped. Reload failures are logged and the previous certificate stays in use; a half
    /// written pair (new certificate, old key) is retried when the second file lands.
    ///
    /// In mode `acme` this is the ACME task instead: it issues the first certificate, renews
    /// it ahead of expiry and retries failures with backoff, until `stop`.
    pub async fn watch(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        if let Some(acme) = self.acme.clone() {
            return acme.run(self, stop).await;
        }
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // The first tick is immediate; the files were just loaded.
        loop {
            if *stop.borrow_and_update() {
                return;
            }
            tokio::select! {
                _ = tick.tick() => {}
                changed = stop.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.reload_if_changed()).await {
                Ok(None) | Ok(Some(Ok(()))) => {}
                Ok(Some(Err(e))) => tracing::warn!(
                    error = %e,
                    "TLS certificate changed but could not be loaded; still serving the previous one"
                ),
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
    }
}

fn renewal_due(not_after: SystemTime) -> bool {
    not_after
        .duration_since(SystemTime::now())
        .map_or(true, |left| left < SELF_SIGNED_RENEW_BEFORE)
}

fn log_loaded(source: &Source, not_after: SystemTime, msg: &str) {
    let [cert, _] = source.files();
    let expires = humantime::format_rfc3339_seconds(not_after).to_string();
    if not_after <= SystemTime::now() {
        tracing::warn!(cert = %cert.display(), not_after = %expires, "{msg}, but it has EXPIRED; clients will refuse it: renew it");
    } else {
        tracing::info!(cert = %cert.display(), not_after = %expires, "{msg}");
    }
}

/// Loads `source`; the flag says whether files were (re)generated.
fn load_source(source: &Source, provider: &CryptoProvider) -> Result<(Loaded, bool), TlsError> {
    match source {
        Source::Files { cert, key } => Ok((load_files(cert, key, provider)?, false)),
        Source::SelfSigned {
            name,
            dir,
            cert,
            key,
        } => load_self_signed(name, dir, cert, key, provider),
        // Never reached: mode `acme` loads through `acme::Acme` (see `TlsState::load`).
        Source::Acme { cert, key } => Ok((load_files(cert, key, provider)?, false)),
    }
}

/// Refuses a private key file that is missing, not a regular file, or readable by group/others.
fn check_key_file(key: &Path) -> Result<(), TlsError> {
    let meta = std::fs::metadata(key).map_err(|e| {
        file_err(
            KEY,
            key,
            e.to_string(),
            "point tls.key at the PEM private key of the certificate",
        )
    })?;
    if !meta.is_file() {
        return Err(file_err(
            KEY,
            key,
            "not a regular file",
            "point tls.key at the PEM private key of the certificate",
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(file_err(
            KEY,
            key,
            format!("mode {mode:04o} lets group/others read the private key"),
            format!("chmod 600 {}", key.display()),
        ));
    }
    Ok(())
}

fn read_pem(what: &'static str, path: &Path, fix: &str) -> Result<Vec<u8>, TlsError> {
    let meta = std::fs::metadata(path).map_err(|e| file_err(what, path, e.to_string(), fix))?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(file_err(
            what,
            path,
            format!("{} bytes is too large for a PEM file", meta.len()),
            fix,
        ));
    }
    std::fs::read(path).map_err(|e| file_err(what, path, e.to_string(), fix))
}

/// Loads a PEM certificate chain (leaf first) and its PEM private key.
fn load_files(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<Loaded, TlsError> {
    const CERT_FIX: &str =
        "point tls.cert at a PEM certificate chain, leaf first (e.g. certbot's fullchain.pem)";
    const KEY_FIX: &str =
        "point tls.key at the certificate's PEM private key (e.g. certbot's privkey.pem)";
    check_key_file(key)?;
    let cert_pem = read_pem(CERT, cert, CERT_FIX)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(CERT, cert, format!("not valid PEM: {e}"), CERT_FIX))?;
    let Some(leaf) = chain.first() else {
        return Err(file_err(
            CERT,
            cert,
            "contains no -----BEGIN CERTIFICATE----- block",
            CERT_FIX,
        ));
    };
    let info = x509::parse_leaf(leaf).map_err(|e| {
        file_err(
            CERT,
            cert,
            format!("the first certificate is not valid X.509: {e}"),
            CERT_FIX,
        )
    })?;
    let key_pem = read_pem(KEY, key, KEY_FIX)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        let problem = match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "contains no -----BEGIN (RSA |EC )PRIVATE KEY----- block".to_string()
            }
            e => format!("not valid PEM: {e}"),
        };
        file_err(KEY, key, problem, KEY_FIX)
    })?;
    let certified = CertifiedKey::from_der(chain, key_der, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => file_err(
            KEY,
            key,
            format!("does not match the certificate in {}", cert.display()),
            "use the key the certificate was issued for (renewals replace both files)",
        ),
        e => file_err(
            KEY,
            key,
            format!("unusable with certificate {}: {e}", cert.display()),
            "use an RSA, ECDSA P-256/P-384 or Ed25519 key in PEM (PKCS#8, PKCS#1 or SEC1)",
        ),
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after: info.not_after,
    })
}

/// Loads the self-signed certificate from the state directory, or generates (and stores) a new
/// one when there is none, it is unreadable, expires within a day, or does not cover `name`.
fn load_self_signed(
    name: &str,
    dir: &Path,
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<(Loaded, bool), TlsError> {
    if cert.exists() && key.exists() {
        // A widened mode is reported, not silently replaced: the old key may have leaked and
        // the operator should know.
        check_key_file(key)?;
        match load_files(cert, key, provider) {
            Ok(l) if renewal_due(l.not_after) => {
                tracing::info!(cert = %cert.display(), "self-signed certificate expires soon; generating a new one");
            }
            Ok(l) if !covers(&l, name, cert) => {
                tracing::info!(cert = %cert.display(), name, "self-signed certificate does not cover tls.self_signed_name; generating a new one");
            }
            Ok(l) => return Ok((l, false)),
            Err(e) => {
                tracing::warn!(error = %e, "stored self-signed certificate unusable; generating a new one");
            }
        }
    }
    generate_self_signed(name, dir, cert, key)?;
    Ok((load_files(cert, key, provider)?, true))
}

/// True when the stored certificate is valid for `name`, `localhost` and 127.0.0.1.
fn covers(l: &Loaded, name: &str, cert: &Path) -> bool {
    let Some(leaf) = l.key.cert.first() else {
        return false;
    };
    let Ok(info) = x509::parse_leaf(leaf) else {
        tracing::debug!(cert = %cert.display(), "cannot read the names of the stored certificate");
        return false;
    };
    let has_dns = |n: &str| info.dns_names.iter().any(|d| d.eq_ignore_ascii_case(n));
    let has_ip = |ip: IpAddr| info.ips.contains(&ip);
    let named = match name.parse::<IpAddr>() {
        Ok(ip) => has_ip(ip),
        Err(_) => has_dns(name),
    };
    named && has_dns("localhost") && has_ip(IpAddr::from([127, 0, 0, 1]))
}

fn generate_self_signed(name: &str, dir: &Path, cert: &Path, key: &Path) -> Result<(), TlsError> {
    let err = |problem: String, fix: &str| TlsError::SelfSigned {
        name: name.to_string(),
        problem,
        fix: fix.to_string(),
    };
    let mut names = vec![name.to_string()];
    for extra in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(extra)) {
            names.push(extra.to_string());
        }
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| {
        err(
            format!("not usable as a certificate name: {e}"),
            "set tls.self_signed_name to a DNS name or IP address",
        )
    })?;
    x509::set_validity_days(&mut params, 1, SELF_SIGNED_VALIDITY_DAYS);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).map_err(|e| err(e.to_string(), "check the system RNG"))?;
    serial[0] &= 0x7f; // A positive INTEGER (RFC 5280 §4.1.2.2).
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let key_pair = rcgen::KeyPair::generate().map_err(|e| err(e.to_string(), "report this bug"))?;
    let certificate = params
        .self_signed(&key_pair)
        .map_err(|e| err(e.to_string(), "report this bug"))?;

    let store_fix = "make server.state_dir writable by the modelgate user";
    create_dir_with_mode(dir, 0o700)
        .map_err(|e| err(format!("cannot create {}: {e}", dir.display()), store_fix))?;
    // Key first: a crash between the writes leaves a pair that does not match, which the next
    // load replaces, never a certificate whose key is lost.
    write_atomic(key, key_pair.serialize_pem().as_bytes(), 0o600)
        .map_err(|e| err(format!("cannot write {}: {e}", key.display()), store_fix))?;
    write_atomic(cert, certificate.pem().as_bytes(), 0o644)
        .map_err(|e| err(format!("cannot write {}: {e}", cert.display()), store_fix))?;
    tracing::info!(cert = %cert.display(), name, "generated a self-signed certificate (clients must trust it explicitly; Cursor will not)");
    Ok(())
}

#[cfg(test)]
mod tests;
