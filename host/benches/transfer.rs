//! Transfer benchmark: streams a large upload and download through a real edge and connector
//! (separate `sluice` processes) and reports throughput and each process's peak RSS.
//!
//! Run: `cargo bench -p sluice --bench transfer` (size: `SLUICE_BENCH_BYTES`, default 1 GiB).
//! Peak RSS must stay flat as the size grows: no component buffers a body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(role: &str, config: &Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([role, "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("failed to start sluice"),
    )
}

#[tokio::main]
async fn main() {
    let total: u64 = std::env::var("SLUICE_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);

    // Origin: POST /sink counts the body; GET /source streams `total` bytes.
    let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = origin.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = origin.accept().await {
            tcp.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let resp: Response<Body> = if req.uri().path() == "/sink" {
                        let n = drain(req.into_body()).await;
                        Response::new(BodyExt::boxed(
                            http_body_util::Full::new(Bytes::from(n.to_string()))
                                .map_err(|e| match e {}),
                        ))
                    } else {
                        let mut r = Response::new(source(total));
                        r.headers_mut().insert("content-length", total.into());
                        r
                    };
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });

    // Certificates and configs for two separate processes.
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("edge.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("edge.key"), ck.key_pair.serialize_pem()).unwrap();
    let (http_port, quic_port) = (free_port(), free_port());
    let token = "bench-token";
    let token_hash = hex::encode(sluice::secret::Secret::new(token).sha256());
    std::fs::write(
        dir.join("edge.toml"),
        format!(
            "[http]\nlisten = \"127.0.0.1:{http_port}\"\n[connectors]\nlisten = \"127.0.0.1:{quic_port}\"\n\
             cert = \"edge.crt\"\nkey = \"edge.key\"\n[[tunnel]]\nid = \"bench\"\ntoken-sha256 = \"{token_hash}\"\n\
             hostnames = [\"bench.test\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("connector.toml"),
        format!(
            "tunnel = \"bench\"\ntoken = \"{token}\"\nedges = [\"127.0.0.1:{quic_port}\"]\nha-connections = 1\n\
             edge-ca = \"edge.crt\"\nedge-server-name = \"localhost\"\n[[origin]]\nname = \"o\"\n\
             url = \"http://{origin_addr}\"\nrequest-timeout = \"10m\"\n[[ingress]]\norigin = \"o\"\n"
        ),
    )
    .unwrap();
    let edge = spawn("edge", &dir.join("edge.toml"));
    let connector = spawn("connector", &dir.join("connector.toml"));
    let edge_addr: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();

    // Wait until the tunnel answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(tcp) = tokio::net::TcpStream::connect(edge_addr).await {
            let (mut s, c) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(c);
            let req = Request::post("/sink")
                .header("host", "bench.test")
                .body(source(0))
                .unwrap();
            if let Ok(r) = s.send_request(req).await {
                if r.status() == 200 {
                    break;
                }
            }
        }
        assert!(Instant::now() < deadline, "tunnel did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let baseline = (peak_rss_kib(edge.0.id()), peak_rss_kib(connector.0.id()));

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
    let after_up = (peak_rss_kib(edge.0.id()), peak_rss_kib(connector.0.id()));

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
    let after_down = (peak_rss_kib(edge.0.id()), peak_rss_kib(connector.0.id()));

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
    drop(edge);
    drop(connector);
    let _ = std::fs::remove_dir_all(&dir);
}
