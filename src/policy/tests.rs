use super::*;
use std::time::{Duration, UNIX_EPOCH};

fn principal(policy: KeyPolicy) -> Principal {
    Principal {
        id: "abcdefghijkl".into(),
        name: "alice".into(),
        policy,
    }
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
const T: Duration = Duration::from_secs(1_700_000_000);

/// Whether `p` may list models from `client` (only its source networks can refuse that).
fn allowed_from(p: &Principal, client: &str) -> bool {
    check_access(p, Endpoint::Models, None, ip(client), UNIX_EPOCH).is_ok()
}

#[test]
fn default_policy_allows_everything() {
    let p = principal(KeyPolicy::default());
    for e in Endpoint::ALL {
        assert_eq!(
            check_access(&p, e, Some("any"), ip("203.0.113.9"), UNIX_EPOCH + T),
            Ok(())
        );
    }
    assert_eq!(
        check_access(&p, Endpoint::Models, None, ip("::1"), UNIX_EPOCH),
        Ok(())
    );
}

#[test]
fn expiry_is_exclusive_at_the_instant() {
    let at = UNIX_EPOCH + T;
    let p = principal(KeyPolicy {
        expires_at: Some(at),
        ..Default::default()
    });
    let c = ip("127.0.0.1");
    let e = Endpoint::ChatCompletions;
    assert_eq!(
        check_access(&p, e, None, c, at - Duration::from_nanos(1)),
        Ok(())
    );
    assert_eq!(check_access(&p, e, None, c, at), Err(Deny::Expired));
    assert_eq!(
        check_access(&p, e, None, c, at + Duration::from_secs(1)),
        Err(Deny::Expired)
    );
}

#[test]
fn expiry_is_checked_before_everything_else() {
    let p = principal(KeyPolicy {
        expires_at: Some(UNIX_EPOCH),
        models: vec!["x".into()],
        ..Default::default()
    });
    assert_eq!(
        check_access(
            &p,
            Endpoint::Embeddings,
            Some("y"),
            ip("1.1.1.1"),
            UNIX_EPOCH + T
        ),
        Err(Deny::Expired)
    );
}

#[test]
fn cidrs_v4_v6_and_mapped() {
    let p = principal(KeyPolicy {
        allow_cidrs: vec![
            "198.51.100.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ],
        ..Default::default()
    });
    for (client, allowed) in [
        ("198.51.100.0", true),
        ("198.51.100.255", true),
        ("198.51.101.0", false),
        ("198.51.99.255", false),
        ("2001:db8::1", true),
        ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", true),
        ("2001:db9::1", false),
        // A dual-stack listener reports IPv4 clients as IPv4-mapped IPv6.
        ("::ffff:198.51.100.7", true),
        ("::ffff:198.51.101.7", false),
    ] {
        assert_eq!(allowed_from(&p, client), allowed, "{client}");
    }
    assert_eq!(
        check_access(&p, Endpoint::Models, None, ip("10.0.0.1"), UNIX_EPOCH),
        Err(Deny::SourceNotAllowed)
    );
}

#[test]
fn host_cidrs() {
    let p = principal(KeyPolicy {
        allow_cidrs: vec!["192.0.2.1/32".parse().unwrap(), "::1/128".parse().unwrap()],
        ..Default::default()
    });
    for (client, allowed) in [
        ("192.0.2.1", true),
        ("192.0.2.2", false),
        ("::1", true),
        ("::2", false),
    ] {
        assert_eq!(allowed_from(&p, client), allowed, "{client}");
    }
}

#[test]
fn endpoints() {
    let p = principal(KeyPolicy {
        endpoints: vec![Endpoint::ChatCompletions, Endpoint::Models],
        ..Default::default()
    });
    let c = ip("127.0.0.1");
    assert!(check_access(&p, Endpoint::ChatCompletions, None, c, UNIX_EPOCH).is_ok());
    assert!(check_access(&p, Endpoint::Models, None, c, UNIX_EPOCH).is_ok());
    for e in [
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
    ] {
        assert_eq!(
            check_access(&p, e, None, c, UNIX_EPOCH),
            Err(Deny::EndpointNotAllowed)
        );
    }
}

#[test]
fn endpoint_names_round_trip() {
    for e in Endpoint::ALL {
        assert_eq!(e.as_str().parse::<Endpoint>(), Ok(e));
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            format!("\"{}\"", e.as_str())
        );
    }
    assert_eq!(
        "Chat-Completions".parse::<Endpoint>(),
        Ok(Endpoint::ChatCompletions)
    );
    assert!("chat".parse::<Endpoint>().is_err());
}

#[test]
fn models_and_globs() {
    let p = principal(KeyPolicy {
        models: vec!["llama-3*".into(), "qwen?".into()],
        ..Default::default()
    });
    let c = ip("127.0.0.1");
    let e = Endpoint::ChatCompletions;
    for (model, allowed) in [
        ("llama-3", true),
        ("llama-3.1-70b", true),
        ("qwen2", true),
        ("qwen", false),
        ("llama-2", false),
    ] {
        let want = if allowed {
            Ok(())
        } else {
            Err(Deny::ModelNotAllowed(model.into()))
        };
        assert_eq!(check_access(&p, e, Some(model), c, UNIX_EPOCH), want);
    }
    // No model in the request (GET /v1/models): only the other checks apply.
    assert!(check_access(&p, Endpoint::Models, None, c, UNIX_EPOCH).is_ok());
}

#[test]
fn glob_edges() {
    let many_a = "a".repeat(50);
    let many_a_then_b = format!("{many_a}b");
    for (pattern, text, matches) in [
        ("", "", true),
        ("", "a", false),
        ("*", "", true),
        ("*", "anything/at:all", true),
        ("**", "x", true),
        ("a*b*c", "abc", true),
        ("a*b*c", "aXXbYYc", true),
        ("a*b*c", "aXXbYY", false),
        ("*c", "abcabc", true),
        ("?", "", false),
        ("?", "é", true),
        ("gpt-?o*", "gpt-4o-mini", true),
        ("gpt-4", "gpt-4o", false),
        ("GPT-4", "gpt-4", false),
        ("a*a*a*a*a*b", many_a_then_b.as_str(), true),
        ("a*a*a*a*a*b", many_a.as_str(), false),
    ] {
        assert_eq!(
            glob_match(pattern, text),
            matches,
            "{pattern:?} on {text:?}"
        );
    }
}
