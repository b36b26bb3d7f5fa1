//! Hook-cost benchmark: median and p99 of one `on-request` call with instance reuse, of one
//! request under per-request isolation (fresh instance, `init`, call), and of a three-plugin
//! chain. Uses the `echo` fixture plugin (built for wasm32-wasip2 on first run).
//!
//! Run: `cargo bench -p sluice --bench hooks` (iterations: `SLUICE_BENCH_ITERS`, default 20000).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::admin::Metrics;
use sluice::config::{Isolation, PluginConfig};
use sluice::plugin::{Plugin, RequestView, Runtime};

fn fixture() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = root.join("target/wasm");
    let status = std::process::Command::new(env!("CARGO"))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            "fixture-echo",
            "--target-dir",
        ])
        .arg(&target)
        .status()
        .expect("cannot run cargo");
    assert!(
        status.success(),
        "building the echo fixture failed (rustup target add wasm32-wasip2?)"
    );
    target.join("wasm32-wasip2/release/fixture_echo.wasm")
}

fn view() -> RequestView {
    RequestView {
        method: "GET".into(),
        scheme: "https".into(),
        authority: "app.example.com".into(),
        path: "/api/v1/items?page=2".into(),
        headers: vec![
            ("accept".into(), b"application/json".to_vec()),
            ("user-agent".into(), b"bench/1.0".to_vec()),
            ("x-forwarded-for".into(), b"192.0.2.10".to_vec()),
            (
                "sluice-request-id".into(),
                b"0123456789abcdef0123456789abcdef".to_vec(),
            ),
        ],
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
        let mut none = None;
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
            let mut held = None;
            p.on_request(&mut held, view.clone()).await.result.unwrap();
        }
        let n = (iters / 4).max(100);
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let mut held = None;
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
        let mut none = None;
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
}
