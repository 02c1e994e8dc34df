//! TLS-ALPN-01 (RFC 8737) on the public HTTPS port: the challenge certificates and the one
//! decision the certificate resolver needs, "is this handshake an ACME validation?".
//!
//! The validation server connects to port 443, sends SNI = the domain and offers exactly one
//! ALPN protocol, `acme-tls/1` (RFC 8737 §3). It must get a self-signed certificate for the
//! domain carrying the critical acmeIdentifier extension (id-pe-acmeIdentifier,
//! 1.3.6.1.5.5.7.1.31) with the SHA-256 of the key authorization. After the handshake it sends
//! nothing and closes; the gateway's accept loop closes such a connection at once and never
//! hands it to HTTP ([`is_acme_alpn`]).
//!
//! Must never: answer a challenge for a name it was not asked to validate, or serve a challenge
//! certificate to a client that also offered an HTTP protocol.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::ClientHello;
use rustls::sign::CertifiedKey;

/// The ALPN protocol identifier of TLS-ALPN-01 (RFC 8737 §6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// True when the negotiated ALPN protocol of a finished handshake is `acme-tls/1`: the
/// connection was an ACME validation and must be closed without reading from it.
pub fn is_acme_alpn(negotiated: Option<&[u8]>) -> bool {
    negotiated == Some(ACME_TLS_ALPN)
}

/// True when the client offers `acme-tls/1` and nothing else (RFC 8737 §3: the validation
/// server offers only that protocol). A client that also offers h2 or http/1.1 is a normal
/// client and gets the normal certificate.
pub fn offers_only_acme(alpn: Option<impl Iterator<Item = impl AsRef<[u8]>>>) -> bool {
    let Some(mut protos) = alpn else {
        return false;
    };
    matches!(protos.next(), Some(p) if p.as_ref() == ACME_TLS_ALPN) && protos.next().is_none()
}

/// Challenge certificates currently offered, by lower-case DNS name. Written by the issuing
/// task for the few seconds a validation takes; read by every `acme-tls/1` handshake.
#[derive(Debug, Default)]
pub struct Challenges {
    certs: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    /// The challenge certificate for this ClientHello, when it is an ACME validation for a
    /// name with a challenge in progress.
    pub fn resolve(&self, hello: &ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if !offers_only_acme(hello.alpn()) {
            return None;
        }
        let name = hello.server_name()?.to_ascii_lowercase();
        let found = self
            .certs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&name)
            .cloned();
        if found.is_none() {
            tracing::debug!(
                name,
                "acme-tls/1 handshake for a name without a challenge in progress"
            );
        }
        found
    }

    /// Offers `cert` for `name` until the returned guard is dropped.
    pub fn offer(self: &Arc<Self>, name: &str, cert: Arc<CertifiedKey>) -> Offer {
        let name = name.to_ascii_lowercase();
        self.certs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.clone(), cert);
        Offer {
            challenges: self.clone(),
            name,
        }
    }

    fn withdraw(&self, name: &str) {
        self.certs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    /// Number of challenges in progress (tests).
    #[cfg(test)]
    fn in_progress(&self) -> usize {
        self.certs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A challenge certificate on offer; dropping it withdraws the certificate, whatever way the
/// issuance ends (success, error, timeout, task cancelled).
#[derive(Debug)]
pub struct Offer {
    challenges: Arc<Challenges>,
    name: String,
}

impl Drop for Offer {
    fn drop(&mut self) {
        self.challenges.withdraw(&self.name);
    }
}

/// Builds the TLS-ALPN-01 certificate for `domain`: self-signed, SAN = `domain`, with the
/// critical acmeIdentifier extension holding `digest` (SHA-256 of the key authorization).
pub fn certificate(
    domain: &str,
    digest: &[u8],
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    if digest.len() != 32 {
        return Err(format!(
            "key authorization digest has {} bytes, expected 32 (SHA-256)",
            digest.len()
        ));
    }
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()])
        .map_err(|e| format!("challenge certificate for {domain:?}: {e}"))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "modelgate ACME challenge");
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // Not `CertifiedKey::from_der`: its key/certificate consistency check parses the
    // certificate with webpki, which (rightly, for a client) refuses the unknown critical
    // extension. The key was generated for this certificate a line above.
    let signing_key = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing_key,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lone_acme_tls_offer_is_a_validation() {
        let v = |p: &[&[u8]]| offers_only_acme(Some(p.iter().copied()));
        assert!(v(&[b"acme-tls/1"]));
        assert!(!v(&[b"h2", b"acme-tls/1"]));
        assert!(!v(&[b"acme-tls/1", b"http/1.1"]));
        assert!(!v(&[b"h2"]));
        assert!(!v(&[]));
        assert!(!offers_only_acme(None::<std::iter::Empty<&[u8]>>));
        assert!(is_acme_alpn(Some(b"acme-tls/1")));
        assert!(!is_acme_alpn(Some(b"h2")));
        assert!(!is_acme_alpn(None));
    }

    #[test]
    fn challenge_certificate_carries_the_critical_acme_identifier() {
        let provider = rustls::crypto::ring::default_provider();
        let digest = [7u8; 32];
        let ck = certificate("gw.example.com", &digest, &provider).unwrap();
        let der = ck.cert[0].as_ref();
        // id-pe-acmeIdentifier 1.3.6.1.5.5.7.1.31, critical TRUE, OCTET STRING { OCTET STRING(32) }.
        let ext: Vec<u8> = [
            &[0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f][..],
            &[0x01, 0x01, 0xff, 0x04, 0x22, 0x04, 0x20],
            &digest,
        ]
        .concat();
        assert!(
            der.windows(ext.len()).any(|w| w == ext.as_slice()),
            "acmeIdentifier extension not found"
        );
        let info = crate::tls::x509::parse_leaf(der).unwrap();
        assert_eq!(info.dns_names, ["gw.example.com"]);
        assert!(certificate("gw.example.com", &[0; 31], &provider).is_err());
    }

    #[test]
    fn offers_are_withdrawn_when_dropped() {
        let provider = rustls::crypto::ring::default_provider();
        let ch = Arc::new(Challenges::default());
        let ck = certificate("gw.example.com", &[1; 32], &provider).unwrap();
        {
            let _a = ch.offer("GW.example.com", ck);
            assert_eq!(ch.in_progress(), 1);
        }
        assert_eq!(ch.in_progress(), 0);
    }
}
