//! Admission control: past `max-concurrent-requests`, requests get 503 with Retry-After at
//! once instead of queueing, and memory stays bounded when clients outpace the origin.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::sync::Notify;

/// An origin that holds every request until `release` is notified, counting arrivals.
async fn gated_origin(arrived: Arc<AtomicUsize>, release: Arc<Notify>) -> std::net::SocketAddr {
    start_origin(move |_req: http::Request<hyper::body::Incoming>| {
        let (arrived, release) = (arrived.clone(), release.clone());
        async move {
            arrived.fetch_add(1, Ordering::SeqCst);
            release.notified().await;
            http::Response::new(sluice::relay::full("done"))
        }
    })
    .await
}

#[tokio::test]
async fn connector_limit_refuses_excess_at_once_without_queueing() {
    const LIMIT: usize = 20;
    const CLIENTS: usize = 400;
    let arrived = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let origin = gated_origin(arrived.clone(), release.clone()).await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |c| {
        c.admin_listen = Some(loopback());
        // Every client of this test comes from 127.0.0.1.
        c.max_connections_per_client = 2 * CLIENTS;
    })
    .await;
    let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("slow", origin)], vec![]);
    cfg.max_concurrent_requests = LIMIT;
    cfg.admin_listen = Some(loopback());
    let connector = sluice::connector::Connector::new(cfg).await.unwrap();
    let admin = connector.admin_addr().unwrap();
    let state = connector.state();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(connector.run(stop.clone()));
    tokio::time::timeout(WAIT, state.wait_registered(2))
        .await
        .unwrap();

    // Fill the limit with requests the origin holds.
    let http = edge.http;
    let held: Vec<_> = (0..LIMIT)
        .map(|_| tokio::spawn(async move { get(http, "app.test", "/").await }))
        .collect();
    tokio::time::timeout(WAIT, async {
        while arrived.load(Ordering::SeqCst) < LIMIT {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the first requests did not reach the origin");

    // Many more clients than the limit: every one is refused while the first are still held.
    let excess: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(async move { get(http, "app.test", "/").await }))
        .collect();
    for r in excess {
        let reply = r.await.unwrap();
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert_eq!(reply.headers["retry-after"], "1");
        assert!(
            reply.text().contains("max-concurrent-requests = 20"),
            "{}",
            reply.text()
        );
    }
    assert_eq!(
        arrived.load(Ordering::SeqCst),
        LIMIT,
        "refused requests must never reach the origin"
    );
    // Nothing was queued behind the held requests: all were refused while those still wait.
    assert!(
        held.iter().all(|h| !h.is_finished()),
        "a held request finished before the refusals came back"
    );

    let metrics = get(admin, "admin", "/metrics").await.text();
    assert!(
        metrics.contains(&format!(
            r#"sluice_connector_rejected_requests_total{{kind="limit"}} {CLIENTS}"#
        )),
        "{metrics}"
    );

    // Released, the held requests complete, and capacity returns.
    release.notify_waiters();
    for h in held {
        assert_eq!(h.await.unwrap().text(), "done");
    }
    let next = tokio::spawn(async move { get(http, "app.test", "/").await });
    tokio::time::timeout(WAIT, async {
        while arrived.load(Ordering::SeqCst) < LIMIT + 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    release.notify_waiters();
    assert_eq!(next.await.unwrap().status, 200);
    stop.cancel();
    let _ = tokio::time::timeout(WAIT, task).await;
}

#[tokio::test]
async fn edge_limits_each_tunnel() {
    let arrived = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let origin = gated_origin(arrived.clone(), release.clone()).await;
    let mut limited = tunnel("app", "t", &["app.test"]);
    limited.max_concurrent_requests = 3;
    let other = tunnel("other", "o", &["other.test"]);
    let edge = start_edge(vec![limited, other], |c| c.admin_listen = Some(loopback())).await;
    let conn = start_connector(connector_config(
        &edge,
        "app",
        "t",
        vec![http_origin("slow", origin)],
        vec![],
    ))
    .await;
    conn.registered(1).await;

    let http = edge.http;
    let held: Vec<_> = (0..3)
        .map(|_| tokio::spawn(async move { get(http, "app.test", "/").await }))
        .collect();
    tokio::time::timeout(WAIT, async {
        while arrived.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let reply = get(http, "app.test", "/").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(
        reply.text(),
        "sluice: tunnel app is at its limit of 3 concurrent requests\n"
    );
    // Another tunnel is not affected by this one's limit.
    assert_eq!(get(http, "other.test", "/").await.status, 502);
    let metrics = get(edge.admin.unwrap(), "admin", "/metrics").await.text();
    assert!(
        metrics.contains(r#"sluice_edge_rejected_requests_total{kind="tunnel-limit"} 1"#),
        "{metrics}"
    );
    release.notify_waiters();
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    conn.stop().await;
}
