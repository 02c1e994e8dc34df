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
    assert_eq!(
        parse_expires("30d"),
        Ok(Expiry::After(Duration::from_secs(30 * 86_400)))
    );
    assert_eq!(
        parse_expires("12h"),
        Ok(Expiry::After(Duration::from_secs(12 * 3600)))
    );
    assert_eq!(
        parse_expires("1h 30m"),
        Ok(Expiry::After(Duration::from_secs(5400)))
    );
    assert!(parse_expires("0s").is_err());
    assert!(parse_expires("soon").unwrap_err().contains("fix:"));
    assert!(parse_expires("").is_err());
}

#[test]
fn expires_instants() {
    let t = UNIX_EPOCH + Duration::from_secs(1_769_882_400); // 2026-01-31T18:00:00Z
    assert_eq!(parse_expires("2026-01-31T18:00:00Z"), Ok(Expiry::At(t)));
    assert_eq!(parse_expires("2026-01-31 18:00:00"), Ok(Expiry::At(t)));
    assert_eq!(
        parse_expires("2026-01-31T19:30:00+01:30"),
        Ok(Expiry::At(t))
    );
    assert_eq!(
        parse_expires("2026-01-31T13:00:00-05:00"),
        Ok(Expiry::At(t))
    );
    assert_eq!(
        parse_expires("2026-01-31"),
        Ok(Expiry::At(t - Duration::from_secs(18 * 3600)))
    );
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
    assert_eq!(parse_grace("0"), Ok(Duration::ZERO));
    assert_eq!(parse_grace("0s"), Ok(Duration::ZERO));
    assert_eq!(parse_grace("10m"), Ok(Duration::from_secs(600)));
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
    assert_eq!(parse_cidr("10.0.0.7/8"), Ok("10.0.0.0/8".parse().unwrap()));
    assert_eq!(
        parse_cidr("203.0.113.5"),
        Ok("203.0.113.5/32".parse().unwrap())
    );
    assert_eq!(
        parse_cidr("2001:db8::1/32"),
        Ok("2001:db8::/32".parse().unwrap())
    );
    assert_eq!(parse_cidr("::1"), Ok("::1/128".parse().unwrap()));
    for bad in ["10.0.0.0/33", "::/129", "example.com", "", "10.0.0/8"] {
        assert!(parse_cidr(bad).unwrap_err().contains("fix:"), "{bad}");
    }
}
