//! Wasm plugins on the request path, through the real tunnel: decisions, chains, audit,
//! failure policies, sandbox limits, and refusal of components that want more than granted.

mod support;

use sluice::admin::Exposition;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::Full;
use sluice::config::{
    AuditConfig, ConnectorConfig, Isolation, OnError, OriginConfig, OriginTarget, PluginConfig,
};
use sluice::plugin::{LoadError, Plugin, Runtime};
use support::*;

fn plugin(name: &str, fixture_name: &str, config: serde_json::Value) -> PluginConfig {
    let mut p = PluginConfig::new(name, fixture(fixture_name));
    p.config_json = serde_json::to_vec(&config).unwrap();
    // Generous: this machine is shared and tests run in parallel; the deadline tests set
    // their own.
    p.timeout = Duration::from_secs(1);
    p
}

/// A tunnel with an echo origin ("web"), a second origin ("other"), `plugins` loaded and the
/// catch-all rule running `chain`.
async fn tunnel_with(
    plugins: Vec<PluginConfig>,
    chain: &[&str],
    tweak: impl FnOnce(&mut ConnectorConfig),
) -> (EdgeHandle, ConnectorHandle) {
    plugin_tunnel(plugins, chain, &["web", "other"], tweak).await
}

#[tokio::test]
async fn components_wanting_filesystem_or_sockets_are_refused() {
    let runtime = Runtime::new(64 << 20, 16).unwrap();
    let metrics = Arc::new(sluice::admin::Metrics::new("t"));
    for (fixture_name, wanted) in [("fs", "wasi:filesystem/"), ("sockets", "wasi:sockets/")] {
        let err = Plugin::load(
            runtime.clone(),
            PluginConfig::new(fixture_name, fixture(fixture_name)),
            metrics.clone(),
        )
        .await
        .expect_err("a component importing more than granted was loaded");
        match &err {
            LoadError::ForbiddenImport { plugin, imports } => {
                assert_eq!(plugin, fixture_name);
                assert!(imports.iter().any(|i| i.starts_with(wanted)), "{imports:?}");
            }
            other => panic!("unexpected error: {other}"),
        }
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("plugin {fixture_name:?} imports wasi:")),
            "{text}"
        );
        assert!(text.contains(wanted), "{text}");
    }
    // The well-behaved fixture, with everything Rust's std links in, loads.
    Plugin::load(runtime, PluginConfig::new("echo", fixture("echo")), metrics)
        .await
        .unwrap();
}

#[tokio::test]
async fn init_errors_stop_the_connector_naming_plugin_and_message() {
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let mut cfg = connector_config(
        &edge,
        "app",
        "t",
        vec![http_origin("web", loopback())],
        vec![],
    );
    cfg.plugins = vec![plugin("picky", "echo", serde_json::json!({"reject": true}))];
    let err = sluice::connector::Connector::new(cfg)
        .await
        .err()
        .expect("connector started with a rejected config");
    assert_eq!(
        err.to_string(),
        "plugin \"picky\" rejected its configuration: \"this configuration is rejected on purpose\""
    );
    // Not a component at all.
    let mut cfg = connector_config(
        &edge,
        "app",
        "t",
        vec![http_origin("web", loopback())],
        vec![],
    );
    let junk = std::env::temp_dir().join(format!("sluice-junk-{}.wasm", std::process::id()));
    std::fs::write(&junk, b"not wasm").unwrap();
    cfg.plugins = vec![PluginConfig::new("junk", &junk)];
    let err = sluice::connector::Connector::new(cfg)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.starts_with("plugin \"junk\": cannot load"), "{err}");
    let _ = std::fs::remove_file(junk);
}

/// What `sluice:plugin@0.2.0` adds, through the tunnel, with a plugin built by the SDK: a
/// value kept in the request's context from `on-request` to `on-response` (and never into
/// the next request served by the same instance); a counter in the plugin's key-value store,
/// which needs the `kv` grant and outlives a reload; a response whose status and body the
/// plugin replaced, with an exact `content-length`; and a hook the plugin left to the SDK's
/// default, called once and then no more.
#[tokio::test]
async fn a_0_2_plugin_keeps_context_and_kv_replaces_bodies_and_is_not_called_for_what_it_lacks() {
    let config = serde_json::json!({"remember": "/r", "mask_from": 500, "mask_status": 503, "mask_body": "sorry, later\n"});
    // It uses the key-value store: refused at load without the grant, naming it.
    let runtime = Runtime::new(64 << 20, 4).unwrap();
    let metrics = Arc::new(sluice::admin::Metrics::new("t"));
    let mut ungranted = plugin("stateful", "stateful", config.clone());
    ungranted.grants.metrics = true;
    let err = Plugin::load(runtime, ungranted, metrics).await.unwrap_err();
    assert!(
        matches!(err, LoadError::NotGranted { grant: "kv", .. }),
        "{err}"
    );
    assert!(err.to_string().contains(r#"grants = ["kv"]"#), "{err}");
    let mut p = plugin("stateful", "stateful", config);
    p.grants.kv = true;
    p.grants.metrics = true;
    let failing = start_origin(|req: Request<hyper::body::Incoming>| async move {
        let status = if req.uri().path().starts_with("/boom") {
            500
        } else {
            200
        };
        let mut resp = hyper::Response::new(sluice::relay::full("origin body: internal details"));
        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        resp
    })
    .await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let mut r = rule(None, None, "web");
    r.plugins = vec!["stateful".into()];
    let mut cfg = connector_config(
        &edge,
        "app",
        "t",
        vec![http_origin("web", failing)],
        vec![r],
    );
    cfg.plugins = vec![p];
    cfg.admin_listen = Some(loopback());
    let conn = start_connector(cfg.clone()).await;
    conn.registered(1).await;

    let admin = conn.admin.unwrap();
    let calls = |metrics: &str, hook: &str| {
        let key = format!(
            r#"sluice_connector_plugin_hook_duration_seconds_count{{plugin="stateful",hook="{hook}"}} "#
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .map(str::to_string)
    };
    let first = get(edge.http, "app.test", "/r/one").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.headers["x-hits"], "1");
    assert_eq!(first.headers["x-remembered"], "/r/one");
    assert_eq!(first.text(), "origin body: internal details");
    // on-complete runs after the answer: wait for the first request's.
    tokio::time::timeout(WAIT, async {
        let ran = |n: Option<String>| n.is_some_and(|n| n != "0");
        while !ran(calls(
            &get(admin, "admin", "/metrics").await.text(),
            "on-complete",
        )) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("on-complete never ran");
    // One instance serves the requests one after the other (reuse): the next request's
    // context starts empty.
    for hits in 2..=4 {
        let next = get(edge.http, "app.test", "/other").await;
        assert_eq!(next.headers["x-remembered"], "none");
        // Kept in the plugin's namespace from one request to the next.
        assert_eq!(next.headers["x-hits"], hits.to_string());
    }

    let masked = get(edge.http, "app.test", "/boom").await;
    assert_eq!(masked.status, 503);
    assert_eq!(masked.text(), "sorry, later\n");
    assert_eq!(masked.headers["content-length"], "13");
    assert_eq!(masked.headers["content-type"], "text/plain");

    let metrics = get(admin, "admin", "/metrics").await.text();
    let count = |hook| calls(&metrics, hook).unwrap_or_else(|| panic!("no {hook}:\n{metrics}"));
    assert_eq!(count("on-request"), "5");
    assert_eq!(count("on-response"), "5");
    // Not implemented: said so on the first request, never called again.
    assert_eq!(count("on-complete"), "1");
    // The plugin's own counter, under its name.
    for (kind, n) in [("remembered", 1), ("other", 4)] {
        let line =
            format!(r#"sluice_connector_plugin_stateful_requests_total{{path="{kind}"}} {n}"#);
        assert!(metrics.contains(&line), "no {line}:\n{metrics}");
    }

    // The key-value namespace outlives a reload.
    conn.reloader.reload(&cfg).await.unwrap();
    let after = get(edge.http, "app.test", "/other").await;
    assert_eq!(after.headers["x-hits"], "6");
    conn.stop().await;
}

#[tokio::test]
async fn deadline_memory_and_errors_are_counted_in_metrics() {
    let mut p = plugin("strict", "misbehave", serde_json::json!({}));
    p.timeout = Duration::from_millis(200);
    p.memory = 8 << 20;
    let mut conn_cfg_admin = None;
    let web = echo_origin("web").await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let mut r = rule(None, None, "web");
    r.plugins = vec!["strict".into()];
    let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("web", web)], vec![r]);
    cfg.plugins = vec![p];
    cfg.admin_listen = Some(loopback());
    let connector = sluice::connector::Connector::new(cfg).await.unwrap();
    conn_cfg_admin.replace(connector.admin_addr().unwrap());
    let state = connector.state();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(connector.run(stop.clone()));
    tokio::time::timeout(WAIT, state.wait_registered(1))
        .await
        .unwrap();

    let start = std::time::Instant::now();
    assert_eq!(get(edge.http, "app.test", "/loop").await.status, 502);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the endless loop was not stopped by its deadline"
    );
    assert_eq!(get(edge.http, "app.test", "/oom").await.status, 502);
    assert_eq!(get(edge.http, "app.test", "/trap").await.status, 502);
    assert_eq!(get(edge.http, "app.test", "/ok").await.status, 200);

    let metrics = get(conn_cfg_admin.unwrap(), "admin", "/metrics")
        .await
        .text();
    for kind in ["timeout", "memory", "trap"] {
        let line =
            format!(r#"sluice_connector_plugin_errors_total{{plugin="strict",kind="{kind}"}} 1"#);
        assert!(metrics.contains(&line), "missing {line}:\n{metrics}");
    }
    assert!(metrics.contains(r#"sluice_connector_plugin_hook_duration_seconds_count{plugin="strict",hook="on-request"} 4"#), "{metrics}");
    stop.cancel();
    let _ = tokio::time::timeout(WAIT, task).await;
}

#[tokio::test]
async fn stdout_goes_to_the_log_and_grants_gate_what_a_plugin_sees() {
    let (logs, _guard) = capture_logs();
    let mut granted = plugin(
        "granted",
        "echo",
        serde_json::json!({"expose": true, "print": true}),
    );
    granted.grants = sluice::config::Grants::of(&["client-addr", "credentials"]);
    let plain = plugin("plain", "echo", serde_json::json!({"expose": true}));
    let web = echo_origin("web").await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let mut a = rule(None, Some("^/granted"), "web");
    a.plugins = vec!["granted".into()];
    let mut b = rule(None, None, "web");
    b.plugins = vec!["plain".into()];
    let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("web", web)], vec![a, b]);
    cfg.plugins = vec![granted, plain];
    let conn = start_connector(cfg).await;
    conn.registered(1).await;

    let req = |path: &str| {
        Request::get(path)
            .header("host", "app.test")
            .header("authorization", "Bearer x")
            .body(Full::default())
            .unwrap()
    };
    let reply = send(edge.http, req("/granted")).await;
    assert_eq!(reply.echoed("x-seen-auth").as_deref(), Some("visible"));
    assert!(reply
        .echoed("x-seen-client")
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert_eq!(reply.echoed("x-seen-xff").as_deref(), Some("127.0.0.1"));
    let reply = send(edge.http, req("/plain")).await;
    assert_eq!(reply.echoed("x-seen-auth").as_deref(), Some("hidden"));
    assert_eq!(reply.echoed("x-seen-client").as_deref(), Some("hidden"));
    assert_eq!(
        reply.echoed("x-seen-xff").as_deref(),
        Some("hidden"),
        "x-forwarded-for carries the client address too"
    );
    assert_eq!(
        reply.echoed("authorization").as_deref(),
        Some("Bearer x"),
        "hiding is for the plugin's view only"
    );

    logs.wait_for("echo fixture saw GET /granted").await;
    let line = logs
        .text()
        .lines()
        .find(|l| l.contains("echo fixture saw"))
        .unwrap()
        .to_string();
    assert!(
        line.contains("plugin=\"granted\"") && line.contains("stream=\"stdout\""),
        "{line}"
    );
    conn.stop().await;
}

#[tokio::test]
async fn per_request_isolation_and_recycling_serve_every_request() {
    let mut fresh = plugin("fresh", "echo", serde_json::json!({"tag": "fresh"}));
    fresh.isolation = Isolation::PerRequest;
    let mut recycled = plugin("recycled", "echo", serde_json::json!({"tag": "recycled"}));
    recycled.max_calls = 2;
    let (edge, conn) = tunnel_with(vec![fresh, recycled], &["fresh", "recycled"], |_| {}).await;
    for _ in 0..10 {
        let reply = get(edge.http, "app.test", "/").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.echoed("x-chain").as_deref(), Some("fresh,recycled"));
    }
    conn.stop().await;
}

#[tokio::test]
async fn builtin_origins_can_be_chosen_by_plugins_only_when_configured() {
    let plugins = vec![plugin(
        "router",
        "echo",
        serde_json::json!({"origin": "teapot"}),
    )];
    let (edge, conn) = tunnel_with(plugins, &["router"], |c| {
        c.origins
            .push(OriginConfig::new("teapot", OriginTarget::Status(418)));
    })
    .await;
    assert_eq!(get(edge.http, "app.test", "/").await.status, 418);
    conn.stop().await;
}

#[tokio::test]
async fn a_hook_spinning_to_its_deadline_blocks_no_other_request() {
    // The test runs on one thread: a hook that held it would hold everything.
    let mut spin = plugin("spin", "misbehave", serde_json::json!({}));
    // The longest deadline a plugin may have: room for the requests below on a loaded machine.
    spin.timeout = Duration::from_secs(10);
    let (edge, conn) = tunnel_with(vec![spin], &["spin"], |_| {}).await;
    let loops_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let loops: Vec<_> = (0..2)
        .map(|_| {
            let (http, done) = (edge.http, loops_done.clone());
            tokio::spawn(async move {
                let reply = get(http, "app.test", "/loop").await;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                reply.status
            })
        })
        .collect();
    // Let the loops reach the plugin (if they have not, the assertions below only get easier).
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..3 {
        let reply = get(edge.http, "app.test", "/fine").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(
            loops_done.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "request {i} waited for a spinning hook to reach its deadline"
        );
    }
    for l in loops {
        assert_eq!(l.await.unwrap(), 502, "the spinning hook was not stopped");
    }
    conn.stop().await;
}

#[tokio::test]
async fn per_request_instances_are_released_after_their_last_hook() {
    let (tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let slow = start_origin(move |_req| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(());
            tokio::time::sleep(Duration::from_millis(800)).await;
            http::Response::new(sluice::relay::full("slow"))
        }
    })
    .await;
    // misbehave exports only on-request: its instance is done once that has run.
    let mut once = plugin("once", "misbehave", serde_json::json!({}));
    once.isolation = Isolation::PerRequest;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let mut r = rule(None, None, "slow");
    r.plugins = vec!["once".into()];
    let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("slow", slow)], vec![r]);
    cfg.plugins = vec![once];
    cfg.admin_listen = Some(loopback());
    let conn = start_connector(cfg).await;
    conn.registered(1).await;
    let admin = conn.admin.unwrap();

    let http = edge.http;
    let request = tokio::spawn(async move { get(http, "app.test", "/x").await });
    tokio::time::timeout(WAIT, started.recv()).await.unwrap();
    // The origin is answering: the request is in flight, its instance already gone.
    let metrics = get(admin, "admin", "/metrics").await.text();
    assert!(
        metrics.contains(r#"sluice_connector_plugin_instances{plugin="once"} 0"#),
        "{metrics}"
    );
    assert_eq!(request.await.unwrap().status, 200);
    conn.stop().await;
}

#[tokio::test]
async fn an_exhausted_instance_pool_is_unavailable_never_skipped() {
    // A pool of two instances, per-request isolation, and a lenient policy that must not let
    // a request through without the plugin.
    let runtime = Runtime::new(64 << 20, 2).unwrap();
    let metrics = Arc::new(sluice::admin::Metrics::new("t"));
    let mut cfg = plugin("guard", "misbehave", serde_json::json!({}));
    cfg.isolation = Isolation::PerRequest;
    cfg.on_error = OnError::FailOpen;
    let guard = Plugin::load(runtime, cfg, metrics.clone()).await.unwrap();
    let view = || sluice::plugin::RequestView {
        method: "GET".into(),
        scheme: "http".into(),
        authority: "app.test".into(),
        path: "/".into(),
        headers: Default::default(),
        request_id: "r".into(),
        hostname: "app.test".into(),
        ingress_rule: 0,
        client_addr: None,
    };
    let (mut a, mut b, mut c) = <[sluice::plugin::Held; 3]>::default().into();
    assert!(guard.on_request(&mut a, view()).await.result.is_ok());
    assert!(guard.on_request(&mut b, view()).await.result.is_ok());
    let third = guard.on_request(&mut c, view()).await.result;
    assert_eq!(third.unwrap_err(), sluice::plugin::PluginError::Unavailable);
    assert!(metrics
        .encode()
        .contains(r#"t_plugin_errors_total{plugin="guard",kind="unavailable"} 1"#));
    // Released, the instances make room again.
    drop((a, b));
    assert!(guard.on_request(&mut c, view()).await.result.is_ok());
}

#[tokio::test]
async fn a_reload_frees_the_idle_instances_of_the_plugins_it_replaces() {
    let (tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let web = start_origin(move |req: http::Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            if req.uri().path() == "/slow" {
                let _ = tx.send(());
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            http::Response::new(sluice::relay::full("ok"))
        }
    })
    .await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let mut r = rule(None, None, "web");
    r.plugins = vec!["kept".into()];
    let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("web", web)], vec![r]);
    cfg.plugins = vec![plugin("kept", "echo", serde_json::json!({}))];
    cfg.admin_listen = Some(loopback());
    let conn = start_connector(cfg.clone()).await;
    conn.registered(1).await;
    let (admin, reloader) = (conn.admin.unwrap(), conn.reloader.clone());
    assert_eq!(get(edge.http, "app.test", "/").await.status, 200);
    let instances = || async {
        let text = get(admin, "admin", "/metrics").await.text();
        text.lines()
            .find(|l| l.starts_with(r#"sluice_connector_plugin_instances{plugin="kept"}"#))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(-1)
    };
    assert_eq!(instances().await, 1, "one idle instance is kept for reuse");
    // A request in flight keeps the replaced pipeline alive through the reload.
    let http = edge.http;
    let slow = tokio::spawn(async move { get(http, "app.test", "/slow").await });
    tokio::time::timeout(WAIT, started.recv()).await.unwrap();
    reloader.reload(&cfg).await.unwrap();
    // Only the current set's idle instance is left; the replaced one's was freed.
    assert_eq!(instances().await, 1);
    slow.abort();
    assert_eq!(get(edge.http, "app.test", "/").await.status, 200);
    conn.stop().await;
}

#[tokio::test]
async fn a_reload_compiles_plugins_without_stalling_requests() {
    // One thread runs everything here: compiling on it would stop every request meanwhile.
    let web = echo_origin("web").await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let mut r = rule(None, None, "web");
    r.plugins = vec!["rewrite".into()];
    let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("web", web)], vec![r]);
    let mut rewrite = plugin("rewrite", "echo", serde_json::json!({}));
    rewrite.path = example_plugin("header-rewrite");
    cfg.plugins = vec![rewrite];
    let conn = start_connector(cfg.clone()).await;
    conn.registered(1).await;
    let reloader = conn.reloader.clone();

    let reload = tokio::spawn(async move { reloader.reload(&cfg).await });
    let mut during = 0;
    while !reload.is_finished() {
        assert_eq!(get(edge.http, "app.test", "/").await.status, 200);
        if !reload.is_finished() {
            during += 1;
        }
    }
    reload.await.unwrap().unwrap();
    assert!(
        during >= 5,
        "only {during} requests were answered while the reload compiled its plugin"
    );
    conn.stop().await;
}

over_both_transports! {
    #[tokio::test]
    async fn decisions_reach_the_origin_and_the_client() {
        let plugins = vec![
            plugin(
                "rewrite",
                "echo",
                serde_json::json!({
                    "set": {"x-added": "yes", "x-req": "{request_id}", "host": "internal.example"},
                    "remove": ["x-drop-me"],
                    "path": "/rewritten?q=1",
                }),
            ),
            plugin("router", "echo", serde_json::json!({"origin": "other"})),
            plugin(
                "answer",
                "echo",
                serde_json::json!({"respond_if_path": "/local", "respond_status": 418, "respond_body": "short and stout"}),
            ),
        ];
        // The local-answer plugin runs first, so it sees the original path.
        let (edge, conn) = tunnel_with(plugins, &["answer", "rewrite", "router"], |_| {}).await;

        let req = Request::get("/original")
            .header("host", "app.test")
            .header("x-drop-me", "1")
            .body(Full::default())
            .unwrap();
        let reply = send(edge.http, req).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let json = reply.json();
        assert_eq!(json["origin"], "other", "the plugin's origin choice");
        assert_eq!(json["path"], "/rewritten?q=1", "the plugin's path rewrite");
        assert_eq!(reply.echoed("x-added").as_deref(), Some("yes"));
        assert_eq!(
            reply.echoed("host").as_deref(),
            Some("internal.example"),
            "a Host set by a plugin wins"
        );
        assert_eq!(reply.echoed("x-req"), reply.echoed("sluice-request-id"));
        assert!(json["headers"].get("x-drop-me").is_none());

        let reply = get(edge.http, "app.test", "/local").await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (418, "short and stout")
        );
        assert_eq!(reply.headers["content-type"], "text/plain");
        conn.stop().await;
    }

    #[tokio::test]
    async fn chains_run_in_order_and_responses_in_reverse() {
        let plugins = vec![
            plugin("first", "echo", serde_json::json!({"tag": "first"})),
            plugin("second", "echo", serde_json::json!({"tag": "second"})),
            plugin("global", "echo", serde_json::json!({"tag": "global"})),
        ];
        let (edge, conn) = tunnel_with(plugins, &["first", "second"], |c| {
            c.global_plugins = vec!["global".into()]
        })
        .await;
        let reply = get(edge.http, "app.test", "/").await;
        assert_eq!(
            reply.echoed("x-chain").as_deref(),
            Some("global,first,second"),
            "each plugin sees the edits before it"
        );
        assert_eq!(
            reply.headers["x-chain-response"], "second,first,global",
            "the response chain runs in reverse"
        );
        conn.stop().await;
    }

    #[tokio::test]
    async fn audit_lines_are_complete_after_graceful_shutdown() {
        const N: usize = 25;
        let dir = support::scratch_dir("audit");
        let file = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&file);
        let plugins = vec![plugin(
            "auditor",
            "echo",
            serde_json::json!({"audit": true}),
        )];
        let file_for_cfg = file.clone();
        let (edge, conn) = tunnel_with(plugins, &["auditor"], move |c| {
            c.audit = AuditConfig {
                stdout: false,
                file: Some(file_for_cfg),
                queue: 4,
            };
        })
        .await;
        let mut ids = Vec::new();
        for i in 0..N {
            let reply = get(edge.http, "app.test", &format!("/item/{i}")).await;
            assert_eq!(reply.status, 200);
            ids.push(
                reply.headers["sluice-request-id"]
                    .to_str()
                    .unwrap()
                    .to_string(),
            );
        }
        conn.stop().await;

        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), N, "{text}");
        for (i, line) in lines.iter().enumerate() {
            let event: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert_eq!(event["plugin"], "auditor");
            assert_eq!(event["kind"], "complete");
            assert_eq!(event["tunnel"], "app");
            assert_eq!(event["hostname"], "app.test");
            assert_eq!(event["request_id"], ids[i].as_str());
            assert_eq!(event["attributes"]["path"], format!("/item/{i}"));
            assert_eq!(event["attributes"]["status"], "200");
            assert_eq!(event["attributes"]["origin"], "web");
            assert!(event["ts"].as_str().unwrap().ends_with('Z'));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn failing_plugins_follow_their_policy_and_never_take_the_process_down() {
        let (logs, _guard) = capture_logs();
        let mut closed = plugin("strict", "misbehave", serde_json::json!({}));
        closed.on_error = OnError::FailClosed;
        closed.timeout = Duration::from_millis(200);
        closed.memory = 8 << 20;
        let (edge, conn) = tunnel_with(vec![closed], &["strict"], |c| {
            c.admin_listen = Some(loopback())
        })
        .await;

        for path in [
            "/trap",
            "/loop",
            "/sleep",
            "/oom",
            "/bad-header",
            "/bad-origin",
            "/huge",
        ] {
            let reply = get(edge.http, "app.test", path).await;
            assert_eq!(reply.status, 502, "{path}: {}", reply.text());
            assert_eq!(
                reply.text(),
                "sluice connector: the request could not be processed\n",
                "{path}"
            );
            // Other requests keep succeeding, on fresh or reused instances.
            let ok = get(edge.http, "app.test", "/fine").await;
            assert_eq!(ok.status, 200, "after {path}: {}", ok.text());
            assert_eq!(ok.json()["path"], "/fine");
        }
        let text = logs.text();
        for kind in [
            "kind=\"trap\"",
            "kind=\"timeout\"",
            "kind=\"memory\"",
            "kind=\"invalid-decision\"",
        ] {
            assert!(
                text.contains("plugin failed") && text.contains(kind),
                "no {kind} failure logged:\n{text}"
            );
        }
        assert!(
            text.contains("plugin=\"strict\""),
            "failures are logged with the plugin's name"
        );
        conn.stop().await;
    }

    #[tokio::test]
    async fn fail_open_skips_the_plugin() {
        let mut open = plugin("lenient", "misbehave", serde_json::json!({}));
        open.on_error = OnError::FailOpen;
        let (edge, conn) = tunnel_with(vec![open], &["lenient"], |_| {}).await;
        for path in ["/trap", "/bad-header", "/bad-origin"] {
            let reply = get(edge.http, "app.test", path).await;
            assert_eq!(reply.status, 200, "{path}: {}", reply.text());
            assert_eq!(reply.json()["path"], path);
        }
        conn.stop().await;
    }
}

/// `sluice plugin new` makes a crate that passes its own tests, builds for wasm32-wasip2, and
/// passes `sluice plugin test` as generated.
#[test]
fn plugin_new_creates_a_crate_that_tests_builds_and_runs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::temp_dir().join(format!("sluice-plugin-new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sluice = env!("CARGO_BIN_EXE_sluice");
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(std::process::Command::new(sluice)
        .args(["plugin", "new", "my-plugin", "--dir"])
        .arg(&dir)
        .arg("--sdk-path")
        .arg(root.join("sdk")));
    let krate = dir.join("my-plugin");
    for file in ["Cargo.toml", "src/lib.rs", "README.md"] {
        assert!(krate.join(file).is_file(), "{file} missing");
    }
    // One target folder for every run of this test, so that only the first builds the SDK.
    let target = root.join("target/scaffold");
    let cargo = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.current_dir(&krate)
            .args(args)
            .env("CARGO_TARGET_DIR", &target);
        cmd
    };
    let tests = run(&mut cargo(&["test"]));
    assert!(tests.contains("test result: ok. 2 passed"), "{tests}");
    run(&mut cargo(&[
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
    ]));
    let report = run(std::process::Command::new(sluice)
        .args(["plugin", "test"])
        .arg(target.join("wasm32-wasip2/release/my_plugin.wasm"))
        .args([
            "--config",
            r#"{"header-name": "x-hello", "header-value": "world"}"#,
        ]));
    assert!(report.contains("init ok; exports on-request"), "{report}");
    assert!(report.contains("set x-hello: world"), "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The key-value store's Redis backend against a real redis-server: every operation, expiry,
/// a non-integer increment, and two plugins' namespaces kept apart.
#[tokio::test]
async fn the_redis_kv_backend_does_what_the_in_process_one_does() {
    use sluice::plugin::kv::{KvError, KvStore};
    let (redis, _server) = start_redis().await;
    let store = KvStore::default();
    store
        .configure(Some(&format!("redis://{redis}")), "t")
        .unwrap();
    let quota = sluice::config::KvQuota {
        max_keys: 10,
        max_bytes: 1024,
    };
    let kv = store.access("p", quota);
    assert_eq!(kv.get("a").await.unwrap(), None);
    kv.set("a", b"1".to_vec(), None).await.unwrap();
    assert_eq!(kv.get("a").await.unwrap().as_deref(), Some(&b"1"[..]));
    assert!(!kv
        .compare_and_swap("a", Some(b"2"), b"3".to_vec(), None)
        .await
        .unwrap());
    assert!(kv
        .compare_and_swap("a", Some(b"1"), b"3".to_vec(), None)
        .await
        .unwrap());
    assert!(kv
        .compare_and_swap("b", None, b"x".to_vec(), None)
        .await
        .unwrap());
    assert!(!kv
        .compare_and_swap("b", None, b"y".to_vec(), None)
        .await
        .unwrap());
    assert_eq!(kv.increment("n", 5, None).await.unwrap(), 5);
    assert_eq!(kv.increment("n", -7, None).await.unwrap(), -2);
    assert!(matches!(
        kv.increment("b", 1, None).await,
        Err(KvError::Backend(_))
    ));
    assert!(kv.delete("a").await.unwrap());
    assert!(!kv.delete("a").await.unwrap());
    // A value past kv-max-bytes is refused before it is sent.
    assert!(matches!(
        kv.set("big", vec![0; 2000], None).await,
        Err(KvError::Quota(_))
    ));
    // Another plugin's namespace does not see these keys.
    assert_eq!(store.access("q", quota).get("b").await.unwrap(), None);
    // Expiry, by Redis's clock.
    kv.set("short", b"v".to_vec(), Some(50)).await.unwrap();
    assert_eq!(kv.increment("ttl", 1, Some(50)).await.unwrap(), 1);
    tokio::time::timeout(WAIT, async {
        while kv.get("short").await.unwrap().is_some() || kv.get("ttl").await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("keys with a time to live never expired");
}

/// An API for outbound calls: `/keys` answers `k1`, `/slow` answers after 300 ms, `/big`
/// announces 64 KiB, `/echo` tells what it got.
async fn call_target() -> std::net::SocketAddr {
    start_origin(|req: Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let path = req.uri().path().to_string();
        let method = req.method().to_string();
        let probe = req
            .headers()
            .get("x-probe")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let agent = req
            .headers()
            .get("user-agent")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let text = match path.as_str() {
            "/keys" => "k1".to_string(),
            "/slow" => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "late".to_string()
            }
            "/big" => "x".repeat(64 * 1024),
            _ => format!(
                "{method} probe={probe} agent={agent} body={}",
                String::from_utf8_lossy(&body)
            ),
        };
        http::Response::new(sluice::relay::full(text))
    })
    .await
}

/// Sends a request through the tunnel whose `x-call*` headers tell the `caller` fixture what
/// to call; returns status and body.
async fn call_through(edge: &EdgeHandle, headers: &[(&str, String)]) -> (u16, String) {
    let mut req = Request::get("/").header("host", "app.test");
    for (n, v) in headers {
        req = req.header(*n, v.as_str());
    }
    let r = send(edge.http, req.body(Full::default()).unwrap()).await;
    (r.status, r.text())
}

#[tokio::test]
async fn outbound_calls_reach_what_the_operator_allowed_and_nothing_else() {
    let api = call_target().await;
    let (secure, id) = start_tls_origin(|_req: Request<hyper::body::Incoming>| async {
        http::Response::new(sluice::relay::full("secure"))
    })
    .await;
    let mut p = plugin("caller", "caller", serde_json::json!({}));
    p.grants = sluice::config::Grants::of(&["http"]);
    // The hook's own deadline; the 300 ms call below must not count against it.
    p.timeout = Duration::from_millis(150);
    p.http.allow_hosts = vec![
        format!("127.0.0.1:{}", api.port()),
        format!("localhost:{}", secure.port()),
    ];
    p.http.allow_origins = vec![http_origin("api", api)];
    p.http.ca = id.chain.clone();
    p.http.max_response = 16 * 1024;
    let (edge, conn) = tunnel_with(vec![p], &["caller"], |_| {}).await;
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", api.port());

    let (status, body) = call_through(&edge, &[("x-call", url("/keys"))]).await;
    assert_eq!((status, body.as_str()), (200, "status 200: k1"));
    let (_, body) = call_through(
        &edge,
        &[
            ("x-call", url("/echo")),
            ("x-call-method", "POST".into()),
            ("x-call-body", "payload".into()),
            ("x-call-header", "x-probe: 42".into()),
        ],
    )
    .await;
    assert_eq!(
        body,
        "status 200: POST probe=42 agent=sluice plugin caller body=payload"
    );
    // Waiting on a call is not the plugin's work: a 300 ms call fits a 150 ms hook deadline.
    let (status, body) = call_through(&edge, &[("x-call", url("/slow"))]).await;
    assert_eq!((status, body.as_str()), (200, "status 200: late"));
    // Its own deadline is the call's.
    let (status, body) = call_through(
        &edge,
        &[("x-call", url("/slow")), ("x-call-timeout-ms", "50".into())],
    )
    .await;
    assert_eq!((status, body.as_str()), (502, "Timeout"));
    // The operator's size cap.
    let (_, body) = call_through(&edge, &[("x-call", url("/big"))]).await;
    assert_eq!(body, "TooLarge(65536)");
    // TLS verified against the plugin's http-ca.
    let (_, body) = call_through(
        &edge,
        &[("x-call", format!("https://localhost:{}/", secure.port()))],
    )
    .await;
    assert_eq!(body, "status 200: secure");
    // A configured origin, by name.
    let (_, body) = call_through(
        &edge,
        &[("x-call", "/keys".into()), ("x-call-origin", "api".into())],
    )
    .await;
    assert_eq!(body, "status 200: k1");

    // Everything else is refused before any connection is made.
    for (target, origin) in [
        (format!("http://127.0.0.2:{}/keys", api.port()), None),
        (format!("http://localhost:{}/keys", api.port()), None),
        (format!("http://127.0.0.1:{}/keys", secure.port()), None),
        ("/keys".to_string(), Some("web")),
    ] {
        let mut headers = vec![("x-call", target.clone())];
        if let Some(o) = origin {
            headers.push(("x-call-origin", o.to_string()));
        }
        let (status, body) = call_through(&edge, &headers).await;
        assert_eq!(status, 502, "{target}");
        assert!(body.starts_with("Denied("), "{target}: {body}");
    }
    let (_, body) = call_through(
        &edge,
        &[
            ("x-call", url("/keys")),
            ("x-call-header", "host: evil.test".into()),
        ],
    )
    .await;
    assert!(body.starts_with("Invalid("), "{body}");
    let (_, body) = call_through(
        &edge,
        &[("x-call", url("/keys")), ("x-call-repeat", "17".into())],
    )
    .await;
    assert!(body.starts_with("Denied(") && body.contains("16"), "{body}");
    // The hook's deadline still bounds the plugin's own work after a call.
    let (status, body) = call_through(
        &edge,
        &[("x-call", url("/keys")), ("x-call-spin-ms", "2000".into())],
    )
    .await;
    assert_eq!(status, 502);
    assert!(!body.contains("status 200"), "{body}");
    conn.stop().await;
}

#[tokio::test]
async fn outbound_https_is_verified_and_the_grant_is_required() {
    // Without the plugin's http-ca, the self-signed host fails verification.
    let (secure, _) = start_tls_origin(|_req: Request<hyper::body::Incoming>| async {
        http::Response::new(sluice::relay::full("secure"))
    })
    .await;
    let policy = sluice::config::HttpPolicy {
        allow_hosts: vec![format!("localhost:{}", secure.port())],
        ..Default::default()
    };
    let outbound = sluice::plugin::outbound::Outbound::new("p".into(), policy).unwrap();
    let err = outbound
        .send(sluice::plugin::outbound::Call {
            method: "GET".into(),
            url: format!("https://localhost:{}/", secure.port()),
            origin: None,
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
        })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("certificate"),
        "expected a certificate error, got {err}"
    );

    let runtime = Runtime::new(64 << 20, 16).unwrap();
    let err = Plugin::load(
        runtime,
        plugin("caller", "caller", serde_json::json!({})),
        Arc::new(sluice::admin::Metrics::new("t")),
    )
    .await
    .expect_err("a plugin importing http without the grant was loaded");
    assert!(
        matches!(&err, LoadError::NotGranted { grant, .. } if *grant == "http"),
        "{err}"
    );
}

/// An origin that answers with what it received: `{framing} {body}`, where framing is
/// `length=N` or `chunked`.
async fn body_origin() -> std::net::SocketAddr {
    start_origin(|req: Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let framing = match req.headers().get("content-length") {
            Some(n) => format!("length={}", n.to_str().unwrap()),
            None if req.headers().contains_key("transfer-encoding") => "chunked".into(),
            None => "none".into(),
        };
        let body = req.into_body().collect().await.unwrap().to_bytes();
        http::Response::new(sluice::relay::full(format!(
            "{framing} {}",
            String::from_utf8_lossy(&body)
        )))
    })
    .await
}

/// A tunnel whose catch-all rule sends to [`body_origin`] through `plugins`.
async fn body_tunnel(plugins: Vec<PluginConfig>) -> (EdgeHandle, ConnectorHandle) {
    let origin = body_origin().await;
    let chain: Vec<String> = plugins.iter().map(|p| p.name.clone()).collect();
    plugin_tunnel(plugins, &[], &["web"], |cfg| {
        cfg.origins = vec![http_origin("web", origin)];
        cfg.ingress[0].plugins = chain;
    })
    .await
}

fn post(body: impl Into<bytes::Bytes>) -> Request<Full<bytes::Bytes>> {
    Request::post("/upload")
        .header("host", "app.test")
        .body(Full::new(body.into()))
        .unwrap()
}

fn bodies(name: &str, request: &str, response: &str) -> PluginConfig {
    plugin(
        name,
        "bodies",
        serde_json::json!({"request": request, "response": response}),
    )
}

#[tokio::test]
async fn body_hooks_rewrite_both_bodies_as_they_stream() {
    let (edge, conn) = body_tunnel(vec![bodies("upper", "upper", "upper")]).await;
    let body = "abc".repeat(100_000);
    let reply = send(edge.http, post(body.clone())).await;
    assert_eq!(reply.status, 200);
    // The origin got the upper-cased body, chunked (its length was not known in advance),
    // and the client the upper-cased answer.
    assert_eq!(reply.text(), format!("CHUNKED {}", body.to_uppercase()));
    assert!(
        !reply.headers.contains_key("content-length"),
        "{:?}",
        reply.headers
    );
    conn.stop().await;
}

#[tokio::test]
async fn a_body_hook_may_hold_within_its_buffer_and_fails_past_it() {
    let mut holder = bodies("holder", "hold", "pass");
    holder.body_buffer = 64 * 1024;
    let (edge, conn) = body_tunnel(vec![holder]).await;
    let small = "x".repeat(40 * 1024);
    let reply = send(edge.http, post(small.clone())).await;
    assert_eq!(reply.text(), format!("chunked {small}"));
    // Past its body-buffer the plugin has failed; fail-closed, the client gets a 502.
    let reply = send(edge.http, post("y".repeat(200 * 1024))).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    conn.stop().await;
}

#[tokio::test]
async fn a_request_body_hook_rejects_with_its_own_answer() {
    let (edge, conn) = body_tunnel(vec![bodies("limit", "limit:1000", "pass")]).await;
    let reply = send(edge.http, post("z".repeat(999))).await;
    assert_eq!(reply.status, 200);
    let reply = send(edge.http, post("z".repeat(200 * 1024))).await;
    assert_eq!((reply.status, reply.text().as_str()), (413, "too big\n"));
    conn.stop().await;
}

#[tokio::test]
async fn plugins_without_body_hooks_leave_the_body_path_alone() {
    // The stateful fixture (0.2, SDK defaults for the body hooks) is asked once, says
    // "not implemented", and is never asked again: later bodies keep their length.
    let config = serde_json::json!({"remember": "/r", "mask_from": 600, "mask_status": 503, "mask_body": ""});
    let mut p = plugin("stateful", "stateful", config);
    p.grants = sluice::config::Grants::of(&["kv", "metrics"]);
    let echo01 = plugin("echo", "echo", serde_json::json!({}));
    let (edge, conn) = body_tunnel(vec![p, echo01]).await;
    let first = send(edge.http, post("hello")).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert!(first.text().ends_with(" hello"), "{}", first.text());
    for _ in 0..3 {
        let reply = send(edge.http, post("hello")).await;
        assert_eq!(reply.text(), "length=5 hello");
        assert_eq!(reply.headers["content-length"], "14");
    }
    conn.stop().await;
}
