use super::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

fn wall(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).unwrap()
}
fn ev(key: &str, at: &str, p: u64, c: u64, estimated: bool) -> UsageEvent {
    UsageEvent {
        key_id: key.into(),
        at: wall(at),
        prompt_tokens: p,
        completion_tokens: c,
        estimated,
    }
}
fn totals(p: u64, c: u64, r: u64, e: u64) -> UsageTotals {
    UsageTotals {
        prompt_tokens: p,
        completion_tokens: c,
        requests: r,
        estimated: e,
    }
}

fn sample() -> Vec<UsageEvent> {
    vec![
        ev("a", "2024-02-28T10:00:01Z", 10, 1, false),
        ev("a", "2024-02-28T10:00:59Z", 20, 2, true), // same minute
        ev("a", "2024-02-28T23:59:59.999Z", 30, 3, false),
        ev("a", "2024-02-29T00:00:00Z", 40, 4, false), // leap day
        ev("a", "2024-02-29T15:30:00Z", 50, 5, true),
        ev("a", "2024-03-01T00:00:00Z", 60, 6, false), // next month
        ev("a", "2024-03-01T08:00:00Z", 70, 7, false),
        ev("b", "2024-02-29T15:30:00Z", 1000, 100, false),
    ]
}

#[test]
fn usage_by_utc_day_month_and_total() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(dir.path()).unwrap();
    l.write(&sample()).unwrap();
    assert_eq!(l.row_count().unwrap(), 7);
    let u = l.usage("a", wall("2024-02-29T20:00:00Z")).unwrap();
    assert_eq!(u.today, totals(90, 9, 2, 1));
    assert_eq!(u.this_month, totals(150, 15, 5, 2));
    assert_eq!(u.total, totals(280, 28, 7, 2));
    let u = l.usage("a", wall("2024-03-01T23:59:59.999Z")).unwrap();
    assert_eq!(u.today, totals(130, 13, 2, 0));
    assert_eq!(u.this_month, u.today);
    assert_eq!(
        l.usage("nobody", wall("2024-03-01T00:00:00Z")).unwrap(),
        KeyUsage::default()
    );
    assert_eq!(
        l.period_tokens(wall("2024-02-29T20:00:00Z")).unwrap(),
        vec![("a".into(), 99, 165), ("b".into(), 1100, 1100)]
    );
}

#[test]
fn compaction_keeps_totals_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(dir.path()).unwrap();
    l.write(&sample()).unwrap();
    let probes = [
        "2024-02-28T12:00:00Z",
        "2024-02-29T20:00:00Z",
        "2024-03-01T12:00:00Z",
    ];
    let before: Vec<_> = probes
        .iter()
        .flat_map(|p| ["a", "b"].map(|k| l.usage(k, wall(p)).unwrap()))
        .collect();
    // Mid-day on Mar 1: Feb 28 and 29 are whole days before it; Mar 1 stays fine-grained.
    assert_eq!(l.compact(wall("2024-03-01T12:00:00Z")).unwrap(), 5);
    assert_eq!(l.row_count().unwrap(), 3 + 2); // a: 2 days + 2 minutes, b: 1 day
    let after: Vec<_> = probes
        .iter()
        .flat_map(|p| ["a", "b"].map(|k| l.usage(k, wall(p)).unwrap()))
        .collect();
    assert_eq!(before, after);
    // Idempotent.
    assert_eq!(l.compact(wall("2024-03-01T12:00:00Z")).unwrap(), 0);
    // Late minute rows for an already compacted day fold into its existing day row.
    l.write(&[ev("a", "2024-02-29T01:00:00Z", 5, 5, true)])
        .unwrap();
    let u = l.usage("a", wall("2024-02-29T20:00:00Z")).unwrap();
    assert_eq!(u.today, totals(95, 14, 3, 2));
    assert_eq!(l.compact(wall("2024-03-02T00:00:00Z")).unwrap(), 3);
    assert_eq!(l.usage("a", wall("2024-02-29T20:00:00Z")).unwrap(), u);
    assert_eq!(l.row_count().unwrap(), 4);
    assert_eq!(
        l.usage("a", wall("2024-03-05T00:00:00Z")).unwrap().total,
        totals(285, 33, 8, 3)
    );
}

#[tokio::test]
async fn writer_batches_and_final_write_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (w, task) = LedgerWriter::start(
        Ledger::open(dir.path()).unwrap(),
        LedgerOptions {
            queue: 1024,
            ..LedgerOptions::default()
        },
    );
    let now = SystemTime::now();
    for i in 0..500u64 {
        assert!(w.record(UsageEvent {
            key_id: "k".into(),
            at: now,
            prompt_tokens: i,
            completion_tokens: 1,
            estimated: i % 2 == 0,
        }));
        if i % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let stats = w.stats.clone();
    drop(w);
    task.finished().await;
    assert_eq!(stats.written.load(Ordering::Relaxed), 500);
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
    let u = Ledger::open(dir.path()).unwrap().usage("k", now).unwrap();
    assert_eq!(u.total, totals(499 * 500 / 2, 500, 500, 250));
}

#[tokio::test]
async fn record_never_blocks_and_counts_drops() {
    let dir = tempfile::tempdir().unwrap();
    let (w, task) = LedgerWriter::start(
        Ledger::open(dir.path()).unwrap(),
        LedgerOptions {
            queue: 4,
            ..LedgerOptions::default()
        },
    );
    // On this current-thread runtime the task cannot drain while we do not yield.
    let ok = (0..10)
        .filter(|_| w.record(ev("k", "2024-03-10T12:00:00Z", 1, 1, false)))
        .count();
    assert_eq!(ok, 4);
    assert_eq!(w.stats().dropped.load(Ordering::Relaxed), 6);
    drop(w);
    task.finished().await;
    let u = Ledger::open(dir.path())
        .unwrap()
        .usage("k", wall("2024-03-10T12:00:00Z"))
        .unwrap();
    assert_eq!(u.total.requests, 4);
}

#[tokio::test]
async fn the_writer_task_compacts_old_minute_rows_on_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(dir.path()).unwrap();
    l.write(&sample()).unwrap();
    let now = SystemTime::now();
    let total_before = l.usage("a", now).unwrap().total;
    let rows_before = l.row_count().unwrap();
    let (w, task) = LedgerWriter::start(
        l,
        LedgerOptions {
            flush_every: Duration::from_millis(20),
            compact_every: Duration::from_millis(50),
            ..LedgerOptions::default()
        },
    );
    // A fresh minute row (today) stays fine-grained.
    assert!(w.record(UsageEvent {
        key_id: "a".into(),
        at: now,
        prompt_tokens: 1,
        completion_tokens: 1,
        estimated: false,
    }));
    let t = Instant::now();
    while w.stats().compacted.load(Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(2), "no compaction ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(w);
    task.finished().await;
    let l = Ledger::open(dir.path()).unwrap();
    // sample(): 7 minute rows in 2024 fold to 4 day rows (a: 3 days, b: 1); today's row
    // is kept.
    assert_eq!(rows_before, 7);
    assert_eq!(l.row_count().unwrap(), 4 + 1);
    let after = l.usage("a", now).unwrap().total;
    assert_eq!(after, {
        let mut t = total_before;
        t.add(&totals(1, 1, 1, 0));
        t
    });
}

const CHILD_ENV: &str = "MODELGATE_LEDGER_KILL_TEST_DIR";

/// The child half of [`sigkill_loses_at_most_the_last_second`]: records one event per
/// millisecond and reports progress on stdout until it is killed. Does nothing unless run
/// by that test.
#[test]
#[ignore = "run as a child process by sigkill_loses_at_most_the_last_second"]
fn sigkill_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let (w, _task) = LedgerWriter::start(
        Ledger::open(Path::new(&dir)).unwrap(),
        LedgerOptions::default(),
    );
    let start = Instant::now();
    for i in 1u64.. {
        assert!(w.record(UsageEvent {
            key_id: "k".into(),
            at: SystemTime::now(),
            prompt_tokens: 1,
            completion_tokens: 1,
            estimated: false,
        }));
        println!("rec {i} {}", start.elapsed().as_millis());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Spawns this test binary as a child that records events, SIGKILLs it after ~1.5 s, and
/// checks that every event recorded more than 1 s before the kill was committed.
#[test]
fn sigkill_loses_at_most_the_last_second() {
    let dir = tempfile::tempdir().unwrap();
    drop(Ledger::open(dir.path()).unwrap()); // migrate before the child starts
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "keys::ledger::tests::sigkill_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut seen: Vec<(u64, u64)> = Vec::new();
    for line in out.lines() {
        let Ok(line) = line else { break };
        let mut f = line.split_whitespace();
        if f.next() != Some("rec") {
            continue;
        }
        let i: u64 = f.next().unwrap().parse().unwrap();
        let t: u64 = f.next().unwrap().parse().unwrap();
        seen.push((i, t));
        if t >= 1500 {
            child.kill().unwrap(); // SIGKILL
            break;
        }
    }
    let _ = child.wait();
    let &(last_i, last_t) = seen.last().expect("the child reported progress");
    let persisted = Ledger::open(dir.path())
        .unwrap()
        .usage("k", SystemTime::now())
        .unwrap()
        .total
        .requests;
    // Events commit in order, so the first `persisted` events survived.
    let must = seen
        .iter()
        .filter(|&&(_, t)| t + 1000 <= last_t)
        .map(|&(i, _)| i)
        .max()
        .unwrap_or(0);
    let lost_ms = seen
        .iter()
        .find(|&&(i, _)| i > persisted)
        .map_or(0, |&(_, t)| last_t - t);
    println!(
        "ledger SIGKILL: {last_i} events recorded over {last_t} ms, {persisted} committed, \
         lost the last ~{lost_ms} ms"
    );
    assert!(persisted >= must, "{persisted} < {must}");
    assert!(persisted > 0);
}
