//! Ingress: path normalisation and first-match rule selection, with cloudflared's semantics.

use crate::config::{HostPattern, IngressRuleConfig};

/// Compiled ingress rules. The last one always matches (checked when the config is loaded).
#[derive(Debug, Clone)]
pub struct Ingress {
    rules: Vec<IngressRuleConfig>,
}

/// The outcome of matching a request.
#[derive(Debug, Clone, Copy)]
pub struct Match<'a> {
    /// Index of the rule in the configuration.
    pub index: usize,
    /// The rule.
    pub rule: &'a IngressRuleConfig,
}

impl Ingress {
    /// Wraps validated rules.
    pub fn new(rules: Vec<IngressRuleConfig>) -> Self {
        Ingress { rules }
    }

    /// The first rule matching `host` (lowercase, no port) and `path` (normalised, no query).
    /// `None` only if the rules lack a catch-all, which validation prevents.
    pub fn find(&self, host: &str, path: &str) -> Option<Match<'_>> {
        self.rules.iter().enumerate().find_map(|(index, rule)| {
            let host_ok = rule
                .hostname
                .as_ref()
                .is_none_or(|h: &HostPattern| h.matches(host));
            let path_ok = rule.path.as_ref().is_none_or(|re| re.is_match(path));
            (host_ok && path_ok).then_some(Match { index, rule })
        })
    }
}

/// Why a request path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an origin-form path.
    #[error("the request path must start with '/'")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("the request path has an invalid percent-encoding")]
    BadEscape,
}

/// Normalises a request target (`/path?query`) once, before matching and before proxying:
/// percent-encoded unreserved characters are decoded, other escapes get uppercase hex, and
/// `.`/`..` segments are resolved (RFC 3986 §6.2.2). The query is left untouched.
/// Returns (path, full target).
pub fn normalize_target(target: &str) -> Result<(String, String), PathError> {
    let (path, query) = match target.find('?') {
        Some(i) => (&target[..i], Some(&target[i..])),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode_unreserved(path)?;
    let normalized = remove_dot_segments(&decoded);
    let full = match query {
        Some(q) => format!("{normalized}{q}"),
        None => normalized.clone(),
    };
    Ok((normalized, full))
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
            let s = std::str::from_utf8(hex).map_err(|_| PathError::BadEscape)?;
            let v = u8::from_str_radix(s, 16).map_err(|_| PathError::BadEscape)?;
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                out.push(v as char);
            } else {
                out.push('%');
                out.push_str(&s.to_ascii_uppercase());
            }
            i += 3;
        } else {
            // Safe: `path` is a &str and we copy whole UTF-8 sequences byte-run by byte-run.
            let start = i;
            while i < bytes.len() && bytes[i] != b'%' {
                i += 1;
            }
            out.push_str(&path[start..i]);
        }
    }
    Ok(out)
}

/// RFC 3986 §5.2.4, on an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut result = String::with_capacity(path.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if trailing_slash || result.is_empty() {
        result.push('/');
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(host: Option<&str>, path: Option<&str>, origin: &str) -> IngressRuleConfig {
        IngressRuleConfig {
            hostname: host.map(|h| HostPattern::try_from(h).unwrap()),
            path: path.map(|p| regex::Regex::new(p).unwrap()),
            origin: origin.into(),
            plugins: Vec::new(),
        }
    }

    #[test]
    fn first_match_wins() {
        let ing = Ingress::new(vec![
            rule(Some("app.test"), Some("^/api/"), "api"),
            rule(Some("app.test"), None, "web"),
            rule(Some("*.test"), None, "wild"),
            rule(None, Some("^/health$"), "health"),
            rule(None, None, "fallback"),
        ]);
        let pick = |h: &str, p: &str| ing.find(h, p).unwrap().rule.origin.clone();
        assert_eq!(pick("app.test", "/api/x"), "api");
        assert_eq!(pick("app.test", "/x"), "web");
        assert_eq!(pick("b.test", "/api/x"), "wild");
        assert_eq!(pick("other.org", "/health"), "health");
        assert_eq!(pick("other.org", "/"), "fallback");
        assert_eq!(ing.find("app.test", "/api/x").unwrap().index, 0);
    }

    #[test]
    fn normalization() {
        let n = |t: &str| normalize_target(t).unwrap();
        assert_eq!(n("/a/./b/../c"), ("/a/c".into(), "/a/c".into()));
        assert_eq!(n("/%61%70%69/x"), ("/api/x".into(), "/api/x".into()));
        assert_eq!(n("/a%2fb"), ("/a%2Fb".into(), "/a%2Fb".into()));
        assert_eq!(
            n("/../../etc/passwd"),
            ("/etc/passwd".into(), "/etc/passwd".into())
        );
        assert_eq!(n("/a/b/.."), ("/a/".into(), "/a/".into()));
        assert_eq!(n("/"), ("/".into(), "/".into()));
        assert_eq!(n("/x/?q=/../y"), ("/x/".into(), "/x/?q=/../y".into()));
        assert_eq!(n("/%2E%2E/admin"), ("/admin".into(), "/admin".into()));
        assert_eq!(n("/caf\u{e9}"), ("/caf\u{e9}".into(), "/caf\u{e9}".into()));
        assert_eq!(normalize_target("x"), Err(PathError::NotAbsolute));
        assert_eq!(normalize_target("/%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize_target("/%4"), Err(PathError::BadEscape));
    }
}
