//! The path policy: one normalisation of the request path, applied once on the connector
//! before ingress matching, whose result is also exactly what the origin receives.
//!
//! Origins disagree about some spellings of a path: Tomcat and Spring read `..;` as `..`, IIS
//! reads `\` as `/`, many frameworks decode `%2F` before routing, nginx merges `//`. Each of
//! those lets a request match one ingress rule here and be served as another path there. The
//! policy removes the disagreement: such forms are refused (the default) or rewritten to the
//! plain form, and only then matched and forwarded.

/// What to do with spellings that origins read differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ambiguous {
    /// Answer 400 (the default).
    #[default]
    Reject,
    /// Rewrite: `\`, `%2F` and `%5C` become `/`, and path parameters are removed from every
    /// segment (`/a;x/b` → `/a/b`, `..;x` → `..`).
    Normalize,
}

/// How request paths are normalised (the connector's `[paths]` table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathPolicy {
    /// Backslashes, encoded separators and path parameters (`;`).
    pub ambiguous: Ambiguous,
    /// Merge repeated slashes (`//a///b` → `/a/b`).
    pub merge_slashes: bool,
}

impl Default for PathPolicy {
    fn default() -> Self {
        PathPolicy {
            ambiguous: Ambiguous::Reject,
            merge_slashes: true,
        }
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
    /// A control byte, raw or encoded (`%00`, `%0A`…).
    #[error("the request path contains a control character")]
    ControlCharacter,
    /// A `\`, raw or as `%5C`, refused by the policy.
    #[error("the request path contains a backslash")]
    Backslash,
    /// A `%2F`, refused by the policy.
    #[error("the request path contains an encoded '/'")]
    EncodedSlash,
    /// A `;` (path parameters, which some origins strip before routing), refused by the
    /// policy.
    #[error("the request path contains ';' (path parameters)")]
    Parameters,
}

/// Normalises a request target (`/path?query`) under `policy`: escapes are checked, encoded
/// unreserved characters decoded and other escapes given uppercase hex, ambiguous forms
/// refused or rewritten, repeated slashes merged, and `.`/`..` segments resolved
/// (RFC 3986 §6.2.2, §5.2.4). The query is left untouched. Returns (path, full target).
pub fn normalize_target(target: &str, policy: &PathPolicy) -> Result<(String, String), PathError> {
    let (path, query) = match target.find('?') {
        Some(i) => (&target[..i], Some(&target[i..])),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // Most paths are already in normal form: one copy each, without decoding and re-joining.
    if is_normal(path, policy) {
        return Ok((path.to_string(), target.to_string()));
    }
    let normalized = normalize_path(path, policy)?;
    let full = match query {
        Some(q) => format!("{normalized}{q}"),
        None => normalized.clone(),
    };
    Ok((normalized, full))
}

/// The normal form of an absolute path.
fn normalize_path(path: &str, policy: &PathPolicy) -> Result<String, PathError> {
    resolve_segments(&decode(path, policy.ambiguous)?, policy)
}

/// Whether normalisation leaves the absolute `path` as it is: no escape, backslash, `;` or
/// control byte, no `.` or `..` segment, and (when merging) no empty segment but a last one.
fn is_normal(path: &str, policy: &PathPolicy) -> bool {
    let special = |b: &u8| matches!(b, b'%' | b'\\' | b';') || b.is_ascii_control();
    if path.as_bytes().iter().any(special) {
        return false;
    }
    let mut segments = path[1..].split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            "." | ".." => return false,
            "" if policy.merge_slashes && !last => return false,
            _ => {}
        }
    }
    true
}

/// Checks every byte and escape; decodes unreserved characters and, when normalising,
/// separators.
fn decode(path: &str, ambiguous: Ambiguous) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let v = match bytes.get(i + 1..i + 3) {
                    Some([h, l]) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {
                        (hex_value(*h) << 4) | hex_value(*l)
                    }
                    _ => return Err(PathError::BadEscape),
                };
                match v {
                    b'/' | b'\\' => out.push(separator(v, ambiguous)?),
                    v if v.is_ascii_control() => return Err(PathError::ControlCharacter),
                    v if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') => {
                        out.push(v as char)
                    }
                    v => {
                        out.push('%');
                        out.push(char::from(HEX[usize::from(v >> 4)]));
                        out.push(char::from(HEX[usize::from(v & 15)]));
                    }
                }
                i += 3;
            }
            b'\\' => {
                out.push(separator(b'\\', ambiguous)?);
                i += 1;
            }
            b if b.is_ascii_control() => return Err(PathError::ControlCharacter),
            _ => {
                // Copy a run of ordinary bytes at once; the run ends on an ASCII byte, so it
                // ends on a UTF-8 boundary.
                let start = i;
                while i < bytes.len()
                    && !matches!(bytes[i], b'%' | b'\\')
                    && !bytes[i].is_ascii_control()
                {
                    i += 1;
                }
                out.push_str(&path[start..i]);
            }
        }
    }
    Ok(out)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// A `\` or an encoded `/` or `\` (given decoded as `b`): refused, or read as `/`.
fn separator(b: u8, ambiguous: Ambiguous) -> Result<char, PathError> {
    match (ambiguous, b) {
        (Ambiguous::Normalize, _) => Ok('/'),
        (Ambiguous::Reject, b'/') => Err(PathError::EncodedSlash),
        (Ambiguous::Reject, _) => Err(PathError::Backslash),
    }
}

/// Merges empty segments and resolves dot segments (RFC 3986 §5.2.4) on an absolute path.
fn resolve_segments(path: &str, policy: &PathPolicy) -> Result<String, PathError> {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        // Tomcat, Jetty and Spring route on the segment without its `;` parameters: `/;x/admin`
        // and `/admin;x/secret` reach `/admin…` there while matching no `^/admin` rule here.
        let seg = match seg.split_once(';') {
            None => *seg,
            Some(_) if policy.ambiguous == Ambiguous::Reject => return Err(PathError::Parameters),
            Some((bare, _)) => bare,
        };
        match seg {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            "" if policy.merge_slashes => trailing_slash = i == last,
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
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: PathPolicy = PathPolicy {
        ambiguous: Ambiguous::Reject,
        merge_slashes: true,
    };
    const LENIENT: PathPolicy = PathPolicy {
        ambiguous: Ambiguous::Normalize,
        merge_slashes: true,
    };

    fn path(t: &str, policy: &PathPolicy) -> Result<String, PathError> {
        normalize_target(t, policy).map(|(p, _)| p)
    }

    #[test]
    fn plain_normalisation() {
        let n = |t: &str| normalize_target(t, &STRICT).unwrap();
        assert_eq!(n("/a/./b/../c"), ("/a/c".into(), "/a/c".into()));
        assert_eq!(n("/%61%70%69/x"), ("/api/x".into(), "/api/x".into()));
        assert_eq!(n("/a%3fb"), ("/a%3Fb".into(), "/a%3Fb".into()));
        assert_eq!(
            n("/../../etc/passwd"),
            ("/etc/passwd".into(), "/etc/passwd".into())
        );
        assert_eq!(n("/a/b/.."), ("/a/".into(), "/a/".into()));
        assert_eq!(n("/"), ("/".into(), "/".into()));
        assert_eq!(n("/x/?q=/../y"), ("/x/".into(), "/x/?q=/../y".into()));
        assert_eq!(n("/%2E%2E/admin"), ("/admin".into(), "/admin".into()));
        assert_eq!(n("/caf\u{e9}"), ("/caf\u{e9}".into(), "/caf\u{e9}".into()));
        assert_eq!(n("/a?x=1;2"), ("/a".into(), "/a?x=1;2".into()));
    }

    /// The shortcut for paths already in normal form agrees with the full normalisation on
    /// every path of up to six bytes over the characters that matter.
    #[test]
    fn paths_taken_as_normal_are_what_normalisation_gives() {
        let alphabet = ['/', '.', 'a', ';', '%', '2', 'F', '\\', '\t'];
        let policies = [
            STRICT,
            LENIENT,
            PathPolicy {
                merge_slashes: false,
                ..STRICT
            },
        ];
        let mut paths = vec![String::from("/")];
        let (mut start, mut shortcut) = (0, 0);
        for _ in 0..5 {
            let end = paths.len();
            for i in start..end {
                for c in alphabet {
                    let mut p = paths[i].clone();
                    p.push(c);
                    paths.push(p);
                }
            }
            start = end;
        }
        for path in &paths {
            for policy in &policies {
                let full = normalize_path(path, policy);
                if is_normal(path, policy) {
                    shortcut += 1;
                    assert_eq!(full.as_deref(), Ok(path.as_str()), "{path:?} {policy:?}");
                }
                let target = format!("{path}?q=1");
                let expected = full.map(|p| (p.clone(), format!("{p}?q=1")));
                assert_eq!(normalize_target(&target, policy), expected, "{target:?}");
            }
        }
        assert!(shortcut > 1000, "the shortcut was taken {shortcut} times");
    }

    #[test]
    fn malformed_escapes_and_controls_are_refused() {
        for t in ["/%zz", "/%4", "/%", "/%+1", "/%-1", "/% 1", "/a%4g"] {
            assert_eq!(path(t, &LENIENT), Err(PathError::BadEscape), "{t}");
        }
        for t in ["/%00", "/a%0Ab", "/%0d", "/%7F", "/a\tb", "/a\0"] {
            assert_eq!(path(t, &LENIENT), Err(PathError::ControlCharacter), "{t}");
        }
        assert_eq!(path("x", &STRICT), Err(PathError::NotAbsolute));
        assert_eq!(path("", &STRICT), Err(PathError::NotAbsolute));
    }

    #[test]
    fn repeated_slashes_are_merged_unless_kept() {
        assert_eq!(path("//admin", &STRICT).unwrap(), "/admin");
        assert_eq!(path("/a//b///c//", &STRICT).unwrap(), "/a/b/c/");
        assert_eq!(path("/a/.//../b", &STRICT).unwrap(), "/b");
        let keep = PathPolicy {
            merge_slashes: false,
            ..STRICT
        };
        assert_eq!(path("/a//b", &keep).unwrap(), "/a//b");
    }

    #[test]
    fn ambiguous_forms_are_refused_by_default() {
        let cases = [
            ("/public/..;/admin", PathError::Parameters),
            ("/public/..;jsessionid=x/admin", PathError::Parameters),
            ("/public/.;/admin", PathError::Parameters),
            ("/public/%2e%2e;/admin", PathError::Parameters),
            ("/;x/admin", PathError::Parameters),
            ("/admin;x/secret", PathError::Parameters),
            ("/public\\..\\admin", PathError::Backslash),
            ("/public/..%5Cadmin", PathError::Backslash),
            ("/public/..%5cadmin", PathError::Backslash),
            ("/public/..%2Fadmin", PathError::EncodedSlash),
            ("/public%2f..%2fadmin", PathError::EncodedSlash),
        ];
        for (t, want) in cases {
            assert_eq!(path(t, &STRICT), Err(want), "{t}");
        }
    }

    #[test]
    fn ambiguous_forms_are_rewritten_when_normalising() {
        let cases = [
            ("/public/..;/admin", "/admin"),
            ("/public/..;jsessionid=x/admin", "/admin"),
            ("/public/.;/admin", "/public/admin"),
            ("/;x/admin", "/admin"),
            ("/admin;x/secret;y=1", "/admin/secret"),
            ("/public\\..\\admin", "/admin"),
            ("/public/..%5Cadmin", "/admin"),
            ("/public/..%2Fadmin", "/admin"),
            ("/a%2Fb", "/a/b"),
        ];
        for (t, want) in cases {
            assert_eq!(path(t, &LENIENT).unwrap(), want, "{t}");
        }
    }

    #[test]
    fn the_result_is_a_fixed_point() {
        for t in [
            "/a/../b//c/%2e/%7e",
            "/public/..;/x",
            "/x\\y",
            "/a%2Fb/..",
            "/%C3%A9",
        ] {
            for policy in [STRICT, LENIENT] {
                if let Ok((once, _)) = normalize_target(t, &policy) {
                    let (twice, _) = normalize_target(&once, &policy).unwrap();
                    assert_eq!(once, twice, "{t}");
                }
            }
        }
    }
}
