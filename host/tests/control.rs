//! Garbage on the QUIC control stream closes only the offending connection, with a clear log
//! line, while the edge keeps serving registered connectors.

mod support;

use support::*;

/// Opens a control stream, writes `bytes`, finishes, and returns how the edge closed the
/// connection.
async fn send_garbage(edge: &EdgeHandle, bytes: &[u8]) -> quinn::ConnectionError {
    let ep = raw_quic_client(edge, sluice::proto::ALPN);
    let conn = ep.connect(edge.quic, "localhost").unwrap().await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("edge kept a bad connection open")
}

fn closed_with(err: &quinn::ConnectionError, code: u32) -> bool {
    matches!(err, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(code))
}

#[tokio::test]
async fn bad_control_streams_close_only_their_connection() {
    let (logs, _guard) = capture_logs();
    let origin = echo_origin("web").await;
    let (edge, good) = app_tunnel(vec![http_origin("web", origin)]).await;

    // Wrong ALPN: the handshake itself fails.
    let ep = raw_quic_client(&edge, b"http/1.1");
    let attempt = ep.connect(edge.quic, "localhost").unwrap().await;
    assert!(
        attempt.is_err(),
        "a connection with the wrong ALPN was accepted"
    );
    logs.wait_for("connector handshake failed").await;

    // Truncated frame: a length prefix promising more than arrives.
    let err = send_garbage(&edge, &[0, 0, 0, 50, b'{']).await;
    assert!(
        closed_with(&err, sluice::proto::code::CLOSE_PROTOCOL),
        "{err}"
    );
    logs.wait_for("stream ended inside a frame").await;

    // Oversized length.
    let err = send_garbage(&edge, &u32::MAX.to_be_bytes()).await;
    assert!(
        closed_with(&err, sluice::proto::code::CLOSE_PROTOCOL),
        "{err}"
    );
    logs.wait_for("exceeds the 65536-byte limit").await;

    // Not JSON at all.
    let err = send_garbage(&edge, &[0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef]).await;
    assert!(
        closed_with(&err, sluice::proto::code::CLOSE_PROTOCOL),
        "{err}"
    );
    logs.wait_for("malformed frame").await;

    // Unknown protocol version: refused with a reason.
    let frame = sluice::proto::encode(&serde_json::json!({
        "type": "register", "version": 99, "tunnel": "app", "token": "t", "connector_id": "future", "conn_index": 0
    }))
    .unwrap();
    let err = send_garbage(&edge, &frame).await;
    assert!(
        closed_with(&err, sluice::proto::code::CLOSE_REJECTED),
        "{err}"
    );
    logs.wait_for("protocol version 99 is not supported").await;

    // An unknown message kind instead of register.
    let frame =
        sluice::proto::encode(&serde_json::json!({"type": "hello-from-the-future"})).unwrap();
    let err = send_garbage(&edge, &frame).await;
    assert!(
        closed_with(&err, sluice::proto::code::CLOSE_REJECTED),
        "{err}"
    );
    logs.wait_for("expected register as the first control message")
        .await;

    // The registered connector was never disturbed.
    assert_eq!(good.state.registered(), 2);
    let reply = get(edge.http, "app.test", "/").await;
    assert_eq!(reply.status, 200);
    good.stop().await;
}

/// A connector that offers the binary head encoding gets it, and its request streams carry
/// binary heads both ways; one that offers only encodings the edge does not know keeps JSON.
#[tokio::test]
async fn head_encodings_are_negotiated_at_registration() {
    use sluice::proto::{Control, HeadCodec, ResponseHead, ResponseSource, BINARY_HEADS};
    for (offer, codec) in [
        (vec![BINARY_HEADS], HeadCodec::Binary),
        (vec!["binary-9"], HeadCodec::Json),
    ] {
        let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
        let ep = raw_quic_client(&edge, sluice::proto::ALPN);
        let reg = raw_register_offering(&ep, &edge, "app", "t", &offer).await;
        let Ok(Control::Registered(ok)) = &reg.answer else {
            panic!("{:?}", reg.answer);
        };
        assert_eq!(HeadCodec::chosen(ok.heads.as_deref()), codec, "{offer:?}");
        let http = edge.http;
        let request = tokio::spawn(async move { get(http, "app.test", "/x?y").await });
        let (mut rs, mut rr) = tokio::time::timeout(WAIT, reg.conn.accept_bi())
            .await
            .unwrap()
            .unwrap();
        let payload = sluice::proto::io::read_payload(&mut rr).await.unwrap();
        let head = codec.decode_request(&payload.into()).unwrap();
        assert_eq!(
            (head.authority.as_str(), head.path.as_str()),
            ("app.test", "/x?y")
        );
        assert!(head.empty_body);
        let resp = ResponseHead {
            status: 203,
            headers: vec![("content-length".into(), "2".into())].into(),
            source: ResponseSource::Origin,
        };
        rs.write_all(&codec.encode_response(&resp).unwrap())
            .await
            .unwrap();
        rs.write_all(b"ok").await.unwrap();
        rs.finish().unwrap();
        let reply = request.await.unwrap();
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (203, "ok"),
            "{offer:?}"
        );
    }
}

#[tokio::test]
async fn unknown_control_messages_after_registration_are_ignored() {
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let ep = raw_quic_client(&edge, sluice::proto::ALPN);
    let RawRegistration {
        conn,
        mut send,
        mut recv,
        answer,
    } = raw_register(&ep, &edge, "app", "t").await;
    assert!(
        matches!(answer, Ok(sluice::proto::Control::Registered(_))),
        "{answer:?}"
    );
    let future = sluice::proto::encode(&serde_json::json!({"type": "stats", "rtt": 3})).unwrap();
    send.write_all(&future).await.unwrap();
    // The raw connection is a registered route now: a request reaches it as a stream.
    let http = edge.http;
    let request = tokio::spawn(async move { get(http, "app.test", "/").await });
    let (mut rs, mut rr) = tokio::time::timeout(WAIT, conn.accept_bi())
        .await
        .unwrap()
        .unwrap();
    let head: sluice::proto::RequestHead = sluice::proto::io::read_frame(&mut rr).await.unwrap();
    assert_eq!(head.authority, "app.test");
    let resp = sluice::proto::ResponseHead {
        status: 203,
        headers: vec![("content-length".into(), "2".into())].into(),
        source: sluice::proto::ResponseSource::Origin,
    };
    sluice::proto::io::write_frame(&mut rs, &resp)
        .await
        .unwrap();
    rs.write_all(b"ok").await.unwrap();
    rs.finish().unwrap();
    let reply = request.await.unwrap();
    assert_eq!(reply.status, 203);
    assert_eq!(reply.text(), "ok");
    // The edge read past the unknown message: the next one, a drain, is acknowledged.
    sluice::proto::io::write_frame(&mut send, &sluice::proto::Control::Drain)
        .await
        .unwrap();
    let ack: sluice::proto::Control =
        tokio::time::timeout(WAIT, sluice::proto::io::read_frame(&mut recv))
            .await
            .expect("no answer to the drain")
            .unwrap();
    assert_eq!(ack, sluice::proto::Control::DrainAck);
    assert!(conn.close_reason().is_none());
}

#[tokio::test]
async fn a_connection_that_grants_no_streams_is_skipped() {
    let (logs, _guard) = capture_logs();
    let origin = echo_origin("web").await;
    let (edge, good) = app_tunnel(vec![http_origin("web", origin)]).await;

    // A registered connection that never lets the edge open a request stream.
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(0u32.into());
    let ep = raw_quic_client_with(&edge, sluice::proto::ALPN, transport);
    let stingy = raw_register(&ep, &edge, "app", "t").await;
    assert!(stingy.registered(), "{:?}", stingy.answer);

    // Every request still succeeds: a stuck open is abandoned and another connection tried.
    for _ in 0..3 {
        let reply = get(edge.http, "app.test", "/").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert!(
        logs.text()
            .contains("could not open a stream, trying another connection"),
        "the retry path was not taken:\n{}",
        logs.text()
    );
    good.stop().await;
}
