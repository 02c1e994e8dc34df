//! The admit step and its settlement: the key's access policy (expiry, source network,
//! endpoint, model), then its limiter (`policy::limits`: RPM, TPM, concurrency, budget), which
//! hands out an [`Admission`]; a [`Settlement`] owns it and settles it exactly once.
//!
//! Admission comes before routing, so that a key out of budget is told `insufficient_quota`
//! even while the model is unreachable (a refusal with a reason beats a 503 the client would
//! retry forever); a request refused later (unknown model, tunnel down) has still used one
//! request of its RPM, as with OpenAI.
//!
//! Must never hold the limiter's lock across an `.await`: every call here is one O(1) step.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use super::error::ApiError;
use super::request::ClientRequest;
use super::GatewayState;
use crate::keys::ledger::{LedgerWriter, UsageEvent};
use crate::policy::limits::{Admission, Estimate, Limiter};
use crate::policy::{self, Endpoint, Principal};

/// Bytes per token for the admission estimate: OpenAI's rule of thumb (about four characters
/// of English text per token). Counting the whole JSON body over-counts a little (field names,
/// quotes), which errs towards refusing early, never towards over-admitting; settling corrects
/// the charge with the upstream's reported usage.
pub const BYTES_PER_TOKEN: u64 = 4;

/// Checks the key's access to the request, then admits it against the key's limits. Dropping
/// the returned settlement (any refusal later on) releases the slot and the reservation.
pub fn admit(
    state: &GatewayState,
    principal: &Principal,
    request: &ClientRequest,
    client: IpAddr,
) -> Result<Settlement, ApiError> {
    let endpoint = request.endpoint;
    policy::check_access(
        principal,
        endpoint,
        Some(&request.model),
        client,
        SystemTime::now(),
    )
    .map_err(ApiError::Forbidden)?;
    let estimate = estimate(endpoint, request.len(), request.max_tokens());
    let admitted = state
        .limiter
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(
            &principal.id,
            &principal.policy,
            estimate,
            Instant::now(),
            SystemTime::now(),
        );
    let admission = admitted.map_err(ApiError::from_limit)?;
    Ok(Settlement {
        limiter: state.limiter.clone(),
        ledger: state.ledger.clone(),
        admission: Some(admission),
        estimate,
        prompt_charged: false,
    })
}

/// What a request is expected to cost before it goes upstream.
fn estimate(endpoint: Endpoint, body_len: usize, max_tokens: Option<u64>) -> Estimate {
    Estimate {
        prompt_tokens: body_len as u64 / BYTES_PER_TOKEN,
        // Embeddings generate nothing: reserve no completion tokens for them.
        max_tokens: if matches!(endpoint, Endpoint::Embeddings) {
            Some(0)
        } else {
            max_tokens
        },
    }
}

/// What a request used, as settled: `(prompt, completion, estimated)`.
pub type Used = (u64, u64, bool);

/// Owns an [`Admission`] and settles it exactly once: explicitly when the response body ends,
/// or on drop with nothing charged (the request failed before the upstream answered). Either
/// way the concurrency slot and the unused reservation come back.
pub struct Settlement {
    limiter: Arc<Mutex<Limiter>>,
    ledger: Option<LedgerWriter>,
    admission: Option<Admission>,
    estimate: Estimate,
    /// The prompt estimate has been charged with the first streamed token.
    prompt_charged: bool,
}

impl Settlement {
    /// The prompt tokens estimated at admission.
    pub fn prompt_tokens(&self) -> u64 {
        self.estimate.prompt_tokens
    }

    /// The limiter's `x-ratelimit-*` headers at admission.
    pub fn rate_headers(&self) -> Vec<(&'static str, String)> {
        self.admission
            .as_ref()
            .map_or_else(Vec::new, |a| a.headers.pairs())
    }

    /// Completion tokens reserved at admission (the cap for an estimate).
    pub fn reserved_completion(&self) -> u64 {
        self.admission.as_ref().map_or(0, |a| {
            a.reserved().saturating_sub(self.estimate.prompt_tokens)
        })
    }

    /// Charges `tokens` streamed completion tokens (plus the prompt estimate with the first)
    /// to a key with TPM or a budget; keys without either skip the lock. False: the key is
    /// overdrawn and the stream must end.
    pub fn charge(&mut self, tokens: u64) -> bool {
        let Some(adm) = self.admission.as_mut().filter(|a| a.metered()) else {
            return true;
        };
        let n = if self.prompt_charged {
            tokens
        } else {
            self.prompt_charged = true;
            tokens.saturating_add(self.estimate.prompt_tokens)
        };
        self.limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .charge_mid_stream(adm, n, Instant::now())
    }

    /// Settles with what was `used`; `None` charges nothing and records nothing (no model work
    /// was done, as far as we can tell). Later calls do nothing.
    pub fn settle(&mut self, used: Option<Used>) {
        let Some(adm) = self.admission.take() else {
            return;
        };
        let key_id: Arc<str> = Arc::from(adm.key_id());
        let (prompt, completion, estimated) = used.unwrap_or((0, 0, false));
        let wall = SystemTime::now();
        self.limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .settle(adm, prompt.saturating_add(completion), Instant::now(), wall);
        if let (Some(ledger), Some(_)) = (&self.ledger, used) {
            let ev = UsageEvent {
                key_id: key_id.clone(),
                at: wall,
                prompt_tokens: prompt,
                completion_tokens: completion,
                estimated,
            };
            if !ledger.record(ev) {
                tracing::warn!(key_id = %key_id, "usage ledger queue full; usage event dropped");
            }
        }
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.settle(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_estimate_counts_bytes_and_reserves_nothing_for_embeddings() {
        let e = estimate(Endpoint::ChatCompletions, 400, Some(64));
        assert_eq!((e.prompt_tokens, e.max_tokens), (100, Some(64)));
        let e = estimate(Endpoint::Embeddings, 40, None);
        assert_eq!((e.prompt_tokens, e.max_tokens), (10, Some(0)));
    }
}
