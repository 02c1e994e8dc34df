//! Two gateways ("appliances" A and B) on one shared PostgreSQL store, built the way the
//! daemon builds them (a watched key set, a ledger writer with its spool), each with its own
//! tunnel to one echo model whose own request count is the reference. Clients alternate
//! between them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use modelgate::demo::model::EchoModel;
use modelgate::keys::ledger::{
    Ledger, LedgerOptions, LedgerStats, LedgerTask, LedgerWriter, SPOOL_FILE,
};
use modelgate::keys::{KeyRing, KeyStore, Keys, NewKey, PgStoreConfig, StoreConfig, SECRET_FILE};
use modelgate::policy::{Budget, BudgetPeriod, KeyPolicy, Policies};
use tokio::sync::watch;

use crate::harness::{corp_upstream, Reply, Stack, StackOptions};
use crate::{pg, skip};

struct Appliance {
    dir: tempfile::TempDir,
    stack: Stack,
    keys: Arc<Keys>,
    ledger: Arc<LedgerStats>,
    _task: LedgerTask,
    _stop: watch::Sender<bool>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn appliance(dir: tempfile::TempDir, cfg: &StoreConfig, model: &EchoModel) -> Appliance {
    let (d, c) = (dir.path().to_path_buf(), cfg.clone());
    let (ring, ledger) = blocking(move || {
        let s = KeyStore::open_in(&d, &c).unwrap();
        let ring = KeyRing::load(&s, &Policies::new()).unwrap();
        (ring, Ledger::open_in(&d, &c).unwrap())
    })
    .await;
    let keys = Keys::new(ring);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(
        keys.clone()
            .watch(dir.path().to_path_buf(), cfg.clone(), stop_rx),
    );
    let (writer, task) = LedgerWriter::start(
        ledger,
        LedgerOptions {
            flush_every: Duration::from_millis(50),
            spool: Some(dir.path().join(SPOOL_FILE)),
            ..LedgerOptions::default()
        },
    );
    let stats = writer.stats_handle();
    let mut o = StackOptions::new(Vec::new(), vec![corp_upstream("m", &[])]);
    o.live_keys = Some(keys.clone());
    o.ledger = Some(writer);
    let m = model.clone();
    let stack = Stack::start(o, move |s| m.clone().serve_connection(s)).await;
    stack.wait_tunnel().await;
    // As the daemon does on a shared store: every key's day and month usage from the store.
    tokio::spawn(modelgate::keys::ledger::sync_budgets(
        stack.handle.load().limiter.clone(),
        dir.path().to_path_buf(),
        cfg.clone(),
        stop_tx.subscribe(),
    ));
    Appliance {
        dir,
        stack,
        keys,
        ledger: stats,
        _task: task,
        _stop: stop_tx,
    }
}

const BODY: &str =
    r#"{"model":"echo","messages":[{"role":"user","content":"hello there"}],"max_tokens":8}"#;

async fn chat(a: &Appliance, key: &str) -> Reply {
    let auth = format!("Bearer {key}");
    a.stack
        .call(
            "POST",
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("authorization", &auth),
            ],
            Bytes::from_static(BODY.as_bytes()),
        )
        .await
}

async fn wait_models(a: &Appliance, key: &str) {
    let t = Instant::now();
    loop {
        let auth = format!("Bearer {key}");
        let r = a
            .stack
            .call(
                "GET",
                "/v1/models",
                &[("authorization", &auth)],
                Bytes::new(),
            )
            .await;
        if r.status == 200 && r.body().contains("\"echo\"") {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "models: {} {}",
            r.status,
            r.body()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_one_postgres_store_revoke_outage_and_one_gone() {
    if let Some(why) = pg::missing() {
        skip::missing("two_gateways_one_postgres_store", &why);
        return;
    }
    let mut pg = blocking(pg::Pg::start).await;
    pg.createdb("mg");
    let dir_a = tempfile::tempdir().unwrap();
    let cfg = StoreConfig::Postgres(PgStoreConfig {
        url: pg.url("mg"),
        password_file: Some(pg.password_file(dir_a.path())),
        ca_file: None,
    });
    let (d, c) = (dir_a.path().to_path_buf(), cfg.clone());
    let key = blocking(move || {
        KeyStore::open_in(&d, &c)
            .unwrap()
            .create(NewKey {
                name: "k".into(),
                policy: Default::default(),
            })
            .unwrap()
    })
    .await;
    let secret = key.secret.expose().to_string();
    let dir_b = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir_a.path().join(SECRET_FILE),
        dir_b.path().join(SECRET_FILE),
    )
    .unwrap();

    let model = EchoModel::new("echo", Duration::from_millis(1));
    let a = appliance(dir_a, &cfg, &model).await;
    let b = appliance(dir_b, &cfg, &model).await;
    wait_models(&a, &secret).await;
    wait_models(&b, &secret).await;

    // Alternating clients; PostgreSQL SIGKILLed after a third, back after two thirds: no
    // request fails.
    let n = 60;
    for i in 0..n {
        if i == n / 3 {
            blocking_kill(&mut pg).await;
        }
        if i == 2 * n / 3 {
            // Both appliances noticed and spool.
            let t = Instant::now();
            while a.ledger.degraded().is_none() || b.ledger.degraded().is_none() {
                assert!(t.elapsed() < Duration::from_secs(10), "outage not noticed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            pg = blocking_launch(pg).await;
        }
        let app = if i % 2 == 0 { &a } else { &b };
        let r = chat(app, &secret).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body());
    }
    // The ledger equals the model's own count once both spools drained.
    let t = Instant::now();
    loop {
        let spooled = a.ledger.spool_rows.load(Ordering::Acquire)
            + b.ledger.spool_rows.load(Ordering::Acquire);
        let (d, c, id) = (a.dir.path().to_path_buf(), cfg.clone(), key.id.clone());
        let total = blocking(move || {
            Ledger::open_in(&d, &c)
                .ok()
                .and_then(|l| l.usage(&id, SystemTime::now()).ok())
                .map(|u| u.total.requests)
        })
        .await;
        let seen = model.stats.requests.load(Ordering::Relaxed);
        if spooled == 0 && total == Some(seen) && a.ledger.degraded().is_none() {
            assert_eq!(seen, n as u64);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "ledger {total:?} vs model {seen}, spooled {spooled}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        a.ledger.spooled.load(Ordering::Relaxed) + b.ledger.spooled.load(Ordering::Relaxed) > 0
    );

    // Revoke through A's store: B answers 401 within 1 s, after exactly one reload.
    let loads_before = b.keys.loads();
    let (d, c) = (a.dir.path().to_path_buf(), cfg.clone());
    let t0 = blocking(move || {
        KeyStore::open_in(&d, &c).unwrap().revoke("k").unwrap();
        Instant::now()
    })
    .await;
    loop {
        let r = chat(&b, &secret).await;
        if r.status == 401 {
            break;
        }
        assert_eq!(r.status, 200);
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "B still admits the revoked key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("revoke on A: 401 on B after {:?}", t0.elapsed());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        b.keys.loads(),
        loads_before + 1,
        "one key change, one reload on B"
    );

    // A new key, then A gone: B goes on serving it.
    let (d, c) = (b.dir.path().to_path_buf(), cfg.clone());
    let k2 = blocking(move || {
        KeyStore::open_in(&d, &c)
            .unwrap()
            .create(NewKey {
                name: "k2".into(),
                policy: Default::default(),
            })
            .unwrap()
    })
    .await;
    let s2 = k2.secret.expose().to_string();
    a.stack.stop();
    drop(a);
    let t = Instant::now();
    let mut ok = 0;
    while ok < 10 {
        let r = chat(&b, &s2).await;
        if r.status == 200 {
            ok += 1;
        } else {
            assert_eq!(r.status, 401, "{}", r.body());
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "new key not live on B"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn blocking_kill(pg: &mut pg::Pg) {
    tokio::task::block_in_place(|| pg.kill());
}

async fn blocking_launch(mut pg: pg::Pg) -> pg::Pg {
    tokio::task::block_in_place(|| pg.launch());
    pg
}

/// A day budget spent through A is spent on B too once B's budget sync ran (1 s): B refuses
/// with 429 and the ledger holds no more than the budget plus the one request in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_spent_on_one_gateway_is_spent_on_the_other() {
    if let Some(why) = pg::missing() {
        skip::missing("a_budget_spent_on_one_gateway_is_spent_on_the_other", &why);
        return;
    }
    let pg = blocking(pg::Pg::start).await;
    pg.createdb("mg");
    let dir_a = tempfile::tempdir().unwrap();
    let cfg = StoreConfig::Postgres(PgStoreConfig {
        url: pg.url("mg"),
        password_file: Some(pg.password_file(dir_a.path())),
        ca_file: None,
    });
    const BUDGET: u64 = 120;
    let (d, c) = (dir_a.path().to_path_buf(), cfg.clone());
    let key = blocking(move || {
        KeyStore::open_in(&d, &c)
            .unwrap()
            .create(NewKey {
                name: "b".into(),
                policy: KeyPolicy {
                    budget: Some(Budget {
                        tokens: BUDGET,
                        period: BudgetPeriod::Day,
                    }),
                    ..KeyPolicy::default()
                },
            })
            .unwrap()
    })
    .await;
    let secret = key.secret.expose().to_string();
    let dir_b = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir_a.path().join(SECRET_FILE),
        dir_b.path().join(SECRET_FILE),
    )
    .unwrap();
    let model = EchoModel::new("echo", Duration::from_millis(1));
    let a = appliance(dir_a, &cfg, &model).await;
    let b = appliance(dir_b, &cfg, &model).await;
    wait_models(&a, &secret).await;
    let mut served = 0;
    loop {
        let r = chat(&a, &secret).await;
        if r.status == 429 {
            break;
        }
        assert_eq!(r.status, 200, "{}", r.body());
        served += 1;
        assert!(served < 100, "the budget never ran out");
    }
    assert!(served >= 2, "only {served} requests fit the budget");
    // B, after one budget sync and one ledger flush: refused as well.
    tokio::time::sleep(modelgate::keys::ledger::BUDGET_SYNC * 2).await;
    let r = chat(&b, &secret).await;
    assert_eq!(
        r.status,
        429,
        "B still admits a key whose budget A spent: {}",
        r.body()
    );
    assert!(r.body().contains("insufficient_quota"), "{}", r.body());
    let (d, c, id) = (b.dir.path().to_path_buf(), cfg.clone(), key.id.clone());
    let u = blocking(move || {
        Ledger::open_in(&d, &c)
            .unwrap()
            .usage(&id, SystemTime::now())
            .unwrap()
    })
    .await;
    assert_eq!(
        u.total.requests,
        model.stats.requests.load(Ordering::Relaxed)
    );
    assert!(
        u.today.prompt_tokens + u.today.completion_tokens <= BUDGET,
        "spent {u:?} of {BUDGET}"
    );
    drop(pg);
}

/// RPM across two gateways: each takes half of the key's limit once both heartbeat in the
/// store, so a burst alternating between them is admitted within 10% of the limit (alone,
/// each would admit the whole limit: twice it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_across_two_gateways_stays_within_ten_percent_of_the_limit() {
    if let Some(why) = pg::missing() {
        skip::missing("rpm_across_two_gateways_stays_within_ten_percent", &why);
        return;
    }
    let pg = blocking(pg::Pg::start).await;
    pg.createdb("mg");
    let dir_a = tempfile::tempdir().unwrap();
    let cfg = StoreConfig::Postgres(PgStoreConfig {
        url: pg.url("mg"),
        password_file: Some(pg.password_file(dir_a.path())),
        ca_file: None,
    });
    const RPM: u32 = 20;
    let (d, c) = (dir_a.path().to_path_buf(), cfg.clone());
    let key = blocking(move || {
        KeyStore::open_in(&d, &c)
            .unwrap()
            .create(NewKey {
                name: "r".into(),
                policy: KeyPolicy {
                    rpm: Some(RPM),
                    ..KeyPolicy::default()
                },
            })
            .unwrap()
    })
    .await;
    let secret = key.secret.expose().to_string();
    let dir_b = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir_a.path().join(SECRET_FILE),
        dir_b.path().join(SECRET_FILE),
    )
    .unwrap();
    let model = EchoModel::new("echo", Duration::from_millis(1));
    let a = appliance(dir_a, &cfg, &model).await;
    let b = appliance(dir_b, &cfg, &model).await;
    let share = |x: &Appliance| x.stack.handle.load().limiter.lock().unwrap().share();
    let t = Instant::now();
    while share(&a) != 2 || share(&b) != 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "shares {} {}",
            share(&a),
            share(&b)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = model.stats.requests.load(Ordering::Relaxed);
    let mut ok = 0u32;
    for i in 0..2 * RPM {
        let r = chat(if i % 2 == 0 { &a } else { &b }, &secret).await;
        match r.status {
            200 => ok += 1,
            429 => {}
            s => panic!("request {i}: {s} {}", r.body()),
        }
    }
    let seen = model.stats.requests.load(Ordering::Relaxed) - before;
    eprintln!(
        "rpm {RPM} across two gateways: {ok} of {} admitted",
        2 * RPM
    );
    assert_eq!(u64::from(ok), seen);
    let lo = RPM - RPM / 10;
    let hi = RPM + RPM / 10;
    assert!(
        (lo..=hi).contains(&ok),
        "{ok} admitted for an RPM of {RPM} across two appliances"
    );
}
