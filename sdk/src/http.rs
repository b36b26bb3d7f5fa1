//! Outbound HTTP calls: fetch a JWKS, ask a policy service. Needs the operator's `http` grant
//! and an allow-list naming what the plugin may reach (`allow-hosts`, `allow-origins`): a
//! plugin that uses this module is refused at load without the grant, and a call elsewhere
//! fails with [`Error::Denied`].
//!
//! ```no_run
//! use std::time::Duration;
//! use sluice_sdk::http;
//!
//! let keys = http::Request::get("https://auth.example.com/.well-known/jwks.json")
//!     .header("accept", "application/json")
//!     .timeout(Duration::from_secs(2))
//!     .send()?;
//! if keys.status == 200 {
//!     let doc: serde_json::Value = keys.json().map_err(|e| http::Error::Failed(e.to_string()))?;
//! }
//! // A configured origin, by name (it must be on the plugin's `allow-origins`):
//! let verdict = http::Request::post("/check", b"{}".to_vec()).origin("policy").send()?;
//! # Ok::<(), http::Error>(())
//! ```
//!
//! The hook waits for the whole response; the host does the I/O without holding a connector
//! thread, and the time waited does not count against the hook's deadline. Each call has the
//! operator's deadline (5 s by default) and response cap (1 MiB by default); redirects are
//! not followed. A hook call may make 16 calls. Cache what you fetch (in [`crate::kv`]):
//! a call per request is a network round trip per request.
//!
//! In a native build (unit tests) calls are answered by the responses scripted with
//! [`crate::testing::http_respond`] and recorded for [`crate::testing::http_calls`].

use std::time::Duration;

/// A request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: String,
    /// An absolute `https://` or `http://` URL, or with [`Request::origin`] a path.
    pub url: String,
    /// A configured origin to call instead of a host.
    pub origin: Option<String>,
    /// Request headers (lowercase names).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
    /// A deadline shorter than the operator's.
    pub timeout: Option<Duration>,
}

impl Request {
    /// A request with `method` for `url`.
    pub fn new(method: &str, url: impl Into<String>) -> Self {
        Request {
            method: method.to_ascii_uppercase(),
            url: url.into(),
            origin: None,
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
        }
    }

    /// A `GET`.
    pub fn get(url: impl Into<String>) -> Self {
        Request::new("GET", url)
    }

    /// A `POST` with `body`.
    pub fn post(url: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        Request::new("POST", url).body(body)
    }

    /// Sends the request to the configured origin `name`; the URL is then a path.
    pub fn origin(mut self, name: &str) -> Self {
        self.origin = Some(name.to_string());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_ref().to_vec()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// A deadline shorter than the operator's `http-timeout` (a longer one is cut to it).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// How the call is named in test scripts: the URL, or `origin:NAME/path`.
    pub fn target(&self) -> String {
        match &self.origin {
            Some(o) => format!("origin:{o}{}", self.url),
            None => self.url.clone(),
        }
    }

    /// Sends the request and waits for the whole response.
    pub fn send(self) -> Result<Response, Error> {
        imp::send(self)
    }
}

/// A `GET` of `url` with no header.
pub fn get(url: &str) -> Result<Response, Error> {
    Request::get(url).send()
}

/// A response, read in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status.
    pub status: u16,
    /// Headers, lowercase names, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with `status` and `body` (for test scripts).
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// The same response with one more header (for test scripts).
    pub fn with_header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_ref().to_vec()));
        self
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The destination is not on the plugin's allow-list, or the hook made its 16 calls.
    Denied(String),
    /// The request is invalid: a bad URL, method or header (framing headers and `host` are
    /// the host's).
    Invalid(String),
    /// The deadline passed.
    Timeout,
    /// The response body is larger than the operator's cap (bytes announced or read).
    TooLarge(u64),
    /// Connection, TLS or protocol failure.
    Failed(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Denied(m) => write!(f, "http call denied: {m}"),
            Error::Invalid(m) => write!(f, "invalid http request: {m}"),
            Error::Timeout => f.write_str("http call timed out"),
            Error::TooLarge(n) => write!(f, "http response too large ({n} bytes)"),
            Error::Failed(m) => write!(f, "http call failed: {m}"),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::{Error, Request, Response};
    use crate::__bindings::sluice::plugin::http as wit;
    use crate::__bindings::sluice::plugin::types::HeaderParam;

    pub(super) fn send(req: Request) -> Result<Response, Error> {
        let timeout_ms = req
            .timeout
            .map(|t| u32::try_from(t.as_millis()).unwrap_or(u32::MAX));
        let headers: Vec<HeaderParam<'_>> = req
            .headers
            .iter()
            .map(|(name, value)| HeaderParam { name, value })
            .collect();
        let out = wit::OutboundRequest {
            method: &req.method,
            url: &req.url,
            origin: req.origin.as_deref(),
            headers: &headers,
            body: &req.body,
            timeout_ms,
        };
        match wit::send(out) {
            Ok(r) => Ok(Response {
                status: r.status,
                headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
                body: r.body,
            }),
            Err(wit::HttpError::Denied(m)) => Err(Error::Denied(m)),
            Err(wit::HttpError::Invalid(m)) => Err(Error::Invalid(m)),
            Err(wit::HttpError::Timeout) => Err(Error::Timeout),
            Err(wit::HttpError::TooLarge(n)) => Err(Error::TooLarge(n)),
            Err(wit::HttpError::Failed(m)) => Err(Error::Failed(m)),
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
use crate::testing::http_fake as imp;

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn scripted_answers_come_in_turn_and_every_call_is_recorded() {
        testing::clear_http();
        let jwks = "https://auth.example.com/jwks";
        testing::http_respond(jwks, Response::new(503, "busy"));
        testing::http_respond(
            jwks,
            Response::new(200, r#"{"keys":[]}"#).with_header("Content-Type", "application/json"),
        );
        testing::http_fail("origin:policy/check", Error::Timeout);

        assert_eq!(get(jwks).unwrap().status, 503);
        let ok = Request::get(jwks)
            .header("Accept", "application/json")
            .send()
            .unwrap();
        assert!(ok.is_success());
        assert_eq!(ok.header("content-type"), Some(&b"application/json"[..]));
        let doc: serde_json::Value = ok.json().unwrap();
        assert_eq!(doc["keys"], serde_json::json!([]));
        assert_eq!(get(jwks).unwrap().status, 200, "the last answer stays");
        let denied = Request::post("/check", "{}").origin("policy").send();
        assert_eq!(denied, Err(Error::Timeout));
        assert!(
            matches!(get("https://elsewhere.test/"), Err(Error::Failed(m)) if m.contains("no scripted response"))
        );

        let calls = testing::http_calls();
        assert_eq!(calls.len(), 5);
        assert_eq!(
            calls[1].headers,
            [("accept".to_string(), b"application/json".to_vec())]
        );
        assert_eq!(calls[3].target(), "origin:policy/check");
        assert_eq!(calls[3].method, "POST");
        testing::reset();
        assert!(testing::http_calls().is_empty());
    }
}
