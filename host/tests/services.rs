//! TCP and UDP services through the tunnel: public ports at the edge (TCP with half-close and
//! PROXY protocol, UDP flows), `sluice access tcp` over the edge's HTTPS listener, limits,
//! metrics, drain — and real servers: OpenSSH and Redis.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice::config::{OriginConfig, OriginTarget};
use sluice::proto::SessionProtocol;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A TCP origin that reads each connection to its end, records exactly what it received, then
/// answers how many bytes that was and closes.
async fn recording_origin() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                if tcp.read_to_end(&mut got).await.is_err() {
                    return;
                }
                let answer = format!("received {} bytes", got.len());
                record.lock().unwrap().push(got);
                let _ = tcp.write_all(answer.as_bytes()).await;
            });
        }
    });
    (addr, seen)
}

/// A TCP origin echoing every byte until the client half-closes.
async fn tcp_echo_origin() -> SocketAddr {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A UDP origin answering each datagram with `echo:` and the datagram, to its sender.
async fn udp_echo_origin() -> SocketAddr {
    let socket = UdpSocket::bind(loopback()).await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from).await;
        }
    });
    addr
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// `sluice access` to `ssh.test` through `edge`'s HTTPS listener, without a token.
fn access_target(edge: &EdgeHandle) -> sluice::access::AccessTarget {
    sluice::access::AccessTarget {
        hostname: "ssh.test".into(),
        edge: edge.https.unwrap().to_string(),
        edge_ca: edge.identity.chain.clone(),
        edge_server_name: Some("localhost".into()),
        token: None,
    }
}

/// Routes `ssh.test` to the TCP origin at `addr` (origin "shell"), before the catch-all.
fn tcp_hostname(cfg: &mut sluice::config::ConnectorConfig, addr: SocketAddr) {
    let target = OriginTarget::parse(&format!("tcp://{addr}")).unwrap();
    cfg.origins.push(OriginConfig::new("shell", target));
    cfg.ingress.insert(0, rule(Some("ssh.test"), None, "shell"));
}

/// access-guard accepting `token` (as `Authorization: Bearer`).
fn guard(token: &str) -> sluice::config::PluginConfig {
    let mut guard = sluice::config::PluginConfig::new("guard", example_plugin("access-guard"));
    guard.config_json = serde_json::to_vec(&serde_json::json!({ "tokens": [token] })).unwrap();
    guard.grants.credentials = true;
    guard.timeout = Duration::from_secs(1);
    guard
}

/// Waits until the `/metrics` of `admin` has a line containing every one of `parts`.
#[allow(dead_code)]
async fn wait_metric(admin: SocketAddr, parts: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = get(admin, "admin", "/metrics").await.text();
        if let Some(line) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no metric line with {parts:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the edge resets the connection (a refusal never looks like a session that
/// ended).
async fn reset_by_edge(tcp: &mut TcpStream) {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(WAIT, tcp.read(&mut buf)).await {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected a reset, got {other:?}"),
    }
}

/// Reads until the peer closes or resets; `true` when it closed without sending anything.
async fn closed_without_data(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(WAIT, tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("the connection stayed open"),
    }
}

over_both_transports! {
    #[tokio::test]
    async fn a_public_tcp_port_carries_bytes_both_ways_and_propagates_half_close() {
        let (origin, seen) = recording_origin().await;
        let (edge, _conn) = services_tunnel(
            vec![port("data", SessionProtocol::Tcp)],
            vec![service("data", &format!("tcp://{origin}"))],
            |_| {},
            |_| {},
        )
        .await;
        let sent = pattern(3 << 20, 7);
        let mut tcp = TcpStream::connect(port_addr(&edge, "data")).await.unwrap();
        tcp.write_all(&sent).await.unwrap();
        // Half-close: the origin sees the end of the upload, and answers on the other half.
        tcp.shutdown().await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(WAIT, tcp.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, format!("received {} bytes", sent.len()));
        assert!(seen.lock().unwrap()[0] == sent, "the origin received other bytes");
        wait_metric(edge.admin.unwrap(), &["sluice_edge_session_bytes_total", "service=\"data\"", "direction=\"up\"", &format!("{}", sent.len())]).await;
    }

    #[tokio::test]
    async fn a_public_udp_port_relays_each_clients_flow() {
        let origin = udp_echo_origin().await;
        let (edge, conn) = services_tunnel(
            vec![port("dns", SessionProtocol::Udp)],
            vec![service("dns", &format!("udp://{origin}"))],
            |_| {},
            |_| {},
        )
        .await;
        let target = port_addr(&edge, "dns");
        let (a, b) = (
            UdpSocket::bind(loopback()).await.unwrap(),
            UdpSocket::bind(loopback()).await.unwrap(),
        );
        // Datagrams may be lost, as UDP's are: resend until answered.
        async fn ask(socket: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Vec<u8> {
            let mut buf = vec![0u8; 65536];
            for _ in 0..50 {
                socket.send_to(msg, to).await.unwrap();
                if let Ok(Ok((n, _))) =
                    tokio::time::timeout(Duration::from_millis(400), socket.recv_from(&mut buf)).await
                {
                    return buf[..n].to_vec();
                }
            }
            panic!("no answer to {msg:?}");
        }
        for i in 0..3 {
            let ma = format!("a{i}");
            let mb = format!("b{i}");
            assert_eq!(ask(&a, target, ma.as_bytes()).await, format!("echo:{ma}").into_bytes());
            assert_eq!(ask(&b, target, mb.as_bytes()).await, format!("echo:{mb}").into_bytes());
        }
        let big = pattern(8000, 3);
        let mut want = b"echo:".to_vec();
        want.extend_from_slice(&big);
        assert_eq!(ask(&a, target, &big).await, want);
        // Two clients, two flows, on both roles.
        wait_metric(edge.admin.unwrap(), &["sluice_edge_sessions_active{", "protocol=\"udp\"", "} 2"]).await;
        wait_metric(conn.admin.unwrap(), &["sluice_connector_sessions_active{", "service=\"dns\"", "} 2"]).await;
        // Over QUIC, small datagrams ride QUIC datagrams both ways; one too large for a QUIC
        // datagram, and every one over HTTP/2, rides the flow's stream.
        for admin in [edge.admin.unwrap(), conn.admin.unwrap()] {
            let text = get(admin, "admin", "/metrics").await.text();
            let count = |carrier: &str| -> u64 {
                text.lines()
                    .find(|l| l.contains("udp_datagrams_total{") && l.contains(&format!("carrier=\"{carrier}\"")))
                    .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                    .unwrap_or(0)
            };
            assert!(count("stream") >= 1, "{text}");
            match support::transport() {
                sluice::config::TransportChoice::Quic => assert!(count("quic-datagram") >= 6, "{text}"),
                _ => assert_eq!(count("quic-datagram"), 0, "{text}"),
            }
        }
    }

    #[tokio::test]
    async fn proxy_protocol_gives_the_origin_the_clients_address_byte_exact() {
        let (origin, seen) = recording_origin().await;
        let mut svc = service("db", &format!("tcp://{origin}"));
        svc.proxy_protocol = true;
        // A wildcard listener: the header names the address the client connected to.
        let mut p = port("db", SessionProtocol::Tcp);
        p.listen = "0.0.0.0:0".parse().unwrap();
        let (edge, _conn) = services_tunnel(vec![p], vec![svc], |_| {}, |_| {}).await;
        let public: SocketAddr = format!("127.0.0.1:{}", port_addr(&edge, "db").port()).parse().unwrap();
        let mut tcp = TcpStream::connect(public).await.unwrap();
        let client = tcp.local_addr().unwrap();
        tcp.write_all(b"hello").await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(WAIT, tcp.read_to_string(&mut answer)).await.unwrap().unwrap();
        let mut want = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
        let (std::net::IpAddr::V4(c), std::net::IpAddr::V4(s)) = (client.ip(), public.ip()) else {
            unreachable!("loopback is IPv4")
        };
        want.extend_from_slice(&c.octets());
        want.extend_from_slice(&s.octets());
        want.extend_from_slice(&client.port().to_be_bytes());
        want.extend_from_slice(&public.port().to_be_bytes());
        want.extend_from_slice(b"hello");
        assert_eq!(seen.lock().unwrap()[0], want);
    }

    #[tokio::test]
    async fn sluice_access_reaches_a_tcp_origin_through_https_and_the_plugin_chain() {
        let origin = tcp_echo_origin().await;
        let guard = guard("a-token-of-sixteen-chars");
        let (edge, _conn) = services_tunnel(vec![], vec![], |_| {}, |cfg| {
            let mut ssh = rule(Some("ssh.test"), None, "shell");
            ssh.plugins = vec!["guard".into()];
            cfg.origins.push(OriginConfig::new("shell", OriginTarget::parse(&format!("tcp://{origin}")).unwrap()));
            cfg.ingress.insert(0, ssh);
            cfg.plugins = vec![guard];
        })
        .await;
        let mut target = access_target(&edge);
        match target.connect().await {
            Err(sluice::access::AccessError::Refused { status: 401, .. }) => {}
            other => panic!("expected a 401 from the guard, got {:?}", other.map(|_| ())),
        }
        target.token = Some(sluice::secret::Secret::new("a-token-of-sixteen-chars"));
        let ws = target.connect().await.unwrap();
        let (local, remote) = tokio::io::duplex(1 << 16);
        let bridge = tokio::spawn(sluice::services::websocket::bridge(ws, local, WAIT, None));
        let sent = pattern(1 << 20, 9);
        let (mut r, mut w) = tokio::io::split(remote);
        let upload = {
            let sent = sent.clone();
            tokio::spawn(async move {
                w.write_all(&sent).await.unwrap();
                // Half-close: the echo origin ends its side after the last byte.
                w.shutdown().await.unwrap();
            })
        };
        let mut back = Vec::new();
        tokio::time::timeout(WAIT, r.read_to_end(&mut back)).await.unwrap().unwrap();
        upload.await.unwrap();
        assert!(back == sent, "the echo differs");
        let relayed = tokio::time::timeout(WAIT, bridge).await.unwrap().unwrap();
        relayed.result.unwrap();
        assert_eq!((relayed.sent, relayed.received), (sent.len() as u64, sent.len() as u64));

        // A plain request to the TCP hostname is told how to connect.
        let reply = get(edge.http, "ssh.test", "/").await;
        assert_eq!(reply.status, 401, "the guard runs first");
    }

    #[tokio::test]
    async fn a_client_outside_the_allow_list_is_closed_and_never_reaches_the_connector() {
        let (origin, seen) = recording_origin().await;
        let mut p = port("db", SessionProtocol::Tcp);
        p.allow = vec!["192.0.2.0/24".parse().unwrap(), "2001:db8::/32".parse().unwrap()];
        let (edge, conn) = services_tunnel(vec![p], vec![service("db", &format!("tcp://{origin}"))], |_| {}, |_| {}).await;
        let mut tcp = TcpStream::connect(port_addr(&edge, "db")).await.unwrap();
        let _ = tcp.write_all(b"let me in").await;
        reset_by_edge(&mut tcp).await;
        wait_metric(edge.admin.unwrap(), &["sluice_edge_sessions_total{", "outcome=\"denied\"", "} 1"]).await;
        // The edge opened no stream for it: the connector counted no session at all.
        let text = get(conn.admin.unwrap(), "admin", "/metrics").await.text();
        assert!(!text.contains("sluice_connector_sessions_total{"), "{text}");
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_origin_that_refuses_resets_the_client_and_is_counted_on_both_roles() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (logs, _guard) = capture_logs();
        let (edge, conn) = services_tunnel(
            vec![port("gone", SessionProtocol::Tcp), port("typo", SessionProtocol::Tcp)],
            vec![service("gone", &format!("tcp://{closed}"))],
            |_| {},
            |_| {},
        )
        .await;
        let mut tcp = TcpStream::connect(port_addr(&edge, "gone")).await.unwrap();
        reset_by_edge(&mut tcp).await;
        wait_metric(conn.admin.unwrap(), &["sluice_connector_sessions_total{", "service=\"gone\"", "outcome=\"refused\"", "} 1"]).await;
        wait_metric(edge.admin.unwrap(), &["sluice_edge_sessions_total{", "service=\"gone\"", "outcome=\"connector-refused\"", "} 1"]).await;
        logs.wait_for("the origin is unreachable (refused)").await;
        // A port whose service the connector does not have: said plainly in the edge's log.
        let mut tcp = TcpStream::connect(port_addr(&edge, "typo")).await.unwrap();
        reset_by_edge(&mut tcp).await;
        logs.wait_for("the connector has no service \\\"typo\\\"").await;
    }

    #[tokio::test]
    async fn sessions_past_a_ports_cap_are_refused_and_logged_with_their_bytes() {
        let origin = tcp_echo_origin().await;
        let mut p = port("echo", SessionProtocol::Tcp);
        p.max_sessions = 1;
        let (logs, _guard) = capture_logs();
        let (edge, _conn) = services_tunnel(vec![p], vec![service("echo", &format!("tcp://{origin}"))], |_| {}, |_| {}).await;
        let addr = port_addr(&edge, "echo");
        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(WAIT, first.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"ping");
        let mut second = TcpStream::connect(addr).await.unwrap();
        reset_by_edge(&mut second).await;
        wait_metric(edge.admin.unwrap(), &["sluice_edge_sessions_total{", "outcome=\"limit\"", "} 1"]).await;
        // The first goes on; once it ends, its access-log line has its bytes.
        first.write_all(b"pong").await.unwrap();
        tokio::time::timeout(WAIT, first.read_exact(&mut buf)).await.unwrap().unwrap();
        first.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, first.read_to_end(&mut rest)).await.unwrap().unwrap();
        logs.wait_for("bytes_up=8 bytes_down=8").await;
        assert!(logs.text().contains("outcome=\"closed\"") || logs.text().contains("outcome=closed"), "{}", logs.text());
    }

    #[tokio::test]
    async fn a_plain_request_to_a_tcp_hostname_is_told_to_use_sluice_access() {
        let origin = tcp_echo_origin().await;
        let (edge, _conn) = services_tunnel(vec![], vec![], |_| {}, |cfg| {
            tcp_hostname(cfg, origin);
        })
        .await;
        let reply = get(edge.http, "ssh.test", "/").await;
        assert_eq!(reply.status, 400);
        assert!(reply.text().contains("sluice access tcp"), "{}", reply.text());
    }

    #[tokio::test]
    async fn on_shutdown_a_session_keeps_working_for_the_grace_period_then_closes() {
        let origin = tcp_echo_origin().await;
        let (edge, conn) = services_tunnel(
            vec![port("echo", SessionProtocol::Tcp)],
            vec![service("echo", &format!("tcp://{origin}"))],
            |_| {},
            |cfg| cfg.grace_period = Duration::from_secs(2),
        )
        .await;
        let mut tcp = TcpStream::connect(port_addr(&edge, "echo")).await.unwrap();
        let mut buf = [0u8; 5];
        tcp.write_all(b"first").await.unwrap();
        tokio::time::timeout(WAIT, tcp.read_exact(&mut buf)).await.unwrap().unwrap();
        let started = tokio::time::Instant::now();
        conn.shutdown.cancel();
        // Draining: the open session still carries bytes both ways.
        tcp.write_all(b"again").await.unwrap();
        tokio::time::timeout(WAIT, tcp.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"again");
        // Then the grace period ends and the session with it.
        assert!(closed_without_data(&mut tcp).await);
        assert!(started.elapsed() >= Duration::from_millis(1500), "{:?}", started.elapsed());
        let _ = tokio::time::timeout(WAIT, conn.task).await;
    }

    #[tokio::test]
    async fn an_idle_session_is_closed_and_logged_with_its_bytes_on_both_roles() {
        let origin = tcp_echo_origin().await;
        let mut p = port("echo", SessionProtocol::Tcp);
        p.idle_timeout = Duration::from_millis(500);
        let (logs, _guard) = capture_logs();
        let (edge, conn) = services_tunnel(vec![p], vec![service("echo", &format!("tcp://{origin}"))], |_| {}, |_| {}).await;
        let mut tcp = TcpStream::connect(port_addr(&edge, "echo")).await.unwrap();
        tcp.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        tokio::time::timeout(WAIT, tcp.read_exact(&mut buf)).await.unwrap().unwrap();
        // Then nothing: the port's idle timeout ends the session, as a clean close.
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest)).await.unwrap().unwrap();
        logs.wait_for("bytes_up=5 bytes_down=5 duration_ms").await;
        wait_metric(edge.admin.unwrap(), &["sluice_edge_sessions_total{", "outcome=\"idle\"", "} 1"]).await;
        wait_metric(edge.admin.unwrap(), &["sluice_edge_session_bytes_total{", "direction=\"down\"", "} 5"]).await;
        // The edge finished the stream (no reset): the connector saw a normal end.
        wait_metric(conn.admin.unwrap(), &["sluice_connector_sessions_total{", "outcome=\"closed\"", "} 1"]).await;
        wait_metric(conn.admin.unwrap(), &["sluice_connector_session_bytes_total{", "direction=\"up\"", "} 5"]).await;
    }

    #[tokio::test]
    async fn a_connector_without_the_service_passes_the_session_to_one_that_has_it() {
        let origin = tcp_echo_origin().await;
        let (edge, _with) = services_tunnel(
            vec![port("echo", SessionProtocol::Tcp)],
            vec![service("echo", &format!("tcp://{origin}"))],
            |_| {},
            |cfg| cfg.connector_id = "with-echo".into(),
        )
        .await;
        // A replica of the tunnel whose file lacks the service.
        let hello = OriginConfig::new("hello", OriginTarget::Hello);
        let mut cfg = connector_config(&edge, "app", "t", vec![hello], vec![]);
        cfg.connector_id = "without-echo".into();
        let without = start_connector(cfg).await;
        without.registered(2).await;
        // Sessions are spread over both; each reaches the echo, through a second try when the
        // first connector tried lacks the service.
        for i in 0..8u8 {
            let mut tcp = TcpStream::connect(port_addr(&edge, "echo")).await.unwrap();
            tcp.write_all(&[i]).await.unwrap();
            let mut buf = [0u8; 1];
            tokio::time::timeout(WAIT, tcp.read_exact(&mut buf)).await.unwrap().unwrap();
            assert_eq!(buf, [i]);
        }
        let text = get(edge.admin.unwrap(), "admin", "/metrics").await.text();
        assert!(!text.contains("outcome=\"connector-refused\""), "{text}");
    }

    #[tokio::test]
    async fn sluice_access_to_an_origin_that_refuses_gets_a_clear_502() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (edge, _conn) = services_tunnel(vec![], vec![], |_| {}, |cfg| {
            tcp_hostname(cfg, closed);
        })
        .await;
        let target = access_target(&edge);
        match target.connect().await {
            Err(e @ sluice::access::AccessError::Refused { status: 502, .. }) => {
                assert!(e.to_string().contains("the origin is unreachable"), "{e}");
            }
            other => panic!("expected a 502, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn udp_flows_past_a_ports_cap_are_dropped_and_counted() {
        let origin = udp_echo_origin().await;
        let mut p = port("dns", SessionProtocol::Udp);
        p.max_sessions = 1;
        let (edge, _conn) = services_tunnel(vec![p], vec![service("dns", &format!("udp://{origin}"))], |_| {}, |_| {}).await;
        let target = port_addr(&edge, "dns");
        let first = UdpSocket::bind(loopback()).await.unwrap();
        first.send_to(b"one", target).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = tokio::time::timeout(WAIT, first.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"echo:one");
        // A second client while the first flow lives: its datagram is dropped and counted.
        let second = UdpSocket::bind(loopback()).await.unwrap();
        second.send_to(b"two", target).await.unwrap();
        wait_metric(edge.admin.unwrap(), &["sluice_edge_sessions_total{", "outcome=\"limit\"", "} 1"]).await;
        wait_metric(edge.admin.unwrap(), &["sluice_edge_sessions_active{", "protocol=\"udp\"", "} 1"]).await;
    }

    #[tokio::test]
    async fn a_udp_flow_that_idles_is_accounted_on_both_roles() {
        let origin = udp_echo_origin().await;
        let mut p = port("dns", SessionProtocol::Udp);
        p.idle_timeout = Duration::from_millis(300);
        let (edge, conn) = services_tunnel(
            vec![p],
            vec![service("dns", &format!("udp://{origin}"))],
            |_| {},
            |cfg| cfg.udp_idle_timeout = Duration::from_millis(300),
        )
        .await;
        let client = UdpSocket::bind(loopback()).await.unwrap();
        client.send_to(b"ping", port_addr(&edge, "dns")).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = tokio::time::timeout(WAIT, client.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"echo:ping");
        for (admin, role) in [(edge.admin.unwrap(), "edge"), (conn.admin.unwrap(), "connector")] {
            let family = format!("sluice_{role}_session_bytes_total{{");
            wait_metric(admin, &[&family, "direction=\"up\"", "} 4"]).await;
            wait_metric(admin, &[&family, "direction=\"down\"", "} 9"]).await;
        }
    }

    #[tokio::test]
    async fn a_quiet_access_session_outlives_the_edges_idle_timeout() {
        let origin = tcp_echo_origin().await;
        // The edge closes upgraded connections idle for 1 s; the connector (whose own setting
        // is 1.5 s) pings every 0.5 s.
        let (edge, _conn) = services_tunnel(
            vec![],
            vec![],
            |e| e.body_idle_timeout = Duration::from_secs(1),
            |cfg| {
                cfg.body_idle_timeout = Duration::from_millis(1500);
                tcp_hostname(cfg, origin);
            },
        )
        .await;
        let target = access_target(&edge);
        let ws = target.connect().await.unwrap();
        let (local, remote) = tokio::io::duplex(1 << 16);
        tokio::spawn(sluice::services::websocket::bridge(ws, local, WAIT, None));
        let (mut r, mut w) = tokio::io::split(remote);
        let mut buf = [0u8; 5];
        w.write_all(b"first").await.unwrap();
        tokio::time::timeout(WAIT, r.read_exact(&mut buf)).await.unwrap().unwrap();
        // Quiet for three times the edge's idle timeout, then the session still works.
        tokio::time::sleep(Duration::from_secs(3)).await;
        w.write_all(b"again").await.unwrap();
        tokio::time::timeout(WAIT, r.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"again");
    }
}

/// A scratch directory for one test, removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("sluice-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An outside server, killed when dropped.
/// OpenSSH's sshd on a loopback port with a fresh host key, accepting the fresh client key
/// `id` (in `dir`) for the current user.
async fn start_sshd(dir: &Scratch) -> (Server, SocketAddr) {
    let sshd = require_program("sshd", "openssh-server");
    let keygen = require_program("ssh-keygen", "openssh-client");
    for (file, comment) in [("host_key", "host"), ("id", "client")] {
        let ok = std::process::Command::new(&keygen)
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(dir.path(file))
            .status()
            .unwrap();
        assert!(ok.success(), "ssh-keygen failed");
    }
    std::fs::copy(dir.path("id.pub"), dir.path("authorized_keys")).unwrap();
    // sshd's privilege-separation directory (absent until the package's service first runs).
    let _ = std::fs::create_dir_all("/run/sshd");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!(
        "Port {}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile none\nUsePAM no\nStrictModes no\n\
         AuthorizedKeysFile {}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\nLogLevel ERROR\n",
        addr.port(),
        dir.path("host_key").display(),
        dir.path("authorized_keys").display(),
    );
    std::fs::write(dir.path("sshd_config"), config).unwrap();
    let child = tokio::process::Command::new(sshd)
        .args(["-D", "-f"])
        .arg(dir.path("sshd_config"))
        .arg("-E")
        .arg(dir.path("sshd.log"))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_listening(addr).await;
    (Server(child), addr)
}

/// Runs `ssh` with the test's key and `args`; its standard output, or a failure with its
/// standard error.
async fn ssh(dir: &Scratch, args: &[&str]) -> String {
    let ssh = require_program("ssh", "openssh-client");
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(ssh)
            .args([
                "-F",
                "/dev/null",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
            ])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "LogLevel=ERROR", "-i"])
            .arg(dir.path("id"))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("ssh did not finish in time")
    .unwrap();
    assert!(
        out.status.success(),
        "ssh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn ssh_runs_a_command_through_sluice_access_stdio_and_listen() {
    let dir = Scratch::new("ssh");
    let (_sshd, sshd_addr) = start_sshd(&dir).await;
    let (edge, _conn) = services_tunnel(
        vec![],
        vec![],
        |_| {},
        |cfg| {
            let origin =
                OriginTarget::parse(&format!("ssh://127.0.0.1:{}", sshd_addr.port())).unwrap();
            cfg.origins.push(OriginConfig::new("sshd", origin));
            // Behind access-guard: the client sends the token from --token-file.
            let mut ssh = rule(Some("ssh.test"), None, "sshd");
            ssh.plugins = vec!["guard".into()];
            cfg.ingress.insert(0, ssh);
            cfg.plugins = vec![guard("a-token-of-sixteen-chars")];
        },
    )
    .await;
    std::fs::write(dir.path("edge-ca.pem"), &edge.ca_pem).unwrap();
    std::fs::write(dir.path("token"), "a-token-of-sixteen-chars\n").unwrap();
    let bin = env!("CARGO_BIN_EXE_sluice");
    let edge_args = format!(
        "--edge {} --edge-ca {} --edge-server-name localhost --token-file {}",
        edge.https.unwrap(),
        dir.path("edge-ca.pem").display(),
        dir.path("token").display()
    );

    // As ssh's ProxyCommand: `%h` is the hostname given to ssh.
    let proxy = format!("ProxyCommand={bin} access tcp --hostname %h --stdio {edge_args}");
    let who = format!("{}@ssh.test", user());
    let out = ssh(
        &dir,
        &["-o", &proxy, &who, "echo through-sluice; echo $((6 * 7))"],
    )
    .await;
    assert_eq!(out, "through-sluice\n42\n");

    // Through a local listener.
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args([
        "access",
        "tcp",
        "--hostname",
        "ssh.test",
        "--listen",
        &listen,
    ])
    .args(edge_args.split(' '))
    .kill_on_drop(true);
    let _client = Server(cmd.spawn().unwrap());
    wait_listening(listen.parse().unwrap()).await;
    let port = listen.rsplit(':').next().unwrap();
    let who = format!("{}@127.0.0.1", user());
    let out = ssh(&dir, &["-p", port, &who, "echo via-listen"]).await;
    assert_eq!(out, "via-listen\n");
}

#[tokio::test]
async fn redis_behind_a_public_port_answers_and_keeps_a_thousand_pipelined_commands_in_order() {
    let (addr, _redis) = start_redis().await;
    let (edge, _conn) = services_tunnel(
        vec![port("redis", SessionProtocol::Tcp)],
        vec![service("redis", &format!("tcp://{addr}"))],
        |_| {},
        |_| {},
    )
    .await;
    let mut tcp = TcpStream::connect(port_addr(&edge, "redis")).await.unwrap();
    tcp.write_all(b"PING\r\n").await.unwrap();
    let mut pong = [0u8; 7];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut pong))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&pong, b"+PONG\r\n");

    // One write of 1,000 commands; the answers must come back in order.
    let mut batch = Vec::new();
    let mut want = Vec::new();
    for i in 0..1000 {
        let arg = format!("m{i}");
        batch.extend_from_slice(
            format!("*2\r\n$4\r\nECHO\r\n${}\r\n{arg}\r\n", arg.len()).as_bytes(),
        );
        want.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    tcp.write_all(&batch).await.unwrap();
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got == want, "replies out of order or altered");
}

#[test]
fn sluice_access_listens_only_on_loopback_unless_told_otherwise() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "access",
            "tcp",
            "--hostname",
            "ssh.test",
            "--listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--danger-allow-remote"),
        "{err}"
    );
}
