//! Origin pools through the tunnel: a member stopped under load costs no request (the
//! request whose connection fails goes to another member, and the health check takes the
//! stopped one out); `hash` keeps a key on its member; `/metrics` shows each member.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sluice::config::{Balance, HashKey, HealthCheck, PoolConfig, Probe};
use support::*;
use tokio_util::sync::CancellationToken;

/// A member answering its name; cancelling `stop` closes its port and its connections.
async fn member(name: &'static str, stop: CancellationToken) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve_member(listener, name, stop);
    addr
}

/// Serves `name` on `listener` until `stop`.
fn serve_member(listener: tokio::net::TcpListener, name: &'static str, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => match a { Ok((t, _)) => t, Err(_) => return },
            };
            let stop = stop.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(Response::new(sluice::relay::full(name)))
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    });
}

/// GET `/` of `app.test` with one more header.
async fn get_with(http: std::net::SocketAddr, name: &'static str, value: String) -> Reply {
    send(
        http,
        Request::get("/")
            .header("host", "app.test")
            .header(name, value)
            .body(Full::default())
            .unwrap(),
    )
    .await
}

fn pool(balance: Balance, health: Option<HealthCheck>) -> PoolConfig {
    PoolConfig {
        name: "api".into(),
        members: vec!["a".into(), "b".into(), "c".into()],
        balance,
        health,
        eject_after: 1,
        eject_for: Duration::from_secs(30),
    }
}

async fn pool_tunnel(
    config: PoolConfig,
    stops: &[CancellationToken; 3],
) -> (EdgeHandle, ConnectorHandle) {
    let mut origins = Vec::new();
    for (name, stop) in ["a", "b", "c"].into_iter().zip(stops) {
        origins.push(http_origin(name, member(name, stop.clone()).await));
    }
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let mut cfg = connector_config(&edge, "app", "t", origins, vec![rule(None, None, "api")]);
    cfg.pools = vec![config];
    cfg.admin_listen = Some(loopback());
    let conn = start_connector(cfg).await;
    conn.registered(1).await;
    (edge, conn)
}

#[tokio::test]
async fn a_member_stopped_under_load_costs_no_request() {
    let stops: [CancellationToken; 3] = Default::default();
    let check = HealthCheck {
        probe: Probe::Http("/healthz".into()),
        interval: Duration::from_millis(200),
        timeout: Duration::from_millis(200),
        healthy_threshold: 1,
        unhealthy_threshold: 1,
    };
    let (edge, conn) = pool_tunnel(pool(Balance::RoundRobin, Some(check)), &stops).await;
    let admin = conn.admin.unwrap();

    let served: Arc<std::sync::Mutex<HashMap<String, usize>>> = Arc::default();
    let failed = Arc::new(AtomicUsize::new(0));
    let after_stop = Arc::new(AtomicUsize::new(0));
    let stopped_at = CancellationToken::new();
    let done = CancellationToken::new();
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (served, failed, after_stop) = (served.clone(), failed.clone(), after_stop.clone());
        let (stopped_at, done) = (stopped_at.clone(), done.clone());
        let http = edge.http;
        clients.push(tokio::spawn(async move {
            while !done.is_cancelled() {
                let reply = send(
                    http,
                    Request::get("/")
                        .header("host", "app.test")
                        .body(Full::default())
                        .unwrap(),
                )
                .await;
                if reply.status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                *served.lock().unwrap().entry(reply.text()).or_default() += 1;
                if stopped_at.is_cancelled() {
                    after_stop.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Let the load settle on all three, then stop b, and keep the load on.
    let wait_for = |n: usize| {
        let served = served.clone();
        async move {
            tokio::time::timeout(WAIT, async {
                while served.lock().unwrap().values().sum::<usize>() < n {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("the load did not get going")
        }
    };
    wait_for(300).await;
    stops[1].cancel();
    stopped_at.cancel();
    // Until b's health check has failed and a good number of requests have gone since.
    tokio::time::timeout(WAIT, async {
        loop {
            let metrics = get(admin, "admin", "/metrics").await.text();
            if metrics.contains(r#"sluice_connector_pool_member_healthy{pool="api",member="b"} 0"#)
                && after_stop.load(Ordering::Relaxed) >= 500
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("b was never taken out of the pool");
    done.cancel();
    for c in clients {
        c.await.unwrap();
    }
    let served = served.lock().unwrap().clone();
    let failed = failed.load(Ordering::Relaxed);
    eprintln!("served {served:?}, failed {failed}");
    assert_eq!(
        failed, 0,
        "requests failed while b stopped (served {served:?})"
    );
    assert!(
        served["a"] > 100 && served["c"] > 100 && served["b"] > 50,
        "{served:?}"
    );

    let metrics = get(admin, "admin", "/metrics").await.text();
    for m in ["a", "c"] {
        assert!(
            metrics.contains(&format!(
                r#"sluice_connector_pool_member_healthy{{pool="api",member="{m}"}} 1"#
            )),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains(r#"sluice_connector_pool_member_requests_total{pool="api",member="a"}"#)
    );
    conn.stop().await;
}

#[tokio::test]
async fn hash_keeps_a_key_on_its_member_and_moves_only_the_stopped_ones_keys() {
    let stops: [CancellationToken; 3] = Default::default();
    let (edge, conn) = pool_tunnel(
        pool(Balance::Hash(HashKey::Header("x-user".into())), None),
        &stops,
    )
    .await;
    let as_user = |user: String| get_with(edge.http, "x-user", user);
    let mut home = HashMap::new();
    for u in 0..30 {
        let user = format!("user-{u}");
        let first = as_user(user.clone()).await.text();
        for _ in 0..4 {
            assert_eq!(as_user(user.clone()).await.text(), first, "{user} moved");
        }
        home.insert(user, first);
    }
    let used: std::collections::HashSet<&String> = home.values().collect();
    assert_eq!(
        used.len(),
        3,
        "30 keys on fewer than three members: {home:?}"
    );

    // c stops: its keys move (after one failed connection each, retried elsewhere); the
    // others' stay where they were.
    stops[2].cancel();
    for (user, member) in &home {
        let reply = as_user(user.clone()).await;
        assert_eq!(reply.status, 200, "{user}");
        if member != "c" {
            assert_eq!(&reply.text(), member, "{user} moved though {member} is up");
        } else {
            assert_ne!(reply.text(), "c");
        }
    }
    conn.stop().await;
}

/// A member on a fixed address (one that was stopped, started again).
async fn member_at(addr: std::net::SocketAddr, name: &'static str, stop: CancellationToken) {
    // The port was just closed: binding it again may take a moment.
    let listener = tokio::time::timeout(WAIT, async {
        loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("could not bind the member's port again");
    serve_member(listener, name, stop);
}

#[tokio::test]
async fn a_connection_check_brings_a_member_back_and_a_plugin_may_name_the_pool() {
    let stops: [CancellationToken; 3] = Default::default();
    let check = HealthCheck {
        probe: Probe::Connect,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(200),
        healthy_threshold: 1,
        unhealthy_threshold: 1,
    };
    let mut origins = Vec::new();
    let mut addrs = Vec::new();
    for (name, stop) in ["a", "b", "c"].into_iter().zip(&stops) {
        let addr = member(name, stop.clone()).await;
        addrs.push(addr);
        origins.push(http_origin(name, addr));
    }
    origins.push(http_origin("web", echo_origin("web").await));
    // The rule goes to "web"; origin-router sends `x-pool` requests to the pool instead.
    let mut router = sluice::config::PluginConfig::new("router", example_plugin("origin-router"));
    router.config_json = serde_json::to_vec(&serde_json::json!({
        "routes": [{"origin": "api", "header": {"name": "x-pool"}}]
    }))
    .unwrap();
    router.timeout = Duration::from_secs(1);
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let mut r = rule(None, None, "web");
    r.plugins = vec!["router".into()];
    let mut cfg = connector_config(&edge, "app", "t", origins, vec![r]);
    cfg.pools = vec![pool(Balance::LeastRequests, Some(check))];
    cfg.plugins = vec![router];
    cfg.admin_listen = Some(loopback());
    let conn = start_connector(cfg).await;
    conn.registered(1).await;
    let admin = conn.admin.unwrap();
    let to_pool = || async { get_with(edge.http, "x-pool", "1".into()).await.text() };
    let health = |member: &'static str, up: bool| async move {
        let line = format!(
            r#"sluice_connector_pool_member_healthy{{pool="api",member="{member}"}} {}"#,
            u8::from(up)
        );
        tokio::time::timeout(WAIT, async {
            while !get(admin, "admin", "/metrics").await.text().contains(&line) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{member} never became {}",
                if up { "healthy" } else { "unhealthy" }
            )
        });
    };
    // Without the header the rule's origin answers; with it, the pool (least requests: one
    // request at a time goes to each member in turn).
    assert!(get(edge.http, "app.test", "/")
        .await
        .text()
        .contains("\"origin\":\"web\""));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        seen.insert(to_pool().await);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    stops[2].cancel();
    health("c", false).await;
    for _ in 0..6 {
        assert_ne!(to_pool().await, "c");
    }
    // c comes back on its address; its connection check passes and it takes requests again.
    member_at(addrs[2], "c", CancellationToken::new()).await;
    health("c", true).await;
    let mut back = false;
    for _ in 0..6 {
        back |= to_pool().await == "c";
    }
    assert!(back, "c took no request after coming back");
    conn.stop().await;
}

/// A request whose first member refuses the connection goes to another with its body whole,
/// through a body hook (whose filter ended before the retry).
#[tokio::test]
async fn a_retried_request_keeps_its_body_through_a_body_hook() {
    let dead = {
        let l = tokio::net::TcpListener::bind(loopback()).await.unwrap();
        l.local_addr().unwrap()
    };
    let live = start_origin(|req: Request<Incoming>| async move {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(sluice::relay::full(format!(
            "b got {}",
            String::from_utf8_lossy(&body)
        )))
    })
    .await;
    let mut hook = sluice::config::PluginConfig::new("upper", fixture("bodies"));
    hook.config_json = br#"{"request": "upper", "response": "pass"}"#.to_vec();
    hook.timeout = Duration::from_secs(1);
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let mut r = rule(None, None, "api");
    r.plugins = vec!["upper".into()];
    let mut cfg = connector_config(
        &edge,
        "app",
        "t",
        vec![http_origin("a", dead), http_origin("b", live)],
        vec![r],
    );
    let mut p = pool(Balance::RoundRobin, None);
    p.members = vec!["a".into(), "b".into()];
    cfg.pools = vec![p];
    cfg.plugins = vec![hook];
    cfg.admin_listen = Some(loopback());
    let conn = start_connector(cfg).await;
    conn.registered(1).await;
    for _ in 0..4 {
        let reply = send(
            edge.http,
            Request::post("/")
                .header("host", "app.test")
                .body(Full::new(bytes::Bytes::from_static(b"hello")))
                .unwrap(),
        )
        .await;
        assert_eq!((reply.status, reply.text().as_str()), (200, "b got HELLO"));
    }
    // Passive ejection (eject-after = 1, no health check): the first refusal took a out, and
    // no later request was sent to it.
    let metrics = get(conn.admin.unwrap(), "admin", "/metrics").await.text();
    for line in [
        r#"sluice_connector_pool_member_healthy{pool="api",member="a"} 0"#,
        r#"sluice_connector_pool_member_requests_total{pool="api",member="a"} 1"#,
        r#"sluice_connector_pool_member_requests_total{pool="api",member="b"} 4"#,
    ] {
        assert!(metrics.contains(line), "missing {line}:\n{metrics}");
    }
    conn.stop().await;
}
