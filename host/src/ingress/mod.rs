//! Ingress: path normalisation and first-match rule selection, with cloudflared's semantics.

mod path;

pub use path::{normalize_target, Ambiguous, PathError, PathPolicy};

use crate::config::{HostPattern, IngressRuleConfig};

/// Compiled ingress rules. The last one always matches (checked when the config is loaded).
#[derive(Debug, Clone)]
pub struct Ingress {
    rules: Vec<IngressRuleConfig>,
}

/// The outcome of matching a request.
#[derive(Debug, Clone, Copy)]
pub struct Match<'a> {
    /// Index of the rule in the configuration.
    pub index: usize,
    /// The rule.
    pub rule: &'a IngressRuleConfig,
}

impl Ingress {
    /// Wraps validated rules.
    pub fn new(rules: Vec<IngressRuleConfig>) -> Self {
        Ingress { rules }
    }

    /// The first rule matching `host` (lowercase, no port) and `path` (normalised, no query).
    /// `None` only if the rules lack a catch-all, which validation prevents.
    pub fn find(&self, host: &str, path: &str) -> Option<Match<'_>> {
        self.rules.iter().enumerate().find_map(|(index, rule)| {
            let host_ok = rule
                .hostname
                .as_ref()
                .is_none_or(|h: &HostPattern| h.matches(host));
            let path_ok = rule.path.as_ref().is_none_or(|re| re.is_match(path));
            (host_ok && path_ok).then_some(Match { index, rule })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(host: Option<&str>, path: Option<&str>, origin: &str) -> IngressRuleConfig {
        IngressRuleConfig {
            hostname: host.map(|h| HostPattern::try_from(h).unwrap()),
            path: path.map(|p| regex::Regex::new(p).unwrap()),
            origin: origin.into(),
            plugins: Vec::new(),
        }
    }

    #[test]
    fn first_match_wins() {
        let ing = Ingress::new(vec![
            rule(Some("app.test"), Some("^/api/"), "api"),
            rule(Some("app.test"), None, "web"),
            rule(Some("*.test"), None, "wild"),
            rule(None, Some("^/health$"), "health"),
            rule(None, None, "fallback"),
        ]);
        let pick = |h: &str, p: &str| ing.find(h, p).unwrap().rule.origin.clone();
        assert_eq!(pick("app.test", "/api/x"), "api");
        assert_eq!(pick("app.test", "/x"), "web");
        assert_eq!(pick("b.test", "/api/x"), "wild");
        assert_eq!(pick("other.org", "/health"), "health");
        assert_eq!(pick("other.org", "/"), "fallback");
        assert_eq!(ing.find("app.test", "/api/x").unwrap().index, 0);
    }
}
