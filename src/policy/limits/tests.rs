use super::*;
use crate::policy::Budget;

fn wall(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).unwrap()
}
fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
fn pol(rpm: Option<u32>, tpm: Option<u32>) -> KeyPolicy {
    KeyPolicy {
        rpm,
        tpm,
        ..KeyPolicy::default()
    }
}
fn est(prompt: u64, max: u64) -> Estimate {
    Estimate {
        prompt_tokens: prompt,
        max_tokens: Some(max),
    }
}
fn header<'a>(pairs: &'a [(&'static str, String)], name: &str) -> &'a str {
    &pairs.iter().find(|(n, _)| *n == name).unwrap().1
}
const W: &str = "2024-03-10T12:00:00Z";

#[test]
fn rpm_exactly_at_limit_one_over_and_refill() {
    let mut l = Limiter::new();
    let t0 = Instant::now();
    let w = wall(W);
    let p = pol(Some(60), None);
    for i in 0..60u64 {
        let a = l.admit("k", &p, est(1, 1), t0, w).unwrap();
        let r = a.headers.requests.unwrap();
        assert_eq!((r.limit, r.remaining), (60, 59 - i));
        assert_eq!(r.reset, Duration::from_secs(i + 1));
        l.settle(a, 2, t0, w);
    }
    let r = l.admit("k", &p, est(1, 1), t0, w).unwrap_err();
    assert_eq!(r.kind, RefusalKind::RateLimitExceeded);
    assert_eq!(r.retry_after, Duration::from_secs(1));
    assert_eq!(r.retry_after_header(), Some(1));
    let h = r.headers.pairs();
    assert_eq!(header(&h, "x-ratelimit-limit-requests"), "60");
    assert_eq!(header(&h, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(header(&h, "x-ratelimit-reset-requests"), "1m0s");
    assert!(h.iter().all(|(n, _)| !n.ends_with("-tokens")));
    // One millisecond early: still refused, and told exactly how long.
    let r = l.admit("k", &p, est(1, 1), t0 + ms(999), w).unwrap_err();
    assert_eq!(r.retry_after, ms(1));
    assert_eq!(r.retry_after_header(), Some(1));
    let a = l.admit("k", &p, est(1, 1), t0 + ms(1000), w).unwrap();
    assert_eq!(a.headers.requests.unwrap().remaining, 0);
    l.settle(a, 2, t0 + ms(1000), w);
    // A full minute after the burst the bucket is full again: 60 more fit, not 61.
    let t1 = t0 + ms(61_000);
    for _ in 0..60 {
        let a = l.admit("k", &p, est(1, 1), t1, w).unwrap();
        l.settle(a, 2, t1, w);
    }
    assert!(l.admit("k", &p, est(1, 1), t1, w).is_err());
}

#[test]
fn no_over_admission_across_a_minute_boundary() {
    // A fixed window would admit 2 x 60 around a boundary; the bucket admits 60 + refill.
    let mut l = Limiter::new();
    let t0 = Instant::now();
    let w = wall(W);
    let p = pol(Some(60), None);
    let mut admitted = 0;
    for step in 0..=120u64 {
        let t = t0 + ms(59_000 + step * 10); // 59.00 s ..= 60.20 s
        while let Ok(a) = l.admit("k", &p, est(0, 0), t, w) {
            l.settle(a, 0, t, w);
            admitted += 1;
        }
    }
    // 60 at 59 s, then one per second of refill (60 s, 61 s would be the next).
    assert_eq!(admitted, 61);
}

#[test]
fn tpm_reservation_refund_and_overrun() {
    let mut l = Limiter::new();
    let t0 = Instant::now();
    let w = wall(W);
    let p = pol(None, Some(1000));
    let a1 = l.admit("k", &p, est(400, 100), t0, w).unwrap();
    assert_eq!(a1.reserved(), 500);
    let t = a1.headers.tokens.unwrap();
    assert_eq!((t.limit, t.remaining, t.reset), (1000, 500, ms(30_000)));
    let a2 = l.admit("k", &p, est(400, 100), t0, w).unwrap();
    assert_eq!(a2.headers.tokens.unwrap().remaining, 0);
    let r = l.admit("k", &p, est(400, 100), t0, w).unwrap_err();
    assert_eq!(r.kind, RefusalKind::RateLimitExceeded);
    assert_eq!(r.retry_after, ms(30_000));
    assert_eq!(
        header(&r.headers.pairs(), "x-ratelimit-reset-tokens"),
        "1m0s"
    );
    // Settle down: 100 used of 500 reserved gives 400 back.
    assert_eq!(l.settle(a1, 100, t0, w), -400);
    let r = l.admit("k", &p, est(400, 100), t0, w).unwrap_err();
    // 600 used + 500 > 1000 by 100 tokens.
    assert_eq!(r.retry_after, ms(6_000));
    // Settle up: 700 used of 500 reserved costs 200 more.
    assert_eq!(l.settle(a2, 700, t0, w), 200);
    let r = l.admit("k", &p, est(400, 100), t0, w).unwrap_err();
    assert_eq!(r.retry_after, ms(18_000)); // 800 used
    assert_eq!(r.headers.tokens.unwrap().remaining, 200);
    let a = l.admit("k", &p, est(200, 0), t0, w).unwrap();
    assert_eq!(a.headers.tokens.unwrap().remaining, 0);
    l.settle(a, 200, t0, w);
}

#[test]
fn default_cap_and_too_large() {
    let mut l = Limiter::with_config(LimiterConfig {
        default_max_tokens: 300,
    });
    let t0 = Instant::now();
    let w = wall(W);
    let p = pol(Some(10), Some(1000));
    let a = l
        .admit(
            "k",
            &p,
            Estimate {
                prompt_tokens: 100,
                max_tokens: None,
            },
            t0,
            w,
        )
        .unwrap();
    assert_eq!(a.reserved(), 400);
    l.settle(a, 0, t0, w);
    // A prompt that alone exceeds TPM can never run.
    let r = l.admit("k", &p, est(1000, 1), t0, w).unwrap_err();
    assert_eq!(r.kind, RefusalKind::TooLarge);
    assert_eq!(r.retry_after_header(), None);
    // prompt + max_tokens above TPM: clamped to the TPM capacity, not refused.
    let a = l.admit("k", &p, est(900, 101), t0, w).unwrap();
    assert_eq!((a.reserved(), a.clamped()), (1000, true));
    l.settle(a, 0, t0, w);
    // Exactly the TPM limit fits in an empty bucket (after the refund above), unclamped.
    let a = l.admit("k", &p, est(900, 100), t0, w).unwrap();
    assert!(!a.clamped());
    l.settle(a, 1000, t0, w);
}

#[test]
fn budget_reservation_is_clamped_to_what_is_left_and_cut_at_its_edge() {
    let mut l = Limiter::new();
    let t0 = Instant::now();
    let w = wall(W);
    let p = budget(1000, BudgetPeriod::Day);
    l.seed_usage("k", 800, 800, w);
    // 200 left: a 50-token prompt asking for 4096 runs with a 200-token reservation.
    let mut a = l.admit("k", &p, est(50, 4096), t0, w).unwrap();
    assert_eq!((a.reserved(), a.clamped(), a.metered()), (200, true, true));
    // Prompt, then 150 completion tokens: exactly the budget, still fine.
    assert!(l.charge_mid_stream(&mut a, 50, t0));
    for _ in 0..150 {
        assert!(l.charge_mid_stream(&mut a, 1, t0));
    }
    // The 151st completion token overdraws: the gateway ends the stream here.
    assert!(!l.charge_mid_stream(&mut a, 1, t0));
    l.settle(a, 201, t0, w);
    // Nothing left: the next request is refused with insufficient_quota.
    let r = l.admit("k", &p, est(1, 10), t0, w).unwrap_err();
    assert_eq!(r.kind, RefusalKind::InsufficientQuota);
    // A prompt that fits but leaves no room for one completion token is refused, while a
    // request that generates nothing (max_tokens 0, embeddings) may use the last token.
    let mut l = Limiter::new();
    l.seed_usage("k", 900, 900, w);
    let r = l.admit("k", &p, est(100, 10), t0, w).unwrap_err();
    assert_eq!(r.kind, RefusalKind::InsufficientQuota);
    let a = l.admit("k", &p, est(100, 0), t0, w).unwrap();
    assert_eq!((a.reserved(), a.clamped()), (100, false));
    l.settle(a, 100, t0, w);
    // A key with neither TPM nor budget is not metered mid-stream.
    let a = l.admit("k", &pol(Some(5), None), est(1, 1), t0, w).unwrap();
    assert!(!a.metered());
    l.settle(a, 2, t0, w);
}

#[test]
fn refusal_charges_nothing() {
    let mut l = Limiter::new();
    let t0 = Instant::now();
    let w = wall(W);
    let p = pol(Some(10), Some(100));
    let a = l.admit("k", &p, est(90, 0), t0, w).unwrap();
    assert_eq!(a.headers.requests.unwrap().remaining, 9);
    // Passes RPM, fails TPM: RPM must not be charged.
    for _ in 0..5 {
        let r = l.admit("k", &p, est(20, 0), t0, w).unwrap_err();
        assert_eq!(r.headers.requests.unwrap().remaining, 9);
        assert_eq!(r.headers.tokens.unwrap().remaining, 10);
    }
    l.settle(a, 90, t0, w);
}

#[test]
fn concurrency_released_on_settle() {
    let mut l = Limiter::new();
    let t0 = Instant::now();
    let w = wall(W);
    let p = KeyPolicy {
        max_concurrent: Some(2),
        ..KeyPolicy::default()
    };
    let a = l.admit("k", &p, est(1, 1), t0, w).unwrap();
    let b = l.admit("k", &p, est(1, 1), t0, w).unwrap();
    assert_eq!(l.in_flight("k"), 2);
    let r = l.admit("k", &p, est(1, 1), t0, w).unwrap_err();
    assert_eq!(r.kind, RefusalKind::TooManyConcurrent);
    assert_eq!(r.retry_after, Duration::from_secs(1));
    // Other keys are independent.
    let o = l.admit("other", &p, est(1, 1), t0, w).unwrap();
    l.settle(a, 2, t0, w);
    assert_eq!(l.in_flight("k"), 1);
    let c = l.admit("k", &p, est(1, 1), t0, w).unwrap();
    for x in [b, c, o] {
        l.settle(x, 2, t0, w);
    }
    assert_eq!(l.in_flight("k"), 0);
}

fn budget(tokens: u64, period: BudgetPeriod) -> KeyPolicy {
    KeyPolicy {
        budget: Some(Budget { tokens, period }),
        ..KeyPolicy::default()
    }
}

#[test]
fn daily_budget_resets_at_utc_midnight() {
    let mut l = Limiter::new();
    let t0 = Instant::now();
    let p = budget(1000, BudgetPeriod::Day);
    let late = wall("2024-03-10T23:59:59.500Z");
    l.seed_usage("k", 900, 5000, late);
    let r = l.admit("k", &p, est(101, 0), t0, late).unwrap_err();
    assert_eq!(r.kind, RefusalKind::InsufficientQuota);
    assert_eq!(r.retry_after, ms(500));
    assert_eq!(r.retry_after_header(), Some(1));
    // Exactly the remaining budget fits.
    let a = l.admit("k", &p, est(100, 0), t0, late).unwrap();
    // With that reservation in flight, even one token waits for it (not for midnight).
    let r = l.admit("k", &p, est(1, 0), t0, late).unwrap_err();
    assert_eq!(r.kind, RefusalKind::RateLimitExceeded);
    l.settle(a, 60, t0, late);
    let a = l.admit("k", &p, est(40, 0), t0, late).unwrap();
    l.settle(a, 40, t0, late);
    assert_eq!(
        l.admit("k", &p, est(1, 0), t0, late).unwrap_err().kind,
        RefusalKind::InsufficientQuota
    );
    // The first instant of the next UTC day starts from zero.
    let midnight = wall("2024-03-11T00:00:00Z");
    let a = l.admit("k", &p, est(1000, 0), t0, midnight).unwrap();
    l.settle(a, 1000, t0, midnight);
    // More than the whole budget can never fit.
    let r = l.admit("k", &p, est(1001, 0), t0, midnight).unwrap_err();
    assert_eq!(r.kind, RefusalKind::TooLarge);
}

#[test]
fn monthly_budget_resets_at_month_end_incl_february() {
    let p = budget(100, BudgetPeriod::Month);
    let t0 = Instant::now();
    for (at, next) in [
        ("2024-02-29T23:00:00Z", "2024-03-01T00:00:00Z"), // leap year
        ("2023-02-28T23:00:00Z", "2023-03-01T00:00:00Z"),
        ("2100-02-28T23:00:00Z", "2100-03-01T00:00:00Z"), // not a leap year
        ("2024-12-31T23:00:00Z", "2025-01-01T00:00:00Z"),
        ("2024-01-31T23:00:00Z", "2024-02-01T00:00:00Z"),
        ("2024-04-30T23:00:00Z", "2024-05-01T00:00:00Z"),
    ] {
        let mut l = Limiter::new();
        // Same month, earlier day: the month counter carries over days.
        l.seed_usage("k", 0, 100, wall(at));
        let r = l.admit("k", &p, est(1, 0), t0, wall(at)).unwrap_err();
        assert_eq!(r.kind, RefusalKind::InsufficientQuota, "{at}");
        assert_eq!(r.retry_after, Duration::from_secs(3600), "{at}");
        let just_before = wall(next) - ms(1);
        let r = l.admit("k", &p, est(1, 0), t0, just_before).unwrap_err();
        assert_eq!(r.retry_after, ms(1), "{at}");
        let a = l.admit("k", &p, est(100, 0), t0, wall(next)).unwrap();
        l.settle(a, 100, t0, wall(next));
    }
}

#[test]
fn calendar_helpers() {
    for (s, day) in [
        ("1970-01-01T00:00:00Z", 0),
        ("2000-03-01T00:00:00Z", 11017),
        ("2024-02-29T12:00:00Z", 19782),
    ] {
        assert_eq!(periods(wall(s)).0, day, "{s}");
    }
    assert_eq!(civil_from_days(19782), (2024, 2, 29));
    assert_eq!(days_from_civil(2024, 3, 1), 19783);
    let (_, m) = periods(wall("2024-02-29T12:00:00Z"));
    assert_eq!(m, 2024 * 12 + 1);
    assert_eq!(month_start_ms(m + 1), wall_ms(wall("2024-03-01T00:00:00Z")));
    assert_eq!(
        month_start_ms(2024 * 12 + 11 + 1),
        wall_ms(wall("2025-01-01T00:00:00Z"))
    );
}

#[test]
fn mid_stream_overrun_stops_at_tpm_and_budget() {
    let mut l = Limiter::new();
    let t0 = Instant::now();
    let w = wall(W);
    let p = pol(None, Some(1000));
    let mut a = l.admit("k", &p, est(50, 50), t0, w).unwrap();
    // (tokens of the next chunk, ms after t0, whether the stream may go on, charged after it)
    for (produced, at, goes_on, charged) in [
        (80, 0, true, 100),   // within the reservation
        (30, 0, true, 110),   // 10 over: charged
        (890, 0, true, 1000), // exactly the limit
        (1, 0, false, 1001),  // one over
        (0, 120, true, 1001), // refill makes room again for later chunks
    ] {
        let ok = l.charge_mid_stream(&mut a, produced, t0 + ms(at));
        assert_eq!((ok, a.charged()), (goes_on, charged), "chunk of {produced}");
    }
    assert_eq!(l.settle(a, 1001, t0 + ms(120), w), 0);

    let mut l = Limiter::new();
    let p = budget(500, BudgetPeriod::Day);
    l.seed_usage("k", 300, 300, w);
    let mut a = l.admit("k", &p, est(100, 100), t0, w).unwrap();
    assert!(l.charge_mid_stream(&mut a, 200, t0));
    assert!(!l.charge_mid_stream(&mut a, 1, t0));
    l.settle(a, 201, t0, w);
    assert_eq!(
        l.admit("k", &p, est(0, 0), t0, w).unwrap_err().kind,
        RefusalKind::InsufficientQuota
    );
}

#[test]
fn idle_keys_are_dropped_after_their_windows() {
    let mut l = Limiter::new();
    let t0 = Instant::now();
    let w = wall(W);
    let p = pol(Some(60), Some(6000));
    let a = l.admit("a", &p, est(10, 10), t0, w).unwrap();
    l.settle(a, 20, t0, w);
    let held = l.admit("b", &p, est(10, 10), t0, w).unwrap();
    l.seed_usage("c", 5, 5, w);
    assert_eq!(l.len(), 3);
    l.sweep(t0 + ms(500), w);
    assert_eq!(l.len(), 3, "a's buckets are not full yet");
    l.sweep(t0 + ms(1000), w);
    // a: full again, dropped. b: in flight. c: budget usage today.
    assert_eq!(l.len(), 2);
    l.settle(held, 20, t0 + ms(1000), w);
    // The sweep runs by itself from admit once a minute.
    let a = l.admit(
        "d",
        &p,
        est(1, 1),
        t0 + ms(61_000),
        wall("2024-03-11T00:00:00Z"),
    );
    l.settle(a.unwrap(), 2, t0 + ms(61_000), w);
    // b dropped (full); c kept (its usage is in this month still); d has just been charged.
    assert_eq!(l.len(), 2);
    assert_eq!(l.in_flight("c"), 0);
    l.sweep(t0 + ms(200_000), wall("2024-04-01T00:00:00Z"));
    assert!(l.is_empty());
}

#[test]
fn unlimited_key_has_no_headers() {
    let mut l = Limiter::new();
    let a = l
        .admit(
            "k",
            &KeyPolicy::default(),
            est(1, 1),
            Instant::now(),
            wall(W),
        )
        .unwrap();
    assert!(a.headers.pairs().is_empty());
    l.settle(a, 2, Instant::now(), wall(W));
}

#[test]
fn go_durations() {
    for (ms_, s) in [
        (0, "0s"),
        (1, "1ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (1050, "1.05s"),
        (59_999, "59.999s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (3_600_000, "1h0m0s"),
        (3_661_001, "1h1m1.001s"),
    ] {
        assert_eq!(go_duration(ms(ms_)), s);
    }
}

/// A warm key with every limit set high: each admit succeeds, each settle refunds exactly the
/// unused part, and the limiter keeps one entry with nothing in flight. (`cargo bench --bench
/// policy` measures the speed of the same loop.)
#[test]
fn warm_key_admit_settle_round_trips() {
    let mut l = Limiter::new();
    let p = KeyPolicy {
        rpm: Some(u32::MAX),
        tpm: Some(u32::MAX),
        max_concurrent: Some(1000),
        budget: Some(Budget {
            tokens: u64::MAX,
            period: BudgetPeriod::Month,
        }),
        ..KeyPolicy::default()
    };
    let t0 = Instant::now();
    let w = wall(W);
    for i in 0..20_000u64 {
        let now = t0 + ms(i / 1000);
        let a = l.admit("abcdefghijkl", &p, est(1000, 500), now, w).unwrap();
        assert_eq!((a.reserved(), a.clamped()), (1500, false));
        assert_eq!(l.settle(a, 900, now, w), -600);
    }
    assert_eq!((l.len(), l.in_flight("abcdefghijkl")), (1, 0));
}

#[test]
fn a_share_divides_rpm_tpm_and_concurrency_rounding_up() {
    let mut l = Limiter::new();
    l.set_share(3);
    assert_eq!(l.share(), 3);
    let t0 = Instant::now();
    let w = wall(W);
    // RPM 10 over 3 appliances: 4 here (rounded up).
    let p = pol(Some(10), None);
    for _ in 0..4 {
        let a = l.admit("k", &p, est(1, 1), t0, w).unwrap();
        assert_eq!(a.headers.requests.unwrap().limit, 4);
        l.settle(a, 2, t0, w);
    }
    assert!(l.admit("k", &p, est(1, 1), t0, w).is_err());
    // Concurrency 2 over 3: at least 1 each.
    let c = KeyPolicy {
        max_concurrent: Some(2),
        ..KeyPolicy::default()
    };
    let first = l.admit("c", &c, est(1, 1), t0, w).unwrap();
    let r = l.admit("c", &c, est(1, 1), t0, w).unwrap_err();
    assert_eq!(r.kind, RefusalKind::TooManyConcurrent);
    l.settle(first, 1, t0, w);
    // Alone again: the whole limit.
    l.set_share(0);
    assert_eq!(l.share(), 1);
    let a = l
        .admit("n", &pol(Some(10), None), est(1, 1), t0, w)
        .unwrap();
    assert_eq!(a.headers.requests.unwrap().limit, 10);
}

#[test]
fn leased_budgets_admit_against_the_lease_only() {
    let mut l = Limiter::new();
    l.set_leased(true);
    let t0 = Instant::now();
    let w = wall(W);
    let p = budget(10_000, BudgetPeriod::Day);
    // No lease yet: not refused as out of quota (the lease is on its way), nothing admitted.
    let r = l.admit("k", &p, est(10, 10), t0, w).unwrap_err();
    assert_eq!(r.kind, RefusalKind::RateLimitExceeded);
    // A lease of 50 for 8 s: 30 reserved, then 20 left, then clamped to what is left.
    l.set_lease("k", BudgetPeriod::Day, grant(50, false), t0, w);
    let a = l.admit("k", &p, est(10, 20), t0, w).unwrap();
    assert_eq!(a.reserved(), 30);
    let b = l.admit("k", &p, est(10, 20), t0, w).unwrap();
    assert_eq!((b.reserved(), b.clamped()), (20, true));
    assert!(l.admit("k", &p, est(1, 1), t0, w).is_err());
    l.settle(a, 25, t0, w);
    l.settle(b, 20, t0, w);
    assert_eq!(
        l.lease_state("k", BudgetPeriod::Day, w),
        LeaseState {
            granted: 50,
            spent: 45,
            in_flight: 0
        }
    );
    // A top-up keeps what was spent.
    l.set_lease("k", BudgetPeriod::Day, grant(60, true), t0, w);
    let c = l.admit("k", &p, est(5, 10), t0, w).unwrap();
    assert_eq!(c.reserved(), 15);
    // Exhausted in the store and nothing left here: out of quota until midnight.
    let r = l.admit("k", &p, est(1, 1), t0, w).unwrap_err();
    assert_eq!(
        r.kind,
        RefusalKind::RateLimitExceeded,
        "one still in flight"
    );
    l.settle(c, 15, t0, w);
    let r = l.admit("k", &p, est(1, 1), t0, w).unwrap_err();
    assert_eq!(r.kind, RefusalKind::InsufficientQuota);
    // A lease that lapsed (the store unreachable for its whole life) admits nothing.
    l.set_lease("k", BudgetPeriod::Day, grant(1_000, false), t0, w);
    assert!(l
        .admit("k", &p, est(1, 1), t0 + ms(7_999), w)
        .is_ok_and(|a| {
            l.settle(a, 2, t0, w);
            true
        }));
    let r = l.admit("k", &p, est(1, 1), t0 + ms(8_000), w).unwrap_err();
    assert_eq!(r.kind, RefusalKind::RateLimitExceeded);
    // Keys without a budget are not affected by leasing.
    assert!(l.admit("free", &pol(None, None), est(1, 1), t0, w).is_ok());
}

fn grant(granted: u64, exhausted: bool) -> Grant {
    Grant {
        granted,
        exhausted,
        valid_for: Duration::from_secs(8),
    }
}
