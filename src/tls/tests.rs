//! Unit tests of the TLS setup: ACME mode's placeholder then stored certificate, and the
//! self-signed certificate kept, replaced and refused.

use super::*;

#[test]
fn acme_serves_a_placeholder_until_issued_then_the_stored_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TlsConfig::Acme {
        domain: "gw.example.com".into(),
        email: None,
        directory: Some("https://127.0.0.1:1/dir".into()),
        ca_root: None,
    };
    let a = TlsState::load(&cfg, dir.path()).unwrap();
    let st = a.acme_status().unwrap();
    assert!(!st.issued);
    assert!(st.next_renewal.unwrap() <= SystemTime::now());
    assert!(a
        .server_config()
        .alpn_protocols
        .contains(&acme::ACME_TLS_ALPN.to_vec()));
    assert_eq!(
        a.server_config().alpn_protocols.first().map(Vec::as_slice),
        Some(&b"h2"[..])
    );

    // A stored certificate for the domain (as the task writes it) is served at start.
    let key_pair = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["gw.example.com".into()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let cert = params.self_signed(&key_pair).unwrap();
    let acme_dir = dir.path().join(acme::ACME_DIR);
    std::fs::create_dir_all(&acme_dir).unwrap();
    write_atomic(
        &acme_dir.join(acme::KEY_FILE),
        key_pair.serialize_pem().as_bytes(),
        0o600,
    )
    .unwrap();
    write_atomic(
        &acme_dir.join(acme::CERT_FILE),
        cert.pem().as_bytes(),
        0o600,
    )
    .unwrap();
    let b = TlsState::load(&cfg, dir.path()).unwrap();
    let st = b.acme_status().unwrap();
    assert!(st.issued);
    let exp = SystemTime::UNIX_EPOCH + Duration::from_secs(4_070_908_800); // 2099-01-01
    assert_eq!(st.not_after, Some(exp));
    assert_eq!(b.not_after(), Some(exp));
    // Long-lived: renewal 30 days ahead of expiry.
    assert_eq!(
        st.next_renewal,
        Some(exp - Duration::from_secs(30 * 86_400))
    );

    // Not covering the domain: back to the placeholder (and a renewal due now).
    let other = TlsConfig::Acme {
        domain: "other.example.com".into(),
        email: None,
        directory: None,
        ca_root: None,
    };
    let c = TlsState::load(&other, dir.path()).unwrap();
    assert!(!c.acme_status().unwrap().issued);

    // A readable key is refused loudly.
    std::fs::set_permissions(
        acme_dir.join(acme::KEY_FILE),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let e = TlsState::load(&cfg, dir.path()).unwrap_err().to_string();
    assert!(e.contains("chmod 600"), "{e}");
}

#[test]
fn self_signed_is_kept_across_loads_and_replaced_when_the_name_changes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TlsConfig::SelfSigned {
        name: "gw.example.com".into(),
    };
    let a = TlsState::load(&cfg, dir.path()).unwrap();
    let key = dir.path().join(SELF_SIGNED_KEY_FILE);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let first = std::fs::read(dir.path().join(SELF_SIGNED_CERT_FILE)).unwrap();
    let left = a
        .not_after()
        .unwrap()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(left > Duration::from_secs(360 * 86_400), "{left:?}");

    let _b = TlsState::load(&cfg, dir.path()).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join(SELF_SIGNED_CERT_FILE)).unwrap(),
        first
    );

    let other = TlsConfig::SelfSigned {
        name: "10.0.0.7".into(),
    };
    let _c = TlsState::load(&other, dir.path()).unwrap();
    let third = std::fs::read(dir.path().join(SELF_SIGNED_CERT_FILE)).unwrap();
    assert_ne!(third, first);
    let der = CertificateDer::from_pem_slice(&third).unwrap();
    let info = x509::parse_leaf(&der).unwrap();
    assert_eq!(info.dns_names, ["localhost"]);
    assert_eq!(
        info.ips,
        [
            "10.0.0.7".parse::<IpAddr>().unwrap(),
            "127.0.0.1".parse().unwrap()
        ]
    );
}

#[test]
fn self_signed_with_readable_key_is_refused_and_broken_files_are_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TlsConfig::SelfSigned {
        name: "gw.example.com".into(),
    };
    TlsState::load(&cfg, dir.path()).unwrap();
    let key = dir.path().join(SELF_SIGNED_KEY_FILE);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = TlsState::load(&cfg, dir.path()).unwrap_err().to_string();
    assert!(e.contains("chmod 600"), "{e}");

    std::fs::write(&key, "garbage").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    TlsState::load(&cfg, dir.path()).unwrap();
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .contains("PRIVATE KEY"));
}
