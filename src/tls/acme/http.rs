//! The HTTPS client that talks to the ACME directory: hyper + rustls with ring named
//! explicitly (no process-wide crypto provider), the system's roots plus `tls.acme_ca_root`
//! (a private or test CA such as pebble), HTTP/1.1 and HTTP/2, and a connect timeout.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, HttpClient};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Deadline for the TCP connection to the ACME server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An ACME HTTP client trusting the system's roots and, when given, the PEM root(s) in
/// `ca_root`. The error is one line that names the file or the trust store.
pub(super) fn client(
    ca_root: Option<&Path>,
    provider: &Arc<CryptoProvider>,
) -> Result<Box<dyn HttpClient>, String> {
    let extra = match ca_root {
        None => Vec::new(),
        Some(path) => {
            let roots = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    format!(
                        "tls.acme_ca_root {}: {e}; fix: point it at the PEM root certificate of the ACME server's HTTPS endpoint",
                        path.display()
                    )
                })?;
            if roots.is_empty() {
                return Err(format!(
                    "tls.acme_ca_root {}: no -----BEGIN CERTIFICATE----- block; fix: point it at a PEM certificate",
                    path.display()
                ));
            }
            roots
        }
    };
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
            .map_err(|e| {
                format!(
                    "cannot build the trust store for the ACME server: {e}; fix: install the system CA certificates (Debian: ca-certificates) or set tls.acme_ca_root"
                )
            })?;
    let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS client setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let client: Client<_, BodyWrapper<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    Ok(Box::new(client))
}
