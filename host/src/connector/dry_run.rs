//! `sluice check --config connector.toml --match https://host/path`: which ingress rule a
//! request would match, the plugin chain that would run and where it would go — the routing
//! of the running connector, applied to a URL without sending anything, so that an operator
//! can try a change before a reload.

use crate::config::{ConnectorConfig, OriginTarget};
use crate::ingress::{normalize_target, Ingress};

/// The report for `url`, one fact per line; an error for a URL that is not one, or that the
/// connector would refuse (its path is ambiguous under `[paths]`, say).
pub fn explain(config: &ConnectorConfig, url: &str) -> Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|e| {
        format!("--match {url:?}: not a URL ({e}): give an absolute http:// or https:// URL")
    })?;
    let (Some(scheme @ ("http" | "https")), Some(authority)) = (uri.scheme_str(), uri.authority())
    else {
        return Err(format!(
            "--match {url:?}: give an absolute http:// or https:// URL"
        ));
    };
    let host = crate::config::normalize_host(authority.as_str());
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let (path, normalised) = normalize_target(target, &config.paths)
        .map_err(|e| format!("{url}: the connector would answer 400: {e}"))?;
    let ingress = Ingress::new(config.ingress.clone());
    let m = ingress
        .find(&host, &path)
        .ok_or_else(|| format!("{url}: no ingress rule matches (the file has no catch-all)"))?;

    let mut out = vec![format!("{scheme}://{host}{normalised}")];
    if normalised != target {
        out.push(format!("  path normalised from {target}"));
    }
    let mut rule = format!("  rule: ingress[{}]", m.index);
    match (&m.rule.hostname, &m.rule.path) {
        (None, None) => rule.push_str(" (catch-all)"),
        (h, p) => {
            let mut parts = Vec::new();
            if let Some(h) = h {
                parts.push(format!("hostname {:?}", h.to_string()));
            }
            if let Some(p) = p {
                parts.push(format!("path {:?}", p.as_str()));
            }
            rule.push_str(&format!(" ({})", parts.join(", ")));
        }
    }
    out.push(rule);

    let chain: Vec<String> = config
        .global_plugins
        .iter()
        .map(|p| format!("{p} (global)"))
        .chain(m.rule.plugins.iter().cloned())
        .collect();
    out.push(match chain.is_empty() {
        true => "  plugins: none".to_string(),
        false => format!(
            "  plugins: {} (on-request in this order, on-response in reverse)",
            chain.join(", ")
        ),
    });
    if let Some(pool) = config.pools.iter().find(|p| p.name == m.rule.origin) {
        let balance = match &pool.balance {
            crate::config::Balance::RoundRobin => "round-robin".to_string(),
            crate::config::Balance::LeastRequests => "least-requests".to_string(),
            crate::config::Balance::Hash(crate::config::HashKey::Header(h)) => {
                format!("hash of header {h}")
            }
            crate::config::Balance::Hash(crate::config::HashKey::Cookie(c)) => {
                format!("hash of cookie {c}")
            }
        };
        out.push(format!(
            "  pool: {:?} ({balance}) -> {}",
            pool.name,
            pool.members.join(", ")
        ));
        if !chain.is_empty() {
            out.push("  (a plugin may answer locally or choose another origin)".into());
        }
        return Ok(out.join("\n") + "\n");
    }
    let origin = config.origins.iter().find(|o| o.name == m.rule.origin);
    let target = match origin.map(|o| &o.target) {
        Some(OriginTarget::Http(uri)) => uri.to_string(),
        Some(OriginTarget::Hello) => "built-in hello".into(),
        Some(OriginTarget::Status(s)) => format!("built-in status {s}"),
        Some(OriginTarget::Tcp(t)) => format!("tcp://{t} (TCP sessions, sluice access tcp)"),
        Some(OriginTarget::Udp(t)) => format!("udp://{t}"),
        Some(OriginTarget::Unix { path, tls }) => {
            format!(
                "{}:{}",
                if *tls { "unix+tls" } else { "unix" },
                path.display()
            )
        }
        None => "not configured (the connector would answer 502)".into(),
    };
    out.push(format!("  origin: {:?} -> {target}", m.rule.origin));
    if !chain.is_empty() {
        out.push("  (a plugin may answer locally or choose another origin)".into());
    }
    Ok(out.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HostPattern, IngressRuleConfig, OriginConfig};
    use crate::secret::Secret;

    fn config() -> ConnectorConfig {
        let mut c = ConnectorConfig::new("app", Secret::new("t"));
        c.origins = vec![
            OriginConfig::new(
                "api",
                OriginTarget::Http("http://10.0.0.5:8080".parse().unwrap()),
            ),
            OriginConfig::new("web", OriginTarget::Hello),
        ];
        c.global_plugins = vec!["audit".into()];
        c.ingress = vec![
            IngressRuleConfig {
                hostname: Some(HostPattern::try_from("app.example.com").unwrap()),
                path: Some(regex::Regex::new("^/api/").unwrap()),
                origin: "api".into(),
                plugins: vec!["jwt".into(), "limit".into()],
            },
            IngressRuleConfig {
                hostname: None,
                path: None,
                origin: "web".into(),
                plugins: Vec::new(),
            },
        ];
        c
    }

    #[test]
    fn a_url_is_explained_by_the_rule_it_matches() {
        let c = config();
        let api = explain(&c, "https://App.Example.com:443/api//orders/../v1?x=1").unwrap();
        assert!(
            api.contains("rule: ingress[0] (hostname \"app.example.com\", path \"^/api/\")"),
            "{api}"
        );
        assert!(api.contains("plugins: audit (global), jwt, limit"), "{api}");
        assert!(
            api.contains("origin: \"api\" -> http://10.0.0.5:8080/"),
            "{api}"
        );
        let other = explain(&c, "http://other.example.com/").unwrap();
        assert!(other.contains("rule: ingress[1] (catch-all)"), "{other}");
        assert!(
            other.contains("origin: \"web\" -> built-in hello"),
            "{other}"
        );
        assert!(explain(&c, "/api/").unwrap_err().contains("absolute"));
        assert!(explain(&c, "ftp://app.example.com/").is_err());
    }
}
