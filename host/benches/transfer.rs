//! Transfer benchmark: streams a large upload and download through a real edge and connector
//! (separate `sluice` processes) and reports throughput and each process's peak RSS.
//!
//! Run: `cargo bench -p sluice --bench transfer` (size: `SLUICE_BENCH_BYTES`, default 1 GiB).
//! Peak RSS must stay flat as the size grows: no component buffers a body.

mod common;

use std::convert::Infallible;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

const BLOCK: usize = 64 * 1024;

fn source(total: u64) -> Body {
    let block = Bytes::from(vec![0x5a; BLOCK]);
    let n = total / BLOCK as u64;
    let stream = futures_util::stream::iter(
        (0..n).map(move |_| Ok::<_, BoxError>(Frame::data(block.clone()))),
    );
    BodyExt::boxed(StreamBody::new(stream))
}

async fn drain(mut body: Incoming) -> u64 {
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.expect("body failed").into_data() {
            n += d.len() as u64;
        }
    }
    n
}

#[tokio::main]
async fn main() {
    let total: u64 = common::env_or("SLUICE_BENCH_BYTES", 1 << 30);

    // Origin: POST /sink counts the body; GET /source streams `total` bytes; anything else
    // is a small answer.
    let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = origin.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = origin.accept().await {
            tcp.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let resp: Response<Body> = match req.uri().path() {
                        "/sink" => {
                            let n = drain(req.into_body()).await;
                            Response::new(BodyExt::boxed(
                                http_body_util::Full::new(Bytes::from(n.to_string()))
                                    .map_err(|e| match e {}),
                            ))
                        }
                        "/source" => {
                            let mut r = Response::new(source(total));
                            r.headers_mut().insert("content-length", total.into());
                            r
                        }
                        _ => Response::new(source(0)),
                    };
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });

    let tunnel = common::Tunnel::start(origin_addr, "", "").await;
    let edge_addr = tunnel.http;
    let baseline = tunnel.peak_rss_kib();

    let tcp = tokio::net::TcpStream::connect(edge_addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (mut sender, c) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(c);

    let start = Instant::now();
    let req = Request::post("/sink")
        .header("host", "bench.test")
        .body(source(total))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let got: u64 = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
    .parse()
    .unwrap();
    assert_eq!(got, total, "upload arrived short");
    let up = start.elapsed();
    let after_up = tunnel.peak_rss_kib();

    let start = Instant::now();
    let req = Request::get("/source")
        .header("host", "bench.test")
        .body(source(0))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(
        drain(resp.into_body()).await,
        total,
        "download arrived short"
    );
    let down = start.elapsed();
    let after_down = tunnel.peak_rss_kib();

    let mib = total as f64 / (1 << 20) as f64;
    println!("transfer of {mib:.0} MiB through edge + connector (separate processes, loopback)");
    println!(
        "  upload:   {:>7.1} MiB/s ({:.2?})",
        mib / up.as_secs_f64(),
        up
    );
    println!(
        "  download: {:>7.1} MiB/s ({:.2?})",
        mib / down.as_secs_f64(),
        down
    );
    println!("  peak RSS (VmHWM)       edge      connector");
    println!(
        "  after start        {:>7} KiB  {:>7} KiB",
        baseline.0, baseline.1
    );
    println!(
        "  after upload       {:>7} KiB  {:>7} KiB",
        after_up.0, after_up.1
    );
    println!(
        "  after download     {:>7} KiB  {:>7} KiB",
        after_down.0, after_down.1
    );
}
