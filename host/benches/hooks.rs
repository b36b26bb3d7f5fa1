//! Hook-cost benchmark: median and p99 of one `on-request` call with instance reuse, of one
//! request under per-request isolation (fresh instance, `init`, call), of a three-plugin
//! chain of the `echo` fixture, and of the chain `bench/compare` runs as the connector runs
//! it: access-guard, header-rewrite and audit-log (with a file sink) through every hook of a
//! request (`on-request`, `on-response`, `on-complete`), views, decisions and audit events
//! included; then that chain's cost in the tunnel itself (an edge and a connector as separate
//! processes, with and without it, under `bench/compare`'s case A); then one call that reads
//! or increments a key in the plugin's key-value store, in this process and in Redis (when
//! redis-server is installed); an outbound HTTP call from a hook against the same call made
//! directly; and a MiB of body through a body hook. Plugins are built for wasm32-wasip2 on
//! first run.
//!
//! Run: `cargo bench -p sluice --bench hooks` (iterations: `SLUICE_BENCH_ITERS`, default 20000).

mod common;

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
    let iters: usize = common::env_or("SLUICE_BENCH_ITERS", 20_000);
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

    let wasm = build_wasm(&["access-guard", "header-rewrite", "audit-log"]);
    real_chain(iters, &wasm, &rt, &metrics, &view).await;
    tunnel_chain(&wasm);
    kv_costs(iters, &metrics, &view).await;
    outbound_costs(iters / 4, &metrics, &view).await;
    body_costs(&metrics, &view).await;
}

/// A loopback HTTP/1.1 server answering every request with `body`.
async fn tiny_server(body: &'static [u8]) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(body)),
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
    let addr = tiny_server(b"k1").await;
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

/// The `[[plugin]]` tables and `[audit]` sink of the chain `bench/compare` runs (a
/// connector's `plugins = ["guard", "rewrite", "audit"]` names them).
fn chain_tables(wasm: &Path, audit_file: &Path) -> String {
    format!(
        r#"
[[plugin]]
name = "guard"
path = "{wasm}/access_guard.wasm"
grants = ["credentials"]
[plugin.config]
tokens = ["{bearer}"]

[[plugin]]
name = "rewrite"
path = "{wasm}/header_rewrite.wasm"
[plugin.config.request.set]
x-bench = "{{request_id}}"

[[plugin]]
name = "audit"
path = "{wasm}/audit_log.wasm"

[audit]
file = "{audit}"
"#,
        wasm = wasm.display(),
        audit = audit_file.display(),
        bearer = common::BEARER,
    )
}

/// The three plugins of `bench/compare` as the connector runs them on every request: each
/// hook of each plugin with the request's view, the decisions validated and applied, and the
/// audit-log plugin's events written to a file by the audit writer.
async fn real_chain(
    iters: usize,
    wasm: &Path,
    rt: &Arc<Runtime>,
    metrics: &Arc<Metrics>,
    view: &RequestView,
) {
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
{tables}"#,
        tables = chain_tables(wasm, &scratch.join("audit.jsonl")),
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
        ("authorization", &*format!("Bearer {}", common::BEARER)),
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
            let before = common::cpu_seconds("self");
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
            (common::cpu_seconds("self") - before) * 1e6 / (iters / 64 * 64) as f64
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

/// The chain's cost where it runs: an edge and a connector as separate `sluice` processes,
/// one pair without plugins and one with `bench/compare`'s chain, in front of an origin in
/// this process answering 100 bytes, loaded as `bench/compare`'s case A loads them (64
/// clients, keep-alive, one request at a time each). The two pairs take turns, round after
/// round, so that both see the same state of a noisy host. First as fast as they answer,
/// which is what case A compares; then at one rate for both, below the chain's, which
/// separates the chain's own work from what a lower rate costs every request (fewer
/// requests per wake-up). Each round prints requests per second and each process's CPU
/// (user + system) per request; each phase ends with the medians' difference. Round length:
/// `SLUICE_BENCH_TUNNEL_SECS` (default 4); rounds: `SLUICE_BENCH_TUNNEL_ROUNDS` (default 3).
fn tunnel_chain(wasm: &Path) {
    let secs: f64 = common::env_or("SLUICE_BENCH_TUNNEL_SECS", 4.0);
    let rounds: usize = common::env_or("SLUICE_BENCH_TUNNEL_ROUNDS", 3).max(1);
    let wasm = wasm.to_path_buf();
    // The clients and the origin get two workers, like oha and nginx in bench/compare, and
    // share the cores with both tunnels' processes (on a thread of their own, as this
    // function is called from the benchmark's runtime).
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(in_tunnel(&wasm, secs, rounds))
    })
    .join()
    .expect("the in-tunnel measurement failed");
}

async fn in_tunnel(wasm: &Path, secs: f64, rounds: usize) {
    let origin = tiny_server(&[b'x'; 100]).await;
    let bare = common::Tunnel::start(origin, "", "").await;
    let chained = common::Tunnel::start_with_tables(
        origin,
        "",
        r#"plugins = ["guard", "rewrite", "audit"]"#,
        // Relative: next to the connector's config, removed with the tunnel's directory.
        &chain_tables(wasm, Path::new("audit.jsonl")),
    )
    .await;
    let tunnels = [&bare, &chained];
    println!(
        "in the tunnel, 64 clients, {secs} s per round: req/s, then CPU per request (µs) \
         of edge + connector"
    );
    let open = compare(&tunnels, "as fast as they go", secs, rounds, None).await;
    // The same at one fixed rate for both, below what the chain reaches: both processes
    // then wake up as often per request with the chain as without it, and the difference
    // is the chain's own work.
    let rate = (open[1].rate * 0.8).round();
    compare(&tunnels, &format!("{rate} req/s"), secs, rounds, Some(rate)).await;
}

/// Rounds of load on `[no plugins, chain]` in turn; prints each round, then the medians'
/// difference, and returns the medians.
async fn compare(
    tunnels: &[&common::Tunnel; 2],
    what: &str,
    secs: f64,
    rounds: usize,
    rate: Option<f64>,
) -> [Round; 2] {
    let mut seen: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (i, label) in ["no plugins", "chain"].into_iter().enumerate() {
            // A short warm-up fills the connector's origin pool and the plugins' instance
            // pools. Each round's clients connect anew: 64 connections within the round's
            // tens of thousands of requests.
            drive(tunnels[i], 0.5, rate).await;
            let r = drive(tunnels[i], secs, rate).await;
            println!(
                "  {what}, round {} {label:<12} {:>8.0} req/s   {:>6.1} + {:>6.1} µs",
                round + 1,
                r.rate,
                r.edge_us,
                r.connector_us
            );
            seen[i].push(r);
        }
    }
    // Each figure's median over the rounds (the upper middle one for an even count), each
    // figure on its own: the rate's and the CPU's may come from different rounds.
    let median = |rs: &[Round], f: fn(&Round) -> f64| {
        let mut v: Vec<f64> = rs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [bare, chain] = seen.map(|rs| Round {
        rate: median(&rs, |r| r.rate),
        edge_us: median(&rs, |r| r.edge_us),
        connector_us: median(&rs, |r| r.connector_us),
    });
    println!(
        "{:<44} CPU    {:>8.2} µs per request more ({:.1} edge, {:.1} connector); \
         {:.2}x the requests per second",
        format!("bench/compare chain in the tunnel, {what}"),
        (chain.edge_us + chain.connector_us) - (bare.edge_us + bare.connector_us),
        chain.edge_us - bare.edge_us,
        chain.connector_us - bare.connector_us,
        chain.rate / bare.rate,
    );
    [bare, chain]
}

/// One round of load on a tunnel: requests per second, and each process's CPU per request.
struct Round {
    rate: f64,
    edge_us: f64,
    connector_us: f64,
}

/// 64 keep-alive clients send bench/compare's request through `tunnel` for `secs` seconds,
/// as fast as answers come, or at `rate` requests per second in all.
async fn drive(tunnel: &common::Tunnel, secs: f64, rate: Option<f64>) -> Round {
    const CLIENTS: u32 = 64;
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let (edge0, conn0) = (tunnel.edge.cpu_seconds(), tunnel.connector.cpu_seconds());
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            // Paced clients start spread over one period from a common start, so the rate is
            // even. One that falls behind (an answer slower than its period) does not catch
            // up: the round then reports the rate it reached, below the target.
            let pace = rate.map(|r| {
                let period = Duration::from_secs_f64(f64::from(CLIENTS) / r);
                (period, started + period * i / CLIENTS)
            });
            tokio::spawn(client(tunnel.http, until, pace))
        })
        .collect();
    let mut done = 0u64;
    for c in clients {
        done += c.await.expect("client panicked");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let per = |cpu: f64| cpu * 1e6 / done as f64;
    Round {
        rate: done as f64 / elapsed,
        edge_us: per(tunnel.edge.cpu_seconds() - edge0),
        connector_us: per(tunnel.connector.cpu_seconds() - conn0),
    }
}

/// One client: requests on one connection until `until`, back to back or one per period
/// from a first instant (`pace`); how many were answered (each must be a 200 with the
/// origin's 100 bytes, within 10 s).
async fn client(
    addr: std::net::SocketAddr,
    until: Instant,
    pace: Option<(Duration, Instant)>,
) -> u64 {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(tcp))
    .await
    .expect("handshake");
    tokio::spawn(conn);
    let mut ticks = pace.map(|(period, first)| {
        let mut t = tokio::time::interval_at(first.into(), period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut n = 0;
    loop {
        if let Some(t) = ticks.as_mut() {
            t.tick().await;
        }
        if Instant::now() >= until {
            return n;
        }
        let req = http::Request::get("/100b")
            .header("host", "bench.test")
            .header("authorization", format!("Bearer {}", common::BEARER))
            .body(http_body_util::Empty::new())
            .unwrap();
        let exchange = async {
            let resp = send.send_request(req).await.expect("request failed");
            assert_eq!(resp.status(), 200, "the tunnel refused the bench's request");
            resp.into_body().collect().await.expect("body").to_bytes()
        };
        let body = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("no answer within 10 s");
        assert_eq!(body.len(), 100);
        n += 1;
    }
}
