//! The public listener's TLS over real sockets: self-signed and file certificates complete a
//! handshake with a client that trusts them, a reload (explicit or by the file watcher) swaps
//! the certificate for new connections while an established connection keeps working, and
//! insecure or broken files are refused with one-line errors that name the file and the fix.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelgate::config::TlsConfig;
use modelgate::tls::{TlsState, SELF_SIGNED_CERT_FILE, SELF_SIGNED_KEY_FILE};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A CA and a leaf for `name` it signed, as PEM.
struct Pki {
    ca_pem: String,
    leaf_pem: String,
    leaf_der: CertificateDer<'static>,
    key_pem: String,
}

fn pki(name: &str) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "modelgate test CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    leaf.not_after = rcgen::date_time_ymd(2090, 1, 2);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        leaf_pem: leaf_cert.pem(),
        leaf_der: leaf_cert.der().clone(),
        key_pem: leaf_key.serialize_pem(),
    }
}

/// Writes `p`'s chain and key into `dir` (key 0600) and returns the files config.
fn write_files(dir: &Path, p: &Pki) -> TlsConfig {
    let cert = dir.join("fullchain.pem");
    let key = dir.join("privkey.pem");
    replace(&cert, &format!("{}{}", p.leaf_pem, p.ca_pem), 0o644);
    replace(&key, &p.key_pem, 0o600);
    TlsConfig::Files { cert, key }
}

/// Replaces `path` like certbot and `install` do: a new file renamed over the old one.
fn replace(path: &Path, text: &str, mode: u32) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A TLS echo server (one line in, the same line out) on 127.0.0.1:0.
async fn serve(state: &TlsState) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(state.server_config());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (r, mut w) = tokio::io::split(tls);
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn connector(roots_pem: &[&str], alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for pem in roots_pem {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // A resumed session reports the certificate of the session it resumes; these tests look at
    // what a full handshake serves.
    cfg.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(cfg))
}

async fn connect(
    c: &TlsConnector,
    addr: std::net::SocketAddr,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    c.connect(name, tcp).await
}

async fn echo(s: &mut TlsStream<TcpStream>, msg: &str) -> String {
    s.write_all(format!("{msg}\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    loop {
        let mut b = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(s, &mut b)
            .await
            .unwrap();
        if b[0] == b'\n' {
            return String::from_utf8(buf).unwrap();
        }
        buf.push(b[0]);
    }
}

fn leaf_of(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0].clone()
}

#[tokio::test]
async fn self_signed_handshake_for_the_name_localhost_and_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let state = TlsState::load(
        &TlsConfig::SelfSigned {
            name: "gw.test".into(),
        },
        &state_dir,
    )
    .unwrap();
    let key = state_dir.join(SELF_SIGNED_KEY_FILE);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let cert_pem = std::fs::read_to_string(state_dir.join(SELF_SIGNED_CERT_FILE)).unwrap();
    let addr = serve(&state).await;
    let client = connector(&[&cert_pem], &[b"h2", b"http/1.1"]);
    for name in ["gw.test", "localhost", "127.0.0.1"] {
        let mut s = connect(&client, addr, name).await.unwrap();
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "{name}");
        assert_eq!(echo(&mut s, name).await, name);
    }
    // A client that only speaks HTTP/1.1 gets it.
    let h1 = connector(&[&cert_pem], &[b"http/1.1"]);
    let s = connect(&h1, addr, "gw.test").await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // Other names are not covered.
    assert!(connect(&client, addr, "evil.test").await.is_err());
    let expiry = state.not_after().unwrap();
    let left = expiry.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(300 * 86_400));

    // A restart reuses the stored certificate, so clients that trust it keep working.
    let again = TlsState::load(
        &TlsConfig::SelfSigned {
            name: "gw.test".into(),
        },
        &state_dir,
    )
    .unwrap();
    assert_eq!(again.not_after(), Some(expiry));
    assert_eq!(
        std::fs::read_to_string(state_dir.join(SELF_SIGNED_CERT_FILE)).unwrap(),
        cert_pem
    );
}

#[tokio::test]
async fn file_certificate_signed_by_a_ca_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki("gw.test");
    let state = TlsState::load(&write_files(dir.path(), &p), dir.path()).unwrap();
    let addr = serve(&state).await;
    let client = connector(&[&p.ca_pem], &[b"h2", b"http/1.1"]);
    let mut s = connect(&client, addr, "gw.test").await.unwrap();
    assert_eq!(leaf_of(&s), p.leaf_der);
    assert_eq!(echo(&mut s, "hello").await, "hello");
    // 2090-01-02T00:00:00Z
    let expiry = state
        .not_after()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(expiry, 3_786_998_400);
}

#[tokio::test]
async fn reload_swaps_the_certificate_for_new_connections_only() {
    let dir = tempfile::tempdir().unwrap();
    let one = pki("gw.test");
    let two = pki("gw.test");
    let cfg = write_files(dir.path(), &one);
    let state = TlsState::load(&cfg, dir.path()).unwrap();
    let addr = serve(&state).await;
    let client = connector(&[&one.ca_pem, &two.ca_pem], &[b"http/1.1"]);

    let mut established = connect(&client, addr, "gw.test").await.unwrap();
    assert_eq!(leaf_of(&established), one.leaf_der);
    assert_eq!(echo(&mut established, "before").await, "before");

    write_files(dir.path(), &two);
    state.reload().unwrap();
    let mut fresh = connect(&client, addr, "gw.test").await.unwrap();
    assert_eq!(leaf_of(&fresh), two.leaf_der);
    assert_eq!(echo(&mut fresh, "new").await, "new");
    // The connection made before the reload keeps its session.
    assert_eq!(echo(&mut established, "after").await, "after");

    // A broken replacement is refused and the current certificate stays.
    let TlsConfig::Files { cert, .. } = &cfg else {
        unreachable!()
    };
    replace(cert, "not a certificate\n", 0o644);
    let e = state.reload().unwrap_err().to_string();
    assert!(e.contains(&cert.display().to_string()), "{e}");
    let s = connect(&client, addr, "gw.test").await.unwrap();
    assert_eq!(leaf_of(&s), two.leaf_der);
}

#[tokio::test]
async fn watcher_reloads_changed_files_and_stops_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let one = pki("gw.test");
    let two = pki("gw.test");
    let state = Arc::new(TlsState::load(&write_files(dir.path(), &one), dir.path()).unwrap());
    let addr = serve(&state).await;
    let client = connector(&[&one.ca_pem, &two.ca_pem], &[b"http/1.1"]);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(state.clone().watch(stop_rx));

    let mut established = connect(&client, addr, "gw.test").await.unwrap();
    write_files(dir.path(), &two);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = connect(&client, addr, "gw.test").await.unwrap();
        if leaf_of(&s) == two.leaf_der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the watcher did not pick up the new files"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(echo(&mut established, "still here").await, "still here");

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("the watcher stops when asked")
        .unwrap();
}

fn load_err(cfg: &TlsConfig, state_dir: &Path) -> String {
    let e = TlsState::load(cfg, state_dir).unwrap_err().to_string();
    assert!(!e.contains('\n'), "one line: {e}");
    assert!(e.contains("; fix: "), "{e}");
    e
}

fn files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("fullchain.pem"), dir.join("privkey.pem"))
}

#[test]
fn readable_private_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_files(dir.path(), &pki("gw.test"));
    let (_, key) = files(dir.path());
    for mode in [0o640, 0o604, 0o644] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = load_err(&cfg, dir.path());
        assert!(e.contains(&key.display().to_string()), "{e}");
        assert!(e.contains(&format!("chmod 600 {}", key.display())), "{e}");
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
    TlsState::load(&cfg, dir.path()).unwrap();
}

#[test]
fn garbage_missing_and_mismatched_files_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki("gw.test");
    let cfg = write_files(dir.path(), &p);
    let (cert, key) = files(dir.path());

    replace(&cert, "hello, I am not PEM\n", 0o644);
    let e = load_err(&cfg, dir.path());
    assert!(
        e.starts_with(&format!("TLS certificate file {}", cert.display())),
        "{e}"
    );
    assert!(e.contains("no -----BEGIN CERTIFICATE----- block"), "{e}");

    replace(
        &cert,
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        0o644,
    );
    let e = load_err(&cfg, dir.path());
    assert!(e.contains("not valid PEM"), "{e}");

    // Valid PEM around bytes that are not a certificate.
    replace(
        &cert,
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        0o644,
    );
    let e = load_err(&cfg, dir.path());
    assert!(e.contains("not valid X.509"), "{e}");

    replace(&cert, &p.leaf_pem, 0o644);
    replace(&key, "garbage\n", 0o600);
    let e = load_err(&cfg, dir.path());
    assert!(
        e.starts_with(&format!("TLS private key file {}", key.display())),
        "{e}"
    );
    assert!(e.contains("PRIVATE KEY"), "{e}");

    replace(&key, &pki("gw.test").key_pem, 0o600);
    let e = load_err(&cfg, dir.path());
    assert!(e.contains("does not match the certificate"), "{e}");

    std::fs::remove_file(&cert).unwrap();
    let e = load_err(&cfg, dir.path());
    assert!(e.contains(&cert.display().to_string()), "{e}");
    assert!(e.contains("No such file"), "{e}");
}

/// Mode `acme` before the first issuance: a placeholder is served, the listener also offers
/// `acme-tls/1` (last, so HTTP clients never get it), and a validation handshake for a name
/// without a challenge in progress fails instead of getting a certificate.
#[tokio::test]
async fn acme_mode_serves_a_placeholder_and_refuses_unsolicited_validations() {
    let dir = tempfile::tempdir().unwrap();
    let state = TlsState::load(
        &TlsConfig::Acme {
            domain: "gw.example.com".into(),
            email: None,
            directory: None,
            ca_root: None,
        },
        dir.path(),
    )
    .unwrap();
    let st = state.acme_status().unwrap();
    assert!(!st.issued, "{st:?}");
    assert_eq!(st.directory, modelgate::tls::acme::DEFAULT_DIRECTORY);
    assert_eq!(
        state.server_config().alpn_protocols,
        [&b"h2"[..], b"http/1.1", b"acme-tls/1"]
    );
    let addr = serve(&state).await;
    let validator = connector(&[&pki("x").ca_pem], &[b"acme-tls/1"]);
    let e = connect(&validator, addr, "gw.example.com")
        .await
        .unwrap_err();
    assert!(e.to_string().to_lowercase().contains("alert"), "{e}");
}
