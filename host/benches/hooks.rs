//! Hook-cost benchmark: median and p99 of one `on-request` call with instance reuse, of one
//! request under per-request isolation (fresh instance, `init`, call), of a three-plugin
//! chain of the `echo` fixture, and of the chain `bench/compare` runs as the connector runs
//! it: access-guard, header-rewrite and audit-log (with a file sink) through every hook of a
//! request (`on-request`, `on-response`, `on-complete`), views, decisions and audit events
//! included; then one call that reads or increments a key in the plugin's key-value store, in
//! this process and in Redis (when redis-server is installed); an outbound HTTP call from a
//! hook against the same call made directly; and a MiB of body through a body hook. Plugins
//! are built for wasm32-wasip2 on first run.
//!
//! Run: `cargo bench -p sluice --bench hooks` (iterations: `SLUICE_BENCH_ITERS`, default 20000).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::admin::Metrics;
use sluice::audit::Audit;
use sluice::config::{ConnectorConfig, Isolation, PluginConfig};
use sluice::connector::chain::{AuditContext, Chains};
use sluice::plugin::bindings::sluice::plugin::types::Completion;
use sluice::plugin::{Plugin, RequestView, Runtime};

/// Builds `packages` for wasm32-wasip2 (release) and returns the directory of the `.wasm`s.
fn build_wasm(packages: &[&str]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = root.join("target/wasm");
    let mut cmd = std::process::Command::new(env!("CARGO"));
    cmd.current_dir(&root)
        .args(["build", "--release", "--target", "wasm32-wasip2"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    let status = cmd
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("cannot run cargo");
    assert!(
        status.success(),
        "building {packages:?} failed (rustup target add wasm32-wasip2?)"
    );
    target.join("wasm32-wasip2/release")
}

fn fixture() -> PathBuf {
    build_wasm(&["fixture-echo"]).join("fixture_echo.wasm")
}

fn view() -> RequestView {
    RequestView {
        method: "GET".into(),
        scheme: "https".into(),
        authority: "app.example.com".into(),
        path: "/api/v1/items?page=2".into(),
        headers: [
            ("accept", "application/json"),
            ("user-agent", "bench/1.0"),
            ("x-forwarded-for", "192.0.2.10"),
            ("sluice-request-id", "0123456789abcdef0123456789abcdef"),
        ]
        .into_iter()
        .map(|(n, v)| (n.parse().unwrap(), v.parse().unwrap()))
        .collect(),
        request_id: "0123456789abcdef0123456789abcdef".into(),
        hostname: "app.example.com".into(),
        ingress_rule: 0,
        client_addr: None,
    }
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{name:<44} median {:>8.2} µs   p99 {:>8.2} µs   ({} samples)",
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        samples.len()
    );
}

async fn load(
    rt: &Arc<Runtime>,
    name: &str,
    config: &str,
    isolation: Isolation,
    metrics: &Arc<Metrics>,
) -> Plugin {
    let mut cfg = PluginConfig::new(name, fixture_path());
    cfg.config_json = config.as_bytes().to_vec();
    cfg.isolation = isolation;
    cfg.max_calls = u64::MAX;
    Plugin::load(rt.clone(), cfg, metrics.clone())
        .await
        .expect("load")
}

fn fixture_path() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(fixture).clone()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let iters: usize = std::env::var("SLUICE_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = Runtime::new(64 << 20, 256).unwrap();
    let metrics = Arc::new(Metrics::new("bench"));
    let view = view();
    println!("hook cost, echo fixture, {iters} iterations after 1000 warm-up calls");

    // Reuse: one pooled instance serves every call.
    for (label, config) in [
        ("on-request, reuse, no-op decision", "{}"),
        ("on-request, reuse, one header edit", r#"{"tag":"a"}"#),
    ] {
        let p = load(&rt, "reuse", config, Isolation::Reuse, &metrics).await;
        let mut none = sluice::plugin::Held::default();
        for _ in 0..1000 {
            p.on_request(&mut none, view.clone()).await.result.unwrap();
        }
        let mut samples = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            p.on_request(&mut none, view.clone()).await.result.unwrap();
            samples.push(t.elapsed());
        }
        report(label, samples);
    }

    // Per-request isolation: a fresh instance (pooled slot, copy-on-write memory), `init`
    // with the plugin's config, then the call.
    {
        let p = load(
            &rt,
            "fresh",
            r#"{"tag":"a"}"#,
            Isolation::PerRequest,
            &metrics,
        )
        .await;
        for _ in 0..200 {
            let mut held = sluice::plugin::Held::default();
            p.on_request(&mut held, view.clone()).await.result.unwrap();
        }
        let n = (iters / 4).max(100);
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let mut held = sluice::plugin::Held::default();
            p.on_request(&mut held, view.clone()).await.result.unwrap();
            drop(held);
            samples.push(t.elapsed());
        }
        report("request, per-request isolation", samples);
    }

    // A chain of three plugins (reuse), each appending to a header.
    {
        let mut chain = Vec::new();
        for tag in ["a", "b", "c"] {
            chain.push(
                load(
                    &rt,
                    tag,
                    &format!(r#"{{"tag":"{tag}"}}"#),
                    Isolation::Reuse,
                    &metrics,
                )
                .await,
            );
        }
        let mut none = sluice::plugin::Held::default();
        let mut samples = Vec::with_capacity(iters);
        for i in 0..iters + 1000 {
            let t = Instant::now();
            for p in &chain {
                p.on_request(&mut none, view.clone()).await.result.unwrap();
            }
            if i >= 1000 {
                samples.push(t.elapsed());
            }
        }
        report("chain of three plugins, on-request", samples);
    }

    real_chain(iters, &rt, &metrics, &view).await;
    kv_costs(iters, &metrics, &view).await;
    outbound_costs(iters / 4, &metrics, &view).await;
    body_costs(&metrics, &view).await;
}

/// A loopback HTTP/1.1 server answering every request with `k1`.
async fn tiny_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"k1")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// One `on-request` that makes an outbound call (the `caller` fixture, `http` grant) to a
/// loopback server, against the same GET made directly with a keep-alive hyper client: the
/// difference, less a no-op hook, is what the host adds to a call beyond the network.
async fn outbound_costs(iters: usize, metrics: &Arc<Metrics>, view: &RequestView) {
    let addr = tiny_server().await;
    let url = format!("http://{addr}/keys");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters + 200 {
        let t = Instant::now();
        let resp = client.get(url.parse().unwrap()).await.unwrap();
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        if i >= 200 {
            samples.push(t.elapsed());
        }
    }
    report("GET on loopback, hyper client directly", samples);

    let wasm = build_wasm(&["fixture-caller"]).join("fixture_caller.wasm");
    let rt = Runtime::new(64 << 20, 16).unwrap();
    let mut cfg = PluginConfig::new("caller", &wasm);
    cfg.grants.http = true;
    cfg.http.allow_hosts = vec![addr.to_string()];
    cfg.max_calls = u64::MAX;
    let p = Plugin::load(rt, cfg, metrics.clone()).await.expect("load");
    let mut view = view.clone();
    view.headers.append("x-call", url.parse().unwrap());
    let mut held = sluice::plugin::Held::default();
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters + 200 {
        let t = Instant::now();
        let d = p.on_request(&mut held, view.clone()).await.result.unwrap();
        assert_eq!(d.respond.map(|r| r.status), Some(200));
        if i >= 200 {
            samples.push(t.elapsed());
        }
    }
    report("on-request making that GET (http grant)", samples);
}

/// A MiB of body, in 16 KiB pieces, through the body filter as the connector runs it, with a
/// plugin that passes every piece and with one that replaces each (upper-cased): per MiB.
async fn body_costs(metrics: &Arc<Metrics>, view: &RequestView) {
    use http_body_util::BodyExt;
    use sluice::connector::body::{BodyFilter, Stage};
    let wasm = build_wasm(&["fixture-bodies"]).join("fixture_bodies.wasm");
    let rt = Runtime::new(64 << 20, 16).unwrap();
    let piece = bytes::Bytes::from(vec![b'a'; 16 * 1024]);
    let context = AuditContext {
        audit: Audit::disabled(),
        tunnel: "bench".into(),
    };
    let mib = |filter: Option<BodyFilter>| {
        let piece = piece.clone();
        async move {
            let chunks: Vec<Result<http_body::Frame<bytes::Bytes>, sluice::relay::BoxError>> = (0
                ..64)
                .map(|_| Ok(http_body::Frame::data(piece.clone())))
                .collect();
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks)).boxed();
            let t = Instant::now();
            let body = match filter {
                Some(f) => f.spawn(body).0,
                None => body,
            };
            let n = body.collect().await.unwrap().to_bytes().len();
            assert_eq!(n, 1 << 20);
            t.elapsed()
        }
    };
    let runs = 300;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        samples.push(mib(None).await);
    }
    report("1 MiB of body, no body hook", samples);
    for mode in ["pass", "upper"] {
        let mut cfg = PluginConfig::new(format!("body-{mode}"), &wasm);
        cfg.config_json = format!(r#"{{"request": "{mode}", "response": "pass"}}"#).into_bytes();
        cfg.max_calls = u64::MAX;
        let p = Arc::new(
            Plugin::load(rt.clone(), cfg, metrics.clone())
                .await
                .expect("load"),
        );
        let view = Arc::new(view.clone());
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            let stage = Stage::new(p.clone(), view.clone());
            let filter = BodyFilter::new(vec![stage], None, context.clone());
            samples.push(mib(Some(filter)).await);
        }
        report(&format!("1 MiB of body, body hook {mode}"), samples);
    }
}

/// One `on-request` that reads or increments a key in the plugin's key-value store, in this
/// process and in a redis-server on loopback (started here when installed): the store's cost
/// is the difference from the no-op call above.
async fn kv_costs(iters: usize, metrics: &Arc<Metrics>, view: &RequestView) {
    let wasm = build_wasm(&["fixture-stateful"]).join("fixture_stateful.wasm");
    let redis = start_redis();
    let mut backends = vec![("in-process", None)];
    match &redis {
        Some((_, url)) => backends.push(("Redis on loopback", Some(url.clone()))),
        None => println!(
            "(no redis-server: `apt-get install redis-server` to measure the Redis backend)"
        ),
    }
    for (backend, url) in backends {
        let rt = Runtime::new(64 << 20, 16).unwrap();
        rt.kv.configure(url.as_deref(), "bench").unwrap();
        for op in ["get", "increment"] {
            let mut cfg = PluginConfig::new(format!("kv-{op}"), &wasm);
            cfg.config_json = format!(
                r#"{{"remember": "/none", "mask_from": 600, "mask_status": 503, "mask_body": "", "kv_op": "{op}"}}"#
            )
            .into_bytes();
            cfg.grants.kv = true;
            cfg.grants.metrics = true;
            cfg.max_calls = u64::MAX;
            let p = Plugin::load(rt.clone(), cfg, metrics.clone())
                .await
                .expect("load");
            let mut held = sluice::plugin::Held::default();
            for _ in 0..1000 {
                p.on_request(&mut held, view.clone()).await.result.unwrap();
            }
            let mut samples = Vec::with_capacity(iters);
            for _ in 0..iters {
                let t = Instant::now();
                p.on_request(&mut held, view.clone()).await.result.unwrap();
                samples.push(t.elapsed());
            }
            report(&format!("on-request, kv {op}, {backend}"), samples);
        }
    }
    if let Some((mut child, _)) = redis {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A redis-server on a free loopback port, if installed; the process and its URL.
fn start_redis() -> Option<(std::process::Child, String)> {
    let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .into_iter()
        .find(|p| Path::new(p).is_file())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = std::process::Command::new(bin)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--loglevel", "warning"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((child, format!("redis://127.0.0.1:{port}")))
}

/// The three plugins of `bench/compare` as the connector runs them on every request: each
/// hook of each plugin with the request's view, the decisions validated and applied, and the
/// audit-log plugin's events written to a file by the audit writer.
async fn real_chain(iters: usize, rt: &Arc<Runtime>, metrics: &Arc<Metrics>, view: &RequestView) {
    let wasm = build_wasm(&["access-guard", "header-rewrite", "audit-log"]);
    let scratch = std::env::temp_dir().join(format!("sluice-hooks-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let text = format!(
        r#"tunnel = "bench"
token = "bench-token-0123456789"
edges = ["127.0.0.1:7844"]
plugins = ["guard", "rewrite", "audit"]

[[origin]]
name = "web"
url = "http://127.0.0.1:8080"

[[ingress]]
origin = "web"

[[plugin]]
name = "guard"
path = "{wasm}/access_guard.wasm"
grants = ["credentials"]
[plugin.config]
tokens = ["bench-bearer-token-0123456789"]

[[plugin]]
name = "rewrite"
path = "{wasm}/header_rewrite.wasm"
[plugin.config.request.set]
x-bench = "{{request_id}}"

[[plugin]]
name = "audit"
path = "{wasm}/audit_log.wasm"

[audit]
file = "{scratch}/audit.jsonl"
"#,
        wasm = wasm.display(),
        scratch = scratch.display(),
    );
    let config = ConnectorConfig::parse(&text, &scratch.join("connector.toml")).expect("config");
    let mut loaded = std::collections::HashMap::new();
    for p in &config.plugins {
        let plugin = Plugin::load(rt.clone(), p.clone(), metrics.clone())
            .await
            .expect("load");
        loaded.insert(p.name.clone(), Arc::new(plugin));
    }
    let chains = Chains::new(&config, loaded);
    let context = AuditContext {
        audit: Audit::start(&config.audit, metrics.clone())
            .await
            .expect("audit"),
        tunnel: "bench".into(),
    };
    // The request oha sends in `bench/compare`, as the connector's view has it.
    let mut request = view.clone();
    request.path = "/100b".into();
    request.headers = [
        ("user-agent", "oha/1.4.0"),
        ("accept", "*/*"),
        ("authorization", "Bearer bench-bearer-token-0123456789"),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "bench.test"),
        ("sluice-request-id", "0123456789abcdef0123456789abcdef"),
    ]
    .into_iter()
    .map(|(n, v)| (n.parse().unwrap(), v.parse().unwrap()))
    .collect();
    let request_headers = request.headers.clone();
    let mut response_headers = http::HeaderMap::new();
    response_headers.insert("server", http::HeaderValue::from_static("nginx"));
    response_headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/octet-stream"),
    );
    response_headers.insert("content-length", http::HeaderValue::from_static("100"));

    let one = Arc::new(OneRequest {
        chains,
        context,
        request,
        request_headers,
        response_headers,
    });
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters + 1000 {
        let t = Instant::now();
        one.run().await;
        if i >= 1000 {
            samples.push(t.elapsed());
        }
    }
    report("bench/compare chain, every hook, per request", samples);

    // As under bench/compare's case A: 64 requests at a time on a two-worker runtime, the
    // process's CPU time (every thread: workers, audit writer, epoch ticker) per request.
    let shared = one.clone();
    let cpu_us = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let before = process_cpu();
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let one = shared.clone();
                    tokio::spawn(async move {
                        for _ in 0..iters / 64 {
                            one.run().await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            (process_cpu() - before) * 1e6 / (iters / 64 * 64) as f64
        })
    })
    .join()
    .unwrap();
    println!(
        "{:<44} CPU    {cpu_us:>8.2} µs per request (64 at a time, 2 workers)",
        "bench/compare chain, concurrent"
    );
    one.context.audit.close().await;
    let _ = std::fs::remove_dir_all(&scratch);
}

/// User + system seconds used by this process so far.
fn process_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime, in clock ticks of 1/100 s on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// One request of bench/compare's traffic through the chain, every hook.
struct OneRequest {
    chains: Chains,
    context: AuditContext,
    request: RequestView,
    request_headers: http::HeaderMap,
    response_headers: http::HeaderMap,
}

impl OneRequest {
    async fn run(&self) {
        let mut headers = self.request_headers.clone();
        let mut run = self
            .chains
            .start(0, || self.request.clone(), &self.context)
            .expect("a chain");
        let edits = run.on_request(&mut headers, |_| true).await.unwrap();
        assert!(
            edits.respond.is_none(),
            "access-guard refused the bench token"
        );
        let mut resp = self.response_headers.clone();
        let mut status = http::StatusCode::OK;
        run.on_response(&mut status, &mut resp).await.unwrap();
        run.on_complete(Completion {
            status: 200,
            origin: Some("web".into()),
            duration_us: 250,
            bytes_in: 0,
            bytes_out: 100,
            error: None,
        })
        .await;
    }
}
