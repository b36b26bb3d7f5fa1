//! The edge's configuration file and its validated form.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{ByteSize, ConfigError, Duration, HostPattern, Source, TlsIdentity};
use crate::secret::Secret;

/// Validated edge configuration.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// This edge's name, sent to connectors and used in logs.
    pub edge_id: String,
    /// Plain HTTP/1.1 listener for clients.
    pub http_listen: Option<SocketAddr>,
    /// HTTPS listener for clients (HTTP/1.1 and HTTP/2 by ALPN).
    pub https: Option<HttpsConfig>,
    /// QUIC listener for connectors.
    pub quic_listen: SocketAddr,
    /// Certificate the QUIC listener presents to connectors (and the TCP listener, when
    /// there is one).
    pub quic_identity: TlsIdentity,
    /// TCP listener for connectors (HTTP/2 on TLS 1.3), for networks that block UDP. When it
    /// and `quic_listen` both ask for port 0, both get the same port number.
    pub tcp_listen: Option<SocketAddr>,
    /// How long a new connection may take to register.
    pub register_timeout: std::time::Duration,
    /// Tunnels this edge serves.
    pub tunnels: Vec<TunnelConfig>,
    /// Time a client has to send a complete request head.
    pub header_read_timeout: std::time::Duration,
    /// Largest request head accepted from a client, in bytes.
    pub max_header_size: usize,
    /// Keep `x-forwarded-for` from clients (only when a trusted proxy sits in front).
    pub trust_forwarded_for: bool,
    /// On shutdown, how long open client requests get to finish.
    pub grace_period: std::time::Duration,
    /// Admin listener (`/live`, `/ready`, `/metrics`, `/status`).
    pub admin_listen: Option<SocketAddr>,
    /// `/ready` fails while the connectors of a tunnel report different ingress digests (for
    /// longer than `replica_disagreement_grace`).
    pub require_consistent_replicas: bool,
    /// How long replicas may disagree before `require_consistent_replicas` fails `/ready`.
    pub replica_disagreement_grace: std::time::Duration,
    /// One info line per request on the `sluice::access` target.
    pub access_log: bool,
    /// Log format (`--log-format` overrides it); read at start only.
    pub log_format: super::LogFormat,
    /// Async worker threads; read at start only.
    pub workers: usize,
    /// `Upgrade` protocols relayed to connectors (lowercase); others are dropped from the
    /// request, which then goes on as a plain request.
    pub allowed_upgrades: Vec<String>,
    /// A client connection with no request in flight for this long is closed (HTTP/1.1
    /// keep-alive and HTTP/2 alike).
    pub idle_timeout: std::time::Duration,
    /// A request or response body that moves no data for this long is aborted.
    pub body_idle_timeout: std::time::Duration,
    /// Client connections open at once from one IP address; more are closed at accept.
    pub max_connections_per_client: usize,
    /// Connector connections handshaking or registering at once; more are refused.
    pub max_handshakes: usize,
}

/// Default `idle-timeout`.
pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Default `body-idle-timeout`, on both roles.
pub const DEFAULT_BODY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Default `max-connections-per-client`.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 256;
/// Default `[admin] replica-disagreement-grace`.
pub const DEFAULT_REPLICA_DISAGREEMENT_GRACE: std::time::Duration =
    std::time::Duration::from_secs(30);
/// Default `[connectors] max-handshakes`.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;

/// The HTTPS listener.
#[derive(Debug, Clone)]
pub struct HttpsConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Certificate presented to clients.
    pub identity: TlsIdentity,
}

/// One tunnel as the edge knows it.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Tunnel id, sent by the connector at registration.
    pub id: String,
    /// SHA-256 of every token the tunnel accepts: usually one, two while a rotation overlaps
    /// the old token with the new one.
    pub token_hashes: Vec<[u8; 32]>,
    /// Public hostnames routed to this tunnel.
    pub hostnames: Vec<HostPattern>,
    /// Requests in flight allowed for this tunnel; past it clients get 503 at once.
    pub max_concurrent_requests: usize,
    /// Registered connector connections allowed for this tunnel; past it a registration is
    /// refused.
    pub max_connections: usize,
    /// Public TCP and UDP ports bound to the tunnel's services (`[[tunnel.port]]`).
    pub ports: Vec<PortConfig>,
}

/// A public port of a tunnel: TCP connections or UDP flows to it become sessions to one of the
/// tunnel's services.
#[derive(Debug, Clone, PartialEq)]
pub struct PortConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// TCP or UDP.
    pub protocol: crate::proto::SessionProtocol,
    /// The connector's `[[service]]` it leads to.
    pub service: String,
    /// Client networks allowed; empty: everyone. Others are closed at accept (TCP) or their
    /// datagrams dropped (UDP).
    pub allow: Vec<ipnet::IpNet>,
    /// Sessions (TCP) or flows (UDP) open at once on this port; more are refused.
    pub max_sessions: usize,
    /// A session or flow that moves nothing either way for this long is closed.
    pub idle_timeout: std::time::Duration,
}

/// Default `[[tunnel.port]] max-sessions`.
pub const DEFAULT_PORT_MAX_SESSIONS: usize = 1024;

impl PortConfig {
    /// Whether `ip` may use the port.
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip))
    }

    /// Whether this port and `other` would need the same socket.
    fn collides(&self, other: &PortConfig) -> bool {
        let (a, b) = (self.listen, other.listen);
        self.protocol == other.protocol
            && a.port() != 0
            && a.port() == b.port()
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    }
}

/// Default per-tunnel `max-connections`: 16 connectors at the default `ha-connections`.
pub const DEFAULT_TUNNEL_MAX_CONNECTIONS: usize = 32;

/// Default per-tunnel `max-concurrent-requests`.
pub const DEFAULT_TUNNEL_MAX_CONCURRENT: usize = 1000;

/// Default for `header-read-timeout`.
pub const DEFAULT_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Default for `max-header-size`.
pub const DEFAULT_MAX_HEADER_SIZE: usize = 64 * 1024;
/// Default for `register-timeout`.
pub const DEFAULT_REGISTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl EdgeConfig {
    /// A config with defaults: no client listener, no tunnels.
    pub fn new(quic_listen: SocketAddr, quic_identity: TlsIdentity) -> Self {
        EdgeConfig {
            edge_id: "edge".into(),
            http_listen: None,
            https: None,
            quic_listen,
            quic_identity,
            tcp_listen: None,
            register_timeout: DEFAULT_REGISTER_TIMEOUT,
            tunnels: Vec::new(),
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_header_size: DEFAULT_MAX_HEADER_SIZE,
            trust_forwarded_for: false,
            grace_period: super::connector::DEFAULT_GRACE_PERIOD,
            admin_listen: None,
            require_consistent_replicas: false,
            replica_disagreement_grace: DEFAULT_REPLICA_DISAGREEMENT_GRACE,
            access_log: true,
            log_format: Default::default(),
            workers: super::default_workers(),
            allowed_upgrades: default_upgrades(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
        }
    }

    /// Reads and validates an edge file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = super::read(path)?;
        Self::parse(&text, path)
    }

    /// Validates the text of an edge file; `path` is used for errors and relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let src = Source::new(path, text);
        let file: EdgeFile = src.deserialize()?;
        if file.max_header_size.is_some_and(|s| s.0 < 8192) {
            return Err(src.error(None, "max-header-size", "must be at least 8KiB"));
        }
        for (key, value) in [
            (
                "max-connections-per-client",
                file.max_connections_per_client,
            ),
            ("connectors.max-handshakes", file.connectors.max_handshakes),
            ("workers", file.workers),
        ] {
            if value == Some(0) {
                return Err(src.error(None, key, "must be at least 1"));
            }
        }
        if file.http.is_none() && file.https.is_none() {
            return Err(src.error(
                None,
                "http",
                "the edge needs an [http] or [https] listener for clients",
            ));
        }
        let mut tunnels = Vec::new();
        let mut ids: HashMap<String, usize> = HashMap::new();
        let mut hosts: HashMap<HostPattern, String> = HashMap::new();
        for (i, entry) in file.tunnel.iter().enumerate() {
            let at = Some(entry.span().start);
            let t = entry.get_ref();
            let key = format!("tunnel[{i}]");
            if t.id.is_empty() {
                return Err(src.error(at, format!("{key}.id"), "tunnel id must not be empty"));
            }
            if let Some(prev) = ids.insert(t.id.clone(), i) {
                return Err(src.error(
                    at,
                    format!("{key}.id"),
                    format!("duplicate tunnel id {:?} (also tunnel[{prev}])", t.id),
                ));
            }
            let token_hashes = t
                .token_hashes(&src)
                .map_err(|(field, m)| src.error(at, format!("{key}{field}"), m))?;
            if t.hostnames.is_empty() {
                return Err(src.error(
                    at,
                    format!("{key}.hostnames"),
                    "a tunnel needs at least one hostname",
                ));
            }
            for (j, h) in t.hostnames.iter().enumerate() {
                if let Some(other) = hosts.insert(h.get_ref().clone(), t.id.clone()) {
                    return Err(src.error(
                        Some(h.span().start),
                        format!("{key}.hostnames[{j}]"),
                        format!(
                            "hostname {} is already served by tunnel {other:?}",
                            h.get_ref()
                        ),
                    ));
                }
            }
            let mut ports = Vec::new();
            for (j, p) in t.port.iter().enumerate() {
                let at = Some(p.span().start);
                let port = p
                    .get_ref()
                    .validate()
                    .map_err(|(field, m)| src.error(at, format!("{key}.port[{j}].{field}"), m))?;
                let claimed = tunnels
                    .iter()
                    .flat_map(|o: &TunnelConfig| o.ports.iter().map(move |q| (&o.id, q)))
                    .chain(ports.iter().map(|q| (&t.id, q)))
                    .find(|(_, q)| q.collides(&port));
                if let Some((owner, _)) = claimed {
                    return Err(src.error(
                        at,
                        format!("{key}.port[{j}].listen"),
                        format!(
                            "{} port {} is already claimed by tunnel {owner:?}: a port belongs to one tunnel",
                            port.protocol.as_str(),
                            port.listen
                        ),
                    ));
                }
                ports.push(port);
            }
            tunnels.push(TunnelConfig {
                id: t.id.clone(),
                token_hashes,
                hostnames: t.hostnames.iter().map(|h| h.get_ref().clone()).collect(),
                max_concurrent_requests: t
                    .max_concurrent_requests
                    .unwrap_or(DEFAULT_TUNNEL_MAX_CONCURRENT),
                max_connections: t.max_connections.unwrap_or(DEFAULT_TUNNEL_MAX_CONNECTIONS),
                ports,
            });
        }

        let https = match file.https {
            Some(h) => Some(HttpsConfig {
                listen: h.listen,
                identity: TlsIdentity::server_from_pem_files(
                    &src.resolve(&h.cert),
                    &src.resolve(&h.key),
                )
                .map_err(|m| src.error(None, "https.cert", format!("the HTTPS listener: {m}")))?,
            }),
            None => None,
        };
        let quic_identity = TlsIdentity::server_from_pem_files(
            &src.resolve(&file.connectors.cert),
            &src.resolve(&file.connectors.key),
        )
        .map_err(|m| {
            src.error(
                None,
                "connectors.cert",
                format!("the QUIC listener for connectors: {m}"),
            )
        })?;

        Ok(EdgeConfig {
            edge_id: file.edge_id.unwrap_or_else(|| "edge".into()),
            http_listen: file.http.map(|h| h.listen),
            https,
            quic_listen: file.connectors.listen,
            quic_identity,
            tcp_listen: file.connectors.listen_tcp,
            register_timeout: file
                .connectors
                .register_timeout
                .map_or(DEFAULT_REGISTER_TIMEOUT, |d| d.0),
            tunnels,
            header_read_timeout: file
                .header_read_timeout
                .map_or(DEFAULT_HEADER_READ_TIMEOUT, |d| d.0),
            max_header_size: file
                .max_header_size
                .map_or(DEFAULT_MAX_HEADER_SIZE, |s| s.0 as usize),
            trust_forwarded_for: file.trust_forwarded_for.unwrap_or(false),
            grace_period: file
                .grace_period
                .map_or(super::connector::DEFAULT_GRACE_PERIOD, |d| d.0),
            admin_listen: file.admin.as_ref().map(|a| a.listen),
            require_consistent_replicas: file
                .admin
                .as_ref()
                .and_then(|a| a.require_consistent_replicas)
                .unwrap_or(false),
            replica_disagreement_grace: file
                .admin
                .as_ref()
                .and_then(|a| a.replica_disagreement_grace)
                .map_or(DEFAULT_REPLICA_DISAGREEMENT_GRACE, |d| d.0),
            access_log: file.access_log.unwrap_or(true),
            log_format: file.log_format.unwrap_or_default(),
            workers: file.workers.unwrap_or_else(super::default_workers),
            allowed_upgrades: match file.allowed_upgrades {
                Some(list) => list.iter().map(|p| p.to_ascii_lowercase()).collect(),
                None => default_upgrades(),
            },
            idle_timeout: file.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
            body_idle_timeout: file
                .body_idle_timeout
                .map_or(DEFAULT_BODY_IDLE_TIMEOUT, |d| d.0),
            max_connections_per_client: file
                .max_connections_per_client
                .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_CLIENT),
            max_handshakes: file
                .connectors
                .max_handshakes
                .unwrap_or(DEFAULT_MAX_HANDSHAKES),
        })
    }
}

/// Only WebSocket upgrades are relayed unless the operator lists others: an upgrade hands the
/// client a raw connection to the origin that no rule or plugin sees past its first request.
fn default_upgrades() -> Vec<String> {
    vec!["websocket".to_string()]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct EdgeFile {
    edge_id: Option<String>,
    header_read_timeout: Option<Duration>,
    max_header_size: Option<ByteSize>,
    trust_forwarded_for: Option<bool>,
    grace_period: Option<Duration>,
    access_log: Option<bool>,
    log_format: Option<super::LogFormat>,
    workers: Option<usize>,
    allowed_upgrades: Option<Vec<UpgradeToken>>,
    idle_timeout: Option<Duration>,
    body_idle_timeout: Option<Duration>,
    max_connections_per_client: Option<usize>,
    admin: Option<EdgeAdminFile>,
    http: Option<HttpFile>,
    https: Option<HttpsFile>,
    connectors: ConnectorsFile,
    #[serde(default)]
    tunnel: Vec<Spanned<TunnelFile>>,
}

/// An `Upgrade` protocol name: an HTTP token, optionally with `/version`.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct UpgradeToken(String);

impl UpgradeToken {
    fn to_ascii_lowercase(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

impl TryFrom<String> for UpgradeToken {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        let ok = match s.split_once('/') {
            Some((name, version)) => token(name) && token(version),
            None => token(&s),
        };
        if ok {
            Ok(UpgradeToken(s))
        } else {
            Err(format!(
                "invalid upgrade protocol {s:?}: expected a token such as \"websocket\""
            ))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct EdgeAdminFile {
    listen: SocketAddr,
    require_consistent_replicas: Option<bool>,
    replica_disagreement_grace: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct HttpFile {
    listen: SocketAddr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct HttpsFile {
    listen: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ConnectorsFile {
    listen: SocketAddr,
    listen_tcp: Option<SocketAddr>,
    cert: PathBuf,
    key: PathBuf,
    register_timeout: Option<Duration>,
    max_handshakes: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct TunnelFile {
    id: String,
    token_sha256: Option<OneOrMany<String>>,
    token_file: Option<OneOrMany<PathBuf>>,
    token_env: Option<OneOrMany<String>>,
    #[serde(default)]
    hostnames: Vec<Spanned<HostPattern>>,
    max_concurrent_requests: Option<usize>,
    max_connections: Option<usize>,
    #[serde(default)]
    port: Vec<Spanned<PortFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PortFile {
    listen: SocketAddr,
    protocol: Option<crate::proto::SessionProtocol>,
    service: String,
    #[serde(default)]
    allow: Vec<String>,
    max_sessions: Option<usize>,
    idle_timeout: Option<Duration>,
}

impl PortFile {
    /// The validated port; errors carry the key suffix they concern.
    fn validate(&self) -> Result<PortConfig, (&'static str, String)> {
        if self.service.is_empty() {
            return Err((
                "service",
                "name one of the connector's [[service]] blocks".into(),
            ));
        }
        let allow = self
            .allow
            .iter()
            .map(|a| {
                a.parse::<ipnet::IpNet>()
                    .or_else(|_| a.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map(|n| n.trunc())
                    .map_err(|_| {
                        (
                            "allow",
                            format!("{a:?} is not an address or a CIDR network"),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.max_sessions == Some(0) {
            return Err(("max-sessions", "must be at least 1".into()));
        }
        let protocol = self.protocol.unwrap_or(crate::proto::SessionProtocol::Tcp);
        Ok(PortConfig {
            listen: self.listen,
            protocol,
            service: self.service.clone(),
            allow,
            max_sessions: self.max_sessions.unwrap_or(DEFAULT_PORT_MAX_SESSIONS),
            idle_timeout: self.idle_timeout.map_or(
                match protocol {
                    crate::proto::SessionProtocol::Tcp => {
                        super::connector::DEFAULT_SESSION_IDLE_TIMEOUT
                    }
                    crate::proto::SessionProtocol::Udp => {
                        super::connector::DEFAULT_UDP_IDLE_TIMEOUT
                    }
                },
                |d| d.0,
            ),
        })
    }
}

/// A value or a list of values (`token-sha256 = "…"` or `token-sha256 = ["…", "…"]`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn iter(&self) -> std::slice::Iter<'_, T> {
        match self {
            OneOrMany::One(v) => std::slice::from_ref(v).iter(),
            OneOrMany::Many(v) => v.iter(),
        }
    }
}

/// Most tokens one tunnel accepts at once: a rotation needs two.
pub const MAX_TOKENS_PER_TUNNEL: usize = 8;

impl TunnelFile {
    /// The SHA-256 of every token, from whichever of the three sources is set (exactly one
    /// must be; each takes one value or a list). Errors carry the key suffix they concern.
    fn token_hashes(&self, src: &Source) -> Result<Vec<[u8; 32]>, (&'static str, String)> {
        let field = match (&self.token_sha256, &self.token_file, &self.token_env) {
            (Some(_), None, None) => ".token-sha256",
            (None, Some(_), None) => ".token-file",
            (None, None, Some(_)) => ".token-env",
            _ => "",
        };
        let hashes = self.token_hashes_inner(src).map_err(|m| (field, m))?;
        if hashes.is_empty() {
            return Err((field, "the list of tokens is empty".into()));
        }
        if hashes.len() > MAX_TOKENS_PER_TUNNEL {
            return Err((
                field,
                format!("at most {MAX_TOKENS_PER_TUNNEL} tokens per tunnel"),
            ));
        }
        Ok(hashes)
    }

    fn token_hashes_inner(&self, src: &Source) -> Result<Vec<[u8; 32]>, String> {
        match (&self.token_sha256, &self.token_file, &self.token_env) {
            (Some(hashes), None, None) => hashes.iter().map(|h| parse_sha256(h)).collect(),
            (None, Some(files), None) => files
                .iter()
                .map(|file| {
                    let path = src.resolve(file);
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| format!("cannot read token-file {}: {e}", path.display()))?;
                    let token = Secret::new(text.trim());
                    if token.expose().is_empty() {
                        return Err(format!("token-file {} is empty", path.display()));
                    }
                    Ok(token.sha256())
                })
                .collect(),
            (None, None, Some(vars)) => vars
                .iter()
                .map(|var| {
                    let value = std::env::var(var)
                        .map_err(|_| format!("token-env names ${var}, which is not set"))?;
                    let token = Secret::new(value.trim());
                    if token.expose().is_empty() {
                        return Err(format!("token-env ${var} is empty"));
                    }
                    Ok(token.sha256())
                })
                .collect(),
            (None, None, None) => Err("set one of token-sha256, token-file or token-env".into()),
            _ => Err("set only one of token-sha256, token-file or token-env".into()),
        }
    }
}

fn parse_sha256(hex_hash: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(hex_hash.trim())
        .map_err(|_| "token-sha256 must be 64 hexadecimal characters".to_string())?;
    bytes
        .try_into()
        .map_err(|_| "token-sha256 must be 64 hexadecimal characters".to_string())
}

impl TunnelConfig {
    /// Whether `token` is one the tunnel accepts. Every configured hash is compared, in
    /// constant time, whichever matches.
    pub fn accepts(&self, token: &Secret) -> bool {
        let hash = token.sha256();
        self.accepts_hash(&hash)
    }

    /// Whether a token with this SHA-256 is one the tunnel accepts (constant time).
    pub fn accepts_hash(&self, hash: &[u8; 32]) -> bool {
        use subtle::ConstantTimeEq;
        let mut any = subtle::Choice::from(0);
        for h in &self.token_hashes {
            any |= h.ct_eq(hash);
        }
        any.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(listen: &str, protocol: crate::proto::SessionProtocol, allow: &[&str]) -> PortConfig {
        PortConfig {
            listen: listen.parse().unwrap(),
            protocol,
            service: "s".into(),
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
            max_sessions: 1,
            idle_timeout: std::time::Duration::from_secs(1),
        }
    }

    #[test]
    fn allow_lists_match_networks_and_ipv4_mapped_clients() {
        use crate::proto::SessionProtocol::Tcp;
        let p = port("0.0.0.0:22", Tcp, &["203.0.113.0/24", "2001:db8::/32"]);
        for ok in ["203.0.113.9", "::ffff:203.0.113.9", "2001:db8::1"] {
            assert!(p.allows(ok.parse().unwrap()), "{ok}");
        }
        for no in ["203.0.114.1", "127.0.0.1", "2001:db9::1"] {
            assert!(!p.allows(no.parse().unwrap()), "{no}");
        }
        assert!(port("0.0.0.0:22", Tcp, &[]).allows("198.51.100.1".parse().unwrap()));
    }

    #[test]
    fn ports_collide_on_one_socket_only() {
        use crate::proto::SessionProtocol::{Tcp, Udp};
        let any = port("0.0.0.0:53", Tcp, &[]);
        assert!(any.collides(&port("127.0.0.1:53", Tcp, &[])));
        assert!(!any.collides(&port("0.0.0.0:53", Udp, &[])));
        assert!(!any.collides(&port("0.0.0.0:54", Tcp, &[])));
        assert!(!port("127.0.0.1:53", Tcp, &[]).collides(&port("127.0.0.2:53", Tcp, &[])));
        // Port 0 asks for any free port: never a collision.
        assert!(!port("0.0.0.0:0", Tcp, &[]).collides(&port("0.0.0.0:0", Tcp, &[])));
    }
}
