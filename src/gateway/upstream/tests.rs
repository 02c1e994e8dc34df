use super::*;

fn spec(name: &str, port: u16, models: &[&str]) -> UpstreamSpec {
    UpstreamSpec {
        name: name.into(),
        addr: SocketAddr::from(([10, 20, 0, 5], port)),
        base_path: "/v1".into(),
        api_key: None,
        models: models
            .iter()
            .map(|m| (m.to_string(), m.to_string()))
            .collect(),
        max_concurrent: None,
    }
}

fn names(r: &[Replica]) -> Vec<&str> {
    r.iter().map(|r| r.upstream.spec.name.as_str()).collect()
}

/// A reload keeps the `Arc` (and with it discovery state, health and in-flight count) of an
/// unchanged upstream, starts a changed one fresh, and drops a removed one from the table
/// while requests that hold it keep it.
#[test]
fn reconfigured_routes_carry_unchanged_upstreams_over() {
    let old = Routes::new(vec![spec("a", 8000, &[]), spec("b", 8001, &["m"])]);
    let a = old.upstreams()[0].clone();
    *a.discovered.write().unwrap() = vec!["disc".into()];
    a.reachable.store(true, Ordering::Relaxed);
    a.health.failed(Instant::now(), "refused");
    let held_b = old.replicas("m").remove(0).upstream;

    let new = old.reconfigured(vec![spec("a", 8000, &[]), spec("c", 8002, &["m2"])], vec![]);
    assert!(
        Arc::ptr_eq(&new.upstreams()[0], &a),
        "unchanged upstream carried over"
    );
    assert_eq!(names(&new.replicas("disc")), ["a"]);
    assert_eq!(
        new.upstreams()[0].health.ejections(),
        1,
        "health carried over"
    );
    assert!(
        new.replicas("m").is_empty() && !new.serves("m"),
        "removed upstream no longer routed"
    );
    assert_eq!(new.replicas("m2")[0].model_id, "m2");
    assert_eq!(
        held_b.spec.name, "b",
        "a request in flight keeps its upstream"
    );

    let changed = new.reconfigured(vec![spec("a", 9000, &[]), spec("c", 8002, &["m2"])], vec![]);
    assert!(
        !Arc::ptr_eq(&changed.upstreams()[0], &a),
        "changed upstream starts fresh"
    );
    assert!(changed.upstreams()[0].discovered().is_empty());
    assert_eq!(changed.upstreams()[0].health.ejections(), 0);
    assert!(Arc::ptr_eq(&changed.upstreams()[1], &new.upstreams()[1]));
}

/// Several upstreams serve one model: static routes first (file order, each with its own
/// id), then discovering upstreams that listed it; the model list names every replica.
#[test]
fn a_model_has_every_upstream_that_serves_it_as_a_replica() {
    let mut alias = spec("b", 8001, &[]);
    alias.models = vec![("coder".into(), "Qwen/Coder-AWQ".into())];
    let routes = Routes::with_models(
        vec![
            spec("disc", 8003, &[]),
            spec("a", 8000, &["coder", "small"]),
            alias,
            spec("other", 8002, &["big"]),
        ],
        vec![ModelConfig {
            name: "coder".into(),
            balance: Balance::Affinity,
        }],
    );
    *routes.upstreams()[0].discovered.write().unwrap() = vec!["coder".into()];
    let r = routes.replicas("coder");
    assert_eq!(names(&r), ["a", "b", "disc"]);
    let ids: Vec<&str> = r.iter().map(|r| r.model_id.as_str()).collect();
    assert_eq!(ids, ["coder", "Qwen/Coder-AWQ", "coder"]);
    assert_eq!(names(&routes.replicas("big")), ["other"]);
    assert!(routes.replicas("nope").is_empty());
    assert_eq!(routes.balance("coder"), Balance::Affinity);
    assert_eq!(routes.balance("big"), Balance::LeastLoaded);
    assert_eq!(
        routes.models(),
        [
            ("big".to_string(), vec!["other".to_string()]),
            (
                "coder".to_string(),
                vec!["a".to_string(), "b".to_string(), "disc".to_string()]
            ),
            ("small".to_string(), vec!["a".to_string()]),
        ]
    );
}
