use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::UNIX_EPOCH;

use super::*;
use crate::keys::format;
use crate::keys::DB_FILE;
use crate::policy::{Budget, BudgetPeriod, Endpoint, KeyPolicy};

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn policy() -> KeyPolicy {
    KeyPolicy {
        models: vec!["llama*".into()],
        endpoints: vec![Endpoint::ChatCompletions],
        expires_at: Some(UNIX_EPOCH + Duration::from_millis(4_102_444_799_123)),
        allow_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        rpm: Some(60),
        tpm: Some(100_000),
        max_concurrent: Some(4),
        budget: Some(Budget {
            tokens: 1_000_000,
            period: BudgetPeriod::Month,
        }),
        policy: Some("developers".into()),
        missing_policy: false,
    }
}

#[test]
fn create_list_get_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut s = KeyStore::open(&state).unwrap();
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join(DB_FILE)), 0o600);
    assert_eq!(mode(&state.join(SECRET_FILE)), 0o600);
    assert_eq!(fs::read(state.join(SECRET_FILE)).unwrap().len(), 32);

    let c = s
        .create(NewKey {
            name: "alice".into(),
            policy: policy(),
        })
        .unwrap();
    assert_eq!(c.policy, policy());
    assert_eq!(c.expires_at, policy().expires_at);
    let r = s.get("alice").unwrap();
    assert_eq!(r.id, c.id);
    assert_eq!(r.created_at, c.created_at);
    assert_eq!(r.policy, policy());
    assert_eq!(r.status(SystemTime::now()), KeyStatus::Active);
    assert_eq!(s.get(&c.id).unwrap(), r);
    assert_eq!(s.list().unwrap(), vec![r.clone()]);
    // The secret is nowhere in the database file.
    drop(s);
    let db = fs::read(state.join(DB_FILE)).unwrap();
    let secret = format::parse(c.secret.expose())
        .unwrap()
        .secret()
        .as_bytes();
    assert!(!db.windows(secret.len()).any(|w| w == secret));
    // Reopening keeps everything (and does not re-run migrations).
    let s = KeyStore::open(&state).unwrap();
    assert_eq!(s.list().unwrap(), vec![r]);
}

#[test]
fn names_unique_among_active_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = KeyStore::open(dir.path()).unwrap();
    let new = || NewKey {
        name: "bob".into(),
        policy: KeyPolicy::default(),
    };
    let first = s.create(new()).unwrap();
    assert!(matches!(s.create(new()), Err(StoreError::NameExists(n)) if n == "bob"));
    let revoked = s.revoke("bob").unwrap();
    assert_eq!(revoked.status(SystemTime::now()), KeyStatus::Revoked);
    assert!(matches!(s.revoke("bob"), Err(StoreError::Revoked(_))));
    assert!(matches!(s.rotate("bob", None), Err(StoreError::Revoked(_))));
    let second = s.create(new()).unwrap();
    assert_ne!(first.id, second.id);
    // `get` prefers the live key; the old one stays reachable by id.
    assert_eq!(s.get("bob").unwrap().id, second.id);
    assert_eq!(
        s.get(&first.id).unwrap().status(SystemTime::now()),
        KeyStatus::Revoked
    );
    assert_eq!(s.list().unwrap().len(), 2);
    assert!(matches!(s.get("carol"), Err(StoreError::NotFound(_))));
    assert!(matches!(s.revoke("carol"), Err(StoreError::NotFound(_))));
    // After revoking the second too, `get` shows the most recently revoked.
    s.revoke("bob").unwrap();
    assert_eq!(s.get("bob").unwrap().id, second.id);
}

#[test]
fn revocations_within_one_millisecond_keep_their_order() {
    // Two keys of one name revoked at the same instant (a fast machine does all of the test
    // above within a millisecond): the later revocation still sorts later.
    let dir = tempfile::tempdir().unwrap();
    let mut s = KeyStore::open(dir.path()).unwrap();
    let new = || NewKey {
        name: "bob".into(),
        policy: KeyPolicy::default(),
    };
    let at = truncate_ms(SystemTime::now());
    let first = s.create(new()).unwrap();
    let r1 = s.backend.revoke_key("bob", at).unwrap();
    let second = s.create(new()).unwrap();
    let r2 = s.backend.revoke_key("bob", at).unwrap();
    assert_eq!(r1.id, first.id);
    assert_eq!(r1.revoked_at, Some(at));
    assert!(r2.revoked_at > r1.revoked_at, "{r1:?} then {r2:?}");
    assert_eq!(s.get("bob").unwrap().id, second.id);
}

#[test]
fn invalid_names_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = KeyStore::open(dir.path()).unwrap();
    for bad in ["", "-x", "a b", "ä", &"x".repeat(65)] {
        let e = s
            .create(NewKey {
                name: bad.into(),
                policy: KeyPolicy::default(),
            })
            .unwrap_err();
        assert!(matches!(e, StoreError::InvalidName { .. }), "{bad}");
        assert!(e.to_string().contains("fix:"));
    }
    for good in ["a", "alice@corp.example", "ci_bot-2", "X.Y"] {
        assert!(check_key_name(good).is_ok(), "{good}");
    }
}

#[test]
fn rotate_keeps_id_and_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = KeyStore::open(dir.path()).unwrap();
    let c = s
        .create(NewKey {
            name: "ci".into(),
            policy: policy(),
        })
        .unwrap();
    let r = s.rotate("ci", Some(Duration::from_secs(60))).unwrap();
    assert_eq!(r.id, c.id);
    assert_eq!(r.policy, c.policy);
    assert_ne!(r.secret, c.secret);
    assert!(r.previous_valid_until.unwrap() > SystemTime::now());
    let rec = s.get("ci").unwrap();
    assert_eq!(rec.previous_valid_until, r.previous_valid_until);
    assert!(rec.rotated_at.is_some());
    let r2 = s.rotate("ci", None).unwrap();
    assert_eq!(r2.previous_valid_until, None);
    assert_eq!(s.get("ci").unwrap().previous_valid_until, None);
}

#[test]
fn rotate_refuses_expired() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = KeyStore::open(dir.path()).unwrap();
    s.create(NewKey {
        name: "old".into(),
        policy: KeyPolicy {
            expires_at: Some(UNIX_EPOCH + Duration::from_secs(1)),
            ..Default::default()
        },
    })
    .unwrap();
    assert!(matches!(s.rotate("old", None), Err(StoreError::Expired(_))));
}

#[test]
fn secret_mode_and_length_checked() {
    let dir = tempfile::tempdir().unwrap();
    drop(KeyStore::open(dir.path()).unwrap());
    let p = dir.path().join(SECRET_FILE);
    let original = fs::read(&p).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    let e = KeyStore::open(dir.path()).unwrap_err();
    assert!(matches!(e, StoreError::SecretMode { mode: 0o640, .. }));
    let msg = e.to_string();
    assert!(
        msg.contains(&p.display().to_string()) && msg.contains("chmod 600"),
        "{msg}"
    );
    fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
    KeyStore::open(dir.path()).unwrap();
    // A short file is an error, never silently replaced (that would invalidate every key).
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&p, b"short").unwrap();
    assert!(matches!(
        KeyStore::open(dir.path()),
        Err(StoreError::SecretLength { len: 5, .. })
    ));
    fs::write(&p, &original).unwrap();
    KeyStore::open(dir.path()).unwrap();
}

#[test]
fn concurrent_first_open_agrees_on_one_secret() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let d = d.clone();
            std::thread::spawn(move || KeyStore::open(&d).unwrap().server_secret().bytes())
        })
        .collect();
    let secrets: Vec<[u8; 32]> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(secrets.windows(2).all(|w| w[0] == w[1]));
    // No temporary files left.
    let names: Vec<_> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn debug_masks_server_secret() {
    assert_eq!(
        format!("{:?}", ServerSecret::generate()),
        "ServerSecret(****)"
    );
}
