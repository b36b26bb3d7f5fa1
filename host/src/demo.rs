//! `sluice demo`: an edge, a connector and the `hello` origin in one process, on loopback,
//! with the example plugins `header-rewrite` (adds a header the echo shows) and `audit-log`
//! (audit lines on stdout).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use crate::config::{
    AuditConfig, ConnectorConfig, EdgeConfig, HostPattern, PluginConfig, TunnelConfig,
};
use crate::connector::{Connector, ConnectorError};
use crate::edge::{Edge, EdgeError};
use crate::secret::Secret;
use crate::tls;

/// Hostname the demo tunnel serves.
pub const DEMO_HOST: &str = "hello.sluice.localhost";

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Certificate generation failed.
    #[error("failed to generate a certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// The edge failed.
    #[error(transparent)]
    Edge(#[from] EdgeError),
    /// The connector failed.
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    /// The example plugins are not built.
    #[error(
        "the demo's plugins are not in {dir}: build them with `cargo build-plugins` (or pass --no-plugins)"
    )]
    MissingPlugins {
        /// Where they were looked for.
        dir: String,
    },
}

/// Where `cargo build-plugins` puts the example plugins.
pub const DEFAULT_PLUGIN_DIR: &str = "target/wasm32-wasip2/release";

/// The demo's plugin chain, loaded from `dir`.
fn demo_plugins(dir: &Path) -> Result<Vec<PluginConfig>, DemoError> {
    let path = |name: &str| -> Result<PathBuf, DemoError> {
        let p = dir.join(format!("{name}.wasm"));
        if p.is_file() {
            Ok(p)
        } else {
            Err(DemoError::MissingPlugins {
                dir: dir.display().to_string(),
            })
        }
    };
    let mut rewrite = PluginConfig::new("header-rewrite", path("header_rewrite")?);
    rewrite.config_json = serde_json::json!({
        "request": {"set": {"x-sluice-demo": "hello from the header-rewrite plugin"}},
        "response": {"set": {"x-sluice-plugins": "header-rewrite, audit-log"}},
    })
    .to_string()
    .into_bytes();
    let mut audit = PluginConfig::new("audit-log", path("audit_log")?);
    audit.config_json =
        br#"{"fields": ["method", "host", "path", "status", "duration_ms", "origin"]}"#.to_vec();
    Ok(vec![rewrite, audit])
}

/// A running demo.
pub struct Demo {
    /// Where clients send requests.
    pub http_addr: SocketAddr,
    /// The command to try.
    pub curl: String,
    edge: Edge,
    connector: Connector,
}

impl Demo {
    /// Binds everything on 127.0.0.1 (`http_port` 0 picks a free port), loading the example
    /// plugins from `plugins` unless it is `None`.
    pub async fn start(http_port: u16, plugins: Option<&Path>) -> Result<Demo, DemoError> {
        let identity = tls::self_signed(&["localhost"])?;
        let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut edge_cfg = EdgeConfig::new(loopback(0), identity.clone());
        edge_cfg.edge_id = "demo-edge".into();
        edge_cfg.http_listen = Some(loopback(http_port));
        let token = Secret::new(hex::encode(rand::random::<[u8; 32]>()));
        edge_cfg.tunnels.push(TunnelConfig {
            id: "demo".into(),
            token_hashes: vec![token.sha256()],
            // Infallible: a valid literal.
            hostnames: vec![HostPattern::try_from(DEMO_HOST).expect("valid demo host")],
            max_concurrent_requests: 1000,
            max_connections: crate::config::DEFAULT_TUNNEL_MAX_CONNECTIONS,
            ports: Vec::new(),
        });
        let edge = Edge::bind(edge_cfg).await?;

        let mut conn_cfg = ConnectorConfig::new("demo", token);
        conn_cfg.connector_id = "demo-connector".into();
        conn_cfg.edges = vec![edge.quic_addr().to_string()];
        conn_cfg.edge_server_name = Some("localhost".into());
        conn_cfg.edge_ca = identity.chain.clone();
        if let Some(dir) = plugins {
            conn_cfg.plugins = demo_plugins(dir)?;
            conn_cfg.global_plugins = conn_cfg.plugins.iter().map(|p| p.name.clone()).collect();
            conn_cfg.audit = AuditConfig {
                stdout: true,
                ..AuditConfig::default()
            };
        }
        let connector = Connector::new(conn_cfg).await?;

        let http_addr = edge.http_addr().unwrap_or(loopback(http_port));
        let curl = format!("curl -H 'Host: {DEMO_HOST}' http://{http_addr}/hello");
        Ok(Demo {
            http_addr,
            curl,
            edge,
            connector,
        })
    }

    /// Runs until `shutdown` is cancelled, announcing the curl command once the connector has
    /// registered.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DemoError> {
        let state = self.connector.state();
        let edge = tokio::spawn(self.edge.run(shutdown.clone()));
        let connector = tokio::spawn(self.connector.run(shutdown.clone()));
        tokio::select! {
            _ = state.wait_registered(1) => {
                println!("sluice demo is up: edge, connector and the hello origin on loopback.");
                println!("Try:");
                println!("{}", self.curl);
                println!("Press Ctrl-C to stop.");
            }
            _ = shutdown.cancelled() => {}
        }
        let _ = edge.await;
        if let Ok(r) = connector.await {
            r?;
        }
        Ok(())
    }
}
