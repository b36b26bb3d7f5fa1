//! End-to-end behaviour of the tunnel: routing, headers, errors, HA and reconnects.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn trusted_front_proxy_keeps_forwarded_for() {
    let origin = echo_origin("web").await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |c| {
        c.trust_forwarded_for = true
    })
    .await;
    let conn = start_connector(connector_config(
        &edge,
        "app",
        "t",
        vec![http_origin("web", origin)],
        vec![],
    ))
    .await;
    conn.registered(1).await;
    let req = Request::get("/")
        .header("host", "app.test")
        .header("x-forwarded-for", "203.0.113.9")
        .body(Full::default())
        .unwrap();
    let reply = send(edge.http, req).await;
    assert_eq!(
        reply.echoed("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    conn.stop().await;
}

#[tokio::test]
async fn head_size_limit_and_header_read_timeout() {
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |c| {
        c.max_header_size = 16 * 1024;
        c.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let big = "x".repeat(32 * 1024);
    let reply = send(
        edge.http,
        Request::get("/")
            .header("host", "app.test")
            .header("x-big", big)
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 431);

    // A client that never finishes its head is cut off.
    let mut slow = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: app.test\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection of a slow client was not closed");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

/// Binds an edge on an address a stopped edge just released (the socket may take a moment).
async fn bind_retrying(cfg: sluice::config::EdgeConfig) -> sluice::edge::Edge {
    let mut attempts = 0;
    loop {
        match sluice::edge::Edge::bind(cfg.clone()).await {
            Ok(e) => return e,
            Err(_) if attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot rebind the edge: {e}"),
        }
    }
}

#[tokio::test]
async fn connector_redials_until_the_edge_appears() {
    // Reserve a UDP port for an edge that starts later.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let origin = echo_origin("web").await;
    let identity = identity();
    let mut cfg = sluice::config::ConnectorConfig::new("app", sluice::secret::Secret::new("t"));
    cfg.edges = vec![format!("127.0.0.1:{port}")];
    cfg.edge_server_name = Some("localhost".into());
    cfg.edge_ca = identity.chain.clone();
    cfg.origins = vec![http_origin("web", origin)];
    cfg.ingress = vec![rule(None, None, "web")];
    cfg.backoff.initial = Duration::from_millis(50);
    cfg.backoff.max = Duration::from_millis(400);
    cfg.ha_connections = 1;
    // First an edge the connector cannot trust holds the address: every dial fails fast.
    let (logs, _guard) = capture_logs();
    let mut impostor = sluice::config::EdgeConfig::new(
        format!("127.0.0.1:{port}").parse().unwrap(),
        support::identity(),
    );
    impostor.http_listen = Some(loopback());
    let impostor = sluice::edge::Edge::bind(impostor).await.unwrap();
    let impostor_stop = tokio_util::sync::CancellationToken::new();
    let impostor_task = tokio::spawn(impostor.run(impostor_stop.clone()));
    let conn = start_connector(cfg).await;
    tokio::time::timeout(WAIT, async {
        while logs.text().matches("connection to the edge failed").count() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the connector did not keep dialling");
    assert_eq!(conn.state.registered(), 0);
    impostor_stop.cancel();
    impostor_task.await.unwrap();

    let mut ecfg = sluice::config::EdgeConfig::new(
        format!("127.0.0.1:{port}").parse().unwrap(),
        identity.clone(),
    );
    ecfg.http_listen = Some(loopback());
    ecfg.tunnels = vec![tunnel("app", "t", &["app.test"])];
    let edge = bind_retrying(ecfg).await;
    let http = edge.http_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(edge.run(stop.clone()));
    conn.registered(1).await;
    assert_eq!(get(http, "app.test", "/").await.status, 200);

    // The edge goes away and comes back on the same address: the connector re-dials.
    stop.cancel();
    task.await.unwrap();
    tokio::time::timeout(WAIT, async {
        while conn.state.registered() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("connector did not notice the edge closing");
    let mut ecfg =
        sluice::config::EdgeConfig::new(format!("127.0.0.1:{port}").parse().unwrap(), identity);
    ecfg.http_listen = Some(loopback());
    ecfg.tunnels = vec![tunnel("app", "t", &["app.test"])];
    let edge = bind_retrying(ecfg).await;
    let http = edge.http_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(edge.run(stop.clone()));
    conn.registered(1).await;
    assert_eq!(get(http, "app.test", "/").await.status, 200);
    stop.cancel();
    conn.stop().await;
}

/// Whether the TCP socket of this process connected to `peer` has TCP_NODELAY set. The edge
/// and connector run in this test process, so their sockets are among our descriptors.
fn nodelay_towards(peer: std::net::SocketAddr) -> Option<bool> {
    use std::os::fd::BorrowedFd;
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: the descriptor is open for the duration of this loop iteration (it was listed
        // just now and this test does not close descriptors concurrently); it is only borrowed
        // to read socket options, never closed.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&borrowed);
        let Ok(addr) = sock.peer_addr() else { continue };
        if addr.as_socket() == Some(peer) {
            return sock.tcp_nodelay().ok();
        }
    }
    None
}

#[tokio::test]
async fn client_and_origin_sockets_use_tcp_nodelay() {
    // An origin that holds the request open, so both sockets exist while we look.
    let origin = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let origin_addr = origin.local_addr().unwrap();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let hold = tokio::spawn(async move {
        let (mut s, _) = origin.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        seen_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    });
    let (edge, conn) = app_tunnel(vec![http_origin("o", origin_addr)]).await;

    let mut client = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: app.test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(WAIT, seen_rx).await.unwrap().unwrap();
    let client_addr = client.local_addr().unwrap();
    assert_eq!(
        nodelay_towards(client_addr),
        Some(true),
        "the edge's client socket"
    );
    assert_eq!(
        nodelay_towards(origin_addr),
        Some(true),
        "the connector's origin socket"
    );
    hold.abort();
    drop(client);
    conn.stop().await;
}

over_both_transports! {
    #[tokio::test]
    async fn request_reaches_origin_with_forwarding_headers() {
        let origin = echo_origin("web").await;
        let edge = start_edge(vec![tunnel("app", "s3cret", &["app.test"])], |_| {}).await;
        let conn = start_connector(connector_config(
            &edge,
            "app",
            "s3cret",
            vec![http_origin("web", origin)],
            vec![],
        ))
        .await;
        conn.registered(2).await;

        let reply = get(edge.http, "App.Test:8080", "/hello?x=1").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let json = reply.json();
        assert_eq!(json["path"], "/hello?x=1");
        // The authority the edge validated and routed by, in its canonical (lower-case) spelling.
        assert_eq!(reply.echoed("host").as_deref(), Some("app.test:8080"));
        assert_eq!(
            reply.echoed("x-forwarded-for").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(reply.echoed("x-forwarded-proto").as_deref(), Some("http"));
        assert_eq!(
            reply.echoed("x-forwarded-host").as_deref(),
            Some("app.test:8080")
        );
        let id = reply
            .echoed("sluice-request-id")
            .expect("request id sent to origin");
        assert_eq!(id.len(), 32);
        assert_eq!(reply.headers["sluice-request-id"], id.as_str());
        conn.stop().await;
    }

    #[tokio::test]
    async fn unknown_host_is_404_and_offline_tunnel_is_502() {
        let edge = start_edge(vec![tunnel("app", "s3cret", &["app.test"])], |_| {}).await;
        let reply = get(edge.http, "nope.test", "/").await;
        assert_eq!(reply.status, 404);
        assert_eq!(reply.text(), "sluice: no tunnel serves host nope.test\n");
        let reply = get(edge.http, "app.test", "/").await;
        assert_eq!(reply.status, 502);
        assert_eq!(
            reply.text(),
            "sluice: tunnel app is offline (no connector is connected)\n"
        );
    }

    #[tokio::test]
    async fn client_cannot_forge_request_id_or_forwarded_for() {
        let origin = echo_origin("web").await;
        let (edge, conn) = app_tunnel(vec![http_origin("web", origin)]).await;
        let req = Request::get("/")
            .header("host", "app.test")
            .header("sluice-request-id", "forged")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-host", "evil.test")
            .header("x-forwarded-proto", "https")
            .body(Full::default())
            .unwrap();
        let reply = send(edge.http, req).await;
        let json = reply.json();
        assert_eq!(
            json["headers"]["sluice-request-id"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_ne!(reply.echoed("sluice-request-id").as_deref(), Some("forged"));
        assert_eq!(
            json["headers"]["x-forwarded-for"],
            serde_json::json!(["127.0.0.1"])
        );
        assert_eq!(
            reply.echoed("x-forwarded-host").as_deref(),
            Some("app.test")
        );
        assert_eq!(reply.echoed("x-forwarded-proto").as_deref(), Some("http"));
        conn.stop().await;
    }

    #[tokio::test]
    async fn hop_by_hop_headers_are_stripped() {
        let origin = echo_origin("web").await;
        let (edge, conn) = app_tunnel(vec![http_origin("web", origin)]).await;
        let req = Request::get("/")
            .header("host", "app.test")
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .header("te", "trailers")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("x-end-to-end", "kept")
            .body(Full::default())
            .unwrap();
        let reply = send(edge.http, req).await;
        let json = reply.json();
        for h in ["x-hop", "te", "proxy-authorization"] {
            assert!(json["headers"].get(h).is_none(), "{h} reached the origin");
        }
        assert_eq!(reply.echoed("x-end-to-end").as_deref(), Some("kept"));
        conn.stop().await;
    }

    #[tokio::test]
    async fn tunnels_are_isolated_whatever_the_client_sends() {
        let (origin_a, origin_b) = (echo_origin("a").await, echo_origin("b").await);
        let edge = start_edge(
            vec![
                tunnel("ta", "token-a", &["a.test"]),
                tunnel("tb", "token-b", &["b.test", "*.b.test"]),
            ],
            |_| {},
        )
        .await;
        let ca = start_connector(connector_config(
            &edge,
            "ta",
            "token-a",
            vec![http_origin("a", origin_a)],
            vec![],
        ))
        .await;
        let cb = start_connector(connector_config(
            &edge,
            "tb",
            "token-b",
            vec![http_origin("b", origin_b)],
            vec![],
        ))
        .await;
        ca.registered(2).await;
        cb.registered(2).await;

        // Every way of naming b.test must land on tunnel B's origin only.
        let cases: Vec<Request<Full<Bytes>>> = vec![
            Request::get("/")
                .header("host", "b.test")
                .body(Full::default())
                .unwrap(),
            Request::get("/")
                .header("host", "B.TEST:443")
                .body(Full::default())
                .unwrap(),
            Request::get("/")
                .header("host", "x.b.test")
                .body(Full::default())
                .unwrap(),
            Request::get("/../a.test/")
                .header("host", "b.test")
                .body(Full::default())
                .unwrap(),
        ];
        for req in cases {
            let desc = format!("{:?} {:?}", req.uri(), req.headers().get("host"));
            let reply = send(edge.http, req).await;
            assert_eq!(reply.status, 200, "{desc}: {}", reply.text());
            assert_eq!(reply.json()["origin"], "b", "{desc}");
        }
        let reply = get(edge.http, "a.test", "/").await;
        assert_eq!(reply.json()["origin"], "a");
        // A request target naming one tunnel and a Host naming another is refused, not resolved.
        let mixed = Request::get("http://b.test/")
            .header("host", "a.test")
            .body(Full::default())
            .unwrap();
        assert_eq!(send(edge.http, mixed).await.status, 400);
        // A name that only looks like B's does not reach B.
        assert_eq!(get(edge.http, "ab.test", "/").await.status, 404);
        ca.stop().await;
        cb.stop().await;
    }

    #[tokio::test]
    async fn wrong_or_missing_token_is_rejected_without_logging_it() {
        let (logs, _guard) = capture_logs();
        let edge = start_edge(
            vec![tunnel("app", "right-token-123", &["app.test"])],
            |_| {},
        )
        .await;
        let conn = start_connector(connector_config(
            &edge,
            "app",
            "wrong-token-456",
            vec![http_origin("x", loopback())],
            vec![],
        ))
        .await;
        logs.wait_for("registration refused").await;
        logs.wait_for("the edge refused the registration").await;
        assert_eq!(conn.state.registered(), 0);
        assert_eq!(get(edge.http, "app.test", "/").await.status, 502);
        conn.stop().await;

        // Unknown tunnel and an empty token, sent by hand.
        let client = raw_quic_client(&edge, sluice::proto::ALPN);
        let reply = format!(
            "{:?}",
            raw_register(&client, &edge, "no-such-tunnel", "")
                .await
                .answer
        );
        assert!(reply.contains("unknown tunnel or wrong token"), "{reply}");

        let text = logs.text();
        let connector_line = text
            .lines()
            .find(|l| l.contains("the edge refused the registration"))
            .expect("connector logged the refusal");
        assert!(
            connector_line.contains("unknown tunnel or wrong token"),
            "the connector must log the edge's reason: {connector_line}"
        );
        assert!(
            !text.contains("wrong-token-456"),
            "token leaked into logs:\n{text}"
        );
        assert!(
            !text.contains("right-token-123"),
            "token leaked into logs:\n{text}"
        );
    }

    #[tokio::test]
    async fn ingress_rules_match_normalised_paths_and_wildcards() {
        let (api, web, wild) = (
            echo_origin("api").await,
            echo_origin("web").await,
            echo_origin("wild").await,
        );
        let edge = start_edge(
            vec![tunnel("app", "t", &["app.test", "*.app.test"])],
            |_| {},
        )
        .await;
        let cfg = connector_config(
            &edge,
            "app",
            "t",
            vec![
                http_origin("api", api),
                http_origin("web", web),
                http_origin("wild", wild),
            ],
            vec![
                rule(Some("app.test"), Some("^/api/"), "api"),
                rule(Some("*.app.test"), None, "wild"),
                rule(None, None, "web"),
            ],
        );
        let conn = start_connector(cfg).await;
        conn.registered(1).await;

        let reply = get(edge.http, "app.test", "/%61pi/./v1/../users?q=%2e%2e").await;
        assert_eq!(reply.json()["origin"], "api");
        assert_eq!(
            reply.json()["path"],
            "/api/users?q=%2e%2e",
            "the origin gets the normalised path"
        );
        assert_eq!(
            get(edge.http, "app.test", "/other").await.json()["origin"],
            "web"
        );
        assert_eq!(
            get(edge.http, "eu.app.test", "/api/x").await.json()["origin"],
            "wild"
        );
        // Dot segments cannot climb out of the rule's prefix into another rule.
        assert_eq!(
            get(edge.http, "app.test", "/api/../other").await.json()["origin"],
            "web"
        );
        conn.stop().await;
    }

    #[tokio::test]
    async fn host_header_override_and_builtin_origins() {
        let web = echo_origin("web").await;
        let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
        let mut web_cfg = http_origin("web", web);
        web_cfg.host_header = Some("internal.local".into());
        let cfg = connector_config(
            &edge,
            "app",
            "t",
            vec![
                web_cfg,
                sluice::config::OriginConfig::new("teapot", sluice::config::OriginTarget::Status(418)),
            ],
            vec![
                rule(None, Some("^/hello"), "hello"),
                rule(None, Some("^/tea"), "teapot"),
                rule(None, None, "web"),
            ],
        );
        let mut cfg = cfg;
        cfg.origins.push(sluice::config::OriginConfig::new(
            "hello",
            sluice::config::OriginTarget::Hello,
        ));
        let conn = start_connector(cfg).await;
        conn.registered(1).await;

        let reply = get(edge.http, "app.test", "/").await;
        assert_eq!(reply.echoed("host").as_deref(), Some("internal.local"));
        assert_eq!(
            reply.echoed("x-forwarded-host").as_deref(),
            Some("app.test")
        );

        let reply = get(edge.http, "app.test", "/hello/world").await;
        assert_eq!(reply.status, 200);
        let json = reply.json();
        assert_eq!(json["method"], "GET");
        assert_eq!(json["path"], "/hello/world");
        assert_eq!(json["headers"]["host"][0], "app.test");

        assert_eq!(get(edge.http, "app.test", "/tea").await.status, 418);
        conn.stop().await;
    }

    #[tokio::test]
    async fn origin_refused_is_502_and_timeout_is_504() {
        // A port with nothing listening.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        // An origin that accepts and never answers.
        let silent = tokio::net::TcpListener::bind(loopback()).await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
        let mut slow = http_origin("slow", silent_addr);
        slow.request_timeout = Duration::from_millis(300);
        let cfg = connector_config(
            &edge,
            "app",
            "t",
            vec![http_origin("down", closed), slow],
            vec![rule(None, Some("^/slow"), "slow"), rule(None, None, "down")],
        );
        let conn = start_connector(cfg).await;
        conn.registered(1).await;

        let reply = get(edge.http, "app.test", "/").await;
        assert_eq!(reply.status, 502);
        // The client learns what failed, never which internal origin (nor its address).
        assert_eq!(
            reply.text(),
            "sluice connector: the origin is unreachable\n"
        );
        let reply = get(edge.http, "app.test", "/slow").await;
        assert_eq!(reply.status, 504);
        assert_eq!(
            reply.text(),
            "sluice connector: the origin did not answer in time\n"
        );
        conn.stop().await;
    }

    #[tokio::test]
    async fn client_abort_cancels_the_origin_request() {
        // A raw origin: reads the request head, never answers, reports when its peer hangs up.
        let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
        let origin = listener.local_addr().unwrap();
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            seen_tx.send(()).unwrap();
            // Wait for EOF: the connector dropped the origin connection.
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let _ = closed_tx.send(());
        });
        let (edge, conn) = app_tunnel(vec![http_origin("o", origin)]).await;

        let mut client = tokio::net::TcpStream::connect(edge.http).await.unwrap();
        client
            .write_all(b"GET /wait HTTP/1.1\r\nhost: app.test\r\n\r\n")
            .await
            .unwrap();
        tokio::time::timeout(WAIT, seen_rx).await.unwrap().unwrap();
        drop(client);
        tokio::time::timeout(WAIT, closed_rx)
            .await
            .expect("origin request was not cancelled after the client left")
            .unwrap();
        conn.stop().await;
    }

    #[tokio::test]
    async fn requests_fail_over_to_the_remaining_connector() {
        let (a, b) = (echo_origin("a").await, echo_origin("b").await);
        let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
        let ca = start_connector(connector_config(
            &edge,
            "app",
            "t",
            vec![http_origin("a", a)],
            vec![],
        ))
        .await;
        let cb = start_connector(connector_config(
            &edge,
            "app",
            "t",
            vec![http_origin("b", b)],
            vec![],
        ))
        .await;
        ca.registered(2).await;
        cb.registered(2).await;
        // Idle connections share the load.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..8 {
            seen.insert(
                get(edge.http, "app.test", "/").await.json()["origin"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        assert_eq!(seen.len(), 2, "both connectors should serve requests");
        // Stopping drains: it returns once the edge acknowledged that nothing more goes to `ca`.
        ca.stop().await;
        for _ in 0..8 {
            let reply = get(edge.http, "app.test", "/").await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            assert_eq!(reply.json()["origin"], "b");
        }
        cb.stop().await;
    }

    #[tokio::test]
    async fn connector_refuses_an_edge_it_cannot_verify() {
        let (logs, _guard) = capture_logs();
        let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
        // No CA for the edge's self-signed certificate: only the system roots.
        let mut cfg = connector_config(
            &edge,
            "app",
            "t",
            vec![http_origin("x", loopback())],
            vec![],
        );
        cfg.edge_ca.clear();
        let conn = start_connector(cfg).await;
        // The failure names the reason: rustls's verdict on the certificate, in the same line.
        logs.wait_for("connection to the edge failed").await;
        let failures = |reason: &str| {
            logs.text()
                .lines()
                .filter(|l| l.contains("connection to the edge failed") && l.contains(reason))
                .count()
        };
        assert!(failures("UnknownIssuer") > 0, "{}", logs.text());
        assert_eq!(conn.state.registered(), 0);
        // And a CA that is trusted but a name that does not match.
        let mut cfg = connector_config(
            &edge,
            "app",
            "t",
            vec![http_origin("x", loopback())],
            vec![],
        );
        cfg.edge_server_name = Some("edge.example.com".into());
        let wrong_name = start_connector(cfg).await;
        logs.wait_for("certificate not valid for name").await;
        assert!(
            failures("certificate not valid for name \"edge.example.com\"") > 0,
            "{}",
            logs.text()
        );
        assert_eq!(wrong_name.state.registered(), 0);
        assert_eq!(get(edge.http, "app.test", "/").await.status, 502);
        conn.stop().await;
        wrong_name.stop().await;
    }

    #[tokio::test]
    async fn origin_that_does_not_accept_in_time_is_504() {
        // A listener whose accept queue is full: further connection attempts get no answer, so
        // connecting times out, all on loopback.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(loopback()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..8 {
            // Some of these never complete; that is the point. Keep whatever connects.
            if let Ok(Ok(s)) = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                fillers.push(s);
            }
        }
        let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
        let mut stuck = http_origin("stuck", addr);
        stuck.connect_timeout = Duration::from_millis(300);
        let conn = start_connector(connector_config(&edge, "app", "t", vec![stuck], vec![])).await;
        conn.registered(1).await;
        let reply = get(edge.http, "app.test", "/").await;
        assert_eq!(reply.status, 504, "{}", reply.text());
        assert_eq!(
            reply.text(),
            "sluice connector: the origin did not answer in time\n"
        );
        drop(listener);
        conn.stop().await;
    }
}
