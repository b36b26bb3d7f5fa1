//! The edge: public HTTP(S) listeners for clients, a QUIC listener for connectors, the tunnel
//! registry and the dispatch of each request onto a stream of a registered connection.

mod acceptor;
mod dispatch;
pub mod registry;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::admin::{Admin, Metrics};
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
    pub metrics: Arc<Metrics>,
    /// False once shutdown begins.
    pub ready: AtomicBool,
}

/// A bound edge, ready to run.
pub struct Edge {
    shared: Arc<EdgeShared>,
    http: Option<TcpListener>,
    https: Option<(TcpListener, TlsAcceptor)>,
    endpoint: quinn::Endpoint,
    admin: Option<Admin>,
}

/// Applies a new configuration's tunnels to a running edge (SIGHUP).
#[derive(Clone)]
pub struct EdgeReloader(Arc<EdgeShared>);

impl EdgeReloader {
    /// Swaps tunnels, tokens, hostnames and limits atomically. Registered connections of
    /// tunnels that stay, with an unchanged token, are kept; the others are closed. Listener
    /// addresses, certificates and client settings need a restart.
    pub fn reload(&self, config: &EdgeConfig) {
        let revoked = self.0.registry.set_tunnels(&config.tunnels);
        for entry in &revoked {
            entry.conn.close(
                crate::proto::code::CLOSE_TUNNEL_REMOVED,
                b"tunnel removed or token changed",
            );
        }
        info!(
            tunnels = config.tunnels.len(),
            closed_connections = revoked.len(),
            "reloaded tunnels"
        );
    }
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
        let https = match &config.https {
            Some(h) => {
                let acceptor = TlsAcceptor::from(Arc::new(tls::https_server(&h.identity)?));
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
            None => None,
        };
        let server = tls::quic_server(&config.quic_identity)?;
        let endpoint = quinn::Endpoint::server(server, config.quic_listen).map_err(|source| {
            EdgeError::Bind {
                what: "quic",
                addr: config.quic_listen,
                source,
            }
        })?;
        let admin = match config.admin_listen {
            Some(addr) => Some(Admin::bind(addr).await.map_err(|source| EdgeError::Bind {
                what: "admin",
                addr,
                source,
            })?),
            None => None,
        };
        let registry = Registry::new(&config.tunnels);
        let metrics = Arc::new(Metrics::new("sluice_edge"));
        let shared = Arc::new(EdgeShared {
            config,
            registry,
            metrics,
            ready: AtomicBool::new(true),
        });
        Ok(Edge {
            shared,
            http,
            https,
            endpoint,
            admin,
        })
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

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let shared = self.shared.clone();
        info!(version = env!("CARGO_PKG_VERSION"), edge = %shared.config.edge_id, tunnels = shared.config.tunnels.len(), "sluice edge starting");
        info!(addr = %self.quic_addr(), "listening for connectors (QUIC)");
        if let Some(addr) = self.http_addr() {
            info!(%addr, "listening for clients (HTTP)");
        }
        if let Some(addr) = self.https_addr() {
            info!(%addr, "listening for clients (HTTPS)");
        }

        if let Some(admin) = self.admin {
            let ready_shared = shared.clone();
            let ready = Arc::new(move || ready_shared.ready.load(Ordering::Relaxed));
            tokio::spawn(admin.run(shared.metrics.clone(), ready, shutdown.clone()));
        }
        if let Some(listener) = self.http {
            tracker.spawn(serve_clients(
                listener,
                None,
                shared.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        if let Some((listener, acceptor)) = self.https {
            tracker.spawn(serve_clients(
                listener,
                Some(acceptor),
                shared.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        let endpoint = self.endpoint.clone();
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => i,
                _ = shutdown.cancelled() => break,
            };
            let Some(incoming) = incoming else { break };
            let span = tracing::info_span!("connector", peer = %incoming.remote_address());
            tokio::spawn(acceptor::serve(incoming, shared.clone()).instrument(span));
        }
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
        endpoint.close(crate::proto::code::CLOSE_NORMAL, b"edge shutting down");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
        info!("edge stopped");
    }
}

/// Drives a client connection to its end; on shutdown, lets it finish the request in flight
/// (HTTP/1.1: no more keep-alive; HTTP/2: GOAWAY). A macro because hyper's HTTP/1 and
/// auto-protocol connections share `graceful_shutdown` by name only, not through a trait.
macro_rules! serve_gracefully {
    ($conn:ident, $shutdown:ident) => {{
        tokio::pin!($conn);
        let result = tokio::select! {
            r = $conn.as_mut() => r,
            _ = $shutdown.cancelled() => {
                $conn.as_mut().graceful_shutdown();
                $conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(cause = %e, "client connection ended with an error");
        }
    }};
}

/// Accepts client connections on one listener until shutdown.
async fn serve_clients(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<EdgeShared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let scheme: &'static str = if tls.is_some() { "https" } else { "http" };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(cause = %e, "failed to accept a client connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            warn!(%peer, cause = %e, "failed to set TCP_NODELAY");
        }
        let shared = shared.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                let cfg = &shared.config;
                let header_timeout = cfg.header_read_timeout;
                let max_buf = cfg.max_header_size.max(8192);
                let svc_shared = shared.clone();
                let svc = hyper::service::service_fn(move |req| {
                    dispatch::handle(req, svc_shared.clone(), peer, scheme)
                });
                match tls {
                    None => {
                        let conn = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(header_timeout)
                            .max_buf_size(max_buf)
                            .serve_connection(TokioIo::new(tcp), svc)
                            .with_upgrades();
                        serve_gracefully!(conn, shutdown);
                    }
                    Some(acceptor) => {
                        let stream = match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(cause = %e, "client TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!("client TLS handshake timed out");
                                return;
                            }
                        };
                        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        builder
                            .http1()
                            .timer(TokioTimer::new())
                            .header_read_timeout(header_timeout)
                            .max_buf_size(max_buf);
                        builder
                            .http2()
                            .timer(TokioTimer::new())
                            .keep_alive_interval(Some(std::time::Duration::from_secs(20)))
                            .keep_alive_timeout(std::time::Duration::from_secs(20))
                            .max_header_list_size(cfg.max_header_size.min(u32::MAX as usize) as u32);
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                        serve_gracefully!(conn, shutdown);
                    }
                }
            }
            .instrument(tracing::debug_span!("client", %peer)),
        );
    }
}
