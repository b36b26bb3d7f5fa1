//! The edge: public HTTP(S) listeners for clients, QUIC and (optionally) TCP listeners for
//! connectors, the tunnel registry and the dispatch of each request onto a stream of a
//! registered connection.

mod acceptor;
mod client;
mod dispatch;
mod ports;
pub mod registry;

pub use ports::PortInfo;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::admin::{Admin, EdgeMetrics, Report};
use crate::config::EdgeConfig;
use crate::tls;
use registry::Registry;

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// A listener could not bind.
    #[error("failed to bind the {what} listener on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Its address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A certificate or key was unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// State shared by every task of one edge.
#[derive(Debug)]
pub(crate) struct EdgeShared {
    pub config: EdgeConfig,
    pub registry: Registry,
    pub metrics: Arc<EdgeMetrics>,
    /// False once shutdown begins.
    pub ready: AtomicBool,
    /// The QUIC listener's certificate (replaced by a reload).
    pub quic_cert: Arc<tls::ServerCert>,
    /// The HTTPS listener's certificate (replaced by a reload).
    pub https_cert: Option<Arc<tls::ServerCert>>,
    /// Tunnels whose connectors report different ingress digests, and since when.
    pub disagreeing: std::sync::Mutex<std::collections::BTreeMap<String, std::time::Instant>>,
}

impl EdgeShared {
    /// Re-counts the ingress digests of `tunnel`'s connections after one registered, left or
    /// reloaded: updates the gauge, and logs when its replicas start or stop disagreeing.
    pub fn replicas_changed(&self, tunnel: &str) {
        // Counted under the lock of the result, so that two changes at once (a registration
        // and a close) cannot leave the older count behind.
        let mut disagreeing = self.disagreeing.lock().unwrap_or_else(|p| p.into_inner());
        let digests = self.registry.digests(tunnel);
        self.metrics
            .ingress_digests
            .get_or_create(&crate::admin::metrics::TunnelLabels {
                tunnel: tunnel.into(),
            })
            .set(digests.len() as i64);
        if digests.len() > 1 {
            let listed: Vec<String> = digests.iter().map(|(d, n)| format!("{d}×{n}")).collect();
            if !disagreeing.contains_key(tunnel) {
                disagreeing.insert(tunnel.to_string(), std::time::Instant::now());
                warn!(%tunnel, digests = %listed.join(", "), "connectors of this tunnel run different ingress rules or plugins: a request's answer depends on the connection it takes");
            } else {
                debug!(%tunnel, digests = %listed.join(", "), "connectors of this tunnel still disagree");
            }
        } else if disagreeing.remove(tunnel).is_some() {
            info!(%tunnel, "connectors of this tunnel agree on their ingress rules and plugins again");
        }
    }

    /// What `/ready` lists: every registered connector connection with its transport.
    fn connections(&self) -> serde_json::Value {
        let listed: Vec<serde_json::Value> = self
            .registry
            .status()
            .iter()
            .flat_map(|t| {
                t.connections.iter().map(|c| {
                    serde_json::json!({
                        "tunnel": t.id,
                        "id": c.id,
                        "connector": c.connector,
                        "protocol": c.protocol,
                    })
                })
            })
            .collect();
        listed.into()
    }

    /// `/status`: the edge and every tunnel with its connections.
    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "role": "edge",
            "edge_id": self.config.edge_id,
            "version": env!("CARGO_PKG_VERSION"),
            "ready": self.is_ready(),
            "tunnels": self.registry.status(),
        })
    }

    /// Serving, and (when `require-consistent-replicas` is set) no tunnel's replicas have
    /// disagreed for longer than `replica-disagreement-grace` (a rolling reload of replicas
    /// disagrees for a moment).
    fn is_ready(&self) -> bool {
        let grace = self.config.replica_disagreement_grace;
        self.ready.load(Ordering::Relaxed)
            && !(self.config.require_consistent_replicas
                && self
                    .disagreeing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .any(|since| since.elapsed() >= grace))
    }
}

/// A bound edge, ready to run.
pub struct Edge {
    shared: Arc<EdgeShared>,
    http: Option<TcpListener>,
    https: Option<(TcpListener, TlsAcceptor)>,
    endpoint: quinn::Endpoint,
    /// Connectors over HTTP/2 on TLS over TCP.
    tcp: Option<(TcpListener, TlsAcceptor)>,
    admin: Option<Admin>,
    /// The tunnels' public TCP and UDP ports.
    ports: Vec<ports::Port>,
}

/// Applies a new configuration's tunnels to a running edge (SIGHUP).
#[derive(Clone)]
pub struct EdgeReloader(Arc<EdgeShared>);

impl EdgeReloader {
    /// Swaps tunnels, tokens, hostnames and limits atomically, and the listeners'
    /// certificates (new handshakes present the new ones). Registered connections of tunnels
    /// that stay, with a token still accepted, are kept; the others are closed. Listener
    /// addresses and client settings need a restart.
    pub fn reload(&self, config: &EdgeConfig) {
        let needs_restart = restart_needed(&self.0.config, config);
        if !needs_restart.is_empty() {
            warn!(
                keys = %needs_restart.join(", "),
                "these settings changed and take effect after a restart; the running values stay"
            );
        }
        // `EdgeConfig::load` checked each pair, so replacing cannot fail on a loaded file.
        if let Err(e) = self.0.quic_cert.replace(&config.quic_identity) {
            warn!(cause = %e, "kept the QUIC listener's certificate");
        }
        match (&self.0.https_cert, &config.https) {
            (Some(cert), Some(h)) => {
                if let Err(e) = cert.replace(&h.identity) {
                    warn!(cause = %e, "kept the HTTPS listener's certificate");
                }
            }
            (None, Some(_)) | (Some(_), None) => {
                warn!("adding or removing the HTTPS listener takes effect after a restart")
            }
            (None, None) => {}
        }
        let revoked = self.0.registry.set_tunnels(&config.tunnels);
        // Closing is asynchronous; the acceptor of each connection removes it and recounts.
        for entry in &revoked {
            entry.conn.close(
                crate::proto::code::CLOSE_TUNNEL_REMOVED,
                b"tunnel removed or token changed",
            );
        }
        info!(
            tunnels = config.tunnels.len(),
            closed_connections = revoked.len(),
            "reloaded tunnels and listener certificates"
        );
    }
}

/// Every tunnel's public ports.
fn ports_of(c: &EdgeConfig) -> Vec<(&str, &[crate::config::PortConfig])> {
    c.tunnels
        .iter()
        .map(|t| (t.id.as_str(), t.ports.as_slice()))
        .collect()
}

/// The settings of `new` that differ from `old` and that only a restart applies.
fn restart_needed(old: &EdgeConfig, new: &EdgeConfig) -> Vec<&'static str> {
    let https = |c: &EdgeConfig| c.https.as_ref().map(|h| h.listen);
    [
        ("edge-id", old.edge_id != new.edge_id),
        ("http.listen", old.http_listen != new.http_listen),
        ("https.listen", https(old) != https(new)),
        ("connectors.listen", old.quic_listen != new.quic_listen),
        ("connectors.listen-tcp", old.tcp_listen != new.tcp_listen),
        ("tunnel.port", ports_of(old) != ports_of(new)),
        (
            "admin",
            old.admin_listen != new.admin_listen
                || old.require_consistent_replicas != new.require_consistent_replicas
                || old.replica_disagreement_grace != new.replica_disagreement_grace,
        ),
        (
            "connectors.register-timeout",
            old.register_timeout != new.register_timeout,
        ),
        (
            "connectors.max-handshakes",
            old.max_handshakes != new.max_handshakes,
        ),
        (
            "header-read-timeout",
            old.header_read_timeout != new.header_read_timeout,
        ),
        (
            "max-header-size",
            old.max_header_size != new.max_header_size,
        ),
        (
            "trust-forwarded-for",
            old.trust_forwarded_for != new.trust_forwarded_for,
        ),
        ("grace-period", old.grace_period != new.grace_period),
        ("access-log", old.access_log != new.access_log),
        ("log-format", old.log_format != new.log_format),
        ("workers", old.workers != new.workers),
        (
            "allowed-upgrades",
            old.allowed_upgrades != new.allowed_upgrades,
        ),
        ("idle-timeout", old.idle_timeout != new.idle_timeout),
        (
            "body-idle-timeout",
            old.body_idle_timeout != new.body_idle_timeout,
        ),
        (
            "max-connections-per-client",
            old.max_connections_per_client != new.max_connections_per_client,
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

impl Edge {
    /// Binds every listener of `config`.
    pub async fn bind(config: EdgeConfig) -> Result<Edge, EdgeError> {
        let http = match config.http_listen {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| EdgeError::Bind {
                            what: "http",
                            addr,
                            source,
                        })?,
                )
            }
            None => None,
        };
        let https_cert = config
            .https
            .as_ref()
            .map(|h| tls::ServerCert::new(&h.identity))
            .transpose()?;
        let https = match (&config.https, &https_cert) {
            (Some(h), Some(cert)) => {
                let acceptor = TlsAcceptor::from(Arc::new(tls::https_server(cert.clone())?));
                let listener =
                    TcpListener::bind(h.listen)
                        .await
                        .map_err(|source| EdgeError::Bind {
                            what: "https",
                            addr: h.listen,
                            source,
                        })?;
                Some((listener, acceptor))
            }
            _ => None,
        };
        let quic_cert = tls::ServerCert::new(&config.quic_identity)?;
        let (endpoint, tcp) = bind_connector_listeners(&config, &quic_cert).await?;
        let admin = match config.admin_listen {
            Some(addr) => Some(Admin::bind(addr).await.map_err(|source| EdgeError::Bind {
                what: "admin",
                addr,
                source,
            })?),
            None => None,
        };
        let mut bound = Vec::new();
        for tunnel in &config.tunnels {
            for port in &tunnel.ports {
                let p = ports::Port::bind(&tunnel.id, port)
                    .await
                    .map_err(|source| EdgeError::Bind {
                        what: "public port",
                        addr: port.listen,
                        source,
                    })?;
                bound.push(p);
            }
        }
        let registry = Registry::new(&config.tunnels);
        let metrics = Arc::new(EdgeMetrics::new());
        let shared = Arc::new(EdgeShared {
            config,
            registry,
            metrics,
            ready: AtomicBool::new(true),
            quic_cert,
            https_cert,
            disagreeing: Default::default(),
        });
        Ok(Edge {
            shared,
            http,
            https,
            endpoint,
            tcp,
            admin,
            ports: bound,
        })
    }

    /// The tunnels' public ports, as bound.
    pub fn ports(&self) -> Vec<PortInfo> {
        self.ports.iter().map(ports::Port::info).collect()
    }

    /// Address of the admin listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(Admin::addr)
    }

    /// A handle to reload tunnels while the edge runs.
    pub fn reloader(&self) -> EdgeReloader {
        EdgeReloader(self.shared.clone())
    }

    /// Address of the plain HTTP listener.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Address of the HTTPS listener.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Address of the QUIC listener.
    pub fn quic_addr(&self) -> SocketAddr {
        // The endpoint was bound in `bind`; local_addr only fails on a closed socket.
        self.endpoint
            .local_addr()
            .unwrap_or(self.shared.config.quic_listen)
    }

    /// Address of the TCP listener for connectors.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let shared = self.shared.clone();
        info!(version = env!("CARGO_PKG_VERSION"), edge = %shared.config.edge_id, tunnels = shared.config.tunnels.len(), "sluice edge starting");
        info!(addr = %self.quic_addr(), "listening for connectors (QUIC)");
        if let Some(addr) = self.tcp_addr() {
            info!(%addr, "listening for connectors (HTTP/2 over TLS over TCP)");
        }
        if let Some(addr) = self.http_addr() {
            info!(%addr, "listening for clients (HTTP)");
        }
        if let Some(addr) = self.https_addr() {
            info!(%addr, "listening for clients (HTTPS)");
        }

        // The admin listener outlives the drain, so that `/ready` says 503 while it lasts.
        let admin_stop = CancellationToken::new();
        let _stop_admin = admin_stop.clone().drop_guard();
        if let Some(admin) = self.admin {
            let (ready_shared, status_shared, listed) =
                (shared.clone(), shared.clone(), shared.clone());
            let report = Report {
                metrics: shared.metrics.clone(),
                ready: Arc::new(move || ready_shared.is_ready()),
                connections: Arc::new(move || listed.connections()),
                status: Arc::new(move || status_shared.status()),
            };
            tokio::spawn(admin.run(report, admin_stop.clone()));
        }
        if let Some(listener) = self.http {
            tracker.spawn(client::serve_clients(
                listener,
                None,
                shared.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        for port in self.ports {
            let info = port.info();
            info!(tunnel = %info.tunnel, service = %info.service, protocol = info.protocol.as_str(), addr = %info.addr, "listening on a public port");
            tracker.spawn(port.serve(shared.clone(), shutdown.clone(), tracker.clone()));
        }
        if let Some((listener, acceptor)) = self.https {
            tracker.spawn(client::serve_clients(
                listener,
                Some(acceptor),
                shared.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        let endpoint = self.endpoint.clone();
        // Handshakes and registrations in progress, bounded: an unauthenticated peer costs a
        // TLS handshake and a task until it registers or times out.
        let handshakes = Arc::new(tokio::sync::Semaphore::new(shared.config.max_handshakes));
        if let Some((listener, tls)) = self.tcp {
            tokio::spawn(accept_tcp(
                listener,
                tls,
                shared.clone(),
                handshakes.clone(),
                shutdown.clone(),
            ));
        }
        accept_quic(&endpoint, &shared, &handshakes, &shutdown).await;
        // Listeners stop accepting; open client connections finish their requests (HTTP/1.1
        // keep-alive ends, HTTP/2 gets GOAWAY) within the grace period.
        let grace = shared.config.grace_period;
        shared.ready.store(false, Ordering::Relaxed);
        tracker.close();
        info!(
            grace_secs = grace.as_secs_f64(),
            "shutting down: waiting for client connections to finish"
        );
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!("grace period ran out; closing with requests still in flight");
        }
        // Connections over either transport (closing the endpoint ends only QUIC's).
        for entry in shared.registry.all_connections() {
            entry
                .conn
                .close(crate::proto::code::CLOSE_NORMAL, b"edge shutting down");
        }
        endpoint.close(
            crate::proto::code::CLOSE_NORMAL.into(),
            b"edge shutting down",
        );
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
        info!("edge stopped");
    }
}

/// Binds the connectors' QUIC endpoint and, when configured, their TCP listener. When both ask
/// for port 0 they get the same port number (a connector dials both at one `host:port`).
async fn bind_connector_listeners(
    config: &EdgeConfig,
    cert: &Arc<tls::ServerCert>,
) -> Result<(quinn::Endpoint, Option<(TcpListener, TlsAcceptor)>), EdgeError> {
    let bind_quic = |addr: SocketAddr| {
        let server = tls::quic_server(cert.clone())?;
        crate::transport::quic::endpoint(addr, Some(server)).map_err(|source| EdgeError::Bind {
            what: "quic",
            addr,
            source,
        })
    };
    let Some(tcp_addr) = config.tcp_listen else {
        return Ok((bind_quic(config.quic_listen)?, None));
    };
    let acceptor = TlsAcceptor::from(Arc::new(tls::tcp_server(cert.clone())?));
    let same_port = tcp_addr.port() == 0 && config.quic_listen.port() == 0;
    let mut attempts = 0;
    loop {
        let endpoint = bind_quic(config.quic_listen)?;
        let mut addr = tcp_addr;
        if same_port {
            addr.set_port(endpoint.local_addr().map_or(0, |a| a.port()));
        }
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok((endpoint, Some((listener, acceptor)))),
            // The UDP port's TCP twin is taken: another pair.
            Err(e) if same_port && attempts < 16 && e.kind() == std::io::ErrorKind::AddrInUse => {
                attempts += 1;
            }
            Err(source) => {
                return Err(EdgeError::Bind {
                    what: "tcp",
                    addr,
                    source,
                })
            }
        }
    }
}

/// Accepts connector connections over QUIC until `shutdown`.
async fn accept_quic(
    endpoint: &quinn::Endpoint,
    shared: &Arc<EdgeShared>,
    handshakes: &Arc<tokio::sync::Semaphore>,
    shutdown: &CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        // A peer first proves it receives at its address (a QUIC Retry), so spoofed
        // packets cannot occupy handshake places.
        if !incoming.remote_address_validated() && incoming.may_retry() {
            if let Err(e) = incoming.retry() {
                debug!(cause = %e, "could not ask a connector to retry");
            }
            continue;
        }
        let peer = incoming.remote_address();
        let Some(permit) = handshake_place(shared, handshakes, peer) else {
            incoming.refuse();
            continue;
        };
        let handshake = async move { Ok(crate::transport::Connection::Quic(incoming.await?)) };
        let span = tracing::info_span!("connector", %peer, protocol = "quic");
        tokio::spawn(acceptor::serve(handshake, peer, shared.clone(), permit).instrument(span));
    }
}

/// Accepts connector connections over TCP (TLS, then HTTP/2) until `stop`.
async fn accept_tcp(
    listener: TcpListener,
    tls: TlsAcceptor,
    shared: Arc<EdgeShared>,
    handshakes: Arc<tokio::sync::Semaphore>,
    stop: CancellationToken,
) {
    loop {
        let Some((tcp, peer)) = crate::net::accept(&listener, &stop, "connector TCP").await else {
            break;
        };
        let Some(permit) = handshake_place(&shared, &handshakes, peer) else {
            continue;
        };
        let handshake = crate::transport::h2::accept(tcp, peer, tls.clone());
        let span = tracing::info_span!("connector", %peer, protocol = "http2");
        tokio::spawn(acceptor::serve(handshake, peer, shared.clone(), permit).instrument(span));
    }
}

/// A place among the handshakes in progress, or `None` (counted) when all are taken.
fn handshake_place(
    shared: &EdgeShared,
    handshakes: &Arc<tokio::sync::Semaphore>,
    peer: SocketAddr,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let permit = handshakes.clone().try_acquire_owned().ok();
    if permit.is_none() {
        debug!(%peer, "refusing a connector connection: too many handshakes in progress");
        shared
            .metrics
            .registration_failures
            .get_or_create(&crate::admin::metrics::KindLabels { kind: "busy" })
            .inc();
    }
    permit
}
