use std::io;
use std::sync::Mutex;

use super::*;
use crate::gateway::fair::{QueueLimits, Scheduler, Slot, Want};
use crate::gateway::upstream::UpstreamSpec;
use crate::policy::limits::{RateHeaders, Refusal, RefusalKind};
use crate::policy::KeyPolicy;
use crate::telemetry::{render, Scrape};

fn upstream() -> Arc<Upstream> {
    upstream_named("vllm")
}

fn upstream_named(name: &str) -> Arc<Upstream> {
    Upstream::new(UpstreamSpec {
        name: name.into(),
        addr: "10.20.0.5:8000".parse().unwrap(),
        base_path: "/v1".into(),
        api_key: None,
        models: vec![("m".into(), "m".into())],
        max_concurrent: None,
    })
}

fn principal(id: &str) -> Arc<Principal> {
    Arc::new(Principal {
        id: id.into(),
        name: format!("{id}-name"),
        policy: KeyPolicy::default(),
    })
}

/// A slot at `u`, as `forward` takes one for a request routed there (it counts the request in
/// flight at `u` until dropped).
fn slot_at(u: &Arc<Upstream>) -> Slot {
    let scheduler = Scheduler::new();
    let candidates = [u.clone()];
    let want = Want {
        key: "k",
        model: "m",
        candidates: &candidates,
        preferred: None,
        any_health: false,
        now: std::time::Instant::now(),
    };
    let limits = QueueLimits {
        max_queued: 1,
        timeout: Duration::from_secs(1),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(scheduler.acquire(&want, limits)).unwrap().1
}

/// A routed request is an active stream of its key (the flight) and in flight at its upstream
/// (its slot), each until dropped.
#[test]
fn flight_counts_streams_and_in_flight_until_dropped() {
    let m = Arc::new(Metrics::new());
    let u = upstream();
    let a = (Flight::start(&m, &principal("k1"), &u), slot_at(&u));
    let b = (Flight::start(&m, &principal("k1"), &u), slot_at(&u));
    let c = (Flight::start(&m, &principal("k2"), &u), slot_at(&u));
    assert_eq!(u.in_flight(), 3);
    let active: Vec<_> = m
        .active_streams()
        .into_iter()
        .map(|a| (a.key_id, a.key_name, a.count))
        .collect();
    let owned = |id: &str, n| (id.to_string(), format!("{id}-name"), n);
    assert_eq!(active, [owned("k1", 2), owned("k2", 1)]);
    drop(a);
    drop(c);
    assert_eq!(u.in_flight(), 1);
    assert_eq!(m.active_streams().len(), 1);
    drop(b);
    assert_eq!(u.in_flight(), 0);
    assert!(m.active_streams().is_empty());
}

/// The `audit` lines written while `f` runs.
fn audit_lines(f: impl FnOnce()) -> Vec<String> {
    #[derive(Clone)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf(Arc::new(Mutex::new(Vec::new())));
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    text.lines().map(str::to_string).collect()
}

/// Asserts that `text` contains every one of `parts`.
fn assert_has(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "{p:?} in {text}");
    }
}

/// The field names of an audit line, in order.
fn field_names(line: &str) -> Vec<&str> {
    line.split(' ')
        .filter_map(|w| w.split_once('=').map(|(k, _)| k))
        .collect()
}

#[test]
fn refused_and_answered_requests_write_one_line_shape_and_their_metrics() {
    let m = Arc::new(Metrics::new());
    let u = upstream();
    let routes = Routes::new(vec![u.spec.clone()]);
    let client: IpAddr = "192.0.2.7".parse().unwrap();
    let lines = audit_lines(|| {
        // No key: only what the gateway knows before authenticating.
        AuditRecord::start(&m, client, Endpoint::ChatCompletions)
            .refused(&ApiError::MissingKey, &routes);
        // A key and a model no route serves: logged, but not a metric label.
        let mut r = AuditRecord::start(&m, client, Endpoint::Completions);
        r.authenticated(&principal("k1"));
        r.read(120, "made-up");
        r.refused(&ApiError::ModelNotFound("made-up".into()), &routes);
        // A served model refused by the key's limits is counted under its model.
        let mut r = AuditRecord::start(&m, client, Endpoint::ChatCompletions);
        r.authenticated(&principal("k1"));
        r.read(120, "m");
        let limited = Refusal {
            kind: RefusalKind::RateLimitExceeded,
            retry_after: Duration::from_secs(1),
            headers: RateHeaders::default(),
        };
        r.refused(&ApiError::from_limit(limited), &routes);
        // Answered after one retry: every field known; the upstream is the replica that
        // answered, the stream counted once.
        let mut r = AuditRecord::start(&m, client, Endpoint::ChatCompletions);
        r.authenticated(&principal("k1"));
        r.read(120, "m");
        r.routed(&upstream_named("vllm-b"));
        r.retried();
        let slot = slot_at(&u);
        r.routed(&u);
        assert_eq!(u.in_flight(), 1);
        assert_eq!(m.active_streams().len(), 1);
        r.answered(StatusCode::OK);
        assert!(r.success());
        r.sent(30);
        r.sent(12);
        assert_eq!(r.bytes_out(), 42);
        r.finish(Outcome::Ok, Some((10, 5)));
        assert!(m.active_streams().is_empty(), "emitting ends the flight");
        drop(slot);
    });
    assert_eq!(u.in_flight(), 0, "the body's end frees the slot");
    assert_eq!(lines.len(), 4, "{lines:?}");
    let shape = field_names(&lines[3]);
    assert_eq!(
        shape,
        [
            "key_id",
            "key",
            "client",
            "endpoint",
            "model",
            "upstream",
            "retries",
            "status",
            "bytes_in",
            "bytes_out",
            "prompt_tokens",
            "completion_tokens",
            "ttfb_ms",
            "duration_ms",
            "outcome"
        ]
    );
    for line in &lines {
        assert!(line.contains(" audit: request "), "{line}");
        assert_eq!(field_names(line), shape, "{line}");
    }
    assert_has(
        &lines[0],
        &[
            "key_id=- ",
            "key=- ",
            "client=192.0.2.7 ",
            "endpoint=chat/completions ",
            "model=- ",
            "upstream=- ",
            "retries=0 ",
            "status=401 ",
            "bytes_in=- ",
            "bytes_out=0 ",
            "prompt_tokens=- ",
            "completion_tokens=- ",
            "ttfb_ms=- ",
            "outcome=MissingKey",
        ],
    );
    assert_has(
        &lines[1],
        &[
            "key_id=k1 ",
            "key=k1-name ",
            "model=made-up ",
            "status=404 ",
        ],
    );
    assert_has(&lines[2], &["status=429 ", "outcome=RateLimited("]);
    let answered = &lines[3];
    assert_has(
        answered,
        &[
            "upstream=vllm ",
            "retries=1 ",
            "status=200 ",
            "bytes_in=120 ",
            "bytes_out=42 ",
            "prompt_tokens=10 ",
            "completion_tokens=5 ",
            "outcome=ok",
        ],
    );
    assert!(!answered.contains("ttfb_ms=- "), "{answered}");

    let text = render(&m, &Scrape::default());
    assert_has(
        &text,
        &[
            "modelgate_requests_total{key_id=\"-\",model=\"-\",status=\"401\"} 1\n",
            "modelgate_requests_total{key_id=\"k1\",model=\"-\",status=\"404\"} 1\n",
            "modelgate_requests_total{key_id=\"k1\",model=\"m\",status=\"429\"} 1\n",
            "modelgate_requests_total{key_id=\"k1\",model=\"m\",status=\"200\"} 1\n",
            "modelgate_tokens_total{key_id=\"k1\",kind=\"prompt\"} 10\n",
            "modelgate_tokens_total{key_id=\"k1\",kind=\"completion\"} 5\n",
            "modelgate_request_ttfb_seconds_count 1\n",
            "modelgate_request_duration_seconds_count 4\n",
        ],
    );
    assert!(!text.contains("made-up"), "{text}");
}
