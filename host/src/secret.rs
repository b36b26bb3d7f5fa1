//! A string that never shows itself in logs, `Debug` or `Display` output.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A secret value (a tunnel token). Its `Debug` and `Display` print `<redacted>`.
#[derive(Clone, Default)]
pub struct Secret(String);

/// Constant-time, so that no comparison of secrets leaks where they differ.
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for Secret {}

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send or hash it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the secret, as stored by the edge.
    pub fn sha256(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }

    /// Whether the secret hashes to `expected`, compared in constant time.
    pub fn matches_sha256(&self, expected: &[u8; 32]) -> bool {
        self.sha256().ct_eq(expected).into()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_itself() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
    }

    #[test]
    fn hash_comparison() {
        let s = Secret::new("hunter2");
        assert!(s.matches_sha256(&s.sha256()));
        assert!(!Secret::new("hunter3").matches_sha256(&s.sha256()));
    }
}
