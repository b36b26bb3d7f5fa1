//! Configuration: TOML files for the edge and the connector, parsed and validated into the
//! runtime types, with errors that name the file, line, column and key path.
//!
//! Relative paths inside a file (certificates, token files) are resolved against the directory
//! of that file, so a config directory can be moved as a whole.

mod connector;
mod edge;
pub mod plugin;
mod tunnel;
mod types;

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;

pub use connector::{
    split_host_port as connector_split_host_port, BackoffConfig, Balance, ConnectorConfig, HashKey,
    HealthCheck, IngressRuleConfig, OriginConfig, OriginTarget, PoolConfig, Probe, ProxyVersion,
    ServiceConfig, SocketTarget, DEFAULT_HA_CONNECTIONS,
};
pub use edge::{EdgeConfig, HttpsConfig, PortConfig, TunnelConfig, DEFAULT_TUNNEL_MAX_CONNECTIONS};
pub use plugin::{AuditConfig, Grants, HttpPolicy, Isolation, KvQuota, OnError, PluginConfig};
pub use tunnel::{new_tunnel, rotate_tunnel, NewTunnel};
pub use types::{normalize_host, ByteSize, Duration, HostPattern};

/// A configuration problem, located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    /// The file, as the user named it.
    pub file: PathBuf,
    /// 1-based line and column, when known.
    pub position: Option<(usize, usize)>,
    /// Key path such as `ingress[3].origin`, when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn render(&self) -> String {
        let mut out = self.file.display().to_string();
        if let Some((line, col)) = self.position {
            out.push_str(&format!(":{line}:{col}"));
        }
        out.push_str(": ");
        if let Some(key) = &self.key {
            out.push_str(&format!("{key}: "));
        }
        out.push_str(&self.message);
        out
    }
}

/// Which kind of file a config is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `sluice edge`
    Edge,
    /// `sluice connector`
    Connector,
}

/// A parsed config of either role (for `sluice check`).
#[derive(Debug)]
pub enum AnyConfig {
    /// An edge file.
    Edge(Box<EdgeConfig>),
    /// A connector file.
    Connector(Box<ConnectorConfig>),
}

/// Loads a file of either role, telling them apart by their required keys.
pub fn load_any(path: &Path) -> Result<AnyConfig, ConfigError> {
    let text = read(path)?;
    match detect_role(&text) {
        Some(Role::Edge) => Ok(AnyConfig::Edge(Box::new(EdgeConfig::parse(&text, path)?))),
        Some(Role::Connector) => Ok(AnyConfig::Connector(Box::new(ConnectorConfig::parse(
            &text, path,
        )?))),
        None => {
            // Parse as TOML anyway so that a syntax error is reported as such.
            let _: toml::Table = Source::new(path, &text).deserialize()?;
            Err(ConfigError {
                file: path.to_path_buf(),
                position: None,
                key: None,
                message:
                    "cannot tell the role of this file: an edge config has a [connectors] table, \
                          a connector config has an `edges` list"
                        .into(),
            })
        }
    }
}

/// Guesses the role from the top-level keys.
pub fn detect_role(text: &str) -> Option<Role> {
    let table: toml::Table = toml::from_str(text).ok()?;
    if table.contains_key("edges") || table.contains_key("ingress") {
        Some(Role::Connector)
    } else if table.contains_key("connectors") || table.contains_key("tunnel") {
        Some(Role::Edge)
    } else {
        None
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        position: None,
        key: None,
        message: format!("cannot read file: {e}"),
    })
}

/// One config file's text, for deserializing and for locating errors in it.
pub(crate) struct Source<'a> {
    pub file: &'a Path,
    pub text: &'a str,
}

impl<'a> Source<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        Source { file, text }
    }

    /// Deserializes the whole file, reporting the key path and position of the first error.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let de = toml::Deserializer::new(self.text);
        serde_path_to_error::deserialize(de).map_err(|err| {
            // `toml::Spanned` shows up as a path segment of its own; it means nothing to users.
            let path = err
                .path()
                .to_string()
                .replace(".$__serde_spanned_private_value", "");
            let inner = err.into_inner();
            ConfigError {
                file: self.file.to_path_buf(),
                position: inner.span().map(|s| self.position(s.start)),
                key: (path != ".").then_some(path),
                message: inner
                    .message()
                    .trim_end()
                    .lines()
                    .collect::<Vec<_>>()
                    .join(": "),
            }
        })
    }

    /// An error at a byte offset with a key path.
    /// Without an offset, a top-level key or table named `key` is looked up to place the error.
    pub fn error(
        &self,
        offset: Option<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let key = key.into();
        let top = key.split(['.', '[']).next().unwrap_or(&key);
        let offset = offset.or_else(|| self.find_top_level(top));
        ConfigError {
            file: self.file.to_path_buf(),
            position: offset.map(|o| self.position(o)),
            key: Some(key),
            message: message.into(),
        }
    }

    /// Byte offset of the line defining top-level `key` (`key = …` or `[key]`), if any.
    fn find_top_level(&self, key: &str) -> Option<usize> {
        let mut offset = 0;
        let mut in_table = false;
        for line in self.text.split_inclusive('\n') {
            let t = line.trim();
            if t.starts_with('[') {
                if t == format!("[{key}]") {
                    return Some(offset);
                }
                in_table = true;
            } else if !in_table {
                if let Some(rest) = t.strip_prefix(key) {
                    if rest.trim_start().starts_with('=') {
                        return Some(offset);
                    }
                }
            }
            offset += line.len();
        }
        None
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }

    /// Resolves a path written in the file against the file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.file.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}

/// Async worker threads when a file leaves `workers` out: one per core. Setting fewer keeps a
/// connector from competing with the services beside it.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?}: \"text\" or \"json\""
            )),
        }
    }
}

/// Which transport a connector uses to reach its edges (`protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportChoice {
    /// QUIC first; HTTP/2 over TCP when QUIC fails, and back to QUIC when it works again.
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// HTTP/2 over TLS over TCP only.
    Http2,
}

/// The `[admin]` table of either role.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct AdminFile {
    pub listen: std::net::SocketAddr,
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct TlsIdentity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TlsIdentity {
    /// Reads a PEM certificate chain and a PEM private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, String> {
        let chain = read_certs(cert)?;
        let key = read_key(key)?;
        Ok(TlsIdentity { chain, key })
    }

    /// Reads a listener's certificate and key and checks them as the listener will use them
    /// (see [`crate::tls::check_server_identity`]); errors name the files.
    pub fn server_from_pem_files(cert: &Path, key: &Path) -> Result<Self, String> {
        let identity = Self::from_pem_files(cert, key)?;
        crate::tls::check_server_identity(&identity)
            .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))?;
        Ok(identity)
    }
}

/// Reads an unencrypted private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let text = std::fs::read(path)
        .map_err(|e| format!("cannot read private key from {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&text);
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.contains("Proc-Type: 4,ENCRYPTED")
    {
        return Err(format!(
            "the private key in {} is encrypted: sluice needs it unencrypted (decrypt it with \
             `openssl pkey -in {0} -out KEY.pem` and protect the file with mode 0600 or a \
             systemd credential)",
            path.display()
        ));
    }
    PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| {
        format!(
            "cannot read private key from {}: {e} (expected a PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")",
            path.display()
        )
    })
}

/// Reads every certificate in a PEM file; an empty file is an error.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate found in {}", path.display()));
    }
    Ok(certs)
}
