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
    addr
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
    let as_user = |user: String| {
        let http = edge.http;
        async move {
            send(
                http,
                Request::get("/")
                    .header("host", "app.test")
                    .header("x-user", user)
                    .body(Full::default())
                    .unwrap(),
            )
            .await
        }
    };
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
