//! What modelgate reads from a leaf certificate (validity, serial, subject alternative names),
//! read with x509-parser, and the validity period of the certificates it makes with rcgen.
//!
//! rustls checks certificates but does not expose their fields; x509-parser reads them. Never
//! panics on input: a certificate that does not parse is an error string, and the callers treat
//! it as unreadable.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;

/// What modelgate reads from a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeafInfo {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The serial number's content octets (big-endian, as encoded), for logs and status.
    pub serial: Vec<u8>,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
}

/// Parses the leaf certificate `der`.
pub(crate) fn parse_leaf(der: &[u8]) -> Result<LeafInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let validity = cert.validity();
    let mut info = LeafInfo {
        not_before: system_time(validity.not_before.timestamp()),
        not_after: system_time(validity.not_after.timestamp()),
        serial: cert.raw_serial().to_vec(),
        dns_names: Vec::new(),
        ips: Vec::new(),
    };
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subjectAltName: {e}"))?;
    for name in san.iter().flat_map(|s| &s.value.general_names) {
        match name {
            GeneralName::DNSName(d) => info.dns_names.push(d.to_string()),
            GeneralName::IPAddress(b) => info.ips.push(ip_address(b)?),
            _ => {}
        }
    }
    Ok(info)
}

/// An iPAddress SAN: 4 or 16 octets (RFC 5280 §4.2.1.6).
fn ip_address(b: &[u8]) -> Result<IpAddr, String> {
    if let Ok(a) = <[u8; 4]>::try_from(b) {
        Ok(IpAddr::V4(Ipv4Addr::from(a)))
    } else if let Ok(a) = <[u8; 16]>::try_from(b) {
        Ok(IpAddr::V6(Ipv6Addr::from(a)))
    } else {
        Err("iPAddress SAN of odd length".into())
    }
}

/// A certificate time (seconds since the Unix epoch); times before 1970 read as the epoch.
fn system_time(unix: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64)
}

/// Makes `params` valid from midnight UTC `before` days ago to midnight UTC `after` days from
/// today (a day of slack before covers clients whose clock is behind).
pub(crate) fn set_validity_days(params: &mut rcgen::CertificateParams, before: i64, after: i64) {
    let today = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    let ymd = |days: i64| {
        let (y, m, d) = crate::civil::civil_from_days(days);
        rcgen::date_time_ymd(y as i32, m as u8, d as u8)
    };
    params.not_before = ymd(today - before);
    params.not_after = ymd(today + after);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn reads_expiry_and_names_of_an_rcgen_certificate() {
        let mut params = rcgen::CertificateParams::new(vec![
            "gw.example.com".to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .unwrap();
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2031, 7, 4);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x01, 0x02, 0xff]));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let info = parse_leaf(cert.der()).unwrap();
        // 2025-01-01T00:00:00Z and 2031-07-04T00:00:00Z
        assert_eq!(secs(info.not_before), 1_735_689_600);
        assert_eq!(secs(info.not_after), 1_940_889_600);
        assert_eq!(info.serial, [0x01, 0x02, 0xff]);
        assert_eq!(info.dns_names, ["gw.example.com", "localhost"]);
        assert_eq!(
            info.ips,
            [
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        // rcgen's default validity ends in 4096: GeneralizedTime.
        let cert = rcgen::CertificateParams::new(vec!["x.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let info = parse_leaf(cert.der()).unwrap();
        assert_eq!(secs(info.not_after), 67_090_118_400); // 4096-01-01
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        for n in 0..der.len() {
            assert!(parse_leaf(&der[..n]).is_err(), "truncated to {n} bytes");
        }
        let mut flipped = der.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = parse_leaf(&flipped);
            flipped[i] ^= 0xff;
        }
        assert!(parse_leaf(b"not a certificate").is_err());
        assert!(parse_leaf(&[]).is_err());
    }

    #[test]
    fn validity_days_are_utc_midnights_around_today() {
        let mut params = rcgen::CertificateParams::new(vec!["x.test".to_string()]).unwrap();
        set_validity_days(&mut params, 1, 7);
        let key = rcgen::KeyPair::generate().unwrap();
        let info = parse_leaf(params.self_signed(&key).unwrap().der()).unwrap();
        let (from, until) = (secs(info.not_before), secs(info.not_after));
        assert_eq!(from % 86_400, 0, "midnight UTC");
        assert_eq!(until - from, 8 * 86_400);
        // Yesterday (or the day before, when the test ran across midnight).
        let today = secs(SystemTime::now()) / 86_400;
        assert!([today - 1, today - 2].contains(&(from / 86_400)), "{from}");
    }
}
