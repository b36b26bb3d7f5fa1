//! A test host for native unit tests: what a plugin logs and emits is recorded per thread, so
//! plugin logic can be tested with plain `cargo test`, no proxy needed.
//!
//! ```
//! use sluice_sdk::{testing, Plugin, Request, RequestDecision};
//!
//! struct Hello;
//! impl Plugin for Hello {
//!     type Config = serde_json::Value;
//!     fn new(_: serde_json::Value) -> Result<Self, String> { Ok(Hello) }
//!     fn on_request(&self, req: &Request) -> RequestDecision {
//!         sluice_sdk::audit::emit("seen", &[("path", req.path())]);
//!         RequestDecision::new().set_header("x-hello", "1")
//!     }
//! }
//!
//! testing::reset();
//! let plugin: Hello = sluice_sdk::load(br#"{}"#).unwrap();
//! let d = plugin.on_request(&Request::new("GET", "https://app.test/x"));
//! assert_eq!(d, RequestDecision::new().set_header("x-hello", "1"));
//! assert_eq!(testing::events()[0].kind, "seen");
//! ```

use std::cell::RefCell;

use crate::log::Level;

/// An audit event recorded by the test host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Event kind.
    pub kind: String,
    /// Attributes, in order.
    pub attributes: Vec<(String, String)>,
}

impl Event {
    /// The value of attribute `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

thread_local! {
    static LOGS: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
    static EVENTS: RefCell<Vec<Event>> = const { RefCell::new(Vec::new()) };
    static CONTEXT: RefCell<Vec<(String, Vec<u8>)>> = const { RefCell::new(Vec::new()) };
}

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn context_get(key: &str) -> Option<Vec<u8>> {
    CONTEXT.with(|c| {
        c.borrow()
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    })
}

/// The host's rules, so that a plugin over the limits fails its unit tests too.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn context_set(key: &str, value: &[u8]) -> Result<(), String> {
    use crate::context::{MAX_BYTES, MAX_KEY};
    if key.len() > MAX_KEY {
        return Err(format!(
            "context key of {} bytes; the limit is {MAX_KEY}",
            key.len()
        ));
    }
    CONTEXT.with(|c| {
        let mut c = c.borrow_mut();
        let others: usize = c
            .iter()
            .filter(|(k, _)| k != key)
            .map(|(k, v)| k.len() + v.len())
            .sum();
        let bytes = others + key.len() + value.len();
        if bytes > MAX_BYTES {
            return Err(format!(
                "the request's context would hold {bytes} bytes; the limit is {MAX_BYTES}"
            ));
        }
        c.retain(|(k, _)| k != key);
        c.push((key.to_string(), value.to_vec()));
        Ok(())
    })
}

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn context_remove(key: &str) {
    CONTEXT.with(|c| c.borrow_mut().retain(|(k, _)| k != key));
}

/// Log lines recorded on this thread.
pub fn logs() -> Vec<(Level, String)> {
    LOGS.with(|l| l.borrow().clone())
}

/// Audit events recorded on this thread.
pub fn events() -> Vec<Event> {
    EVENTS.with(|e| e.borrow().clone())
}

/// A capability the operator grants a plugin in its `[[plugin]]` block (`grants = [...]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// `client-addr`: the client's address and the headers that carry it.
    ClientAddr,
    /// `credentials`: `authorization`, `proxy-authorization`, `cookie`, `set-cookie`.
    Credentials,
}

/// Headers the host hides from plugins without [`Grant::Credentials`].
pub const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// Headers the host hides from plugins without [`Grant::ClientAddr`].
pub const CLIENT_ADDRESS_HEADERS: &[&str] = &["x-forwarded-for", "forwarded", "x-real-ip"];

/// `req` as the host shows it to a plugin granted only `grants`: what the others would
/// reveal is removed, as in production. Test a plugin under the grants the operator will
/// give it, so that a missing grant fails a unit test rather than a deployment.
///
/// ```
/// use sluice_sdk::testing::{granted, Grant};
/// use sluice_sdk::Request;
///
/// let req = Request::new("GET", "https://app.test/")
///     .with_header("authorization", "Bearer t")
///     .with_client_addr("203.0.113.7:50000");
/// let seen = granted(req.clone(), &[]);
/// assert_eq!(seen.header("authorization"), None);
/// assert_eq!(seen.client_addr(), None);
/// assert_eq!(granted(req, &[Grant::Credentials]).header("authorization"), Some("Bearer t"));
/// ```
pub fn granted(mut req: crate::Request<'static>, grants: &[Grant]) -> crate::Request<'static> {
    // Reads every part first: a request built by a test has them all.
    req.headers();
    req.client_addr();
    let headers = req.headers.get_mut().expect("read above");
    if !grants.contains(&Grant::ClientAddr) {
        req.client_addr = None.into();
        headers.retain(|(n, _)| !CLIENT_ADDRESS_HEADERS.contains(&n.as_str()));
    }
    if !grants.contains(&Grant::Credentials) {
        headers.retain(|(n, _)| !CREDENTIAL_HEADERS.contains(&n.as_str()));
    }
    req
}

/// Forgets everything recorded on this thread (logs, events, [`metric`]s), and the request's
/// [`crate::context`] (call it
/// between two requests of a test). The [`crate::kv`] store stays, as it does between
/// requests in the connector: see [`clear_kv`].
pub fn reset() {
    http_fake::CALLS.with(|c| c.borrow_mut().clear());
    LOGS.with(|l| l.borrow_mut().clear());
    EVENTS.with(|e| e.borrow_mut().clear());
    CONTEXT.with(|c| c.borrow_mut().clear());
    METRICS.with(|m| m.borrow_mut().clear());
}

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn record_log(level: Level, message: &str) {
    LOGS.with(|l| l.borrow_mut().push((level, message.to_string())));
}

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn record_event(kind: &str, attributes: &[(&str, &str)]) {
    EVENTS.with(|e| {
        e.borrow_mut().push(Event {
            kind: kind.to_string(),
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    });
}

thread_local! {
    static CLOCK: std::cell::Cell<std::time::Duration> = const { std::cell::Cell::new(std::time::Duration::ZERO) };
}

/// Moves the test clock forward: [`crate::clock::now`] is later by `by`, and [`crate::kv`]
/// keys whose time to live has passed are gone.
pub fn advance(by: std::time::Duration) {
    CLOCK.with(|c| c.set(c.get() + by));
}

/// Where the test clock starts (2023-11-14, a fixed instant: tests are repeatable).
pub const CLOCK_START: std::time::Duration = std::time::Duration::from_secs(1_700_000_000);

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn test_now() -> std::time::SystemTime {
    std::time::SystemTime::UNIX_EPOCH + CLOCK_START + CLOCK.with(|c| c.get())
}

/// Empties the [`crate::kv`] store of this thread and sets the test clock back to its start.
pub fn clear_kv() {
    kv_fake::STORE.with(|s| s.borrow_mut().clear());
    CLOCK.with(|c| c.set(std::time::Duration::ZERO));
}

/// What a body came to through a body hook, applied as the host applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyOutcome {
    /// The body that went on.
    Passed(Vec<u8>),
    /// The hook rejected the body with this response.
    Rejected(crate::LocalResponse),
}

/// Runs a body hook over `pieces` as the host does: bytes the hook holds come back before the
/// next piece, and a last call has `end` true (with what is still held, or nothing). The
/// calls share a context of their own, empty at the start, as in the host; the test's
/// [`crate::context`] is put back afterwards.
///
/// ```
/// use sluice_sdk::{testing, BodyAction};
///
/// // A hook that holds everything and upper-cases it at the end.
/// let out = testing::run_body(&[b"ab", b"c"], |chunk, end| match end {
///     false => BodyAction::Hold,
///     true => BodyAction::Replace(chunk.to_ascii_uppercase()),
/// });
/// assert_eq!(out, testing::BodyOutcome::Passed(b"ABC".to_vec()));
/// ```
pub fn run_body(
    pieces: &[&[u8]],
    mut hook: impl FnMut(&[u8], bool) -> crate::BodyAction,
) -> BodyOutcome {
    let saved = CONTEXT.with(|c| std::mem::take(&mut *c.borrow_mut()));
    let mut out = Vec::new();
    let mut kept: Vec<u8> = Vec::new();
    let mut result = None;
    let last = [&b""[..]];
    for (i, piece) in pieces.iter().chain(last.iter()).enumerate() {
        let end = i == pieces.len();
        if piece.is_empty() && !end {
            continue;
        }
        let mut input = std::mem::take(&mut kept);
        input.extend_from_slice(piece);
        match hook(&input, end) {
            crate::BodyAction::Pass => out.extend_from_slice(&input),
            crate::BodyAction::Hold if end => out.extend_from_slice(&input),
            crate::BodyAction::Hold => kept = input,
            crate::BodyAction::Replace(b) => out.extend_from_slice(&b),
            crate::BodyAction::Reject(r) => {
                result = Some(BodyOutcome::Rejected(r));
                break;
            }
        }
    }
    CONTEXT.with(|c| *c.borrow_mut() = saved);
    result.unwrap_or(BodyOutcome::Passed(out))
}

/// Scripts the answer to the next [`crate::http`] call to `target`: a URL as the plugin
/// gives it (`https://auth.example.com/jwks`), or `origin:NAME/path` for a call to a
/// configured origin. Several answers for one target are given in turn; the last one stays
/// for every later call. A call with no scripted answer fails with
/// [`crate::http::Error::Failed`]. Scripts stay across [`reset`]; [`clear_http`] forgets them.
pub fn http_respond(target: &str, response: crate::http::Response) {
    http_fake::SCRIPT.with(|s| s.borrow_mut().push((target.to_string(), Ok(response))));
}

/// Scripts a failure of the next [`crate::http`] call to `target` (as [`http_respond`]).
pub fn http_fail(target: &str, error: crate::http::Error) {
    http_fake::SCRIPT.with(|s| s.borrow_mut().push((target.to_string(), Err(error))));
}

/// The [`crate::http`] calls made on this thread since the last [`reset`], in order.
pub fn http_calls() -> Vec<crate::http::Request> {
    http_fake::CALLS.with(|c| c.borrow().clone())
}

/// Forgets the scripted [`crate::http`] answers and the calls made.
pub fn clear_http() {
    http_fake::SCRIPT.with(|s| s.borrow_mut().clear());
    http_fake::CALLS.with(|c| c.borrow_mut().clear());
}

/// The [`crate::http`] calls of native builds: scripted answers, recorded calls.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) mod http_fake {
    use std::cell::RefCell;

    use crate::http::{Error, Request, Response};

    type Scripted = Result<Response, Error>;

    thread_local! {
        pub(super) static SCRIPT: RefCell<Vec<(String, Scripted)>> = const { RefCell::new(Vec::new()) };
        pub(super) static CALLS: RefCell<Vec<Request>> = const { RefCell::new(Vec::new()) };
    }

    pub fn send(req: Request) -> Result<Response, Error> {
        let target = req.target();
        CALLS.with(|c| c.borrow_mut().push(req));
        SCRIPT.with(|s| {
            let mut s = s.borrow_mut();
            let matching: Vec<usize> = (0..s.len()).filter(|i| s[*i].0 == target).collect();
            match matching.as_slice() {
                [] => Err(Error::Failed(format!(
                    "no scripted response for {target} (script one with sluice_sdk::testing::http_respond)"
                ))),
                [only] => s[*only].1.clone(),
                [first, ..] => s.remove(*first).1,
            }
        })
    }
}

/// The [`crate::kv`] store of native builds: a map on the test thread, the host's rules.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) mod kv_fake {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::time::Duration;

    use crate::kv::{Error, MAX_KEY};

    /// Key → value and when it expires (on the test clock).
    type Store = HashMap<String, (Vec<u8>, Option<Duration>)>;

    thread_local! {
        pub(super) static STORE: RefCell<Store> = RefCell::new(HashMap::new());
    }

    fn now() -> Duration {
        super::CLOCK.with(|c| c.get())
    }

    fn check(key: &str) -> Result<(), Error> {
        if key.len() > MAX_KEY {
            return Err(Error::Quota(format!(
                "a key of {} bytes; the limit is {MAX_KEY}",
                key.len()
            )));
        }
        Ok(())
    }

    fn live(key: &str) -> Option<(Vec<u8>, Option<Duration>)> {
        STORE.with(|s| {
            let mut s = s.borrow_mut();
            if s.get(key)
                .is_some_and(|(_, e)| e.is_some_and(|e| e <= now()))
            {
                s.remove(key);
            }
            s.get(key).cloned()
        })
    }

    fn expiry(ttl_ms: Option<u64>) -> Option<Duration> {
        ttl_ms.map(|ms| now() + Duration::from_millis(ms))
    }

    fn put(key: &str, value: Vec<u8>, expires: Option<Duration>) {
        STORE.with(|s| s.borrow_mut().insert(key.to_string(), (value, expires)));
    }

    pub fn get(key: &str) -> Result<Option<Vec<u8>>, Error> {
        check(key)?;
        Ok(live(key).map(|(v, _)| v))
    }

    pub fn set(key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), Error> {
        check(key)?;
        put(key, value.to_vec(), expiry(ttl_ms));
        Ok(())
    }

    pub fn delete(key: &str) -> Result<bool, Error> {
        check(key)?;
        let was = live(key).is_some();
        STORE.with(|s| s.borrow_mut().remove(key));
        Ok(was)
    }

    pub fn compare_and_swap(
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
        ttl_ms: Option<u64>,
    ) -> Result<bool, Error> {
        check(key)?;
        if live(key).as_ref().map(|(v, _)| v.as_slice()) != expected {
            return Ok(false);
        }
        put(key, new.to_vec(), expiry(ttl_ms));
        Ok(true)
    }

    pub fn increment(key: &str, delta: i64, ttl_ms: Option<u64>) -> Result<i64, Error> {
        check(key)?;
        let (current, expires) = match live(key) {
            Some((v, e)) => {
                let n = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|t| t.parse::<i64>().ok())
                    .ok_or_else(|| {
                        Error::Backend(format!("the value of {key:?} is not an integer"))
                    })?;
                (n, e)
            }
            None => (0, expiry(ttl_ms)),
        };
        let sum = current
            .checked_add(delta)
            .ok_or_else(|| Error::Backend(format!("incrementing {key:?} overflows")))?;
        put(key, sum.to_string().into_bytes(), expires);
        Ok(sum)
    }
}

/// Metric name, sorted labels, value.
type Recorded = Vec<(String, Vec<(String, String)>, f64)>;

thread_local! {
    static METRICS: RefCell<Recorded> = const { RefCell::new(Vec::new()) };
}

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn record_metric(
    name: &str,
    mut labels: Vec<(String, String)>,
    update: impl FnOnce(f64) -> f64,
) -> Result<(), String> {
    labels.sort();
    METRICS.with(|m| {
        let mut m = m.borrow_mut();
        match m.iter_mut().find(|(n, l, _)| n == name && *l == labels) {
            Some((_, _, v)) => *v = update(*v),
            None => m.push((name.to_string(), labels, update(0.0))),
        }
    });
    Ok(())
}

/// The value of metric `name` with `labels` recorded on this thread: a counter's total, a
/// gauge's last value, a histogram's sum of observations. `None` if never touched.
pub fn metric(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    METRICS.with(|m| {
        m.borrow()
            .iter()
            .find(|(n, l, _)| n == name && *l == labels)
            .map(|(_, _, v)| *v)
    })
}
