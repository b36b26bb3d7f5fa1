//! Header rules shared by edge and connector: hop-by-hop stripping and conversions to and from
//! the wire representation.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::proto::HeaderValueBytes;

/// Request id header added by the edge; clients cannot set it.
pub const REQUEST_ID: &str = "sluice-request-id";

/// [`REQUEST_ID`] as a header name, for maps (a `&str` key is parsed on every use).
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static(REQUEST_ID);

/// The `x-forwarded-*` headers the edge sets on every request, and one it removes.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Names that every request head from the edge carries and `http` has no constant for. A
/// name read from the wire is first looked for here: parsed, it would be copied into an
/// allocation of its own on every request.
const EDGE_SET: [HeaderName; 4] = [
    REQUEST_ID_HEADER,
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
];

/// A header name from the wire: one of [`EDGE_SET`] as it is, else parsed (and lowercased).
pub fn name_from_wire(name: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    match EDGE_SET.iter().find(|n| n.as_str().as_bytes() == name) {
        Some(known) => Ok(known.clone()),
        None => HeaderName::from_bytes(name),
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded; every `proxy-*` header goes too.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            // Connection-specific by definition (RFC 9113 §3.2.1), even when `Connection`
            // omits it.
            | "http2-settings"
    ) || name.as_str().starts_with("proxy-")
}

/// Removes hop-by-hop headers, including any named in `Connection`.
///
/// `Connection` is read once, and each of its tokens compared with the names present, without
/// hashing or allocating; only the list of names to remove is allocated, and only when
/// something goes (every request and response of both roles passes here).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name))
        .cloned()
        .collect();
    let listed = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty());
    for token in listed {
        let named = headers
            .keys()
            .find(|name| name.as_str().eq_ignore_ascii_case(token));
        // Each name once, however often it is listed: a peer's `Connection` cannot make the
        // list longer than the map.
        if let Some(name) = named.filter(|name| !doomed.contains(name)) {
            doomed.push(name.clone());
        }
    }
    for name in doomed {
        headers.remove(name);
    }
}

/// The protocol a request asks to upgrade to (HTTP/1.1 `Connection: upgrade` + `Upgrade`),
/// lowercase, if it is one of `allowed`. A list of several protocols, or several `Upgrade`
/// fields, is not an upgrade the edge relays.
pub fn requested_upgrade(headers: &HeaderMap, allowed: &[String]) -> Option<String> {
    let wants = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let mut values = headers.get_all(http::header::UPGRADE).iter();
    let (Some(value), None, true) = (values.next(), values.next(), wants) else {
        return None;
    };
    let proto = value.to_str().ok()?.trim().to_ascii_lowercase();
    allowed.contains(&proto).then_some(proto)
}

/// Headers as sent on the wire: lowercase names, repeated headers kept in order.
pub fn to_wire(headers: &HeaderMap) -> Vec<(String, HeaderValueBytes)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                HeaderValueBytes(v.as_bytes().to_vec()),
            )
        })
        .collect()
}

/// Headers from the wire; invalid names or values are dropped and counted.
pub fn from_wire(wire: &[(String, HeaderValueBytes)]) -> (HeaderMap, usize) {
    let mut map = HeaderMap::with_capacity(wire.len());
    let mut invalid = 0;
    for (name, value) in wire {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(&value.0),
        ) {
            (Ok(n), Ok(v)) => {
                map.append(n, v);
            }
            _ => invalid += 1,
        }
    }
    (map, invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_listed_and_standard_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        h.insert("proxy-anything", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn names_listed_in_connection_go_whatever_their_case() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("close"));
        h.append(
            "connection",
            HeaderValue::from_static(" X-Hop-One ,x-HOP-two"),
        );
        h.insert("x-hop-one", HeaderValue::from_static("1"));
        h.insert("x-hop-two", HeaderValue::from_static("2"));
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAAP__"),
        );
        h.insert("x-hop-three", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(left, ["x-hop-three"]);
    }

    #[test]
    fn a_name_listed_many_times_is_removed_and_nothing_else() {
        let mut h = HeaderMap::new();
        let listed = vec!["x-hop"; 1000].join(", ");
        h.insert("connection", HeaderValue::from_str(&listed).unwrap());
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn names_from_the_wire_are_parsed_alike_whether_known_or_not() {
        for wire in ["x-forwarded-for", "X-Forwarded-For", "x-custom", "accept"] {
            assert_eq!(
                name_from_wire(wire.as_bytes()).unwrap(),
                HeaderName::from_bytes(wire.as_bytes()).unwrap(),
                "{wire}"
            );
        }
        assert!(name_from_wire(b"bad name").is_err());
    }

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        let allowed = ["websocket".to_string()];
        h.insert("upgrade", HeaderValue::from_static("WebSocket"));
        assert_eq!(requested_upgrade(&h, &allowed), None);
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(
            requested_upgrade(&h, &allowed).as_deref(),
            Some("websocket")
        );
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        assert_eq!(requested_upgrade(&h, &allowed), None);
        h.insert("upgrade", HeaderValue::from_static("websocket, h2c"));
        assert_eq!(requested_upgrade(&h, &allowed), None);
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.append("upgrade", HeaderValue::from_static("h2c"));
        assert_eq!(requested_upgrade(&h, &allowed), None);
    }

    #[test]
    fn wire_round_trip_keeps_repeats() {
        let mut h = HeaderMap::new();
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        let (back, bad) = from_wire(&to_wire(&h));
        assert_eq!(bad, 0);
        assert_eq!(back.get_all("set-cookie").iter().count(), 2);
    }
}
