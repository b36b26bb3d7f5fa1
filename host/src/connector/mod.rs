//! The connector: dials every edge, keeps `ha-connections` registered connections to each,
//! and serves the request streams the edges open through the [`pipeline::Pipeline`].

pub mod body;
pub mod chain;
pub mod check;
pub mod dry_run;
pub mod pipeline;
mod services;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::admin::{Admin, Metrics, Report};
use crate::audit::Audit;
use crate::config::ConnectorConfig;
use crate::tls;
use pipeline::{Pipeline, PluginEnv};

/// Why the connector could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// A TLS configuration (edge or origin) was unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Origins, plugins or the Wasm runtime could not be set up.
    #[error(transparent)]
    Pipeline(#[from] pipeline::PipelineError),
    /// The audit sinks could not be opened.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// A socket (QUIC or admin) could not be bound.
    #[error("failed to bind the {what} on {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Its address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Live state of a connector, observable while it runs.
#[derive(Debug)]
pub struct ConnectorState {
    registered: watch::Sender<usize>,
    /// The registered connections, by a key of their own.
    links: std::sync::Mutex<std::collections::BTreeMap<u64, LinkInfo>>,
    next_key: std::sync::atomic::AtomicU64,
}

/// One registered connection, as `/ready` and `/status` list it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkInfo {
    /// The edge, as configured.
    pub edge: String,
    /// Which of the connections to that edge.
    pub index: u32,
    /// The transport.
    pub protocol: crate::transport::Protocol,
    /// The id the edge gave the connection.
    pub connection_id: u64,
}

impl ConnectorState {
    fn new() -> ConnectorState {
        ConnectorState {
            registered: watch::channel(0).0,
            links: Default::default(),
            next_key: Default::default(),
        }
    }

    /// Number of connections currently registered with an edge.
    pub fn registered(&self) -> usize {
        *self.registered.borrow()
    }

    /// The connections currently registered.
    pub fn connections(&self) -> Vec<LinkInfo> {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.values().cloned().collect()
    }

    /// Counts a registered connection; the key removes it.
    fn link(&self, info: LinkInfo) -> u64 {
        let key = self
            .next_key
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.insert(key, info);
        drop(links);
        self.add(1);
        key
    }

    fn unlink(&self, key: u64) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.remove(&key);
        drop(links);
        self.add(-1);
    }

    /// Waits until at least `n` connections are registered.
    pub async fn wait_registered(&self, n: usize) {
        let mut rx = self.registered.subscribe();
        let _ = rx.wait_for(|count| *count >= n).await;
    }

    fn add(&self, delta: isize) {
        self.registered
            .send_modify(|c| *c = c.saturating_add_signed(delta));
    }
}

/// After the grace period, how long cut-off requests get to run their on-complete hooks.
const AFTER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A configured connector, ready to run.
pub struct Connector {
    config: Arc<ConnectorConfig>,
    pipeline: Arc<ArcSwap<Pipeline>>,
    env: Arc<PluginEnv>,
    dialer: session::Dialer,
    state: Arc<ConnectorState>,
    metrics: Arc<Metrics>,
    admin: Option<std::net::TcpListener>,
    token: Arc<watch::Sender<crate::secret::Secret>>,
    digest: Arc<watch::Sender<String>>,
}

/// Applies a new configuration to a running connector (SIGHUP).
#[derive(Clone)]
pub struct ConnectorReloader {
    running: Arc<ConnectorConfig>,
    token: Arc<watch::Sender<crate::secret::Secret>>,
    digest: Arc<watch::Sender<String>>,
    pipeline: Arc<ArcSwap<Pipeline>>,
    env: Arc<PluginEnv>,
}

impl ConnectorReloader {
    /// Swaps ingress rules, origins, plugins and the access-log switch atomically: requests
    /// in flight finish on the set they started with. On error (a plugin that fails to load or
    /// to `init`, say) nothing changes. A new token re-registers the connections one by one,
    /// each replacement registered before the connection it replaces drains. Tunnel, edges,
    /// connections, listeners and the audit sinks need a restart; a change to them is logged
    /// and ignored.
    pub async fn reload(&self, config: &ConnectorConfig) -> Result<(), ConnectorError> {
        let pipeline = Pipeline::new(config, &self.env).await?;
        let old = &self.running;
        let needs_restart: Vec<&str> = [
            ("tunnel", old.tunnel != config.tunnel),
            ("edges", old.edges != config.edges),
            (
                "ha-connections",
                old.ha_connections != config.ha_connections,
            ),
            ("edge-ca", old.edge_ca != config.edge_ca),
            (
                "edge-server-name",
                old.edge_server_name != config.edge_server_name,
            ),
            ("connector-id", old.connector_id != config.connector_id),
            ("grace-period", old.grace_period != config.grace_period),
            (
                "max-concurrent-requests",
                old.max_concurrent_requests != config.max_concurrent_requests,
            ),
            ("max-sessions", old.max_sessions != config.max_sessions),
            ("log-format", old.log_format != config.log_format),
            ("workers", old.workers != config.workers),
            ("admin", old.admin_listen != config.admin_listen),
            ("audit", old.audit != config.audit),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect();
        if !needs_restart.is_empty() {
            warn!(
                keys = %needs_restart.join(", "),
                "these settings changed and take effect after a restart; the running values stay"
            );
        }
        let token_changed = self.token.send_if_modified(|token| {
            let changed = *token != config.token;
            if changed {
                *token = config.token.clone();
            }
            changed
        });
        if token_changed {
            info!("the token changed: re-registering the connections one by one");
        }
        let previous = self.pipeline.swap(Arc::new(pipeline));
        let digest = config.routing_digest();
        self.digest.send_if_modified(|d| {
            let changed = *d != digest;
            if changed {
                info!(%digest, "the ingress digest changed; telling the edges");
                *d = digest;
            }
            changed
        });
        // Requests still on the previous set (a long upgrade, say) keep it alive; its idle
        // instances need not live on with them and hold places in the shared pool.
        previous.retire();
        info!(
            origins = config.origins.len(),
            ingress_rules = config.ingress.len(),
            plugins = config.plugins.len(),
            "reloaded ingress, origins and plugins"
        );
        Ok(())
    }
}

impl Connector {
    /// Prepares TLS for the edges and every origin, loads the plugins (running their `init`),
    /// opens the audit sinks and binds the admin listener and the QUIC socket.
    pub async fn new(config: ConnectorConfig) -> Result<Self, ConnectorError> {
        let metrics = Arc::new(Metrics::new("sluice_connector"));
        let audit = Audit::start(&config.audit, metrics.clone()).await?;
        let env = Arc::new(PluginEnv::new(audit, metrics.clone()));
        let pipeline = Arc::new(ArcSwap::from_pointee(Pipeline::new(&config, &env).await?));
        let dialer = session::Dialer::new(&config)?;
        let admin = match config.admin_listen {
            Some(addr) => {
                let bind = |source| ConnectorError::Bind {
                    what: "admin listener",
                    addr: addr.to_string(),
                    source,
                };
                let l = std::net::TcpListener::bind(addr).map_err(bind)?;
                l.set_nonblocking(true).map_err(bind)?;
                Some(l)
            }
            None => None,
        };
        let token = Arc::new(watch::Sender::new(config.token.clone()));
        let digest = Arc::new(watch::Sender::new(config.routing_digest()));
        Ok(Connector {
            token,
            digest,
            config: Arc::new(config),
            pipeline,
            dialer,
            state: Arc::new(ConnectorState::new()),
            metrics,
            env,
            admin,
        })
    }

    /// Address of the admin listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// A handle to reload ingress and origins while the connector runs.
    pub fn reloader(&self) -> ConnectorReloader {
        ConnectorReloader {
            running: self.config.clone(),
            token: self.token.clone(),
            digest: self.digest.clone(),
            pipeline: self.pipeline.clone(),
            env: self.env.clone(),
        }
    }

    /// The audit writer (to flush it on a forced exit).
    pub fn audit(&self) -> crate::audit::Audit {
        self.env.audit().clone()
    }

    /// Observable state (registered connections).
    pub fn state(&self) -> Arc<ConnectorState> {
        self.state.clone()
    }

    /// What the admin listener reports: ready while a connection is registered and no drain
    /// is under way; `/status`.
    fn report(&self, shutdown: &CancellationToken) -> Report {
        let (state, stopping) = (self.state.clone(), shutdown.clone());
        let ready = Arc::new(move || state.registered() > 0 && !stopping.is_cancelled());
        let (config, state, digest) =
            (self.config.clone(), self.state.clone(), self.digest.clone());
        let in_flight = self.metrics.in_flight.clone();
        let status = Arc::new(move || {
            serde_json::json!({
                "role": "connector",
                "version": env!("CARGO_PKG_VERSION"),
                "tunnel": config.tunnel,
                "connector_id": config.connector_id,
                "edges": config.edges,
                "registered_connections": state.registered(),
                "connections": state.connections(),
                "in_flight": in_flight.get(),
                "digest": *digest.borrow(),
            })
        });
        let listed = self.state.clone();
        Report {
            metrics: self.metrics.clone(),
            ready,
            connections: Arc::new(move || serde_json::json!(listed.connections())),
            status,
        }
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), ConnectorError> {
        let endpoint = self.dialer.endpoint.clone();
        info!(
            version = env!("CARGO_PKG_VERSION"),
            tunnel = %self.config.tunnel,
            connector = %self.config.connector_id,
            edges = self.config.edges.len(),
            ha_connections = self.config.ha_connections,
            digest = %*self.digest.borrow(),
            "sluice connector starting"
        );
        // The admin listener outlives the drain, so that `/ready` says 503 while it lasts.
        let admin_stop = CancellationToken::new();
        let _stop_admin = admin_stop.clone().drop_guard();
        if let Some(listener) = self.admin.take() {
            let addr = listener
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string());
            let admin = Admin::from_std(listener).map_err(|source| ConnectorError::Bind {
                what: "admin listener",
                addr,
                source,
            })?;
            tokio::spawn(admin.run(self.report(&shutdown), admin_stop.clone()));
        }
        let sessions = TaskTracker::new();
        let links = TaskTracker::new();
        let streams = TaskTracker::new();
        let shared = Arc::new(session::Shared {
            config: self.config.clone(),
            pipeline: self.pipeline.clone(),
            dialer: self.dialer.clone(),
            cut_off: CancellationToken::new(),
            state: self.state.clone(),
            streams: streams.clone(),
            metrics: self.metrics.clone(),
            admission: pipeline::Admission::new(&self.config),
            token: self.token.clone(),
            rotation: Arc::default(),
            digest: self.digest.clone(),
            links: links.clone(),
        });
        for edge in &self.config.edges {
            for index in 0..self.config.ha_connections {
                let span = tracing::info_span!("session", edge = %edge, conn = index);
                sessions.spawn(
                    session::run(edge.clone(), index, shared.clone(), shutdown.clone())
                        .instrument(span),
                );
            }
        }
        shutdown.cancelled().await;

        // Drain: every session has told its edge to route no new requests here (sessions
        // watch the same token) and closes its connection once the edge acknowledges; in-flight
        // requests get the grace period to finish.
        let grace = self.config.grace_period;
        info!(
            in_flight = streams.len(),
            grace_secs = grace.as_secs_f64(),
            "draining: waiting for in-flight requests"
        );
        streams.close();
        sessions.close();
        links.close();
        // Connections first: once every one is acknowledged and closed, no stream can arrive
        // any more, and waiting for the streams then waits for all of them.
        let drained = tokio::time::timeout(grace, async {
            sessions.wait().await;
            links.wait().await;
            streams.wait().await;
        });
        match drained.await {
            Ok(()) => info!("all in-flight requests finished"),
            Err(_) => {
                warn!(
                    abandoned = streams.len(),
                    "grace period ran out; closing with requests still in flight"
                );
                // Cut off, the requests still running end at once; their on-complete hooks
                // still run, and their audit events are still written below.
                shared.cut_off.cancel();
                endpoint.close(
                    crate::proto::code::CLOSE_NORMAL.into(),
                    b"connector shutting down",
                );
                if tokio::time::timeout(AFTER_GRACE, streams.wait())
                    .await
                    .is_err()
                {
                    warn!(
                        still_running = streams.len(),
                        "requests did not end after their connections closed; their audit events are lost"
                    );
                }
            }
        }
        // Nothing can emit any more: write what is queued and stop the writer.
        self.env.audit().close().await;
        shared.cut_off.cancel();
        endpoint.close(
            crate::proto::code::CLOSE_NORMAL.into(),
            b"connector shutting down",
        );
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
        info!("connector stopped");
        Ok(())
    }
}
