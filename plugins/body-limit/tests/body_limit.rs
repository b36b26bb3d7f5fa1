//! body-limit on the SDK's test host.

use body_limit::BodyLimit;
use sluice_sdk::testing::{self, BodyOutcome};
use sluice_sdk::{Plugin, Request};

fn plugin(config: &str) -> BodyLimit {
    sluice_sdk::load(config.as_bytes()).unwrap()
}

#[test]
fn an_announced_length_over_the_cap_is_refused_before_the_body() {
    let p = plugin(r#"{"max-bytes": 1000}"#);
    let big = Request::new("POST", "https://app.test/up").with_header("content-length", "1001");
    assert_eq!(p.on_request(&big).respond.map(|r| r.status), Some(413));
    let ok = Request::new("POST", "https://app.test/up").with_header("content-length", "1000");
    assert_eq!(p.on_request(&ok).respond, None);
}

#[test]
fn a_streamed_body_is_counted_across_pieces_and_stopped_past_the_cap() {
    let p = plugin(r#"{"max-bytes": 1000}"#);
    testing::reset();
    let req = Request::new("POST", "https://app.test/up");
    let piece = [b'x'; 400];
    let under = testing::run_body(&[&piece, &piece], |c, end| p.on_request_body(&req, c, end));
    assert_eq!(under, BodyOutcome::Passed(vec![b'x'; 800]));
    let over = testing::run_body(&[&piece, &piece, &piece], |c, end| {
        p.on_request_body(&req, c, end)
    });
    match over {
        BodyOutcome::Rejected(r) => assert_eq!(r.status, 413),
        other => panic!("passed: {other:?}"),
    }
    assert_eq!(testing::events()[0].get("bytes"), Some("1200"));
}

#[test]
fn methods_limit_where_the_cap_applies() {
    let p = plugin(r#"{"max-bytes": 10, "methods": ["put"]}"#);
    let post = Request::new("POST", "https://app.test/up");
    let out = testing::run_body(&[&[0u8; 100]], |c, end| p.on_request_body(&post, c, end));
    assert_eq!(out, BodyOutcome::Passed(vec![0; 100]));
    let put = Request::new("PUT", "https://app.test/up");
    let out = testing::run_body(&[&[0u8; 100]], |c, end| p.on_request_body(&put, c, end));
    assert!(matches!(out, BodyOutcome::Rejected(_)));
}
