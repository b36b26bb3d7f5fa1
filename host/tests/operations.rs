//! Operations: graceful drain of a connector and graceful shutdown of an edge.

mod support;

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use support::*;
use tokio::sync::mpsc;

/// An origin named `name`: `/slow` answers after `delay` (announcing itself on `started`
/// first), anything else at once; the body is the origin's name.
async fn named_origin(
    name: &'static str,
    delay: Duration,
    started: mpsc::UnboundedSender<&'static str>,
) -> std::net::SocketAddr {
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
    let (logs, _guard) = capture_logs();
    let draining_seen = |n: usize| {
        let logs = logs.clone();
        async move {
            tokio::time::timeout(WAIT, async {
                while logs.text().matches("connector is draining").count() < n {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("the edge never saw the drain")
        }
    };
    let (tx, mut started) = mpsc::unbounded_channel();
    let a = named_origin("a", Duration::from_millis(1500), tx.clone()).await;
    let b = named_origin("b", Duration::from_millis(1500), tx).await;
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

    let http = edge.http;
    let slow = tokio::spawn(async move { get(http, "app.test", "/slow").await });
    let busy = tokio::time::timeout(WAIT, started.recv())
        .await
        .unwrap()
        .unwrap();
    let (draining, other, other_name) = if busy == "a" {
        (ca, cb, "b")
    } else {
        (cb, ca, "a")
    };

    // SIGTERM equivalent: the connector drains but its in-flight request goes on. Both of its
    // connections are marked draining at the edge before new requests are sent.
    draining.shutdown.cancel();
    draining_seen(2).await;
    for _ in 0..6 {
        let reply = get(edge.http, "app.test", "/").await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, other_name),
            "a new request went to the draining connector"
        );
    }
    let reply = tokio::time::timeout(WAIT, slow).await.unwrap().unwrap();
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (200, busy),
        "the in-flight request did not complete"
    );
    // Once idle, the draining connector exits well before its 30 s grace period.
    tokio::time::timeout(Duration::from_secs(10), draining.task)
        .await
        .expect("draining connector did not exit after its last request")
        .unwrap();

    // With the last connector draining too, the tunnel is offline.
    other.shutdown.cancel();
    draining_seen(4).await;
    let reply = get(edge.http, "app.test", "/").await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    tokio::time::timeout(WAIT, other.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn edge_shutdown_lets_in_flight_requests_finish() {
    let (tx, mut started) = mpsc::unbounded_channel();
    let o = named_origin("o", Duration::from_millis(800), tx).await;
    let (edge, conn) = app_tunnel(vec![http_origin("o", o)]).await;

    let http = edge.http;
    let slow = tokio::spawn(async move { get(http, "app.test", "/slow").await });
    tokio::time::timeout(WAIT, started.recv())
        .await
        .unwrap()
        .unwrap();
    edge.shutdown.cancel();
    let reply = tokio::time::timeout(WAIT, slow).await.unwrap().unwrap();
    assert_eq!((reply.status, reply.text().as_str()), (200, "o"));
    tokio::time::timeout(WAIT, edge.task)
        .await
        .expect("edge did not stop")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(http).await.is_err(),
        "the edge still accepts clients"
    );
    conn.stop().await;
}

#[tokio::test]
async fn tunnel_new_creates_a_token_the_edge_accepts() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["tunnel", "new", "shop", "--hostname", "shop.test"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout
        .lines()
        .find(|l| !l.starts_with('#') && !l.is_empty())
        .unwrap()
        .to_string();
    let block = &stdout[stdout.find("[[tunnel]]").unwrap()..];
    assert!(
        !block.contains(&token),
        "the edge block must not hold the token"
    );

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
        tcp: edge.tcp_addr(),
        https: None,
        admin: None,
        ports: edge.ports(),
        reloader: None,
        identity,
        ca_pem: String::new(),
        shutdown: tokio_util::sync::CancellationToken::new(),
        task: tokio::spawn(async {}),
    };
    let stop = handle.shutdown.clone();
    tokio::spawn(edge.run(stop));

    // Run: a connector with the printed token registers and serves.
    let origin = echo_origin("shop").await;
    let conn = start_connector(connector_config(
        &handle,
        "shop",
        &token,
        vec![http_origin("shop", origin)],
        vec![],
    ))
    .await;
    conn.registered(1).await;
    let reply = get(handle.http, "shop.test", "/").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["origin"], "shop");
    conn.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// GET `path` on the admin listener.
async fn admin_get(addr: std::net::SocketAddr, path: &str) -> Reply {
    get(addr, "admin", path).await
}

#[tokio::test]
async fn admin_endpoints_report_liveness_readiness_and_metrics() {
    let origin = echo_origin("web").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let edge = start_edge(
        vec![
            tunnel("app", "t", &["app.test"]),
            tunnel("idle", "u", &["idle.test"]),
        ],
        |c| c.admin_listen = Some(loopback()),
    )
    .await;
    let edge_admin = edge.admin.unwrap();

    let mut cfg = connector_config(
        &edge,
        "app",
        "t",
        vec![http_origin("web", origin), http_origin("down", closed)],
        vec![rule(None, Some("^/down"), "down"), rule(None, None, "web")],
    );
    cfg.admin_listen = Some(loopback());
    // Not started yet: bind, read the address, then run.
    let connector = sluice::connector::Connector::new(cfg).await.unwrap();
    let conn_admin = connector.admin_addr().unwrap();
    let state = connector.state();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(connector.run(stop.clone()));
    tokio::time::timeout(WAIT, state.wait_registered(2))
        .await
        .unwrap();

    assert_eq!(admin_get(edge_admin, "/live").await.status, 200);
    assert_eq!(admin_get(conn_admin, "/live").await.status, 200);
    // `/ready` lists the connections with their transport, on both sides.
    for (admin, fields) in [
        (edge_admin, ["tunnel", "id"]),
        (conn_admin, ["edge", "index"]),
    ] {
        let ready = admin_get(admin, "/ready").await;
        assert_eq!(ready.status, 200);
        let ready = ready.json();
        assert_eq!(ready["ready"], true);
        let listed = ready["connections"].as_array().unwrap();
        assert_eq!(listed.len(), 2, "{ready}");
        for c in listed {
            assert_eq!(c["protocol"], "quic", "{ready}");
            assert!(fields.iter().all(|f| !c[f].is_null()), "{ready}");
        }
    }
    assert_eq!(admin_get(conn_admin, "/nope").await.status, 404);

    for _ in 0..3 {
        assert_eq!(get(edge.http, "app.test", "/").await.status, 200);
    }
    assert_eq!(get(edge.http, "app.test", "/down").await.status, 502);
    assert_eq!(get(edge.http, "nope.test", "/").await.status, 404);
    // No connector serves `idle`: a 502 the edge gives itself, told apart from the origin's.
    assert_eq!(get(edge.http, "idle.test", "/").await.status, 502);
    // A connector with a wrong token counts as a registration failure on both sides.
    let bad = start_connector(connector_config(
        &edge,
        "app",
        "wrong",
        vec![http_origin("web", origin)],
        vec![],
    ))
    .await;
    tokio::time::timeout(WAIT, async {
        while !admin_get(edge_admin, "/metrics")
            .await
            .text()
            .contains("registration_failures_total{kind=\"unauthorized\"}")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the refused registration was not counted");
    bad.stop().await;

    let reply = admin_get(edge_admin, "/metrics").await;
    assert_eq!(
        reply.headers["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let edge_metrics = reply.text();
    for line in [
        r#"sluice_edge_requests_total{tunnel="app",class="2xx",reason="origin"} 3"#,
        r#"sluice_edge_requests_total{tunnel="app",class="5xx",reason="connector"} 1"#,
        r#"sluice_edge_requests_total{tunnel="idle",class="5xx",reason="offline"} 1"#,
        r#"sluice_edge_requests_total{tunnel="",class="4xx",reason="edge-refused"} 1"#,
        r#"sluice_edge_request_duration_seconds_count{tunnel="app"} 4"#,
        r#"sluice_edge_registered_connections{tunnel="app",protocol="quic"} 2"#,
        r#"sluice_edge_streams_in_flight{tunnel="app"} 0"#,
        r#"sluice_edge_ingress_digests{tunnel="app"} 1"#,
        r#"sluice_edge_registration_failures_total{kind="unauthorized"}"#,
    ] {
        assert!(
            edge_metrics.contains(line),
            "edge metrics lack {line:?}:\n{edge_metrics}"
        );
    }
    // Each role exports only its own families.
    for family in ["plugin_", "audit_events", "origin_errors"] {
        assert!(!edge_metrics.contains(family), "{family}:\n{edge_metrics}");
    }
    let conn_metrics = admin_get(conn_admin, "/metrics").await.text();
    for line in [
        r#"sluice_connector_requests_total{class="2xx"} 3"#,
        r#"sluice_connector_requests_total{class="5xx"} 1"#,
        r#"sluice_connector_origin_errors_total{origin="down",kind="refused"} 1"#,
        r#"sluice_connector_registered_connections{protocol="quic"} 2"#,
        r#"sluice_connector_registered_connections{protocol="http2"} 0"#,
        "sluice_connector_streams_in_flight 0",
    ] {
        assert!(
            conn_metrics.contains(line),
            "connector metrics lack {line:?}:\n{conn_metrics}"
        );
    }

    // `/status` lists the tunnels, their connections and digests.
    let status = admin_get(edge_admin, "/status").await.json();
    assert_eq!(status["role"], "edge");
    let tunnels = status["tunnels"].as_array().unwrap();
    assert_eq!(tunnels.len(), 2, "{status:#}");
    let app = &tunnels[0];
    assert_eq!(app["id"], "app");
    let conns = app["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 2, "{status:#}");
    assert!(conns.iter().all(|c| c["protocol"] == "quic"
        && c["token"] == 0
        && c["software"] == concat!("sluice/", env!("CARGO_PKG_VERSION"))));
    let digest = conns[0]["digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert_eq!(app["digests"][&digest], 2, "{status:#}");
    assert_eq!(tunnels[1]["connections"].as_array().unwrap().len(), 0);
    let conn_status = admin_get(conn_admin, "/status").await.json();
    assert_eq!(conn_status["digest"], digest.as_str());
    assert_eq!(conn_status["registered_connections"], 2);

    // Shutting down: the connector is no longer ready.
    stop.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    edge.shutdown.cancel();
}

#[tokio::test]
async fn connector_not_ready_until_registered() {
    // The edge's address is known, but the edge starts only later. The port stays taken
    // until then, so that no other socket (the connector's own, say) gets it meanwhile.
    let reserved = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = reserved.local_addr().unwrap().port();
    let identity = identity();
    let mut cfg = sluice::config::ConnectorConfig::new("app", sluice::secret::Secret::new("t"));
    cfg.edges = vec![format!("127.0.0.1:{port}")];
    cfg.edge_server_name = Some("localhost".into());
    cfg.edge_ca = identity.chain.clone();
    cfg.ha_connections = 1;
    cfg.backoff.initial = Duration::from_millis(50);
    cfg.backoff.max = Duration::from_millis(200);
    cfg.admin_listen = Some(loopback());
    let connector = sluice::connector::Connector::new(cfg).await.unwrap();
    let admin = connector.admin_addr().unwrap();
    let state = connector.state();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(connector.run(stop.clone()));
    assert_eq!(admin_get(admin, "/live").await.status, 200);
    let ready = admin_get(admin, "/ready").await;
    assert_eq!(ready.status, 503);
    assert_eq!(
        ready.json(),
        serde_json::json!({"ready": false, "connections": []})
    );

    drop(reserved);
    let mut ecfg =
        sluice::config::EdgeConfig::new(format!("127.0.0.1:{port}").parse().unwrap(), identity);
    ecfg.http_listen = Some(loopback());
    ecfg.tunnels = vec![tunnel("app", "t", &["app.test"])];
    let edge = sluice::edge::Edge::bind(ecfg).await.unwrap();
    let edge_stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(edge.run(edge_stop.clone()));
    tokio::time::timeout(WAIT, state.wait_registered(1))
        .await
        .expect("the connector never registered");
    assert_eq!(admin_get(admin, "/ready").await.status, 200);

    stop.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    edge_stop.cancel();
}

#[tokio::test]
async fn access_log_has_one_line_per_request_and_can_be_switched_off() {
    let (logs, _guard) = capture_logs();
    let origin = echo_origin("web").await;
    let edge = start_edge(
        vec![
            tunnel("app", "t", &["app.test"]),
            tunnel("quiet", "q", &["quiet.test"]),
        ],
        |_| {},
    )
    .await;
    let conn = start_connector(connector_config(
        &edge,
        "app",
        "t",
        vec![http_origin("web", origin)],
        vec![],
    ))
    .await;
    let mut quiet_cfg = connector_config(
        &edge,
        "quiet",
        "q",
        vec![http_origin("web", origin)],
        vec![],
    );
    quiet_cfg.access_log = false;
    let quiet = start_connector(quiet_cfg).await;
    conn.registered(1).await;
    quiet.registered(1).await;

    let reply = get(edge.http, "app.test", "/logged?q=1").await;
    let id = reply.headers["sluice-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    get(edge.http, "quiet.test", "/silent").await;
    // Both roles write their line once the response is done; wait for the connector's.
    tokio::time::timeout(WAIT, async {
        while logs.text().matches("sluice::access").count() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("access lines missing");
    let text = logs.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("sluice::access") && l.contains(&id))
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "one access line from the edge and one from the connector:\n{text}"
    );
    let connector_line = lines
        .iter()
        .find(|l| l.contains("origin=web"))
        .expect("connector line names the origin");
    for field in [
        "method=GET",
        "host=app.test",
        "path=/logged?q=1",
        "status=200",
        "duration_ms=",
        "origin=web",
    ] {
        assert!(
            connector_line.contains(field),
            "{field} missing from {connector_line}"
        );
    }
    let connector_lines_for_quiet = text
        .lines()
        .filter(|l| l.contains("sluice::access") && l.contains("/silent") && l.contains("origin="))
        .count();
    assert_eq!(
        connector_lines_for_quiet, 0,
        "access-log = false must silence the connector's access line"
    );
    conn.stop().await;
    quiet.stop().await;
}

#[test]
fn tunnel_rotate_prints_a_block_accepting_the_current_and_the_new_token() {
    let sluice = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let token_of = |stdout: &str| {
        stdout
            .lines()
            .find(|l| !l.starts_with('#') && !l.is_empty())
            .unwrap()
            .to_string()
    };
    let block_of = |stdout: &str| stdout[stdout.find("[[tunnel]]").unwrap()..].to_string();
    let dir = std::env::temp_dir().join(format!("sluice-tunnel-rotate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("edge.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("edge.key"), ck.key_pair.serialize_pem()).unwrap();
    let head = "[http]\nlisten = \"127.0.0.1:0\"\n[connectors]\nlisten = \"127.0.0.1:0\"\ncert = \"edge.crt\"\nkey = \"edge.key\"\n\n";
    let file = dir.join("edge.toml");

    let created = sluice(&["tunnel", "new", "shop", "--hostname", "shop.test"]);
    let old = sluice::secret::Secret::new(token_of(&created));
    std::fs::write(&file, format!("{head}{}", block_of(&created))).unwrap();

    let rotated = sluice(&[
        "tunnel",
        "rotate",
        "shop",
        "--config",
        file.to_str().unwrap(),
    ]);
    let new = sluice::secret::Secret::new(token_of(&rotated));
    assert_ne!(old, new);
    let block = block_of(&rotated);
    assert!(!block.contains(new.expose()) && !block.contains(old.expose()));
    std::fs::write(&file, format!("{head}{block}")).unwrap();
    let cfg = sluice::config::EdgeConfig::load(&file).unwrap();
    let tunnel = &cfg.tunnels[0];
    assert!(tunnel.accepts(&old) && tunnel.accepts(&new), "{block}");
    assert!(!tunnel.accepts(&sluice::secret::Secret::new("other")));
    assert_eq!(
        tunnel.token_hashes[1],
        new.sha256(),
        "the new token is listed last"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "tunnel",
            "rotate",
            "nope",
            "--config",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tunnel with id \"nope\""));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Polls `check` every 20 ms until it holds, within the test deadline.
async fn eventually<F, Fut>(what: impl std::fmt::Display, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::timeout(WAIT, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not within {WAIT:?}"));
}

#[tokio::test]
async fn replicas_that_disagree_are_reported_and_fail_ready_when_asked() {
    let (logs, _guard) = capture_logs();
    let origin = echo_origin("web").await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |c| {
        c.admin_listen = Some(loopback());
        c.require_consistent_replicas = true;
        c.replica_disagreement_grace = Duration::from_secs(1);
    })
    .await;
    let admin = edge.admin.unwrap();
    let mut a = connector_config(&edge, "app", "t", vec![http_origin("web", origin)], vec![]);
    a.ha_connections = 1;
    a.connector_id = "a".into();
    let mut b = a.clone();
    b.connector_id = "b".into();
    b.ingress = vec![rule(None, Some("^/api/"), "web"), rule(None, None, "web")];
    assert_ne!(a.routing_digest(), b.routing_digest());
    // Waits until the edge counts `n` distinct digests for the tunnel.
    let digests = |n: usize| {
        let line = format!(r#"sluice_edge_ingress_digests{{tunnel="app"}} {n}"#);
        eventually(format!("{n} digest(s)"), move || {
            let line = line.clone();
            async move { admin_get(admin, "/metrics").await.text().contains(&line) }
        })
    };

    let ca = start_connector(a.clone()).await;
    ca.registered(1).await;
    digests(1).await;
    assert_eq!(admin_get(admin, "/ready").await.status, 200);

    // A replica with other rules: counted, logged, and /ready fails as configured.
    let cb = start_connector(b).await;
    cb.registered(1).await;
    digests(2).await;
    // Within `replica-disagreement-grace` (a rolling reload) the edge stays ready; past it,
    // not.
    assert_eq!(admin_get(admin, "/ready").await.status, 200);
    eventually("not ready", || async {
        admin_get(admin, "/ready").await.status == 503
    })
    .await;
    assert!(
        logs.text()
            .contains("connectors of this tunnel run different ingress rules or plugins"),
        "{}",
        logs.text()
    );
    let status = admin_get(admin, "/status").await.json();
    assert_eq!(
        status["tunnels"][0]["digests"].as_object().unwrap().len(),
        2
    );

    // The replica reloads the same rules as the other: the edge learns it without a
    // re-registration.
    let mut fixed = a.clone();
    fixed.connector_id = "b".into();
    cb.reloader.reload(&fixed).await.unwrap();
    digests(1).await;
    assert_eq!(admin_get(admin, "/ready").await.status, 200);
    assert!(logs
        .text()
        .contains("agree on their ingress rules and plugins again"));
    assert_eq!(cb.state.registered(), 1);
    ca.stop().await;
    cb.stop().await;
}
