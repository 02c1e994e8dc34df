//! Just enough X.509 reading to learn a leaf certificate's validity, serial and subject
//! alternative names.
//!
//! rustls checks certificates but does not expose their fields, and rcgen only parses with an
//! extra dependency tree (x509-parser, nom, …); the two facts modelgate needs (when does the
//! served certificate expire, which names does the self-signed one cover) sit at fixed places of
//! the DER structure (RFC 5280 §4.1), so a small strict reader suffices. It never panics on
//! input: any surprise is an error string, and the callers treat the certificate as unreadable.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// One DER element: tag byte, contents, and the bytes after it.
fn tlv(buf: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let (&tag, rest) = buf.split_first().ok_or("truncated DER (no tag)")?;
    if tag & 0x1f == 0x1f {
        return Err("unsupported multi-byte DER tag".into());
    }
    let (&first, rest) = rest.split_first().ok_or("truncated DER (no length)")?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err("bad DER length".into());
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err("truncated DER (length beyond the data)".into());
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

/// Reads an element that must have tag `want`.
fn expect<'a>(buf: &'a [u8], want: u8, what: &str) -> Result<(&'a [u8], &'a [u8]), String> {
    let (tag, content, rest) = tlv(buf)?;
    if tag != want {
        return Err(format!(
            "expected {what} (tag {want:#04x}), found tag {tag:#04x}"
        ));
    }
    Ok((content, rest))
}

const SEQUENCE: u8 = 0x30;
/// id-ce-subjectAltName, 2.5.29.17 (RFC 5280 §4.2.1.6).
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

/// Parses the leaf certificate `der`.
pub(crate) fn parse_leaf(der: &[u8]) -> Result<LeafInfo, String> {
    let (cert, _) = expect(der, SEQUENCE, "Certificate")?;
    let (tbs, _) = expect(cert, SEQUENCE, "TBSCertificate")?;
    let mut rest = tbs;
    // version [0] EXPLICIT, optional (absent means v1).
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    let (serial, rest) = expect(rest, 0x02, "serialNumber")?;
    let (_, rest) = expect(rest, SEQUENCE, "signature algorithm")?;
    let (_, rest) = expect(rest, SEQUENCE, "issuer")?;
    let (validity, rest) = expect(rest, SEQUENCE, "validity")?;
    let (before_tag, not_before, after_before) = tlv(validity)?;
    let not_before = parse_time(before_tag, not_before)?;
    let (time_tag, not_after, _) = tlv(after_before)?;
    let not_after = parse_time(time_tag, not_after)?;
    let (_, rest) = expect(rest, SEQUENCE, "subject")?;
    let (_, mut rest) = expect(rest, SEQUENCE, "subjectPublicKeyInfo")?;

    let mut info = LeafInfo {
        not_before,
        not_after,
        serial: serial.to_vec(),
        dns_names: Vec::new(),
        ips: Vec::new(),
    };
    while !rest.is_empty() {
        let (tag, content, after) = tlv(rest)?;
        rest = after;
        if tag != 0xa3 {
            continue; // issuerUniqueID / subjectUniqueID
        }
        let (mut exts, _) = expect(content, SEQUENCE, "extensions")?;
        while !exts.is_empty() {
            let (ext, after) = expect(exts, SEQUENCE, "extension")?;
            exts = after;
            let (oid, mut ext) = expect(ext, 0x06, "extension id")?;
            if oid != OID_SAN {
                continue;
            }
            let (tag, _, after) = tlv(ext)?;
            if tag == 0x01 {
                ext = after; // critical BOOLEAN
            }
            let (value, _) = expect(ext, 0x04, "extension value")?;
            let (mut names, _) = expect(value, SEQUENCE, "GeneralNames")?;
            while !names.is_empty() {
                let (tag, content, after) = tlv(names)?;
                names = after;
                match tag {
                    // dNSName [2] IA5String
                    0x82 => info
                        .dns_names
                        .push(String::from_utf8_lossy(content).into_owned()),
                    // iPAddress [7] OCTET STRING
                    0x87 => match content.len() {
                        4 => info.ips.push(IpAddr::V4(Ipv4Addr::from(
                            <[u8; 4]>::try_from(content).map_err(|_| "bad IPv4 SAN")?,
                        ))),
                        16 => info.ips.push(IpAddr::V6(Ipv6Addr::from(
                            <[u8; 16]>::try_from(content).map_err(|_| "bad IPv6 SAN")?,
                        ))),
                        _ => return Err("iPAddress SAN of odd length".into()),
                    },
                    _ => {}
                }
            }
        }
    }
    Ok(info)
}

/// UTCTime (`YYMMDDHHMMSSZ`, RFC 5280 §4.1.2.5.1) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn parse_time(tag: u8, s: &[u8]) -> Result<SystemTime, String> {
    let digits = |b: &[u8]| -> Result<i64, String> {
        b.iter().try_fold(0i64, |acc, c| {
            if c.is_ascii_digit() {
                Ok(acc * 10 + i64::from(c - b'0'))
            } else {
                Err("non-digit in certificate time".to_string())
            }
        })
    };
    let (year, rest) = match (tag, s.len()) {
        (0x17, 13) => {
            let yy = digits(&s[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        (0x18, 15) => (digits(&s[..4])?, &s[4..]),
        _ => {
            return Err("certificate time is neither UTCTime nor GeneralizedTime in Z form".into())
        }
    };
    if rest[10] != b'Z' {
        return Err("certificate time is not in UTC (Z)".into());
    }
    let (mo, d, h, mi, se) = (
        digits(&rest[0..2])?,
        digits(&rest[2..4])?,
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err("certificate time out of range".into());
    }
    let secs =
        crate::civil::days_from_civil(year, mo as u32, d as u32) * 86_400 + h * 3600 + mi * 60 + se;
    Ok(if secs <= 0 {
        UNIX_EPOCH
    } else {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    })
}

/// The date `(year, month, day)` of a day number since 1970-01-01, in the types rcgen's
/// `date_time_ymd` takes ([`crate::civil::civil_from_days`]).
pub(crate) fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let (y, m, d) = crate::civil::civil_from_days(days);
    (y as i32, m as u8, d as u8)
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
            let _ = parse_leaf(&der[..n]);
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
    fn civil_wrapper_narrows_the_types_for_rcgen() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
