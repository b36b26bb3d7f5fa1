//! `sluice check --connectivity`: for every edge of a connector's file, resolves it, tries
//! each transport (the TLS handshake verifies the edge's certificate) and registers as a check
//! the edge routes nothing to, and says what works with timings.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::session::{self, Dialer, SessionError};
use super::ConnectorError;
use crate::config::{connector_split_host_port, ConnectorConfig};
use crate::proto::{self, HeadCodec, Register};
use crate::transport::Protocol;

/// Time each transport gets for its handshake, and again for the registration.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// What was found for one edge.
#[derive(Debug)]
pub struct EdgeReport {
    /// The edge, as configured.
    pub edge: String,
    /// Its addresses, or why it could not be resolved, and how long resolving took.
    pub resolved: Result<Vec<SocketAddr>, String>,
    /// Time to resolve.
    pub resolve_time: Duration,
    /// Each transport tried, in order.
    pub transports: Vec<TransportReport>,
}

/// One transport to one edge.
#[derive(Debug)]
pub struct TransportReport {
    /// The transport.
    pub protocol: Protocol,
    /// Handshake and registration times and the edge's name, or what failed.
    pub result: Result<Passed, String>,
}

/// A transport that works.
#[derive(Debug)]
pub struct Passed {
    /// TCP/UDP, TLS (certificate verified) and, over TCP, HTTP/2 set-up.
    pub handshake: Duration,
    /// The registration exchange.
    pub registration: Duration,
    /// The edge's id.
    pub edge_id: String,
}

impl EdgeReport {
    /// Whether at least one transport reaches and registers with this edge.
    pub fn works(&self) -> bool {
        self.transports.iter().any(|t| t.result.is_ok())
    }
}

impl std::fmt::Display for EdgeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "edge {}", self.edge)?;
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        match &self.resolved {
            Ok(addrs) => {
                let listed: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                writeln!(
                    f,
                    "  resolve  ok    {} ({})",
                    listed.join(", "),
                    ms(self.resolve_time)
                )?;
            }
            Err(e) => writeln!(f, "  resolve  FAIL  {e}")?,
        }
        for t in &self.transports {
            match &t.result {
                Ok(p) => writeln!(
                    f,
                    "  {:<8} ok    handshake and certificate {}, registration {} (edge {:?})",
                    t.protocol.as_str(),
                    ms(p.handshake),
                    ms(p.registration),
                    p.edge_id
                )?,
                Err(e) => writeln!(f, "  {:<8} FAIL  {e}", t.protocol.as_str())?,
            }
        }
        Ok(())
    }
}

/// Checks every edge of `config` over both transports, one after the other.
pub async fn connectivity(config: &ConnectorConfig) -> Result<Vec<EdgeReport>, ConnectorError> {
    let dialer = Dialer::new(config)?;
    let mut reports = Vec::new();
    for edge in &config.edges {
        reports.push(check_edge(config, &dialer, edge).await);
    }
    dialer
        .endpoint
        .close(proto::code::CLOSE_NORMAL.into(), b"check done");
    Ok(reports)
}

async fn check_edge(config: &ConnectorConfig, dialer: &Dialer, edge: &str) -> EdgeReport {
    let started = Instant::now();
    let resolved = resolve(edge).await;
    let resolve_time = started.elapsed();
    let mut transports = Vec::new();
    if let Ok((addrs, host)) = &resolved {
        let server_name = config.edge_server_name.as_deref().unwrap_or(host);
        for protocol in [Protocol::Quic, Protocol::Http2] {
            let result = try_transport(config, dialer, protocol, addrs[0], server_name).await;
            transports.push(TransportReport { protocol, result });
        }
    }
    EdgeReport {
        edge: edge.to_string(),
        resolved: resolved.map(|(addrs, _)| addrs),
        resolve_time,
        transports,
    }
}

/// The addresses of `edge` and its host name.
async fn resolve(edge: &str) -> Result<(Vec<SocketAddr>, String), String> {
    let (host, port) = connector_split_host_port(edge)?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host} has no address"));
    }
    Ok((addrs, host))
}

async fn try_transport(
    config: &ConnectorConfig,
    dialer: &Dialer,
    protocol: Protocol,
    addr: SocketAddr,
    server_name: &str,
) -> Result<Passed, String> {
    let started = Instant::now();
    let conn = dialer
        .connect(protocol, addr, server_name, STEP_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    let handshake = started.elapsed();
    let probe = Register {
        version: proto::VERSION,
        tunnel: config.tunnel.clone(),
        token: config.token.clone(),
        connector_id: config.connector_id.clone(),
        conn_index: 0,
        software: Some(session::SOFTWARE.to_string()),
        digest: None,
        heads: HeadCodec::offered(),
        probe: true,
        sessions: false,
        trailers: false,
    };
    let registered = tokio::time::timeout(STEP_TIMEOUT, session::register(&conn, probe)).await;
    let registration = started.elapsed() - handshake;
    conn.close(proto::code::CLOSE_NORMAL, b"check done");
    match registered {
        Ok(Ok((_, _, ok))) => Ok(Passed {
            handshake,
            registration,
            edge_id: ok.edge_id,
        }),
        Ok(Err(SessionError::Rejected(rej))) => Err(format!(
            "connected ({:.1} ms), but the edge refused the registration: {}",
            handshake.as_secs_f64() * 1e3,
            rej.message
        )),
        Ok(Err(e)) => Err(format!("connected, then the registration failed: {e}")),
        Err(_) => Err(format!(
            "connected, but no answer to the registration within {STEP_TIMEOUT:?}"
        )),
    }
}
