//! The shared PostgreSQL store against a real, throwaway PostgreSQL 15 cluster (started by
//! each test in its own directory, stopped by PID): the backend (keys made on one appliance
//! authenticate on another; the secret fingerprint; the password file), the watcher (a revoke
//! seen within 1 s; ledger commits cause no reload), the ledger's spool across a PostgreSQL
//! kill (exact totals afterwards, batch ids never counted twice), `store migrate` from a used
//! SQLite store (run twice), and the CLI verbs against the shared store.

#[path = "../support/pg.rs"]
mod pg;
#[path = "../support/skip.rs"]
mod skip;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use modelgate::keys::ledger::{Ledger, LedgerOptions, LedgerWriter, UsageEvent, SPOOL_FILE};
use modelgate::keys::{
    migrate, AuthError, KeyRing, KeyStore, Keys, NewKey, PgStoreConfig, StoreConfig, StoreError,
    SECRET_FILE,
};
use modelgate::policy::Policies;

fn have_pg(test: &str) -> bool {
    match pg::missing() {
        None => true,
        Some(why) => skip::missing(test, &why),
    }
}

/// One appliance's state directory.
struct Appliance {
    dir: tempfile::TempDir,
}

impl Appliance {
    fn new() -> Appliance {
        Appliance {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn state(&self) -> &Path {
        self.dir.path()
    }
    /// A second appliance of the same deployment: its own directory, the same keys.secret.
    fn sibling(&self) -> Appliance {
        let b = Appliance::new();
        let secret = self.state().join(SECRET_FILE);
        if !secret.exists() {
            drop(KeyStore::open(self.state()).unwrap());
        }
        std::fs::copy(&secret, b.state().join(SECRET_FILE)).unwrap();
        b
    }
}

fn store_cfg(pg: &pg::Pg, db: &str, dir: &Path) -> StoreConfig {
    StoreConfig::Postgres(PgStoreConfig {
        url: pg.url(db),
        password_file: Some(pg.password_file(dir)),
        ca_file: None,
    })
}

fn new_key(name: &str) -> NewKey {
    NewKey {
        name: name.into(),
        policy: Default::default(),
    }
}

fn event(key: &str, p: u64, c: u64) -> UsageEvent {
    UsageEvent {
        key_id: Arc::from(key),
        at: SystemTime::now(),
        prompt_tokens: p,
        completion_tokens: c,
        estimated: false,
    }
}

#[test]
fn keys_made_on_one_appliance_work_on_another_and_a_foreign_secret_is_refused() {
    if !have_pg("keys_made_on_one_appliance_work_on_another") {
        return;
    }
    let pg = pg::Pg::start();
    pg.createdb("mg1");
    let a = Appliance::new();
    let cfg = store_cfg(&pg, "mg1", a.state());
    let mut sa = KeyStore::open_in(a.state(), &cfg).unwrap();
    assert!(sa.is_shared());
    let alice = sa.create(new_key("alice")).unwrap();
    let bob = sa.create(new_key("bob")).unwrap();
    assert!(matches!(
        sa.create(new_key("alice")),
        Err(StoreError::NameExists(_))
    ));

    // B shares the secret: A's keys authenticate there.
    let b = a.sibling();
    let sb = KeyStore::open_in(b.state(), &cfg).unwrap();
    let ring = KeyRing::load(&sb, &Policies::new()).unwrap();
    let now = SystemTime::now();
    assert_eq!(
        ring.authenticate(alice.secret.expose(), now).unwrap().id,
        alice.id
    );
    // Revoke and rotate from B; A sees both.
    let mut sb = sb;
    sb.revoke("bob").unwrap();
    let rotated = sb.rotate("alice", None).unwrap();
    let ring = KeyRing::load(&sa, &Policies::new()).unwrap();
    assert!(matches!(
        ring.authenticate(bob.secret.expose(), now),
        Err(AuthError::Revoked)
    ));
    assert!(matches!(
        ring.authenticate(alice.secret.expose(), now),
        Err(AuthError::Unknown)
    ));
    assert!(ring.authenticate(rotated.secret.expose(), now).is_ok());
    let list = sa.list().unwrap();
    assert_eq!(list.len(), 2);
    assert!(sa.get("bob").unwrap().revoked_at.is_some());
    assert!(matches!(sa.revoke("bob"), Err(StoreError::Revoked(_))));
    assert!(matches!(sa.revoke("carol"), Err(StoreError::NotFound(_))));

    // An appliance with its own secret is refused, naming the fix.
    let c = Appliance::new();
    let e = KeyStore::open_in(c.state(), &store_cfg(&pg, "mg1", c.state())).unwrap_err();
    assert!(matches!(e, StoreError::SecretMismatch { .. }), "{e}");
    assert!(e.to_string().contains("copy keys.secret"), "{e}");

    // A password file others can read is refused; a wrong password names the store.
    let d = a.sibling();
    let pw = pg.password_file(d.state());
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let open_cfg = StoreConfig::Postgres(PgStoreConfig {
        url: pg.url("mg1"),
        password_file: Some(pw.clone()),
        ca_file: None,
    });
    let e = KeyStore::open_in(d.state(), &open_cfg).unwrap_err();
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::write(&pw, "wrong\n").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let e = KeyStore::open_in(d.state(), &open_cfg).unwrap_err();
    assert!(matches!(e, StoreError::Postgres { .. }), "{e}");
    assert!(!e.to_string().contains(pg::PASSWORD), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_on_one_appliance_reaches_the_others_watcher_within_a_second() {
    if !have_pg("a_revoke_on_one_appliance_reaches_the_others_watcher") {
        return;
    }
    let pg = pg::Pg::start();
    pg.createdb("mg");
    let a = Appliance::new();
    let cfg = store_cfg(&pg, "mg", a.state());
    let (key, cfg2) = {
        let cfg = cfg.clone();
        let dir = a.state().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut s = KeyStore::open_in(&dir, &cfg).unwrap();
            (s.create(new_key("k")).unwrap(), cfg)
        })
        .await
        .unwrap()
    };
    let b = a.sibling();
    let keys = Keys::new(KeyRing::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(
        keys.clone()
            .watch(b.state().to_path_buf(), cfg2.clone(), stop_rx),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while keys.loads() < 1 {
        assert!(Instant::now() < deadline, "watcher never loaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(keys
        .current()
        .authenticate(key.secret.expose(), SystemTime::now())
        .is_ok());

    // Ledger commits from A (several a second) cause no reload on B.
    let (dir, c) = (a.state().to_path_buf(), cfg2.clone());
    let id = key.id.clone();
    tokio::task::spawn_blocking(move || {
        let mut l = Ledger::open_in(&dir, &c).unwrap();
        for _ in 0..20 {
            l.write(&[event(&id, 1, 1)]).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    assert_eq!(keys.loads(), 1, "ledger commits reloaded the keys");

    // Revoke on A: B answers Revoked within 1 s.
    let (dir, c) = (a.state().to_path_buf(), cfg2.clone());
    let t0 = tokio::task::spawn_blocking(move || {
        let mut s = KeyStore::open_in(&dir, &c).unwrap();
        s.revoke("k").unwrap();
        Instant::now()
    })
    .await
    .unwrap();
    loop {
        let r = keys
            .current()
            .authenticate(key.secret.expose(), SystemTime::now());
        if matches!(r, Err(AuthError::Revoked)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "revoke not seen within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = t0.elapsed();
    eprintln!("revoke on A seen on B after {seen:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(keys.loads(), 2, "one key change, one reload");
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

#[test]
fn a_batch_applied_twice_counts_once() {
    if !have_pg("a_batch_applied_twice_counts_once") {
        return;
    }
    let pg = pg::Pg::start();
    pg.createdb("mg");
    let a = Appliance::new();
    let cfg = store_cfg(&pg, "mg", a.state());
    let mut s = KeyStore::open_in(a.state(), &cfg).unwrap();
    let k = s.create(new_key("k")).unwrap();
    drop(s);
    let mut l = Ledger::open_in(a.state(), &cfg).unwrap();
    // The same batch twice (a retry after a lost answer, a spool replay): applied once.
    let batch = [event(&k.id, 10, 5), event(&k.id, 1, 1)];
    assert!(l.write_batch("batch-1", &batch).unwrap());
    assert!(!l.write_batch("batch-1", &batch).unwrap());
    let u = l.usage(&k.id, SystemTime::now()).unwrap();
    assert_eq!(u.total.prompt_tokens, 11);
    assert_eq!(u.total.requests, 2);
    // Another id is another batch.
    assert!(l.write_batch("batch-2", &batch).unwrap());
    assert_eq!(l.usage(&k.id, SystemTime::now()).unwrap().total.requests, 4);
}

/// The ledger writer on a shared store with PostgreSQL killed mid-stream: usage goes to the
/// spool (durable, visible as degraded), and once PostgreSQL is back the store holds exactly
/// what was recorded: nothing lost, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_mid_stream_spools_then_the_ledger_is_exact() {
    if !have_pg("postgres_killed_mid_stream_spools_then_the_ledger_is_exact") {
        return;
    }
    let mut pg = pg::Pg::start();
    pg.createdb("mg");
    let a = Appliance::new();
    let cfg = store_cfg(&pg, "mg", a.state());
    let (dir, c) = (a.state().to_path_buf(), cfg.clone());
    let (key, ledger) = tokio::task::spawn_blocking(move || {
        let mut s = KeyStore::open_in(&dir, &c).unwrap();
        let k = s.create(new_key("k")).unwrap();
        (k, Ledger::open_in(&dir, &c).unwrap())
    })
    .await
    .unwrap();
    let opts = LedgerOptions {
        flush_every: Duration::from_millis(50),
        spool: Some(a.state().join(SPOOL_FILE)),
        ..LedgerOptions::default()
    };
    let (writer, task) = LedgerWriter::start(ledger, opts);
    let mut sent = (0u64, 0u64);
    let mut record = |n: u64, w: &LedgerWriter| {
        for i in 0..n {
            assert!(w.record(event(&key.id, 3 + i % 5, 7)));
            sent.0 += 3 + i % 5;
            sent.1 += 1;
        }
    };
    for _ in 0..10 {
        record(20, &writer);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::task::block_in_place(|| pg.kill());
    for _ in 0..20 {
        record(20, &writer);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Degraded and spooling, said with a time.
    let deadline = Instant::now() + Duration::from_secs(10);
    while writer
        .stats()
        .spool_rows
        .load(std::sync::atomic::Ordering::Acquire)
        == 0
    {
        assert!(Instant::now() < deadline, "nothing spooled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (since, why) = writer
        .stats()
        .degraded()
        .expect("degraded while PostgreSQL is down");
    assert!(since <= SystemTime::now());
    assert!(!why.is_empty());
    tokio::task::block_in_place(|| pg.launch());
    for _ in 0..5 {
        record(20, &writer);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while writer
        .stats()
        .spool_rows
        .load(std::sync::atomic::Ordering::Acquire)
        > 0
        || writer.stats().degraded().is_some()
    {
        assert!(
            Instant::now() < deadline,
            "spool not drained: {:?}",
            writer.stats().degraded()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats_spooled = writer
        .stats()
        .spooled
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(stats_spooled > 0, "nothing went through the spool");
    drop(writer);
    task.finished().await;
    let (dir, c, id) = (a.state().to_path_buf(), cfg.clone(), key.id.clone());
    let u = tokio::task::spawn_blocking(move || {
        Ledger::open_in(&dir, &c)
            .unwrap()
            .usage(&id, SystemTime::now())
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        u.total.requests, sent.1,
        "requests in the store vs recorded"
    );
    assert_eq!(u.total.prompt_tokens, sent.0);
    assert_eq!(u.total.completion_tokens, 7 * sent.1);
}

/// `store migrate` from a used SQLite store: keys keep working (same secret, same HMACs),
/// usage totals equal; run again, nothing doubles; run after more usage, only that is added.
#[test]
fn store_migrate_from_a_used_sqlite_store_is_exact_and_safe_to_rerun() {
    if !have_pg("store_migrate_from_a_used_sqlite_store") {
        return;
    }
    let pg = pg::Pg::start();
    pg.createdb("mg");
    let a = Appliance::new();
    let mut s = KeyStore::open(a.state()).unwrap();
    let k1 = s.create(new_key("one")).unwrap();
    let k2 = s.create(new_key("two")).unwrap();
    s.revoke("two").unwrap();
    let k3 = s.rotate("one", Some(Duration::from_secs(3600))).unwrap();
    drop(s);
    let mut l = Ledger::open(a.state()).unwrap();
    let long_ago = SystemTime::now() - Duration::from_secs(10 * 86_400);
    let mut old = event(&k1.id, 100, 50);
    old.at = long_ago;
    l.write(&[old.clone(), old, event(&k1.id, 7, 3), event(&k2.id, 1, 1)])
        .unwrap();
    l.compact(SystemTime::now() - Duration::from_secs(2 * 86_400))
        .unwrap();
    let before = (
        l.usage(&k1.id, SystemTime::now()).unwrap().total,
        l.usage(&k2.id, SystemTime::now()).unwrap().total,
    );
    let to = match store_cfg(&pg, "mg", a.state()) {
        StoreConfig::Postgres(p) => p,
        StoreConfig::Sqlite => unreachable!(),
    };
    let r = migrate::sqlite_to_postgres(a.state(), &to).unwrap();
    assert_eq!(r.keys, 2);
    assert_eq!(r.tokens, 2 * 150 + 10 + 2);
    let shared = StoreConfig::Postgres(to.clone());
    let check = |extra: u64| {
        let s = KeyStore::open_in(a.state(), &shared).unwrap();
        let ring = KeyRing::load(&s, &Policies::new()).unwrap();
        let now = SystemTime::now();
        // The rotated key's new secret and (within grace) its old one; the revoked one stays revoked.
        assert!(ring.authenticate(k3.secret.expose(), now).is_ok());
        assert!(ring.authenticate(k1.secret.expose(), now).is_ok());
        assert!(matches!(
            ring.authenticate(k2.secret.expose(), now),
            Err(AuthError::Revoked)
        ));
        let l = Ledger::from_store(s).unwrap();
        let u1 = l.usage(&k1.id, now).unwrap().total;
        assert_eq!(u1.prompt_tokens, before.0.prompt_tokens + extra);
        assert_eq!(u1.requests, before.0.requests + u64::from(extra > 0));
        assert_eq!(l.usage(&k2.id, now).unwrap().total, before.1);
    };
    check(0);
    // Again: nothing doubles.
    migrate::sqlite_to_postgres(a.state(), &to).unwrap();
    check(0);
    // More usage on the SQLite store, then migrate: only that is added.
    Ledger::open(a.state())
        .unwrap()
        .write(&[event(&k1.id, 1000, 0)])
        .unwrap();
    migrate::sqlite_to_postgres(a.state(), &to).unwrap();
    check(1000);
    // Another deployment's secret cannot migrate into this store.
    let other = Appliance::new();
    drop(KeyStore::open(other.state()).unwrap());
    let e = migrate::sqlite_to_postgres(other.state(), &to).unwrap_err();
    assert!(matches!(e, StoreError::SecretMismatch { .. }), "{e}");
}

fn mg(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("MODELGATE_CONFIG")
        .output()
        .unwrap()
}

fn ok(config: &Path, args: &[&str]) -> String {
    let o = mg(config, args);
    assert!(
        o.status.success(),
        "modelgate {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `init --store-url` on two appliances (the second with the first's keys.secret) and every
/// key verb through the binary: a key made on A is listed, rotated and revoked from B.
#[test]
fn cli_key_verbs_work_against_the_shared_store() {
    if !have_pg("cli_key_verbs_work_against_the_shared_store") {
        return;
    }
    let pg = pg::Pg::start();
    pg.createdb("mg");
    let root = tempfile::tempdir().unwrap();
    let pw = pg.password_file(root.path());
    let url = pg.url("mg");
    let init = |name: &str| -> (PathBuf, PathBuf) {
        let config = root.path().join(format!("{name}.toml"));
        let state = root.path().join(name);
        let out = mg(
            &config,
            &[
                "init",
                "--public-endpoint",
                &format!("{name}.example.com:51820"),
                "--state-dir",
                state.to_str().unwrap(),
                "--store-url",
                &url,
                "--store-password-file",
                pw.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "init {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (config, state)
    };
    let (ca, sa) = init("a");
    assert!(std::fs::read_to_string(&ca).unwrap().contains("[store]"));
    // B without A's secret: refused, nothing written, the fix named.
    let cb = root.path().join("b.toml");
    let sb = root.path().join("b");
    let out = mg(
        &cb,
        &[
            "init",
            "--public-endpoint",
            "b.example.com:51820",
            "--state-dir",
            sb.to_str().unwrap(),
            "--store-url",
            &url,
            "--store-password-file",
            pw.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("copy keys.secret"));
    assert!(!cb.exists());
    std::fs::copy(sa.join(SECRET_FILE), sb.join(SECRET_FILE)).unwrap();
    let (cb, _) = init("b");

    let created: serde_json::Value =
        serde_json::from_str(&ok(&ca, &["key", "create", "alice", "--json"])).unwrap();
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&cb, &["key", "list", "--json"])).unwrap();
    assert!(listed.to_string().contains(created["id"].as_str().unwrap()));
    ok(&cb, &["key", "show", "alice"]);
    ok(&cb, &["key", "rotate", "alice"]);
    ok(&cb, &["key", "revoke", "alice", "--yes"]);
    let shown = ok(&ca, &["key", "show", "alice", "--json"]);
    assert!(shown.contains("revoked"), "{shown}");
}

/// TLS to the server through rustls: the server's certificate from a test CA is accepted with
/// `ca_file` and refused without it (the Mozilla roots do not know it); `sslmode=require`
/// against a server without TLS is refused.
#[test]
fn tls_to_the_server_is_verified_against_ca_file() {
    if !have_pg("tls_to_the_server_is_verified_against_ca_file") {
        return;
    }
    let pg = pg::Pg::start_tls();
    pg.createdb("mg");
    let a = Appliance::new();
    let cfg = |ca: Option<PathBuf>| {
        StoreConfig::Postgres(PgStoreConfig {
            url: pg.tls_url("mg"),
            password_file: Some(pg.password_file(a.state())),
            ca_file: ca,
        })
    };
    let mut s = KeyStore::open_in(a.state(), &cfg(Some(pg.ca_file()))).unwrap();
    s.create(new_key("over-tls")).unwrap();
    assert_eq!(s.list().unwrap().len(), 1);
    let e = KeyStore::open_in(a.state(), &cfg(None)).unwrap_err();
    assert!(
        e.to_string().to_lowercase().contains("certificate")
            || e.to_string().to_lowercase().contains("issuer"),
        "{e}"
    );
    // A server without TLS, asked for it.
    let plain = pg::Pg::start();
    let e = KeyStore::open_in(
        a.state(),
        &StoreConfig::Postgres(PgStoreConfig {
            url: plain.tls_url("postgres"),
            password_file: Some(plain.password_file(a.state())),
            ca_file: Some(pg.ca_file()),
        }),
    )
    .unwrap_err();
    assert!(matches!(e, StoreError::Postgres { .. }), "{e}");
}
