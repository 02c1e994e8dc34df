//! The API key format: `mg_<id>_<secret><checksum>`.
//!
//! Owns generating, parsing and masking keys. Parsing is total (never panics, never allocates)
//! because it runs on every request on attacker-controlled input. It never logs and never shows a
//! secret in `Debug`/`Display`.
//!
//! Layout (65 ASCII characters), after GitHub's token format:
//! - `mg_`: a fixed prefix so secret scanners (and people) recognise the key;
//! - 12 characters `[a-z0-9]`: the public key id (≈ 62 bits, safe to log, indexes the store);
//! - `_`;
//! - 43 characters `[0-9A-Za-z]`: the secret, 43·log2(62) ≈ 256.03 bits from the OS RNG;
//! - 6 characters `[0-9A-Za-z]`: CRC-32 (IEEE) of everything before it, in base62, so a typo is
//!   rejected without a database lookup and scanners can cut false positives.
//!
//! The checksum is not a security feature (anyone can compute it); it only catches mistakes.

use std::fmt;

/// Every key starts with this.
pub const PREFIX: &str = "mg_";
/// Length of the public key id.
pub const ID_LEN: usize = 12;
/// Length of the secret (base62 characters).
pub const SECRET_LEN: usize = 43;
/// Length of the checksum (base62 characters).
pub const CHECKSUM_LEN: usize = 6;
/// Length of a whole key.
pub const KEY_LEN: usize = PREFIX.len() + ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const ID_ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
const ID_START: usize = PREFIX.len();
const SECRET_START: usize = ID_START + ID_LEN + 1;
const CHECKSUM_START: usize = SECRET_START + SECRET_LEN;

/// Why a string is not a well-formed key. Only for logs and operator messages; clients get one
/// bland 401 for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("does not start with `mg_`")]
    Prefix,
    #[error("has the wrong length (a key has {KEY_LEN} characters)")]
    Length,
    #[error("contains a character that cannot appear at its position")]
    Charset,
    #[error("checksum mismatch (a typo, or a truncated key)")]
    Checksum,
}

/// A whole key (`mg_…`) held in memory: shown only through [`Secret::expose`]. `Debug` and
/// `Display` print the public part and mask the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The full key, to print once to the operator or to send in `Authorization: Bearer`.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The public key id inside the key.
    pub fn id(&self) -> &str {
        // Only built by `generate*`, so the layout holds; `get` keeps this total anyway.
        self.0.get(ID_START..ID_START + ID_LEN).unwrap_or("")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}_****", self.id())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({self})")
    }
}

/// A key that passed [`parse`]: borrows the presented string (no allocation on the hot path).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    id: &'a str,
    secret: &'a str,
}

impl<'a> ParsedKey<'a> {
    /// The public key id (safe to log).
    pub fn id(&self) -> &'a str {
        self.id
    }
    /// The secret part (never log it).
    pub fn secret(&self) -> &'a str {
        self.secret
    }
}

impl fmt::Debug for ParsedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedKey")
            .field("id", &self.id)
            .field("secret", &"****")
            .finish()
    }
}

/// Checks prefix, length, alphabet and checksum. Total on any input.
pub fn parse(s: &str) -> Result<ParsedKey<'_>, FormatError> {
    let b = s.as_bytes();
    if !b.starts_with(PREFIX.as_bytes()) {
        return Err(FormatError::Prefix);
    }
    if b.len() != KEY_LEN {
        return Err(FormatError::Length);
    }
    // All checks below are on bytes; once they pass, every byte is ASCII, so the `str` slices
    // at these offsets are on character boundaries.
    let id = &b[ID_START..ID_START + ID_LEN];
    let secret = &b[SECRET_START..CHECKSUM_START];
    let checksum = &b[CHECKSUM_START..];
    if !id.iter().all(|c| ID_ALPHABET.contains(c))
        || b[ID_START + ID_LEN] != b'_'
        || !secret.iter().all(u8::is_ascii_alphanumeric)
        || !checksum.iter().all(u8::is_ascii_alphanumeric)
    {
        return Err(FormatError::Charset);
    }
    if checksum != encode_checksum(crc32(&b[..CHECKSUM_START])) {
        return Err(FormatError::Checksum);
    }
    Ok(ParsedKey {
        id: &s[ID_START..ID_START + ID_LEN],
        secret: &s[SECRET_START..CHECKSUM_START],
    })
}

/// Whether `s` has the shape of a key id (12 of `[a-z0-9]`).
pub fn is_key_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|c| ID_ALPHABET.contains(&c))
}

/// A fresh random key id.
pub fn new_id() -> String {
    random_string(ID_ALPHABET, ID_LEN)
}

/// A fresh key with a new random id.
pub fn generate() -> Secret {
    generate_for(&new_id())
}

/// A fresh secret for an existing key id (rotation keeps the id). `id` must satisfy
/// [`is_key_id`]; anything else is a programming error and panics.
pub fn generate_for(id: &str) -> Secret {
    assert!(is_key_id(id), "generate_for: not a key id");
    let mut s = String::with_capacity(KEY_LEN);
    s.push_str(PREFIX);
    s.push_str(id);
    s.push('_');
    s.push_str(&random_string(BASE62, SECRET_LEN));
    let sum = encode_checksum(crc32(s.as_bytes()));
    // `encode_checksum` returns base62 ASCII.
    s.push_str(std::str::from_utf8(&sum).unwrap_or("000000"));
    Secret(s)
}

/// `len` characters drawn uniformly from `alphabet` (rejection sampling: bytes that would bias
/// the modulo are thrown away).
fn random_string(alphabet: &[u8], len: usize) -> String {
    let n = alphabet.len();
    let limit = 256 - 256 % n; // Largest multiple of n not above 256.
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        // The OS RNG failing is unrecoverable for a key generator; never fall back to weak bytes.
        getrandom::fill(&mut buf).expect("the operating system's random number generator failed");
        for &byte in &buf {
            if (byte as usize) < limit && out.len() < len {
                out.push(alphabet[byte as usize % n] as char);
            }
        }
    }
    out
}

/// CRC-32/ISO-HDLC (the zlib/PNG CRC), table-driven; the table is built at compile time.
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// Base62, most significant digit first, zero-padded to 6 (62^6 > 2^32).
fn encode_checksum(mut v: u32) -> [u8; CHECKSUM_LEN] {
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(v % 62) as usize];
        v /= 62;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_vector() {
        // The standard check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(&encode_checksum(0), b"000000");
        assert_eq!(&encode_checksum(u32::MAX), b"4gfFC3");
    }

    #[test]
    fn generated_keys_parse_and_have_the_layout() {
        for _ in 0..200 {
            let k = generate();
            let s = k.expose();
            assert_eq!(s.len(), KEY_LEN);
            assert!(s.starts_with("mg_"));
            let p = parse(s).unwrap();
            assert_eq!(p.id(), k.id());
            assert!(is_key_id(p.id()));
            assert_eq!(p.secret().len(), SECRET_LEN);
            assert!(p.secret().bytes().all(|c| c.is_ascii_alphanumeric()));
        }
    }

    #[test]
    fn rotation_keeps_the_id() {
        let a = generate();
        let b = generate_for(a.id());
        assert_eq!(a.id(), b.id());
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn secret_is_masked() {
        let k = generate();
        let secret = parse(k.expose()).unwrap().secret().to_string();
        for shown in [
            format!("{k}"),
            format!("{k:?}"),
            format!("{:?}", parse(k.expose()).unwrap()),
        ] {
            assert!(!shown.contains(&secret), "{shown}");
            assert!(shown.contains(k.id()), "{shown}");
        }
    }

    #[test]
    fn every_single_character_typo_is_rejected() {
        let k = generate();
        let s = k.expose();
        for i in 0..s.len() {
            for c in [b'0', b'a', b'Z', b'_', b'-', b' '] {
                let mut b = s.as_bytes().to_vec();
                if b[i] == c {
                    continue;
                }
                b[i] = c;
                let t = String::from_utf8(b).unwrap();
                assert!(parse(&t).is_err(), "{i} {}", c as char);
            }
        }
        // Truncation and extension.
        assert_eq!(parse(&s[..s.len() - 1]), Err(FormatError::Length));
        assert_eq!(parse(&format!("{s}x")), Err(FormatError::Length));
        // Swapping two adjacent different secret characters changes the CRC.
        let mut b = s.as_bytes().to_vec();
        let i = (SECRET_START..CHECKSUM_START - 1)
            .find(|&i| b[i] != b[i + 1])
            .unwrap();
        b.swap(i, i + 1);
        assert_eq!(
            parse(std::str::from_utf8(&b).unwrap()),
            Err(FormatError::Checksum)
        );
    }

    #[test]
    fn specific_errors() {
        assert_eq!(parse(""), Err(FormatError::Prefix));
        assert_eq!(parse("sk-abc"), Err(FormatError::Prefix));
        assert_eq!(parse("mg_"), Err(FormatError::Length));
        let s = generate().expose().to_string();
        let upper = format!("mg_{}{}", s[3..15].to_uppercase(), &s[15..]);
        if upper != s {
            assert_eq!(parse(&upper), Err(FormatError::Charset));
        }
        // Multibyte characters of the right byte length never panic and are rejected.
        let mut t = s.clone();
        t.replace_range(20..22, "é");
        assert_eq!(t.len(), KEY_LEN);
        assert_eq!(parse(&t), Err(FormatError::Charset));
    }

    /// Property-style: parsing never panics and never accepts garbage, over many random strings
    /// (random bytes made UTF-8, random ASCII of the right length, and mutated valid keys).
    #[test]
    fn parse_is_total_on_garbage() {
        let mut rng = [0u8; 4096];
        let mut accepted_mutations = 0;
        for round in 0..3000 {
            getrandom::fill(&mut rng).unwrap();
            let len = rng[0] as usize % 100;
            let raw = String::from_utf8_lossy(&rng[1..1 + len]).into_owned();
            assert!(parse(&raw).is_err());

            let ascii: String = rng[200..200 + KEY_LEN]
                .iter()
                .map(|b| (b % 95 + 32) as char)
                .collect();
            let with_prefix = format!("mg_{}", &ascii[3..]);
            let _ = parse(&ascii);
            assert!(parse(&with_prefix).is_err());

            // Mutate a valid key at 1-3 random positions with random bytes (possibly non-ASCII).
            let k = generate();
            let mut b = k.expose().as_bytes().to_vec();
            for j in 0..=(round % 3) {
                let pos = rng[300 + j] as usize % b.len();
                b[pos] = rng[310 + j];
            }
            let m = String::from_utf8_lossy(&b).into_owned();
            if m != k.expose() && parse(&m).is_ok() {
                accepted_mutations += 1;
            }
        }
        // A CRC-32 lets a random corruption through with probability ~2^-32.
        assert_eq!(accepted_mutations, 0);
    }
}
