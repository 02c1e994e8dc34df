//! Unit tests of the ACME manager: tls-alpn-01 challenge handshakes, retries against an
//! unreachable CA, a bad CA root, the stored account.

use super::*;
use crate::config::TlsConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Accepts any certificate: the validation server checks the acmeIdentifier itself, and
/// the challenge certificate's critical extension is unknown to webpki.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One handshake over an in-memory pipe: (negotiated ALPN, leaf served) or the error.
async fn handshake(
    tls: &TlsState,
    sni: &str,
    alpn: &[&[u8]],
) -> Result<(Option<Vec<u8>>, CertificateDer<'static>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let (c, s) = tokio::io::duplex(64 << 10);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let server = tokio::spawn(async move {
        acceptor
            .accept(s)
            .await
            .map(|s| s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let client = connector
        .connect(name, c)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = client.get_ref().1.peer_certificates().unwrap()[0].clone();
    let negotiated = server.await.unwrap().map_err(|e| e.to_string())?;
    assert!(is_acme_alpn(negotiated.as_deref()) == (alpn == [ACME_TLS_ALPN]));
    Ok((negotiated, leaf))
}

#[tokio::test]
async fn tls_alpn_01_handshake_gets_the_challenge_only_while_offered() {
    let dir = tempfile::tempdir().unwrap();
    let tls = TlsState::load(
        &TlsConfig::Acme {
            domain: "gw.example.com".into(),
            email: None,
            directory: None,
            ca_root: None,
        },
        dir.path(),
    )
    .unwrap();
    let acme = tls.acme.clone().unwrap();
    let provider = rustls::crypto::ring::default_provider();
    let digest = [0x5au8; 32];
    let challenge = challenge::certificate("gw.example.com", &digest, &provider).unwrap();
    let challenge_der = challenge.cert[0].clone();

    // Normal clients get the placeholder, before and during a challenge.
    let (alpn, placeholder) = handshake(&tls, "gw.example.com", &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    // No challenge in progress: a validation handshake fails.
    assert!(handshake(&tls, "gw.example.com", &[ACME_TLS_ALPN])
        .await
        .is_err());

    let offer = acme.challenges.offer("gw.example.com", challenge);
    let (alpn, leaf) = handshake(&tls, "GW.example.com", &[ACME_TLS_ALPN])
        .await
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(ACME_TLS_ALPN));
    assert_eq!(leaf, challenge_der);
    // Another name, or a client that also offers HTTP: no challenge certificate.
    assert!(handshake(&tls, "other.example.com", &[ACME_TLS_ALPN])
        .await
        .is_err());
    let (_, leaf) = handshake(&tls, "gw.example.com", &[b"h2", ACME_TLS_ALPN])
        .await
        .unwrap();
    assert_eq!(leaf, placeholder);

    drop(offer);
    assert!(handshake(&tls, "gw.example.com", &[ACME_TLS_ALPN])
        .await
        .is_err());
}

/// The CA cannot be reached: the failure is recorded for `status`, retried after the
/// first backoff step, and the placeholder stays in service.
#[tokio::test]
async fn unreachable_ca_is_retried_with_backoff_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let tls = Arc::new(
        TlsState::load(
            &TlsConfig::Acme {
                domain: "gw.example.com".into(),
                email: Some("ops@example.com".into()),
                // Port 1 on loopback: refused at once.
                directory: Some("https://127.0.0.1:1/directory".into()),
                ca_root: None,
            },
            dir.path(),
        )
        .unwrap(),
    );
    let before = tls.not_after();
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(tls.clone().watch(stop_rx));
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = tls.acme_status().unwrap();
        if st.failures > 0 {
            break st;
        }
        assert!(Instant::now() < deadline, "no failure recorded: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(st.failures, 1);
    assert!(!st.issued);
    assert!(st.last_error.is_some(), "{st:?}");
    let retry = st
        .next_renewal
        .unwrap()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        retry > Duration::from_secs(5) && retry <= schedule::FIRST_RETRY,
        "{retry:?}"
    );
    assert_eq!(tls.not_after(), before, "the placeholder was replaced");
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the ACME task did not stop")
        .unwrap();
}

#[test]
fn a_bad_ca_root_is_named_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let missing = dir.path().join("nope.pem");
    let e = http::client(Some(&missing), &provider).err().unwrap();
    assert!(e.contains("tls.acme_ca_root") && e.contains("fix:"), "{e}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no certificate here\n").unwrap();
    let e = http::client(Some(&empty), &provider).err().unwrap();
    assert!(e.contains("no -----BEGIN CERTIFICATE-----"), "{e}");
}

#[test]
fn stored_account_round_trips() {
    // The account file format: directory + instant-acme's credentials (opaque JSON).
    let json = r#"{"directory":"https://ca.test/dir","credentials":{"id":"https://ca.test/acct/1","key_pkcs8":"AAAA","directory":"https://ca.test/dir"}}"#;
    let s: StoredAccount = serde_json::from_str(json).unwrap();
    assert_eq!(s.directory, "https://ca.test/dir");
}
