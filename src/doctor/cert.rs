//! Hop 3: the certificate the listener really serves, fetched by a TLS handshake and judged the
//! way a public client (Cursor's backend) would: valid for the public name, chaining to a
//! publicly trusted root, inside its validity period and not about to leave it.
//!
//! The handshake uses a verifier that *captures* the chain instead of judging it (the handshake
//! signature is still checked, so the peer proved it holds the key); the judging happens here,
//! one question at a time, so each problem gets its own sentence and fix. The captured leaf is
//! then pinned for the HTTP probes of hops 7 and 8 ([`PinnedLeaf`]): they run even when the
//! certificate is self-signed or expired, and trust nothing but that exact certificate.
//!
//! Trust anchors: Mozilla's root program as compiled into `webpki-roots`, plus `--ca-file`s.
//! Deliberately not the host's own trust store: a private CA installed on the appliance would
//! make this check pass while Cursor's backend, which does not share that store, refuses.

use crate::civil::rfc3339_unix as rfc3339;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;

/// Longest wait for the TCP connect plus the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What is wrong with a served certificate, most serious first (the first one is the answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Past `notAfter`.
    Expired { not_after: String, days_ago: i64 },
    /// Before `notBefore` (a clock problem, or a certificate issued for the future).
    NotYetValid { not_before: String },
    /// Does not cover the public name; `covers` lists its DNS/IP SANs.
    WrongName { name: String, covers: Vec<String> },
    /// No path to a trusted root. `self_signed` when issuer == subject.
    Untrusted {
        self_signed: bool,
        issuer: String,
        reason: String,
    },
    /// Valid, but fewer than `min_days` days left.
    ExpiresSoon {
        not_after: String,
        days_left: i64,
        min_days: u32,
    },
}

impl Problem {
    pub fn describe(&self) -> String {
        match self {
            Problem::Expired {
                not_after,
                days_ago,
            } => {
                format!("EXPIRED on {not_after} ({days_ago} days ago): every client refuses it")
            }
            Problem::NotYetValid { not_before } => {
                format!(
                    "not valid before {not_before}: clients refuse it (check this host's clock)"
                )
            }
            Problem::WrongName { name, covers } => format!(
                "not valid for {name}: it covers {}",
                if covers.is_empty() {
                    "no DNS name or IP".to_string()
                } else {
                    covers.join(", ")
                }
            ),
            Problem::Untrusted {
                self_signed: true, ..
            } => "self-signed, not publicly trusted: Cursor will refuse it".to_string(),
            Problem::Untrusted { issuer, reason, .. } => {
                format!("not publicly trusted: Cursor will refuse it (issuer {issuer}: {reason})")
            }
            Problem::ExpiresSoon {
                not_after,
                days_left,
                min_days,
            } => format!(
                "expires {not_after}, in {days_left} days (less than --min-days {min_days})"
            ),
        }
    }

    /// The fix, worded for the config's `[tls] mode` (`files`, `self-signed`, `acme`).
    pub fn fix(&self, mode: &str, name: &str) -> String {
        match (self, mode) {
            (Problem::Expired { .. } | Problem::ExpiresSoon { .. }, "acme") => "the ACME renewal is not working: read `journalctl -u modelgate` for the ACME errors (port 443 must be reachable from the internet for TLS-ALPN-01)".into(),
            (Problem::Expired { .. } | Problem::ExpiresSoon { .. }, "self-signed") => "restart modelgate (`systemctl restart modelgate`): it generates a new self-signed certificate; for Cursor use a public certificate instead (`modelgate init --acme-domain NAME`)".into(),
            (Problem::Expired { .. } | Problem::ExpiresSoon { .. }, _) => "renew the certificate (e.g. `certbot renew`) and put the new chain and key at tls.cert / tls.key: modelgate picks up changed files within 2 s (or run `modelgate reload`)".into(),
            (Problem::NotYetValid { .. }, _) => "set this host's clock right (`timedatectl`, NTP), or wait until the certificate's notBefore".into(),
            (Problem::WrongName { .. }, "acme") => format!("issue the certificate for {name}: `modelgate init --acme-domain {name}` (or, if clients use another name, pass that name with --name)"),
            (Problem::WrongName { .. }, "self-signed") => format!("set tls.self_signed_name = \"{name}\" (or pass the name clients use with --name); for Cursor use a public certificate: `modelgate init --acme-domain {name}`"),
            (Problem::WrongName { .. }, _) => format!("serve a certificate whose subject alternative names include {name} at tls.cert / tls.key (or, if clients use another name, pass that name with --name)"),
            (Problem::Untrusted { self_signed: true, .. }, _) => format!("use a publicly trusted certificate: `modelgate init --acme-domain {name}` (ACME on this port), or [tls] mode = \"files\" with a public CA's chain and key (e.g. certbot's fullchain.pem and privkey.pem); to check a private CA instead pass --ca-file CA.pem"),
            (Problem::Untrusted { .. }, _) => "serve the full chain (leaf then intermediates, e.g. certbot's fullchain.pem, not cert.pem) of a publicly trusted CA; for a private CA pass --ca-file CA.pem (Cursor will still refuse it)".into(),
        }
    }
}

/// The facts about a served chain that doctor reports.
#[derive(Debug, Clone)]
pub struct CertReport {
    pub subject: String,
    pub issuer: String,
    /// DNS names and IPs of the subjectAltName extension.
    pub names: Vec<String>,
    pub not_after: String,
    pub days_left: i64,
    /// Empty when everything is fine.
    pub problems: Vec<Problem>,
}

/// The leaf that hop 3 saw; hops 7 and 8 trust exactly this certificate and nothing else.
#[derive(Debug, Clone)]
pub struct PinnedLeaf(pub CertificateDer<'static>);

/// Trust anchors: Mozilla's roots (`webpki-roots`) plus every certificate in `ca_files`.
pub struct Roots {
    extra: Vec<CertificateDer<'static>>,
}

impl Roots {
    /// Reads the `--ca-file` PEM files; the error names the file and the fix.
    pub fn load(ca_files: &[std::path::PathBuf]) -> Result<Roots, String> {
        let mut extra = Vec::new();
        for f in ca_files {
            let pem = std::fs::read(f).map_err(|e| format!("--ca-file {}: {e}", f.display()))?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--ca-file {}: not PEM certificates: {e}", f.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "--ca-file {}: holds no -----BEGIN CERTIFICATE----- block; fix: pass the CA certificate in PEM",
                    f.display()
                ));
            }
            extra.extend(certs);
        }
        Ok(Roots { extra })
    }

    fn anchors(&self) -> Result<Vec<rustls::pki_types::TrustAnchor<'_>>, String> {
        let mut v: Vec<_> = webpki_roots::TLS_SERVER_ROOTS.to_vec();
        for c in &self.extra {
            v.push(
                webpki::anchor_from_trusted_cert(c)
                    .map_err(|e| format!("a --ca-file certificate is unusable as a root: {e:?}"))?,
            );
        }
        Ok(v)
    }
}

/// Judges `chain` (leaf first) for `name` at `now`.
pub fn analyse(
    chain: &[CertificateDer<'_>],
    name: &str,
    roots: &Roots,
    min_days: u32,
    now: SystemTime,
) -> Result<CertReport, String> {
    let leaf = chain.first().ok_or("the server sent no certificate")?;
    let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("the served certificate is not valid X.509: {e}"))?;
    let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let not_before = x.validity().not_before.timestamp();
    let not_after = x.validity().not_after.timestamp();
    // Truncated toward zero: "2 days ago" for an expiry 2.5 days back, like `days_ago` below.
    let days_left = (not_after - now_s) / 86_400;
    let subject = x.subject().to_string();
    let issuer = x.issuer().to_string();
    let names = served_names(&x);
    let mut problems = Vec::new();
    if now_s > not_after {
        problems.push(Problem::Expired {
            not_after: rfc3339(not_after),
            days_ago: (now_s - not_after).div_euclid(86_400),
        });
    } else if now_s < not_before {
        problems.push(Problem::NotYetValid {
            not_before: rfc3339(not_before),
        });
    }

    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| format!("the served certificate is not usable by WebPKI: {e:?}"))?;
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|_| format!("{name:?} is not a DNS name or IP address"))?;
    if ee.verify_is_valid_for_subject_name(&server_name).is_err() {
        problems.push(Problem::WrongName {
            name: name.to_string(),
            covers: names.clone(),
        });
    }

    // Trust is judged at a moment inside the leaf's validity, so an expired certificate is
    // reported as expired (above) and, separately, as trusted or not.
    let at = if now_s > not_after || now_s < not_before {
        not_before + (not_after - not_before) / 2
    } else {
        now_s
    };
    if let Err(reason) = chains_to(&ee, &chain[1..], roots, at)? {
        problems.push(Problem::Untrusted {
            self_signed: x.subject() == x.issuer(),
            issuer: issuer.clone(),
            reason,
        });
    }
    let in_validity = (not_before..=not_after).contains(&now_s);
    if in_validity && days_left < i64::from(min_days) {
        problems.push(Problem::ExpiresSoon {
            not_after: rfc3339(not_after),
            days_left,
            min_days,
        });
    }
    Ok(CertReport {
        subject,
        issuer,
        names,
        not_after: rfc3339(not_after),
        days_left,
        problems,
    })
}

/// The DNS names and IP addresses of the leaf's subjectAltName, in their order (an unreadable
/// extension or an odd-length address is left out; these are for the report, webpki checks
/// the name itself).
fn served_names(x: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        names.push(std::net::Ipv4Addr::from(a).to_string());
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        names.push(std::net::Ipv6Addr::from(a).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    names
}

/// Whether `ee` chains through `intermediates` to one of `roots` at `at` (Unix seconds): the
/// inner error is why not, in words; the outer one a trust store that cannot be used.
fn chains_to(
    ee: &webpki::EndEntityCert<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &Roots,
    at: i64,
) -> Result<Result<(), String>, String> {
    let anchors = roots.anchors()?;
    let verified = ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        intermediates,
        UnixTime::since_unix_epoch(Duration::from_secs(at.max(0) as u64)),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    );
    Ok(verified.map(drop).map_err(|e| match e {
        webpki::Error::UnknownIssuer => {
            "no chain to a trusted root (missing intermediates, or a private CA)".to_string()
        }
        e => format!("{e:?}"),
    }))
}

/// Records the chain the server presents and accepts it; the handshake signature is still
/// verified, so the server proved it holds the certificate's key.
#[derive(Debug)]
struct Capture {
    provider: Arc<CryptoProvider>,
    chain: Mutex<Vec<CertificateDer<'static>>>,
}

/// Accepts exactly one certificate (the pinned leaf), nothing else.
#[derive(Debug)]
struct Pinned {
    provider: Arc<CryptoProvider>,
    leaf: CertificateDer<'static>,
}

macro_rules! delegate_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.chain.lock().unwrap_or_else(PoisonError::into_inner) = chain;
        Ok(ServerCertVerified::assertion())
    }
    delegate_signatures!();
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the listener now serves another certificate than the one checked in hop 3".into(),
            ))
        }
    }
    delegate_signatures!();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, String> {
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS client setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(c)
}

/// The SNI to send for `name` (an IP literal sends none, as browsers do).
pub fn server_name(name: &str, target: SocketAddr) -> ServerName<'static> {
    ServerName::try_from(name.to_string()).unwrap_or_else(|_| ServerName::from(target.ip()))
}

/// TLS connection to `target` presenting SNI `name`, bounded by [`HANDSHAKE_TIMEOUT`].
async fn connect(
    target: SocketAddr,
    name: &str,
    config: ClientConfig,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let work = async {
        let tcp = TcpStream::connect(target)
            .await
            .map_err(|e| format!("TCP connect to {target}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server_name(name, target), tcp)
            .await
            .map_err(|e| format!("TLS handshake with {target}: {e}"))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| {
            format!("TLS handshake with {target}: no answer within {HANDSHAKE_TIMEOUT:?}")
        })?
}

/// Handshakes with `target` (SNI `name`) and returns the chain it served, leaf first.
pub async fn fetch_chain(
    target: SocketAddr,
    name: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let capture = Arc::new(Capture {
        provider: provider(),
        chain: Mutex::new(Vec::new()),
    });
    let config = client_config(capture.clone(), &[b"h2", b"http/1.1"])?;
    let _stream = connect(target, name, config).await?;
    let chain = std::mem::take(&mut *capture.chain.lock().unwrap_or_else(PoisonError::into_inner));
    if chain.is_empty() {
        return Err(format!(
            "{target} completed a handshake without a certificate"
        ));
    }
    Ok(chain)
}

/// An HTTP/1.1-over-TLS connection to `target` that trusts only `pin`.
pub async fn connect_pinned(
    target: SocketAddr,
    name: &str,
    pin: &PinnedLeaf,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let pinned = Arc::new(Pinned {
        provider: provider(),
        leaf: pin.0.clone(),
    });
    connect(target, name, client_config(pinned, &[b"http/1.1"])?).await
}

#[cfg(test)]
mod tests;
