//! The per-request cost of the gateway's decisions, without I/O: key lookup and HMAC check
//! (`KeyRing::authenticate`), the access policy (`check_access`: expiry, source CIDRs,
//! endpoint, model globs) and the limiter (`Limiter::admit` + `settle` with RPM, TPM,
//! concurrency and a budget all set), on a ring of 1,000 keys. Target: ≤ 5 µs per request.
//! Also each part alone: the key lookup, and the limiter on one warm key.
//!
//! Run: `cargo bench --bench policy` (release profile). `cargo test --all-targets` runs each
//! benchmark once as a smoke test.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use criterion::Criterion;
use modelgate::keys::format::generate;
use modelgate::keys::KeyRing;
use modelgate::policy::limits::{Estimate, Limiter};
use modelgate::policy::{check_access, Budget, BudgetPeriod, Endpoint, KeyPolicy, Principal};

fn policy() -> KeyPolicy {
    KeyPolicy {
        models: vec!["llama-*".into(), "qwen*-coder".into(), "coder".into()],
        endpoints: vec![Endpoint::ChatCompletions, Endpoint::Models],
        expires_at: Some(SystemTime::now() + Duration::from_secs(86_400)),
        allow_cidrs: vec![
            "203.0.113.0/24".parse().unwrap(),
            "192.0.2.0/24".parse().unwrap(),
        ],
        // Large enough never to refuse, so every call walks the whole admit path.
        rpm: Some(u32::MAX),
        tpm: Some(u32::MAX),
        max_concurrent: Some(1_000_000),
        budget: Some(Budget {
            tokens: u64::MAX / 4,
            period: BudgetPeriod::Month,
        }),
        ..KeyPolicy::default()
    }
}

fn bench(c: &mut Criterion) {
    let keys: Vec<String> = (0..1000).map(|_| generate().expose().to_string()).collect();
    let ring = KeyRing::for_tests(
        keys.iter()
            .enumerate()
            .map(|(i, k)| {
                (
                    k.clone(),
                    Arc::new(Principal {
                        id: format!("key{i}"),
                        name: format!("dev{i}"),
                        policy: policy(),
                    }),
                )
            })
            .collect(),
    );
    let limiter = Mutex::new(Limiter::new());
    let client: IpAddr = "192.0.2.10".parse().unwrap();
    let est = Estimate {
        prompt_tokens: 25_000,
        max_tokens: None,
    };
    let mut i = 0usize;
    c.bench_function("authenticate + check_access + admit + settle", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let now = SystemTime::now();
            let p = ring.authenticate(black_box(&keys[i]), now).unwrap();
            check_access(
                &p,
                Endpoint::ChatCompletions,
                Some("qwen2.5-coder"),
                client,
                now,
            )
            .unwrap();
            let mut l = limiter.lock().unwrap();
            let adm = l.admit(&p.id, &p.policy, est, Instant::now(), now).unwrap();
            l.settle(adm, 25_500, Instant::now(), now);
        })
    });
    let mut warm = Limiter::new();
    let warm_policy = policy();
    let mut rounds = 0u32;
    c.bench_function("limiter admit + settle, warm key", |b| {
        b.iter(|| {
            // One key settles 25,500 tokens a round: a fresh limiter every 10,000 rounds keeps
            // its TPM (u32::MAX) and budget from running out however long criterion runs.
            rounds += 1;
            if rounds.is_multiple_of(10_000) {
                warm = Limiter::new();
            }
            let (now, wall) = (Instant::now(), SystemTime::now());
            let adm = warm
                .admit(black_box("key0"), &warm_policy, est, now, wall)
                .unwrap();
            warm.settle(adm, 25_500, now, wall);
        })
    });
    c.bench_function("authenticate only", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(
                ring.authenticate(black_box(&keys[i]), SystemTime::now())
                    .unwrap(),
            );
        })
    });
}

/// `cargo bench` passes `--bench`: full criterion run with its command line. Under
/// `cargo test --all-targets -- --test-threads=2` (the test command) criterion's parser would
/// reject the libtest flags, so the benchmarks run once, briefly, as a smoke test.
fn main() {
    let mut c = if std::env::args().any(|a| a == "--bench") {
        Criterion::default().configure_from_args()
    } else {
        Criterion::default()
            .sample_size(10)
            .warm_up_time(Duration::from_millis(50))
            .measurement_time(Duration::from_millis(100))
            .without_plots()
    };
    bench(&mut c);
    c.final_summary();
}
