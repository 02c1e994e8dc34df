//! ACME certificates (RFC 8555) for the public name, validated over TLS-ALPN-01 (RFC 8737) on
//! the HTTPS port itself, so the appliance keeps exactly one public TCP port.
//!
//! Owns the ACME account, the issuing/renewing task and the files in `STATE_DIR/acme/`:
//! `account.json` (the account key and URL), `key.pem` and `cert.pem` (the certificate's key
//! and chain), all mode 0600 and written atomically ([`crate::fsutil::write_atomic`]).
//!
//! Life of the certificate:
//! - At start the stored certificate is served when it covers the domain; otherwise a
//!   self-signed placeholder (in memory) until the first issuance.
//! - The task issues at once when there is none (or it is due), then renews once
//!   `min(lifetime / 3, 30 days)` is left ([`schedule`]). A new certificate is swapped into the
//!   resolver only when it is complete: new handshakes get it, open connections keep the one
//!   they negotiated. Until then the old one is served.
//! - Failures are retried with exponential backoff (10 s doubling to 1 h, [`schedule`]); a
//!   `badNonce` is first retried by instant-acme itself (up to three times per request).
//!
//! Must never: log key material or key authorizations, serve a challenge certificate to a
//! normal client ([`challenge`]), or pass an `acme-tls/1` connection to HTTP.

mod challenge;
mod http;
pub mod schedule;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

pub use challenge::{is_acme_alpn, offers_only_acme, Challenges, ACME_TLS_ALPN};

use super::{x509, Loaded, TlsError, TlsState};
use crate::fsutil::{create_dir_with_mode, write_atomic};

/// Sub-directory of the state directory holding the ACME files.
pub const ACME_DIR: &str = "acme";
/// The ACME account (key and URL) for the configured directory.
pub const ACCOUNT_FILE: &str = "account.json";
/// The issued certificate chain, leaf first.
pub const CERT_FILE: &str = "cert.pem";
/// The issued certificate's private key.
pub const KEY_FILE: &str = "key.pem";
/// Let's Encrypt production, used when `tls.acme_directory` is not set.
pub const DEFAULT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Deadline for one whole issuance (account, order, validation, finalize, download).
const ISSUE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the CA gets to validate the challenge and to sign, polled with backoff.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(120));
/// Longest single sleep of the renewal task: the wall clock is re-read at least this often,
/// so a suspended VM or a clock step does not delay a renewal by a whole sleep.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Validity of the placeholder served before the first issuance.
const PLACEHOLDER_VALIDITY_DAYS: i64 = 7;

/// What `status` shows about the ACME certificate. A snapshot; cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeStatus {
    pub domain: String,
    pub directory: String,
    /// False while the self-signed placeholder is served (before the first issuance).
    pub issued: bool,
    /// Validity and serial (hex) of the certificate new handshakes get.
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
    pub serial: Option<String>,
    /// When the task will next try to issue (renewal, or a retry after a failure).
    pub next_renewal: Option<SystemTime>,
    /// When the current certificate was obtained by this process.
    pub last_issued: Option<SystemTime>,
    /// How long the last successful issuance took.
    pub last_issue_duration: Option<Duration>,
    /// The last failure, cleared by the next success.
    pub last_error: Option<String>,
    /// Consecutive failures.
    pub failures: u32,
}

/// The ACME side of a [`TlsState`] in `mode = "acme"`.
pub struct Acme {
    domain: String,
    email: Option<String>,
    directory: String,
    ca_root: Option<PathBuf>,
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    challenges: Arc<Challenges>,
    status: Mutex<AcmeStatus>,
    account: tokio::sync::Mutex<Option<Account>>,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("domain", &self.domain)
            .field("directory", &self.directory)
            .finish_non_exhaustive()
    }
}

/// A stored account: the directory it belongs to, so a changed `acme_directory` gets a new one.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

type AcmeResult<T> = Result<T, instant_acme::Error>;

fn other(msg: impl Into<String>) -> instant_acme::Error {
    instant_acme::Error::Other(msg.into().into())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Acme {
    pub(super) fn new(
        domain: &str,
        email: Option<&str>,
        directory: Option<&str>,
        ca_root: Option<&Path>,
        state_dir: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Acme {
        let directory = directory.unwrap_or(DEFAULT_DIRECTORY).to_string();
        Acme {
            domain: domain.to_ascii_lowercase(),
            email: email.map(str::to_string),
            status: Mutex::new(AcmeStatus {
                domain: domain.to_ascii_lowercase(),
                directory: directory.clone(),
                issued: false,
                not_before: None,
                not_after: None,
                serial: None,
                next_renewal: None,
                last_issued: None,
                last_issue_duration: None,
                last_error: None,
                failures: 0,
            }),
            directory,
            ca_root: ca_root.map(Path::to_path_buf),
            dir: state_dir.join(ACME_DIR),
            provider,
            challenges: Arc::new(Challenges::default()),
            account: tokio::sync::Mutex::new(None),
        }
    }

    pub(super) fn challenges(&self) -> Arc<Challenges> {
        self.challenges.clone()
    }

    pub(super) fn cert_path(&self) -> PathBuf {
        self.dir.join(CERT_FILE)
    }

    pub(super) fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    /// A snapshot for `status`.
    pub fn status(&self) -> AcmeStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut AcmeStatus)) {
        f(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// The stored certificate when it is usable for the domain (`Ok(None)` when there is none
    /// or it is unusable, which the task then replaces). A stored key that group/others can
    /// read is an error: it may have leaked, and the operator should know.
    pub(super) fn load_stored(&self) -> Result<Option<Loaded>, TlsError> {
        let (cert, key) = (self.cert_path(), self.key_path());
        if !cert.exists() || !key.exists() {
            return Ok(None);
        }
        super::check_key_file(&key)?;
        let loaded = match super::load_files(&cert, &key, &self.provider) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "stored ACME certificate unusable; a new one will be requested");
                return Ok(None);
            }
        };
        let Some(info) = loaded
            .key
            .cert
            .first()
            .and_then(|c| x509::parse_leaf(c).ok())
        else {
            return Ok(None);
        };
        if !info
            .dns_names
            .iter()
            .any(|n| n.eq_ignore_ascii_case(&self.domain))
        {
            tracing::info!(cert = %cert.display(), domain = %self.domain, "stored ACME certificate does not cover tls.acme_domain; a new one will be requested");
            return Ok(None);
        }
        self.note_certificate(&info);
        Ok(Some(loaded))
    }

    /// The certificate to serve at start: the stored one, or a self-signed placeholder.
    pub(super) fn load_initial(&self) -> Result<Loaded, TlsError> {
        if let Some(l) = self.load_stored()? {
            return Ok(l);
        }
        let l = placeholder(&self.domain, &self.provider)?;
        tracing::info!(domain = %self.domain, "no ACME certificate yet: serving a self-signed placeholder until the first issuance");
        self.update(|s| {
            s.issued = false;
            s.not_before = None;
            s.not_after = Some(l.not_after);
            s.serial = None;
            s.next_renewal = Some(SystemTime::now());
        });
        Ok(l)
    }

    fn note_certificate(&self, info: &x509::LeafInfo) {
        let renew = schedule::renew_at(info.not_before, info.not_after);
        self.update(|s| {
            s.issued = true;
            s.not_before = Some(info.not_before);
            s.not_after = Some(info.not_after);
            s.serial = Some(hex(&info.serial));
            s.next_renewal = Some(renew);
        });
    }

    /// Issues and renews until `stop` turns true. Runs as the TLS state's watcher.
    pub(super) async fn run(self: Arc<Self>, tls: Arc<TlsState>, mut stop: watch::Receiver<bool>) {
        loop {
            let due = self.status().next_renewal.unwrap_or_else(SystemTime::now);
            if !sleep_until(due, &mut stop).await {
                return;
            }
            let started = Instant::now();
            tracing::info!(domain = %self.domain, directory = %self.directory, "requesting a certificate over ACME (TLS-ALPN-01)");
            let result = tokio::select! {
                r = tokio::time::timeout(ISSUE_TIMEOUT, self.issue()) => match r {
                    Ok(r) => r,
                    Err(_) => Err(other(format!("no certificate within {ISSUE_TIMEOUT:?}"))),
                },
                _ = stop.changed() => return,
            };
            let result = match result {
                Ok((chain, key)) => self.install(&tls, chain, key).await,
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(info) => self.note_issued(&info, started.elapsed()),
                Err(e) => self.note_failure(e),
            }
        }
    }

    /// A certificate was installed: the next renewal as scheduled, the failures forgotten.
    fn note_issued(&self, info: &x509::LeafInfo, took: Duration) {
        // A certificate already due at issuance (a CA issuing very short ones, or a clock far
        // off) must not make us ask again in a tight loop.
        let floor = SystemTime::now() + schedule::FIRST_RETRY;
        self.update(|s| {
            s.next_renewal = s.next_renewal.map(|n| n.max(floor));
            s.last_issued = Some(SystemTime::now());
            s.last_issue_duration = Some(took);
            s.last_error = None;
            s.failures = 0;
        });
        let st = self.status();
        tracing::info!(
            domain = %self.domain,
            serial = %hex(&info.serial),
            not_after = %humantime::format_rfc3339_seconds(info.not_after),
            next_renewal = ?st.next_renewal.map(humantime::format_rfc3339_seconds),
            took_ms = took.as_millis() as u64,
            "ACME certificate installed; new connections get it"
        );
    }

    /// An issuance failed: retry with backoff, before the current certificate runs out.
    fn note_failure(&self, e: String) {
        let now = SystemTime::now();
        let st = self.status();
        let failures = st.failures.saturating_add(1);
        let not_after = if st.issued { st.not_after } else { None };
        let next = schedule::retry_at(now, failures, not_after);
        self.update(|s| {
            s.failures = failures;
            s.last_error = Some(e.clone());
            s.next_renewal = Some(next);
        });
        tracing::warn!(
            domain = %self.domain,
            error = %e,
            failures,
            retry_in_s = next.duration_since(now).unwrap_or_default().as_secs(),
            "ACME issuance failed; still serving the previous certificate"
        );
    }

    /// One issuance: account, order, TLS-ALPN-01, CSR, certificate. Returns (chain PEM, key PEM).
    async fn issue(&self) -> AcmeResult<(String, String)> {
        let account = self.account().await?;
        match self.order(&account).await {
            // The CA forgot the account (a test CA restarted, or it was deactivated): make a
            // new one and try once more.
            Err(instant_acme::Error::Api(p))
                if p.r#type.as_deref()
                    == Some("urn:ietf:params:acme:error:accountDoesNotExist") =>
            {
                tracing::warn!(
                    "the ACME server does not know the stored account; creating a new one"
                );
                *self.account.lock().await = None;
                let path = self.dir.join(ACCOUNT_FILE);
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
                let account = self.account().await?;
                self.order(&account).await
            }
            r => r,
        }
    }

    /// The account: cached, else restored from `account.json`, else created (agreeing to the
    /// CA's terms of service) and stored.
    async fn account(&self) -> AcmeResult<Account> {
        let mut cached = self.account.lock().await;
        if let Some(a) = &*cached {
            return Ok(a.clone());
        }
        let http = || http::client(self.ca_root.as_deref(), &self.provider).map_err(other);
        let path = self.dir.join(ACCOUNT_FILE);
        let stored = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || std::fs::read(path))
                .await
                .map_err(|e| other(e.to_string()))?
        };
        if let Ok(bytes) = stored {
            match serde_json::from_slice::<StoredAccount>(&bytes) {
                Ok(s) if s.directory == self.directory => {
                    let a = Account::builder_with_http(http()?)
                        .from_credentials(s.credentials)
                        .await?;
                    *cached = Some(a.clone());
                    return Ok(a);
                }
                Ok(_) => tracing::info!(
                    "stored ACME account belongs to another directory; creating a new one"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, file = %path.display(), "stored ACME account unreadable; creating a new one")
                }
            }
        }
        let contact = self.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (a, credentials) = Account::builder_with_http(http()?)
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.directory.clone(),
                None,
            )
            .await?;
        let json = serde_json::to_vec_pretty(&StoredAccount {
            directory: self.directory.clone(),
            credentials,
        })?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            create_dir_with_mode(&dir, 0o700)?;
            write_atomic(&path, &json, 0o600)
        })
        .await
        .map_err(|e| other(e.to_string()))?
        .map_err(|e| other(format!("cannot store the ACME account: {e}")))?;
        tracing::info!(account = a.id(), "ACME account created");
        *cached = Some(a.clone());
        Ok(a)
    }

    async fn order(&self, account: &Account) -> AcmeResult<(String, String)> {
        let ids = [Identifier::Dns(self.domain.clone())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        // The challenge certificates stay on offer until the order is ready (or this fails).
        let mut offers = Vec::new();
        {
            let mut authzs = order.authorizations();
            while let Some(authz) = authzs.next().await {
                let mut authz = authz?;
                match authz.status {
                    // Reused from an earlier validation (CAs cache them for a while).
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    s => return Err(other(format!("authorization is {s:?}"))),
                }
                let mut ch = authz.challenge(ChallengeType::TlsAlpn01).ok_or_else(|| {
                    other("the ACME server offers no tls-alpn-01 challenge for this name")
                })?;
                let digest = ch.key_authorization().digest();
                let cert = challenge::certificate(&self.domain, digest.as_ref(), &self.provider)
                    .map_err(other)?;
                offers.push(self.challenges.offer(&self.domain, cert));
                ch.set_ready().await?;
            }
        }
        let status = order.poll_ready(&POLL).await?;
        drop(offers);
        if status != OrderStatus::Ready {
            return Err(other(format!(
                "validation failed ({status:?}): {}",
                failure_detail(&mut order).await
            )));
        }
        let key = rcgen::KeyPair::generate().map_err(|e| other(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec![self.domain.clone()])
            .map_err(|e| other(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| other(e.to_string()))?;
        order.finalize_csr(csr.der()).await?;
        let chain = order.poll_certificate(&POLL).await?;
        Ok((chain, key.serialize_pem()))
    }

    /// Checks the new chain and key, stores them, then swaps them into the resolver.
    async fn install(
        &self,
        tls: &TlsState,
        chain: String,
        key: String,
    ) -> Result<x509::LeafInfo, String> {
        let certs = CertificateDer::pem_slice_iter(chain.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the CA sent a chain that is not PEM: {e}"))?;
        let leaf = certs.first().ok_or("the CA sent an empty chain")?;
        let info = x509::parse_leaf(leaf).map_err(|e| format!("the CA sent a bad leaf: {e}"))?;
        if !info
            .dns_names
            .iter()
            .any(|n| n.eq_ignore_ascii_case(&self.domain))
        {
            return Err(format!(
                "the CA sent a certificate for {:?}, not {}",
                info.dns_names, self.domain
            ));
        }
        let key_der = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| e.to_string())?;
        let certified = CertifiedKey::from_der(certs, key_der, &self.provider)
            .map_err(|e| format!("certificate and key do not fit: {e}"))?;
        // Stored before the swap, key first (a crash in between leaves a pair that does not
        // match, which the next start replaces). A write failure is reported but the new
        // certificate is served anyway: better than keeping one that will expire.
        let (dir, cert_path, key_path) = (self.dir.clone(), self.cert_path(), self.key_path());
        let stored = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            create_dir_with_mode(&dir, 0o700)?;
            write_atomic(&key_path, key.as_bytes(), 0o600)?;
            write_atomic(&cert_path, chain.as_bytes(), 0o600)
        })
        .await
        .map_err(|e| e.to_string())?;
        if let Err(e) = stored {
            tracing::error!(error = %e, dir = %self.dir.display(), "cannot store the new ACME certificate; serving it anyway, but a restart will request another one: make server.state_dir writable");
        }
        tls.install(Loaded {
            key: Arc::new(certified),
            not_after: info.not_after,
        });
        self.note_certificate(&info);
        Ok(info)
    }
}

/// Why an order went invalid, read from its authorizations' challenge errors.
async fn failure_detail(order: &mut instant_acme::Order) -> String {
    let mut details = Vec::new();
    let mut authzs = order.authorizations();
    while let Some(Ok(mut authz)) = authzs.next().await {
        if let Ok(state) = authz.refresh().await {
            for c in &state.challenges {
                if let Some(e) = &c.error {
                    details.push(format!(
                        "{}: {}",
                        e.r#type.as_deref().unwrap_or("error"),
                        e.detail.as_deref().unwrap_or("-")
                    ));
                }
            }
        }
    }
    if details.is_empty() {
        "the CA gave no reason; check that the name resolves to this host and port 443 reaches it"
            .to_string()
    } else {
        details.join("; ")
    }
}

/// Sleeps until the wall clock reaches `due`, in bounded steps (re-reading the clock, which
/// may jump); false when `stop` turned true or its sender went away first.
async fn sleep_until(due: SystemTime, stop: &mut watch::Receiver<bool>) -> bool {
    loop {
        if *stop.borrow_and_update() {
            return false;
        }
        let Ok(left) = due.duration_since(SystemTime::now()) else {
            return true;
        };
        if left.is_zero() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(left.min(MAX_SLEEP)) => {}
            r = stop.changed() => if r.is_err() { return false },
        }
    }
}

/// A self-signed certificate for `domain`, valid a week, held in memory only.
fn placeholder(domain: &str, provider: &CryptoProvider) -> Result<Loaded, TlsError> {
    let err = |e: String| TlsError::Acme {
        problem: format!("cannot make the placeholder certificate: {e}"),
        fix: "check tls.acme_domain".into(),
    };
    let mut params =
        rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(|e| err(e.to_string()))?;
    x509::set_validity_days(&mut params, 1, PLACEHOLDER_VALIDITY_DAYS);
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "modelgate placeholder (ACME pending)",
    );
    let key = rcgen::KeyPair::generate().map_err(|e| err(e.to_string()))?;
    let cert = params.self_signed(&key).map_err(|e| err(e.to_string()))?;
    let info = x509::parse_leaf(cert.der()).map_err(err)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let certified = CertifiedKey::from_der(vec![cert.der().clone()], der, provider)
        .map_err(|e| err(e.to_string()))?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after: info.not_after,
    })
}

#[cfg(test)]
mod tests;
