//! Origins: a keep-alive client pool per named HTTP origin — HTTP/1.1 or HTTP/2, over TCP or
//! a unix socket, plain or TLS (with a client certificate if the origin wants one) — and the
//! built-in origins `hello` and `status:NNN`.

mod builtin;
pub mod connect;
mod h1;
pub mod pool;

use std::collections::HashMap;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;

use connect::OriginConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{OriginConfig, OriginTarget, SocketTarget};
use crate::relay::HttpBody;
use crate::tls;

/// Why an origin could not be reached or did not answer. Each kind maps to one status, one
/// metric label and one log message.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// Nothing listens at the origin's address.
    #[error("origin {origin:?} refused the connection")]
    Refused {
        /// Origin name.
        origin: String,
    },
    /// The TCP connection was not established in time.
    #[error("origin {origin:?} did not accept a connection within {timeout:?}")]
    ConnectTimeout {
        /// Origin name.
        origin: String,
        /// The configured `connect-timeout`.
        timeout: std::time::Duration,
    },
    /// No response head arrived in time.
    #[error("origin {origin:?} did not answer within {timeout:?}")]
    ResponseTimeout {
        /// Origin name.
        origin: String,
        /// The configured `request-timeout`.
        timeout: std::time::Duration,
    },
    /// The TLS handshake failed (certificate not trusted, name mismatch…).
    #[error("TLS with origin {origin:?} failed: {detail}")]
    Tls {
        /// Origin name.
        origin: String,
        /// What rustls said.
        detail: String,
    },
    /// Any other failure to connect (DNS, unreachable network).
    #[error("origin {origin:?} is unreachable: {detail}")]
    Unreachable {
        /// Origin name.
        origin: String,
        /// The underlying error.
        detail: String,
    },
    /// The origin broke the HTTP exchange (closed early, invalid response).
    #[error("origin {origin:?} failed the request: {detail}")]
    Protocol {
        /// Origin name.
        origin: String,
        /// The underlying error.
        detail: String,
    },
}

impl OriginError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            OriginError::ConnectTimeout { .. } | OriginError::ResponseTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// The connection failed: nothing of the request reached the origin, so it may go to
    /// another (a pool's retry).
    pub fn before_sending(&self) -> bool {
        matches!(
            self,
            OriginError::Refused { .. }
                | OriginError::ConnectTimeout { .. }
                | OriginError::Unreachable { .. }
                | OriginError::Tls { .. }
        )
    }

    /// The connection failed after the request went out and before a response head came
    /// back (closed or reset, or an unreadable answer): only a safe method may go again.
    pub fn no_answer(&self) -> bool {
        matches!(self, OriginError::Protocol { .. })
    }

    /// What the client is told: what failed, without the origin's name or address (the
    /// `Display` text, which has them, is for the log).
    pub fn public_text(&self) -> &'static str {
        match self {
            OriginError::ConnectTimeout { .. } | OriginError::ResponseTimeout { .. } => {
                "the origin did not answer in time"
            }
            OriginError::Tls { .. } => "the TLS handshake with the origin failed",
            OriginError::Protocol { .. } => "the origin sent an invalid response",
            OriginError::Refused { .. } | OriginError::Unreachable { .. } => {
                "the origin is unreachable"
            }
        }
    }

    /// A stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            OriginError::Refused { .. } => "refused",
            OriginError::ConnectTimeout { .. } => "connect-timeout",
            OriginError::ResponseTimeout { .. } => "response-timeout",
            OriginError::Tls { .. } => "tls",
            OriginError::Unreachable { .. } => "unreachable",
            OriginError::Protocol { .. } => "protocol",
        }
    }
}

/// One named origin, ready to take requests.
#[derive(Debug)]
pub struct Origin {
    config: OriginConfig,
    kind: Kind,
}

enum Kind {
    Http(Box<HttpClients>),
    Hello,
    Status(StatusCode),
    /// A TCP service: sessions, never HTTP requests.
    Socket,
}

/// The clients of an HTTP origin.
struct HttpClients {
    /// Keep-alive pool for ordinary requests.
    pooled: Pooled,
    /// A fresh HTTP/1.1 connection per upgrade request, never returned to a pool: an origin
    /// that declines an upgrade may still be in a state no later request should inherit.
    upgrades: Client<HttpsConnector<OriginConnector>, HttpBody>,
    /// Scheme and authority of the request URIs (`http://localhost` for a unix socket).
    scheme: &'static str,
    authority: String,
    /// With `proxy-protocol`: what a connection of its own for each request needs.
    proxied: Option<Proxied>,
}

/// The keep-alive client of ordinary requests.
enum Pooled {
    /// HTTP/1.1, each connection driven by the request using it.
    Http1(Arc<h1::Pool>),
    /// HTTP/2 (by ALPN, or prior knowledge), connections shared by concurrent requests.
    Http2(Box<Client<HttpsConnector<OriginConnector>, HttpBody>>),
}

/// An origin reading a PROXY protocol header: each request gets a connection that starts
/// with its client's address, never shared with another client's requests.
struct Proxied {
    version: crate::config::ProxyVersion,
    connector: OriginConnector,
    tls: rustls::ClientConfig,
    server_name: Option<rustls::pki_types::ServerName<'static>>,
    /// The address the header names as the destination: the origin's own when its URL gives
    /// an address (the edge's, which the client reached, is not known here).
    destination: std::net::SocketAddr,
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Http(_) => f.write_str("Http"),
            Kind::Hello => f.write_str("Hello"),
            Kind::Status(s) => write!(f, "Status({s})"),
            Kind::Socket => f.write_str("Socket"),
        }
    }
}

impl Origin {
    /// Builds the client pool (and TLS configuration) of an origin.
    pub fn new(config: OriginConfig) -> Result<Self, tls::TlsError> {
        let kind = match &config.target {
            OriginTarget::Hello => Kind::Hello,
            // Validated at load: 100..=599.
            OriginTarget::Status(code) => {
                Kind::Status(StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY))
            }
            OriginTarget::Tcp(_) | OriginTarget::Udp(_) => Kind::Socket,
            OriginTarget::Http(_) | OriginTarget::Unix { .. } => {
                Kind::Http(Box::new(HttpClients::new(&config)?))
            }
        };
        Ok(Origin { config, kind })
    }

    /// The origin's configuration.
    pub fn config(&self) -> &OriginConfig {
        &self.config
    }

    /// The address of a TCP origin (`tcp://`, `ssh://`, `rdp://`), which takes sessions
    /// instead of HTTP requests.
    pub fn tcp_target(&self) -> Option<&SocketTarget> {
        match &self.config.target {
            OriginTarget::Tcp(t) => Some(t),
            _ => None,
        }
    }

    /// Sends `req` (whose URI holds only path and query) and waits for the response head.
    ///
    /// Cancel safe in the sense that matters: dropping the future abandons the origin request
    /// and closes its connection.
    pub async fn send(&self, req: Request<HttpBody>) -> Result<Response<HttpBody>, OriginError> {
        self.send_for(req, None).await
    }

    /// Like [`Origin::send`], for a request of `client` (the address an origin with
    /// `proxy-protocol` is told; `None`: the connector's own request, a health check).
    pub async fn send_for(
        &self,
        mut req: Request<HttpBody>,
        client: Option<std::net::SocketAddr>,
    ) -> Result<Response<HttpBody>, OriginError> {
        match &self.kind {
            Kind::Hello => Ok(builtin::hello(req).await),
            Kind::Status(code) => Ok(builtin::status(*code)),
            Kind::Socket => Err(OriginError::Protocol {
                origin: self.config.name.clone(),
                detail: "a TCP origin takes sessions, not HTTP requests".into(),
            }),
            Kind::Http(clients) if clients.proxied.is_some() => {
                let timeout = self.config.request_timeout;
                // Boxed: a PROXY-protocol request builds its own connection, a large future
                // the common path should not carry (see `Pipeline::handle`).
                let send = Box::pin(self.send_proxied(clients, req, client));
                match tokio::time::timeout(timeout, send).await {
                    Ok(r) => r,
                    Err(_) => Err(OriginError::ResponseTimeout {
                        origin: self.config.name.clone(),
                        timeout,
                    }),
                }
            }
            Kind::Http(clients) => {
                let upgrade = req.headers().contains_key(http::header::UPGRADE);
                let client = match &clients.pooled {
                    Pooled::Http1(pool) if !upgrade => return self.send_http1(pool, req).await,
                    Pooled::Http2(client) if !upgrade => client,
                    _ => &clients.upgrades,
                };
                *req.uri_mut() = self.origin_uri(clients, req.uri())?;
                let timeout = self.config.request_timeout;
                match tokio::time::timeout(timeout, client.request(req)).await {
                    Err(_) => Err(OriginError::ResponseTimeout {
                        origin: self.config.name.clone(),
                        timeout,
                    }),
                    Ok(Err(e)) => Err(self.classify(&e)),
                    Ok(Ok(resp)) => Ok(resp.map(|b| {
                        use http_body_util::BodyExt;
                        b.map_err(|e| -> crate::relay::BoxError { Box::new(e) })
                            .boxed()
                    })),
                }
            }
        }
    }

    /// [`Origin::send`] on an HTTP/1.1 keep-alive connection driven by this request's task.
    async fn send_http1(
        &self,
        pool: &Arc<h1::Pool>,
        req: Request<HttpBody>,
    ) -> Result<Response<HttpBody>, OriginError> {
        let timeout = self.config.request_timeout;
        match tokio::time::timeout(timeout, pool.send(req)).await {
            Err(_) => Err(OriginError::ResponseTimeout {
                origin: self.config.name.clone(),
                timeout,
            }),
            Ok(Err(h1::SendError::Connect(e))) => Err(self.classify_chain(e.as_ref(), true)),
            Ok(Err(h1::SendError::Request(e))) => Err(self.classify_chain(&e, false)),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// The absolute URI of a request for `target` (path and query) on this origin.
    fn origin_uri(
        &self,
        clients: &HttpClients,
        target: &http::Uri,
    ) -> Result<http::Uri, OriginError> {
        let target = target.path_and_query().map_or("/", |p| p.as_str());
        format!("{}://{}{}", clients.scheme, clients.authority, target)
            .parse()
            .map_err(|e: http::uri::InvalidUri| OriginError::Protocol {
                origin: self.config.name.clone(),
                detail: e.to_string(),
            })
    }

    fn classify(&self, err: &hyper_util::client::legacy::Error) -> OriginError {
        self.classify_chain(err, err.is_connect())
    }

    /// The kind of failure `err` (and its sources) says; `connect` when it happened before a
    /// connection was made.
    fn classify_chain(
        &self,
        err: &(dyn std::error::Error + 'static),
        connect: bool,
    ) -> OriginError {
        let origin = self.config.name.clone();
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => {
                        return OriginError::Refused { origin }
                    }
                    std::io::ErrorKind::TimedOut if connect => {
                        return OriginError::ConnectTimeout {
                            origin,
                            timeout: self.config.connect_timeout,
                        }
                    }
                    _ => {}
                }
            }
            // A TLS failure after the connection was made (an alert mid-exchange) may come
            // after the request went out: a protocol failure, never retried elsewhere.
            if let (Some(tls), true) = (e.downcast_ref::<rustls::Error>(), connect) {
                return OriginError::Tls {
                    origin,
                    detail: tls.to_string(),
                };
            }
            // io::Error's `source` skips the error it wraps; descend into it instead.
            source = match e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => e.source(),
            };
        }
        let detail = error_chain(err);
        if connect {
            OriginError::Unreachable { origin, detail }
        } else {
            OriginError::Protocol { origin, detail }
        }
    }
}

/// `err` and its sources, joined with `: `.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

impl HttpClients {
    /// The pooled and upgrade clients of an `http://`, `https://` or `unix:` origin.
    fn new(config: &OriginConfig) -> Result<HttpClients, tls::TlsError> {
        let (connector, scheme, authority) = match &config.target {
            OriginTarget::Http(base) => (
                OriginConnector::tcp(config.connect_timeout),
                if base.scheme_str() == Some("https") {
                    "https"
                } else {
                    "http"
                },
                base.authority().map_or("", |a| a.as_str()).to_string(),
            ),
            OriginTarget::Unix { path, tls } => (
                OriginConnector::unix(path.clone(), config.connect_timeout),
                if *tls { "https" } else { "http" },
                // The name the TLS handshake verifies unless server-name says otherwise.
                "localhost".to_string(),
            ),
            _ => unreachable!("HttpClients are built for HTTP origins only"),
        };
        let tls_cfg = tls::origin_client(
            &config.ca,
            config.danger_accept_invalid_certs,
            config.client_identity.as_ref(),
        )?;
        let server_name = config
            .server_name
            .as_ref()
            .map(|name| {
                rustls::pki_types::ServerName::try_from(name.clone())
                    .map_err(|e| tls::TlsError::Quic(format!("invalid server-name {name:?}: {e}")))
            })
            .transpose()?;
        let builder = || {
            let b = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls_cfg.clone())
                .https_or_http();
            match &server_name {
                Some(name) => b.with_server_name_resolver(
                    hyper_rustls::FixedServerNameResolver::new(name.clone()),
                ),
                None => b,
            }
        };
        // Upgrades are HTTP/1.1's; ordinary requests offer HTTP/2 by ALPN over TLS, or speak
        // it with prior knowledge in the clear, when the origin says `http2`.
        let http1 = builder().enable_http1().wrap_connector(connector.clone());
        let client = |connector, max_idle, h2c: bool| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(config.pool_idle_timeout)
                .pool_max_idle_per_host(max_idle)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(h2c)
                .build(connector)
        };
        let h2c = config.http2 && scheme == "http";
        let proxied = config.proxy_protocol.map(|version| {
            let port = match &config.target {
                OriginTarget::Http(u) => {
                    u.port_u16()
                        .unwrap_or(if scheme == "https" { 443 } else { 80 })
                }
                _ => 0,
            };
            let ip = match &config.target {
                OriginTarget::Http(u) => u
                    .host()
                    .and_then(|h| h.trim_matches(['[', ']']).parse().ok()),
                _ => None,
            };
            Proxied {
                version,
                connector: connector_for(config),
                tls: tls_cfg.clone(),
                server_name: server_name.clone(),
                destination: std::net::SocketAddr::new(
                    ip.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
                    port,
                ),
            }
        });
        let pooled = match config.http2 {
            true => Pooled::Http2(Box::new(client(
                builder().enable_all_versions().wrap_connector(connector),
                config.pool_max_idle,
                h2c,
            ))),
            false => Pooled::Http1(h1::Pool::new(
                http1.clone(),
                (scheme, authority.clone()),
                config.pool_max_idle,
                config.pool_idle_timeout,
            )),
        };
        Ok(HttpClients {
            pooled,
            upgrades: client(http1, 0, false),
            scheme,
            authority,
            proxied,
        })
    }
}

/// The connector (TCP or unix socket) of an HTTP origin.
fn connector_for(config: &OriginConfig) -> OriginConnector {
    match &config.target {
        OriginTarget::Unix { path, .. } => {
            OriginConnector::unix(path.clone(), config.connect_timeout)
        }
        _ => OriginConnector::tcp(config.connect_timeout),
    }
}

impl Origin {
    /// A URI the PROXY-protocol path built that does not parse: the origin's own address or
    /// the request's path, both already checked, so a protocol error rather than a panic.
    fn invalid_uri(&self, e: http::uri::InvalidUri) -> OriginError {
        OriginError::Protocol {
            origin: self.config.name.clone(),
            detail: e.to_string(),
        }
    }

    /// Sends `req` on a connection of its own that starts with a PROXY protocol header
    /// naming `client` (HTTP/1.1).
    async fn send_proxied(
        &self,
        clients: &HttpClients,
        mut req: Request<HttpBody>,
        client: Option<std::net::SocketAddr>,
    ) -> Result<Response<HttpBody>, OriginError> {
        use crate::config::ProxyVersion;
        use crate::services::proxy_protocol;
        use tower_service::Service;
        let p = clients.proxied.as_ref().expect("checked by the caller");
        let header = match (p.version, client) {
            (ProxyVersion::V1, c) => proxy_protocol::v1(c.map(|c| (c, p.destination))),
            (ProxyVersion::V2, Some(c)) => proxy_protocol::header(c, p.destination),
            (ProxyVersion::V2, None) => proxy_protocol::local(),
        };
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(p.tls.clone())
            .https_or_http();
        let builder = match &p.server_name {
            Some(n) => builder
                .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(n.clone())),
            None => builder,
        };
        let mut connector = builder
            .enable_http1()
            .wrap_connector(p.connector.with_prefix(header));
        let uri: http::Uri = format!("{}://{}/", clients.scheme, clients.authority)
            .parse()
            .map_err(|e| self.invalid_uri(e))?;
        let io = connector
            .call(uri)
            .await
            .map_err(|e| self.classify_chain(e.as_ref(), true))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| self.classify_chain(&e, true))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        // The request line takes the path (origin form).
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        *req.uri_mut() = path.parse().map_err(|e| self.invalid_uri(e))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.classify_chain(&e, false))?;
        Ok(resp.map(|b| {
            use http_body_util::BodyExt;
            b.map_err(|e| -> crate::relay::BoxError { Box::new(e) })
                .boxed()
        }))
    }
}

/// Every configured origin and origin pool by name.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    by_name: HashMap<String, Arc<Origin>>,
    pools: HashMap<String, Arc<pool::Pool>>,
}

/// What a name used by an ingress rule or a plugin stands for.
#[derive(Debug, Clone)]
pub enum Named<'a> {
    /// An origin.
    Origin(&'a Arc<Origin>),
    /// A pool of origins.
    Pool(&'a Arc<pool::Pool>),
}

impl Origins {
    /// Builds every origin, and the pools over them (their health checks start on the
    /// current runtime and stop when the last clone goes).
    pub fn new(
        configs: &[OriginConfig],
        pools: &[crate::config::PoolConfig],
        metrics: &crate::admin::Metrics,
    ) -> Result<Self, tls::TlsError> {
        let mut by_name = HashMap::new();
        for c in configs {
            by_name.insert(c.name.clone(), Arc::new(Origin::new(c.clone())?));
        }
        let mut built = HashMap::new();
        for p in pools {
            let members = p
                .members
                .iter()
                .filter_map(|m| by_name.get(m).cloned())
                .collect();
            built.insert(p.name.clone(), pool::Pool::new(p.clone(), members, metrics));
        }
        Ok(Origins {
            by_name,
            pools: built,
        })
    }

    /// The origin called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Origin>> {
        self.by_name.get(name)
    }

    /// The origin or pool called `name`.
    pub fn named(&self, name: &str) -> Option<Named<'_>> {
        match self.by_name.get(name) {
            Some(o) => Some(Named::Origin(o)),
            None => self.pools.get(name).map(Named::Pool),
        }
    }
}

/// Opens a TCP connection to a socket origin (a TCP session's origin), within `timeout`.
/// Failures are classified as for HTTP origins: one status, one metric label, one message.
pub async fn connect_tcp(
    origin: &str,
    target: &SocketTarget,
    timeout: std::time::Duration,
) -> Result<tokio::net::TcpStream, OriginError> {
    let addr = (target.host.as_str(), target.port);
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => Err(OriginError::ConnectTimeout {
            origin: origin.to_string(),
            timeout,
        }),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err(OriginError::Refused {
                origin: origin.to_string(),
            })
        }
        Ok(Err(e)) => Err(OriginError::Unreachable {
            origin: origin.to_string(),
            detail: e.to_string(),
        }),
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request's task holds its origin request's future for as long as the origin takes to
    /// answer, and the task is copied when spawned: a new connection's setup, which most
    /// requests skip (they reuse an idle connection), is boxed rather than carried by every
    /// request. The future took 4.2 KB with the setup and takes 2.6 KB without it, in release
    /// and test builds alike. (It is never polled: the target does not matter, and no
    /// runtime is needed.)
    #[test]
    fn an_origin_request_does_not_carry_a_connection_setup() {
        let target = OriginTarget::Http("http://127.0.0.1:9".parse().unwrap());
        let origin = Origin::new(OriginConfig::new("web", target)).unwrap();
        let request = origin.send_for(Request::new(crate::relay::empty()), None);
        let size = std::mem::size_of_val(&request);
        assert!(
            size <= 3072,
            "an origin request's future takes {size} bytes: if a new await made it grow, box \
             that await unless most requests reach it (see `Pipeline::handle`)"
        );
    }
}
