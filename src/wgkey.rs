//! WireGuard key material: base64 parsing and formatting of Curve25519 keys.
//!
//! Owns the textual form operators see in `wg` and wg-quick files (44 characters of standard
//! base64). Never prints a private key through `Debug` or `Display`: only `to_base64` reveals it,
//! and callers use that solely to write 0600 files or the wg-quick text a peer needs.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use std::fmt;
use std::str::FromStr;

/// Why a key string was rejected; the message says what a valid key looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64 (a WireGuard key is 44 characters ending in '=', as printed by `wg genkey` / `wg pubkey`)")]
    Base64,
    #[error("decodes to {0} bytes, a WireGuard key is 32 bytes (44 base64 characters)")]
    Length(usize),
}

fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// A peer's or the appliance's public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
    pub fn to_dalek(&self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.0)
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(PublicKey)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// A Curve25519 private key. `Debug` is masked; the bytes are only reachable on purpose.
#[derive(Clone)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A fresh key from the OS random source, clamped as `wg genkey` does.
    pub fn generate() -> Self {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).expect("the OS random source is unavailable");
        // Clamping (RFC 7748 §5) so the file matches what `wg genkey` would produce.
        b[0] &= 248;
        b[31] &= 127;
        b[31] |= 64;
        PrivateKey(b)
    }
    pub fn from_bytes(b: [u8; 32]) -> Self {
        PrivateKey(b)
    }
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.to_dalek()).to_bytes())
    }
    pub fn to_dalek(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.0)
    }
    /// The secret in `wg genkey` form. Only for 0600 key files and a peer's own wg-quick file.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(PrivateKey)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_public_key_matches_rfc7748_vector() {
        // RFC 7748 §6.1: Alice's private key and public key.
        let sk_hex = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
        let pk_hex = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";
        let sk: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&sk_hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let pk: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&pk_hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let key = PrivateKey::from_bytes(sk.try_into().unwrap());
        assert_eq!(key.public_key().0.to_vec(), pk);
        let text = key.to_base64();
        assert_eq!(text.len(), 44);
        let back: PrivateKey = text.parse().unwrap();
        assert_eq!(back.public_key(), key.public_key());
        assert_eq!(format!("{key:?}"), "PrivateKey(<redacted>)");
    }

    #[test]
    fn rejects_bad_keys_with_reason() {
        assert_eq!(
            "not base64!".parse::<PublicKey>().unwrap_err(),
            KeyError::Base64
        );
        assert_eq!(
            "AAAA".parse::<PublicKey>().unwrap_err(),
            KeyError::Length(3)
        );
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        assert_ne!(a.to_base64(), b.to_base64());
        assert_eq!(a.0[0] & 7, 0);
        assert_eq!(a.0[31] & 0xC0, 0x40);
    }
}
