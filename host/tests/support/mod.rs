//! Shared fixtures for integration tests: an edge, a connector and origins on 127.0.0.1:0,
//! rcgen certificates, a hyper client, and a log capture.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use sluice::config::{
    ConnectorConfig, EdgeConfig, HostPattern, IngressRuleConfig, OriginConfig, OriginTarget,
    TlsIdentity, TunnelConfig,
};
use sluice::connector::{Connector, ConnectorState};
use sluice::edge::Edge;
use sluice::secret::Secret;

pub mod raw;

use sluice::config::TransportChoice;

thread_local! {
    /// The transport [`connector_config`] asks for: set by [`over_both_transports!`] for the
    /// test running on this thread (tests run their body on their own thread), `auto`
    /// otherwise.
    static TRANSPORT: std::cell::Cell<TransportChoice> =
        const { std::cell::Cell::new(TransportChoice::Auto) };
}

/// Makes the connectors of this thread's test use `transport` until the guard drops.
pub fn use_transport(transport: TransportChoice) -> impl Drop {
    struct Reset(TransportChoice);
    impl Drop for Reset {
        fn drop(&mut self) {
            TRANSPORT.with(|t| t.set(self.0));
        }
    }
    Reset(TRANSPORT.with(|t| t.replace(transport)))
}

/// The transport connectors of this thread's test use.
pub fn transport() -> TransportChoice {
    TRANSPORT.with(|t| t.get())
}

/// Runs every test function given once over QUIC and once over HTTP/2 on TCP, as
/// `quic::NAME` and `http2::NAME`: the same body, with [`connector_config`] choosing the
/// transport (every test edge listens on both).
#[macro_export]
macro_rules! over_both_transports {
    ($($(#[$meta:meta])* async fn $name:ident() $body:block)*) => {
        mod quic {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                async fn $name() {
                    let _transport =
                        support::use_transport(sluice::config::TransportChoice::Quic);
                    $body
                }
            )*
        }
        mod http2 {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                async fn $name() {
                    let _transport =
                        support::use_transport(sluice::config::TransportChoice::Http2);
                    $body
                }
            )*
        }
    };
}

/// Upper bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(20);

/// Captures log output of the current thread (tests run on a current-thread runtime, so every
/// task of the test logs here).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    pub async fn wait_for(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.text().contains(needle) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "log line {needle:?} never appeared; logs:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A global subscriber that records nothing but keeps every callsite's interest at
/// "sometimes", so that a thread-local capture in one test sees its events even when other
/// tests, on threads without a subscriber, reached the same callsites first.
struct Silent;

impl tracing::Subscriber for Silent {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Installs the global [`Silent`] subscriber once per test binary.
pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(Silent);
    });
}

/// Installs a log capture for this thread; keep the guard alive for the test.
pub fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    init_tracing();
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("sluice=debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    (logs, guard)
}

/// A certificate for "localhost" and the CA to trust it with (self-signed: the same cert).
pub fn identity() -> TlsIdentity {
    identity_pem().0
}

/// Like [`identity`], with the certificate also as PEM (for config files).
pub fn identity_pem() -> (TlsIdentity, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let id = TlsIdentity {
        chain: vec![ck.cert.der().clone()],
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into()),
    };
    (id, ck.cert.pem())
}

pub fn tunnel(id: &str, token: &str, hosts: &[&str]) -> TunnelConfig {
    TunnelConfig {
        id: id.into(),
        token_hashes: vec![Secret::new(token).sha256()],
        hostnames: hosts
            .iter()
            .map(|h| HostPattern::try_from(*h).unwrap())
            .collect(),
        max_concurrent_requests: 1000,
        max_connections: sluice::config::DEFAULT_TUNNEL_MAX_CONNECTIONS,
        ports: Vec::new(),
    }
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A running edge.
pub struct EdgeHandle {
    pub http: SocketAddr,
    pub quic: SocketAddr,
    /// The TCP listener for connectors (same port number as `quic`).
    pub tcp: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// The tunnels' public ports, as bound.
    pub ports: Vec<sluice::edge::PortInfo>,
    pub reloader: Option<sluice::edge::EdgeReloader>,
    pub identity: TlsIdentity,
    /// The edge's QUIC certificate as PEM.
    pub ca_pem: String,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

pub async fn start_edge(
    tunnels: Vec<TunnelConfig>,
    tweak: impl FnOnce(&mut EdgeConfig),
) -> EdgeHandle {
    init_tracing();
    let (identity, ca_pem) = identity_pem();
    let mut cfg = EdgeConfig::new(loopback(), identity.clone());
    cfg.http_listen = Some(loopback());
    // Connectors reach it over either transport at one port number.
    cfg.tcp_listen = Some(loopback());
    cfg.tunnels = tunnels;
    tweak(&mut cfg);
    let edge = Edge::bind(cfg).await.unwrap();
    let shutdown = CancellationToken::new();
    let (http, quic, tcp, https, admin) = (
        edge.http_addr().unwrap(),
        edge.quic_addr(),
        edge.tcp_addr(),
        edge.https_addr(),
        edge.admin_addr(),
    );
    let reloader = Some(edge.reloader());
    let ports = edge.ports();
    let task = tokio::spawn(edge.run(shutdown.clone()));
    EdgeHandle {
        ports,
        http,
        quic,
        tcp,
        https,
        admin,
        reloader,
        identity,
        ca_pem,
        shutdown,
        task,
    }
}

/// A running connector.
pub struct ConnectorHandle {
    pub state: Arc<ConnectorState>,
    /// The admin listener, when the config asked for one.
    pub admin: Option<SocketAddr>,
    /// Applies a new configuration, as SIGHUP does.
    pub reloader: sluice::connector::ConnectorReloader,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl ConnectorHandle {
    /// Waits until `n` connections are registered; under a test run over one transport,
    /// checks they all use it.
    pub async fn registered(&self, n: usize) {
        tokio::time::timeout(WAIT, self.state.wait_registered(n))
            .await
            .expect("connector did not register in time");
        let want = match transport() {
            TransportChoice::Auto => return,
            TransportChoice::Quic => sluice::transport::Protocol::Quic,
            TransportChoice::Http2 => sluice::transport::Protocol::Http2,
        };
        for link in self.state.connections() {
            assert_eq!(link.protocol, want, "{link:?}");
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(WAIT, self.task).await;
    }
}

/// A connector config for `edge`, with the given origins and ingress (catch-all → first origin
/// if `ingress` is empty).
pub fn connector_config(
    edge: &EdgeHandle,
    tunnel: &str,
    token: &str,
    origins: Vec<OriginConfig>,
    mut ingress: Vec<IngressRuleConfig>,
) -> ConnectorConfig {
    let mut cfg = ConnectorConfig::new(tunnel, Secret::new(token));
    cfg.edges = vec![edge.quic.to_string()];
    cfg.protocol = transport();
    cfg.edge_server_name = Some("localhost".into());
    cfg.edge_ca = edge.identity.chain.clone();
    if ingress.is_empty() {
        ingress.push(rule(None, None, &origins[0].name));
    }
    cfg.origins = origins;
    cfg.ingress = ingress;
    cfg.backoff.initial = Duration::from_millis(50);
    cfg.backoff.max = Duration::from_millis(500);
    cfg
}

pub async fn start_connector(cfg: ConnectorConfig) -> ConnectorHandle {
    let connector = Connector::new(cfg).await.unwrap();
    let state = connector.state();
    let admin = connector.admin_addr();
    let reloader = connector.reloader();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        connector.run(token).await.unwrap();
    });
    ConnectorHandle {
        state,
        admin,
        reloader,
        shutdown,
        task,
    }
}

/// An edge serving tunnel `app` (token `t`) on `app.test`, and a connector of it sending every
/// request to the first of `origins`, with all its connections registered.
pub async fn app_tunnel(origins: Vec<OriginConfig>) -> (EdgeHandle, ConnectorHandle) {
    app_tunnel_with(origins, |_| {}).await
}

/// Like [`app_tunnel`], with `tweak` applied to the edge's configuration.
pub async fn app_tunnel_with(
    origins: Vec<OriginConfig>,
    tweak: impl FnOnce(&mut EdgeConfig),
) -> (EdgeHandle, ConnectorHandle) {
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], tweak).await;
    let conn = start_connector(connector_config(&edge, "app", "t", origins, vec![])).await;
    conn.registered(sluice::config::DEFAULT_HA_CONNECTIONS as usize)
        .await;
    (edge, conn)
}

/// An edge serving tunnel `app` on `app.test`, echo origins named `origins` (the first takes
/// the catch-all rule), and a connector running `plugins` with `chain` on that rule.
pub async fn plugin_tunnel(
    plugins: Vec<sluice::config::PluginConfig>,
    chain: &[&str],
    origins: &[&'static str],
    tweak: impl FnOnce(&mut ConnectorConfig),
) -> (EdgeHandle, ConnectorHandle) {
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let mut configs = Vec::new();
    for name in origins {
        configs.push(http_origin(name, echo_origin(name).await));
    }
    let mut catch_all = rule(None, None, origins[0]);
    catch_all.plugins = chain.iter().map(|s| s.to_string()).collect();
    let mut cfg = connector_config(&edge, "app", "t", configs, vec![catch_all]);
    cfg.plugins = plugins;
    tweak(&mut cfg);
    let conn = start_connector(cfg).await;
    conn.registered(1).await;
    (edge, conn)
}

pub fn rule(host: Option<&str>, path: Option<&str>, origin: &str) -> IngressRuleConfig {
    IngressRuleConfig {
        hostname: host.map(|h| HostPattern::try_from(h).unwrap()),
        path: path.map(|p| regex::Regex::new(p).unwrap()),
        origin: origin.into(),
        plugins: Vec::new(),
    }
}

pub fn http_origin(name: &str, addr: SocketAddr) -> OriginConfig {
    OriginConfig::new(
        name,
        OriginTarget::Http(format!("http://{addr}").parse().unwrap()),
    )
}

/// Starts a hyper HTTP/1.1 origin running `handler` for every request.
pub async fn start_origin<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<sluice::relay::HttpBody>> + Send + 'static,
{
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Starts an HTTPS (HTTP/1.1) origin running `handler`, with a self-signed certificate for
/// "localhost"; returns its address and the identity to trust.
pub async fn start_tls_origin<F, Fut>(handler: F) -> (SocketAddr, TlsIdentity)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<sluice::relay::HttpBody>> + Send + 'static,
{
    let id = identity();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(id.chain.clone(), id.key.clone_key())
    .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, id)
}

/// An origin that answers with a JSON echo of what it received: method, path, headers.
pub async fn echo_origin(name: &'static str) -> SocketAddr {
    start_origin(move |req: Request<Incoming>| async move {
        let mut headers = serde_json::Map::new();
        for (k, v) in req.headers() {
            let entry = headers
                .entry(k.as_str())
                .or_insert_with(|| serde_json::Value::Array(vec![]));
            entry
                .as_array_mut()
                .unwrap()
                .push(String::from_utf8_lossy(v.as_bytes()).into());
        }
        let body = serde_json::json!({
            "origin": name,
            "method": req.method().as_str(),
            "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
            "headers": headers,
        });
        Response::new(sluice::relay::full(body.to_string()))
    })
    .await
}

/// A response read whole.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    /// First value of `name` in the echo origin's view of the request headers.
    pub fn echoed(&self, name: &str) -> Option<String> {
        self.json()["headers"][name][0].as_str().map(str::to_string)
    }
}

/// Sends one request over a fresh HTTP/1.1 connection and reads the whole answer.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    tokio::time::timeout(WAIT, async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    })
    .await
    .expect("request timed out")
}

/// GET `path` with `Host: host`.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    send(
        addr,
        Request::get(path)
            .header("host", host)
            .body(Full::default())
            .unwrap(),
    )
    .await
}

/// A bare QUIC client trusting the edge's certificate, offering ALPN `alpn`.
pub fn raw_quic_client(edge: &EdgeHandle, alpn: &[u8]) -> quinn::Endpoint {
    raw_quic_client_with(edge, alpn, quinn::TransportConfig::default())
}

/// Like [`raw_quic_client`], with its own transport settings.
pub fn raw_quic_client_with(
    edge: &EdgeHandle,
    alpn: &[u8],
    transport: quinn::TransportConfig,
) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(edge.identity.chain[0].clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport));
    let mut ep = quinn::Endpoint::client(loopback()).unwrap();
    ep.set_default_client_config(client);
    ep
}

/// A fresh scratch directory for one test, created: unique per process and per call, so that
/// a test run over both transports at once never shares one with its twin.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("sluice-{name}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Path of a fixture plugin (`host/tests/fixtures/NAME`), built for wasm32-wasip2 on first
/// use in this test binary (cargo makes it a no-op when nothing changed).
pub fn fixture(name: &str) -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target_dir = root.join("target/wasm");
    let built = BUILT.get_or_init(|| {
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.current_dir(&root)
            .args(["build", "--release", "--target", "wasm32-wasip2", "--target-dir"])
            .arg(&target_dir);
        for f in ["echo", "misbehave", "fs", "sockets", "nohooks", "stateful", "caller", "bodies"] {
            cmd.args(["-p", &format!("fixture-{f}")]);
        }
        for p in EXAMPLE_PLUGINS {
            cmd.args(["-p", p]);
        }
        let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "building the fixture plugins failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`):\n{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = built {
        panic!("{e}");
    }
    target_dir.join(format!("wasm32-wasip2/release/fixture_{name}.wasm"))
}

/// The plugins of `plugins/` (the first four also kept as built for 0.1, in `tests/pinned`).
pub const EXAMPLE_PLUGINS: &[&str] = &[
    "header-rewrite",
    "origin-router",
    "audit-log",
    "access-guard",
    "ip-allow",
    "cors",
    "rate-limit",
    "jwt",
    "basic-auth",
    "body-limit",
];

thread_local! {
    /// Whether [`example_plugin`] gives the pinned 0.1 builds (`tests/pinned/v0.1`) for the
    /// test running on this thread: set by [`over_both_plugin_builds!`].
    static PINNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes [`example_plugin`] give the example plugins as built for `sluice:plugin@0.1.0` until
/// the guard drops.
pub fn use_pinned_plugins() -> impl Drop {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            PINNED.with(|p| p.set(self.0));
        }
    }
    Reset(PINNED.with(|p| p.replace(true)))
}

/// Runs every test function given twice, as `built::NAME` (the example plugins built from
/// today's sources) and `v0_1::NAME` (the ones kept as built for `sluice:plugin@0.1.0`).
#[macro_export]
macro_rules! over_both_plugin_builds {
    ($($(#[$meta:meta])* async fn $name:ident() $body:block)*) => {
        mod built {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                async fn $name() $body
            )*
        }
        mod v0_1 {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                async fn $name() {
                    let _pinned = support::use_pinned_plugins();
                    $body
                }
            )*
        }
    };
}

/// Path of an example plugin (`plugins/NAME`), built like [`fixture`]; or, under
/// [`use_pinned_plugins`], as kept in `tests/pinned/v0.1`.
pub fn example_plugin(name: &str) -> std::path::PathBuf {
    let file = format!("{}.wasm", name.replace('-', "_"));
    if PINNED.with(|p| p.get()) {
        return std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/pinned/v0.1")
            .join(file);
    }
    fixture("echo").with_file_name(file)
}

/// A TLS client trusting `identity`'s certificate, offering `alpn`.
pub fn client_tls(
    identity: &sluice::config::TlsIdentity,
    alpn: &[&[u8]],
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(identity.chain[0].clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A TLS connection to `addr` (certificate for "localhost" from `identity`), offering `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    identity: &sluice::config::TlsIdentity,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    client_tls(identity, &[alpn])
        .connect(name, tcp)
        .await
        .unwrap()
}

/// A connection on which `Register` was sent by hand.
pub struct RawRegistration {
    pub conn: quinn::Connection,
    /// The control stream, kept open.
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    /// What the edge answered, or how reading the answer failed.
    pub answer: Result<sluice::proto::Control, String>,
}

impl RawRegistration {
    pub fn registered(&self) -> bool {
        matches!(self.answer, Ok(sluice::proto::Control::Registered(_)))
    }
}

/// Connects with `ep` and sends `Register` for `tunnel` with `token`, as a connector that
/// reads JSON heads only.
pub async fn raw_register(
    ep: &quinn::Endpoint,
    edge: &EdgeHandle,
    tunnel: &str,
    token: &str,
) -> RawRegistration {
    raw_register_offering(ep, edge, tunnel, token, &[]).await
}

/// Like [`raw_register`], offering the head encodings `heads`.
pub async fn raw_register_offering(
    ep: &quinn::Endpoint,
    edge: &EdgeHandle,
    tunnel: &str,
    token: &str,
    heads: &[&str],
) -> RawRegistration {
    let conn = ep.connect(edge.quic, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let msg = sluice::proto::Control::Register(sluice::proto::Register {
        version: 1,
        tunnel: tunnel.into(),
        token: sluice::secret::Secret::new(token),
        connector_id: "raw".into(),
        conn_index: 0,
        software: None,
        digest: None,
        heads: heads.iter().map(|h| h.to_string()).collect(),
        probe: false,
        sessions: false,
        trailers: false,
    });
    sluice::proto::io::write_frame(&mut send, &msg)
        .await
        .unwrap();
    let answer = match tokio::time::timeout(WAIT, sluice::proto::io::read_frame(&mut recv)).await {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => Err(format!("error: {e}")),
        Err(_) => Err("timeout".into()),
    };
    RawRegistration {
        conn,
        send,
        recv,
        answer,
    }
}

/// A `sluice` process whose stderr goes to a file, killed on drop.
pub struct Proc {
    pub child: std::process::Child,
    pub stderr: std::path::PathBuf,
}

impl Proc {
    pub fn spawn(role: &str, config: &std::path::Path) -> Proc {
        Self::spawn_with(role, config, |_| {})
    }

    /// Like [`Proc::spawn`], with `tweak` adding arguments or environment.
    pub fn spawn_with(
        role: &str,
        config: &std::path::Path,
        tweak: impl FnOnce(&mut std::process::Command),
    ) -> Proc {
        let stderr = config.with_extension("log");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.args([role, "--config"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .env("RUST_LOG", "info");
        tweak(&mut cmd);
        let child = cmd.spawn().unwrap();
        Proc { child, stderr }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("kill -{sig} {}", self.child.id())])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub async fn wait_log(&self, needle: &str, nth: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            if text.matches(needle).count() >= nth {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{needle:?} not logged:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of an outside program a test runs, or a failure that says how to install it (the
/// README's test command, `.ci/test`, installs them all).
pub fn require_program(name: &str, package: &str) -> std::path::PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"] {
        let path = std::path::Path::new(dir).join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "{name} is not installed: run `apt-get install {package}` (the README's test command, .ci/test, installs it)"
    );
}

/// An outside server process, killed when dropped.
pub struct Server(pub tokio::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// A fresh redis-server on a loopback port, without persistence; its address.
pub async fn start_redis() -> (SocketAddr, Server) {
    let redis = require_program("redis-server", "redis-server");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = tokio::process::Command::new(redis)
        .args(["--port", &addr.port().to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    wait_listening(addr).await;
    (addr, server)
}

/// A free TCP port on loopback for an outside server (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts TCP connections at `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens at {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// TCP and UDP services (tests/services.rs, tests/bulk.rs).

pub fn port(service: &str, protocol: sluice::proto::SessionProtocol) -> sluice::config::PortConfig {
    sluice::config::PortConfig {
        listen: loopback(),
        protocol,
        service: service.into(),
        allow: Vec::new(),
        max_sessions: 16,
        idle_timeout: Duration::from_secs(60),
    }
}

pub fn service(name: &str, origin: &str) -> sluice::config::ServiceConfig {
    sluice::config::ServiceConfig {
        name: name.into(),
        target: OriginTarget::parse(origin).unwrap(),
        proxy_protocol: false,
        connect_timeout: Duration::from_secs(5),
    }
}

/// An edge whose tunnel `app` has `ports`, with an HTTPS listener and an admin listener, and a
/// registered connector serving `services`.
pub async fn services_tunnel(
    ports: Vec<sluice::config::PortConfig>,
    services: Vec<sluice::config::ServiceConfig>,
    tweak_edge: impl FnOnce(&mut EdgeConfig),
    tweak: impl FnOnce(&mut ConnectorConfig),
) -> (EdgeHandle, ConnectorHandle) {
    let mut t = tunnel("app", "t", &["app.test", "ssh.test"]);
    t.ports = ports;
    let edge = start_edge(vec![t], |c| {
        c.https = Some(sluice::config::HttpsConfig {
            listen: loopback(),
            identity: c.quic_identity.clone(),
        });
        c.admin_listen = Some(loopback());
        tweak_edge(c);
    })
    .await;
    let hello = OriginConfig::new("hello", OriginTarget::Hello);
    let mut cfg = connector_config(&edge, "app", "t", vec![hello], vec![]);
    cfg.services = services;
    cfg.admin_listen = Some(loopback());
    tweak(&mut cfg);
    let conn = start_connector(cfg).await;
    conn.registered(sluice::config::DEFAULT_HA_CONNECTIONS as usize)
        .await;
    (edge, conn)
}

pub fn port_addr(edge: &EdgeHandle, service: &str) -> SocketAddr {
    edge.ports
        .iter()
        .find(|p| p.service == service)
        .unwrap_or_else(|| panic!("no port for {service}"))
        .addr
}
