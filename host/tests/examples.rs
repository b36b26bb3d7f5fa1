//! The example plugins of `plugins/`, built for wasm32-wasip2 and loaded by a real connector:
//! each one's effect as the client or the origin sees it.

mod support;

use std::time::Duration;

use http::Request;
use http_body_util::Full;
use sluice::config::{AuditConfig, ConnectorConfig, Grants, PluginConfig};
use support::*;

fn example(name: &str, config: serde_json::Value) -> PluginConfig {
    let mut p = PluginConfig::new(name, example_plugin(name));
    p.config_json = serde_json::to_vec(&config).unwrap();
    p.timeout = Duration::from_secs(1);
    p
}

async fn tunnel_with(
    plugins: Vec<PluginConfig>,
    extra_origins: &[&'static str],
    tweak: impl FnOnce(&mut ConnectorConfig),
) -> (EdgeHandle, ConnectorHandle) {
    let names: Vec<String> = plugins.iter().map(|p| p.name.clone()).collect();
    let chain: Vec<&str> = names.iter().map(String::as_str).collect();
    let origins: Vec<&'static str> = std::iter::once("web")
        .chain(extra_origins.iter().copied())
        .collect();
    plugin_tunnel(plugins, &chain, &origins, tweak).await
}

// Each scenario runs with the example plugins built from today's sources and with the ones
// kept as built for sluice:plugin@0.1.0, which must keep loading and behaving the same.
over_both_plugin_builds! {
    #[tokio::test]
    async fn header_rewrite_edits_requests_and_responses() {
        let mut p = example(
            "header-rewrite",
            serde_json::json!({
                "request": {"set": {"x-request": "{request_id}", "x-client": "{client_ip}", "x-host": "{host}"}, "remove": ["x-internal"]},
                "response": {"set": {"x-served-by": "sluice"}},
            }),
        );
        p.grants = Grants::of(&["client-addr"]);
        let (edge, conn) = tunnel_with(vec![p], &[], |_| {}).await;
        let req = Request::get("/")
            .header("host", "app.test")
            .header("x-internal", "secret")
            .body(Full::default())
            .unwrap();
        let reply = send(edge.http, req).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.echoed("x-request"), reply.echoed("sluice-request-id"));
        assert_eq!(reply.echoed("x-client").as_deref(), Some("127.0.0.1"));
        assert_eq!(reply.echoed("x-host").as_deref(), Some("app.test"));
        assert!(reply.json()["headers"].get("x-internal").is_none());
        assert_eq!(reply.headers["x-served-by"], "sluice");
        conn.stop().await;
    }

    #[tokio::test]
    async fn origin_router_routes_splits_and_sticks() {
        let p = example(
            "origin-router",
            serde_json::json!({
                "routes": [{"origin": "beta", "header": {"name": "x-beta", "value": "1"}}],
                "split": {"weights": {"web": 80, "canary": 20}, "sticky": {"header": "x-user"}},
            }),
        );
        let (edge, conn) = tunnel_with(vec![p], &["beta", "canary"], |_| {}).await;
        let req = Request::get("/")
            .header("host", "app.test")
            .header("x-beta", "1")
            .body(Full::default())
            .unwrap();
        assert_eq!(send(edge.http, req).await.json()["origin"], "beta");

        let mut canary = 0;
        const USERS: usize = 200;
        for i in 0..USERS {
            let user = format!("user-{i}");
            let pick = |user: String| {
                let http = edge.http;
                async move {
                    let req = Request::get("/")
                        .header("host", "app.test")
                        .header("x-user", user)
                        .body(Full::default())
                        .unwrap();
                    send(http, req).await.json()["origin"]
                        .as_str()
                        .unwrap()
                        .to_string()
                }
            };
            let first = pick(user.clone()).await;
            assert_eq!(
                pick(user).await,
                first,
                "the same user must stay on the same origin"
            );
            if first == "canary" {
                canary += 1;
            }
        }
        // 20 % of 200 users is 40; allow for the spread of a hash over 200 keys.
        assert!(
            (20..=60).contains(&canary),
            "canary got {canary} of {USERS} users"
        );
        conn.stop().await;
    }

    #[tokio::test]
    async fn audit_log_writes_one_event_per_request() {
        let dir = support::scratch_dir("example-audit");
        let file = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&file);
        let p = example(
            "audit-log",
            serde_json::json!({"fields": ["method", "path", "status", "origin"], "headers": ["user-agent"]}),
        );
        let f = file.clone();
        let (edge, conn) = tunnel_with(vec![p], &[], move |c| {
            c.audit = AuditConfig {
                stdout: false,
                file: Some(f),
                queue: 16,
            }
        })
        .await;
        for i in 0..5 {
            let req = Request::post(format!("/orders/{i}"))
                .header("host", "app.test")
                .header("user-agent", "tester/1")
                .body(Full::from("x"))
                .unwrap();
            assert_eq!(send(edge.http, req).await.status, 200);
        }
        conn.stop().await;
        let text = std::fs::read_to_string(&file).unwrap();
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(events.len(), 5, "{text}");
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e["plugin"], "audit-log");
            assert_eq!(e["kind"], "access");
            assert_eq!(e["attributes"]["method"], "POST");
            assert_eq!(e["attributes"]["path"], format!("/orders/{i}"));
            assert_eq!(e["attributes"]["status"], "200");
            assert_eq!(e["attributes"]["origin"], "web");
            assert_eq!(e["attributes"]["header.user-agent"], "tester/1");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn access_guard_refuses_and_admits() {
        const SECRET: &str = "0123456789abcdef0123456789abcdef";
        let mut p = example(
            "access-guard",
            serde_json::json!({
                "tokens": ["static-token-0123456789"],
                "jwt": {"secret": SECRET, "issuer": "https://id.example.com", "audience": "app"},
            }),
        );
        p.grants = Grants::of(&["credentials"]);
        let (edge, conn) = tunnel_with(vec![p], &[], |_| {}).await;
        let with = |auth: Option<String>| {
            let mut b = Request::get("/private").header("host", "app.test");
            if let Some(a) = auth {
                b = b.header("authorization", a);
            }
            b.body(Full::default()).unwrap()
        };

        let reply = send(edge.http, with(None)).await;
        assert_eq!(reply.status, 401);
        assert_eq!(
            reply.headers["www-authenticate"],
            r#"Bearer realm="sluice""#
        );
        assert_eq!(
            send(
                edge.http,
                with(Some("Bearer wrong-token-0123456789".into()))
            )
            .await
            .status,
            403
        );

        let reply = send(
            edge.http,
            with(Some("Bearer static-token-0123456789".into())),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["path"], "/private");

        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let good = access_guard::sign_hs256(
            SECRET,
            &serde_json::json!({"sub": "ada", "iss": "https://id.example.com", "aud": "app", "exp": now + 300}),
        );
        let reply = send(edge.http, with(Some(format!("Bearer {good}")))).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.echoed("x-auth-subject").as_deref(), Some("ada"));
        let expired = access_guard::sign_hs256(
            SECRET,
            &serde_json::json!({"sub": "ada", "iss": "https://id.example.com", "aud": "app", "exp": now - 3600}),
        );
        assert_eq!(
            send(edge.http, with(Some(format!("Bearer {expired}"))))
                .await
                .status,
            403
        );
        conn.stop().await;
    }
}

// Plugins written for sluice:plugin@0.2.0 (no 0.1 build of them exists).

/// How many times the connector at `admin` has called `hook` of `plugin` (0 before the first).
async fn hook_calls(admin: std::net::SocketAddr, plugin: &str, hook: &str) -> u64 {
    let key = format!(
        r#"sluice_connector_plugin_hook_duration_seconds_count{{plugin="{plugin}",hook="{hook}"}} "#
    );
    let metrics = get(admin, "admin", "/metrics").await.text();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn header_rewrite_without_response_edits_declines_on_response() {
    let p = example(
        "header-rewrite",
        serde_json::json!({"request": {"set": {"x-request": "{request_id}"}}}),
    );
    let (edge, conn) = tunnel_with(vec![p], &[], |c| c.admin_listen = Some(loopback())).await;
    let admin = conn.admin.unwrap();
    for _ in 0..3 {
        let reply = get(edge.http, "app.test", "/").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.echoed("x-request"), reply.echoed("sluice-request-id"));
    }
    // Hooks are counted once their call returns: the three answers above mean three of each
    // that ran.
    assert_eq!(hook_calls(admin, "header-rewrite", "on-request").await, 3);
    // Called once, it declined (`sluice_sdk::decline`): the connector stopped calling it.
    assert_eq!(hook_calls(admin, "header-rewrite", "on-response").await, 1);
    conn.stop().await;
}

#[tokio::test]
async fn ip_allow_admits_and_refuses_by_the_client_address() {
    let mut allow = example(
        "ip-allow",
        serde_json::json!({"allow": ["127.0.0.0/8", "::1/128"]}),
    );
    allow.grants = Grants::of(&["client-addr"]);
    let (edge, conn) = tunnel_with(vec![allow], &[], |_| {}).await;
    let reply = get(edge.http, "app.test", "/x").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    conn.stop().await;

    let mut deny = example(
        "ip-allow",
        serde_json::json!({"allow": ["127.0.0.0/8"], "deny": ["127.0.0.1"], "status": 404}),
    );
    deny.grants = Grants::of(&["client-addr"]);
    let (edge, conn) = tunnel_with(vec![deny], &[], |_| {}).await;
    assert_eq!(get(edge.http, "app.test", "/x").await.status, 404);
    conn.stop().await;

    // Without the grant the plugin sees no address: it refuses (fail closed).
    let ungranted = example("ip-allow", serde_json::json!({"allow": ["127.0.0.0/8"]}));
    let (edge, conn) = tunnel_with(vec![ungranted], &[], |_| {}).await;
    assert_eq!(get(edge.http, "app.test", "/x").await.status, 403);
    conn.stop().await;
}

#[tokio::test]
async fn rate_limit_refuses_past_the_burst_with_retry_after() {
    let mut p = example("rate-limit", serde_json::json!({"rate": 0.5, "burst": 2}));
    p.grants = Grants::of(&["client-addr", "kv"]);
    let (edge, conn) = tunnel_with(vec![p], &[], |_| {}).await;
    for _ in 0..2 {
        assert_eq!(get(edge.http, "app.test", "/").await.status, 200);
    }
    let refused = get(edge.http, "app.test", "/").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.headers["retry-after"], "2");
    conn.stop().await;

    // It keeps its buckets in the key-value store: without the grant it does not load.
    let ungranted = example("rate-limit", serde_json::json!({"rate": 1, "burst": 1}));
    let err = sluice::plugin::check(&[ungranted]).await.unwrap_err();
    assert!(err.contains("not granted \"kv\""), "{err}");
}

/// Two connectors of one tunnel, their plugins' key-value store in one real Redis: the
/// bucket a client emptied through the first is still empty through the second.
#[tokio::test]
async fn rate_limit_holds_across_two_connectors_sharing_redis() {
    let (redis, _server) = start_redis().await;
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let web = echo_origin("web").await;
    let config = |id: &str| {
        let mut p = example("rate-limit", serde_json::json!({"rate": 0.01, "burst": 2}));
        p.name = "limit".into();
        p.grants = Grants::of(&["client-addr", "kv"]);
        let mut r = rule(None, None, "web");
        r.plugins = vec!["limit".into()];
        let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("web", web)], vec![r]);
        cfg.connector_id = id.into();
        cfg.plugins = vec![p];
        cfg.kv_redis = Some(format!("redis://{redis}"));
        cfg.admin_listen = Some(loopback());
        cfg
    };
    let first = start_connector(config("first")).await;
    first.registered(1).await;
    for _ in 0..2 {
        assert_eq!(get(edge.http, "app.test", "/").await.status, 200);
    }
    assert_eq!(get(edge.http, "app.test", "/").await.status, 429);

    // The second connector takes over; the first leaves.
    let second = start_connector(config("second")).await;
    second.registered(1).await;
    first.stop().await;
    let admin = second.admin.unwrap();
    let served = || async {
        let metrics = get(admin, "admin", "/metrics").await.text();
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(r#"sluice_connector_plugin_hook_duration_seconds_count{plugin="limit",hook="on-request"} "#)
            })
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    tokio::time::timeout(WAIT, async {
        loop {
            let before = served().await;
            let reply = get(edge.http, "app.test", "/").await;
            // Never a 200: the only bucket is empty, wherever the request went.
            assert_ne!(
                reply.status, 200,
                "the limit did not hold across connectors"
            );
            if served().await > before {
                assert_eq!(reply.status, 429, "{}", reply.text());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the second connector never served a request");
    second.stop().await;
}

#[tokio::test]
async fn cors_answers_preflights_locally_and_marks_allowed_responses() {
    let p = example(
        "cors",
        serde_json::json!({"allow-origins": ["https://app.example"], "allow-methods": ["GET", "PUT"],
                           "allow-headers": ["content-type"], "expose-headers": ["x-total"]}),
    );
    let (edge, conn) = tunnel_with(vec![p], &[], |_| {}).await;
    let preflight = Request::options("/items")
        .header("host", "app.test")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "PUT")
        .header("access-control-request-headers", "content-type")
        .body(Full::default())
        .unwrap();
    let reply = send(edge.http, preflight).await;
    assert_eq!(reply.status, 204);
    assert_eq!(
        reply.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(reply.headers["access-control-allow-methods"], "GET, PUT");
    assert_eq!(
        reply.headers["access-control-allow-headers"],
        "content-type"
    );
    // Answered by the plugin: the echo origin's JSON body is not there.
    assert!(reply.body.is_empty());

    let actual = Request::get("/items")
        .header("host", "app.test")
        .header("origin", "https://app.example")
        .body(Full::default())
        .unwrap();
    let reply = send(edge.http, actual).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["path"], "/items");
    assert_eq!(
        reply.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(reply.headers["access-control-expose-headers"], "x-total");

    let foreign = Request::get("/items")
        .header("host", "app.test")
        .header("origin", "https://elsewhere.example")
        .body(Full::default())
        .unwrap();
    let reply = send(edge.http, foreign).await;
    assert_eq!(reply.status, 200);
    assert!(reply.headers.get("access-control-allow-origin").is_none());
    conn.stop().await;
}

/// `sluice plugin test --kv` seeds the plugin's key-value store, and the report ends with
/// what the store holds after the hooks.
#[test]
fn plugin_test_seeds_and_shows_the_key_value_store() {
    let limit = example_plugin("rate-limit");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["plugin", "test", limit.to_str().unwrap()])
            .args([
                "--config",
                r#"{"rate": 1, "burst": 5}"#,
                "--grant",
                "client-addr",
            ])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stdout, stderr)
    };
    let (ok, stdout, stderr) = run(&["--grant", "kv"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("on-request: ok\n  no change"), "{stdout}");
    assert!(
        stdout.contains(r#"kv bucket:203.0.113.7 = "4.000000:"#),
        "{stdout}"
    );
    // An empty bucket, seeded: refused.
    let (ok, stdout, stderr) = run(&[
        "--grant",
        "kv",
        "--kv",
        "bucket:203.0.113.7=0.000000:9999999999999",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("respond 429"), "{stdout}");
    let (ok, _, stderr) = run(&["--kv", "a=b"]);
    assert!(!ok);
    assert!(stderr.contains("needs --grant kv"), "{stderr}");
}

#[test]
fn plugin_test_command_reports_decisions_logs_and_audit() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["plugin", "test"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let rewrite = example_plugin("header-rewrite");
    let (ok, stdout, stderr) = run(&[
        rewrite.to_str().unwrap(),
        "--config",
        r#"{"request": {"set": {"x-demo": "hello {host}"}, "remove": ["x-a"]}, "response": {"set": {"x-by": "sluice"}}}"#,
        "--request",
        "POST https://App.Example.com/orders?id=7",
        "-H",
        "x-a: 1",
        "--status",
        "503",
    ]);
    assert!(ok, "{stderr}");
    let expected = [
        "plugin header_rewrite: init ok; exports on-request, on-response, on-complete, on-request-body, on-response-body",
        "request: POST https://App.Example.com/orders?id=7",
        "on-request: ok",
        "  remove x-a",
        "  set x-demo: hello app.example.com",
        "on-response (status 503): ok",
        "  set x-by: sluice",
        // The SDK's default: the plugin says so, and the connector stops calling it.
        "on-complete (status 503): not implemented (the connector stops calling it)",
    ];
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, expected, "{stdout}");

    // Audit events, with a TOML config file.
    let dir = std::env::temp_dir().join(format!("sluice-plugin-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("audit.toml");
    std::fs::write(&cfg, "kind = \"seen\"\nfields = [\"method\", \"status\"]\n").unwrap();
    let (ok, stdout, _) = run(&[
        example_plugin("audit-log").to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--status",
        "404",
    ]);
    assert!(ok);
    assert!(
        stdout.contains(r#"  audit seen {"method":"GET","status":"404"}"#),
        "{stdout}"
    );

    // A local answer, and what the plugin sees without and with the credentials grant.
    let guard = example_plugin("access-guard");
    let guard_cfg = r#"{"tokens": ["static-token-0123456789"]}"#;
    let (_, stdout, _) = run(&[
        guard.to_str().unwrap(),
        "--config",
        guard_cfg,
        "-H",
        "authorization: Bearer static-token-0123456789",
    ]);
    assert!(
        stdout.contains("  respond 401 with"),
        "without the grant the token is hidden: {stdout}"
    );
    let (_, stdout, _) = run(&[
        guard.to_str().unwrap(),
        "--config",
        guard_cfg,
        "-H",
        "authorization: Bearer static-token-0123456789",
        "--grant",
        "credentials",
    ]);
    assert!(
        stdout.contains("  remove x-auth-subject") && !stdout.contains("respond"),
        "admitted: {stdout}"
    );

    // A rejected configuration: non-zero exit, the plugin's own message.
    let (ok, _, stderr) = run(&[guard.to_str().unwrap(), "--config", "{}"]);
    assert!(!ok);
    assert_eq!(
        stderr.trim(),
        r#"error: plugin "access_guard" rejected its configuration: "configure `tokens`, `jwt`, or both""#
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An EdDSA token signed by `key` with id `kid`, for `sub`, valid for `ttl` seconds from now
/// (negative: expired).
fn jwt_token(key: &ed25519_dalek::SigningKey, kid: &str, sub: &str, ttl: i64) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use ed25519_dalek::Signer;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let header = serde_json::json!({"alg": "EdDSA", "kid": kid, "typ": "JWT"});
    let claims = serde_json::json!({"iss": "https://auth.test/", "aud": "api", "sub": sub,
                                    "exp": now + ttl});
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key.sign(signed.as_bytes()).to_bytes();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
}

#[tokio::test]
async fn jwt_admits_valid_tokens_with_keys_fetched_once_and_forwards_the_subject() {
    use base64::Engine;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let jwk = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1",
        "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes())}]});
    let fetches = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = fetches.clone();
    let auth = start_origin(move |_req| {
        let (jwk, counted) = (jwk.clone(), counted.clone());
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            http::Response::new(sluice::relay::full(jwk.to_string()))
        }
    })
    .await;
    let mut p = example(
        "jwt",
        serde_json::json!({"jwks-url": format!("http://{auth}/jwks"), "danger-allow-http": true,
                           "issuer": "https://auth.test/", "audience": "api"}),
    );
    p.grants = Grants::of(&["http", "kv", "credentials"]);
    p.http.allow_hosts = vec![auth.to_string()];
    let (edge, conn) = tunnel_with(vec![p], &[], |_| {}).await;
    let with_token = |token: Option<String>| {
        let mut req = Request::get("/orders")
            .header("host", "app.test")
            .header("x-auth-subject", "forged");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        req.body(Full::default()).unwrap()
    };

    let missing = send(edge.http, with_token(None)).await;
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.headers["www-authenticate"],
        "Bearer realm=\"sluice\""
    );
    for _ in 0..3 {
        let ok = send(
            edge.http,
            with_token(Some(jwt_token(&key, "k1", "alice", 300))),
        )
        .await;
        assert_eq!(ok.status, 200, "{}", ok.text());
        assert_eq!(ok.echoed("x-auth-subject").as_deref(), Some("alice"));
    }
    let expired = send(
        edge.http,
        with_token(Some(jwt_token(&key, "k1", "alice", -120))),
    )
    .await;
    assert_eq!(expired.status, 401);
    let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
    let forged = send(
        edge.http,
        with_token(Some(jwt_token(&other, "k1", "root", 300))),
    )
    .await;
    assert_eq!(forged.status, 401);
    assert!(
        forged.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("bad signature"),
        "{:?}",
        forged.headers
    );
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        1,
        "the JWKS is fetched once and cached in kv"
    );
    conn.stop().await;
}

/// `sluice plugin test --http` answers the plugin's outbound calls from the command line
/// (here jwt's JWKS, from a file) and prints each call made.
#[test]
fn plugin_test_scripts_outbound_calls_and_prints_them() {
    use base64::Engine;
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let jwks = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1",
        "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes())}]});
    let dir = std::env::temp_dir().join(format!("sluice-plugin-test-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("jwks.json");
    std::fs::write(&file, jwks.to_string()).unwrap();
    let run = |script: &str, grants: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.args(["plugin", "test", example_plugin("jwt").to_str().unwrap()])
            .args(["--config", r#"{"jwks-url": "https://auth.test/jwks", "issuer": "https://auth.test/", "audience": "api"}"#])
            .args(["--http", script])
            .args(["-H", &format!("authorization: Bearer {}", jwt_token(&key, "k1", "alice", 300))]);
        for g in grants {
            cmd.args(["--grant", g]);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let all = ["http", "kv", "credentials"];
    let (ok, stdout, stderr) = run(
        &format!("https://auth.test/jwks 200 @{}", file.display()),
        &all,
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("set x-auth-subject: alice"), "{stdout}");
    let size = jwks.to_string().len();
    assert!(
        stdout.contains(&format!(
            "http GET https://auth.test/jwks -> 200 ({size} bytes)"
        )),
        "{stdout}"
    );
    let (ok, stdout, _) = run("https://auth.test/jwks 500 down", &all);
    assert!(ok);
    assert!(stdout.contains("respond 503"), "{stdout}");
    let (ok, _, stderr) = run("https://auth.test/jwks 200 {}", &["kv", "credentials"]);
    assert!(!ok);
    assert!(stderr.contains("need --grant http"), "{stderr}");
    let (ok, _, stderr) = run("https://auth.test/jwks twohundred", &all);
    assert!(!ok);
    assert!(stderr.contains("invalid --http"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn basic_auth_admits_htpasswd_users_and_keeps_the_password_from_the_origin() {
    // A bcrypt entry for alice:wonderland at cost 4 (htpasswd -B -C 4).
    let htpasswd = "alice:$2y$04$a0vzYULjJVPja1Ora0Dqb.9B6HLF5./toDykj5SR2m7bcRs1GMr7e";
    let mut p = example("basic-auth", serde_json::json!({ "htpasswd": htpasswd }));
    p.grants = Grants::of(&["credentials"]);
    let (edge, conn) = tunnel_with(vec![p], &[], |_| {}).await;
    let with = |auth: &str| {
        Request::get("/")
            .header("host", "app.test")
            .header("authorization", auth)
            .header("x-auth-user", "root")
            .body(Full::default())
            .unwrap()
    };
    use base64::Engine;
    let basic = |creds: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(creds)
        )
    };
    let ok = send(edge.http, with(&basic("alice:wonderland"))).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.echoed("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(
        ok.echoed("authorization"),
        None,
        "the password reached the origin"
    );
    let refused = send(edge.http, with(&basic("alice:queen"))).await;
    assert_eq!(refused.status, 401);
    assert!(refused.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic realm=\"sluice\""));
    conn.stop().await;
}

/// Sends a chunked upload of `size` bytes over a raw connection (no content-length), in
/// 16 KiB chunks written on their own task, and returns the response's status line.
async fn chunked_upload(addr: std::net::SocketAddr, size: usize) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (read, mut write) = tcp.into_split();
    // The writer keeps its half open after the last chunk (closing it would end the
    // connection before the answer) until the status line is read.
    let writer = tokio::spawn(async move {
        let head = "POST /up HTTP/1.1\r\nhost: app.test\r\ntransfer-encoding: chunked\r\n\r\n";
        let _ = write.write_all(head.as_bytes()).await;
        let chunk = vec![b'u'; 16 * 1024];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            let frame = [format!("{n:x}\r\n").as_bytes(), &chunk[..n], b"\r\n"].concat();
            if write.write_all(&frame).await.is_err() {
                return;
            }
            left -= n;
        }
        let _ = write.write_all(b"0\r\n\r\n").await;
        std::future::pending::<()>().await;
    });
    let mut lines = tokio::io::BufReader::new(read);
    let mut status = String::new();
    tokio::time::timeout(WAIT, lines.read_line(&mut status))
        .await
        .expect("no answer to the upload")
        .unwrap();
    writer.abort();
    status.trim_end().to_string()
}

#[tokio::test]
async fn body_limit_refuses_announced_and_streamed_bodies_over_the_cap() {
    let p = example("body-limit", serde_json::json!({"max-bytes": 100_000}));
    // An upload origin reads the body before it answers (an origin answering at once, body
    // unread, would be answered before the plugin saw enough of the body to stop it).
    let uploads = start_origin(|req: Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let n = match req.into_body().collect().await {
            Ok(body) => body.to_bytes().len(),
            Err(_) => 0,
        };
        http::Response::new(sluice::relay::full(format!("{n} bytes")))
    })
    .await;
    let (edge, conn) = tunnel_with(vec![p], &[], |cfg| {
        cfg.origins[0] = http_origin("web", uploads);
    })
    .await;
    let upload = |n: usize| {
        Request::post("/up")
            .header("host", "app.test")
            .body(Full::new(bytes::Bytes::from(vec![b'a'; n])))
            .unwrap()
    };
    assert_eq!(send(edge.http, upload(100_000)).await.status, 200);
    let announced = send(edge.http, upload(100_001)).await;
    assert_eq!(announced.status, 413);
    assert_eq!(announced.text(), "request body larger than 100000 bytes\n");
    assert_eq!(chunked_upload(edge.http, 50_000).await, "HTTP/1.1 200 OK");
    assert_eq!(
        chunked_upload(edge.http, 1 << 20).await,
        "HTTP/1.1 413 Payload Too Large"
    );
    conn.stop().await;
}

/// jwt before rate-limit keyed by `subject`: each verified subject has its own bucket.
#[tokio::test]
async fn rate_limit_keys_by_the_subject_jwt_verified() {
    use base64::Engine;
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let jwks = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1",
        "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes())}]});
    let auth = start_origin(move |_req| {
        let jwks = jwks.clone();
        async move { http::Response::new(sluice::relay::full(jwks.to_string())) }
    })
    .await;
    let mut jwt = example(
        "jwt",
        serde_json::json!({"jwks-url": format!("http://{auth}/jwks"), "danger-allow-http": true,
                           "issuer": "https://auth.test/", "audience": "api"}),
    );
    jwt.grants = Grants::of(&["http", "kv", "credentials"]);
    jwt.http.allow_hosts = vec![auth.to_string()];
    let mut limit = example(
        "rate-limit",
        serde_json::json!({"rate": 0.01, "burst": 1, "key": "subject"}),
    );
    limit.grants = Grants::of(&["kv"]);
    let (edge, conn) = tunnel_with(vec![jwt, limit], &[], |_| {}).await;
    let as_user = |sub: &str| {
        Request::get("/")
            .header("host", "app.test")
            .header(
                "authorization",
                format!("Bearer {}", jwt_token(&key, "k1", sub, 300)),
            )
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(send(edge.http, as_user("alice")).await.status, 200);
    assert_eq!(send(edge.http, as_user("alice")).await.status, 429);
    assert_eq!(send(edge.http, as_user("bob")).await.status, 200);
    conn.stop().await;
}
