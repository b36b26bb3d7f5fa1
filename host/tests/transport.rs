//! The TCP transport's own behaviour: `protocol = "auto"` falling back to HTTP/2 when the
//! edge's UDP port drops everything and moving back to QUIC when UDP comes back, and hostile
//! bytes on the edge's TCP listener for connectors. (The tunnel, streaming, drain and plugin
//! suites run over both transports themselves.)

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice::config::TransportChoice;
use sluice::transport::Protocol;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A UDP port in front of an edge's QUIC listener that drops every datagram while closed and
/// relays both ways while open (one client, as a connector has one QUIC socket).
struct UdpGate {
    port: u16,
    open: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpGate {
    async fn start(edge_quic: SocketAddr) -> UdpGate {
        let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = front.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(false));
        let is_open = open.clone();
        let task = tokio::spawn(async move {
            let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
            let mut client = None;
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut up) => {
                        client = Some(from);
                        if is_open.load(Ordering::Relaxed) {
                            let _ = back.send_to(&up[..n], edge_quic).await;
                        }
                    }
                    Ok((n, _)) = back.recv_from(&mut down) => {
                        if let (true, Some(c)) = (is_open.load(Ordering::Relaxed), client) {
                            let _ = front.send_to(&down[..n], c).await;
                        }
                    }
                }
            }
        });
        UdpGate { port, open, task }
    }
}

impl Drop for UdpGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The protocols of the connector's registered connections.
fn protocols(conn: &ConnectorHandle) -> Vec<Protocol> {
    conn.state
        .connections()
        .iter()
        .map(|c| c.protocol)
        .collect()
}

/// Polls `check` every 20 ms until it holds, for at most `limit`.
async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn auto_falls_back_to_http2_when_udp_is_dropped_and_returns_to_quic() {
    let (logs, _guard) = capture_logs();
    let origin = echo_origin("web").await;
    // The edge's QUIC listener sits behind the gate; its TCP listener has the gate's port
    // number, so the connector dials both at one `host:port`, as in production.
    let mut edge = None;
    let mut gate = None;
    for _ in 0..16 {
        let quic_port = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let candidate = UdpGate::start(quic_port).await;
        let tcp: SocketAddr = format!("127.0.0.1:{}", candidate.port).parse().unwrap();
        if std::net::TcpListener::bind(tcp).is_err() {
            continue; // the TCP twin of this UDP port is taken
        }
        let started = start_edge(vec![tunnel("app", "t", &["app.test"])], |cfg| {
            cfg.quic_listen = quic_port;
            cfg.tcp_listen = Some(tcp);
            cfg.admin_listen = Some(loopback());
        })
        .await;
        edge = Some(started);
        gate = Some(candidate);
        break;
    }
    let (edge, gate) = (edge.expect("a free port pair"), gate.unwrap());
    assert_eq!(edge.tcp.unwrap().port(), gate.port);

    let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("web", origin)], vec![]);
    cfg.protocol = TransportChoice::Auto;
    cfg.edges = vec![format!("127.0.0.1:{}", gate.port)];
    cfg.ha_connections = 1;
    let started = tokio::time::Instant::now();
    let conn = start_connector(cfg).await;

    // Two QUIC handshakes of at most 3 s each, then HTTP/2.
    tokio::time::timeout(Duration::from_secs(15), conn.state.wait_registered(1))
        .await
        .expect("auto did not register over TCP in time");
    let fell_back_after = started.elapsed();
    assert_eq!(protocols(&conn), [Protocol::Http2]);
    logs.wait_for("falling back to HTTP/2 over TCP").await;
    assert_eq!(get(edge.http, "app.test", "/").await.status, 200);
    let admin = edge.admin.unwrap();
    let metrics = get(admin, "admin", "/metrics").await.text();
    assert!(
        metrics.contains(r#"sluice_edge_registered_connections{tunnel="app",protocol="http2"} 1"#),
        "{metrics}"
    );

    // UDP comes back: the connection moves to QUIC while requests keep flowing, none lost.
    gate.open.store(true, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, http) = (stop.clone(), edge.http);
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                statuses.push(get(http, "app.test", "/").await.status);
            }
            statuses
        })
    };
    eventually(
        Duration::from_secs(20),
        "the connection moved to QUIC",
        || protocols(&conn) == [Protocol::Quic],
    )
    .await;
    logs.wait_for("moved this connection from HTTP/2 to QUIC")
        .await;
    // A few more requests on the new connection, then stop the load.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let statuses = tokio::time::timeout(WAIT, load).await.unwrap().unwrap();
    assert!(!statuses.is_empty());
    assert!(
        statuses.iter().all(|s| *s == 200),
        "requests failed during the move: {statuses:?}"
    );
    assert_eq!(get(edge.http, "app.test", "/").await.status, 200);
    // The edge counts the QUIC connection, and the drained HTTP/2 one no more.
    let mut metrics = String::new();
    for _ in 0..200 {
        metrics = get(admin, "admin", "/metrics").await.text();
        if metrics
            .contains(r#"sluice_edge_registered_connections{tunnel="app",protocol="http2"} 0"#)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for line in [
        r#"sluice_edge_registered_connections{tunnel="app",protocol="quic"} 1"#,
        r#"sluice_edge_registered_connections{tunnel="app",protocol="http2"} 0"#,
    ] {
        assert!(metrics.contains(line), "no {line} in {metrics}");
    }
    println!("fell back to HTTP/2 after {fell_back_after:?}");
    conn.stop().await;
}

/// Reads until the peer closes (EOF or an error), for at most [`WAIT`].
async fn closed_by_peer<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, what: &str) {
    let mut buf = [0u8; 256];
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    ended
        .await
        .unwrap_or_else(|_| panic!("the edge kept {what} open"));
}

#[tokio::test]
async fn garbage_and_wrong_alpn_on_the_tcp_listener_close_only_that_connection() {
    let (logs, _guard) = capture_logs();
    let _transport = use_transport(TransportChoice::Http2);
    let origin = echo_origin("web").await;
    let (edge, good) = app_tunnel(vec![http_origin("web", origin)]).await;
    let tcp = edge.tcp.unwrap();
    let name = || rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // Not TLS at all.
    let mut raw = TcpStream::connect(tcp).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    closed_by_peer(&mut raw, "a plain-text connection").await;
    logs.wait_for("connector handshake failed").await;

    // TLS offering only another protocol: refused in the handshake.
    let offered = client_tls(&edge.identity, &[b"h2"])
        .connect(name(), TcpStream::connect(tcp).await.unwrap())
        .await;
    assert!(offered.is_err(), "a TLS connection for h2 was accepted");

    // TLS offering no ALPN at all: TLS accepts it, the edge closes it.
    let mut no_alpn = client_tls(&edge.identity, &[])
        .connect(name(), TcpStream::connect(tcp).await.unwrap())
        .await
        .unwrap();
    closed_by_peer(&mut no_alpn, "a connection without ALPN").await;
    logs.wait_for("did not agree on ALPN sluice-h2/1 (it offered none)")
        .await;

    // The right ALPN, then garbage instead of HTTP/2.
    let mut garbage = tls_connect(tcp, &edge.identity, sluice::proto::ALPN_TCP).await;
    garbage.write_all(&[0xde; 64]).await.unwrap();
    closed_by_peer(&mut garbage, "a connection sending garbage").await;
    logs.wait_for("registration failed").await;

    // The registered connector was never disturbed.
    assert_eq!(good.state.registered(), 2);
    assert_eq!(get(edge.http, "app.test", "/").await.status, 200);
    good.stop().await;
}

/// Runs `sluice check --connectivity` on a connector file for `edge` with `token`; returns
/// whether it succeeded and what it printed.
async fn check_connectivity(edge: &EdgeHandle, token: &str, name: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("sluice-check-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.pem"), &edge.ca_pem).unwrap();
    std::fs::write(
        dir.join("connector.toml"),
        format!(
            "tunnel = \"app\"\ntoken = \"{token}\"\nedges = [\"{}\"]\nedge-ca = \"ca.pem\"\n\
             edge-server-name = \"localhost\"\n\n[[ingress]]\norigin = \"hello\"\n",
            edge.quic
        ),
    )
    .unwrap();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--connectivity", "--config"])
        .arg(dir.join("connector.toml"))
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the check did not finish")
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test]
async fn check_connectivity_tries_both_transports_and_registers_nothing() {
    let (logs, _guard) = capture_logs();
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |cfg| {
        cfg.admin_listen = Some(loopback());
    })
    .await;

    // Both transports work: certificate verified, registration accepted, nothing routed.
    let (ok, out) = check_connectivity(&edge, "t", "both").await;
    assert!(ok, "{out}");
    for line in ["quic     ok", "http2    ok", "every edge is reachable"] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
    logs.wait_for("connectivity check passed (not routed)")
        .await;
    let ready = get(edge.admin.unwrap(), "admin", "/ready").await.json();
    assert_eq!(ready["connections"], serde_json::json!([]), "{ready}");
    assert_eq!(get(edge.http, "app.test", "/").await.status, 502);

    // A wrong token: both transports connect, the edge refuses both registrations.
    let (ok, out) = check_connectivity(&edge, "wrong", "token").await;
    assert!(!ok, "{out}");
    assert_eq!(out.matches("refused the registration").count(), 2, "{out}");
    assert!(
        out.contains("1 of 1 edges reachable over no transport"),
        "{out}"
    );

    // An edge without a TCP listener: QUIC alone is enough.
    let quic_only = start_edge(vec![tunnel("app", "t", &["app.test"])], |cfg| {
        cfg.tcp_listen = None;
    })
    .await;
    let (ok, out) = check_connectivity(&quic_only, "t", "quic-only").await;
    assert!(ok, "{out}");
    assert!(out.contains("quic     ok"), "{out}");
    assert!(
        out.contains("http2    FAIL  cannot connect over http2"),
        "{out}"
    );
}
