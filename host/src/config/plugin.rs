//! `[[plugin]]` entries of the connector's file, the plugin chains and the `[audit]` table.

use std::path::PathBuf;
use std::time::Duration as StdDuration;

use serde::Deserialize;

use super::{ByteSize, Duration};

/// Default hook deadline.
pub const DEFAULT_TIMEOUT: StdDuration = StdDuration::from_millis(10);
/// Default memory limit per instance.
pub const DEFAULT_MEMORY: usize = 32 << 20;
/// Default calls before an instance is recycled.
pub const DEFAULT_MAX_CALLS: u64 = 10_000;
/// Largest memory limit a plugin may ask for.
pub const MAX_MEMORY: usize = 1 << 30;
/// Default bound of the audit queue.
pub const DEFAULT_AUDIT_QUEUE: usize = 1024;
/// Default key count of a plugin's key-value namespace.
pub const DEFAULT_KV_MAX_KEYS: usize = 10_000;
/// Default size (keys and values) of a plugin's key-value namespace.
pub const DEFAULT_KV_MAX_BYTES: usize = 16 << 20;
/// Default number of series (label combinations) a plugin's own metrics may have.
pub const DEFAULT_METRICS_MAX_SERIES: usize = 100;
/// Default of what a body hook may hold back (`body-buffer`).
pub const DEFAULT_BODY_BUFFER: usize = 1 << 20;
/// Default deadline of one outbound HTTP call.
pub const DEFAULT_HTTP_TIMEOUT: StdDuration = StdDuration::from_secs(5);
/// Longest deadline an operator may give outbound HTTP calls.
pub const MAX_HTTP_TIMEOUT: StdDuration = StdDuration::from_secs(60);
/// Default cap of an outbound HTTP response body.
pub const DEFAULT_HTTP_MAX_RESPONSE: usize = 1 << 20;
/// Largest cap an operator may give outbound HTTP response bodies.
pub const MAX_HTTP_MAX_RESPONSE: usize = 64 << 20;

/// A validated plugin entry.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// Name used in chains, logs and metrics.
    pub name: String,
    /// The component file (`.wasm`).
    pub path: PathBuf,
    /// The plugin's `config` table, as JSON, passed to `init`.
    pub config_json: Vec<u8>,
    /// What happens to a request when the plugin fails.
    pub on_error: OnError,
    /// Deadline of each hook call.
    pub timeout: StdDuration,
    /// Linear memory limit per instance, bytes.
    pub memory: usize,
    /// Instance reuse.
    pub isolation: Isolation,
    /// Calls before a reused instance is replaced by a fresh one.
    pub max_calls: u64,
    /// Capabilities granted beyond the defaults.
    pub grants: Grants,
    /// Quotas of the plugin's key-value namespace (with the `kv` grant).
    pub kv: KvQuota,
    /// Series the plugin's own metrics may have (with the `metrics` grant).
    pub metrics_max_series: usize,
    /// What outbound HTTP calls may reach (with the `http` grant).
    pub http: HttpPolicy,
    /// Bytes a body hook may hold back, and the largest replacement it may give.
    pub body_buffer: usize,
    /// Where the `[[plugin]]` block is (`connector.toml:15`), for load errors; none for a
    /// plugin not from a file (`sluice plugin test`).
    pub defined_at: Option<String>,
}

impl PluginConfig {
    /// A plugin with the defaults.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        PluginConfig {
            name: name.into(),
            path: path.into(),
            config_json: b"{}".to_vec(),
            on_error: OnError::FailClosed,
            timeout: DEFAULT_TIMEOUT,
            memory: DEFAULT_MEMORY,
            isolation: Isolation::Reuse,
            max_calls: DEFAULT_MAX_CALLS,
            grants: Grants::default(),
            kv: KvQuota::default(),
            metrics_max_series: DEFAULT_METRICS_MAX_SERIES,
            http: HttpPolicy::default(),
            body_buffer: DEFAULT_BODY_BUFFER,
            defined_at: None,
        }
    }
}

/// Where a plugin granted `http` may send requests, and the bounds of each call.
#[derive(Debug, Clone)]
pub struct HttpPolicy {
    /// Host patterns (`auth.example.com`, `*.example.com`, `10.0.0.5:8080`): a pattern without a
    /// port allows any port; `*.` allows subdomains (not the domain itself). Lowercase.
    pub allow_hosts: Vec<String>,
    /// Configured origins the plugin may call by name (resolved from `allow-origins`).
    pub allow_origins: Vec<super::OriginConfig>,
    /// Deadline of each call.
    pub timeout: StdDuration,
    /// Largest response body, bytes.
    pub max_response: usize,
    /// Certificate authorities trusted for `https://` hosts besides the system's.
    pub ca: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// Canned answers instead of the network (`sluice plugin test --http`); every call is
    /// then answered from here and recorded, and nothing leaves the process.
    pub script: Option<std::sync::Arc<crate::plugin::outbound::Script>>,
}

impl Default for HttpPolicy {
    fn default() -> Self {
        HttpPolicy {
            allow_hosts: Vec::new(),
            allow_origins: Vec::new(),
            timeout: DEFAULT_HTTP_TIMEOUT,
            max_response: DEFAULT_HTTP_MAX_RESPONSE,
            ca: Vec::new(),
            script: None,
        }
    }
}

/// Failure policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// The client gets a 502 (the default).
    FailClosed,
    /// The plugin is skipped and the request goes on.
    FailOpen,
}

/// Instance reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// Instances serve many calls, one at a time (the default).
    Reuse,
    /// A fresh instance for every request.
    PerRequest,
}

/// Capabilities an operator can grant a plugin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grants {
    /// `client-addr`: the request view shows the client's address, and the `x-forwarded-for`,
    /// `forwarded` and `x-real-ip` headers (hidden otherwise).
    pub client_addr: bool,
    /// `credentials`: the request view shows `authorization`, `proxy-authorization` and
    /// `cookie`, and `on-response` sees `set-cookie` (hidden otherwise).
    pub credentials: bool,
    /// `kv`: the plugin may use its own key-value namespace (the `kv` import; a component
    /// importing it without the grant is refused at load).
    pub kv: bool,
    /// `metrics`: the plugin may define counters, gauges and histograms (the `metrics`
    /// import), bounded by `metrics-max-series`.
    pub metrics: bool,
    /// `http`: the plugin may make outbound HTTP calls (the `http` import) to the hosts of
    /// `allow-hosts` and the origins of `allow-origins`.
    pub http: bool,
}

impl Grants {
    /// The grants' names, as written in `grants = [...]`.
    pub const NAMES: &'static [&'static str] =
        &["client-addr", "credentials", "kv", "metrics", "http"];

    /// Grants `name`; an unknown name is refused with the list of known ones.
    pub fn add(&mut self, name: &str) -> Result<(), String> {
        let flag = match name {
            "client-addr" => &mut self.client_addr,
            "credentials" => &mut self.credentials,
            "kv" => &mut self.kv,
            "metrics" => &mut self.metrics,
            "http" => &mut self.http,
            other => {
                let known: Vec<String> = Self::NAMES.iter().map(|n| format!("{n:?}")).collect();
                return Err(format!(
                    "unknown grant {other:?}: sluice can grant {}",
                    known.join(", ")
                ));
            }
        };
        *flag = true;
        Ok(())
    }

    /// Whether a plugin with these grants must not see request header `name` (lowercase):
    /// the client's address without `client-addr`, credentials without `credentials`.
    pub fn hides_header(&self, name: &str) -> bool {
        (!self.client_addr && crate::plugin::CLIENT_ADDRESS.contains(&name))
            || (!self.credentials && crate::plugin::CREDENTIALS.contains(&name))
    }

    /// Whether a plugin with these grants must not see response header `name` (lowercase):
    /// the credentials headers (`set-cookie` among them) without `credentials`.
    pub fn hides_response_header(&self, name: &str) -> bool {
        !self.credentials && crate::plugin::CREDENTIALS.contains(&name)
    }

    /// The grants named in `names` (for tests and tools); panics on an unknown name.
    pub fn of(names: &[&str]) -> Grants {
        let mut g = Grants::default();
        for n in names {
            g.add(n).expect("a known grant");
        }
        g
    }
}

/// What a plugin may keep in its key-value namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvQuota {
    /// Keys at once.
    pub max_keys: usize,
    /// Keys and values together, bytes.
    pub max_bytes: usize,
}

impl Default for KvQuota {
    fn default() -> Self {
        KvQuota {
            max_keys: DEFAULT_KV_MAX_KEYS,
            max_bytes: DEFAULT_KV_MAX_BYTES,
        }
    }
}

/// The `[audit]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// Write events to standard output.
    pub stdout: bool,
    /// Append events to this file.
    pub file: Option<PathBuf>,
    /// Events queued before emitters wait.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            stdout: false,
            file: None,
            queue: DEFAULT_AUDIT_QUEUE,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct PluginFile {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub config: Option<toml::Table>,
    pub on_error: Option<OnError>,
    pub timeout: Option<Duration>,
    pub memory: Option<ByteSize>,
    pub isolation: Option<Isolation>,
    pub max_calls: Option<u64>,
    #[serde(default)]
    pub grants: Vec<String>,
    pub kv_max_keys: Option<usize>,
    pub kv_max_bytes: Option<ByteSize>,
    pub metrics_max_series: Option<usize>,
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    #[serde(default)]
    pub allow_origins: Vec<String>,
    pub http_timeout: Option<Duration>,
    pub http_max_response: Option<ByteSize>,
    pub http_ca: Option<PathBuf>,
    pub body_buffer: Option<ByteSize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct AuditFile {
    #[serde(default)]
    pub stdout: bool,
    pub file: Option<PathBuf>,
    pub queue: Option<usize>,
}

impl PluginFile {
    /// Validates one entry; errors are (key suffix, message).
    pub fn validate(
        &self,
        resolve: impl Fn(&std::path::Path) -> PathBuf,
    ) -> Result<PluginConfig, (String, String)> {
        let valid_name = !self.name.is_empty()
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid_name {
            return Err((
                "name".into(),
                format!(
                    "invalid plugin name {:?}: use letters, digits, '-' and '_'",
                    self.name
                ),
            ));
        }
        let config_json = match &self.config {
            Some(table) => serde_json::to_vec(table)
                .map_err(|e| ("config".into(), format!("cannot encode as JSON: {e}")))?,
            None => b"{}".to_vec(),
        };
        let memory = self.memory.map_or(DEFAULT_MEMORY, |m| m.0 as usize);
        if !(64 * 1024..=MAX_MEMORY).contains(&memory) {
            return Err(("memory".into(), "must be between 64KiB and 1GiB".into()));
        }
        let timeout = self.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0);
        if timeout.is_zero() || timeout > StdDuration::from_secs(10) {
            return Err(("timeout".into(), "must be between 1ms and 10s".into()));
        }
        let max_calls = self.max_calls.unwrap_or(DEFAULT_MAX_CALLS);
        if max_calls == 0 {
            return Err(("max-calls".into(), "must be at least 1".into()));
        }
        let mut grants = Grants::default();
        for (i, g) in self.grants.iter().enumerate() {
            grants
                .add(g)
                .map_err(|message| (format!("grants[{i}]"), message))?;
        }
        let kv = KvQuota {
            max_keys: self.kv_max_keys.unwrap_or(DEFAULT_KV_MAX_KEYS),
            max_bytes: self
                .kv_max_bytes
                .map_or(DEFAULT_KV_MAX_BYTES, |b| b.0 as usize),
        };
        if kv.max_keys == 0 {
            return Err(("kv-max-keys".into(), "must be at least 1".into()));
        }
        if !(1024..=(1 << 30)).contains(&kv.max_bytes) {
            return Err((
                "kv-max-bytes".into(),
                "must be between 1KiB and 1GiB".into(),
            ));
        }
        let metrics_max_series = self
            .metrics_max_series
            .unwrap_or(DEFAULT_METRICS_MAX_SERIES);
        if !(1..=100_000).contains(&metrics_max_series) {
            return Err((
                "metrics-max-series".into(),
                "must be between 1 and 100000".into(),
            ));
        }
        let http = self.http_policy(&grants, &resolve)?;
        let body_buffer = self
            .body_buffer
            .map_or(DEFAULT_BODY_BUFFER, |b| b.0 as usize);
        if !(1024..=(64 << 20)).contains(&body_buffer) {
            return Err((
                "body-buffer".into(),
                "must be between 1KiB and 64MiB".into(),
            ));
        }
        Ok(PluginConfig {
            name: self.name.clone(),
            path: resolve(&self.path),
            config_json,
            on_error: self.on_error.unwrap_or(OnError::FailClosed),
            timeout,
            memory,
            isolation: self.isolation.unwrap_or(Isolation::Reuse),
            max_calls,
            grants,
            kv,
            metrics_max_series,
            http,
            body_buffer,
            defined_at: None,
        })
    }

    /// The `http` grant's settings. Origins named in `allow-origins` are resolved by the
    /// caller, which knows them; here they are checked for form only.
    fn http_policy(
        &self,
        grants: &Grants,
        resolve: &impl Fn(&std::path::Path) -> PathBuf,
    ) -> Result<HttpPolicy, (String, String)> {
        let mut policy = HttpPolicy::default();
        let set = [
            ("allow-hosts", !self.allow_hosts.is_empty()),
            ("allow-origins", !self.allow_origins.is_empty()),
            ("http-timeout", self.http_timeout.is_some()),
            ("http-max-response", self.http_max_response.is_some()),
            ("http-ca", self.http_ca.is_some()),
        ];
        if !grants.http {
            return match set.iter().find(|(_, on)| *on) {
                Some((key, _)) => Err((
                    key.to_string(),
                    "applies to outbound HTTP calls: add \"http\" to grants".into(),
                )),
                None => Ok(policy),
            };
        }
        if self.allow_hosts.is_empty() && self.allow_origins.is_empty() {
            return Err((
                "grants".into(),
                "the http grant needs allow-hosts or allow-origins: say what the plugin may call"
                    .into(),
            ));
        }
        for (i, h) in self.allow_hosts.iter().enumerate() {
            policy.allow_hosts.push(
                crate::plugin::outbound::host_pattern(h)
                    .map_err(|m| (format!("allow-hosts[{i}]"), m))?,
            );
        }
        if let Some(t) = self.http_timeout {
            if t.0.is_zero() || t.0 > MAX_HTTP_TIMEOUT {
                return Err(("http-timeout".into(), "must be between 1ms and 60s".into()));
            }
            policy.timeout = t.0;
        }
        if let Some(b) = self.http_max_response {
            let b = b.0 as usize;
            if !(1..=MAX_HTTP_MAX_RESPONSE).contains(&b) {
                return Err((
                    "http-max-response".into(),
                    "must be between 1B and 64MiB".into(),
                ));
            }
            policy.max_response = b;
        }
        if let Some(ca) = &self.http_ca {
            policy.ca = super::read_certs(&resolve(ca)).map_err(|m| ("http-ca".into(), m))?;
        }
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::Grants;

    #[test]
    fn grants_decide_which_headers_a_plugin_sees() {
        let none = Grants::default();
        for h in [
            "authorization",
            "proxy-authorization",
            "cookie",
            "x-forwarded-for",
            "forwarded",
            "x-real-ip",
        ] {
            assert!(none.hides_header(h), "{h}");
        }
        assert!(none.hides_response_header("set-cookie"));
        assert!(!none.hides_header("accept") && !none.hides_response_header("content-type"));
        let creds = Grants::of(&["credentials"]);
        assert!(!creds.hides_header("authorization") && !creds.hides_response_header("set-cookie"));
        assert!(creds.hides_header("x-forwarded-for"));
        let addr = Grants::of(&["client-addr"]);
        assert!(!addr.hides_header("x-real-ip") && addr.hides_header("cookie"));
        assert!(addr.hides_response_header("set-cookie"));
    }
}
