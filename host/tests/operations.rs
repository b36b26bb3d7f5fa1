//! Operations: graceful drain of a connector and graceful shutdown of an edge.

mod support;

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use support::*;
use tokio::sync::mpsc;

/// An origin named `name`: `/slow` answers after `delay` (announcing itself on `started`
/// first), anything else at once; the body is the origin's name.
async fn named_origin(name: &'static str, delay: Duration, started: mpsc::UnboundedSender<&'static str>) -> std::net::SocketAddr {
    start_origin(move |req: Request<Incoming>| {
        let started = started.clone();
        async move {
            if req.uri().path() == "/slow" {
                let _ = started.send(name);
                tokio::time::sleep(delay).await;
            }
            Response::new(sluice::relay::full(name))
        }
    })
    .await
}

#[tokio::test]
async fn draining_connector_finishes_in_flight_and_gets_no_new_requests() {
    let (tx, mut started) = mpsc::unbounded_channel();
    let a = named_origin("a", Duration::from_millis(1500), tx.clone()).await;
    let b = named_origin("b", Duration::from_millis(1500), tx).await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let ca = start_connector(connector_config(&edge, "app", "t", vec![http_origin("a", a)], vec![]));
    let cb = start_connector(connector_config(&edge, "app", "t", vec![http_origin("b", b)], vec![]));
    ca.registered(2).await;
    cb.registered(2).await;

    let http = edge.http;
    let slow = tokio::spawn(async move { get(http, "app.test", "/slow").await });
    let busy = tokio::time::timeout(WAIT, started.recv()).await.unwrap().unwrap();
    let (draining, other, other_name) = if busy == "a" { (ca, cb, "b") } else { (cb, ca, "a") };

    // SIGTERM equivalent: the connector drains but its in-flight request goes on.
    draining.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..6 {
        let reply = get(edge.http, "app.test", "/").await;
        assert_eq!((reply.status, reply.text().as_str()), (200, other_name), "a new request went to the draining connector");
    }
    let reply = tokio::time::timeout(WAIT, slow).await.unwrap().unwrap();
    assert_eq!((reply.status, reply.text().as_str()), (200, busy), "the in-flight request did not complete");
    // Once idle, the draining connector exits well before its 30 s grace period.
    tokio::time::timeout(Duration::from_secs(10), draining.task)
        .await
        .expect("draining connector did not exit after its last request")
        .unwrap();

    // With the last connector draining too, the tunnel is offline.
    other.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply = get(edge.http, "app.test", "/").await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    tokio::time::timeout(WAIT, other.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn edge_shutdown_lets_in_flight_requests_finish() {
    let (tx, mut started) = mpsc::unbounded_channel();
    let o = named_origin("o", Duration::from_millis(800), tx).await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let conn = start_connector(connector_config(&edge, "app", "t", vec![http_origin("o", o)], vec![]));
    conn.registered(1).await;

    let http = edge.http;
    let slow = tokio::spawn(async move { get(http, "app.test", "/slow").await });
    tokio::time::timeout(WAIT, started.recv()).await.unwrap().unwrap();
    edge.shutdown.cancel();
    let reply = tokio::time::timeout(WAIT, slow).await.unwrap().unwrap();
    assert_eq!((reply.status, reply.text().as_str()), (200, "o"));
    tokio::time::timeout(WAIT, edge.task).await.expect("edge did not stop").unwrap();
    assert!(tokio::net::TcpStream::connect(http).await.is_err(), "the edge still accepts clients");
    conn.stop().await;
}

#[tokio::test]
async fn tunnel_new_creates_a_token_the_edge_accepts() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["tunnel", "new", "shop", "--hostname", "shop.test"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout.lines().find(|l| !l.starts_with('#') && !l.is_empty()).unwrap().to_string();
    let block = &stdout[stdout.find("[[tunnel]]").unwrap()..];
    assert!(!block.contains(&token), "the edge block must not hold the token");

    // Route: the block goes into an edge file as printed.
    let dir = std::env::temp_dir().join(format!("sluice-tunnel-new-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("edge.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("edge.key"), ck.key_pair.serialize_pem()).unwrap();
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[connectors]\nlisten = \"127.0.0.1:0\"\ncert = \"edge.crt\"\nkey = \"edge.key\"\n\n{block}"
    );
    let cfg = sluice::config::EdgeConfig::parse(&text, &dir.join("edge.toml")).unwrap();
    let identity = cfg.quic_identity.clone();
    let edge = sluice::edge::Edge::bind(cfg).await.unwrap();
    let handle = EdgeHandle {
        http: edge.http_addr().unwrap(),
        quic: edge.quic_addr(),
        https: None,
        identity,
        shutdown: tokio_util::sync::CancellationToken::new(),
        task: tokio::spawn(async {}),
    };
    let stop = handle.shutdown.clone();
    tokio::spawn(edge.run(stop));

    // Run: a connector with the printed token registers and serves.
    let origin = echo_origin("shop").await;
    let conn = start_connector(connector_config(&handle, "shop", &token, vec![http_origin("shop", origin)], vec![]));
    conn.registered(1).await;
    let reply = get(handle.http, "shop.test", "/").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["origin"], "shop");
    conn.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
