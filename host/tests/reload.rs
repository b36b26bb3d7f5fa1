//! Reload without a restart: SIGHUP re-reads the file; new ingress, origins and tunnels apply
//! atomically, in-flight requests finish on the old set, and a broken file is refused while
//! the running configuration keeps serving.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::sync::mpsc;

/// An origin whose body is its name; `/slow` takes 800 ms and announces itself first.
async fn named(
    name: &'static str,
    started: Option<mpsc::UnboundedSender<()>>,
) -> std::net::SocketAddr {
    start_origin(move |req: http::Request<hyper::body::Incoming>| {
        let started = started.clone();
        async move {
            if req.uri().path() == "/slow" {
                if let Some(s) = started {
                    let _ = s.send(());
                }
                tokio::time::sleep(Duration::from_millis(800)).await;
            }
            http::Response::new(sluice::relay::full(name))
        }
    })
    .await
}

#[tokio::test]
async fn connector_reload_swaps_origins_under_load() {
    let (tx, mut started) = mpsc::unbounded_channel();
    let a = named("a", Some(tx)).await;
    let b = named("b", None).await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let cfg_a = connector_config(
        &edge,
        "app",
        "t",
        vec![http_origin("a", a), http_origin("b", b)],
        vec![rule(None, None, "a")],
    );
    let mut cfg_b = cfg_a.clone();
    cfg_b.ingress = vec![rule(None, None, "b")];
    let connector = sluice::connector::Connector::new(cfg_a).await.unwrap();
    let reloader = connector.reloader();
    let state = connector.state();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(connector.run(stop.clone()));
    tokio::time::timeout(WAIT, state.wait_registered(2))
        .await
        .unwrap();

    // A request in flight on the old configuration.
    let http = edge.http;
    let slow = tokio::spawn(async move { get(http, "app.test", "/slow").await });
    tokio::time::timeout(WAIT, started.recv())
        .await
        .unwrap()
        .unwrap();

    // Requests keep flowing while the configuration is swapped.
    let load = tokio::spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..60 {
            let r = get(http, "app.test", "/").await;
            assert_eq!(
                r.status,
                200,
                "a request failed during reload: {}",
                r.text()
            );
            seen.push(r.text());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    reloader.reload(&cfg_b).await.unwrap();
    let seen = load.await.unwrap();
    assert!(
        seen.iter().any(|s| s == "a") && seen.iter().any(|s| s == "b"),
        "{seen:?}"
    );
    let first_b = seen.iter().position(|s| s == "b").unwrap();
    assert!(
        seen[first_b..].iter().all(|s| s == "b"),
        "old origin used after the swap: {seen:?}"
    );
    // The request that started before the reload finished on the old set.
    assert_eq!(slow.await.unwrap().text(), "a");
    assert_eq!(state.registered(), 2, "reload must not drop connections");
    stop.cancel();
    let _ = tokio::time::timeout(WAIT, task).await;
}

#[tokio::test]
async fn edge_reload_changes_hostnames_and_revokes_changed_tokens() {
    let (logs, _guard) = capture_logs();
    let origin = named("web", None).await;
    let (edge, conn) = app_tunnel(vec![http_origin("web", origin)]).await;
    let reloader = edge.reloader.clone().unwrap();
    assert_eq!(get(edge.http, "new.test", "/").await.status, 404);

    // A new hostname: routed at once, and the registered connections stay.
    reloader.reload(&edge_config_with(
        &edge,
        vec![tunnel("app", "t", &["app.test", "new.test"])],
    ));
    assert_eq!(get(edge.http, "new.test", "/").await.text(), "web");
    assert_eq!(get(edge.http, "app.test", "/").await.text(), "web");
    assert_eq!(
        logs.text().matches("connector registered").count(),
        2,
        "connections were re-registered"
    );
    assert_eq!(conn.state.registered(), 2);

    // A new token revokes the connections made with the old one; the old token no longer works.
    reloader.reload(&edge_config_with(
        &edge,
        vec![tunnel("app", "rotated", &["app.test"])],
    ));
    tokio::time::timeout(WAIT, async {
        while conn.state.registered() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("connections with a revoked token stayed registered");
    logs.wait_for("the edge refused the registration").await;
    assert_eq!(get(edge.http, "app.test", "/").await.status, 502);
    conn.stop().await;
}

/// A config for a reload of `edge`: its certificate, these tunnels.
fn edge_config_with(
    edge: &EdgeHandle,
    tunnels: Vec<sluice::config::TunnelConfig>,
) -> sluice::config::EdgeConfig {
    let mut cfg = sluice::config::EdgeConfig::new(loopback(), edge.identity.clone());
    cfg.tunnels = tunnels;
    cfg
}

#[tokio::test]
async fn sighup_applies_a_good_file_and_refuses_a_broken_one() {
    let (a, b) = (named("a", None).await, named("b", None).await);
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let dir = std::env::temp_dir().join(format!("sluice-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("edge-ca.crt"), &edge.ca_pem).unwrap();
    let file = dir.join("connector.toml");
    let write = |origin: std::net::SocketAddr, extra: &str| {
        std::fs::write(
            &file,
            format!(
                "tunnel = \"app\"\ntoken = \"t\"\nedges = [\"{}\"]\nedge-ca = \"edge-ca.crt\"\nedge-server-name = \"localhost\"\n{extra}\n\
                 [[origin]]\nname = \"o\"\nurl = \"http://{origin}\"\n[[ingress]]\norigin = \"o\"\n",
                edge.quic
            ),
        )
        .unwrap()
    };
    write(a, "");
    let proc = Proc::spawn("connector", &file);
    proc.wait_log("registered with the edge", 2).await;
    assert_eq!(get(edge.http, "app.test", "/").await.text(), "a");

    // A broken file: refused, logged, the old configuration keeps serving.
    write(b, "ha-connections = \"many\"");
    proc.signal("HUP");
    proc.wait_log("reload refused", 1).await;
    assert_eq!(get(edge.http, "app.test", "/").await.text(), "a");

    // A good file: applied.
    write(b, "");
    proc.signal("HUP");
    proc.wait_log("reloaded ingress, origins and plugins", 1)
        .await;
    assert_eq!(get(edge.http, "app.test", "/").await.text(), "b");
    let log = std::fs::read_to_string(&proc.stderr).unwrap();
    assert!(
        log.contains("connector.toml:6:18: ha-connections"),
        "the refusal names file, line and key:\n{log}"
    );
    drop(proc);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn edge_binary_reloads_on_sighup_and_a_second_signal_exits_at_once() {
    let (held_tx, mut held) = mpsc::unbounded_channel();
    let origin = start_origin(move |req: http::Request<hyper::body::Incoming>| {
        let held_tx = held_tx.clone();
        async move {
            if req.uri().path() == "/hold" {
                let _ = held_tx.send(());
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            http::Response::new(sluice::relay::full("ok"))
        }
    })
    .await;
    let dir = std::env::temp_dir().join(format!("sluice-edge-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("edge.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("edge.key"), ck.key_pair.serialize_pem()).unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (http_port, quic_port) = (free(), free());
    let hash = hex::encode(sluice::secret::Secret::new("t").sha256());
    let file = dir.join("edge.toml");
    let write = |hostnames: &str, extra: &str| {
        std::fs::write(
            &file,
            format!(
                "{extra}\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n[connectors]\nlisten = \"127.0.0.1:{quic_port}\"\n\
                 cert = \"edge.crt\"\nkey = \"edge.key\"\n[[tunnel]]\nid = \"app\"\ntoken-sha256 = \"{hash}\"\nhostnames = [{hostnames}]\n"
            ),
        )
        .unwrap()
    };
    write("\"app.test\"", "");
    let proc = Proc::spawn("edge", &file);
    proc.wait_log("listening for clients (HTTP)", 1).await;
    let http: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();

    let mut cfg = sluice::config::ConnectorConfig::new("app", sluice::secret::Secret::new("t"));
    cfg.edges = vec![format!("127.0.0.1:{quic_port}")];
    cfg.edge_server_name = Some("localhost".into());
    cfg.edge_ca = vec![ck.cert.der().clone()];
    cfg.origins = vec![http_origin("o", origin)];
    cfg.ingress = vec![rule(None, None, "o")];
    cfg.grace_period = Duration::from_secs(1);
    let conn = start_connector(cfg).await;
    conn.registered(2).await;
    assert_eq!(get(http, "app.test", "/").await.text(), "ok");
    assert_eq!(get(http, "new.test", "/").await.status, 404);

    // A new hostname, applied without dropping the registered connections.
    write("\"app.test\", \"new.test\"", "");
    proc.signal("HUP");
    proc.wait_log("reloaded tunnels", 1).await;
    assert_eq!(get(http, "new.test", "/").await.text(), "ok");
    assert_eq!(conn.state.registered(), 2);

    // A broken file is refused; the running tunnels keep serving.
    write("\"app.test\"", "max-header-size = \"lots\"");
    proc.signal("HUP");
    proc.wait_log("reload refused", 1).await;
    assert_eq!(get(http, "new.test", "/").await.text(), "ok");

    // SIGTERM waits for the held request; a second SIGTERM exits at once.
    let holding = tokio::spawn(async move { get(http, "app.test", "/hold").await });
    tokio::time::timeout(WAIT, held.recv())
        .await
        .unwrap()
        .unwrap();
    proc.signal("TERM");
    proc.wait_log("waiting for client connections to finish", 1)
        .await;
    let mut proc = proc;
    assert!(
        proc.child.try_wait().unwrap().is_none(),
        "the edge did not wait for the request in flight"
    );
    proc.signal("TERM");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = proc.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a second signal did not stop the edge"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(130));
    holding.abort();
    conn.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_racing_a_token_rotation_never_stays_with_the_old_token() {
    let old = tunnel("app", "old", &["app.test"]);
    let new = tunnel("app", "new", &["app.test"]);
    let edge = start_edge(vec![old.clone()], |_| {}).await;
    let reloader = edge.reloader.clone().unwrap();
    let ep = raw_quic_client(&edge, sluice::proto::ALPN);
    for round in 0..30 {
        reloader.reload(&edge_config_with(&edge, vec![old.clone()]));
        let (reg, ()) = tokio::join!(raw_register(&ep, &edge, "app", "old"), async {
            // Rotate at varying points of the registration.
            tokio::time::sleep(Duration::from_micros(200 * (round % 10))).await;
            reloader.reload(&edge_config_with(&edge, vec![new.clone()]));
        });
        // Registered with the old token just before the rotation: the rotation closes it.
        // Never does a connection stay registered with a token the edge no longer accepts.
        if reg.registered() {
            tokio::time::timeout(WAIT, reg.conn.closed())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "round {round}: a connection registered with the rotated token stayed open"
                    )
                });
        }
    }
    edge.shutdown.cancel();
}

#[tokio::test]
async fn a_second_signal_writes_the_queued_audit_events_before_exiting() {
    // The audit file is a FIFO this test reads only after the second signal: until then the
    // writer blocks on it and events queue up in the connector.
    let release = Arc::new(tokio::sync::Notify::new());
    let (held_tx, mut held) = mpsc::unbounded_channel();
    let gate = release.clone();
    let origin = start_origin(move |req: http::Request<hyper::body::Incoming>| {
        let (held_tx, gate) = (held_tx.clone(), gate.clone());
        async move {
            if req.uri().path() == "/hold" {
                let _ = held_tx.send(());
                gate.notified().await;
            }
            http::Response::new(sluice::relay::full("ok"))
        }
    })
    .await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let dir = std::env::temp_dir().join(format!("sluice-forced-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("edge-ca.crt"), &edge.ca_pem).unwrap();
    let fifo = dir.join("audit.fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    // A reader must exist before the connector can open the FIFO for writing.
    let reader = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc_nonblock())
            .open(&fifo)
            .unwrap()
    };
    let file = dir.join("connector.toml");
    std::fs::write(
        &file,
        format!(
            "tunnel = \"app\"\ntoken = \"t\"\nedges = [\"{}\"]\nedge-ca = \"edge-ca.crt\"\n\
             edge-server-name = \"localhost\"\nha-connections = 1\n\
             [audit]\nfile = \"audit.fifo\"\nqueue = 2000\n\
             [[plugin]]\nname = \"auditor\"\npath = \"{}\"\n[plugin.config]\naudit = true\n\
             [[origin]]\nname = \"o\"\nurl = \"http://{origin}\"\n\
             [[ingress]]\norigin = \"o\"\nplugins = [\"auditor\"]\n",
            edge.quic,
            fixture("echo").display()
        ),
    )
    .unwrap();
    let mut proc = Proc::spawn("connector", &file);
    // The binary compiles its plugins in a helper process, never in the connector itself.
    proc.wait_log("compiled=\"helper process\"", 1).await;
    proc.wait_log("registered with the edge", 1).await;

    // Far more events than the FIFO holds: the rest wait in the connector's queue.
    const N: usize = 600;
    for i in 0..N {
        assert_eq!(
            get(edge.http, "app.test", &format!("/ok/{i}")).await.status,
            200
        );
    }
    let http = edge.http;
    let holding = tokio::spawn(async move { get(http, "app.test", "/hold").await });
    tokio::time::timeout(WAIT, held.recv())
        .await
        .unwrap()
        .unwrap();
    proc.signal("TERM");
    proc.wait_log("draining: waiting for in-flight requests", 1)
        .await;
    proc.signal("TERM");
    // Read everything the connector writes until it exits (the FIFO then reaches its end).
    let text = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut reader = reader;
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the connector never closed the audit file"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("reading the FIFO: {e}"),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap();
    let status = proc.child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let written = text
        .lines()
        .filter(|l| l.contains("\"kind\":\"complete\""))
        .count();
    assert_eq!(written, N, "events lost at the forced exit");
    release.notify_waiters();
    holding.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `O_NONBLOCK`, so that opening the FIFO for reading does not wait for a writer.
fn libc_nonblock() -> i32 {
    0o4000
}

/// The edge's `/status` view of `tunnel`'s connections: (token index, draining) of each.
async fn tokens_in_use(admin: std::net::SocketAddr, tunnel: &str) -> Vec<(i64, bool)> {
    let status = get(admin, "admin", "/status").await.json();
    status["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["id"] == tunnel)
        .flat_map(|t| t["connections"].as_array().unwrap().clone())
        .map(|c| (c["token"].as_i64().unwrap_or(-1), c["draining"] == true))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotation_under_load_fails_no_request() {
    let origin = named("web", None).await;
    // At its limit of connections, as a tunnel sized for its connectors is: a replacement
    // must still fit.
    let app = |token: &str| sluice::config::TunnelConfig {
        max_connections: 2,
        ports: Vec::new(),
        ..tunnel("app", token, &["app.test"])
    };
    let edge = start_edge(vec![app("old")], |c| c.admin_listen = Some(loopback())).await;
    let (admin, reloader) = (edge.admin.unwrap(), edge.reloader.clone().unwrap());
    let cfg = connector_config(
        &edge,
        "app",
        "old",
        vec![http_origin("web", origin)],
        vec![],
    );
    let conn = start_connector(cfg.clone()).await;
    conn.registered(2).await;

    // Clients that keep asking until told to stop; every answer must be a 200.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let http = edge.http;
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = get(http, "app.test", "/").await;
                    if r.status == 200 {
                        ok += 1;
                    } else {
                        failed.push(format!("{} {}", r.status, r.text()));
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    // The fewest connections registered at any moment, sampled.
    let state = conn.state.clone();
    let sampler_stop = stop.clone();
    let sampler = tokio::spawn(async move {
        let mut fewest = usize::MAX;
        while !sampler_stop.load(std::sync::atomic::Ordering::Relaxed) {
            fewest = fewest.min(state.registered());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        fewest
    });

    let both = {
        let mut t = app("old");
        t.token_hashes
            .push(sluice::secret::Secret::new("new").sha256());
        t
    };
    let mut rotated = cfg.clone();
    rotated.token = sluice::secret::Secret::new("new");

    // The wrong order first: the connector gets the new token before the edge accepts it.
    // Its attempts are refused and the connections registered with the old token serve on.
    conn.reloader.reload(&rotated).await.unwrap();
    tokio::time::timeout(WAIT, async {
        while !get(admin, "admin", "/metrics")
            .await
            .text()
            .contains(r#"registration_failures_total{kind="unauthorized"}"#)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the early attempt with the new token was not refused");

    // The edge accepts both tokens: the connector re-registers connection by connection.
    reloader.reload(&edge_config_with(&edge, vec![both]));
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let conns = tokens_in_use(admin, "app").await;
            if conns.len() == 2
                && conns
                    .iter()
                    .all(|&(token, draining)| token == 1 && !draining)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the connections did not all move to the new token");

    // The old token is retired: nothing registered with it is left to close.
    reloader.reload(&edge_config_with(&edge, vec![app("new")]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (ok, failed) = c.await.unwrap();
        assert!(
            failed.is_empty(),
            "requests failed during the rotation: {failed:?}"
        );
        total += ok;
    }
    assert!(
        total > 50,
        "too little load to show anything: {total} requests"
    );
    let fewest = sampler.await.unwrap();
    assert!(
        fewest >= 2,
        "the connector dropped to {fewest} registered connections"
    );
    assert_eq!(
        tokens_in_use(admin, "app").await,
        vec![(0, false), (0, false)]
    );
    assert_eq!(get(http, "app.test", "/").await.status, 200);
    conn.stop().await;
}
