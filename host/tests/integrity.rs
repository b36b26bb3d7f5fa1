//! Request-path integrity, tested with attacks as bytes: hostile HTTP/1.1 and HTTP/2 requests
//! written by hand to the edge, and an origin on a raw socket that parses what reaches it by
//! the strictest reading of RFC 9112. Every request must either be refused by the edge (4xx,
//! or an HTTP/2 stream reset) or reach the origin as exactly one well-framed request with the
//! body the client sent; the request that follows must arrive intact. Then: Host validation,
//! the upgrade allow-list, the path policy against an ingress rule, and an oversized response
//! head.

mod support;

use support::raw::{h2, raw_exchange, Event, RawOrigin, Seen};
use support::*;

use sluice::config::{OriginConfig, OriginTarget};
use sluice::ingress::{Ambiguous, PathPolicy};

/// What a hostile request must come to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The edge answers 4xx (or resets the stream) and the origin sees nothing.
    Refused,
    /// The origin sees exactly one request for this case, whose body is this.
    Forwarded(&'static str),
    /// Either of those (the RFC lets a server do both), never anything else.
    RefusedOr(&'static str),
    /// The body turns out broken after the head went on: the origin sees at most a request cut
    /// short on a connection that is then closed, never a complete one.
    BrokenBody,
}

/// An edge (HTTP and HTTPS) serving `app.test` and `*.wild.test`, a connector whose rule
/// `^/admin` answers 403 and whose catch-all goes to a raw origin.
struct Setup {
    edge: EdgeHandle,
    /// The certificate of the HTTPS listener.
    public: sluice::config::TlsIdentity,
    conn: ConnectorHandle,
    origin: RawOrigin,
}

async fn setup(paths: PathPolicy) -> Setup {
    let origin = RawOrigin::start().await;
    let public = identity();
    let https_identity = public.clone();
    let edge = start_edge(
        vec![tunnel("app", "t", &["app.test", "*.wild.test"])],
        move |c| {
            c.https = Some(sluice::config::HttpsConfig {
                listen: loopback(),
                identity: https_identity,
            });
        },
    )
    .await;
    let mut raw = http_origin("raw", origin.addr);
    raw.pool_max_idle = 1;
    let deny = OriginConfig::new("deny", OriginTarget::Status(403));
    let mut cfg = connector_config(
        &edge,
        "app",
        "t",
        vec![raw, deny],
        vec![rule(None, Some("^/admin"), "deny"), rule(None, None, "raw")],
    );
    cfg.ha_connections = 1;
    cfg.paths = paths;
    let conn = start_connector(cfg).await;
    conn.registered(1).await;
    Setup {
        edge,
        public,
        conn,
        origin,
    }
}

/// The HTTP/1.1 corpus; `{p}` is the case's own path.
fn h1_corpus() -> Vec<(&'static str, String, Expect)> {
    use Expect::*;
    let c = |name, text: &str, e| (name, text.to_string(), e);
    vec![
        c("upgrade with content-length and no body", "GET {p} HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\n", Refused),
        c("upgrade with content-length and a body", "GET {p} HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello", Refused),
        c("upgrade with a chunked body", "GET {p} HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Refused),
        c("h2c upgrade", "GET {p} HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n", Forwarded("")),
        c("h2c upgrade, settings not in Connection", "GET {p} HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n", Forwarded("")),
        c("upgrade to two protocols", "GET {p} HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket, h2c\r\n\r\n", Forwarded("")),
        c("content-length then chunked", "POST {p} HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", RefusedOr("hello")),
        c("chunked then content-length", "POST {p} HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n", RefusedOr("hello")),
        c("duplicate equal content-length", "POST {p} HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", RefusedOr("hello")),
        c("conflicting content-length", "POST {p} HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", Refused),
        c("content-length list", "POST {p} HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5, 6\r\n\r\nhello!", Refused),
        c("content-length with a sign", "POST {p} HTTP/1.1\r\nHost: app.test\r\nContent-Length: +5\r\n\r\nhello", Refused),
        c("negative content-length", "POST {p} HTTP/1.1\r\nHost: app.test\r\nContent-Length: -1\r\n\r\nhello", Refused),
        c("hex content-length", "POST {p} HTTP/1.1\r\nHost: app.test\r\nContent-Length: 0x5\r\n\r\nhello", Refused),
        c("content-length overflow", "POST {p} HTTP/1.1\r\nHost: app.test\r\nContent-Length: 99999999999999999999\r\n\r\nhello", Refused),
        c("content-length with spaces", "POST {p} HTTP/1.1\r\nHost: app.test\r\nContent-Length:   5  \r\n\r\nhello", RefusedOr("hello")),
        c("chunked not last", "POST {p} HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Refused),
        c("unknown coding", "POST {p} HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Refused),
        c("chunked in another case", "POST {p} HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", RefusedOr("hello")),
        c("two transfer-encoding fields", "POST {p} HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", RefusedOr("hello")),
        c("transfer-encoding on HTTP/1.0", "POST {p} HTTP/1.0\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Refused),
        c("oversized chunk size", "POST {p} HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nhello\r\n0\r\n\r\n", BrokenBody),
        c("chunk size not hex", "POST {p} HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", BrokenBody),
        c("chunk without its CRLF", "POST {p} HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", BrokenBody),
        c("obs-fold", "GET {p} HTTP/1.1\r\nHost: app.test\r\nX-Folded: a\r\n b\r\n\r\n", Refused),
        c("bare LF line endings", "GET {p} HTTP/1.1\nHost: app.test\n\n", RefusedOr("")),
        c("NUL in a header value", "GET {p} HTTP/1.1\r\nHost: app.test\r\nX-A: a\0b\r\n\r\n", Refused),
        c("control byte in a header value", "GET {p} HTTP/1.1\r\nHost: app.test\r\nX-A: a\x01b\r\n\r\n", Refused),
        c("NUL in the path", "GET {p}\0x HTTP/1.1\r\nHost: app.test\r\n\r\n", Refused),
        c("space before the colon", "GET {p} HTTP/1.1\r\nHost : app.test\r\n\r\n", Refused),
        c("bad header name", "GET {p} HTTP/1.1\r\nHost: app.test\r\nX(A): 1\r\n\r\n", Refused),
        c("absolute-form with another host", "GET http://other.test{p} HTTP/1.1\r\nHost: app.test\r\n\r\n", Refused),
        c("absolute-form with the same host", "GET http://app.test{p} HTTP/1.1\r\nHost: app.test\r\n\r\n", Forwarded("")),
        c("two Host headers", "GET {p} HTTP/1.1\r\nHost: app.test\r\nHost: other.test\r\n\r\n", Refused),
        c("Host with a path", "GET {p} HTTP/1.1\r\nHost: evil.com/x.wild.test\r\n\r\n", Refused),
        c("Host with user-info", "GET {p} HTTP/1.1\r\nHost: user@app.test\r\n\r\n", Refused),
        c("empty Host", "GET {p} HTTP/1.1\r\nHost: \r\n\r\n", Refused),
        c("no Host", "GET {p} HTTP/1.1\r\n\r\n", Refused),
        c("CONNECT", "CONNECT app.test:443 HTTP/1.1\r\nHost: app.test:443\r\n\r\n", Refused),
        c("GET with a chunked body", "GET {p} HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Forwarded("hello")),
        c("GET with a sized body", "GET {p} HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello", Forwarded("hello")),
        c("content-length named in Connection", "POST {p} HTTP/1.1\r\nHost: app.test\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello", Forwarded("hello")),
        c("Host named in Connection", "GET {p} HTTP/1.1\r\nHost: app.test\r\nConnection: host\r\n\r\n", Forwarded("")),
        c("client-sent request id", "GET {p} HTTP/1.1\r\nHost: app.test\r\nsluice-request-id: forged\r\n\r\n", Forwarded("")),
    ]
}

/// Checks what the origin saw for case `id` (events since `mark`), given the client's
/// answer, against `expect`; returns a description of any breach.
fn judge(
    id: &str,
    events: &[Event],
    answered: Option<u16>,
    expect: Expect,
) -> Result<Option<Seen>, String> {
    let mine: Vec<&Seen> = events
        .iter()
        .filter_map(|e| match e {
            Event::Request(s) if s.target.starts_with(id) => Some(s),
            _ => None,
        })
        .collect();
    if let Some(bad) = events.iter().find(|e| match e {
        Event::Violation { .. } => true,
        Event::Request(s) => !s.target.starts_with(id) && !s.target.starts_with("/canary"),
        Event::Truncated { .. } => expect != Expect::BrokenBody,
    }) {
        return Err(format!("the origin saw {bad:?}"));
    }
    let refused = mine.is_empty() && answered.is_none_or(|s| (400..500).contains(&s));
    let forwarded = |body: &str| {
        mine.len() == 1
            && mine[0].body == body.as_bytes()
            && answered == Some(200)
            && mine[0].header("host") == ["app.test"]
    };
    let ok = match expect {
        Expect::Refused => refused,
        Expect::Forwarded(body) => forwarded(body),
        Expect::RefusedOr(body) => refused || forwarded(body),
        Expect::BrokenBody => mine.is_empty() && answered.is_none_or(|s| s >= 400),
    };
    if !ok {
        return Err(format!("answered {answered:?}; the origin saw {mine:#?}"));
    }
    Ok(mine.first().map(|s| (*s).clone()))
}

/// Sends a plain request after a case and checks that the origin got it whole.
async fn canary(s: &Setup, n: usize) {
    let target = format!("/canary{n}");
    let text =
        format!("POST {target} HTTP/1.1\r\nHost: app.test\r\nContent-Length: 6\r\n\r\ncanary");
    let reply = raw_exchange(s.edge.http, text.as_bytes()).await;
    let reply = reply.unwrap_or_else(|| panic!("no answer to {target}"));
    assert_eq!(
        (
            reply.status,
            String::from_utf8_lossy(&reply.body).into_owned()
        ),
        (200, format!("ok {target}")),
        "{target}: {}",
        reply.head
    );
    let seen = s.origin.wait_for(&target).await;
    assert_eq!(seen.body, b"canary");
}

#[tokio::test]
async fn hostile_http1_requests_are_refused_or_forwarded_as_one_well_framed_request() {
    let s = setup(PathPolicy::default()).await;
    let corpus = h1_corpus();
    let mut failures = Vec::new();
    for (i, (name, text, expect)) in corpus.iter().enumerate() {
        let id = format!("/c{i}-");
        let bytes = text.replace("{p}", &format!("{id}x"));
        let before = s.origin.events().len();
        let reply = raw_exchange(s.edge.http, bytes.as_bytes()).await;
        canary(&s, i).await;
        let events = s.origin.events()[before..].to_vec();
        match judge(&id, &events, reply.as_ref().map(|r| r.status), *expect) {
            Ok(Some(seen)) => {
                // Nothing the client meant for one hop gets past it.
                for hop in ["upgrade", "http2-settings", "connection"] {
                    if !seen.header(hop).is_empty() {
                        failures.push(format!("{name}: the origin got a {hop} header"));
                    }
                }
                if seen.header("sluice-request-id").len() != 1
                    || seen.header("sluice-request-id")[0] == "forged"
                {
                    failures.push(format!("{name}: request id not the edge's"));
                }
            }
            Ok(None) => {}
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(corpus.len() >= 40, "the corpus has {} cases", corpus.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        corpus.len(),
        failures.join("\n")
    );
    s.conn.stop().await;
}

/// The HTTP/2 corpus: header fields (`{p}` is the case's path) and DATA frames.
/// One HTTP/2 case: its name, header fields, DATA frames and what it must come to.
type H2Case = (
    &'static str,
    Vec<(&'static str, &'static str)>,
    Vec<&'static str>,
    Expect,
);

fn h2_corpus() -> Vec<H2Case> {
    use Expect::*;
    let base = |extra: &[(&'static str, &'static str)]| {
        let mut f = vec![
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "app.test"),
            (":path", "{p}"),
        ];
        f.extend_from_slice(extra);
        f
    };
    vec![
        (
            "content-length over the data",
            base(&[("content-length", "10")]),
            vec!["hello"],
            BrokenBody,
        ),
        (
            "content-length under the data",
            base(&[("content-length", "3")]),
            vec!["hello"],
            BrokenBody,
        ),
        (
            "content-length not a number",
            base(&[("content-length", "abc")]),
            vec!["hello"],
            Refused,
        ),
        (
            "content-length in two fields",
            base(&[("content-length", "5"), ("content-length", "6")]),
            vec!["hello"],
            BrokenBody,
        ),
        (
            "transfer-encoding",
            base(&[("transfer-encoding", "chunked")]),
            vec!["hello"],
            Refused,
        ),
        (
            "connection header",
            base(&[("connection", "keep-alive")]),
            vec![],
            Refused,
        ),
        (
            "te other than trailers",
            base(&[("te", "gzip")]),
            vec![],
            Refused,
        ),
        (
            "upgrade header",
            base(&[("upgrade", "websocket")]),
            vec![],
            Refused,
        ),
        (
            "no :path",
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "app.test"),
            ],
            vec![],
            Refused,
        ),
        (
            "empty :path",
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "app.test"),
                (":path", ""),
            ],
            vec![],
            Refused,
        ),
        (
            "relative :path",
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "app.test"),
                (":path", "admin"),
            ],
            vec![],
            Refused,
        ),
        (
            "two :method",
            vec![
                (":method", "GET"),
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "app.test"),
                (":path", "{p}"),
            ],
            vec![],
            Refused,
        ),
        (
            "pseudo-header after a field",
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                ("x-a", "1"),
                (":authority", "app.test"),
                (":path", "{p}"),
            ],
            vec![],
            Refused,
        ),
        (
            "unknown pseudo-header",
            base(&[(":foo", "bar")]),
            vec![],
            Refused,
        ),
        (
            "uppercase field name",
            base(&[("X-Upper", "1")]),
            vec![],
            Refused,
        ),
        (
            "CR LF in a value",
            base(&[("x-a", "a\r\nx-b: b")]),
            vec![],
            Refused,
        ),
        ("NUL in a value", base(&[("x-a", "a\0b")]), vec![], Refused),
        (
            ":authority with a path",
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "evil.com/x.wild.test"),
                (":path", "{p}"),
            ],
            vec![],
            Refused,
        ),
        (
            ":authority with user-info",
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "u@app.test"),
                (":path", "{p}"),
            ],
            vec![],
            Refused,
        ),
        (
            ":authority and a disagreeing host",
            base(&[("host", "other.test")]),
            vec![],
            Refused,
        ),
        (
            "two host fields, no :authority",
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "{p}"),
                ("host", "app.test"),
                ("host", "other.test"),
            ],
            vec![],
            Refused,
        ),
        (
            "host only",
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "{p}"),
                ("host", "app.test"),
            ],
            vec![],
            Forwarded(""),
        ),
        (
            "CONNECT",
            vec![(":method", "CONNECT"), (":authority", "app.test:443")],
            vec![],
            Refused,
        ),
        (
            "sized body",
            base(&[("content-length", "5")]),
            vec!["hello"],
            Forwarded("hello"),
        ),
        (
            "GET with an unsized body",
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "app.test"),
                (":path", "{p}"),
            ],
            vec!["hel", "lo"],
            Forwarded("hello"),
        ),
    ]
}

#[tokio::test]
async fn hostile_http2_requests_are_refused_or_forwarded_as_one_well_framed_request() {
    let s = setup(PathPolicy::default()).await;
    let https = s.edge.https.unwrap();
    let corpus = h2_corpus();
    let mut failures = Vec::new();
    for (i, (name, fields, data, expect)) in corpus.iter().enumerate() {
        let id = format!("/h{i}-");
        let path = format!("{id}x");
        let fields: Vec<(&[u8], Vec<u8>)> = fields
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.replace("{p}", &path).into_bytes()))
            .collect();
        let block = h2::header_block(
            &fields
                .iter()
                .map(|(n, v)| (*n, v.as_slice()))
                .collect::<Vec<_>>(),
        );
        let mut frames = Vec::new();
        let end = if data.is_empty() { h2::END_STREAM } else { 0 };
        frames.push(h2::frame(h2::HEADERS, h2::END_HEADERS | end, 1, &block));
        for (j, d) in data.iter().enumerate() {
            let flags = if j + 1 == data.len() {
                h2::END_STREAM
            } else {
                0
            };
            frames.push(h2::frame(h2::DATA, flags, 1, d.as_bytes()));
        }
        let before = s.origin.events().len();
        let answer = h2::exchange(https, &s.public, &frames).await;
        let status = match answer {
            h2::Answer::Status(code) => Some(code),
            // Not in HPACK's static table: not a 200, not forwarded.
            h2::Answer::OtherStatus => Some(599),
            h2::Answer::Reset(_) | h2::Answer::Closed => None,
        };
        // A reset is how HTTP/2 refuses a malformed request (RFC 9113 §8.1.1).
        canary(&s, 1000 + i).await;
        let events = s.origin.events()[before..].to_vec();
        let status = match (status, *expect) {
            (Some(599), Expect::Refused) => None,
            (s, _) => s,
        };
        if let Err(e) = judge(&id, &events, status, *expect) {
            failures.push(format!("{name}: {e} ({answer:?})"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        corpus.len(),
        failures.join("\n")
    );
    s.conn.stop().await;
}

#[tokio::test]
async fn a_websocket_upgrade_never_shares_a_pooled_origin_connection() {
    let s = setup(PathPolicy::default()).await;
    // The origin declines the upgrade with a plain 200, as a static file server does.
    let text = "GET /up HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let reply = raw_exchange(s.edge.http, text.as_bytes()).await.unwrap();
    assert_eq!(reply.status, 200);
    let up = s.origin.wait_for("/up").await;
    assert_eq!(up.header("upgrade"), ["websocket"]);
    for n in 0..3 {
        canary(&s, n).await;
        let next = s.origin.wait_for(&format!("/canary{n}")).await;
        assert_ne!(
            next.conn, up.conn,
            "a later request reused the connection of an upgrade request"
        );
    }
    s.conn.stop().await;
}

/// Every spelling of `/admin` that some origin reads as `/admin`: the ingress rule on
/// `^/admin` (a 403) must see it, or the connector refuses it; it never reaches the origin.
const ADMIN_BYPASSES: &[&str] = &[
    "/admin",
    "//admin",
    "///admin/x",
    "/x/../admin",
    "/./admin",
    "/%61dmin",
    "/x/%2e%2e/admin",
    "/x/..;/admin",
    "/x/..;jsessionid=1/admin",
    "/.;/admin",
    "/;x/admin",
    "/admin;x",
    "/;/admin",
    "/x/..%2Fadmin",
    "/x/..%2fadmin",
    "/x/..%5Cadmin",
    "/x\\..\\admin",
    "/%2Fadmin",
    "/%5Cadmin",
    "/x/%2e%2e%2fadmin",
    "/%+1/../admin",
];

async fn admin_is_unreachable(policy: PathPolicy) {
    let s = setup(policy).await;
    for (i, path) in ADMIN_BYPASSES.iter().enumerate() {
        let text = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nX-Case: {i}\r\n\r\n");
        let reply = raw_exchange(s.edge.http, text.as_bytes()).await;
        let status = reply.as_ref().map(|r| r.status);
        assert!(
            matches!(status, Some(400) | Some(403)),
            "{path} ({policy:?}) was answered {status:?}"
        );
    }
    // The only thing the origin ever saw is the control request below.
    canary(&s, 0).await;
    let events = s.origin.events();
    assert_eq!(events.len(), 1, "the origin saw {events:#?}");
    s.conn.stop().await;
}

#[tokio::test]
async fn an_admin_rule_cannot_be_bypassed_by_path_spelling() {
    admin_is_unreachable(PathPolicy::default()).await;
    admin_is_unreachable(PathPolicy {
        ambiguous: Ambiguous::Normalize,
        merge_slashes: true,
    })
    .await;
}

#[tokio::test]
async fn the_origin_receives_the_path_the_rules_matched() {
    let s = setup(PathPolicy {
        ambiguous: Ambiguous::Normalize,
        merge_slashes: true,
    })
    .await;
    let cases = [
        ("/a//b/./c/../d", "/a/b/d"),
        ("/a%2Fb", "/a/b"),
        ("/x\\y", "/x/y"),
        ("/a/..;/q?x=/../y", "/q?x=/../y"),
        ("/%7Euser/%41", "/~user/A"),
    ];
    for (sent, want) in cases {
        let text = format!("GET {sent} HTTP/1.1\r\nHost: app.test\r\n\r\n");
        let reply = raw_exchange(s.edge.http, text.as_bytes()).await.unwrap();
        assert_eq!(reply.status, 200, "{sent}");
        s.origin.wait_for(want).await;
    }
    // With the default policy the same ambiguous forms are refused.
    let strict = setup(PathPolicy::default()).await;
    for sent in ["/a%2Fb", "/x\\y", "/a/..;/q", "/%+1"] {
        let text = format!("GET {sent} HTTP/1.1\r\nHost: app.test\r\n\r\n");
        let reply = raw_exchange(strict.edge.http, text.as_bytes()).await;
        assert_eq!(reply.map(|r| r.status), Some(400), "{sent}");
    }
    assert!(strict.origin.events().is_empty());
    s.conn.stop().await;
    strict.conn.stop().await;
}

#[tokio::test]
async fn an_oversized_response_head_is_a_502_and_an_origin_protocol_error() {
    let (logs, _guard) = capture_logs();
    let big = "x".repeat(70 * 1024);
    let origin = start_origin(move |_req| {
        let big = big.clone();
        async move {
            let mut resp = http::Response::new(sluice::relay::full("body"));
            resp.headers_mut()
                .insert("x-big", http::HeaderValue::from_str(&big).unwrap());
            resp
        }
    })
    .await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("web", origin)], vec![]);
    cfg.admin_listen = Some(loopback());
    let conn = start_connector(cfg).await;
    conn.registered(1).await;
    let reply = get(edge.http, "app.test", "/big").await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    let metrics = get(conn.admin.unwrap(), "admin", "/metrics").await.text();
    assert!(
        metrics.contains(r#"origin_errors_total{origin="web",kind="protocol"} 1"#),
        "{metrics}"
    );
    logs.wait_for("status=502").await;
    assert!(!logs.text().contains("status=499"), "{}", logs.text());
    conn.stop().await;
}
