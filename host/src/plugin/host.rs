//! What the host gives a plugin instance: its store data, the request view resource, the log
//! and audit imports, guest stdio captured into the log, and the memory limiter.

use std::sync::{Arc, Mutex};

use ::http::{HeaderMap, HeaderName};
use bytes::Bytes;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_io::streams::{OutputStream, StreamError};

use super::bindings::sluice::plugin::{context, http, kv, metrics};
use super::kv::{KvAccess, KvError};
use super::outbound::{Call, CallError, Outbound, WaitClock};
use crate::config::Grants;

/// Longest log message or audit value kept from a plugin; longer ones are cut.
const MAX_TEXT: usize = 4096;
/// Audit events one hook call may emit; more are dropped and counted.
pub const MAX_EVENTS_PER_CALL: usize = 256;

/// The request as the plugins of a chain see it, before grants: one per request, shared by
/// every plugin and hook of the chain, and changed only when a plugin edits the request.
/// What a plugin's grants hide is left out when it reads the view ([`SharedView`]), so a chain
/// whose plugins hold different grants does not copy the request for each set of them.
#[derive(Debug, Clone, Default)]
pub struct RequestView {
    /// Method.
    pub method: String,
    /// `http` or `https`.
    pub scheme: String,
    /// Authority as the client sent it.
    pub authority: String,
    /// Normalised path and query.
    pub path: String,
    /// Headers (names are lowercase), in the map's order: each name's values together, in
    /// the order they came.
    pub headers: HeaderMap,
    /// Request id.
    pub request_id: String,
    /// Tunnel hostname (lowercase, no port).
    pub hostname: String,
    /// Index of the matched ingress rule.
    pub ingress_rule: u32,
    /// Client address (shown only to plugins granted `client-addr`).
    pub client_addr: Option<String>,
}

/// The `request` resource: the request's view with the grants of the plugin it was handed
/// to. Every accessor filters through [`Grants::hides_header`] and the `client-addr` grant,
/// so nothing a plugin was not granted reaches it, whichever accessor it uses.
#[derive(Debug, Clone, Default)]
pub struct SharedView {
    view: Arc<RequestView>,
    grants: Grants,
}

impl SharedView {
    /// `view` as a plugin with `grants` may see it.
    pub fn new(view: Arc<RequestView>, grants: Grants) -> Self {
        SharedView { view, grants }
    }

    fn method(&self) -> String {
        self.view.method.clone()
    }

    fn scheme(&self) -> String {
        self.view.scheme.clone()
    }

    fn authority(&self) -> String {
        self.view.authority.clone()
    }

    fn path(&self) -> String {
        self.view.path.clone()
    }

    fn request_id(&self) -> String {
        self.view.request_id.clone()
    }

    fn hostname(&self) -> String {
        self.view.hostname.clone()
    }

    fn ingress_rule(&self) -> u32 {
        self.view.ingress_rule
    }

    /// Every value of header `name` (any case: the name is lowercased as it is parsed); none when the name is not a header name or
    /// the grants hide it.
    fn header(&self, name: &str) -> Vec<Vec<u8>> {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            return Vec::new();
        };
        if self.grants.hides_header(name.as_str()) {
            return Vec::new();
        }
        self.view
            .headers
            .get_all(&name)
            .iter()
            .map(|v| v.as_bytes().to_vec())
            .collect()
    }

    /// Every header the grants show, in order, as `(name, value)`.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.view
            .headers
            .iter()
            .filter(|(n, _)| !self.grants.hides_header(n.as_str()))
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
    }

    fn client_addr(&self) -> Option<String> {
        self.view
            .client_addr
            .clone()
            .filter(|_| self.grants.client_addr)
    }
}

/// An audit event as emitted by a plugin (the host adds its context later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    /// Event kind.
    pub kind: String,
    /// Attributes, in order.
    pub attributes: Vec<(String, String)>,
}

/// Per-store state.
pub struct StoreData {
    pub(super) plugin: Arc<str>,
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) limiter: Limiter,
    /// Audit events emitted during the current call.
    pub(super) events: Vec<RawEvent>,
    /// Events dropped during the current call (over [`MAX_EVENTS_PER_CALL`]).
    pub(super) dropped_events: usize,
    /// The context of the request the current call belongs to (lent by the chain).
    pub(super) context: Context,
    /// The plugin's key-value namespace, with the `kv` grant.
    pub(super) kv: Option<KvAccess>,
    /// The plugin's own metrics, with the `metrics` grant.
    pub(super) metrics: Option<super::metrics::PluginMetricsAccess>,
    /// The plugin's outbound calls, with the `http` grant.
    pub(super) outbound: Option<Arc<Outbound>>,
    /// Outbound calls made in the current hook call.
    pub(super) outbound_calls: u32,
    /// Time the current hook call spent waiting on outbound calls.
    pub(super) waiting: Arc<WaitClock>,
}

impl StoreData {
    /// Fresh state for one instance of `plugin` with a memory limit in bytes.
    pub fn new(plugin: Arc<str>, memory_limit: usize) -> Self {
        let mut wasi = WasiCtx::builder();
        // No arguments, no environment, stdin closed; stdout/stderr go to the log.
        wasi.stdout(LogStream::new(plugin.clone(), "stdout"));
        wasi.stderr(LogStream::new(plugin.clone(), "stderr"));
        StoreData {
            plugin,
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: Limiter {
                limit: memory_limit,
                denied: false,
            },
            events: Vec::new(),
            dropped_events: 0,
            context: Context::default(),
            kv: None,
            metrics: None,
            outbound: None,
            outbound_calls: 0,
            waiting: Arc::default(),
        }
    }
}

impl WasiView for StoreData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory and remembers whether the cap was hit (to classify the trap).
pub struct Limiter {
    limit: usize,
    pub(super) denied: bool,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

fn clip(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// The imports both worlds share (the request view, log, audit), implemented once for each
/// version's generated traits: the bodies are the same, the types are each version's own.
macro_rules! shared_imports {
    ($version:path) => {
        const _: () = {
            use world::sluice::plugin::{audit, log, types};
            use $version as world;

            impl types::Host for StoreData {}

            impl types::HostRequest for StoreData {
                fn method(&mut self, req: Resource<SharedView>) -> String {
                    self.view(&req).method()
                }

                fn scheme(&mut self, req: Resource<SharedView>) -> String {
                    self.view(&req).scheme()
                }

                fn authority(&mut self, req: Resource<SharedView>) -> String {
                    self.view(&req).authority()
                }

                fn path(&mut self, req: Resource<SharedView>) -> String {
                    self.view(&req).path()
                }

                fn header(&mut self, req: Resource<SharedView>, name: String) -> Vec<Vec<u8>> {
                    self.view(&req).header(&name)
                }

                fn headers(&mut self, req: Resource<SharedView>) -> Vec<types::Header> {
                    self.view(&req)
                        .headers()
                        .map(|(name, value)| types::Header {
                            name: name.to_string(),
                            value: value.to_vec(),
                        })
                        .collect()
                }

                fn request_id(&mut self, req: Resource<SharedView>) -> String {
                    self.view(&req).request_id()
                }

                fn hostname(&mut self, req: Resource<SharedView>) -> String {
                    self.view(&req).hostname()
                }

                fn ingress_rule(&mut self, req: Resource<SharedView>) -> u32 {
                    self.view(&req).ingress_rule()
                }

                fn client_addr(&mut self, req: Resource<SharedView>) -> Option<String> {
                    self.view(&req).client_addr()
                }

                fn drop(&mut self, req: Resource<SharedView>) -> wasmtime::Result<()> {
                    self.table.delete(req)?;
                    Ok(())
                }
            }

            impl log::Host for StoreData {
                fn log(&mut self, level: log::Level, message: String) {
                    let level = match level {
                        log::Level::Trace => tracing::Level::TRACE,
                        log::Level::Debug => tracing::Level::DEBUG,
                        log::Level::Info => tracing::Level::INFO,
                        log::Level::Warn => tracing::Level::WARN,
                        log::Level::Error => tracing::Level::ERROR,
                    };
                    self.log_line(level, message);
                }
            }

            impl audit::Host for StoreData {
                fn emit(&mut self, kind: String, attributes: Vec<audit::Attribute>) {
                    self.push_event(kind, attributes.into_iter().map(|a| (a.key, a.value)));
                }
            }
        };
    };
}

shared_imports!(super::bindings);
shared_imports!(super::bindings::v0_1);

impl StoreData {
    /// The view behind a handle. The host only hands out live handles and removes them after
    /// the call, so a missing entry means the guest forged one: it sees an empty view.
    fn view(&self, req: &Resource<SharedView>) -> &SharedView {
        static EMPTY: std::sync::OnceLock<SharedView> = std::sync::OnceLock::new();
        self.table
            .get(req)
            .unwrap_or_else(|_| EMPTY.get_or_init(SharedView::default))
    }
}

impl StoreData {
    fn log_line(&self, level: tracing::Level, message: String) {
        let message = clip(message);
        let plugin = &*self.plugin;
        match level {
            tracing::Level::TRACE => tracing::trace!(plugin, "{message}"),
            tracing::Level::DEBUG => tracing::debug!(plugin, "{message}"),
            tracing::Level::INFO => tracing::info!(plugin, "{message}"),
            tracing::Level::WARN => tracing::warn!(plugin, "{message}"),
            tracing::Level::ERROR => tracing::error!(plugin, "{message}"),
        }
    }

    fn push_event(&mut self, kind: String, attributes: impl Iterator<Item = (String, String)>) {
        if self.events.len() >= MAX_EVENTS_PER_CALL {
            self.dropped_events += 1;
            return;
        }
        self.events.push(RawEvent {
            kind: clip(kind),
            attributes: attributes.map(|(k, v)| (clip(k), clip(v))).collect(),
        });
    }
}

/// Longest context key, in bytes.
pub const MAX_CONTEXT_KEY: usize = 128;
/// What one plugin may keep in one request's context: keys and values together, in bytes.
pub const MAX_CONTEXT_BYTES: usize = 16 * 1024;

/// One plugin's values for one request (the `context` import). The chain keeps it between
/// hooks and lends it to the instance that runs each one, so it follows the request, not the
/// instance.
#[derive(Debug, Default)]
pub struct Context {
    entries: Vec<(String, Vec<u8>)>,
    bytes: usize,
}

impl Context {
    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }

    /// Stores `value` under `key`, within the limits; on an error nothing changes.
    pub fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        if key.len() > MAX_CONTEXT_KEY {
            return Err(format!(
                "context key of {} bytes; the limit is {MAX_CONTEXT_KEY}",
                key.len()
            ));
        }
        let replaced = self.get(&key).map_or(0, |v| key.len() + v.len());
        let bytes = self.bytes - replaced + key.len() + value.len();
        if bytes > MAX_CONTEXT_BYTES {
            return Err(format!(
                "the request's context would hold {bytes} bytes; the limit is {MAX_CONTEXT_BYTES}"
            ));
        }
        self.remove(&key);
        self.entries.push((key, value));
        self.bytes = bytes;
        Ok(())
    }

    /// Forgets `key`.
    pub fn remove(&mut self, key: &str) {
        if let Some(i) = self.entries.iter().position(|(k, _)| k == key) {
            let (k, v) = self.entries.swap_remove(i);
            self.bytes -= k.len() + v.len();
        }
    }
}

impl context::Host for StoreData {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        self.context.get(&key).map(<[u8]>::to_vec)
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        self.context.set(key, value)
    }

    fn remove(&mut self, key: String) {
        self.context.remove(&key);
    }
}

/// Guest stdout or stderr: complete lines go to the connector's log under the plugin's name.
#[derive(Clone)]
struct LogStream {
    plugin: Arc<str>,
    stream: &'static str,
    pending: Arc<Mutex<Vec<u8>>>,
}

impl LogStream {
    fn new(plugin: Arc<str>, stream: &'static str) -> Self {
        LogStream {
            plugin,
            stream,
            pending: Arc::default(),
        }
    }

    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\r', '\n']);
        tracing::info!(
            plugin = &*self.plugin,
            stream = self.stream,
            "{}",
            clip(text.to_string())
        );
    }

    fn push(&self, bytes: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.extend_from_slice(bytes);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            self.emit(&line);
        }
        if pending.len() > MAX_TEXT {
            let line: Vec<u8> = std::mem::take(&mut *pending);
            self.emit(&line);
        }
    }

    fn flush_partial(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if !pending.is_empty() {
            let line: Vec<u8> = std::mem::take(&mut *pending);
            self.emit(&line);
        }
    }
}

impl wasmtime_wasi::cli::IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi_io::poll::Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        self.flush_partial();
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.flush_partial();
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.flush_partial();
        std::task::Poll::Ready(Ok(()))
    }
}

impl From<KvError> for kv::KvError {
    fn from(e: KvError) -> Self {
        match e {
            KvError::Quota(m) => kv::KvError::Quota(m),
            KvError::Backend(m) => kv::KvError::Backend(m),
        }
    }
}

impl StoreData {
    /// The namespace; linked only with the grant, so `None` means a bug, reported as such.
    fn kv(&self) -> Result<&KvAccess, kv::KvError> {
        self.kv
            .as_ref()
            .ok_or_else(|| kv::KvError::Backend("no kv grant".into()))
    }
}

impl kv::Host for StoreData {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, kv::KvError> {
        Ok(self.kv()?.get(&key).await?)
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<(), kv::KvError> {
        Ok(self.kv()?.set(&key, value, ttl_ms).await?)
    }

    async fn delete(&mut self, key: String) -> Result<bool, kv::KvError> {
        Ok(self.kv()?.delete(&key).await?)
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, kv::KvError> {
        Ok(self
            .kv()?
            .compare_and_swap(&key, expected.as_deref(), new, ttl_ms)
            .await?)
    }

    async fn increment(
        &mut self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Result<i64, kv::KvError> {
        Ok(self.kv()?.increment(&key, delta, ttl_ms).await?)
    }
}

impl StoreData {
    fn plugin_metrics(&self) -> Result<&super::metrics::PluginMetricsAccess, String> {
        self.metrics
            .as_ref()
            .ok_or_else(|| "no metrics grant".to_string())
    }
}

impl metrics::Host for StoreData {
    fn counter_add(
        &mut self,
        name: String,
        labels: Vec<(String, String)>,
        value: u64,
    ) -> Result<(), String> {
        self.plugin_metrics()?.counter_add(&name, labels, value)
    }

    fn gauge_set(
        &mut self,
        name: String,
        labels: Vec<(String, String)>,
        value: i64,
    ) -> Result<(), String> {
        self.plugin_metrics()?.gauge_set(&name, labels, value)
    }

    fn histogram_observe(
        &mut self,
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    ) -> Result<(), String> {
        self.plugin_metrics()?
            .histogram_observe(&name, labels, value)
    }
}

impl From<CallError> for http::HttpError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Denied(m) => http::HttpError::Denied(m),
            CallError::Invalid(m) => http::HttpError::Invalid(m),
            CallError::Timeout => http::HttpError::Timeout,
            CallError::TooLarge(n) => http::HttpError::TooLarge(n),
            CallError::Failed(m) => http::HttpError::Failed(m),
        }
    }
}

impl http::Host for StoreData {
    async fn send(
        &mut self,
        req: http::OutboundRequest,
    ) -> Result<http::OutboundResponse, http::HttpError> {
        let outbound = self
            .outbound
            .clone()
            .ok_or_else(|| http::HttpError::Denied("no http grant".into()))?;
        if self.outbound_calls >= super::outbound::MAX_CALLS_PER_HOOK {
            return Err(http::HttpError::Denied(format!(
                "a hook call may make {} outbound calls",
                super::outbound::MAX_CALLS_PER_HOOK
            )));
        }
        self.outbound_calls += 1;
        let call = Call {
            method: req.method,
            url: req.url,
            origin: req.origin,
            headers: req.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            body: req.body,
            timeout: req
                .timeout_ms
                .map(|ms| std::time::Duration::from_millis(ms.into())),
        };
        let answer = self.waiting.clone().wait(outbound.send(call)).await?;
        Ok(http::OutboundResponse {
            status: answer.status,
            headers: answer
                .headers
                .into_iter()
                .map(|(name, value)| super::bindings::sluice::plugin::types::Header { name, value })
                .collect(),
            body: answer.body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_view_shared_by_plugins_with_different_grants_shows_each_only_its_grants() {
        use super::super::bindings::sluice::plugin::types::HostRequest;
        let mut headers = HeaderMap::new();
        for (n, v) in [
            ("accept", "*/*"),
            ("authorization", "Bearer secret"),
            ("cookie", "session=1"),
            ("x-forwarded-for", "192.0.2.7"),
            ("forwarded", "for=192.0.2.7"),
            ("x-real-ip", "192.0.2.7"),
            ("accept", "text/html"),
        ] {
            headers.append(n, v.parse().unwrap());
        }
        let view = Arc::new(RequestView {
            headers,
            client_addr: Some("192.0.2.7:4711".into()),
            ..RequestView::default()
        });
        let sees = |grants: Grants| {
            let mut data = StoreData::new("p".into(), 1 << 20);
            let own = data
                .table
                .push(SharedView::new(view.clone(), grants))
                .unwrap();
            let req = || Resource::<SharedView>::new_borrow(own.rep());
            let names: Vec<String> = data.headers(req()).into_iter().map(|h| h.name).collect();
            let one = |data: &mut StoreData, name: &str| data.header(req(), name.into()).len();
            let singles = [
                "Authorization",
                "cookie",
                "x-forwarded-for",
                "forwarded",
                "x-real-ip",
            ]
            .map(|n| one(&mut data, n));
            (names, singles, data.client_addr(req()))
        };

        let (names, singles, addr) = sees(Grants::default());
        assert_eq!(names, ["accept", "accept"]);
        assert_eq!(singles, [0; 5]);
        assert_eq!(addr, None);

        let (names, singles, addr) = sees(Grants::of(&["credentials"]));
        assert_eq!(names, ["accept", "accept", "authorization", "cookie"]);
        assert_eq!(singles, [1, 1, 0, 0, 0]);
        assert_eq!(addr, None);

        let (names, singles, addr) = sees(Grants::of(&["client-addr"]));
        assert_eq!(
            names,
            [
                "accept",
                "accept",
                "x-forwarded-for",
                "forwarded",
                "x-real-ip"
            ]
        );
        assert_eq!(singles, [0, 0, 1, 1, 1]);
        assert_eq!(addr.as_deref(), Some("192.0.2.7:4711"));
        // A name that is not a header name finds nothing rather than failing the call.
        let mut data = StoreData::new("p".into(), 1 << 20);
        let own = data
            .table
            .push(SharedView::new(view.clone(), Grants::default()))
            .unwrap();
        assert!(data
            .header(Resource::new_borrow(own.rep()), "bad name".into())
            .is_empty());
    }

    #[test]
    fn a_context_keeps_within_its_limits_and_changes_nothing_past_them() {
        let mut c = Context::default();
        c.set("user".into(), b"alice".to_vec()).unwrap();
        c.set("user".into(), b"bob".to_vec()).unwrap();
        assert_eq!(c.get("user"), Some(&b"bob"[..]));
        assert!(c.set("k".repeat(MAX_CONTEXT_KEY + 1), Vec::new()).is_err());
        let room = MAX_CONTEXT_BYTES - "user".len() - "bob".len() - "big".len();
        c.set("big".into(), vec![0; room]).unwrap();
        let refused = c.set("more".into(), vec![0; 1]).unwrap_err();
        assert!(refused.contains("limit"), "{refused}");
        assert_eq!(c.get("more"), None);
        // Replacing a value counts the old one out first.
        c.set("big".into(), vec![1; room]).unwrap();
        c.remove("big");
        c.set("more".into(), vec![0; 1]).unwrap();
        assert_eq!(c.get("user"), Some(&b"bob"[..]));
    }
}
