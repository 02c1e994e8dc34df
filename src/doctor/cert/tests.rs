//! Unit tests of hop 3's judging: certificates issued by a test CA for each problem, and garbage.

use super::*;

struct Issued {
    chain: Vec<CertificateDer<'static>>,
    ca_pem: String,
}

/// A test CA and a leaf for `names`, valid from `from` to `until` days relative to today.
fn issue(names: &[&str], from: i64, until: i64, self_signed: bool) -> Issued {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "doctor test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    crate::tls::x509::set_validity_days(&mut p, -from, until);
    let leaf = if self_signed {
        p.self_signed(&key).unwrap()
    } else {
        p.signed_by(&key, &issuer).unwrap()
    };
    Issued {
        chain: vec![leaf.der().clone()],
        ca_pem: ca_cert.pem(),
    }
}

fn roots_with(ca_pem: Option<&str>) -> Roots {
    match ca_pem {
        None => Roots::load(&[]).unwrap(),
        Some(pem) => {
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("ca.pem");
            std::fs::write(&f, pem).unwrap();
            Roots::load(&[f]).unwrap()
        }
    }
}

#[test]
fn a_good_chain_from_a_trusted_ca_passes() {
    let c = issue(&["gw.test"], -1, 90, false);
    let r = analyse(
        &c.chain,
        "gw.test",
        &roots_with(Some(&c.ca_pem)),
        14,
        SystemTime::now(),
    )
    .unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.names, ["gw.test"]);
    assert!((88..=90).contains(&r.days_left), "{}", r.days_left);
}

#[test]
fn each_problem_is_named() {
    let c = issue(&["gw.test"], -1, 90, false);
    // Without the test CA: not publicly trusted (but not self-signed).
    let r = analyse(
        &c.chain,
        "gw.test",
        &roots_with(None),
        14,
        SystemTime::now(),
    )
    .unwrap();
    assert!(
        matches!(
            &r.problems[..],
            [Problem::Untrusted {
                self_signed: false,
                ..
            }]
        ),
        "{:?}",
        r.problems
    );
    // Wrong name.
    let r = analyse(
        &c.chain,
        "other.test",
        &roots_with(Some(&c.ca_pem)),
        14,
        SystemTime::now(),
    )
    .unwrap();
    assert!(
        matches!(&r.problems[..], [Problem::WrongName { covers, .. }] if covers == &["gw.test"]),
        "{:?}",
        r.problems
    );
    // Expired, and still judged trusted apart from that.
    let old = issue(&["gw.test"], -60, -3, false);
    let r = analyse(
        &old.chain,
        "gw.test",
        &roots_with(Some(&old.ca_pem)),
        14,
        SystemTime::now(),
    )
    .unwrap();
    assert!(
        matches!(&r.problems[..], [Problem::Expired { days_ago, .. }] if (2..=3).contains(days_ago)),
        "{:?}",
        r.problems
    );
    assert!(r.problems[0].describe().starts_with("EXPIRED on "));
    // Near expiry, against the configurable threshold.
    let soon = issue(&["gw.test"], -30, 5, false);
    let roots = roots_with(Some(&soon.ca_pem));
    let r = analyse(&soon.chain, "gw.test", &roots, 14, SystemTime::now()).unwrap();
    assert!(
        matches!(&r.problems[..], [Problem::ExpiresSoon { .. }]),
        "{:?}",
        r.problems
    );
    let r = analyse(&soon.chain, "gw.test", &roots, 3, SystemTime::now()).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    // Several problems are all listed, the most serious first.
    let r = analyse(
        &soon.chain,
        "gw.test",
        &roots_with(None),
        14,
        SystemTime::now(),
    )
    .unwrap();
    assert!(
        matches!(
            &r.problems[..],
            [Problem::Untrusted { .. }, Problem::ExpiresSoon { .. }]
        ),
        "{:?}",
        r.problems
    );
    // Self-signed.
    let ss = issue(&["gw.test"], -1, 90, true);
    let r = analyse(
        &ss.chain,
        "gw.test",
        &roots_with(None),
        14,
        SystemTime::now(),
    )
    .unwrap();
    assert!(
        matches!(
            &r.problems[..],
            [Problem::Untrusted {
                self_signed: true,
                ..
            }]
        ),
        "{:?}",
        r.problems
    );
    assert_eq!(
        r.problems[0].describe(),
        "self-signed, not publicly trusted: Cursor will refuse it"
    );
    assert!(r.problems[0]
        .fix("self-signed", "gw.test")
        .contains("--acme-domain gw.test"));
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let junk = [CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01])];
    assert!(analyse(&junk, "gw.test", &roots_with(None), 14, SystemTime::now()).is_err());
    assert!(analyse(&[], "gw.test", &roots_with(None), 14, SystemTime::now()).is_err());
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.pem");
    std::fs::write(&f, "nothing here").unwrap();
    let e = Roots::load(&[f]).err().unwrap();
    assert!(e.contains("no -----BEGIN CERTIFICATE-----"), "{e}");
}
