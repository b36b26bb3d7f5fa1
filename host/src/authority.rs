//! The one validator of `Host` and `:authority`: a DNS name or IP literal with an optional
//! port, checked before a request is routed, and written back in one canonical spelling.
//!
//! Anything else (user-info, paths, spaces, control bytes, empty labels, a port that is not a
//! number) is refused, so that no origin ever sees a Host that routed one way and reads
//! another (`evil.com/x.app.example.com`).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// A validated authority: lowercase host without a trailing dot, and an optional port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    host: String,
    port: Option<u16>,
}

/// Why an authority was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    /// Empty, or nothing but a port.
    #[error("the host is empty")]
    Empty,
    /// Longer than a DNS name can be.
    #[error("the host is too long")]
    TooLong,
    /// A character a host name cannot hold (`/`, `@`, space, control bytes…).
    #[error("the host has a character a host name cannot contain")]
    BadCharacter,
    /// An empty label (`a..b`), or a label over 63 bytes or starting or ending with `-`.
    #[error("the host has an invalid label")]
    BadLabel,
    /// A bracketed literal that is not an IPv6 address.
    #[error("the host is not a valid IPv6 literal")]
    BadIpLiteral,
    /// A port that is missing after `:`, not decimal, or over 65535.
    #[error("the port is not a number from 0 to 65535")]
    BadPort,
}

/// Longest DNS name (RFC 1035 §2.3.4).
const MAX_NAME: usize = 253;

impl Authority {
    /// Parses and validates `s` (`host`, `host:port`, `[v6]`, `[v6]:port`).
    pub fn parse(s: &str) -> Result<Self, AuthorityError> {
        if s.is_empty() {
            return Err(AuthorityError::Empty);
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (literal, after) = rest.split_once(']').ok_or(AuthorityError::BadIpLiteral)?;
            literal
                .parse::<Ipv6Addr>()
                .map_err(|_| AuthorityError::BadIpLiteral)?;
            let port = match after {
                "" => None,
                p => Some(parse_port(
                    p.strip_prefix(':').ok_or(AuthorityError::BadCharacter)?,
                )?),
            };
            (format!("[{}]", literal.to_ascii_lowercase()), port)
        } else {
            let (name, port) = match s.split_once(':') {
                Some((name, p)) => (name, Some(parse_port(p)?)),
                None => (s, None),
            };
            (parse_name(name)?, port)
        };
        Ok(Authority { host, port })
    }

    /// The host: lowercase, no trailing dot, IPv6 in brackets. This is what tunnels are
    /// matched against.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, if one was given.
    pub fn port(&self) -> Option<u16> {
        self.port
    }
}

impl fmt::Display for Authority {
    /// The canonical spelling, as forwarded to connectors and origins.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

fn parse_port(p: &str) -> Result<u16, AuthorityError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthorityError::BadPort);
    }
    p.parse().map_err(|_| AuthorityError::BadPort)
}

/// A reg-name restricted to what DNS and TLS can carry (letters, digits, `-`, `_`, dots), or a
/// dotted IPv4 address; one trailing dot is allowed and dropped.
fn parse_name(name: &str) -> Result<String, AuthorityError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(AuthorityError::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(AuthorityError::TooLong);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(AuthorityError::BadCharacter);
    }
    // A name whose last label is a number (`1.2.3`, `010.0.0.1`, `0x7f.1`, `0x7f000001`) is
    // read as an IPv4 address, in some base, by resolvers and browsers: it must be a plain
    // dotted IPv4 address or nothing.
    let last = name.rsplit('.').next().unwrap_or(name);
    let numeric = !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit())
        || last.len() > 2 && last[..2].eq_ignore_ascii_case("0x");
    if numeric {
        let ip: Ipv4Addr = name.parse().map_err(|_| AuthorityError::BadCharacter)?;
        return Ok(ip.to_string());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 || label.starts_with('-') || label.ends_with('-') {
            return Err(AuthorityError::BadLabel);
        }
    }
    Ok(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> String {
        Authority::parse(s)
            .unwrap_or_else(|e| panic!("{s:?}: {e}"))
            .to_string()
    }

    #[test]
    fn accepts_names_addresses_and_ports() {
        assert_eq!(ok("App.Example.COM"), "app.example.com");
        assert_eq!(ok("app.example.com."), "app.example.com");
        assert_eq!(ok("app.test:8080"), "app.test:8080");
        assert_eq!(ok("under_score.test"), "under_score.test");
        assert_eq!(ok("127.0.0.1:80"), "127.0.0.1:80");
        assert_eq!(ok("[::1]"), "[::1]");
        assert_eq!(ok("[2001:DB8::1]:443"), "[2001:db8::1]:443");
        assert_eq!(ok("localhost"), "localhost");
        let a = Authority::parse("x.test:1").unwrap();
        assert_eq!((a.host(), a.port()), ("x.test", Some(1)));
    }

    #[test]
    fn refuses_everything_else() {
        use AuthorityError::*;
        let cases: &[(&str, AuthorityError)] = &[
            ("", Empty),
            (":80", Empty),
            (".", Empty),
            ("evil.com/x.app.example.com", BadCharacter),
            ("user@app.test", BadCharacter),
            ("app.test\\x", BadCharacter),
            ("app test", BadCharacter),
            ("app.test\0", BadCharacter),
            ("app.test%2f", BadCharacter),
            ("a..b", BadLabel),
            ("-a.test", BadLabel),
            ("a-.test", BadLabel),
            ("app.test:", BadPort),
            ("app.test:65536", BadPort),
            ("app.test:+80", BadPort),
            ("app.test:80:80", BadPort),
            ("app.test:0x50", BadPort),
            ("[::1", BadIpLiteral),
            ("[zz]", BadIpLiteral),
            ("[::1]x", BadCharacter),
            ("1.2.3", BadCharacter),
            ("010.0.0.1", BadCharacter),
            ("999.1.1.1", BadCharacter),
            ("0x7f.1", BadCharacter),
            ("0x7f000001", BadCharacter),
            ("2130706433", BadCharacter),
            ("app.123", BadCharacter),
        ];
        for (input, want) in cases {
            assert_eq!(Authority::parse(input).as_ref(), Err(want), "{input:?}");
        }
        assert_eq!(
            Authority::parse(&format!("{}.test", "a".repeat(64))),
            Err(BadLabel)
        );
        assert_eq!(
            Authority::parse(&"a.".repeat(130)),
            Err(AuthorityError::TooLong)
        );
    }
}
