//! A lossless lifecycle: draining a connector or reloading an edge under load loses no
//! request, a response in flight when the drain starts reaches the client whole, the admin
//! listener keeps answering (`/ready` 503) while a connector drains, and a token rotated while
//! a registration is in flight leaves no connection registered with the old token.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use support::*;
use tokio_util::sync::CancellationToken;

/// Statuses (or failures) seen by the load, by count.
type Tally = Arc<Mutex<BTreeMap<String, usize>>>;

/// `clients` keep-alive clients sending GETs to `edge` until `stop`.
fn load(
    edge: SocketAddr,
    clients: usize,
    stop: CancellationToken,
) -> (Tally, Vec<tokio::task::JoinHandle<()>>) {
    let tally: Tally = Arc::default();
    let tasks = (0..clients)
        .map(|_| {
            let (tally, stop) = (tally.clone(), stop.clone());
            tokio::spawn(async move {
                let mut sender = None;
                while !stop.is_cancelled() {
                    if sender.is_none() {
                        let tcp = tokio::net::TcpStream::connect(edge).await.unwrap();
                        let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                            .await
                            .unwrap();
                        tokio::spawn(c);
                        sender = Some(s);
                    }
                    let s = sender.as_mut().unwrap();
                    let req = Request::get("/file")
                        .header("host", "app.test")
                        .body(Full::<Bytes>::default())
                        .unwrap();
                    let outcome = match s.send_request(req).await {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            match resp.into_body().collect().await.map(|b| b.to_bytes()) {
                                Ok(b) if status == 200 && b.len() == 100 => "200".to_string(),
                                Ok(b) => {
                                    format!("{status}: {}", String::from_utf8_lossy(&b))
                                }
                                Err(e) => format!("{status}, body failed: {e}"),
                            }
                        }
                        Err(e) => {
                            sender = None;
                            format!("request failed: {e}")
                        }
                    };
                    *tally.lock().unwrap().entry(outcome).or_default() += 1;
                }
            })
        })
        .collect();
    (tally, tasks)
}

/// An edge and two connectors of tunnel `app`, each sending everything to `origin`.
async fn two_connectors(origin: SocketAddr) -> (EdgeHandle, ConnectorHandle, ConnectorHandle) {
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let config = || connector_config(&edge, "app", "t", vec![http_origin("web", origin)], vec![]);
    let a = start_connector(config()).await;
    let b = start_connector(config()).await;
    a.registered(2).await;
    b.registered(2).await;
    (edge, a, b)
}

/// A 100-byte file.
async fn file_origin() -> SocketAddr {
    start_origin(|_req: Request<Incoming>| async {
        Response::new(sluice::relay::full(vec![b'f'; 100]))
    })
    .await
}

async fn finish(
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    tally: &Tally,
) -> BTreeMap<String, usize> {
    stop.cancel();
    for t in tasks {
        tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
    }
    tally.lock().unwrap().clone()
}

fn assert_all_ok(tally: &BTreeMap<String, usize>, what: &str) {
    let ok = tally.get("200").copied().unwrap_or(0);
    assert!(ok > 100, "{what}: only {ok} requests completed: {tally:?}");
    assert_eq!(
        tally.len(),
        1,
        "{what}: not every response was a 200: {tally:?}"
    );
    eprintln!("{what}: {ok} responses, all 200");
}

/// An origin whose `/slow` answers a 1 MiB body after `delay`, announcing the request first.
async fn slow_origin(delay: Duration) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = start_origin(move |_req: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(());
            tokio::time::sleep(delay).await;
            Response::new(sluice::relay::full(vec![b's'; 1 << 20]))
        }
    })
    .await;
    (addr, rx)
}

over_both_transports! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn draining_one_of_two_connectors_under_load_loses_nothing() {
        let (edge, a, b) = two_connectors(file_origin().await).await;
        let stop = CancellationToken::new();
        let (tally, tasks) = load(edge.http, 32, stop.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;
        // SIGTERM's effect on one connector, under load.
        a.shutdown.cancel();
        tokio::time::timeout(WAIT, a.task)
            .await
            .expect("the drained connector did not exit")
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let tally = finish(stop, tasks, &tally).await;
        assert_all_ok(&tally, "connector drained under load");
        b.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reloading_the_edge_under_load_loses_nothing() {
        let (edge, a, b) = two_connectors(file_origin().await).await;
        let tunnels = vec![tunnel("app", "t", &["app.test"])];

        let stop = CancellationToken::new();
        let (tally, tasks) = load(edge.http, 32, stop.clone());
        let reloader = edge.reloader.clone().unwrap();
        let mut cfg = sluice::config::EdgeConfig::new(loopback(), edge.identity.clone());
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // SIGHUP's effect: the same tunnel, now with a second hostname every other time.
            let mut t = tunnels.clone();
            if i % 2 == 0 {
                t[0].hostnames
                    .push(sluice::config::HostPattern::try_from("app2.test").unwrap());
            }
            cfg.tunnels = t;
            reloader.reload(&cfg);
        }
        let tally = finish(stop, tasks, &tally).await;
        assert_all_ok(&tally, "edge reloaded 20 times under load");
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test]
    async fn a_response_in_flight_when_the_drain_starts_arrives_whole() {
        for round in 0..3 {
            let (origin, mut started) = slow_origin(Duration::from_millis(600)).await;
            let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
            let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("web", origin)], vec![]);
            cfg.admin_listen = Some(loopback());
            let conn = start_connector(cfg).await;
            conn.registered(2).await;
            let admin = conn.admin.unwrap();

            let http = edge.http;
            let slow = tokio::spawn(async move { get(http, "app.test", "/slow").await });
            tokio::time::timeout(WAIT, started.recv()).await.unwrap();
            conn.shutdown.cancel();
            // While the drain lasts, the admin port answers: live, not ready.
            let live = get(admin, "admin", "/live").await;
            let ready = get(admin, "admin", "/ready").await;
            assert_eq!((live.status, ready.status), (200, 503), "round {round}");

            let reply = tokio::time::timeout(WAIT, slow).await.unwrap().unwrap();
            assert_eq!(reply.status, 200, "round {round}: {}", reply.text());
            assert_eq!(reply.body.len(), 1 << 20, "round {round}");
            tokio::time::timeout(WAIT, conn.task)
                .await
                .expect("the connector did not exit after its drain")
                .unwrap();
            edge.shutdown.cancel();
        }
    }

    #[tokio::test]
    async fn the_audit_event_of_a_request_cut_off_by_the_grace_period_is_written() {
        let dir = support::scratch_dir("grace-audit");
        let file = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&file);
        let (tx, mut held) = tokio::sync::mpsc::unbounded_channel();
        let origin = start_origin(move |_req: Request<Incoming>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(());
                tokio::time::sleep(Duration::from_secs(60)).await;
                Response::new(sluice::relay::full("late"))
            }
        })
        .await;
        let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
        let mut r = rule(None, None, "web");
        r.plugins = vec!["auditor".into()];
        let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("web", origin)], vec![r]);
        let mut auditor = sluice::config::PluginConfig::new("auditor", fixture("echo"));
        auditor.config_json = serde_json::to_vec(&serde_json::json!({"audit": true})).unwrap();
        cfg.plugins = vec![auditor];
        cfg.audit = sluice::config::AuditConfig {
            stdout: false,
            file: Some(file.clone()),
            queue: 4,
        };
        cfg.grace_period = Duration::from_millis(300);
        let conn = start_connector(cfg).await;
        conn.registered(2).await;

        let http = edge.http;
        let request = tokio::spawn(async move { get(http, "app.test", "/held").await });
        tokio::time::timeout(WAIT, held.recv()).await.unwrap();
        conn.shutdown.cancel();
        tokio::time::timeout(WAIT, conn.task)
            .await
            .expect("the connector did not stop after its grace period")
            .unwrap();
        // Read the moment the connector has stopped: the cut-off request's event is there.
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            text.lines().any(|l| l.contains("\"path\":\"/held\"")),
            "the audit file lacks the cut-off request's event:\n{text}"
        );
        request.abort();
        edge.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
