use super::*;
use crate::gateway::upstream::UpstreamSpec;

fn server(name: &str, capacity: Option<u32>) -> Arc<Upstream> {
    Upstream::new(UpstreamSpec {
        name: name.into(),
        addr: "10.20.0.5:8000".parse().unwrap(),
        base_path: "/v1".into(),
        api_key: None,
        models: vec![("m".into(), "m".into())],
        max_concurrent: capacity,
    })
}

fn limits(max_queued: usize, timeout_ms: u64) -> QueueLimits {
    QueueLimits {
        max_queued,
        timeout: Duration::from_millis(timeout_ms),
    }
}

/// A request for model `m` by `key` over `candidates`, healthy ones only, no preference.
fn want<'a>(key: &'a str, candidates: &'a [Arc<Upstream>]) -> Want<'a> {
    Want {
        key,
        model: "m",
        candidates,
        preferred: None,
        any_health: false,
        now: Instant::now(),
    }
}

/// `(requests in flight at all of `ups`, waiting for model m)`.
fn load(s: &Scheduler, ups: &[Arc<Upstream>]) -> (u64, usize) {
    (ups.iter().map(|u| u.in_flight()).sum(), s.queued("m"))
}

/// Queues `n` waiters for `key`, each pushing `(key, server)` into `order` when served and
/// holding its slot until `release` reaches its position.
fn spawn_waiters(
    s: &Arc<Scheduler>,
    ups: &[Arc<Upstream>],
    key: &'static str,
    n: usize,
    order: &Arc<Mutex<Vec<(&'static str, String)>>>,
    release: &tokio::sync::watch::Receiver<u32>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let (s, ups, order, mut release) =
                (s.clone(), ups.to_vec(), order.clone(), release.clone());
            tokio::spawn(async move {
                let (_, slot) = s
                    .acquire(&want(key, &ups), limits(100, 10_000))
                    .await
                    .unwrap();
                let mine = {
                    let mut o = order.lock().unwrap();
                    o.push((key, slot.upstream().spec.name.clone()));
                    o.len() as u32
                };
                // Hold the slot until the test releases this position.
                while *release.borrow() < mine {
                    if release.changed().await.is_err() {
                        break;
                    }
                }
                drop(slot);
            })
        })
        .collect()
}

/// The fair queue over `ups`: "a" queues 6 before "b" and "c" queue 2 each (FIFO would serve
/// a×6 first); then the blockers go and each served request ends in turn. Returns the order.
async fn serve_a_b_c(ups: Vec<Arc<Upstream>>) -> Vec<(&'static str, String)> {
    let s = Scheduler::new();
    let order = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = tokio::sync::watch::channel(0u32);
    let capacity: u64 = ups
        .iter()
        .map(|u| u64::from(u.spec.max_concurrent.unwrap()))
        .sum();
    let mut blockers = Vec::new();
    for _ in 0..capacity {
        blockers.push(
            s.acquire(&want("x", &ups), limits(100, 10_000))
                .await
                .unwrap()
                .1,
        );
    }
    let mut tasks = spawn_waiters(&s, &ups, "a", 6, &order, &rx);
    tokio::time::sleep(Duration::from_millis(20)).await;
    tasks.extend(spawn_waiters(&s, &ups, "b", 2, &order, &rx));
    tokio::time::sleep(Duration::from_millis(20)).await;
    tasks.extend(spawn_waiters(&s, &ups, "c", 2, &order, &rx));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(load(&s, &ups), (capacity, 10));
    assert_eq!(s.waiting(), 10);
    for u in &ups {
        assert_eq!(s.waiting_for(u), 10, "every waiter may use {}", u.spec.name);
    }
    drop(blockers);
    for i in 1..=10u32 {
        // Let the i-th served request finish; the next one is then served.
        tokio::time::sleep(Duration::from_millis(5)).await;
        tx.send(i).unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(load(&s, &ups), (0, 0));
    let order = order.lock().unwrap().clone();
    order
}

#[tokio::test]
async fn saturated_slots_go_round_robin_across_keys() {
    let order = serve_a_b_c(vec![server("one", Some(1))]).await;
    let keys: Vec<&str> = order.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, ["a", "b", "c", "a", "b", "c", "a", "a", "a", "a"]);
}

/// The queue spans the model's replicas: waiters take the first slot freed on any of them,
/// and the round robin across keys holds as with one server.
#[tokio::test]
async fn the_model_wide_queue_stays_round_robin_across_replicas() {
    let order = serve_a_b_c(vec![server("r1", Some(1)), server("r2", Some(2))]).await;
    let keys: Vec<&str> = order.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, ["a", "b", "c", "a", "b", "c", "a", "a", "a", "a"]);
    let on = |r: &str| order.iter().filter(|(_, s)| s == r).count();
    assert!(
        on("r1") >= 1 && on("r2") >= 1,
        "both replicas served: {order:?}"
    );
}

#[tokio::test]
async fn full_queue_and_timeout_refuse_and_leak_nothing() {
    let ups = vec![server("one", Some(1))];
    let s = Scheduler::new();
    let l = limits(2, 50);
    let held = s.acquire(&want("a", &ups), l).await.unwrap();
    let (s1, u1) = (s.clone(), ups.clone());
    let w1 = tokio::spawn(async move { s1.acquire(&want("b", &u1), l).await.map(|_| ()) });
    let (s2, u2) = (s.clone(), ups.clone());
    let w2 = tokio::spawn(async move { s2.acquire(&want("c", &u2), l).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        s.acquire(&want("d", &ups), l).await.unwrap_err(),
        QueueError::Full
    );
    assert_eq!(w1.await.unwrap(), Err(QueueError::TimedOut));
    assert_eq!(w2.await.unwrap(), Err(QueueError::TimedOut));
    assert_eq!(load(&s, &ups), (1, 0));
    drop(held);
    assert_eq!(load(&s, &ups), (0, 0));
    // A waiter whose request goes away (future dropped) leaves no trace either.
    let held = s.acquire(&want("a", &ups), l).await.unwrap();
    let (s3, u3) = (s.clone(), ups.clone());
    let w = tokio::spawn(async move { s3.acquire(&want("b", &u3), l).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(10)).await;
    w.abort();
    let _ = w.await;
    assert_eq!(load(&s, &ups), (1, 0));
    assert_eq!(s.waiting(), 0);
    drop(held);
    assert_eq!(load(&s, &ups), (0, 0));
    // Below capacity nobody waits.
    let _a = s.acquire(&want("a", &ups), l).await.unwrap();
    assert_eq!(load(&s, &ups), (1, 0));
}

/// Least loaded among replicas with a free slot, in turn on ties; a saturated replica is
/// skipped while another has room; an ejected one is never used.
#[tokio::test]
async fn slots_go_to_the_least_loaded_usable_replica() {
    let ups = vec![
        server("r0", Some(2)),
        server("r1", Some(2)),
        server("r2", None),
    ];
    let s = Scheduler::new();
    let l = limits(10, 1000);
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(s.acquire(&want("k", &ups), l).await.unwrap());
    }
    let per: Vec<u64> = ups.iter().map(|u| u.in_flight()).collect();
    assert_eq!(per, [2, 2, 2], "even spread");
    // r0 and r1 are full: the unlimited r2 takes the rest.
    let (i, more) = s.acquire(&want("k", &ups), l).await.unwrap();
    assert_eq!(i, 2);
    drop(more);
    // Sequential requests on idle replicas rotate.
    drop(held);
    let mut seen = Vec::new();
    for _ in 0..6 {
        let (i, slot) = s.acquire(&want("k", &ups), l).await.unwrap();
        seen.push(i);
        drop(slot);
    }
    assert_eq!(seen, [0, 1, 2, 0, 1, 2]);
    // An ejected replica gets nothing; a preferred one (affinity) wins while usable.
    ups[1].health.failed(Instant::now(), "refused");
    for _ in 0..4 {
        let (i, _slot) = s.acquire(&want("k", &ups), l).await.unwrap();
        assert_ne!(i, 1);
    }
    let mut w = want("k", &ups);
    w.preferred = Some(0);
    assert_eq!(s.acquire(&w, l).await.unwrap().0, 0);
    w.preferred = Some(1);
    assert_ne!(
        s.acquire(&w, l).await.unwrap().0,
        1,
        "ejected: least loaded instead"
    );
    // The last resort may use an ejected one.
    let only = vec![ups[1].clone()];
    let mut w = want("k", &only);
    w.any_health = true;
    assert_eq!(s.acquire(&w, l).await.unwrap().0, 0);
}

/// Waiters whose replicas are all saturated or ejected get the slots of a replica that is
/// re-admitted.
#[tokio::test]
async fn a_readmitted_replica_serves_the_waiters() {
    let ups = vec![server("r0", Some(1)), server("r1", Some(1))];
    let s = Scheduler::new();
    let l = limits(10, 5000);
    let t0 = Instant::now();
    ups[1].health.failed(t0, "refused");
    let held = s.acquire(&want("k", &ups), l).await.unwrap();
    assert_eq!(held.0, 0);
    let (s1, u1) = (s.clone(), ups.clone());
    let waiter = tokio::spawn(async move {
        let (i, slot) = s1.acquire(&want("w", &u1), l).await.unwrap();
        (i, slot.upstream().spec.name.clone())
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(s.queued("m"), 1);
    assert!(ups[1].health.probe_answered(Instant::now()));
    s.readmitted(&ups[1]);
    let (i, name) = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("served at readmission")
        .unwrap();
    assert_eq!((i, name.as_str()), (1, "r1"));
    assert_eq!(load(&s, &ups), (1, 0));
    drop(held);
    assert_eq!(load(&s, &ups), (0, 0));
}
