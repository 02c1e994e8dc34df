use std::time::{Duration, Instant, UNIX_EPOCH};

use super::*;
use crate::keys::{NewKey, Secret};
use crate::policy::KeyPolicy;

fn principal(id: &str, expires_at: Option<SystemTime>) -> Arc<Principal> {
    Arc::new(Principal {
        id: id.into(),
        name: "t".into(),
        policy: KeyPolicy {
            expires_at,
            ..Default::default()
        },
    })
}

#[test]
fn for_tests_ring_authenticates() {
    let k = format::generate();
    let ring = KeyRing::for_tests(vec![(k.expose().into(), principal(k.id(), None))]);
    let now = SystemTime::now();
    assert_eq!(ring.authenticate(k.expose(), now).unwrap().id, k.id());
    // Same id, other secret: unknown. Other id: unknown. Garbage: malformed.
    let other = format::generate_for(k.id());
    assert_eq!(
        ring.authenticate(other.expose(), now),
        Err(AuthError::Unknown)
    );
    assert_eq!(
        ring.authenticate(format::generate().expose(), now),
        Err(AuthError::Unknown)
    );
    assert_eq!(ring.authenticate("sk-nope", now), Err(AuthError::Malformed));
    assert_eq!(
        KeyRing::default().authenticate(k.expose(), now),
        Err(AuthError::Unknown)
    );
}

#[test]
fn expiry_at_the_instant() {
    let at = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    let k = format::generate();
    let ring = KeyRing::for_tests(vec![(k.expose().into(), principal(k.id(), Some(at)))]);
    assert!(ring
        .authenticate(k.expose(), at - Duration::from_millis(1))
        .is_ok());
    assert_eq!(ring.authenticate(k.expose(), at), Err(AuthError::Expired));
    assert_eq!(
        ring.counts(at),
        RingCounts {
            total: 1,
            active: 0,
            revoked: 0,
            expired: 1
        }
    );
}

#[test]
fn store_round_trip_with_rotation_and_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = KeyStore::open(dir.path()).unwrap();
    let a = s
        .create(NewKey {
            name: "a".into(),
            policy: KeyPolicy::default(),
        })
        .unwrap();
    let now = SystemTime::now();
    let ring = KeyRing::load(&s, &Policies::new()).unwrap();
    let p = ring.authenticate(a.secret.expose(), now).unwrap();
    assert_eq!((p.id.as_str(), p.name.as_str()), (a.id.as_str(), "a"));

    let b = s.rotate("a", Some(Duration::from_secs(30))).unwrap();
    let until = b.previous_valid_until.unwrap();
    let ring = KeyRing::load(&s, &Policies::new()).unwrap();
    assert!(ring.authenticate(a.secret.expose(), now).is_ok());
    assert!(ring.authenticate(b.secret.expose(), now).is_ok());
    assert!(ring
        .authenticate(a.secret.expose(), until - Duration::from_millis(1))
        .is_ok());
    assert_eq!(
        ring.authenticate(a.secret.expose(), until),
        Err(AuthError::Unknown)
    );
    assert!(ring.authenticate(b.secret.expose(), until).is_ok());

    s.revoke("a").unwrap();
    let ring = KeyRing::load(&s, &Policies::new()).unwrap();
    assert_eq!(
        ring.authenticate(b.secret.expose(), now),
        Err(AuthError::Revoked)
    );
    // Revocation also ends a grace period.
    assert_eq!(
        ring.authenticate(a.secret.expose(), now),
        Err(AuthError::Unknown)
    );
}

#[test]
fn test_rings_take_real_keys_and_skip_malformed_ones() {
    let now = SystemTime::now();
    let good = format::generate();
    let expired = format::generate();
    let ring = KeyRing::for_tests(vec![
        (good.expose().to_string(), principal("good", None)),
        (
            expired.expose().to_string(),
            principal("expired", Some(now - Duration::from_secs(1))),
        ),
        ("mg_not_a_real_key".into(), principal("bogus", None)),
    ]);
    assert_eq!(ring.authenticate(good.expose(), now).unwrap().id, "good");
    assert_eq!(
        ring.authenticate(expired.expose(), now),
        Err(AuthError::Expired)
    );
    assert_eq!(
        ring.authenticate("mg_not_a_real_key", now),
        Err(AuthError::Malformed)
    );
    assert_eq!(ring.counts(now).total, 2);
}

/// Not a benchmark (debug build, shared CI machine): prints the mean so regressions show.
#[test]
fn authenticate_ten_thousand_times() {
    let keys: Vec<Secret> = (0..100).map(|_| format::generate()).collect();
    let ring = KeyRing::for_tests(
        keys.iter()
            .map(|k| (k.expose().to_string(), principal(k.id(), None)))
            .collect(),
    );
    let now = SystemTime::now();
    let n = 10_000;
    let start = Instant::now();
    for i in 0..n {
        let k = &keys[i % keys.len()];
        assert!(ring.authenticate(k.expose(), now).is_ok());
    }
    let per = start.elapsed() / n as u32;
    println!(
        "KeyRing::authenticate: {per:?} per call over {n} calls ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
}
