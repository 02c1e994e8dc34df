//! Per-key rate limits, concurrency and token budgets: a pure, exact limiter core.
//!
//! Owns "may this key start one more request now, and how many tokens does it hold?". Never
//! reads a clock (callers pass a monotonic `now: Instant` for the rate windows and a wall-clock
//! `wall: SystemTime` for the UTC day/month budgets), never does I/O, never logs a secret. One
//! [`Limiter`] serves one process; the gateway wraps it in a `Mutex` (every call is O(1) apart
//! from the amortised sweep, so critical sections are short).
//!
//! # Semantics: token buckets (GCRA-equivalent), not fixed or sliding windows
//!
//! RPM and TPM are token buckets of capacity `limit` that refill continuously at `limit` per
//! minute. Why:
//! - It is what OpenAI documents and what its headers describe: `x-ratelimit-reset-*` is "the
//!   time until the rate limit resets to its initial state", e.g. `1s` after one request under
//!   60 RPM and `6m0s` for a 150k-token burst. Clients (the OpenAI SDKs, Cursor) back off on
//!   these values, so ours mean the same thing.
//! - It is exact with O(1) state per key: a fixed window admits 2× the limit across a minute
//!   boundary; a sliding-window *log* is exact but stores one entry per request (unbounded for
//!   large TPM); a sliding-window *counter* is an approximation. A bucket never admits more
//!   than `limit` in any 60 s interval plus what refilled during it, which is the definition.
//! - Refunds are exact: reserving `max_tokens` and refunding the unused part at settle leaves
//!   the bucket exactly where charging the actual amount up front would have (refill is linear
//!   and saturates at full).
//!
//! Arithmetic is integer and exact: a bucket's fill is kept in *units* of `1/60_000` of a token
//! (or request), so one millisecond refills exactly `limit` units; rounding only ever delays
//! (remaining is floored, waits are ceiled), never over-admits.
//!
//! Tokens are reserved up front: `prompt_tokens + (max_tokens or the configured default cap)`,
//! like OpenAI, which counts `max_tokens` toward the TPM estimate. [`Limiter::settle`] charges
//! the difference to the actual count; [`Limiter::charge_mid_stream`] charges tokens beyond the
//! reservation as they stream and says when the stream must stop. Budgets are per UTC calendar
//! day or month and start from the ledger's usage ([`Limiter::seed_usage`]).
//!
//! Memory: one small entry per key seen; an entry is dropped once its buckets are full again,
//! nothing is in flight and it holds no budget usage for the current period (sweeps run at
//! most once a minute, amortised into [`Limiter::admit`]). Keys are authenticated before they
//! reach the limiter, so the number of entries is bounded by the key store.

use crate::civil::{civil_from_days, days_from_civil};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Budget, BudgetPeriod, KeyPolicy};

/// Units per token (or request): the bucket refills `limit` units per millisecond.
const UNITS: u64 = 60_000;
/// Milliseconds in a UTC day.
const DAY_MS: u64 = 86_400_000;
/// Sweep idle entries at most this often.
const SWEEP_EVERY_MS: u64 = 60_000;
/// `retry_after` when only in-flight requests stand in the way (their end is unknown).
const IN_FLIGHT_RETRY: Duration = Duration::from_secs(1);

/// Limiter settings (every capacity is a setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimiterConfig {
    /// Completion tokens reserved when a request has no `max_tokens`.
    pub default_max_tokens: u32,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        // Enough for a long code edit; a request that needs more can say so with max_tokens.
        LimiterConfig {
            default_max_tokens: 4096,
        }
    }
}

/// What a request is expected to cost, known before it goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Estimate {
    /// Prompt tokens (an estimate from the body size is fine; settle corrects it).
    pub prompt_tokens: u64,
    /// The request's `max_tokens` / `max_completion_tokens`, if any.
    pub max_tokens: Option<u64>,
}

/// Why a request was refused; the gateway maps each to one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// RPM or TPM exhausted for now: 429 `rate_limit_exceeded`.
    RateLimitExceeded,
    /// The day/month token budget cannot cover the request: 429 `insufficient_quota`.
    InsufficientQuota,
    /// `max_concurrent` requests already in flight: 429 `rate_limit_exceeded`.
    TooManyConcurrent,
    /// The reservation alone exceeds the TPM limit or the whole budget, so waiting cannot help:
    /// 429 `rate_limit_exceeded` without `Retry-After` (OpenAI's "Request too large").
    TooLarge,
}

/// The `x-ratelimit-*` values of one response. `None` where the key has no such limit (the
/// header is then omitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateHeaders {
    pub requests: Option<HeaderTriple>,
    pub tokens: Option<HeaderTriple>,
}

/// `limit`, `remaining` and `reset` (time until the bucket is full again) of one dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderTriple {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

impl RateHeaders {
    /// The headers as `(name, value)` pairs, in OpenAI's order and format.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(6);
        if let Some(r) = self.requests {
            out.push(("x-ratelimit-limit-requests", r.limit.to_string()));
            out.push(("x-ratelimit-remaining-requests", r.remaining.to_string()));
            out.push(("x-ratelimit-reset-requests", go_duration(r.reset)));
        }
        if let Some(t) = self.tokens {
            out.push(("x-ratelimit-limit-tokens", t.limit.to_string()));
            out.push(("x-ratelimit-remaining-tokens", t.remaining.to_string()));
            out.push(("x-ratelimit-reset-tokens", go_duration(t.reset)));
        }
        out
    }
}

/// A refused request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    /// How long until the same request would be admitted (as far as the limiter can tell;
    /// zero for [`RefusalKind::TooLarge`]).
    pub retry_after: Duration,
    pub headers: RateHeaders,
}

impl Refusal {
    /// The `Retry-After` header value: whole seconds, rounded up, at least 1; `None` for
    /// [`RefusalKind::TooLarge`] (retrying cannot help).
    pub fn retry_after_header(&self) -> Option<u64> {
        if self.kind == RefusalKind::TooLarge {
            return None;
        }
        let ms = self.retry_after.as_millis() as u64;
        Some(ms.div_ceil(1000).max(1))
    }
}

/// An admitted request: holds its reservation and concurrency slot until
/// [`Limiter::settle`]. Dropping it without settling leaks the slot; the gateway wraps it in a
/// guard that settles on drop.
#[must_use = "an admission must be settled, or its concurrency slot and reservation leak"]
#[derive(Debug)]
pub struct Admission {
    key: Arc<str>,
    /// Tokens reserved at admission.
    reserved: u64,
    /// Tokens charged so far: the reservation plus any mid-stream overrun.
    charged: u64,
    /// Tokens the request reported producing so far ([`Limiter::charge_mid_stream`]).
    produced: u64,
    /// The key's budget at admission: period and limit.
    budget: Option<(BudgetPeriod, u64)>,
    /// The reservation is below `prompt + max_tokens` (what was left of the budget or the TPM
    /// capacity): the stream may have to end early.
    clamped: bool,
    pub headers: RateHeaders,
}

impl Admission {
    /// Tokens reserved at admission.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }
    /// Tokens charged so far (reservation plus mid-stream overrun).
    pub fn charged(&self) -> u64 {
        self.charged
    }
    /// The key this admission belongs to.
    pub fn key_id(&self) -> &str {
        &self.key
    }
    /// Whether the reservation was clamped below `prompt + max_tokens`.
    pub fn clamped(&self) -> bool {
        self.clamped
    }
    /// Whether tokens produced while streaming must be charged as they come
    /// ([`Limiter::charge_mid_stream`]): the key has a TPM limit or a budget. Keys without
    /// either skip the per-event lock.
    pub fn metered(&self) -> bool {
        self.budget.is_some() || self.headers.tokens.is_some()
    }
}

/// A token bucket's fill level: `used` units at `at_ms`. Full = `used == 0`.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    used: u64,
    at_ms: u64,
}

impl Bucket {
    /// Refills up to `now_ms` at `limit` units per ms.
    fn refill(&mut self, limit: u64, now_ms: u64) {
        if now_ms > self.at_ms {
            let gained = limit.saturating_mul(now_ms - self.at_ms);
            self.used = self.used.saturating_sub(gained);
            self.at_ms = now_ms;
        }
    }
    /// Milliseconds until `cost` more units fit under `limit * UNITS`.
    fn wait_ms(&self, limit: u64, cost: u64) -> u64 {
        let cap = limit.saturating_mul(UNITS);
        let need = self.used.saturating_add(cost).saturating_sub(cap);
        need.div_ceil(limit.max(1))
    }
    fn header(&self, limit: u64) -> HeaderTriple {
        let cap = limit.saturating_mul(UNITS);
        HeaderTriple {
            limit,
            remaining: cap.saturating_sub(self.used) / UNITS,
            reset: Duration::from_millis(self.used.div_ceil(limit.max(1))),
        }
    }
}

/// Token usage in one budget period (a UTC day number or a month number).
#[derive(Debug, Clone, Copy, Default)]
struct PeriodUsage {
    period: u64,
    tokens: u64,
}

impl PeriodUsage {
    fn roll(&mut self, period: u64) {
        if self.period != period {
            *self = PeriodUsage { period, tokens: 0 };
        }
    }
}

/// Per-key state.
#[derive(Debug, Default)]
struct KeyState {
    id: Option<Arc<str>>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    requests: Bucket,
    tokens: Bucket,
    in_flight: u32,
    /// Tokens charged by in-flight requests, not yet committed to a period.
    in_flight_tokens: u64,
    /// Whether the key has a budget (or was seeded): only then is usage kept per period.
    budgeted: bool,
    day: PeriodUsage,
    month: PeriodUsage,
    /// A shared store's budget lease (only in leased mode, see [`Limiter::set_leased`]).
    lease: Option<Lease>,
}

/// The share of a key's budget this appliance may spend (a shared store's lease).
#[derive(Debug, Clone, Copy)]
struct Lease {
    /// The budget's period (UTC day or month number) the lease is for.
    period: u64,
    /// Tokens granted to this appliance in that period (cumulative).
    granted: u64,
    /// Tokens this appliance's settled requests spent in that period since the lease began.
    spent: u64,
    /// Monotonic ms after which the lease is void (the store may have given it to others).
    valid_until_ms: u64,
    /// The store had nothing left to grant at the last lease: the budget is spent.
    exhausted: bool,
}

/// A lease from the shared store, for [`Limiter::set_lease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Tokens granted in the period in total.
    pub granted: u64,
    /// The store had nothing left to grant.
    pub exhausted: bool,
    /// How long the lease may be spent from `now` on.
    pub valid_for: Duration,
}

/// What [`Limiter::lease_state`] reports to the sync task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseState {
    pub granted: u64,
    pub spent: u64,
    /// Tokens charged by requests in flight (spent from the lease, not yet settled).
    pub in_flight: u64,
}

impl KeyState {
    fn refill(&mut self, now_ms: u64) {
        if let Some(l) = self.rpm {
            self.requests.refill(l, now_ms);
        }
        if let Some(l) = self.tpm {
            self.tokens.refill(l, now_ms);
        }
    }
    fn headers(&self) -> RateHeaders {
        RateHeaders {
            requests: self.rpm.map(|l| self.requests.header(l)),
            tokens: self.tpm.map(|l| self.tokens.header(l)),
        }
    }
    /// Takes the key's current limits from `policy` (they change at reload) and brings its
    /// buckets up to `now_ms` and its budget usage to the UTC `day` and `month`.
    /// `share` appliances split the key's rate limits (each takes `limit / share`, rounded up).
    fn update(&mut self, policy: &KeyPolicy, now_ms: u64, day: u64, month: u64, share: u32) {
        let part = |l: u32| u64::from(l.div_ceil(share.max(1)).max(1));
        self.rpm = policy.rpm.map(part);
        self.tpm = policy.tpm.map(part);
        self.budgeted |= policy.budget.is_some();
        self.refill(now_ms);
        self.day.roll(day);
        self.month.roll(month);
    }
    /// Tokens committed in the current budget `period`.
    fn used(&self, period: BudgetPeriod) -> u64 {
        match period {
            BudgetPeriod::Day => self.day.tokens,
            BudgetPeriod::Month => self.month.tokens,
        }
    }
    fn refusal(&self, kind: RefusalKind, retry_after: Duration) -> Refusal {
        Refusal {
            kind,
            retry_after,
            headers: self.headers(),
        }
    }
    /// The tokens to reserve for a request that needs at least `minimum` and asks for `asked`:
    /// `asked`, clamped to what is left of the `budget` and to the TPM capacity. Refused when
    /// `minimum` can never fit (budget or TPM too small), not before the next budget period
    /// starts, or not until in-flight requests settle.
    fn reservation(
        &self,
        budget: Option<Budget>,
        minimum: u64,
        asked: u64,
        wall: SystemTime,
        leased: Option<(u64, u64)>,
    ) -> Result<u64, Refusal> {
        let mut reserve = asked;
        if let (Some(b), Some(lease_now)) = (budget, leased) {
            // A shared store: only the local lease counts (no round trip on the request path).
            if minimum > b.tokens {
                return Err(self.refusal(RefusalKind::TooLarge, Duration::ZERO));
            }
            let (period_now, now_ms) = lease_now;
            let lease = self
                .lease
                .filter(|l| l.period == period_now && now_ms < l.valid_until_ms);
            let available = lease.map_or(0, |l| {
                l.granted
                    .saturating_sub(l.spent)
                    .saturating_sub(self.in_flight_tokens)
            });
            if minimum > available {
                if lease.is_some_and(|l| l.exhausted) && self.in_flight_tokens == 0 {
                    let wait = until_next(b.period, wall);
                    return Err(self.refusal(RefusalKind::InsufficientQuota, wait));
                }
                // In-flight requests settle, or the next lease (within a second) brings more.
                return Err(self.refusal(RefusalKind::RateLimitExceeded, IN_FLIGHT_RETRY));
            }
            reserve = reserve.min(available);
        } else if let Some(b) = budget {
            let used = self.used(b.period);
            if minimum > b.tokens {
                return Err(self.refusal(RefusalKind::TooLarge, Duration::ZERO));
            }
            if used.saturating_add(minimum) > b.tokens {
                let wait = until_next(b.period, wall);
                return Err(self.refusal(RefusalKind::InsufficientQuota, wait));
            }
            let available = b
                .tokens
                .saturating_sub(used)
                .saturating_sub(self.in_flight_tokens);
            if minimum > available {
                // Only in-flight reservations stand in the way; they settle (usually lower)
                // when those requests end.
                return Err(self.refusal(RefusalKind::RateLimitExceeded, IN_FLIGHT_RETRY));
            }
            reserve = reserve.min(available);
        }
        if let Some(tpm) = self.tpm {
            if minimum > tpm {
                return Err(self.refusal(RefusalKind::TooLarge, Duration::ZERO));
            }
            reserve = reserve.min(tpm);
        }
        Ok(reserve)
    }
    /// Refuses a request of `reserve` tokens while `max_concurrent` requests are in flight or
    /// the RPM or TPM bucket cannot take it yet (with the wait until both can).
    fn check_rates(&self, max_concurrent: Option<u32>, reserve: u64) -> Result<(), Refusal> {
        if max_concurrent.is_some_and(|max| self.in_flight >= max) {
            return Err(self.refusal(RefusalKind::TooManyConcurrent, IN_FLIGHT_RETRY));
        }
        let rpm_wait = self.rpm.map_or(0, |l| self.requests.wait_ms(l, UNITS));
        let tpm_wait = self
            .tpm
            .map_or(0, |l| self.tokens.wait_ms(l, reserve.saturating_mul(UNITS)));
        let wait = rpm_wait.max(tpm_wait);
        if wait > 0 {
            let wait = Duration::from_millis(wait);
            return Err(self.refusal(RefusalKind::RateLimitExceeded, wait));
        }
        Ok(())
    }
    /// Charges an admitted request of `reserve` tokens: one request, the tokens, one slot.
    fn charge(&mut self, reserve: u64) {
        if self.rpm.is_some() {
            self.requests.used += UNITS;
        }
        if self.tpm.is_some() {
            let units = reserve.saturating_mul(UNITS);
            self.tokens.used = self.tokens.used.saturating_add(units);
        }
        self.in_flight += 1;
        self.in_flight_tokens = self.in_flight_tokens.saturating_add(reserve);
    }
    /// Whether dropping this entry loses nothing (at `now_ms`, already refilled).
    fn idle(&self, day: u64, month: u64) -> bool {
        self.in_flight == 0
            && self.requests.used == 0
            && self.tokens.used == 0
            && (self.day.period != day || self.day.tokens == 0)
            && (self.month.period != month || self.month.tokens == 0)
            && self.lease.is_none()
    }
}

/// The limiter: per-key buckets, concurrency counts and budget usage.
#[derive(Debug, Default)]
pub struct Limiter {
    config: LimiterConfig,
    /// The first `now` seen; monotonic times are kept as milliseconds since then.
    origin: Option<Instant>,
    keys: HashMap<Arc<str>, KeyState>,
    last_sweep_ms: u64,
    /// Appliances sharing each key's RPM, TPM and concurrency (a shared store: the live
    /// appliances); each enforces `limit / share` (rounded up, at least 1). 0 or 1: alone.
    share: u32,
    /// Budgets are admitted against leases from a shared store ([`Limiter::set_lease`]).
    leased: bool,
}

impl Limiter {
    pub fn new() -> Limiter {
        Limiter::with_config(LimiterConfig::default())
    }

    pub fn with_config(config: LimiterConfig) -> Limiter {
        Limiter {
            config,
            ..Limiter::default()
        }
    }

    /// Replaces the settings (the daemon applies `[gateway] default_max_tokens`).
    pub fn configure(&mut self, config: LimiterConfig) {
        self.config = config;
    }

    /// How many appliances share every key's RPM, TPM and concurrency limits from now on
    /// (each enforces its `limit / n`, rounded up). Budgets are not divided: they are leased
    /// ([`Limiter::set_lease`]).
    pub fn set_share(&mut self, n: u32) {
        self.share = n.max(1);
    }

    /// Admits budgeted keys against their lease only (a shared store): a key without a valid
    /// lease for the current period gets no budgeted request.
    pub fn set_leased(&mut self, on: bool) {
        self.leased = on;
    }

    /// Sets `key_id`'s lease for the budget `period` (UTC day or month containing `wall`):
    /// `grant.granted` tokens in total, valid until `grant.valid_for` after `now`. A lease for a new period
    /// starts counting spent tokens from zero.
    pub fn set_lease(
        &mut self,
        key_id: &str,
        period: BudgetPeriod,
        grant: Grant,
        now: Instant,
        wall: SystemTime,
    ) {
        let Grant {
            granted,
            exhausted,
            valid_for,
        } = grant;
        let now_ms = self.ms(now);
        let p = period_number(period, wall);
        let k = self.entry(key_id);
        k.budgeted = true;
        let spent = k.lease.filter(|l| l.period == p).map_or(0, |l| l.spent);
        k.lease = Some(Lease {
            period: p,
            granted,
            spent,
            valid_until_ms: now_ms.saturating_add(valid_for.as_millis() as u64),
            exhausted,
        });
    }

    /// `key_id`'s lease for the budget `period` containing `wall` (zero when it has none).
    pub fn lease_state(&self, key_id: &str, period: BudgetPeriod, wall: SystemTime) -> LeaseState {
        let p = period_number(period, wall);
        self.keys.get(key_id).map_or(LeaseState::default(), |k| {
            let l = k.lease.filter(|l| l.period == p);
            LeaseState {
                granted: l.map_or(0, |l| l.granted),
                spent: l.map_or(0, |l| l.spent),
                in_flight: k.in_flight_tokens,
            }
        })
    }

    /// Completion tokens reserved when a request has no `max_tokens`.
    pub fn default_max_tokens(&self) -> u32 {
        self.config.default_max_tokens
    }

    /// The current share divisor (1 alone).
    pub fn share(&self) -> u32 {
        self.share.max(1)
    }

    /// Number of keys with state (for tests and metrics).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Requests of `key_id` in flight.
    pub fn in_flight(&self, key_id: &str) -> u32 {
        self.keys.get(key_id).map_or(0, |k| k.in_flight)
    }

    fn ms(&mut self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        now.saturating_duration_since(origin).as_millis() as u64
    }

    fn entry(&mut self, key_id: &str) -> &mut KeyState {
        if !self.keys.contains_key(key_id) {
            let id: Arc<str> = Arc::from(key_id);
            self.keys.insert(
                id.clone(),
                KeyState {
                    id: Some(id),
                    ..KeyState::default()
                },
            );
        }
        self.keys.get_mut(key_id).expect("just inserted")
    }

    /// Sets the tokens `key_id` has already used in the UTC day and month containing `wall`
    /// (from the ledger, at startup or when a key gains a budget). Replaces what the limiter
    /// counted for those periods; in-flight reservations stay.
    pub fn seed_usage(
        &mut self,
        key_id: &str,
        day_tokens: u64,
        month_tokens: u64,
        wall: SystemTime,
    ) {
        let (day, month) = periods(wall);
        let k = self.entry(key_id);
        k.budgeted = true;
        k.day = PeriodUsage {
            period: day,
            tokens: day_tokens,
        };
        k.month = PeriodUsage {
            period: month,
            tokens: month_tokens,
        };
    }

    /// Decides whether `key_id` may start a request estimated at `est` now.
    ///
    /// Checks, in order: too large to ever fit, budget, concurrency, RPM, TPM; admits only if
    /// all pass, and then charges them all (a refusal charges nothing). `now` drives the
    /// buckets; `wall` picks the UTC budget day and month.
    pub fn admit(
        &mut self,
        key_id: &str,
        policy: &KeyPolicy,
        est: Estimate,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Admission, Refusal> {
        let now_ms = self.ms(now);
        if now_ms.saturating_sub(self.last_sweep_ms) >= SWEEP_EVERY_MS {
            self.sweep_at(now_ms, wall);
        }
        let wanted = est
            .max_tokens
            .unwrap_or(u64::from(self.config.default_max_tokens));
        let (day, month) = periods(wall);
        let share = self.share.max(1);
        let leased = self.leased;
        let k = self.entry(key_id);
        k.update(policy, now_ms, day, month, share);

        // The least a request can run with: its prompt and, unless it generates nothing
        // (embeddings), one completion token. A reservation above what is left of the budget or
        // the TPM capacity is clamped to it instead of refused: the request runs, and the
        // gateway ends the stream with `finish_reason: "length"` when the clamp is reached
        // ([`Limiter::charge_mid_stream`] says when).
        let minimum = est.prompt_tokens.saturating_add(wanted.min(1));
        let asked = est.prompt_tokens.saturating_add(wanted);
        let leased = leased.then(|| {
            let p = policy.budget.map_or(0, |b| period_number(b.period, wall));
            (p, now_ms)
        });
        let reserve = k.reservation(policy.budget, minimum, asked, wall, leased)?;
        k.check_rates(
            policy.max_concurrent.map(|m| m.div_ceil(share).max(1)),
            reserve,
        )?;
        k.charge(reserve);
        Ok(Admission {
            key: k.id.clone().expect("entries carry their id"),
            reserved: reserve,
            charged: reserve,
            produced: 0,
            clamped: reserve < asked,
            budget: policy.budget.map(|b| (b.period, b.tokens)),
            headers: k.headers(),
        })
    }

    /// Charges `produced` more tokens of a streaming request (incremental, e.g. per chunk).
    /// Tokens within the reservation are already paid for; beyond it they are charged to TPM
    /// and the budget at once. Returns `false` when the key's TPM bucket or budget is now
    /// overdrawn: the gateway should end the stream. Tokens already produced are charged
    /// either way (they were spent).
    pub fn charge_mid_stream(&mut self, adm: &mut Admission, produced: u64, now: Instant) -> bool {
        let now_ms = self.ms(now);
        let leased = self.leased;
        let Some(k) = self.keys.get_mut(&*adm.key) else {
            return true;
        };
        k.refill(now_ms);
        adm.produced = adm.produced.saturating_add(produced);
        let extra = adm.produced.saturating_sub(adm.charged);
        if extra > 0 {
            adm.charged += extra;
            k.in_flight_tokens = k.in_flight_tokens.saturating_add(extra);
            if k.tpm.is_some() {
                k.tokens.used = k.tokens.used.saturating_add(extra.saturating_mul(UNITS));
            }
        }
        let tpm_ok = k
            .tpm
            .is_none_or(|l| k.tokens.used <= l.saturating_mul(UNITS));
        // The budget: the period's committed usage (as of the last admit or settle) plus every
        // in-flight charge must stay within the limit the request was admitted under.
        let budget_ok = adm.budget.is_none_or(|(period, limit)| match k.lease {
            // Leased: the lease is the limit (its period cannot change mid-request in a way
            // that matters: a new period's lease starts from zero spent).
            Some(l) if leased => l.spent.saturating_add(k.in_flight_tokens) <= l.granted,
            _ if leased => false,
            _ => k.used(period).saturating_add(k.in_flight_tokens) <= limit,
        });
        tpm_ok && budget_ok
    }

    /// Ends a request that used `actual` tokens (prompt + completion, from the upstream's
    /// usage): refunds or charges the difference to the reservation in the TPM bucket, commits
    /// `actual` to the budget day and month containing `wall`, and frees the concurrency slot.
    /// Returns `actual - charged` (negative: a refund).
    pub fn settle(&mut self, adm: Admission, actual: u64, now: Instant, wall: SystemTime) -> i64 {
        let now_ms = self.ms(now);
        let (day, month) = periods(wall);
        let delta = actual as i64 - adm.charged as i64;
        let Some(k) = self.keys.get_mut(&*adm.key) else {
            return delta;
        };
        k.refill(now_ms);
        if k.tpm.is_some() {
            k.tokens.used = if actual >= adm.charged {
                k.tokens
                    .used
                    .saturating_add((actual - adm.charged).saturating_mul(UNITS))
            } else {
                k.tokens
                    .used
                    .saturating_sub((adm.charged - actual).saturating_mul(UNITS))
            };
        }
        k.in_flight = k.in_flight.saturating_sub(1);
        k.in_flight_tokens = k.in_flight_tokens.saturating_sub(adm.charged);
        if k.budgeted {
            k.day.roll(day);
            k.month.roll(month);
            k.day.tokens = k.day.tokens.saturating_add(actual);
            k.month.tokens = k.month.tokens.saturating_add(actual);
        }
        if let (Some(l), Some((period, _))) = (k.lease.as_mut(), adm.budget) {
            let p = match period {
                BudgetPeriod::Day => day,
                BudgetPeriod::Month => month,
            };
            if l.period == p {
                l.spent = l.spent.saturating_add(actual);
            }
        }
        delta
    }

    /// Drops the entries of idle keys (buckets full, nothing in flight, no budget usage in the
    /// current UTC day or month). [`Limiter::admit`] calls this at most once a minute.
    pub fn sweep(&mut self, now: Instant, wall: SystemTime) {
        let now_ms = self.ms(now);
        self.sweep_at(now_ms, wall);
    }

    fn sweep_at(&mut self, now_ms: u64, wall: SystemTime) {
        let (day, month) = periods(wall);
        self.keys.retain(|_, k| {
            k.refill(now_ms);
            !k.idle(day, month)
        });
        self.last_sweep_ms = now_ms;
    }
}

/// Go's `time.Duration.String()` for whole milliseconds, as OpenAI prints reset headers:
/// `0s`, `250ms`, `1s`, `1.5s`, `6m0s`, `1h0m0s`.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, frac) = (rest / 1000, rest % 1000);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&s.to_string());
    if frac > 0 {
        let f = format!("{frac:03}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
    out.push('s');
    out
}

/// UTC bounds, in ms since the epoch, of the day and month containing `wall`:
/// `(day_start, day_end, month_start, month_end)` (ends exclusive). Shared with the ledger so
/// that both agree on what "today" and "this month" are.
pub fn utc_day_month_bounds(wall: SystemTime) -> (u64, u64, u64, u64) {
    let (day, month) = periods(wall);
    (
        day * DAY_MS,
        (day + 1) * DAY_MS,
        month_start_ms(month),
        month_start_ms(month + 1),
    )
}

fn wall_ms(wall: SystemTime) -> u64 {
    wall.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The UTC day number (days since 1970-01-01) and month number (`year * 12 + month - 1`) of
/// `wall`.
fn periods(wall: SystemTime) -> (u64, u64) {
    let day = wall_ms(wall) / DAY_MS;
    let (y, m, _) = civil_from_days(day as i64);
    (day, (y * 12 + i64::from(m) - 1) as u64)
}

/// The number of the UTC day or month (`period`) containing `wall`.
fn period_number(period: BudgetPeriod, wall: SystemTime) -> u64 {
    let (day, month) = periods(wall);
    match period {
        BudgetPeriod::Day => day,
        BudgetPeriod::Month => month,
    }
}

/// UTC bounds `[start, end)` in ms of the budget `period` containing `wall`.
pub fn period_bounds(period: BudgetPeriod, wall: SystemTime) -> (u64, u64) {
    let (d0, d1, m0, m1) = utc_day_month_bounds(wall);
    match period {
        BudgetPeriod::Day => (d0, d1),
        BudgetPeriod::Month => (m0, m1),
    }
}

/// Time from `wall` until the next UTC day or month (`period`) starts.
fn until_next(period: BudgetPeriod, wall: SystemTime) -> Duration {
    let (day, month) = periods(wall);
    let until = match period {
        BudgetPeriod::Day => (day + 1) * DAY_MS,
        BudgetPeriod::Month => month_start_ms(month + 1),
    };
    Duration::from_millis(until.saturating_sub(wall_ms(wall)))
}

/// Milliseconds since the epoch at 00:00 UTC on the first day of month number `month`.
fn month_start_ms(month: u64) -> u64 {
    let (y, m) = ((month / 12) as i64, (month % 12) as u32 + 1);
    days_from_civil(y, m, 1).max(0) as u64 * DAY_MS
}

impl fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefusalKind::RateLimitExceeded => "rate_limit_exceeded",
            RefusalKind::InsufficientQuota => "insufficient_quota",
            RefusalKind::TooManyConcurrent => "too_many_concurrent",
            RefusalKind::TooLarge => "request_too_large",
        })
    }
}

#[cfg(test)]
mod tests;
