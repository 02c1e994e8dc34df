use super::*;
use std::time::UNIX_EPOCH;

#[test]
fn budgets() {
    assert_eq!(
        parse_budget("1000/day"),
        Ok(Budget {
            tokens: 1000,
            period: BudgetPeriod::Day
        })
    );
    assert_eq!(
        parse_budget(" 2_000_000 / Month "),
        Ok(Budget {
            tokens: 2_000_000,
            period: BudgetPeriod::Month
        })
    );
    for bad in [
        "", "1000", "/day", "x/day", "-1/day", "0/day", "1/week", "1/", "_1/day", "1.5/day",
    ] {
        let e = parse_budget(bad).unwrap_err();
        assert!(e.contains("fix:"), "{bad}: {e}");
    }
    assert!(parse_budget("18446744073709551616/day").is_err());
}

#[test]
fn limits() {
    assert_eq!(parse_limit("60"), Ok(60));
    assert_eq!(parse_limit("4_294_967_295"), Ok(u32::MAX));
    for bad in ["0", "", "-1", "4294967296", "1e3", "six"] {
        assert!(parse_limit(bad).unwrap_err().contains("fix:"), "{bad}");
    }
}

#[test]
fn expires_durations() {
    for (given, secs) in [("30d", 30 * 86_400), ("12h", 12 * 3600), ("1h 30m", 5400)] {
        let want = Expiry::After(Duration::from_secs(secs));
        assert_eq!(parse_expires(given), Ok(want), "{given}");
    }
    assert!(parse_expires("0s").is_err());
    assert!(parse_expires("soon").unwrap_err().contains("fix:"));
    assert!(parse_expires("").is_err());
}

#[test]
fn expires_instants() {
    let t = UNIX_EPOCH + Duration::from_secs(1_769_882_400); // 2026-01-31T18:00:00Z
    for (given, at) in [
        ("2026-01-31T18:00:00Z", t),
        ("2026-01-31 18:00:00", t),
        ("2026-01-31T19:30:00+01:30", t),
        ("2026-01-31T13:00:00-05:00", t),
        ("2026-01-31", t - Duration::from_secs(18 * 3600)),
    ] {
        assert_eq!(parse_expires(given), Ok(Expiry::At(at)), "{given}");
    }
    for bad in [
        "2026-13-01",
        "2026-01-31T18:00:00+25:00",
        "2026-01-31T18:00:00+0100",
        "2026-01-31T18:00:00éé:00",
        "31/01/2026",
    ] {
        assert!(parse_expires(bad).is_err(), "{bad}");
    }
}

#[test]
fn expiry_must_be_in_the_future() {
    let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
    assert_eq!(
        Expiry::After(Duration::from_secs(5)).resolve(now),
        Ok(now + Duration::from_secs(5))
    );
    assert!(Expiry::At(now).resolve(now).unwrap_err().contains("fix:"));
    assert!(Expiry::At(now - Duration::from_secs(1))
        .resolve(now)
        .is_err());
    assert_eq!(
        Expiry::At(now + Duration::from_secs(1)).resolve(now),
        Ok(now + Duration::from_secs(1))
    );
}

#[test]
fn grace() {
    for (given, secs) in [("0", 0), ("0s", 0), ("10m", 600)] {
        assert_eq!(parse_grace(given), Ok(Duration::from_secs(secs)), "{given}");
    }
    assert!(parse_grace("ten").is_err());
}

#[test]
fn models() {
    assert_eq!(
        parse_models("a, b*,a,qwen?"),
        Ok(vec!["a".into(), "b*".into(), "qwen?".into()])
    );
    assert!(parse_models("").is_err());
    assert!(parse_models("a,,b").is_err());
    assert!(parse_models("a b").is_err());
}

#[test]
fn endpoints() {
    assert_eq!(
        parse_endpoints("chat_completions,embeddings,chat-completions"),
        Ok(vec![Endpoint::ChatCompletions, Endpoint::Embeddings])
    );
    let e = parse_endpoints("chat").unwrap_err();
    assert!(e.contains("chat_completions,completions,embeddings,responses,models"));
    assert!(parse_endpoints("").is_err());
}

#[test]
fn cidrs() {
    for (given, net) in [
        ("10.0.0.7/8", "10.0.0.0/8"),
        ("203.0.113.5", "203.0.113.5/32"),
        ("2001:db8::1/32", "2001:db8::/32"),
        ("::1", "::1/128"),
    ] {
        assert_eq!(parse_cidr(given), Ok(net.parse().unwrap()), "{given}");
    }
    for bad in ["10.0.0.0/33", "::/129", "example.com", "", "10.0.0/8"] {
        assert!(parse_cidr(bad).unwrap_err().contains("fix:"), "{bad}");
    }
}
