//! Slow-client benchmark: 2,000 clients trickle request heads and bodies at one tunnel (real
//! edge and connector processes) while a well-behaved client on another address keeps
//! sending requests; reports how the edge turned the tricklers away, the well-behaved
//! client's latency, and both processes' memory.
//!
//! Run: `cargo bench -p sluice --bench trickle` (`SLUICE_BENCH_TRICKLERS`, default 2000;
//! `SLUICE_BENCH_SECS`, default 15).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

/// Writes `bytes` one at a time every `every` until `end`; counts a connection the edge
/// refused or cut off.
async fn trickle(
    edge: SocketAddr,
    bytes: &'static [u8],
    every: Duration,
    end: Instant,
    cut: Arc<AtomicUsize>,
) {
    let Ok(mut tcp) = tokio::net::TcpStream::connect(edge).await else {
        cut.fetch_add(1, Ordering::Relaxed);
        return;
    };
    for b in bytes.iter().cycle() {
        if Instant::now() >= end {
            return;
        }
        tokio::time::sleep(every).await;
        if tcp.write_all(&[*b]).await.is_err() {
            cut.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

#[tokio::main]
async fn main() {
    let tricklers = common::env_or::<u64>("SLUICE_BENCH_TRICKLERS", 2000) as usize;
    let secs = common::env_or::<u64>("SLUICE_BENCH_SECS", 15);

    let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = origin.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = origin.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let tunnel = common::Tunnel::start(origin_addr, "", "").await;
    let before = tunnel.rss_kib();

    let end = Instant::now() + Duration::from_secs(secs);
    let cut = Arc::new(AtomicUsize::new(0));
    let head: &'static [u8] = b"GET /slow HTTP/1.1\r\nHost: bench.test\r\nX-Pad: ";
    let body: &'static [u8] =
        b"POST /slow HTTP/1.1\r\nHost: bench.test\r\nContent-Length: 100000000\r\n\r\nxxxxxxxxxxxxxxxx";
    let tasks: Vec<_> = (0..tricklers)
        .map(|i| {
            let (bytes, every) = if i % 2 == 0 {
                (head, Duration::from_secs(1))
            } else {
                (body, Duration::from_millis(100))
            };
            tokio::spawn(trickle(tunnel.http, bytes, every, end, cut.clone()))
        })
        .collect();

    // The well-behaved client, from another address, one request every 100 ms.
    let mut latencies = Vec::new();
    let mut failures = 0;
    let mut peak = (0, 0);
    while Instant::now() < end {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let start = Instant::now();
        let ok = async {
            let tcp = socket.connect(tunnel.http).await.ok()?;
            let (mut s, c) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
                    .await
                    .ok()?;
            tokio::spawn(c);
            let req = Request::get("/ok")
                .header("host", "bench.test")
                .body(Empty::new())
                .unwrap();
            let resp = s.send_request(req).await.ok()?;
            let status = resp.status();
            resp.into_body().collect().await.ok()?;
            (status == 200).then_some(())
        };
        match tokio::time::timeout(Duration::from_secs(5), ok).await {
            Ok(Some(())) => latencies.push(start.elapsed()),
            _ => failures += 1,
        }
        let now = tunnel.rss_kib();
        peak = (peak.0.max(now.0), peak.1.max(now.1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    println!("{tricklers} trickling clients for {secs} s against one tunnel (edge and connector as separate processes)");
    println!(
        "  tricklers refused at accept or cut off by a timeout: {}",
        cut.load(Ordering::Relaxed)
    );
    println!(
        "  well-behaved client: {} answered 200, {failures} failed; latency median {:.2?}, p99 {:.2?}, max {:.2?}",
        latencies.len(),
        pct(50),
        pct(99),
        latencies[latencies.len() - 1]
    );
    println!("  RSS (VmRSS)            edge      connector");
    println!(
        "  before            {:>7} KiB  {:>7} KiB",
        before.0, before.1
    );
    println!(
        "  peak while trickling {:>4} KiB  {:>7} KiB",
        peak.0, peak.1
    );
    let hwm = tunnel.peak_rss_kib();
    println!("  peak (VmHWM)      {:>7} KiB  {:>7} KiB", hwm.0, hwm.1);
}
