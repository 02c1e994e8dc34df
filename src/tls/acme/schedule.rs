//! When to renew and how long to wait after a failure: pure functions of the certificate's
//! validity and the clock the caller passes in.
//!
//! Policy (documented in the README): renew once `min(lifetime / 3, 30 days)` is left.
//! - A 90-day Let's Encrypt certificate renews 30 days before expiry, i.e. at 2/3 of its life.
//! - A short-lived certificate (6-day profile, or a test CA issuing 30-second ones) renews at
//!   2/3 of its life as well. "30 days before expiry" alone would be before it was even issued
//!   and renew in a loop, which is why the rule takes the *smaller* margin.
//! - A long-lived certificate (a year, from a private CA) renews 30 days before expiry.
//!
//! Failures back off exponentially from [`FIRST_RETRY`] to [`MAX_RETRY`], so a misconfigured
//! DNS name does not burn the CA's failed-validation limit (Let's Encrypt: 5 per hour), yet a
//! passing network glitch is retried within seconds. The retry is never scheduled past the
//! certificate's expiry minus a minute when that is sooner: as expiry nears, keep trying.

use std::time::{Duration, SystemTime};

/// Most margin ahead of expiry at which renewal starts.
pub const MAX_RENEW_MARGIN: Duration = Duration::from_secs(30 * 86_400);
/// Delay before the first retry after a failed issuance.
pub const FIRST_RETRY: Duration = Duration::from_secs(10);
/// Longest delay between retries.
pub const MAX_RETRY: Duration = Duration::from_secs(3600);

/// The moment a certificate valid from `not_before` to `not_after` is due for renewal.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let margin = (lifetime / 3).min(MAX_RENEW_MARGIN);
    not_after.checked_sub(margin).unwrap_or(not_before)
}

/// Delay before attempt number `failures + 1`, after `failures` consecutive failures (≥ 1).
pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1u32 << shift).min(MAX_RETRY)
}

/// When to try again after `failures` consecutive failures at `now`, given the current
/// certificate's expiry (None: only a placeholder is served).
pub fn retry_at(now: SystemTime, failures: u32, not_after: Option<SystemTime>) -> SystemTime {
    let at = now + backoff(failures);
    match not_after {
        // Close to expiry: no longer wait a full hour between attempts.
        Some(exp) if exp > now && at > exp => {
            let before = exp
                .checked_sub(Duration::from_secs(60))
                .filter(|b| *b > now)
                .unwrap_or(now);
            before.max(now + FIRST_RETRY)
        }
        _ => at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn ninety_days_renews_thirty_days_ahead() {
        assert_eq!(renew_at(t(0), t(90 * DAY)), t(60 * DAY));
    }

    #[test]
    fn short_lived_renews_at_two_thirds() {
        assert_eq!(renew_at(t(0), t(6 * DAY)), t(4 * DAY));
        assert_eq!(renew_at(t(0), t(30)), t(20));
    }

    #[test]
    fn long_lived_renews_thirty_days_ahead() {
        assert_eq!(renew_at(t(0), t(365 * DAY)), t(335 * DAY));
    }

    #[test]
    fn inverted_validity_is_due_at_once() {
        assert_eq!(renew_at(t(100), t(50)), t(50));
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(2), Duration::from_secs(20));
        assert_eq!(backoff(3), Duration::from_secs(40));
        assert_eq!(backoff(9), Duration::from_secs(2560));
        assert_eq!(backoff(10), MAX_RETRY);
        assert_eq!(backoff(u32::MAX), MAX_RETRY);
    }

    #[test]
    fn retries_tighten_near_expiry() {
        // Far from expiry: plain backoff.
        assert_eq!(retry_at(t(0), 10, Some(t(30 * DAY))), t(3600));
        // Ten minutes left with an hour of backoff: retry a minute before expiry.
        assert_eq!(retry_at(t(0), 10, Some(t(600))), t(540));
        // Thirty seconds left: not sooner than the first retry delay.
        assert_eq!(retry_at(t(0), 10, Some(t(30))), t(10));
        // Expired or placeholder: plain backoff.
        assert_eq!(retry_at(t(100), 2, Some(t(50))), t(120));
        assert_eq!(retry_at(t(0), 1, None), t(10));
    }
}
