//! origin-router: picks the origin by header, cookie or path prefix, and otherwise by a
//! weighted split (canary), sticky by the hash of a chosen header or cookie.

use std::collections::BTreeMap;

use serde::Deserialize;
use sluice_sdk::{export_plugin, Plugin, Request, RequestDecision};

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Routes tried in order; the first whose conditions all hold picks the origin.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Weighted split for requests no route matched.
    pub split: Option<Split>,
}

/// A route: every condition given must hold.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Origin to use.
    pub origin: String,
    /// A header that must be present (with `value`, equal to it).
    pub header: Option<Match>,
    /// A cookie that must be present (with `value`, equal to it).
    pub cookie: Option<Match>,
    /// A prefix the path must start with.
    pub path_prefix: Option<String>,
}

/// A header or cookie condition.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Header or cookie name.
    pub name: String,
    /// Required value; any value if absent.
    pub value: Option<String>,
}

/// A weighted split between origins.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    /// Origin → weight.
    pub weights: BTreeMap<String, u32>,
    /// Keep a client on one origin by hashing this header or cookie.
    pub sticky: Option<Sticky>,
}

/// What stickiness hashes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    /// A header name.
    pub header: Option<String>,
    /// A cookie name.
    pub cookie: Option<String>,
}

/// The plugin.
#[derive(Debug)]
pub struct OriginRouter {
    config: Config,
    total: u64,
}

/// FNV-1a, 64-bit: stable across runs and platforms, so stickiness survives restarts.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Route {
    fn matches(&self, req: &Request) -> bool {
        let header_ok =
            self.header
                .as_ref()
                .is_none_or(|m| match (req.header(&m.name), &m.value) {
                    (Some(_), None) => true,
                    (Some(v), Some(want)) => v == want,
                    (None, _) => false,
                });
        let cookie_ok =
            self.cookie
                .as_ref()
                .is_none_or(|m| match (req.cookie(&m.name), &m.value) {
                    (Some(_), None) => true,
                    (Some(v), Some(want)) => v == want,
                    (None, _) => false,
                });
        let path_ok = self
            .path_prefix
            .as_ref()
            .is_none_or(|p| req.path_only().starts_with(p.as_str()));
        header_ok && cookie_ok && path_ok
    }
}

impl OriginRouter {
    /// The origin for `req`, if the plugin chooses one.
    pub fn choose(&self, req: &Request) -> Option<&str> {
        if let Some(route) = self.config.routes.iter().find(|r| r.matches(req)) {
            return Some(&route.origin);
        }
        let split = self.config.split.as_ref()?;
        let sticky_key = split.sticky.as_ref().and_then(|s| {
            s.header
                .as_deref()
                .and_then(|h| req.header(h))
                .or_else(|| s.cookie.as_deref().and_then(|c| req.cookie(c)))
        });
        // Without a sticky key, the request id (random per request) spreads requests.
        let key = sticky_key.unwrap_or(req.request_id());
        let mut point = fnv1a(key.as_bytes()) % self.total;
        for (origin, weight) in &split.weights {
            if point < u64::from(*weight) {
                return Some(origin);
            }
            point -= u64::from(*weight);
        }
        None
    }
}

impl Plugin for OriginRouter {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.routes.is_empty() && config.split.is_none() {
            return Err("give at least one route or a split".into());
        }
        for (i, r) in config.routes.iter().enumerate() {
            if r.header.is_none() && r.cookie.is_none() && r.path_prefix.is_none() {
                return Err(format!(
                    "routes[{i}] has no condition (header, cookie or path_prefix)"
                ));
            }
        }
        let total = match &config.split {
            Some(s) => {
                if let Some(st) = &s.sticky {
                    if st.header.is_none() && st.cookie.is_none() {
                        return Err("split.sticky needs a header or a cookie".into());
                    }
                }
                s.weights.values().map(|w| u64::from(*w)).sum()
            }
            None => 1,
        };
        if total == 0 {
            return Err("split.weights must add up to more than 0".into());
        }
        Ok(OriginRouter { config, total })
    }

    fn on_request(&self, req: &Request) -> RequestDecision {
        match self.choose(req) {
            Some(origin) => RequestDecision::new().route_to(origin),
            None => RequestDecision::new(),
        }
    }
}

export_plugin!(OriginRouter);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::load;

    fn router() -> OriginRouter {
        load(
            br#"{
                "routes": [
                    {"origin": "beta", "header": {"name": "x-beta", "value": "1"}},
                    {"origin": "admin", "path_prefix": "/admin/", "cookie": {"name": "role"}}
                ],
                "split": {"weights": {"stable": 90, "canary": 10}, "sticky": {"cookie": "session"}}
            }"#,
        )
        .unwrap()
    }

    #[test]
    fn routes_match_by_header_cookie_and_path() {
        let r = router();
        let req = Request::new("GET", "https://app.test/x").with_header("x-beta", "1");
        assert_eq!(r.choose(&req), Some("beta"));
        let req = Request::new("GET", "https://app.test/admin/users")
            .with_header("cookie", "a=b; role=ops");
        assert_eq!(r.choose(&req), Some("admin"));
        let req = Request::new("GET", "https://app.test/admin/users");
        assert_ne!(
            r.choose(&req),
            Some("admin"),
            "the cookie condition must hold too"
        );
    }

    #[test]
    fn split_is_weighted_and_sticky() {
        let r = router();
        let mut canary = 0;
        for i in 0..10_000 {
            let req = Request::new("GET", "https://app.test/")
                .with_header("cookie", &format!("session=user-{i}"));
            let first = r.choose(&req).unwrap().to_string();
            assert_eq!(r.choose(&req).unwrap(), first, "same session, same origin");
            if first == "canary" {
                canary += 1;
            }
        }
        assert!(
            (800..=1200).contains(&canary),
            "canary got {canary} of 10000"
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(load::<OriginRouter>(br#"{}"#).is_err());
        assert!(load::<OriginRouter>(br#"{"split": {"weights": {"a": 0}}}"#).is_err());
        assert!(load::<OriginRouter>(br#"{"routes": [{"origin": "a"}]}"#)
            .unwrap_err()
            .contains("no condition"));
    }
}
