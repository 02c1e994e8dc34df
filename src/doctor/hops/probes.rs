//! Hops 7 and 8: `GET /v1/models` and a streamed 1-token chat completion through the public
//! listener, with a throwaway key that is revoked whatever happens (also when interrupted).

use std::future::Future;
use std::net::SocketAddr;

use crate::config::Config;
use crate::doctor::cert::PinnedLeaf;
use crate::doctor::{probe, Hop, HopResult, KeyNote, Options, Report};

/// Hops 7 and 8, cut short when `interrupt` resolves: pushes both verdicts onto `report` and
/// notes the throwaway key (revoked here).
pub(in crate::doctor) async fn probe_hops(
    report: &mut Report,
    config: &Config,
    target: Option<SocketAddr>,
    pin: Option<PinnedLeaf>,
    name: &str,
    opts: &Options,
    interrupt: impl Future<Output = ()>,
) {
    let (Some(addr), Some(pin)) = (target, pin) else {
        let why = if target.is_none() {
            "skipped: the daemon's HTTPS listener is not up (hop 2)"
        } else {
            "skipped: no certificate could be fetched from the listener (hop 3)"
        };
        report.hops.push(HopResult::skip(Hop::Models, why));
        report.hops.push(HopResult::skip(Hop::Completion, why));
        return;
    };
    let t = probe::Target {
        addr,
        name: name.to_string(),
        pin,
        timeout: opts.timeout,
    };
    let mut key = None;
    let mut done7 = None;
    let probes = models_then_completion(config, &t, opts.model.as_deref(), &mut key, &mut done7);
    let (h7, h8) = tokio::select! {
        r = probes => r,
        _ = interrupt => {
            // A hop cut short was not judged: skipped, not failed (the run exits 1).
            report.interrupted = true;
            const CUT: &str = "skipped: interrupted (SIGINT/SIGTERM) before it finished";
            (
                done7.take().unwrap_or_else(|| HopResult::skip(Hop::Models, CUT)),
                HopResult::skip(Hop::Completion, CUT),
            )
        }
    };
    report.hops.push(h7);
    report.hops.push(h8);
    if let Some(mut k) = key {
        let revoke_error = k.revoke().err();
        report.key = Some(KeyNote {
            name: k.name.clone(),
            id: k.id.clone(),
            revoked: k.is_revoked(),
            revoke_error,
        });
    }
}

/// The probes themselves. `key` receives the throwaway key so the caller revokes it whatever
/// happens; `done7` hop 7's verdict as soon as it is known (kept when hop 8 is interrupted).
async fn models_then_completion(
    config: &Config,
    t: &probe::Target,
    model: Option<&str>,
    key: &mut Option<probe::ThrowawayKey>,
    done7: &mut Option<HopResult>,
) -> (HopResult, HopResult) {
    let k = match probe::ThrowawayKey::create(&config.server.state_dir, &config.store) {
        Ok(k) => key.insert(k),
        Err(e) => {
            return (
                HopResult::fail(
                    Hop::Models,
                    format!("cannot create a throwaway key: {e}"),
                    "run doctor as root or as the modelgate user (it writes a short-lived key to server.state_dir/keys.db)",
                ),
                HopResult::skip(Hop::Completion, "skipped: no throwaway key (hop 7)"),
            )
        }
    };
    let secret = k.secret().to_string();
    let models = match probe::models(t, &secret).await {
        Ok(m) => m,
        Err(f) => {
            return (
                HopResult::fail(Hop::Models, f.detail, f.fix),
                HopResult::skip(Hop::Completion, "skipped: GET /v1/models failed (hop 7)"),
            )
        }
    };
    let h7 = if models.is_empty() {
        HopResult::fail(
            Hop::Models,
            "GET /v1/models answered 200 with no models",
            "no upstream has models yet: give the upstream --model routes, or make its GET /v1/models answer (see hop 6)",
        )
    } else {
        HopResult::pass(
            Hop::Models,
            format!("200 with {} model(s): {}", models.len(), models.join(", ")),
        )
    };
    *done7 = Some(h7.clone());
    let Some(model) = model
        .map(str::to_string)
        .or_else(|| models.first().cloned())
    else {
        return (
            h7,
            HopResult::skip(Hop::Completion, "skipped: no model to ask (hop 7)"),
        );
    };
    let h8 = match probe::completion(t, &secret, &model).await {
        Ok(s) => HopResult::pass(
            Hop::Completion,
            format!(
                "{model}: {} chunk(s), first after {} ms, [DONE] after {} ms",
                s.chunks, s.first_chunk_ms, s.total_ms
            ),
        ),
        Err(f) => HopResult::fail(Hop::Completion, f.detail, f.fix),
    };
    (h7, h8)
}
