//! What the whole-system benchmarks share: an edge and a connector as separate `sluice`
//! processes on loopback, for one tunnel (`bench.test`) to one origin, and their memory.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// A `sluice` process, killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// User + system seconds the process has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(&self.0.id().to_string())
    }

    /// Peak resident memory (VmHWM), KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Resident memory now (VmRSS), KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// User + system seconds used so far by process `pid` (`"self"` for this one).
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
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

/// The bearer token the hook benchmark's access-guard accepts (the one `bench/compare`
/// sends); a tunnel without plugins ignores it.
pub const BEARER: &str = "bench-bearer-token-0123456789";

/// The value of environment variable `name`, or `default` when it is unset or unreadable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A free TCP port on loopback (also free for UDP in practice).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An edge and a connector serving `bench.test` through to `origin`.
pub struct Tunnel {
    pub edge: Proc,
    pub connector: Proc,
    /// The edge's plain HTTP listener.
    pub http: SocketAddr,
    dir: PathBuf,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Tunnel {
    /// Writes certificates and configs (plus `edge_extra` and `connector_extra` lines at the
    /// top of each file), starts both processes and waits until the tunnel answers.
    pub async fn start(origin: SocketAddr, edge_extra: &str, connector_extra: &str) -> Tunnel {
        Tunnel::start_with_tables(origin, edge_extra, connector_extra, "").await
    }

    /// As [`Tunnel::start`], with `connector_tables` (TOML tables: plugins, `[audit]`)
    /// appended to the connector's file. Each tunnel gets a directory of its own, so that
    /// several can run at once.
    pub async fn start_with_tables(
        origin: SocketAddr,
        edge_extra: &str,
        connector_extra: &str,
        connector_tables: &str,
    ) -> Tunnel {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sluice-bench-{}-{n}", std::process::id()));
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
                "{edge_extra}\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n[connectors]\nlisten = \"127.0.0.1:{quic_port}\"\n\
                 cert = \"edge.crt\"\nkey = \"edge.key\"\n[[tunnel]]\nid = \"bench\"\ntoken-sha256 = \"{token_hash}\"\n\
                 hostnames = [\"bench.test\"]\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("connector.toml"),
            format!(
                "{connector_extra}\ntunnel = \"bench\"\ntoken = \"{token}\"\nedges = [\"127.0.0.1:{quic_port}\"]\nha-connections = 1\n\
                 edge-ca = \"edge.crt\"\nedge-server-name = \"localhost\"\n[[origin]]\nname = \"o\"\n\
                 url = \"http://{origin}\"\nrequest-timeout = \"10m\"\n[[ingress]]\norigin = \"o\"\n{connector_tables}\n"
            ),
        )
        .unwrap();
        let edge = spawn("edge", &dir.join("edge.toml"));
        let connector = spawn("connector", &dir.join("connector.toml"));
        let http: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
        let tunnel = Tunnel {
            edge,
            connector,
            http,
            dir,
        };
        tunnel.wait_up().await;
        tunnel
    }

    async fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(tcp) = tokio::net::TcpStream::connect(self.http).await {
                let handshake =
                    hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
                        .await;
                if let Ok((mut s, c)) = handshake {
                    tokio::spawn(c);
                    let req = Request::get("/")
                        .header("host", "bench.test")
                        .header("authorization", format!("Bearer {BEARER}"))
                        .body(Empty::new())
                        .unwrap();
                    if let Ok(r) = s.send_request(req).await {
                        let ok = r.status() == 200;
                        let _ = r.into_body().collect().await;
                        if ok {
                            return;
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "tunnel did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Peak RSS (KiB) of edge and connector.
    pub fn peak_rss_kib(&self) -> (u64, u64) {
        (self.edge.peak_rss_kib(), self.connector.peak_rss_kib())
    }

    /// Current RSS (KiB) of edge and connector.
    pub fn rss_kib(&self) -> (u64, u64) {
        (self.edge.rss_kib(), self.connector.rss_kib())
    }
}

fn spawn(role: &str, config: &Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([role, "--config"])
            .arg(config)
            // Errors only: an edge warns that the tunnel has no connection until its
            // connector is up, which every start goes through.
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .expect("failed to start sluice"),
    )
}
