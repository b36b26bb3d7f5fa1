//! `sluice access tcp`: the client side of a TCP service, with no inbound port anywhere.
//!
//! Each session is a WebSocket ([`crate::services::websocket`]) to the edge's HTTPS listener
//! for the service's hostname; the connector's ingress rule for that hostname names a
//! `tcp://` origin, and its `on-request` plugins run on the upgrade request as on any other
//! (so access-guard can require the token this client sends as `Authorization: Bearer`).
//! The local end is standard input and output (`--stdio`, for ssh's `ProxyCommand`) or each
//! connection accepted on a local listener (`--listen`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::WebSocketStream;
use tracing::{info, warn};

use crate::secret::Secret;
use crate::services::websocket;

/// Time to reach the edge and complete TLS and the WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The client never closes an idle session itself: the connector's `session-idle-timeout`
/// does.
const CLIENT_IDLE: Duration = Duration::from_secs(365 * 24 * 3600);

/// Where and how `sluice access` reaches a service.
#[derive(Debug, Clone)]
pub struct AccessTarget {
    /// The service's public hostname (the `Host` of the upgrade request).
    pub hostname: String,
    /// The edge's HTTPS listener, `host:port`.
    pub edge: String,
    /// Extra CA certificates trusted for the edge, besides the system roots.
    pub edge_ca: Vec<CertificateDer<'static>>,
    /// The name verified in the edge's certificate (default: `hostname`).
    pub edge_server_name: Option<String>,
    /// Sent as `Authorization: Bearer …` when set.
    pub token: Option<Secret>,
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The edge could not be reached.
    #[error("cannot reach the edge at {edge}: {detail}")]
    Unreachable {
        /// The edge's address.
        edge: String,
        /// What failed.
        detail: String,
    },
    /// TLS with the edge failed (certificate not trusted, wrong name).
    #[error("TLS with the edge at {edge} failed: {detail}")]
    Tls {
        /// The edge's address.
        edge: String,
        /// What rustls said.
        detail: String,
    },
    /// The edge, the connector or a plugin answered instead of opening the session.
    #[error("the edge answered {status} instead of opening the session: {body}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The answer's body, trimmed.
        body: String,
    },
    /// Anything else (a broken handshake, a bad address).
    #[error("{0}")]
    Other(String),
}

impl AccessTarget {
    /// Opens one session: TCP and TLS to the edge, then the WebSocket upgrade.
    pub async fn connect(&self) -> Result<WebSocketStream<TlsStream<TcpStream>>, AccessError> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner())
            .await
            .map_err(|_| AccessError::Unreachable {
                edge: self.edge.clone(),
                detail: format!("no session within {CONNECT_TIMEOUT:?}"),
            })?
    }

    async fn connect_inner(&self) -> Result<WebSocketStream<TlsStream<TcpStream>>, AccessError> {
        let unreachable = |detail: String| AccessError::Unreachable {
            edge: self.edge.clone(),
            detail,
        };
        let tcp = TcpStream::connect(&self.edge)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut tls = crate::tls::https_client(&self.edge_ca)
            .map_err(|e| AccessError::Other(e.to_string()))?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = self.edge_server_name.as_deref().unwrap_or(&self.hostname);
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|e| AccessError::Other(format!("invalid edge server name {name:?}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(server_name, tcp)
            .await
            .map_err(|e| AccessError::Tls {
                edge: self.edge.clone(),
                detail: e.to_string(),
            })?;
        let request = self.request()?;
        match tokio_tungstenite::client_async_with_config(request, tls, Some(websocket::config()))
            .await
        {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).trim().to_string())
                    .unwrap_or_default();
                Err(AccessError::Refused {
                    status: resp.status().as_u16(),
                    body,
                })
            }
            Err(e) => Err(AccessError::Other(format!(
                "the WebSocket handshake failed: {e}"
            ))),
        }
    }

    fn request(&self) -> Result<tungstenite::handshake::client::Request, AccessError> {
        use tungstenite::client::IntoClientRequest;
        let mut request = format!("wss://{}/", self.hostname)
            .into_client_request()
            .map_err(|e| {
                AccessError::Other(format!("invalid hostname {:?}: {e}", self.hostname))
            })?;
        let headers = request.headers_mut();
        headers.insert(
            "sec-websocket-protocol",
            http::HeaderValue::from_static(websocket::SUBPROTOCOL),
        );
        if let Some(token) = &self.token {
            let value = http::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|_| AccessError::Other("the token is not a valid header value".into()))?;
            headers.insert(http::header::AUTHORIZATION, value);
        }
        Ok(request)
    }

    /// One session between standard input/output and the service (ssh's `ProxyCommand`).
    pub async fn stdio(&self) -> Result<(), AccessError> {
        let ws = self.connect().await?;
        let io = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
        websocket::bridge(ws, io, CLIENT_IDLE, None)
            .await
            .result
            .map_err(|e| AccessError::Other(format!("the session failed: {e}")))
    }

    /// Accepts connections on `listener` until `shutdown`, one session each.
    pub async fn listen(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let Some((tcp, peer)) = crate::net::accept(&listener, &shutdown, "local").await else {
                return;
            };
            let target = self.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match target.connect().await {
                    Ok(ws) => {
                        info!(%peer, hostname = %target.hostname, "session opened");
                        let r = websocket::bridge(ws, tcp, CLIENT_IDLE, None).await;
                        let (up, down) = (r.sent, r.received);
                        match r.result {
                            Ok(()) => {
                                info!(%peer, bytes_up = up, bytes_down = down, "session closed")
                            }
                            Err(e) => {
                                warn!(%peer, bytes_up = up, bytes_down = down, cause = %e, "session failed")
                            }
                        }
                    }
                    Err(e) => warn!(%peer, "{e}"),
                }
            });
        }
    }
}

/// The edge address `sluice access` uses: `--edge`, or the hostname on port 443.
pub fn default_edge(hostname: &str, edge: Option<&str>) -> String {
    match edge {
        Some(e) => e.to_string(),
        None => format!("{hostname}:443"),
    }
}

/// The address of a `--listen` value: loopback only, unless `allow_remote`, since every
/// session opened through it carries this client's token.
pub fn parse_listen(s: &str, allow_remote: bool) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("--listen {s:?}: give an address and port, like 127.0.0.1:2222"))?;
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(format!(
            "--listen {addr}: not a loopback address; anyone who can reach it would get sessions carrying your token (add --danger-allow-remote if that is intended)"
        ));
    }
    Ok(addr)
}
