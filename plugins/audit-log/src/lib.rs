//! audit-log: one audit event per completed request, with the fields the operator chooses.

use std::borrow::Cow;

use serde::Deserialize;
use sluice_sdk::{audit, export_plugin, Completion, Plugin, Request};

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Event kind. Default `access`.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Fields to include. Default: method, host, path, status, duration_ms, origin.
    #[serde(default = "default_fields")]
    pub fields: Vec<String>,
    /// Request headers to include, as `header.<name>`.
    #[serde(default)]
    pub headers: Vec<String>,
}

fn default_kind() -> String {
    "access".into()
}

fn default_fields() -> Vec<String> {
    ["method", "host", "path", "status", "duration_ms", "origin"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Fields the plugin knows.
pub const FIELDS: &[&str] = &[
    "method",
    "host",
    "path",
    "status",
    "duration_ms",
    "origin",
    "client_ip",
    "bytes_in",
    "bytes_out",
    "error",
];

/// The plugin.
#[derive(Debug)]
pub struct AuditLog {
    config: Config,
}

impl AuditLog {
    /// The attributes of the event for a completed request, borrowed from the configuration,
    /// the request and the completion where they can be.
    pub fn attributes<'a>(
        &'a self,
        req: &'a Request,
        info: &'a Completion,
    ) -> Vec<(Cow<'a, str>, Cow<'a, str>)> {
        let mut out = Vec::with_capacity(self.config.fields.len() + self.config.headers.len());
        for field in &self.config.fields {
            let value: Cow<'a, str> = match field.as_str() {
                "method" => req.method().into(),
                "host" => req.hostname().into(),
                "path" => req.path().into(),
                "status" => info.status.to_string().into(),
                "duration_ms" => milliseconds(info.duration_us).into(),
                "origin" => info.origin.as_deref().unwrap_or_default().into(),
                "client_ip" => req.client_ip().unwrap_or("unknown").into(),
                "bytes_in" => info.bytes_in.to_string().into(),
                "bytes_out" => info.bytes_out.to_string().into(),
                "error" => info.error.as_deref().unwrap_or_default().into(),
                _ => continue,
            };
            out.push((field.as_str().into(), value));
        }
        for name in &self.config.headers {
            if let Some(v) = req.header(name) {
                out.push((format!("header.{name}").into(), v.into()));
            }
        }
        out
    }
}

/// `us` microseconds as milliseconds with three decimals (`1.500`), in integer arithmetic.
fn milliseconds(us: u64) -> String {
    format!("{}.{:03}", us / 1000, us % 1000)
}

impl Plugin for AuditLog {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if let Some(bad) = config.fields.iter().find(|f| !FIELDS.contains(&f.as_str())) {
            return Err(format!(
                "unknown field {bad:?} (known: {})",
                FIELDS.join(", ")
            ));
        }
        if config.kind.is_empty() {
            return Err("kind must not be empty".into());
        }
        Ok(AuditLog { config })
    }

    fn on_complete(&self, req: &Request, info: &Completion) {
        let attrs = self.attributes(req, info);
        let borrowed: Vec<(&str, &str)> = attrs.iter().map(|(k, v)| (&**k, &**v)).collect();
        audit::emit(&self.config.kind, &borrowed);
    }
}

export_plugin!(AuditLog);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::{load, testing};

    #[test]
    fn one_event_with_chosen_fields() {
        testing::reset();
        let p: AuditLog = load(br#"{"fields": ["method", "status", "origin", "duration_ms"], "headers": ["user-agent"]}"#).unwrap();
        let req =
            Request::new("POST", "https://app.test/items").with_header("user-agent", "curl/8");
        let info = Completion {
            status: 201,
            origin: Some("web".into()),
            duration_us: 1500,
            ..Default::default()
        };
        p.on_complete(&req, &info);
        let events = testing::events();
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(e.kind, "access");
        assert_eq!(e.get("method"), Some("POST"));
        assert_eq!(e.get("status"), Some("201"));
        assert_eq!(e.get("origin"), Some("web"));
        assert_eq!(e.get("duration_ms"), Some("1.500"));
        assert_eq!(e.get("header.user-agent"), Some("curl/8"));
        assert_eq!(e.get("path"), None);
    }

    #[test]
    fn durations_keep_three_decimals() {
        assert_eq!(milliseconds(0), "0.000");
        assert_eq!(milliseconds(7), "0.007");
        assert_eq!(milliseconds(1_500), "1.500");
        assert_eq!(milliseconds(12_345_678), "12345.678");
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(load::<AuditLog>(br#"{"fields": ["colour"]}"#)
            .unwrap_err()
            .contains("unknown field \"colour\""));
    }
}
