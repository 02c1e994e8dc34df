use super::*;

#[test]
fn recorded_requests_and_active_streams_are_rendered() {
    let m = Metrics::new();
    let (k1, k2): (Arc<str>, Arc<str>) = (Arc::from("k1"), Arc::from("k2"));
    m.stream_started(&k1, "k1-name");
    m.stream_started(&k1, "k1-name");
    m.stream_started(&k2, "k2-name");
    let active = m.active_streams();
    assert_eq!(active.len(), 2);
    assert_eq!(
        (
            active[0].key_id.as_str(),
            active[0].key_name.as_str(),
            active[0].count
        ),
        ("k1", "k1-name", 2)
    );
    m.record(&RequestDone {
        key_id: "k1",
        model: "m",
        status: 200,
        usage: Some((10, 5)),
        ttfb: Some(Duration::from_millis(30)),
        duration: Duration::from_secs(2),
    });
    m.stream_ended(&k1);
    m.stream_ended(&k2);
    assert_eq!(m.active_streams().len(), 1);
    m.stream_ended(&k1);
    assert!(m.active_streams().is_empty());
    assert_eq!(m.request_count("k1", "m", 200), 1);
    let text = render(&m, &Scrape::default());
    assert_has(
        &text,
        &[
            "modelgate_requests_total{key_id=\"k1\",model=\"m\",status=\"200\"} 1\n",
            "modelgate_tokens_total{key_id=\"k1\",kind=\"prompt\"} 10\n",
            "modelgate_tokens_total{key_id=\"k1\",kind=\"completion\"} 5\n",
            "modelgate_active_streams{key_id=\"k1\"} 0\n",
            "modelgate_request_ttfb_seconds_bucket{le=\"0.025\"} 0\n",
            "modelgate_request_ttfb_seconds_bucket{le=\"0.05\"} 1\n",
            "modelgate_request_duration_seconds_bucket{le=\"+Inf\"} 1\n",
            "modelgate_request_duration_seconds_sum 2\n",
            "modelgate_request_duration_seconds_count 1\n",
        ],
    );
    // A refusal: counter and latency only, no tokens and no TTFB.
    m.record(&RequestDone {
        key_id: "-",
        model: "-",
        status: 401,
        usage: None,
        ttfb: None,
        duration: Duration::from_millis(1),
    });
    let text = render(&m, &Scrape::default());
    assert_has(
        &text,
        &[
            "modelgate_requests_total{key_id=\"-\",model=\"-\",status=\"401\"} 1\n",
            "modelgate_request_ttfb_seconds_count 1\n",
            "modelgate_request_duration_seconds_count 2\n",
        ],
    );
    assert!(!text.contains("modelgate_tokens_total{key_id=\"-\""));
}

/// Asserts that `text` contains every one of `parts`.
fn assert_has(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "{p:?} in {text}");
    }
}

#[test]
fn exposition_is_well_formed() {
    let m = Metrics::new();
    m.request("k\"1", "a\\b\nc", 429);
    m.reload(true);
    m.reload(false);
    m.reload(false);
    let scrape = Scrape {
        peers: vec![PeerStats {
            name: "corp".into(),
            public_key: crate::wgkey::PrivateKey::generate().public_key(),
            endpoint: None,
            allowed_ips: Vec::new(),
            last_handshake: Some(Duration::from_millis(2500)),
            rx_bytes: 7,
            tx_bytes: 9,
            keepalive: None,
            last_received: Some(Duration::from_millis(1500)),
            health: crate::tunnel::PeerHealth::Silent,
            silent_after: Duration::from_secs(55),
        }],
        upstreams: vec![("vllm".into(), true, 3, 2), ("down".into(), false, 0, 0)],
        certificate_not_after: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000)),
        replicas: vec![
            ReplicaGauges {
                upstream: "vllm".into(),
                healthy: true,
                ejections: 0,
                retries: 0,
            },
            ReplicaGauges {
                upstream: "down".into(),
                healthy: false,
                ejections: 4,
                retries: 7,
            },
        ],
        models_queued: vec![("coder".into(), 5)],
    };
    let text = render(&m, &scrape);
    assert!(text.contains(
        "modelgate_requests_total{key_id=\"k\\\"1\",model=\"a\\\\b\\nc\",status=\"429\"} 1\n"
    ));
    assert!(text.contains("modelgate_peer_last_handshake_age_seconds{peer=\"corp\"} 2.5\n"));
    assert!(text.contains("modelgate_peer_receive_bytes_total{peer=\"corp\"} 7\n"));
    assert!(text.contains("modelgate_peer_up{peer=\"corp\"} 0\n"));
    assert!(text.contains("modelgate_peer_last_receive_age_seconds{peer=\"corp\"} 1.5\n"));
    assert!(text.contains("modelgate_peer_transmit_bytes_total{peer=\"corp\"} 9\n"));
    assert!(text.contains("modelgate_upstream_up{upstream=\"vllm\"} 1\n"));
    assert!(text.contains("modelgate_upstream_up{upstream=\"down\"} 0\n"));
    assert!(text.contains("modelgate_upstream_in_flight{upstream=\"vllm\"} 3\n"));
    assert!(text.contains("modelgate_upstream_queued{upstream=\"vllm\"} 2\n"));
    assert!(text.contains("modelgate_upstream_healthy{upstream=\"vllm\"} 1\n"));
    assert!(text.contains("modelgate_upstream_healthy{upstream=\"down\"} 0\n"));
    assert!(text.contains("modelgate_upstream_ejections_total{upstream=\"down\"} 4\n"));
    assert!(text.contains("modelgate_upstream_retries_total{upstream=\"down\"} 7\n"));
    assert!(text.contains("modelgate_model_queued{model=\"coder\"} 5\n"));
    assert!(text.contains("modelgate_config_reloads_total{result=\"refused\"} 2\n"));
    assert!(text.contains("modelgate_certificate_not_after_seconds 1900000000\n"));
    // Every line is a comment or `name{labels} value` with a numeric value; each family
    // has exactly one TYPE line.
    let mut types = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert!(types.insert(name.to_string()), "duplicate TYPE for {name}");
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let value = line.rsplit(' ').next().unwrap();
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf",
            "bad line {line:?}"
        );
        assert!(line.starts_with("modelgate_"), "bad line {line:?}");
    }
}
