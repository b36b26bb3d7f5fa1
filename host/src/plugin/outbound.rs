//! Outbound HTTP calls of plugins granted `http` (the `sluice:plugin/http` import).
//!
//! A plugin reaches only what its operator listed: hosts of `allow-hosts` (by name, as the
//! URL gives it, before any resolution) and origins of `allow-origins` (through the origin's
//! own client, so with its TLS settings). Each call has a deadline and a response-size cap of
//! its own; the host does the I/O on the request's task while the hook's fiber is suspended,
//! and the time spent waiting is not charged to the hook's deadline (see [`WaitClock`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::HttpPolicy;
use crate::origin::Origin;

/// Calls one hook call may make.
pub const MAX_CALLS_PER_HOOK: u32 = 16;
/// Largest request body a plugin may send.
pub const MAX_REQUEST_BODY: usize = 1 << 20;

/// One call, as the plugin asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Method.
    pub method: String,
    /// An absolute URL, or a path when `origin` is set.
    pub url: String,
    /// A configured origin to call instead of a host.
    pub origin: Option<String>,
    /// Request headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Request body.
    pub body: Vec<u8>,
    /// The plugin's own deadline, when shorter than the operator's.
    pub timeout: Option<Duration>,
}

impl Call {
    /// How the call reads in logs and reports: `GET https://auth.example.com/jwks` or
    /// `GET origin:policy/check`.
    pub fn target(&self) -> String {
        match &self.origin {
            Some(o) => format!("{} origin:{o}{}", self.method, self.url),
            None => format!("{} {}", self.method, self.url),
        }
    }
}

/// A response read in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Status.
    pub status: u16,
    /// Headers, lowercase names, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub body: Vec<u8>,
}

/// Why a call failed (the `http-error` of the interface).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Not on the allow-list, or past the calls of a hook call.
    #[error("denied: {0}")]
    Denied(String),
    /// A bad URL, method or header.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The deadline passed.
    #[error("timed out")]
    Timeout,
    /// The body passed the cap (bytes).
    #[error("response larger than {0} bytes")]
    TooLarge(u64),
    /// Connection, TLS or protocol failure.
    #[error("{0}")]
    Failed(String),
}

/// Canned answers for `sluice plugin test --http`: calls are answered from here, in the order
/// given for a repeated target, and recorded; nothing leaves the process.
#[derive(Debug, Default)]
pub struct Script {
    answers: Mutex<Vec<(String, Answer)>>,
    calls: Mutex<Vec<String>>,
}

impl Script {
    /// Answers for targets: a URL (`https://auth.example.com/jwks`) or `origin:NAME/path`.
    pub fn new(answers: Vec<(String, Answer)>) -> Self {
        Script {
            answers: Mutex::new(answers),
            calls: Mutex::default(),
        }
    }

    /// One line per call made: what was asked and what came back.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn answer(&self, call: &Call) -> Result<Answer, CallError> {
        let key = match &call.origin {
            Some(o) => format!("origin:{o}{}", call.url),
            None => call.url.clone(),
        };
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        let found = answers.iter().position(|(k, _)| *k == key);
        // The last answer for a target stays for later calls; earlier ones are used once.
        let result = match found {
            Some(i) if answers.iter().filter(|(k, _)| *k == key).count() > 1 => {
                Ok(answers.remove(i).1)
            }
            Some(i) => Ok(answers[i].1.clone()),
            None => Err(CallError::Failed(format!(
                "no scripted response for {key} (give one with --http)"
            ))),
        };
        let line = match &result {
            Ok(a) => format!("{} -> {} ({} bytes)", call.target(), a.status, a.body.len()),
            Err(e) => format!("{} -> {e}", call.target()),
        };
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
        result
    }
}

/// Checks and normalises one `allow-hosts` entry.
pub fn host_pattern(entry: &str) -> Result<String, String> {
    let p = entry.trim().to_ascii_lowercase();
    let (host, port) = split_port(&p);
    let name = host.strip_prefix("*.").unwrap_or(host);
    let valid_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if !valid_name || name.contains('*') || port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(format!(
            "invalid host {entry:?}: use a name (auth.example.com), a wildcard (*.example.com) or an address, with an optional :port"
        ));
    }
    Ok(p)
}

/// `host:port` into host and port; an IPv6 literal keeps its brackets.
fn split_port(s: &str) -> (&str, Option<&str>) {
    match s.rfind(':') {
        Some(i) if !s[i..].contains(']') && s[..i].matches(':').count() == 0 => {
            (&s[..i], Some(&s[i + 1..]))
        }
        Some(i) if s.starts_with('[') && s[..i].ends_with(']') => (&s[..i], Some(&s[i + 1..])),
        _ => (s, None),
    }
}

/// Whether `host` (lowercase, as in the URL) on `port` matches one of the patterns.
fn allowed(patterns: &[String], host: &str, port: u16) -> bool {
    patterns.iter().any(|p| {
        let (ph, pp) = split_port(p);
        if pp.is_some_and(|pp| pp.parse() != Ok(port)) {
            return false;
        }
        match ph.strip_prefix("*.") {
            Some(domain) => host
                .strip_suffix(domain)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => ph == host,
        }
    })
}

/// Time a hook call spent waiting on outbound calls, including one in progress: the hook's
/// deadline is extended by it, so that the deadline bounds the plugin's own work.
#[derive(Debug, Default)]
pub struct WaitClock(Mutex<(Duration, Option<Instant>)>);

impl WaitClock {
    /// Starts a new hook call.
    pub fn reset(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = (Duration::ZERO, None);
    }

    /// The time waited so far.
    pub fn waited(&self) -> Duration {
        let (total, since) = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        total + since.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// Runs `f`, counting its time as waiting.
    pub async fn wait<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).1 = Some(Instant::now());
        let out = f.await;
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = state.1.take() {
            state.0 += s.elapsed();
        }
        out
    }
}

/// Runs a hook call under `limit` of wall-clock time not spent waiting on `clock`; `None`
/// when that ran out.
pub async fn within<T>(
    limit: Duration,
    clock: &WaitClock,
    f: impl std::future::Future<Output = T>,
) -> Option<T> {
    let start = tokio::time::Instant::now();
    tokio::pin!(f);
    loop {
        let waited = clock.waited();
        match tokio::time::timeout_at(start + limit + waited, &mut f).await {
            Ok(v) => return Some(v),
            Err(_) if clock.waited() > waited => continue,
            Err(_) => return None,
        }
    }
}

type HostClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One plugin's outbound calls: its policy, a client for allowed hosts and one for each
/// allowed origin. Shared by the plugin's instances.
pub struct Outbound {
    plugin: Arc<str>,
    policy: HttpPolicy,
    client: HostClient,
    origins: HashMap<String, Origin>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("plugin", &self.plugin)
            .field("allow_hosts", &self.policy.allow_hosts)
            .finish_non_exhaustive()
    }
}

impl Outbound {
    /// The clients of `plugin`'s policy.
    pub fn new(plugin: Arc<str>, policy: HttpPolicy) -> Result<Outbound, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(policy.timeout));
        let tls = crate::tls::origin_client(&policy.ca, false, None).map_err(|e| e.to_string())?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let mut origins = HashMap::new();
        for o in &policy.allow_origins {
            let origin = Origin::new(o.clone()).map_err(|e| format!("origin {:?}: {e}", o.name))?;
            origins.insert(o.name.clone(), origin);
        }
        Ok(Outbound {
            plugin,
            policy,
            client,
            origins,
        })
    }

    /// Makes one call, within its deadline and size cap.
    pub async fn send(&self, call: Call) -> Result<Answer, CallError> {
        if let Some(script) = &self.policy.script {
            return script.answer(&call);
        }
        let timeout = call
            .timeout
            .map_or(self.policy.timeout, |t| t.min(self.policy.timeout));
        let target = call.target();
        let result = match tokio::time::timeout(timeout, self.exchange(call)).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        };
        match &result {
            Ok(a) => tracing::debug!(plugin = &*self.plugin, status = a.status, "http {target}"),
            Err(e) => tracing::debug!(plugin = &*self.plugin, "http {target} failed: {e}"),
        }
        result
    }

    async fn exchange(&self, call: Call) -> Result<Answer, CallError> {
        let method = Method::from_bytes(call.method.as_bytes())
            .ok()
            .filter(|m| *m != Method::CONNECT)
            .ok_or_else(|| CallError::Invalid(format!("method {:?}", call.method)))?;
        if call.body.len() > MAX_REQUEST_BODY {
            return Err(CallError::Invalid(format!(
                "a body of {} bytes; the limit is {MAX_REQUEST_BODY}",
                call.body.len()
            )));
        }
        let mut builder = Request::builder().method(method);
        for (name, value) in &call.headers {
            let (name, value) = header(name, value)?;
            builder = builder.header(name, value);
        }
        if !call.headers.iter().any(|(n, _)| n == "user-agent") {
            builder = builder.header("user-agent", format!("sluice plugin {}", self.plugin));
        }
        let body = Bytes::from(call.body);
        let response = match &call.origin {
            Some(name) => {
                let origin = self.origins.get(name).ok_or_else(|| {
                    CallError::Denied(format!("origin {name:?} is not on allow-origins"))
                })?;
                if !call.url.starts_with('/') {
                    return Err(CallError::Invalid(format!(
                        "{:?}: a call to an origin takes a path starting with /",
                        call.url
                    )));
                }
                let req = builder
                    .uri(&call.url)
                    .body(
                        Full::new(body)
                            .map_err(|e| -> crate::relay::BoxError { match e {} })
                            .boxed(),
                    )
                    .map_err(|e| CallError::Invalid(e.to_string()))?;
                origin
                    .send(req)
                    .await
                    .map_err(|e| CallError::Failed(e.to_string()))?
                    .map(|b| b.map_err(|e| CallError::Failed(e.to_string())).boxed())
            }
            None => {
                let uri = self.check_url(&call.url)?;
                let req = builder
                    .uri(uri)
                    .body(Full::new(body))
                    .map_err(|e| CallError::Invalid(e.to_string()))?;
                self.client
                    .request(req)
                    .await
                    .map_err(|e| CallError::Failed(crate::origin::error_chain(&e)))?
                    .map(|b| b.map_err(|e| CallError::Failed(e.to_string())).boxed())
            }
        };
        self.read(response).await
    }

    /// Parses an absolute URL and checks its host against the allow-list.
    fn check_url(&self, url: &str) -> Result<Uri, CallError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| CallError::Invalid(format!("URL {url:?}: {e}")))?;
        let port = match uri.scheme_str() {
            Some("https") => 443,
            Some("http") => 80,
            _ => {
                return Err(CallError::Invalid(format!(
                    "URL {url:?}: use an absolute http:// or https:// URL, or name an origin"
                )))
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| CallError::Invalid(format!("URL {url:?} has no host")))?;
        if authority.as_str().contains('@') {
            return Err(CallError::Invalid(format!(
                "URL {url:?}: credentials in the URL are not sent; use a header"
            )));
        }
        let host = authority.host().to_ascii_lowercase();
        let port = authority.port_u16().unwrap_or(port);
        if !allowed(&self.policy.allow_hosts, &host, port) {
            return Err(CallError::Denied(format!(
                "{host}:{port} is not on the plugin's allow-hosts"
            )));
        }
        Ok(uri)
    }

    async fn read(
        &self,
        response: http::Response<http_body_util::combinators::BoxBody<Bytes, CallError>>,
    ) -> Result<Answer, CallError> {
        let cap = self.policy.max_response;
        let announced = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let Some(n) = announced.filter(|n| *n > cap as u64) {
            return Err(CallError::TooLarge(n));
        }
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, cap)
            .collect()
            .await
            .map_err(|e| match e.downcast::<CallError>() {
                Ok(e) => *e,
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    CallError::TooLarge(cap as u64 + 1)
                }
                Err(e) => CallError::Failed(e.to_string()),
            })?
            .to_bytes();
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect(),
            body: body.to_vec(),
        })
    }
}

fn header(name: &str, value: &[u8]) -> Result<(HeaderName, HeaderValue), CallError> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| CallError::Invalid(format!("header name {name:?}")))?;
    let name = parsed.as_str();
    if name == "host" || super::decision::FORBIDDEN.contains(&name) || name.starts_with("proxy-") {
        return Err(CallError::Invalid(format!(
            "header {name:?} is set by the host"
        )));
    }
    let value = HeaderValue::from_bytes(value)
        .map_err(|_| CallError::Invalid(format!("value of header {name:?}")))?;
    Ok((parsed, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_matches_names_wildcards_and_ports() {
        let p: Vec<String> = [
            "auth.example.com",
            "*.example.net",
            "127.0.0.1:8080",
            "[::1]",
        ]
        .iter()
        .map(|h| host_pattern(h).unwrap())
        .collect();
        assert!(allowed(&p, "auth.example.com", 443));
        assert!(allowed(&p, "auth.example.com", 8443));
        assert!(!allowed(&p, "evil-auth.example.com", 443));
        assert!(!allowed(&p, "auth.example.com.evil.org", 443));
        assert!(allowed(&p, "a.example.net", 443));
        assert!(allowed(&p, "a.b.example.net", 443));
        assert!(!allowed(&p, "example.net", 443));
        assert!(!allowed(&p, "aexample.net", 443));
        assert!(allowed(&p, "127.0.0.1", 8080));
        assert!(!allowed(&p, "127.0.0.1", 8081));
        assert!(allowed(&p, "[::1]", 80));
        for bad in ["", "*", "a.*.com", "host:port", "exa mple.com", "*.:80"] {
            assert!(host_pattern(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_plugin_cannot_set_the_framing_or_the_host() {
        for name in [
            "host",
            "content-length",
            "transfer-encoding",
            "proxy-authorization",
        ] {
            assert!(
                matches!(header(name, b"x"), Err(CallError::Invalid(_))),
                "{name}"
            );
        }
        assert!(header("authorization", b"Bearer x").is_ok());
        assert!(header("x-bad", b"a\nb").is_err());
    }

    #[tokio::test]
    async fn waiting_on_calls_extends_the_hook_deadline_and_nothing_else_does() {
        let clock = WaitClock::default();
        // Waiting 80 ms inside a 30 ms budget: the wait does not count.
        let done = within(Duration::from_millis(30), &clock, async {
            clock
                .wait(tokio::time::sleep(Duration::from_millis(80)))
                .await;
            "done"
        })
        .await;
        assert_eq!(done, Some("done"));
        clock.reset();
        // Working (here: sleeping outside a call) past the budget does.
        let late = within(Duration::from_millis(30), &clock, async {
            tokio::time::sleep(Duration::from_millis(200)).await;
        })
        .await;
        assert_eq!(late, None);
    }

    #[test]
    fn a_script_answers_in_order_and_records_each_call() {
        let ok = |status| Answer {
            status,
            headers: Vec::new(),
            body: b"x".to_vec(),
        };
        let script = Script::new(vec![
            ("https://a.test/k".into(), ok(500)),
            ("https://a.test/k".into(), ok(200)),
        ]);
        let call = Call {
            method: "GET".into(),
            url: "https://a.test/k".into(),
            origin: None,
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
        };
        assert_eq!(script.answer(&call).unwrap().status, 500);
        assert_eq!(script.answer(&call).unwrap().status, 200);
        assert_eq!(script.answer(&call).unwrap().status, 200);
        let other = Call {
            url: "https://b.test/".into(),
            ..call
        };
        assert!(matches!(script.answer(&other), Err(CallError::Failed(_))));
        assert_eq!(
            script.calls(),
            [
                "GET https://a.test/k -> 500 (1 bytes)",
                "GET https://a.test/k -> 200 (1 bytes)",
                "GET https://a.test/k -> 200 (1 bytes)",
                "GET https://b.test/ -> no scripted response for https://b.test/ (give one with --http)",
            ]
        );
    }
}
