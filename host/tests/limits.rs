//! Bounded resources: everything a hostile client or connector could make the edge or the
//! connector hold has a limit, and a well-behaved client is still served while the limits
//! are being pushed.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::raw::{raw_exchange, RawOrigin};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes the connection; returns how long that took.
async fn closed_within(mut io: impl tokio::io::AsyncRead + Unpin, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the edge kept the connection open");
    start.elapsed()
}

/// An edge with an HTTPS listener (returned with its certificate) and `tweak` applied, and a
/// connector sending everything to `origin`.
async fn https_tunnel(
    origin: SocketAddr,
    tweak: impl FnOnce(&mut sluice::config::EdgeConfig),
) -> (EdgeHandle, ConnectorHandle, sluice::config::TlsIdentity) {
    let public = identity();
    let for_edge = public.clone();
    let (edge, conn) = app_tunnel_with(vec![http_origin("web", origin)], move |c| {
        c.https = Some(sluice::config::HttpsConfig {
            listen: loopback(),
            identity: for_edge,
        });
        tweak(c);
    })
    .await;
    (edge, conn, public)
}

#[tokio::test]
async fn an_http2_connection_that_sends_no_request_is_closed() {
    let origin = echo_origin("web").await;
    let (edge, conn, public) = https_tunnel(origin, |c| {
        c.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    // The preface and SETTINGS, then nothing: no request ever.
    let mut tls = tls_connect(edge.https.unwrap(), &public, b"h2").await;
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(support::raw::h2::frame(
        support::raw::h2::SETTINGS,
        0,
        0,
        &[],
    ));
    tls.write_all(&hello).await.unwrap();
    let took = closed_within(tls, WAIT).await;
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    conn.stop().await;
}

#[tokio::test]
async fn idle_client_connections_are_closed_on_both_protocols() {
    let origin = echo_origin("web").await;
    let (edge, conn, public) = https_tunnel(origin, |c| {
        c.idle_timeout = Duration::from_millis(400);
    })
    .await;

    // HTTP/2: one request, then silence; the connection ends by itself.
    let tls = tls_connect(edge.https.unwrap(), &public, b"h2").await;
    let (mut sender, h2_conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let h2_task = tokio::spawn(h2_conn);
    let req = Request::get("https://app.test/")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let start = Instant::now();
    tokio::time::timeout(WAIT, h2_task)
        .await
        .expect("the idle HTTP/2 connection stayed open")
        .unwrap()
        .ok();
    assert!(start.elapsed() >= Duration::from_millis(300));

    // HTTP/1.1 keep-alive: the same.
    let mut tcp = TcpStream::connect(edge.http).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let took = closed_within(tcp, WAIT).await;
    assert!(took >= Duration::from_millis(300), "closed after {took:?}");
    conn.stop().await;
}

/// A tunnel that admits one request at a time, with a short body idle timeout on both roles,
/// and an HTTPS listener (returned with its certificate) besides HTTP.
async fn one_slot_tunnel(
    origin: SocketAddr,
) -> (EdgeHandle, ConnectorHandle, sluice::config::TlsIdentity) {
    let public = identity();
    let for_edge = public.clone();
    let mut one = tunnel("app", "t", &["app.test"]);
    one.max_concurrent_requests = 1;
    let edge = start_edge(vec![one], move |c| {
        c.https = Some(sluice::config::HttpsConfig {
            listen: loopback(),
            identity: for_edge,
        });
        c.body_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("raw", origin)], vec![]);
    cfg.body_idle_timeout = Duration::from_millis(300);
    let conn = start_connector(cfg).await;
    conn.registered(2).await;
    (edge, conn, public)
}

/// An origin answering every request with `size` bytes.
async fn big_origin(size: usize) -> SocketAddr {
    let big = Bytes::from(vec![b'x'; size]);
    start_origin(move |_req| {
        let big = big.clone();
        async move { http::Response::new(sluice::relay::full(big)) }
    })
    .await
}

/// Sends a plain request, retrying while the tunnel answers 503 (its one slot still held).
async fn served_eventually(edge: SocketAddr, path: &str) -> Duration {
    let start = Instant::now();
    loop {
        let text = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n");
        let status = raw_exchange(edge, text.as_bytes()).await.map(|r| r.status);
        match status {
            Some(200) => return start.elapsed(),
            Some(503) if start.elapsed() < WAIT => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("{path} was answered {other:?} after {:?}", start.elapsed()),
        }
    }
}

#[tokio::test]
async fn a_stalled_request_body_is_aborted_and_frees_its_slot() {
    let origin = RawOrigin::start().await;
    let (edge, conn, _) = one_slot_tunnel(origin.addr).await;
    // Promises 10 bytes, sends 5, then stalls while holding the tunnel's only slot.
    let mut stalled = TcpStream::connect(edge.http).await.unwrap();
    stalled
        .write_all(b"POST /stall HTTP/1.1\r\nHost: app.test\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .unwrap();
    let waited = served_eventually(edge.http, "/after").await;
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    origin.wait_for("/after").await;
    // The stalled request never reached the origin as a complete request.
    assert!(origin
        .events()
        .iter()
        .all(|e| !matches!(e, support::raw::Event::Request(s) if s.target == "/stall")));
    drop(stalled);
    conn.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_frees_its_slot() {
    let (edge, conn, _) = one_slot_tunnel(big_origin(64 << 20).await).await;
    // Reads the head and a little of the 64 MiB body, then never reads again.
    let mut lazy = TcpStream::connect(edge.http).await.unwrap();
    lazy.write_all(b"GET /big HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 1024];
    let _ = lazy.read(&mut first).await.unwrap();
    let waited = served_eventually(edge.http, "/small").await;
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    drop(lazy);
    conn.stop().await;
}

#[tokio::test]
async fn connections_per_client_address_are_capped() {
    let origin = echo_origin("web").await;
    let (edge, conn) = app_tunnel_with(vec![http_origin("web", origin)], |c| {
        c.max_connections_per_client = 4;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut tcp = TcpStream::connect(edge.http).await.unwrap();
        // Proves the connection was taken: a complete exchange on it, kept alive after.
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(tcp.read(&mut buf).await.unwrap() > 0);
        held.push(tcp);
    }
    let fifth = TcpStream::connect(edge.http).await.unwrap();
    closed_within(fifth, WAIT).await;
    // Another address is served as usual.
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut tcp = other.connect(edge.http).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // Closing one frees its place.
    drop(held.pop());
    let reply = answered_once_admitted(edge.http).await;
    assert_eq!(reply.status, 200);
    conn.stop().await;
}

/// Sends `GET /` until the edge takes the connection (it closes those over a cap at accept).
async fn answered_once_admitted(edge: SocketAddr) -> support::raw::RawReply {
    tokio::time::timeout(WAIT, async {
        loop {
            match raw_exchange(edge, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await {
                Some(r) => return r,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("the edge never took a connection again")
}

/// Registers a raw QUIC connection for tunnel `app` with token `t`.
async fn raw_registration(edge: &EdgeHandle) -> (quinn::Endpoint, RawRegistration) {
    let ep = raw_quic_client(edge, sluice::proto::ALPN);
    let reg = raw_register(&ep, edge, "app", "t").await;
    assert!(reg.registered(), "{:?}", reg.answer);
    (ep, reg)
}

#[tokio::test]
async fn a_connector_may_open_only_its_control_stream() {
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let (_ep, reg) = raw_registration(&edge).await;
    // No credit for a second stream: opening one waits (and would hold nothing at the edge).
    let second = tokio::time::timeout(Duration::from_millis(500), reg.conn.open_bi()).await;
    assert!(
        second.is_err(),
        "the edge granted a connector a second stream"
    );
    edge.shutdown.cancel();
}

#[tokio::test]
async fn unregistered_handshakes_are_capped() {
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |c| {
        c.max_handshakes = 2;
    })
    .await;
    let ep = raw_quic_client(&edge, sluice::proto::ALPN);
    // Two connections that never register hold both places.
    let a = ep.connect(edge.quic, "localhost").unwrap().await.unwrap();
    let b = ep.connect(edge.quic, "localhost").unwrap().await.unwrap();
    let third = ep.connect(edge.quic, "localhost").unwrap().await;
    assert!(
        third.is_err(),
        "a third unregistered connection was accepted"
    );
    // Once they go, a connector registers as usual.
    a.close(0u32.into(), b"");
    b.close(0u32.into(), b"");
    let deadline = Instant::now() + WAIT;
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(2), raw_registration(&edge)).await;
        if attempt.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "registration never possible again"
        );
    }
    edge.shutdown.cancel();
}

#[tokio::test]
async fn a_tunnel_takes_at_most_max_connections() {
    let (logs, _guard) = capture_logs();
    let origin = echo_origin("web").await;
    let mut limited = tunnel("app", "t", &["app.test"]);
    limited.max_connections = 2;
    let edge = start_edge(vec![limited], |_| {}).await;
    let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("web", origin)], vec![]);
    cfg.ha_connections = 3;
    let conn = start_connector(cfg).await;
    conn.registered(2).await;
    logs.wait_for("already has its maximum of 2 connections")
        .await;
    assert_eq!(conn.state.registered(), 2);
    assert_eq!(get(edge.http, "app.test", "/").await.status, 200);
    conn.stop().await;
}

/// Trickles `bytes` one byte per `every`, until `stop` (or the edge closes the connection).
async fn trickle(
    edge: SocketAddr,
    bytes: &'static [u8],
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
    closed: Arc<AtomicUsize>,
) {
    let Ok(mut tcp) = TcpStream::connect(edge).await else {
        closed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    for b in bytes.iter().cycle() {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if tcp.write_all(&[*b]).await.is_err() {
            closed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_well_behaved_client_is_served_while_2000_clients_trickle() {
    let origin = echo_origin("web").await;
    let (edge, conn) = app_tunnel_with(vec![http_origin("web", origin)], |c| {
        c.header_read_timeout = Duration::from_secs(2);
    })
    .await;
    let before = rss_kib();

    // Half trickle a request head, half a request body (under any idle timeout: one byte a
    // second), all from 127.0.0.1.
    let stop = tokio_util::sync::CancellationToken::new();
    let closed = Arc::new(AtomicUsize::new(0));
    let head: &'static [u8] = b"GET /slow HTTP/1.1\r\nHost: app.test\r\nX-Pad: ";
    let body: &'static [u8] =
        b"POST /slow HTTP/1.1\r\nHost: app.test\r\nContent-Length: 100000000\r\n\r\nxxxxxxxxxxxxxxxxxxxx";
    let mut tricklers = Vec::new();
    for i in 0..2000 {
        let bytes = if i % 2 == 0 { head } else { body };
        let every = if i % 2 == 0 {
            Duration::from_millis(500)
        } else {
            Duration::from_millis(20)
        };
        tricklers.push(tokio::spawn(trickle(
            edge.http,
            bytes,
            every,
            stop.clone(),
            closed.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A client on another address, served while they trickle.
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let start = Instant::now();
        let tcp = socket.connect(edge.http).await.unwrap();
        let (mut sender, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(c);
        let req = Request::get("/ok")
            .header("host", "app.test")
            .body(Full::<Bytes>::default())
            .unwrap();
        let resp = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .expect("the well-behaved client waited too long")
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        latencies.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    latencies.sort();
    let during = rss_kib();
    let refused = closed.load(Ordering::Relaxed);
    stop.cancel();
    for t in tricklers {
        let _ = t.await;
    }
    // Most were turned away at accept (max-connections-per-client); the head tricklers that
    // got in were cut off by header-read-timeout.
    assert!(
        refused >= 1500,
        "only {refused} trickling connections were closed"
    );
    eprintln!(
        "2000 tricklers: {refused} closed by the edge; well-behaved client median {:?}, max {:?}; \
         RSS of this test process (edge, connector, origin and all clients) {before} KiB before, \
         {during} KiB during",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    conn.stop().await;
}

#[tokio::test]
async fn a_silent_upgraded_connection_is_closed_and_keeps_its_client_place_until_then() {
    // An origin that accepts the upgrade and then says nothing, ever.
    let origin = start_origin(|mut req: Request<hyper::body::Incoming>| async move {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(io) = upgrade.await {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(io);
            }
        });
        let mut resp = http::Response::new(sluice::relay::empty());
        *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert("connection", http::HeaderValue::from_static("upgrade"));
        resp.headers_mut()
            .insert("upgrade", http::HeaderValue::from_static("websocket"));
        resp
    })
    .await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |c| {
        c.max_connections_per_client = 1;
        c.body_idle_timeout = Duration::from_millis(500);
    })
    .await;
    let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("ws", origin)], vec![]);
    cfg.body_idle_timeout = Duration::from_millis(500);
    let conn = start_connector(cfg).await;
    conn.registered(2).await;

    let mut ws = TcpStream::connect(edge.http).await.unwrap();
    ws.write_all(b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    ws.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    // While upgraded, the connection still holds this address's only place.
    let second = TcpStream::connect(edge.http).await.unwrap();
    closed_within(second, WAIT).await;
    // Silent both ways: closed after the idle timeout, and the place is free again.
    let took = closed_within(ws, WAIT).await;
    assert!(took >= Duration::from_millis(400), "closed after {took:?}");
    let reply = answered_once_admitted(edge.http).await;
    assert_eq!(
        reply.status, 101,
        "the origin upgrades every request; the edge served this one"
    );
    conn.stop().await;
}

#[tokio::test]
async fn an_http2_client_that_withholds_flow_control_credit_is_cut_off() {
    let (edge, conn, public) = one_slot_tunnel(big_origin(4 << 20).await).await;

    // Reads every byte the edge sends (the socket never fills) but never grants more than
    // the initial 64 KiB window: hyper stops taking the response, the socket stays writable.
    use support::raw::h2;
    let mut tls = tls_connect(edge.https.unwrap(), &public, b"h2").await;
    let block = h2::header_block(&[
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"app.test"),
        (b":path", b"/big"),
    ]);
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2::frame(h2::SETTINGS, 0, 0, &[]));
    hello.extend(h2::frame(
        h2::HEADERS,
        h2::END_HEADERS | h2::END_STREAM,
        1,
        &block,
    ));
    tls.write_all(&hello).await.unwrap();
    let took = closed_within(tls, WAIT).await;
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    // Its request no longer holds the tunnel's only slot.
    let reply = get(edge.http, "app.test", "/next").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    conn.stop().await;
}
