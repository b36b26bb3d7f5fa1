//! cors: Cross-Origin Resource Sharing at the connector. A preflight (`OPTIONS` with
//! `origin` and `access-control-request-method`) is answered locally, without reaching the
//! origin; an actual request from an allowed origin gets the `access-control-*` response
//! headers. The request's origin is kept in the request's context from `on_request` to
//! `on_response`.

use serde::Deserialize;
use sluice_sdk::{
    context, export_plugin, LocalResponse, Plugin, Request, RequestDecision, Response,
    ResponseDecision,
};

/// The operator's `[plugin.config]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Origins allowed (`https://app.example.com`), or `["*"]` for any.
    pub allow_origins: Vec<String>,
    /// Methods a preflight may ask for.
    #[serde(default = "default_methods")]
    pub allow_methods: Vec<String>,
    /// Request headers a preflight may ask for (case-insensitive).
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers the browser may show to the page.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Whether cookies and credentials may be sent (never with `*`).
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight's answer, in seconds.
    #[serde(default = "default_max_age")]
    pub max_age: u32,
}

fn default_methods() -> Vec<String> {
    ["GET", "HEAD", "POST"].map(String::from).to_vec()
}

fn default_max_age() -> u32 {
    600
}

/// The plugin.
#[derive(Debug)]
pub struct Cors {
    config: Config,
    any_origin: bool,
}

/// The context key under which `on_request` leaves an allowed origin for `on_response`.
const ORIGIN: &str = "origin";

impl Cors {
    fn allowed(&self, origin: &str) -> bool {
        self.any_origin || self.config.allow_origins.iter().any(|o| o == origin)
    }

    /// The value of `access-control-allow-origin` for an allowed `origin`.
    fn allow_origin_value<'a>(&self, origin: &'a str) -> &'a str {
        if self.any_origin && !self.config.allow_credentials {
            "*"
        } else {
            origin
        }
    }

    fn preflight(&self, req: &Request, origin: &str, method: &str) -> RequestDecision {
        let method_ok = self
            .config
            .allow_methods
            .iter()
            .any(|m| m.eq_ignore_ascii_case(method));
        let asked: Vec<String> = req
            .header("access-control-request-headers")
            .unwrap_or("")
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        let headers_ok = asked.iter().all(|h| {
            self.config
                .allow_headers
                .iter()
                .any(|a| a.eq_ignore_ascii_case(h))
        });
        if !self.allowed(origin) || !method_ok || !headers_ok {
            // No CORS headers: the browser refuses the actual request.
            return RequestDecision::new()
                .respond(LocalResponse::new(403).text("CORS preflight refused\n"));
        }
        let mut resp = LocalResponse::new(204)
            .header(
                "access-control-allow-origin",
                self.allow_origin_value(origin),
            )
            .header(
                "access-control-allow-methods",
                &self.config.allow_methods.join(", "),
            )
            .header("access-control-max-age", &self.config.max_age.to_string())
            .header("vary", "origin");
        if !asked.is_empty() {
            resp = resp.header("access-control-allow-headers", &asked.join(", "));
        }
        if self.config.allow_credentials {
            resp = resp.header("access-control-allow-credentials", "true");
        }
        RequestDecision::new().respond(resp)
    }
}

impl Plugin for Cors {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.allow_origins.is_empty() {
            return Err("allow-origins is empty: list the origins, or [\"*\"]".into());
        }
        let any_origin = config.allow_origins.iter().any(|o| o == "*");
        if any_origin && config.allow_origins.len() > 1 {
            return Err("allow-origins: \"*\" stands alone".into());
        }
        for o in &config.allow_origins {
            if o != "*" && !(o.starts_with("https://") || o.starts_with("http://")) {
                return Err(format!(
                    "allow-origins: {o:?} is not an origin (scheme://host[:port])"
                ));
            }
            if o.ends_with('/') {
                return Err(format!("allow-origins: {o:?}: an origin has no path"));
            }
        }
        Ok(Cors { config, any_origin })
    }

    fn on_request(&self, req: &Request) -> RequestDecision {
        let Some(origin) = req.header("origin") else {
            return RequestDecision::new();
        };
        if req.method() == "OPTIONS" {
            if let Some(method) = req.header("access-control-request-method") {
                return self.preflight(req, origin, method);
            }
        }
        if self.allowed(origin) {
            // A context this small always fits.
            let _ = context::set(ORIGIN, origin);
        }
        RequestDecision::new()
    }

    fn on_response(&self, _req: &Request, _resp: &Response) -> ResponseDecision {
        let mut d = ResponseDecision::new().append_header("vary", "origin");
        let Some(origin) = context::get_str(ORIGIN) else {
            return d;
        };
        d = d.set_header(
            "access-control-allow-origin",
            self.allow_origin_value(&origin),
        );
        if self.config.allow_credentials {
            d = d.set_header("access-control-allow-credentials", "true");
        }
        if !self.config.expose_headers.is_empty() {
            d = d.set_header(
                "access-control-expose-headers",
                &self.config.expose_headers.join(", "),
            );
        }
        d
    }
}

export_plugin!(Cors);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::{testing, HeaderEdit};

    fn cors(config: &str) -> Cors {
        sluice_sdk::load(config.as_bytes()).unwrap()
    }

    fn header<'a>(r: &'a LocalResponse, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    fn preflight(origin: &str, method: &str, headers: &str) -> Request<'static> {
        Request::new("OPTIONS", "https://api.test/items")
            .with_header("origin", origin)
            .with_header("access-control-request-method", method)
            .with_header("access-control-request-headers", headers)
    }

    const APP: &str = r#"{"allow-origins": ["https://app.test"], "allow-methods": ["GET", "PUT"],
        "allow-headers": ["content-type", "x-token"], "expose-headers": ["x-total"],
        "allow-credentials": true, "max-age": 60}"#;

    #[test]
    fn preflights_are_answered_or_refused() {
        let p = cors(APP);
        let ok = p
            .on_request(&preflight(
                "https://app.test",
                "PUT",
                "Content-Type, X-Token",
            ))
            .respond
            .unwrap();
        assert_eq!(ok.status, 204);
        assert_eq!(
            header(&ok, "access-control-allow-origin"),
            Some("https://app.test")
        );
        assert_eq!(
            header(&ok, "access-control-allow-methods"),
            Some("GET, PUT")
        );
        assert_eq!(
            header(&ok, "access-control-allow-headers"),
            Some("content-type, x-token")
        );
        assert_eq!(
            header(&ok, "access-control-allow-credentials"),
            Some("true")
        );
        assert_eq!(header(&ok, "access-control-max-age"), Some("60"));
        for refused in [
            preflight("https://evil.test", "PUT", ""),
            preflight("https://app.test", "DELETE", ""),
            preflight("https://app.test", "GET", "x-other"),
        ] {
            let r = p.on_request(&refused).respond.unwrap();
            assert_eq!(r.status, 403);
            assert_eq!(header(&r, "access-control-allow-origin"), None);
        }
    }

    #[test]
    fn actual_requests_get_headers_only_for_allowed_origins() {
        let p = cors(APP);
        let ok = Response {
            status: 200,
            headers: Vec::new(),
        };
        testing::reset();
        let req =
            Request::new("GET", "https://api.test/items").with_header("origin", "https://app.test");
        assert_eq!(p.on_request(&req), RequestDecision::new());
        let d = p.on_response(&req, &ok);
        assert!(d.headers.contains(&HeaderEdit::Set(
            "access-control-allow-origin".into(),
            b"https://app.test".to_vec()
        )));
        assert!(d.headers.contains(&HeaderEdit::Set(
            "access-control-expose-headers".into(),
            b"x-total".to_vec()
        )));
        testing::reset();
        let other = Request::new("GET", "https://api.test/items")
            .with_header("origin", "https://evil.test");
        p.on_request(&other);
        let d = p.on_response(&other, &ok);
        assert_eq!(d, ResponseDecision::new().append_header("vary", "origin"));
    }

    #[test]
    fn any_origin_is_a_star_unless_credentials_are_allowed() {
        let p = cors(r#"{"allow-origins": ["*"]}"#);
        let r = p
            .on_request(&preflight("https://x.test", "GET", ""))
            .respond
            .unwrap();
        assert_eq!(header(&r, "access-control-allow-origin"), Some("*"));
        let p = cors(r#"{"allow-origins": ["*"], "allow-credentials": true}"#);
        let r = p
            .on_request(&preflight("https://x.test", "GET", ""))
            .respond
            .unwrap();
        assert_eq!(
            header(&r, "access-control-allow-origin"),
            Some("https://x.test")
        );
    }

    #[test]
    fn bad_configurations_are_refused() {
        for (config, expect) in [
            (r#"{"allow-origins": []}"#, "is empty"),
            (
                r#"{"allow-origins": ["*", "https://a.test"]}"#,
                "stands alone",
            ),
            (r#"{"allow-origins": ["app.test"]}"#, "is not an origin"),
            (r#"{"allow-origins": ["https://app.test/"]}"#, "has no path"),
        ] {
            let err = sluice_sdk::load::<Cors>(config.as_bytes()).unwrap_err();
            assert!(err.contains(expect), "{config}: {err}");
        }
    }
}
