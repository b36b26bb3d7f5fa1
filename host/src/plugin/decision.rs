//! Validation and application of plugin decisions. The host, not the plugin, has the last
//! word: anything that could break framing, smuggle hop-by-hop semantics or reach an origin
//! the operator did not configure is refused.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use super::bindings::sluice::plugin::types::{Header, HeaderEdit, LocalResponse};

/// Largest body of a local response.
pub const MAX_LOCAL_BODY: usize = 256 * 1024;

/// Headers a plugin may neither set nor remove (nor send on an outbound call).
pub(crate) const FORBIDDEN: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "te",
    "trailer",
    "upgrade",
    "http2-settings",
    crate::headers::REQUEST_ID,
];

fn check_name(name: &str) -> Result<HeaderName, String> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("invalid header name {name:?}"))?;
    if parsed.as_str() != name {
        return Err(format!("header name {name:?} must be lowercase"));
    }
    if FORBIDDEN.contains(&name) || name.starts_with("proxy-") {
        return Err(format!(
            "header {name:?} is managed by sluice and cannot be changed by plugins"
        ));
    }
    Ok(parsed)
}

fn check_header(h: &Header) -> Result<(HeaderName, HeaderValue), String> {
    let name = check_name(&h.name)?;
    let value = HeaderValue::from_bytes(&h.value)
        .map_err(|_| format!("invalid value for header {:?}", h.name))?;
    Ok((name, value))
}

/// Validates every edit, then applies them in order (all or nothing).
pub fn apply_edits(headers: &mut HeaderMap, edits: &[HeaderEdit]) -> Result<(), String> {
    Edits::check(edits)?.apply(headers);
    Ok(())
}

/// Header edits, validated: they apply to any map without failing, so one decision can edit
/// several copies of the same headers alike.
pub struct Edits(Vec<Op>);

enum Op {
    Set(HeaderName, HeaderValue),
    Append(HeaderName, HeaderValue),
    Remove(HeaderName),
}

impl Edits {
    /// Validates every edit; the first invalid one is the error.
    pub fn check(edits: &[HeaderEdit]) -> Result<Edits, String> {
        edits
            .iter()
            .map(|e| match e {
                HeaderEdit::Set(h) => check_header(h).map(|(n, v)| Op::Set(n, v)),
                HeaderEdit::Append(h) => check_header(h).map(|(n, v)| Op::Append(n, v)),
                HeaderEdit::Remove(name) => check_name(name).map(Op::Remove),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Edits)
    }

    /// Applies the edits to `headers`, in order.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for op in &self.0 {
            match op {
                Op::Set(n, v) => {
                    headers.insert(n.clone(), v.clone());
                }
                Op::Append(n, v) => {
                    headers.append(n.clone(), v.clone());
                }
                Op::Remove(n) => {
                    headers.remove(n);
                }
            }
        }
    }
}

/// A path rewrite: absolute, a valid request target.
pub fn check_path(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with '/'"));
    }
    http::uri::PathAndQuery::try_from(path).map_err(|_| format!("invalid path {path:?}"))?;
    Ok(path.to_string())
}

/// A local response: a final status, valid headers, a bounded body.
pub fn local_response(r: &LocalResponse) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let status = StatusCode::from_u16(r.status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| {
            format!(
                "invalid status {} for a local response (200..=599)",
                r.status
            )
        })?;
    if r.body.len() > MAX_LOCAL_BODY {
        return Err(format!(
            "local response body of {} bytes exceeds the {MAX_LOCAL_BODY}-byte limit",
            r.body.len()
        ));
    }
    let mut headers = HeaderMap::new();
    for h in &r.headers {
        let (n, v) = check_header(h)?;
        headers.append(n, v);
    }
    Ok((status, headers, Bytes::copy_from_slice(&r.body)))
}

/// A status `on-response` gives a response whose status is `current`: 200-599, and never
/// for an upgrade the origin accepted (101), whose connection is about to change hands.
pub fn response_status(current: StatusCode, new: u16) -> Result<StatusCode, String> {
    if current == StatusCode::SWITCHING_PROTOCOLS {
        return Err("the status of an upgrade (101) cannot be changed".into());
    }
    StatusCode::from_u16(new)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| format!("invalid response status {new} (200..=599)"))
}

/// A body `on-response` puts in place of the origin's, for a response of `status`.
pub fn response_body(status: StatusCode, body: &[u8]) -> Result<Bytes, String> {
    if matches!(status.as_u16(), 101 | 204 | 304) {
        return Err(format!("a {} response carries no body", status.as_u16()));
    }
    if body.len() > MAX_LOCAL_BODY {
        return Err(format!(
            "response body of {} bytes exceeds the {MAX_LOCAL_BODY}-byte limit",
            body.len()
        ));
    }
    Ok(Bytes::copy_from_slice(body))
}

/// Headers as the WIT `header` list.
pub fn to_wit(headers: &HeaderMap) -> Vec<Header> {
    headers
        .iter()
        .map(|(n, v)| Header {
            name: n.as_str().to_string(),
            value: v.as_bytes().to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_response_statuses_and_bodies_follow_the_rules() {
        let ok = StatusCode::OK;
        assert_eq!(
            response_status(ok, 503),
            Ok(StatusCode::SERVICE_UNAVAILABLE)
        );
        for bad in [0, 101, 199, 600, 1000] {
            assert!(response_status(ok, bad).is_err(), "{bad}");
        }
        assert!(response_status(StatusCode::SWITCHING_PROTOCOLS, 200)
            .unwrap_err()
            .contains("upgrade"));
        assert_eq!(response_body(ok, b"hi").unwrap(), Bytes::from_static(b"hi"));
        for no_body in [StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED] {
            assert!(response_body(no_body, b"x").is_err());
        }
        assert!(response_body(ok, &vec![0; MAX_LOCAL_BODY + 1])
            .unwrap_err()
            .contains("limit"));
    }

    fn h(name: &str, value: &str) -> Header {
        Header {
            name: name.into(),
            value: value.as_bytes().to_vec(),
        }
    }

    #[test]
    fn edits_apply_in_order() {
        let mut map = HeaderMap::new();
        map.insert("x-a", HeaderValue::from_static("1"));
        apply_edits(
            &mut map,
            &[
                HeaderEdit::Append(h("x-a", "2")),
                HeaderEdit::Set(h("x-b", "3")),
                HeaderEdit::Remove("x-gone".into()),
            ],
        )
        .unwrap();
        assert_eq!(map.get_all("x-a").iter().count(), 2);
        assert_eq!(map["x-b"], "3");
    }

    #[test]
    fn forbidden_and_invalid_edits_change_nothing() {
        let mut map = HeaderMap::new();
        for bad in [
            vec![
                HeaderEdit::Set(h("x-ok", "1")),
                HeaderEdit::Set(h("content-length", "5")),
            ],
            vec![HeaderEdit::Remove("connection".into())],
            vec![HeaderEdit::Set(h("proxy-authorization", "x"))],
            vec![HeaderEdit::Set(h("sluice-request-id", "forged"))],
            vec![HeaderEdit::Set(h("Bad Name", "x"))],
            vec![HeaderEdit::Set(h("X-Upper", "x"))],
            vec![HeaderEdit::Set(Header {
                name: "x-bin".into(),
                value: b"a\r\nb".to_vec(),
            })],
        ] {
            assert!(apply_edits(&mut map, &bad).is_err(), "{:?}", bad.len());
        }
        assert!(
            map.is_empty(),
            "a refused decision must not be partly applied"
        );
    }

    #[test]
    fn paths_and_local_responses() {
        assert!(check_path("/a?b=c").is_ok());
        assert!(check_path("a").is_err());
        assert!(check_path("/a b").is_err());
        let ok = LocalResponse {
            status: 403,
            headers: vec![h("content-type", "text/plain")],
            body: b"no".to_vec(),
        };
        assert_eq!(local_response(&ok).unwrap().0, StatusCode::FORBIDDEN);
        let big = LocalResponse {
            status: 200,
            headers: vec![],
            body: vec![0; MAX_LOCAL_BODY + 1],
        };
        assert!(local_response(&big).is_err());
        let info = LocalResponse {
            status: 101,
            headers: vec![],
            body: vec![],
        };
        assert!(local_response(&info).is_err());
    }
}
