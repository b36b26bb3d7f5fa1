//! The connector's configuration file and its validated form.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration as StdDuration;

use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use toml::Spanned;

use super::{read_certs, AuditConfig, ConfigError, Duration, HostPattern, PluginConfig, Source};
use crate::ingress::{Ambiguous, PathPolicy};
use crate::secret::Secret;

/// Default number of connections to each edge.
pub const DEFAULT_HA_CONNECTIONS: u32 = 2;
const DEFAULT_CONNECT_TIMEOUT: StdDuration = StdDuration::from_secs(5);
const DEFAULT_REQUEST_TIMEOUT: StdDuration = StdDuration::from_secs(60);
const DEFAULT_POOL_IDLE_TIMEOUT: StdDuration = StdDuration::from_secs(90);
/// Enough for a connector at a few hundred requests in flight to one origin: below the
/// concurrency, connections beyond it are closed as they go idle and reopened for the next
/// request (a TCP handshake per request under load).
const DEFAULT_POOL_MAX_IDLE: usize = 256;
/// Default `grace-period` of both roles.
pub const DEFAULT_GRACE_PERIOD: StdDuration = StdDuration::from_secs(30);

/// Validated connector configuration.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// Tunnel id to register as.
    pub tunnel: String,
    /// The tunnel's token.
    pub token: Secret,
    /// Name of this connector in the edge's logs.
    pub connector_id: String,
    /// Edge addresses, `host:port`.
    pub edges: Vec<String>,
    /// Connections kept to each edge.
    pub ha_connections: u32,
    /// The transport to the edges.
    pub protocol: super::TransportChoice,
    /// Extra CA certificates trusted for edges, besides the system roots.
    pub edge_ca: Vec<CertificateDer<'static>>,
    /// Name to verify in the edge's certificate instead of the host in `edges`.
    pub edge_server_name: Option<String>,
    /// Named origins.
    pub origins: Vec<OriginConfig>,
    /// Origin pools: named like origins, spreading requests over several of them.
    pub pools: Vec<PoolConfig>,
    /// Ingress rules, first match wins, the last one a catch-all.
    pub ingress: Vec<IngressRuleConfig>,
    /// Reconnect back-off.
    pub backoff: BackoffConfig,
    /// On shutdown, how long in-flight requests get to finish after the drain.
    pub grace_period: StdDuration,
    /// Requests in flight allowed; past it the edge is answered 503 at once.
    pub max_concurrent_requests: usize,
    /// Admin listener (`/live`, `/ready`, `/metrics`).
    pub admin_listen: Option<std::net::SocketAddr>,
    /// One info line per request on the `sluice::access` target.
    pub access_log: bool,
    /// Log format (`--log-format` overrides it); read at start only.
    pub log_format: super::LogFormat,
    /// Async worker threads; read at start only.
    pub workers: usize,
    /// Plugins by name, in file order.
    pub plugins: Vec<PluginConfig>,
    /// Chain run for every request, before the rule's own chain.
    pub global_plugins: Vec<String>,
    /// Audit sinks.
    pub audit: AuditConfig,
    /// Where plugins' key-value namespaces live: `None` in this process, or a Redis URL
    /// (`[kv] redis`) that connectors sharing it share them through.
    pub kv_redis: Option<String>,
    /// How request paths are normalised before matching and proxying.
    pub paths: PathPolicy,
    /// A request body (from the edge) or response body (from the origin) that moves no data
    /// for this long is aborted.
    pub body_idle_timeout: StdDuration,
    /// Services the edge's public ports are bound to (`[[service]]`).
    pub services: Vec<ServiceConfig>,
    /// TCP sessions and UDP flows open at once (public ports and `sluice access` alike);
    /// separate from `max-concurrent-requests`.
    pub max_sessions: usize,
    /// A TCP session that moves no byte either way for this long is closed.
    pub session_idle_timeout: StdDuration,
    /// A UDP flow that carries no datagram either way for this long is closed.
    pub udp_idle_timeout: StdDuration,
}

/// Default `max-sessions`.
pub const DEFAULT_MAX_SESSIONS: usize = 1024;
/// Default `session-idle-timeout` (long: an interactive shell may sit quiet for a while).
pub const DEFAULT_SESSION_IDLE_TIMEOUT: StdDuration = StdDuration::from_secs(3600);
/// Default `udp-idle-timeout`.
pub const DEFAULT_UDP_IDLE_TIMEOUT: StdDuration = StdDuration::from_secs(60);

/// A named TCP or UDP service, reached through a public port of the edge.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The name `[[tunnel.port]] service` refers to.
    pub name: String,
    /// [`OriginTarget::Tcp`] or [`OriginTarget::Udp`].
    pub target: OriginTarget,
    /// Send a PROXY protocol v2 header with the client's address before the first byte.
    pub proxy_protocol: bool,
    /// Time to establish the TCP connection.
    pub connect_timeout: StdDuration,
}

/// Default `max-concurrent-requests` of the connector.
pub const DEFAULT_MAX_CONCURRENT: usize = 1000;

/// Exponential back-off with full jitter between reconnects.
#[derive(Debug, Clone, Copy)]
pub struct BackoffConfig {
    /// First delay.
    pub initial: StdDuration,
    /// Largest delay.
    pub max: StdDuration,
    /// A connection that lived this long resets the back-off.
    pub stable: StdDuration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: StdDuration::from_millis(100),
            max: StdDuration::from_secs(30),
            stable: StdDuration::from_secs(60),
        }
    }
}

/// Default `health.interval` of a pool.
pub const DEFAULT_HEALTH_INTERVAL: StdDuration = StdDuration::from_secs(5);
/// Default `health.timeout` of a pool.
pub const DEFAULT_HEALTH_TIMEOUT: StdDuration = StdDuration::from_secs(2);
/// Default `eject-after` of a pool.
pub const DEFAULT_EJECT_AFTER: u32 = 3;
/// Default `eject-for` of a pool.
pub const DEFAULT_EJECT_FOR: StdDuration = StdDuration::from_secs(30);

/// An origin pool (`[[pool]]`): requests spread over several HTTP origins, the unhealthy ones
/// left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Name used by ingress rules and plugins, like an origin's.
    pub name: String,
    /// The members: names of `[[origin]]`s.
    pub members: Vec<String>,
    /// How a member is chosen.
    pub balance: Balance,
    /// Active health checks, if any.
    pub health: Option<HealthCheck>,
    /// Consecutive failed requests (no answer from the member) that take it out…
    pub eject_after: u32,
    /// …for this long (or until its health check passes again, with health checks).
    pub eject_for: StdDuration,
}

/// How a pool chooses a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    /// In turn.
    RoundRobin,
    /// The one with the fewest requests in flight.
    LeastRequests,
    /// By a key of the request, consistently (rendezvous hashing): a key stays on its member
    /// while that member is healthy. Requests without the key go round-robin.
    Hash(HashKey),
}

/// What a `hash` pool hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header (lowercase name).
    Header(String),
    /// A cookie.
    Cookie(String),
}

/// A pool's active health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// What is checked.
    pub probe: Probe,
    /// Time between two checks of a member.
    pub interval: StdDuration,
    /// Time a check may take.
    pub timeout: StdDuration,
    /// Consecutive passed checks that bring a member back.
    pub healthy_threshold: u32,
    /// Consecutive failed checks that take it out.
    pub unhealthy_threshold: u32,
}

/// A health check's probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET` of this path; any status below 500 passes.
    Http(String),
    /// A TCP (or unix socket) connection.
    Connect,
}

/// A named origin.
#[derive(Debug, Clone)]
pub struct OriginConfig {
    /// Name used by ingress rules (and plugins).
    pub name: String,
    /// Where requests go.
    pub target: OriginTarget,
    /// Time to establish the TCP (and TLS) connection.
    pub connect_timeout: StdDuration,
    /// Time from sending the request to receiving the response head.
    pub request_timeout: StdDuration,
    /// Host header sent to the origin instead of the client's (which goes in `x-forwarded-host`).
    pub host_header: Option<String>,
    /// Extra CA certificates for an `https://` origin.
    pub ca: Vec<CertificateDer<'static>>,
    /// Name verified in the origin's certificate instead of the URL's host.
    pub server_name: Option<String>,
    /// Skip verification of the origin's certificate. Dangerous.
    pub danger_accept_invalid_certs: bool,
    /// Idle keep-alive connections are closed after this long.
    pub pool_idle_timeout: StdDuration,
    /// Idle keep-alive connections kept per origin.
    pub pool_max_idle: usize,
    /// HTTP/2 to the origin: offered by ALPN to an `https://` (or `unix+tls:`) origin, which
    /// may still choose HTTP/1.1; spoken with prior knowledge (h2c) to an `http://` or
    /// `unix:` one (`h2c://host:port` sets it).
    pub http2: bool,
    /// Certificate and key presented to an origin that asks for one (mTLS).
    pub client_identity: Option<super::TlsIdentity>,
    /// A PROXY protocol header with the client's address opens each connection (which then
    /// carries that client's requests only).
    pub proxy_protocol: Option<ProxyVersion>,
}

/// The PROXY protocol version an origin reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text form.
    V1,
    /// The binary form.
    V2,
}

impl OriginConfig {
    /// An origin with default timeouts and pool settings.
    pub fn new(name: impl Into<String>, target: OriginTarget) -> Self {
        OriginConfig {
            name: name.into(),
            target,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            host_header: None,
            ca: Vec::new(),
            server_name: None,
            danger_accept_invalid_certs: false,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            pool_max_idle: DEFAULT_POOL_MAX_IDLE,
            http2: false,
            client_identity: None,
            proxy_protocol: None,
        }
    }
}

/// What an origin is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginTarget {
    /// An HTTP or HTTPS server (scheme and authority only).
    Http(http::Uri),
    /// Built-in: echoes the request as JSON.
    Hello,
    /// Built-in: answers with this status.
    Status(u16),
    /// A TCP service (`tcp://host:port`, `ssh://host[:22]`, `rdp://host[:3389]`): a session
    /// carries raw bytes both ways. Reached through an ingress rule by `sluice access tcp`,
    /// or through a public port of the edge as a `[[service]]`.
    Tcp(SocketTarget),
    /// A UDP service (`udp://host:port`), for `[[service]]` blocks (public UDP ports).
    Udp(SocketTarget),
    /// An HTTP server on a unix socket (`unix:/path/to.sock`), over TLS with
    /// `unix+tls:/path/to.sock`.
    Unix {
        /// The socket's path.
        path: PathBuf,
        /// TLS on the socket.
        tls: bool,
    },
}

/// The address of a TCP or UDP origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketTarget {
    /// Host name or IP address.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl std::fmt::Display for SocketTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Schemes of socket origins, the protocol they use and their default port.
const SOCKET_SCHEMES: [(&str, crate::proto::SessionProtocol, Option<u16>); 4] = [
    ("tcp", crate::proto::SessionProtocol::Tcp, None),
    ("ssh", crate::proto::SessionProtocol::Tcp, Some(22)),
    ("rdp", crate::proto::SessionProtocol::Tcp, Some(3389)),
    ("udp", crate::proto::SessionProtocol::Udp, None),
];

impl OriginTarget {
    /// Parses `tcp://host:port` (`ssh://` and `rdp://` with default ports) and
    /// `udp://host:port`; `None` for any other scheme.
    fn parse_socket(s: &str) -> Option<Result<Self, String>> {
        let (scheme, rest) = s.split_once("://")?;
        let (_, protocol, default_port) = SOCKET_SCHEMES.iter().find(|(n, ..)| *n == scheme)?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let parsed = match default_port {
            Some(port) if !rest.ends_with(']') && rest.rsplit_once(':').is_none() => {
                Ok((rest.to_string(), *port))
            }
            Some(port) if rest.starts_with('[') && rest.ends_with(']') => {
                Ok((rest[1..rest.len() - 1].to_string(), *port))
            }
            _ => split_host_port(rest),
        };
        Some(match parsed {
            Ok((host, port)) if !host.is_empty() && port != 0 && !host.contains('/') => {
                let target = SocketTarget { host, port };
                Ok(match protocol {
                    crate::proto::SessionProtocol::Tcp => OriginTarget::Tcp(target),
                    crate::proto::SessionProtocol::Udp => OriginTarget::Udp(target),
                })
            }
            Ok(_) => Err(format!(
                "invalid origin {s:?}: expected {scheme}://host:port"
            )),
            Err(e) => Err(format!("invalid origin {s:?}: {e}")),
        })
    }
}

impl OriginTarget {
    /// Parses `http://…`, `https://…`, `h2c://…` (an `http://` origin spoken to in HTTP/2;
    /// see [`OriginConfig::http2`]), `unix:/path`, `unix+tls:/path`, `tcp://…` (`ssh://`,
    /// `rdp://`), `udp://…`, `hello` or `status:NNN`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(socket) = Self::parse_socket(s) {
            return socket;
        }
        for (prefix, tls) in [("unix:", false), ("unix+tls:", true)] {
            if let Some(path) = s.strip_prefix(prefix) {
                let path = path.strip_prefix("//").unwrap_or(path);
                if !path.starts_with('/') {
                    return Err(format!(
                        "invalid origin {s:?}: expected {prefix}/absolute/path/to.sock"
                    ));
                }
                return Ok(OriginTarget::Unix {
                    path: PathBuf::from(path),
                    tls,
                });
            }
        }
        if let Some(rest) = s.strip_prefix("h2c://") {
            return Self::parse(&format!("http://{rest}"));
        }
        if s == "hello" {
            return Ok(OriginTarget::Hello);
        }
        if let Some(code) = s.strip_prefix("status:") {
            return match code.parse::<u16>() {
                Ok(c) if (200..=599).contains(&c) => Ok(OriginTarget::Status(c)),
                _ => Err(format!(
                    "invalid built-in origin {s:?}: status must be 200..=599"
                )),
            };
        }
        let uri: http::Uri = s
            .parse()
            .map_err(|e| format!("invalid origin URL {s:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(format!(
                "invalid origin {s:?}: expected http://…, https://…, h2c://…, unix:/…, unix+tls:/…, tcp://…, ssh://…, rdp://…, udp://…, \"hello\" or \"status:NNN\""
            ))
            }
        }
        if uri.host().is_none() {
            return Err(format!("invalid origin URL {s:?}: no host"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "invalid origin URL {s:?}: give only scheme, host and port"
            ));
        }
        Ok(OriginTarget::Http(uri))
    }
}

/// An ingress rule.
#[derive(Debug, Clone)]
pub struct IngressRuleConfig {
    /// Host pattern, or any host.
    pub hostname: Option<HostPattern>,
    /// Regex matched against the normalised path, or any path.
    pub path: Option<regex::Regex>,
    /// Origin name.
    pub origin: String,
    /// Plugin chain of this rule (after the global chain).
    pub plugins: Vec<String>,
}

impl ConnectorConfig {
    /// Digest of what decides how a request is answered: the path policy, the ingress rules
    /// (host, path, plugins, and the origin with all its settings), the services of public
    /// ports, the global chain, and
    /// each plugin's component bytes, configuration and failure policy. Replicas of one tunnel should have
    /// the same; the edge reports those that do not. `sha256:` and 16 hexadecimal digits.
    pub fn routing_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut field = |s: &[u8]| {
            h.update((s.len() as u64).to_be_bytes());
            h.update(s);
        };
        field(format!("{:?}", self.paths).as_bytes());
        for rule in &self.ingress {
            field(b"rule");
            field(
                rule.hostname
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_default()
                    .as_bytes(),
            );
            field(rule.path.as_ref().map_or("", |r| r.as_str()).as_bytes());
            field(rule.origin.as_bytes());
            let origin = self.origins.iter().find(|o| o.name == rule.origin);
            field(format!("{origin:?}").as_bytes());
            if let Some(pool) = self.pools.iter().find(|p| p.name == rule.origin) {
                field(format!("{pool:?}").as_bytes());
                for m in &pool.members {
                    let member = self.origins.iter().find(|o| o.name == *m);
                    field(format!("{member:?}").as_bytes());
                }
            }
            for p in &rule.plugins {
                field(p.as_bytes());
            }
        }
        for service in &self.services {
            field(b"service");
            field(format!("{service:?}").as_bytes());
        }
        field(b"global");
        for p in &self.global_plugins {
            field(p.as_bytes());
        }
        for p in &self.plugins {
            field(b"plugin");
            field(p.name.as_bytes());
            match std::fs::read(&p.path) {
                Ok(bytes) => field(&Sha256::digest(&bytes)),
                Err(e) => field(e.kind().to_string().as_bytes()),
            }
            field(&p.config_json);
            field(format!("{:?}", p.on_error).as_bytes());
        }
        format!("sha256:{}", hex::encode(&h.finalize()[..8]))
    }

    /// A config with defaults, one `hello` catch-all and no edges.
    pub fn new(tunnel: impl Into<String>, token: Secret) -> Self {
        ConnectorConfig {
            tunnel: tunnel.into(),
            token,
            connector_id: default_connector_id(),
            edges: Vec::new(),
            ha_connections: DEFAULT_HA_CONNECTIONS,
            protocol: Default::default(),
            edge_ca: Vec::new(),
            edge_server_name: None,
            origins: vec![OriginConfig::new("hello", OriginTarget::Hello)],
            pools: Vec::new(),
            ingress: vec![IngressRuleConfig {
                hostname: None,
                path: None,
                origin: "hello".into(),
                plugins: Vec::new(),
            }],
            backoff: BackoffConfig::default(),
            grace_period: DEFAULT_GRACE_PERIOD,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT,
            admin_listen: None,
            access_log: true,
            log_format: Default::default(),
            workers: super::default_workers(),
            plugins: Vec::new(),
            global_plugins: Vec::new(),
            audit: AuditConfig::default(),
            kv_redis: None,
            paths: PathPolicy::default(),
            body_idle_timeout: super::edge::DEFAULT_BODY_IDLE_TIMEOUT,
            services: Vec::new(),
            max_sessions: DEFAULT_MAX_SESSIONS,
            session_idle_timeout: DEFAULT_SESSION_IDLE_TIMEOUT,
            udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
        }
    }

    /// Reads and validates a connector file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = super::read(path)?;
        Self::parse(&text, path)
    }

    /// Plugin instances this configuration may need at once: every plugin can have one
    /// instance per request in flight, plus its idle pooled ones.
    pub fn plugin_instances(&self) -> usize {
        self.plugins.len() * (self.max_concurrent_requests + crate::plugin::MAX_IDLE)
    }

    /// Validates the text of a connector file; `path` is used for errors and relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let src = Source::new(path, text);
        let file: ConnectorFile = src.deserialize()?;

        if file.tunnel.is_empty() {
            return Err(src.error(None, "tunnel", "tunnel id must not be empty"));
        }
        let token = file.token(&src).map_err(|m| src.error(None, "token", m))?;
        if file.edges.is_empty() {
            return Err(src.error(None, "edges", "list at least one edge address (host:port)"));
        }
        for (i, e) in file.edges.iter().enumerate() {
            split_host_port(e).map_err(|m| src.error(None, format!("edges[{i}]"), m))?;
        }
        if file.max_concurrent_requests == Some(0) {
            return Err(src.error(None, "max-concurrent-requests", "must be at least 1"));
        }
        let ha_connections = file.ha_connections.unwrap_or(DEFAULT_HA_CONNECTIONS);
        if !(1..=16).contains(&ha_connections) {
            return Err(src.error(None, "ha-connections", "must be between 1 and 16"));
        }
        let edge_ca = match &file.edge_ca {
            Some(p) => read_certs(&src.resolve(p)).map_err(|m| src.error(None, "edge-ca", m))?,
            None => Vec::new(),
        };

        let (mut origins, mut names) = file.origins(&src)?;
        let (plugins, plugin_names) = file.plugins(&src, &origins)?;
        let audit = match &file.audit {
            Some(a) => AuditConfig {
                stdout: a.stdout,
                file: a.file.as_ref().map(|f| src.resolve(f)),
                queue: a.queue.unwrap_or(super::plugin::DEFAULT_AUDIT_QUEUE).max(1),
            },
            None => AuditConfig::default(),
        };

        let kv_at = file.kv.as_ref().map(|kv| kv.span().start);
        let kv_redis = match file.kv.as_ref().and_then(|kv| kv.get_ref().redis.clone()) {
            Some(url) => {
                if !(url.starts_with("redis://") || url.starts_with("redis+unix://")) {
                    return Err(src.error(
                        kv_at,
                        "kv.redis",
                        "use redis://host:port[/db] or redis+unix:///path (TLS to Redis is not supported)",
                    ));
                }
                if let Err(e) = redis::Client::open(url.as_str()) {
                    return Err(src.error(kv_at, "kv.redis", format!("not a Redis URL: {e}")));
                }
                Some(url)
            }
            None => None,
        };

        let mut pools = Vec::new();
        for (i, entry) in file.pool.iter().enumerate() {
            let at = Some(entry.span().start);
            let pool = entry
                .get_ref()
                .validate(&origins)
                .map_err(|(field, m)| src.error(at, format!("pool[{i}].{field}"), m))?;
            if pools.iter().any(|p: &PoolConfig| p.name == pool.name) {
                return Err(src.error(
                    at,
                    format!("pool[{i}].name"),
                    format!("duplicate pool name {:?}", pool.name),
                ));
            }
            pools.push(pool);
        }
        let pool_names: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
        let ingress = file.ingress(&src, &mut origins, &mut names, &plugin_names, &pool_names)?;
        let services = file.services(&src)?;
        for (key, value) in [
            ("max-sessions", file.max_sessions),
            ("max-concurrent-requests", file.max_concurrent_requests),
            ("workers", file.workers),
        ] {
            if value == Some(0) {
                return Err(src.error(None, key, "must be at least 1"));
            }
        }

        let config = ConnectorConfig {
            tunnel: file.tunnel,
            token,
            connector_id: file.connector_id.unwrap_or_else(default_connector_id),
            edges: file.edges,
            ha_connections,
            protocol: file.protocol.unwrap_or_default(),
            edge_ca,
            edge_server_name: file.edge_server_name,
            origins,
            pools,
            ingress,
            backoff: BackoffConfig::default(),
            grace_period: file.grace_period.map_or(DEFAULT_GRACE_PERIOD, |d| d.0),
            max_concurrent_requests: file
                .max_concurrent_requests
                .unwrap_or(DEFAULT_MAX_CONCURRENT),
            admin_listen: file.admin.map(|a| a.listen),
            access_log: file.access_log.unwrap_or(true),
            log_format: file.log_format.unwrap_or_default(),
            workers: file.workers.unwrap_or_else(super::default_workers),
            plugins,
            global_plugins: file.plugins,
            audit,
            kv_redis,
            paths: file.paths.map(PathsFile::policy).unwrap_or_default(),
            body_idle_timeout: file
                .body_idle_timeout
                .map_or(super::edge::DEFAULT_BODY_IDLE_TIMEOUT, |d| d.0),
            services,
            max_sessions: file.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS),
            session_idle_timeout: file
                .session_idle_timeout
                .map_or(DEFAULT_SESSION_IDLE_TIMEOUT, |d| d.0),
            udp_idle_timeout: file
                .udp_idle_timeout
                .map_or(DEFAULT_UDP_IDLE_TIMEOUT, |d| d.0),
        };
        let max = crate::plugin::runtime::MAX_INSTANCES;
        if config.plugin_instances() > max {
            return Err(src.error(
                None,
                "max-concurrent-requests",
                format!(
                    "{} plugins with max-concurrent-requests = {} need {} plugin instances, more than the {max} a connector can hold; lower max-concurrent-requests or load fewer plugins",
                    config.plugins.len(),
                    config.max_concurrent_requests,
                    config.plugin_instances()
                ),
            ));
        }
        Ok(config)
    }
}

/// Splits `host:port`, accepting `[v6]:port`.
pub fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("invalid edge address {s:?}: expected host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("invalid edge address {s:?}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("invalid edge address {s:?}: no host"));
    }
    Ok((host.to_string(), port))
}

fn default_connector_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host = if host.is_empty() {
        "connector".to_string()
    } else {
        host
    };
    format!("{host}-{}", std::process::id())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ConnectorFile {
    tunnel: String,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    token_env: Option<String>,
    connector_id: Option<String>,
    edges: Vec<String>,
    ha_connections: Option<u32>,
    protocol: Option<super::TransportChoice>,
    edge_ca: Option<PathBuf>,
    edge_server_name: Option<String>,
    grace_period: Option<Duration>,
    max_concurrent_requests: Option<usize>,
    body_idle_timeout: Option<Duration>,
    access_log: Option<bool>,
    log_format: Option<super::LogFormat>,
    workers: Option<usize>,
    admin: Option<super::AdminFile>,
    #[serde(default)]
    plugins: Vec<String>,
    audit: Option<super::plugin::AuditFile>,
    kv: Option<Spanned<KvFile>>,
    #[serde(default)]
    plugin: Vec<Spanned<super::plugin::PluginFile>>,
    #[serde(default)]
    origin: Vec<Spanned<OriginFile>>,
    #[serde(default)]
    pool: Vec<Spanned<PoolFile>>,
    #[serde(default)]
    ingress: Vec<Spanned<IngressFile>>,
    paths: Option<PathsFile>,
    #[serde(default)]
    service: Vec<Spanned<ServiceFile>>,
    max_sessions: Option<usize>,
    session_idle_timeout: Option<Duration>,
    udp_idle_timeout: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PoolFile {
    name: String,
    members: Vec<String>,
    balance: Option<String>,
    hash_on: Option<String>,
    health: Option<HealthFile>,
    eject_after: Option<u32>,
    eject_for: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct HealthFile {
    path: Option<String>,
    #[serde(default)]
    tcp: bool,
    interval: Option<Duration>,
    timeout: Option<Duration>,
    healthy_threshold: Option<u32>,
    unhealthy_threshold: Option<u32>,
}

impl PoolFile {
    /// Validates one `[[pool]]` against the origins; errors are (key suffix, message).
    fn validate(&self, origins: &[OriginConfig]) -> Result<PoolConfig, (String, String)> {
        if origins.iter().any(|o| o.name == self.name) {
            return Err((
                "name".into(),
                format!("{:?} is already an origin's name", self.name),
            ));
        }
        if self.members.is_empty() {
            return Err(("members".into(), "a pool needs at least one member".into()));
        }
        for (i, m) in self.members.iter().enumerate() {
            let http = origins.iter().any(|o| {
                o.name == *m
                    && matches!(o.target, OriginTarget::Http(_) | OriginTarget::Unix { .. })
            });
            if !http {
                return Err((
                    format!("members[{i}]"),
                    format!("no HTTP [[origin]] named {m:?} (members are http://, https://, h2c:// or unix: origins)"),
                ));
            }
            if self.members[..i].contains(m) {
                return Err((format!("members[{i}]"), format!("{m:?} is listed twice")));
            }
        }
        // A request's headers are set for the member it is sent to first; a retry on another
        // must not need other ones.
        let host_of = |m: &String| {
            origins
                .iter()
                .find(|o| o.name == *m)
                .and_then(|o| o.host_header.clone())
        };
        if let Some(i) = (1..self.members.len())
            .find(|&i| host_of(&self.members[i]) != host_of(&self.members[0]))
        {
            return Err((
                format!("members[{i}]"),
                format!(
                    "{:?} has another host-header than {:?}: the members of a pool share theirs",
                    self.members[i], self.members[0]
                ),
            ));
        }
        let balance = match (self.balance.as_deref(), &self.hash_on) {
            (None | Some("round-robin"), None) => Balance::RoundRobin,
            (Some("least-requests"), None) => Balance::LeastRequests,
            (Some("hash"), Some(on)) => Balance::Hash(match on.split_once(':') {
                Some(("header", h)) if http::HeaderName::from_bytes(h.as_bytes()).is_ok() => {
                    HashKey::Header(h.to_ascii_lowercase())
                }
                Some(("cookie", c)) if !c.is_empty() => HashKey::Cookie(c.to_string()),
                _ => {
                    return Err((
                        "hash-on".into(),
                        format!("{on:?}: use \"header:NAME\" or \"cookie:NAME\""),
                    ))
                }
            }),
            (Some("hash"), None) => {
                return Err((
                    "hash-on".into(),
                    "balance = \"hash\" needs hash-on = \"header:NAME\" or \"cookie:NAME\"".into(),
                ))
            }
            (None | Some("round-robin" | "least-requests"), Some(_)) => {
                return Err((
                    "hash-on".into(),
                    "applies to balance = \"hash\" only".into(),
                ))
            }
            (Some(other), _) => {
                return Err((
                    "balance".into(),
                    format!("{other:?}: use \"round-robin\", \"least-requests\" or \"hash\""),
                ))
            }
        };
        let health = match &self.health {
            None => None,
            Some(h) => Some(HealthCheck {
                probe: match (&h.path, h.tcp) {
                    (Some(p), false) if p.starts_with('/') => Probe::Http(p.clone()),
                    (None, true) => Probe::Connect,
                    (Some(_), false) => {
                        return Err(("health.path".into(), "must start with /".into()))
                    }
                    _ => {
                        return Err((
                            "health".into(),
                            "give either path = \"/healthz\" (an HTTP check) or tcp = true (a connection)".into(),
                        ))
                    }
                },
                interval: h.interval.map_or(DEFAULT_HEALTH_INTERVAL, |d| d.0),
                timeout: h.timeout.map_or(DEFAULT_HEALTH_TIMEOUT, |d| d.0),
                healthy_threshold: h.healthy_threshold.unwrap_or(2).max(1),
                unhealthy_threshold: h.unhealthy_threshold.unwrap_or(2).max(1),
            }),
        };
        if health
            .as_ref()
            .is_some_and(|h| h.interval.is_zero() || h.timeout.is_zero())
        {
            return Err((
                "health".into(),
                "interval and timeout must be above 0".into(),
            ));
        }
        Ok(PoolConfig {
            name: self.name.clone(),
            members: self.members.clone(),
            balance,
            health,
            eject_after: self.eject_after.unwrap_or(DEFAULT_EJECT_AFTER).max(1),
            eject_for: self.eject_for.map_or(DEFAULT_EJECT_FOR, |d| d.0),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ServiceFile {
    name: String,
    origin: String,
    proxy_protocol: Option<bool>,
    connect_timeout: Option<Duration>,
}

/// `[paths]`: the path policy.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PathsFile {
    ambiguous: Option<AmbiguousFile>,
    merge_slashes: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum AmbiguousFile {
    Reject,
    Normalize,
}

impl PathsFile {
    fn policy(self) -> PathPolicy {
        let default = PathPolicy::default();
        PathPolicy {
            ambiguous: match self.ambiguous {
                None => default.ambiguous,
                Some(AmbiguousFile::Reject) => Ambiguous::Reject,
                Some(AmbiguousFile::Normalize) => Ambiguous::Normalize,
            },
            merge_slashes: self.merge_slashes.unwrap_or(default.merge_slashes),
        }
    }
}

impl ConnectorFile {
    /// The `[[origin]]` blocks, and their index by name.
    fn origins(
        &self,
        src: &Source,
    ) -> Result<(Vec<OriginConfig>, HashMap<String, usize>), ConfigError> {
        let mut origins = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, entry) in self.origin.iter().enumerate() {
            let at = Some(entry.span().start);
            let o = entry.get_ref();
            let key = format!("origin[{i}]");
            if o.name.is_empty() {
                return Err(src.error(at, format!("{key}.name"), "origin name must not be empty"));
            }
            if let Some(prev) = names.insert(o.name.clone(), i) {
                return Err(src.error(
                    at,
                    format!("{key}.name"),
                    format!("duplicate origin name {:?} (also origin[{prev}])", o.name),
                ));
            }
            let target =
                OriginTarget::parse(&o.url).map_err(|m| src.error(at, format!("{key}.url"), m))?;
            let ca = match &o.ca {
                Some(p) => read_certs(&src.resolve(p))
                    .map_err(|m| src.error(at, format!("{key}.ca"), m))?,
                None => Vec::new(),
            };
            if let Some(h) = &o.host_header {
                http::HeaderValue::from_str(h).map_err(|_| {
                    src.error(
                        at,
                        format!("{key}.host-header"),
                        format!("invalid host header {h:?}"),
                    )
                })?;
            }
            let mut cfg = OriginConfig::new(o.name.clone(), target);
            cfg.connect_timeout = o.connect_timeout.map_or(cfg.connect_timeout, |d| d.0);
            cfg.request_timeout = o.request_timeout.map_or(cfg.request_timeout, |d| d.0);
            cfg.host_header = o.host_header.clone();
            cfg.ca = ca;
            cfg.server_name = o.server_name.clone();
            cfg.danger_accept_invalid_certs = o.danger_accept_invalid_certs.unwrap_or(false);
            cfg.pool_idle_timeout = o.pool_idle_timeout.map_or(cfg.pool_idle_timeout, |d| d.0);
            cfg.pool_max_idle = o.pool_max_idle.unwrap_or(cfg.pool_max_idle);
            cfg.http2 = o.http2.unwrap_or(false) || o.url.starts_with("h2c://");
            cfg.client_identity = match (&o.client_cert, &o.client_key) {
                (Some(cert), Some(key_file)) => Some(
                    super::TlsIdentity::from_pem_files(&src.resolve(cert), &src.resolve(key_file))
                        .map_err(|m| src.error(at, format!("{key}.client-cert"), m))?,
                ),
                (None, None) => None,
                _ => {
                    return Err(src.error(
                        at,
                        format!("{key}.client-cert"),
                        "client-cert and client-key go together",
                    ))
                }
            };
            cfg.proxy_protocol = o.proxy_protocol;
            if cfg.proxy_protocol.is_some() && cfg.http2 {
                return Err(src.error(
                    at,
                    format!("{key}.proxy-protocol"),
                    "PROXY protocol origins are spoken to in HTTP/1.1: drop http2 (or h2c://)",
                ));
            }
            if cfg.proxy_protocol.is_some()
                && !matches!(
                    cfg.target,
                    OriginTarget::Http(_) | OriginTarget::Unix { .. }
                )
            {
                return Err(src.error(
                    at,
                    format!("{key}.proxy-protocol"),
                    "applies to HTTP origins; a [[service]] has its own proxy-protocol",
                ));
            }
            let tls = matches!(&cfg.target, OriginTarget::Http(u) if u.scheme_str() == Some("https"))
                || matches!(cfg.target, OriginTarget::Unix { tls: true, .. });
            if cfg.client_identity.is_some() && !tls {
                return Err(src.error(
                    at,
                    format!("{key}.client-cert"),
                    "a client certificate needs a TLS origin (https:// or unix+tls:)",
                ));
            }
            origins.push(cfg);
        }

        Ok((origins, names))
    }

    /// The `[[plugin]]` blocks, and their index by name; checks the global chain.
    fn plugins(
        &self,
        src: &Source,
        origins: &[OriginConfig],
    ) -> Result<(Vec<PluginConfig>, HashMap<String, usize>), ConfigError> {
        let mut plugins = Vec::new();
        let mut plugin_names: HashMap<String, usize> = HashMap::new();
        for (i, entry) in self.plugin.iter().enumerate() {
            let at = Some(entry.span().start);
            let p = entry.get_ref();
            let mut cfg = p
                .validate(|path| src.resolve(path))
                .map_err(|(field, m)| src.error(at, format!("plugin[{i}].{field}"), m))?;
            for (j, name) in p.allow_origins.iter().enumerate() {
                let origin = origins
                    .iter()
                    .find(|o| o.name == *name && matches!(o.target, OriginTarget::Http(_)));
                match origin {
                    Some(o) => cfg.http.allow_origins.push(o.clone()),
                    None => {
                        return Err(src.error(
                            at,
                            format!("plugin[{i}].allow-origins[{j}]"),
                            format!("no http:// or https:// [[origin]] named {name:?}"),
                        ))
                    }
                }
            }
            let (line, _) = src.position(entry.span().start);
            cfg.defined_at = Some(format!("{}:{line} (plugin[{i}])", src.file.display()));
            if let Some(prev) = plugin_names.insert(cfg.name.clone(), i) {
                return Err(src.error(
                    at,
                    format!("plugin[{i}].name"),
                    format!("duplicate plugin name {:?} (also plugin[{prev}])", cfg.name),
                ));
            }
            plugins.push(cfg);
        }
        for (j, p) in self.plugins.iter().enumerate() {
            if !plugin_names.contains_key(p) {
                return Err(src.error(
                    None,
                    format!("plugins[{j}]"),
                    format!("unknown plugin {p:?}: define it in a [[plugin]] entry"),
                ));
            }
        }
        Ok((plugins, plugin_names))
    }

    /// The `[[ingress]]` rules. Built-in and socket origins named inline are added to
    /// `origins`.
    fn ingress(
        &self,
        src: &Source,
        origins: &mut Vec<OriginConfig>,
        names: &mut HashMap<String, usize>,
        plugin_names: &HashMap<String, usize>,
        pool_names: &[String],
    ) -> Result<Vec<IngressRuleConfig>, ConfigError> {
        if self.ingress.is_empty() {
            return Err(src.error(
                None,
                "ingress",
                "at least one [[ingress]] rule is required, the last one matching everything",
            ));
        }
        let mut ingress = Vec::new();
        let last = self.ingress.len() - 1;
        for (i, entry) in self.ingress.iter().enumerate() {
            let at = Some(entry.span().start);
            let r = entry.get_ref();
            let key = format!("ingress[{i}]");
            let path = match &r.path {
                Some(p) => Some(regex::Regex::new(p).map_err(|e| {
                    src.error(
                        at,
                        format!("{key}.path"),
                        format!("invalid path regex: {e}"),
                    )
                })?),
                None => None,
            };
            let catch_all = r.hostname.is_none() && path.is_none();
            if i == last && !catch_all {
                return Err(src.error(
                at,
                key,
                "the last ingress rule must match every request: give it no hostname and no path",
            ));
            }
            if i != last && catch_all {
                return Err(src.error(
                at,
                key,
                format!("this rule matches every request, so the rules after it (up to ingress[{last}]) would never apply"),
            ));
            }
            if !names.contains_key(&r.origin) && !pool_names.contains(&r.origin) {
                match OriginTarget::parse(&r.origin) {
                Ok(
                    target @ (OriginTarget::Hello
                    | OriginTarget::Status(_)
                    | OriginTarget::Tcp(_)),
                ) => {
                    names.insert(r.origin.clone(), origins.len());
                    origins.push(OriginConfig::new(r.origin.clone(), target));
                }
                Ok(OriginTarget::Udp(_)) => return Err(src.error(
                    at,
                    format!("{key}.origin"),
                    "a UDP origin is reached only through a public port of the edge: declare it in a [[service]] block",
                )),
                _ => {
                    return Err(src.error(
                        at,
                        format!("{key}.origin"),
                        format!(
                            "unknown origin {:?}: name an [[origin]], a built-in (\"hello\", \"status:NNN\") or a TCP service (tcp://host:port)",
                            r.origin
                        ),
                    ))
                }
            }
            }
            for (j, p) in r.plugins.iter().enumerate() {
                if !plugin_names.contains_key(p) {
                    return Err(src.error(
                        at,
                        format!("{key}.plugins[{j}]"),
                        format!("unknown plugin {p:?}: define it in a [[plugin]] entry"),
                    ));
                }
            }
            ingress.push(IngressRuleConfig {
                hostname: r.hostname.clone(),
                path,
                origin: r.origin.clone(),
                plugins: r.plugins.clone(),
            });
        }

        Ok(ingress)
    }

    /// The `[[service]]` blocks: names the edge's public ports are bound to.
    fn services(&self, src: &Source) -> Result<Vec<ServiceConfig>, ConfigError> {
        let mut services = Vec::new();
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, entry) in self.service.iter().enumerate() {
            let at = Some(entry.span().start);
            let f = entry.get_ref();
            let key = format!("service[{i}]");
            if f.name.is_empty() {
                return Err(src.error(at, format!("{key}.name"), "service name must not be empty"));
            }
            if let Some(prev) = names.insert(&f.name, i) {
                return Err(src.error(
                    at,
                    format!("{key}.name"),
                    format!("duplicate service name {:?} (also service[{prev}])", f.name),
                ));
            }
            let target = match OriginTarget::parse(&f.origin) {
                Ok(t @ (OriginTarget::Tcp(_) | OriginTarget::Udp(_))) => t,
                Ok(_) => return Err(src.error(
                    at,
                    format!("{key}.origin"),
                    "a service's origin is tcp://host:port (or ssh://, rdp://) or udp://host:port",
                )),
                Err(m) => return Err(src.error(at, format!("{key}.origin"), m)),
            };
            let proxy_protocol = f.proxy_protocol.unwrap_or(false);
            if proxy_protocol && matches!(target, OriginTarget::Udp(_)) {
                return Err(src.error(
                    at,
                    format!("{key}.proxy-protocol"),
                    "PROXY protocol is sent to TCP services only",
                ));
            }
            services.push(ServiceConfig {
                name: f.name.clone(),
                target,
                proxy_protocol,
                connect_timeout: f.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
            });
        }
        Ok(services)
    }

    fn token(&self, src: &Source) -> Result<Secret, String> {
        let token = match (&self.token, &self.token_file, &self.token_env) {
            (Some(t), None, None) => t.clone(),
            (None, Some(file), None) => {
                let path = src.resolve(file);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read token-file {}: {e}", path.display()))?;
                Secret::new(text.trim())
            }
            (None, None, Some(var)) => {
                let value = std::env::var(var)
                    .map_err(|_| format!("token-env names ${var}, which is not set"))?;
                Secret::new(value.trim())
            }
            (None, None, None) => return Err("set one of token, token-file or token-env".into()),
            _ => return Err("set only one of token, token-file or token-env".into()),
        };
        if token.expose().is_empty() {
            return Err("the token is empty".into());
        }
        Ok(token)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct OriginFile {
    name: String,
    url: String,
    connect_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
    host_header: Option<String>,
    ca: Option<PathBuf>,
    server_name: Option<String>,
    danger_accept_invalid_certs: Option<bool>,
    pool_idle_timeout: Option<Duration>,
    pool_max_idle: Option<usize>,
    http2: Option<bool>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    proxy_protocol: Option<ProxyVersion>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct IngressFile {
    hostname: Option<HostPattern>,
    path: Option<String>,
    origin: String,
    #[serde(default)]
    plugins: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(host: &str, port: u16) -> SocketTarget {
        SocketTarget {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn socket_origins_parse_with_their_default_ports() {
        let parse = |s: &str| OriginTarget::parse(s);
        assert_eq!(
            parse("tcp://db.internal:5432"),
            Ok(OriginTarget::Tcp(socket("db.internal", 5432)))
        );
        assert_eq!(
            parse("ssh://10.0.0.5"),
            Ok(OriginTarget::Tcp(socket("10.0.0.5", 22)))
        );
        assert_eq!(
            parse("ssh://10.0.0.5:2200/"),
            Ok(OriginTarget::Tcp(socket("10.0.0.5", 2200)))
        );
        assert_eq!(
            parse("rdp://[2001:db8::5]"),
            Ok(OriginTarget::Tcp(socket("2001:db8::5", 3389)))
        );
        assert_eq!(
            parse("udp://[::1]:53"),
            Ok(OriginTarget::Udp(socket("::1", 53)))
        );
        assert_eq!(socket("::1", 53).to_string(), "[::1]:53");
        for bad in [
            "tcp://db.internal",
            "tcp://:5432",
            "udp://host:0",
            "tcp://host:5432/path",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}

/// The `[kv]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct KvFile {
    redis: Option<String>,
}
