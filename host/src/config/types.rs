//! Validated value types used in configuration files: durations, sizes, hostname patterns.

use std::fmt;

use serde::{de, Deserialize, Deserializer};

/// A duration written as `"250ms"`, `"30s"`, `"5m"` or `"1h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration(pub std::time::Duration);

impl TryFrom<String> for Duration {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid duration {s:?}: expected a number and a unit, like \"30s\"")
        })?;
        let secs_per_unit = match unit {
            "ms" => return Ok(Duration(std::time::Duration::from_millis(n))),
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => {
                return Err(format!(
                    "invalid duration {s:?}: unit must be one of ms, s, m, h"
                ))
            }
        };
        n.checked_mul(secs_per_unit)
            .map(|secs| Duration(std::time::Duration::from_secs(secs)))
            .ok_or_else(|| format!("invalid duration {s:?}: too large"))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Duration::try_from(s).map_err(de::Error::custom)
    }
}

/// A size in bytes, written as an integer or as `"64KiB"`, `"1MiB"`, `"2GiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl TryFrom<&str> for ByteSize {
    type Error = String;

    fn try_from(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid size {s:?}: expected a number and a unit, like \"64KiB\"")
        })?;
        let mult = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => {
                return Err(format!(
                    "invalid size {s:?}: unit must be one of B, KiB, MiB, GiB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 65536 or \"64KiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::try_from(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A public hostname or a `*.` wildcard, lowercase, matched case-insensitively without port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// Matches exactly this host.
    Exact(String),
    /// `*.example.com`: holds `.example.com`; matches any name ending in it (one or more labels).
    Wildcard(String),
}

impl HostPattern {
    /// Whether `host` (already lowercase, port removed) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Wildcard(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(s) => write!(f, "*{s}"),
        }
    }
}

impl TryFrom<&str> for HostPattern {
    type Error = String;

    fn try_from(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(valid_label) {
            return Err(format!(
                "invalid hostname {s:?}: expected a DNS name like \"app.example.com\" or \"*.example.com\""
            ));
        }
        Ok(if wild {
            HostPattern::Wildcard(format!(".{name}"))
        } else {
            HostPattern::Exact(name.to_string())
        })
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HostPattern::try_from(s.as_str()).map_err(de::Error::custom)
    }
}

/// Lowercases a Host/authority value and strips its port (and IPv6 brackets stay as given).
/// Borrowed when already in that form (the usual case on the request path).
pub fn normalize_host(authority: &str) -> std::borrow::Cow<'_, str> {
    let a = authority.trim().trim_end_matches('.');
    let host = if a.starts_with('[') {
        match a.find(']') {
            Some(i) => &a[..=i],
            None => a,
        }
    } else {
        match a.rfind(':') {
            Some(i) if a[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &a[..i],
            _ => a,
        }
    };
    let host = host.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        host.to_ascii_lowercase().into()
    } else {
        host.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            Duration::try_from("250ms".to_string())
                .unwrap()
                .0
                .as_millis(),
            250
        );
        assert_eq!(
            Duration::try_from("30s".to_string()).unwrap().0.as_secs(),
            30
        );
        assert_eq!(
            Duration::try_from("2m".to_string()).unwrap().0.as_secs(),
            120
        );
        assert!(Duration::try_from("30".to_string()).is_err());
        assert!(Duration::try_from("s".to_string()).is_err());
        assert!(Duration::try_from("3 days".to_string()).is_err());
        assert!(Duration::try_from(format!("{}h", u64::MAX)).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::try_from("64KiB").unwrap().0, 65536);
        assert_eq!(ByteSize::try_from("1MiB").unwrap().0, 1 << 20);
        assert!(ByteSize::try_from("1MB").is_err());
    }

    #[test]
    fn host_patterns() {
        let exact = HostPattern::try_from("App.Example.com").unwrap();
        assert!(exact.matches("app.example.com"));
        assert!(!exact.matches("x.app.example.com"));
        let wild = HostPattern::try_from("*.example.com").unwrap();
        assert!(wild.matches("a.example.com"));
        assert!(wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("badexample.com"));
        assert!(HostPattern::try_from("bad host").is_err());
        assert!(HostPattern::try_from("a.*.com").is_err());
        assert!(HostPattern::try_from("").is_err());
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("App.Example.COM:8443"), "app.example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("localhost"), "localhost");
        assert_eq!(normalize_host(" Local.Test. "), "local.test");
        assert!(matches!(
            normalize_host("app.test:80"),
            std::borrow::Cow::Borrowed("app.test")
        ));
    }
}
