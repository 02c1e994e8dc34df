//! Proleptic Gregorian calendar arithmetic on day numbers (days since 1970-01-01, UTC), for
//! the limiter's budget days and months and the validity dates of the certificates we make.
//! One home for Howard Hinnant's `days_from_civil` / `civil_from_days` (public-domain
//! algorithms), which are exact for every date in `i64` range and need no time-zone database.
//! RFC 3339 text is humantime's; [`rfc3339`] only clamps what it is given to the range RFC 3339
//! can write, so a stored time out of range prints instead of panicking.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Day number of the date `y-m-d` (month 1–12, day 1–31).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `(year, month 1–12, day 1–31)` of a day number.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The last second RFC 3339 (four-digit years) can write: 9999-12-31T23:59:59Z.
const LAST_RFC3339_SECOND: u64 = 253_402_300_799;

/// `t` in RFC 3339 UTC to the second, e.g. `2027-11-29T00:00:00Z` (the form `status`, `doctor`
/// and the CLI print). A time before 1970 shows as the epoch and one past 9999 as its last
/// second (humantime would panic); sub-second parts are cut, not rounded.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .min(LAST_RFC3339_SECOND);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// [`rfc3339`] of a signed Unix time (X.509 validity dates).
pub fn rfc3339_unix(unix: i64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(days_from_civil(2024, 3, 1), 19_783);
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn rfc3339_known_instants_and_clamps() {
        let at = |secs: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
        for (secs, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (951_782_400 + 3_723, "2000-02-29T01:02:03Z"),
            (1_735_787_045, "2025-01-02T03:04:05Z"),
            (1_827_446_400, "2027-11-29T00:00:00Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
            (253_402_300_799, "9999-12-31T23:59:59Z"),
            (400_000_000_000, "9999-12-31T23:59:59Z"), // year 14645: clamped, not a panic
            (u64::MAX / 4, "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(at(secs), text, "{secs}");
        }
        // Sub-second parts are cut, not rounded.
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_735_787_045_999)),
            "2025-01-02T03:04:05Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(rfc3339_unix(-1), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_unix(1_827_446_400), "2027-11-29T00:00:00Z");
        assert_eq!(rfc3339_unix(i64::MAX), "9999-12-31T23:59:59Z");
    }
}
