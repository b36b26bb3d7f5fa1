//! The per-stream pipeline: one request from the edge, through ingress and the plugin hooks,
//! to the origin and back.
//!
//! ```text
//!  RequestHead ─▶ normalise path ─▶ ingress match ─▶ [on-request hooks] ─▶ origin chosen
//!                                                                            │
//!  ResponseHead ◀─ [on-response hooks, reverse] ◀─ response head ◀── proxy ◀─┘
//!        │
//!        └─▶ body streamed ─▶ FIN (or reset on failure) ─▶ [on-complete hooks]
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use http::header::{
    HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, TRANSFER_ENCODING, UPGRADE,
};
use http::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn, Instrument};

use tokio::sync::OwnedSemaphorePermit;

use super::body;
use super::chain::{AuditContext, ChainRun, Chains, Refused};
use crate::admin::metrics::{InFlightGauge, OriginErrorLabels};
use crate::admin::Metrics;
use crate::audit::Audit;
use crate::config::{normalize_host, ConnectorConfig};
use crate::headers::{strip_hop_by_hop, REQUEST_ID_HEADER as REQUEST_ID};
use crate::ingress::{normalize_target, Ingress, PathPolicy};
use crate::origin::{Named, OriginError, Origins};
use crate::plugin::bindings::sluice::plugin::types::Completion;
use crate::plugin::{LoadError, Plugin, RequestView, Runtime};
use crate::proto::{
    self, io::read_payload, HeadCodec, Headers, RequestHead, ResponseHead, ResponseSource,
    SessionHead,
};
use crate::relay::{self, PumpError};
use crate::tls::TlsError;
use crate::transport::{RecvStream, SendStream};

/// How long the edge has to send a request head once it opened a stream.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A response body of announced length up to this many bytes leaves with its head (see
/// [`relay::pump`]).
const SHORT_BODY: u64 = 16 * 1024;

/// Ingress rules, origins and plugin chains: everything a request needs, swapped as a whole
/// on reload.
#[derive(Debug)]
pub struct Pipeline {
    ingress: Ingress,
    origins: Origins,
    chains: Chains,
    audit_context: AuditContext,
    access_log: bool,
    paths: PathPolicy,
    body_idle_timeout: Duration,
    /// TCP and UDP services, by name.
    pub(super) services: HashMap<String, crate::config::ServiceConfig>,
    pub(super) session_idle_timeout: Duration,
    pub(super) udp_idle_timeout: Duration,
    sessions: Arc<crate::services::SessionMetrics>,
    /// Refused sessions are logged at most once a second.
    session_warnings: crate::services::Throttle,
}

/// Admission control: requests and sessions have separate limits.
#[derive(Debug, Clone)]
pub struct Admission {
    /// One permit per request in flight (`max-concurrent-requests`).
    pub requests: Arc<tokio::sync::Semaphore>,
    /// One permit per TCP session or UDP flow (`max-sessions`).
    pub sessions: Arc<tokio::sync::Semaphore>,
}

impl Admission {
    /// Fresh limits from `config`.
    pub fn new(config: &ConnectorConfig) -> Self {
        Admission {
            requests: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_requests)),
            sessions: Arc::new(tokio::sync::Semaphore::new(config.max_sessions)),
        }
    }
}

/// What a stream is served with besides its halves: the connection's head encoding, the
/// metrics, the admission limits and, over QUIC, the connection's UDP flow router.
#[derive(Clone)]
pub struct StreamContext {
    /// The head encoding agreed at registration.
    pub heads: HeadCodec,
    /// The connector's metrics.
    pub metrics: Arc<Metrics>,
    /// Admission control.
    pub admission: Admission,
    /// `max-concurrent-requests` and `max-sessions`, for refusal messages.
    pub limits: (usize, usize),
    /// The connection and its flow router, when UDP flows may use QUIC datagrams.
    pub datagrams: Option<(
        crate::transport::Connection,
        Arc<crate::services::udp::FlowRouter>,
    )>,
}

/// What serving one request accumulates: the bytes of its body, its plugin chain (for
/// `on-complete`) and its admission.
struct RequestState<'a, 'b> {
    bytes_in: Arc<AtomicU64>,
    chain: Option<ChainRun<'a>>,
    admitted: &'b mut Admitted,
}

/// Where ingress sends a request, before its plugins run.
struct Routed {
    /// Index of the matching rule.
    rule: usize,
    target: String,
    headers: http::HeaderMap,
    framing: Framing,
    origin_name: String,
}

/// What one admitted request holds: its request permit, which a request that becomes a TCP
/// session exchanges for a session permit.
pub(super) struct Admitted {
    pub request: Option<OwnedSemaphorePermit>,
    /// Counts the request in `streams_in_flight` until it ends or becomes a session.
    pub gauge: Option<InFlightGauge>,
    /// The connection's context: its session limit, for the exchange.
    pub ctx: Arc<StreamContext>,
}

/// Why a pipeline could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// An origin's TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A plugin could not be loaded.
    #[error(transparent)]
    Plugin(#[from] LoadError),
    /// The WebAssembly runtime could not be set up.
    #[error(transparent)]
    Runtime(#[from] crate::plugin::RuntimeError),
    /// The configuration needs a larger instance pool than the running engine has.
    #[error("the plugins need a pool of {needed} instances; the running connector has {running}; restart to apply")]
    Instances {
        /// Instances the new configuration needs.
        needed: u32,
        /// The pool of the running engine.
        running: u32,
    },
    /// A plugin asks for more memory than the running engine was set up for.
    #[error(
        "plugin {0:?} asks for more memory than the running connector allows; restart to apply"
    )]
    Memory(String),
    /// The key-value backend could not be set up.
    #[error("[kv]: {0}")]
    Kv(String),
}

/// What pipelines share across reloads: the Wasm engine (created with the first plugin),
/// the audit writer and the metrics.
#[derive(Debug)]
pub struct PluginEnv {
    runtime: std::sync::Mutex<Option<(Arc<Runtime>, usize)>>,
    audit: Audit,
    metrics: Arc<Metrics>,
}

impl PluginEnv {
    /// An environment writing audit events to `audit`.
    pub fn new(audit: Audit, metrics: Arc<Metrics>) -> Self {
        PluginEnv {
            runtime: std::sync::Mutex::new(None),
            audit,
            metrics,
        }
    }

    /// The audit writer.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    fn runtime(&self, config: &ConnectorConfig) -> Result<Arc<Runtime>, PipelineError> {
        let needed = config.plugins.iter().map(|p| p.memory).max().unwrap_or(0);
        // While a reload's plugins start, the previous set still serves: room for both.
        let instances = (2 * config.plugin_instances()).clamp(16, u32::MAX as usize) as u32;
        let mut guard = self.runtime.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((rt, max)) = guard.as_ref() {
            if let Some(p) = config.plugins.iter().find(|p| p.memory > *max) {
                return Err(PipelineError::Memory(p.name.clone()));
            }
            if instances > rt.instances {
                return Err(PipelineError::Instances {
                    needed: instances,
                    running: rt.instances,
                });
            }
            return Ok(rt.clone());
        }
        // Room for the largest plugin now, and for reloads that raise limits up to 64 MiB.
        let max = needed.max(64 << 20);
        let rt = Runtime::new(max, instances)?;
        *guard = Some((rt.clone(), max));
        Ok(rt)
    }

    /// The runtime, its key-value store set to the configuration's backend.
    fn runtime_for(&self, config: &ConnectorConfig) -> Result<Arc<Runtime>, PipelineError> {
        let rt = self.runtime(config)?;
        rt.kv
            .configure(config.kv_redis.as_deref(), &config.tunnel)
            .map_err(PipelineError::Kv)?;
        Ok(rt)
    }
}

/// What happened to one request, for the access log (and the on-complete hook).
#[derive(Debug)]
pub(super) struct Outcome {
    pub status: u16,
    pub origin: String,
    pub source: ResponseSource,
    pub bytes_out: u64,
    pub error: Option<String>,
}

impl Pipeline {
    /// Builds origins, ingress and plugin chains from a validated config; loads every plugin
    /// and runs its `init`.
    pub async fn new(config: &ConnectorConfig, env: &PluginEnv) -> Result<Self, PipelineError> {
        let mut loaded = HashMap::new();
        if !config.plugins.is_empty() {
            let runtime = env.runtime_for(config)?;
            for p in &config.plugins {
                let plugin = Plugin::load(runtime.clone(), p.clone(), env.metrics.clone()).await?;
                let (compiled, took) = plugin.compiled();
                info!(plugin = %p.name, world = plugin.world_version(), compiled = compiled.as_str(), ms = took.as_millis() as u64, "plugin loaded");
                loaded.insert(p.name.clone(), Arc::new(plugin));
            }
            crate::plugin::release_compiler_memory();
        }
        Ok(Pipeline {
            ingress: Ingress::new(config.ingress.clone()),
            origins: Origins::new(&config.origins, &config.pools, &env.metrics)?,
            chains: Chains::new(config, loaded),
            audit_context: AuditContext {
                audit: env.audit.clone(),
                tunnel: config.tunnel.clone(),
            },
            access_log: config.access_log,
            paths: config.paths,
            body_idle_timeout: config.body_idle_timeout,
            services: config
                .services
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
            session_idle_timeout: config.session_idle_timeout,
            udp_idle_timeout: config.udp_idle_timeout,
            sessions: env.metrics.sessions.clone(),
            session_warnings: Default::default(),
        })
    }

    /// The tunnel this connector serves.
    pub(super) fn tunnel(&self) -> &str {
        &self.audit_context.tunnel
    }

    /// How often a quiet `sluice access` session sends a WebSocket ping: often enough that
    /// the edge, whose `body-idle-timeout` closes upgraded connections idle that long, sees it
    /// alive (a third of this connector's own `body-idle-timeout`, which operators keep alike
    /// on both roles; 20 s by default).
    pub(super) fn ping_interval(&self) -> Duration {
        (self.body_idle_timeout / 3).max(Duration::from_millis(100))
    }

    /// Lets a refused session's warning through at most once a second.
    pub(super) fn session_warnings(&self) -> &crate::services::Throttle {
        &self.session_warnings
    }

    /// Whether requests and sessions are logged on `sluice::access`.
    pub(super) fn access_log(&self) -> bool {
        self.access_log
    }

    /// The session metrics.
    pub(super) fn session_metrics(&self) -> Arc<crate::services::SessionMetrics> {
        self.sessions.clone()
    }

    /// Counts a session that did not start.
    pub(super) fn session_metrics_refused(&self, tunnel: &str, service: &str, why: &'static str) {
        self.sessions
            .refused(tunnel, service, proto::SessionProtocol::Tcp, why);
    }

    /// Frees the idle instances of this pipeline's plugins once a reload replaced it; the
    /// requests still running on it get fresh instances and return none to the pool.
    pub fn retire(&self) {
        self.chains.retire();
    }

    /// Serves one stream opened by the edge: a request, or a session to a TCP or UDP service.
    /// Each takes a permit of its own limit ([`Admission`]) or is refused at once. Never
    /// panics on peer input.
    ///
    /// This future is a task of its own per stream, copied whole when spawned and again when
    /// it completes, and it is as large as its largest await. The awaits that only sessions,
    /// plugins, PROXY-protocol origins or a new origin connection reach are boxed, so a
    /// plain request's task is about half what it would be (6.4 KB in a release build;
    /// memory copies were 8% of the connector's profile when nothing was boxed).
    pub async fn handle(
        self: Arc<Self>,
        send: SendStream,
        mut recv: RecvStream,
        ctx: Arc<StreamContext>,
    ) {
        let (heads, metrics, limits) = (ctx.heads, &ctx.metrics, ctx.limits);
        let mut send = Reply {
            send,
            heads,
            framed: false,
        };
        let read = tokio::time::timeout(HEAD_TIMEOUT, read_payload(&mut recv)).await;
        let payload = match read {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return refuse_malformed(&mut send, &mut recv, &e),
            Err(_) => {
                warn!("the edge opened a stream but sent no request head");
                let _ = send.reset(proto::code::STREAM_PROTOCOL);
                return;
            }
        };
        if SessionHead::is_session(&payload) {
            let head = match SessionHead::decode(&payload) {
                Ok(h) => h,
                Err(e) => return refuse_malformed(&mut send, &mut recv, &e),
            };
            let permit = ctx.admission.sessions.clone().try_acquire_owned().ok();
            let span = tracing::info_span!("session", id = %head.session_id);
            let session = super::services::SessionStream {
                head,
                send: send.send,
                recv,
                permit,
                datagrams: ctx.datagrams.clone(),
            };
            return Box::pin(
                self.serve_session(session, metrics, limits.1)
                    .instrument(span),
            )
            .await;
        }
        let head = match heads.decode_request(&Bytes::from(payload)) {
            Ok(h) => h,
            Err(e) => return refuse_malformed(&mut send, &mut recv, &e),
        };
        // Every answer on this stream, the connector's own included, is framed like the
        // request's body.
        send.framed = head.trailers;
        let Ok(permit) = ctx.admission.requests.clone().try_acquire_owned() else {
            metrics
                .rejected
                .get_or_create(&crate::admin::metrics::KindLabels { kind: "limit" })
                .inc();
            return refuse_busy(send, recv, limits.0).await;
        };
        let mut admitted = Admitted {
            request: Some(permit),
            gauge: Some(InFlightGauge::new(&metrics.in_flight)),
            ctx: ctx.clone(),
        };
        let span = tracing::info_span!("request", id = %head.request_id);
        self.serve(head, send, recv, metrics, &mut admitted)
            .instrument(span)
            .await
    }

    async fn serve(
        &self,
        mut head: RequestHead,
        mut send: Reply,
        recv: RecvStream,
        metrics: &Metrics,
        admitted: &mut Admitted,
    ) {
        let start = Instant::now();
        let host = normalize_host(&head.authority);
        let mut state = RequestState {
            bytes_in: Arc::new(AtomicU64::new(0)),
            chain: None,
            admitted,
        };
        let headers = std::mem::take(&mut head.headers);
        let outcome = match self
            .proxy(&head, headers, &host, &mut send, recv, &mut state)
            .await
        {
            Ok(o) => o,
            Err(Failure::Answer {
                status,
                message,
                public,
                origin,
                kind,
                origin_failure,
            }) => {
                if origin_failure {
                    metrics
                        .origin_errors
                        .get_or_create(&OriginErrorLabels {
                            origin: origin.clone(),
                            kind,
                        })
                        .inc();
                }
                let bytes_out = answer_error(&mut send, status, public.unwrap_or(&message)).await;
                Outcome {
                    status: status.as_u16(),
                    origin,
                    source: ResponseSource::Connector,
                    bytes_out,
                    error: Some(format!("{kind}: {message}")),
                }
            }
            Err(Failure::Cancelled { origin }) => {
                debug!(%origin, "the edge cancelled the request; origin request abandoned");
                let _ = send.reset(proto::code::STREAM_CANCELLED);
                Outcome {
                    status: 499,
                    origin,
                    source: ResponseSource::Connector,
                    bytes_out: 0,
                    error: Some("cancelled".into()),
                }
            }
        };

        // On-complete: after the answer was sent, off the client's critical path.
        let elapsed = start.elapsed();
        let bytes_in = state.bytes_in;
        if let Some(chain) = state.chain {
            let info = Completion {
                status: outcome.status,
                origin: (outcome.source == ResponseSource::Origin).then(|| outcome.origin.clone()),
                duration_us: elapsed.as_micros() as u64,
                bytes_in: bytes_in.load(Ordering::Relaxed),
                bytes_out: outcome.bytes_out,
                error: outcome.error.clone(),
            };
            Box::pin(chain.on_complete(info)).await;
        }
        metrics.observe(outcome.status, elapsed);
        if !self.access_log {
            return;
        }
        info!(
            target: "sluice::access",
            request_id = %head.request_id,
            method = %head.method,
            host = %host,
            path = %head.path,
            status = outcome.status,
            origin = %outcome.origin,
            source = ?outcome.source,
            bytes_out = outcome.bytes_out,
            duration_ms = elapsed.as_millis() as u64,
            error = outcome.error.as_deref().unwrap_or(""),
            "request"
        );
    }

    /// Routes the request (path policy, ingress), runs the `on-request` chain, then answers
    /// locally, opens a TCP session, or forwards it to the origin and relays the response.
    async fn proxy<'a>(
        &'a self,
        head: &RequestHead,
        headers: Headers,
        host: &str,
        send: &mut Reply,
        recv: RecvStream,
        state: &mut RequestState<'a, '_>,
    ) -> Result<Outcome, Failure> {
        let Routed {
            rule,
            mut target,
            mut headers,
            framing,
            mut origin_name,
        } = self.route(head, headers, host)?;

        // On-request: the rule's plugin chain (global chain first) may edit headers, rewrite
        // the path, choose another configured origin, or answer locally.
        let view = || request_view(head, host, &target, &headers, rule);
        state.chain = self.chains.start(rule, view, &self.audit_context);
        if let Some(chain) = state.chain.as_mut() {
            let edits =
                Box::pin(chain.on_request(&mut headers, |name| self.origins.named(name).is_some()))
                    .await
                    .map_err(Failure::plugin)?;
            if let Some((status, resp_headers, body, plugin)) = edits.respond {
                return answer_local(send, status, resp_headers, body, plugin).await;
            }
            if let Some(t) = edits.target {
                target = t;
            }
            if let Some(o) = edits.origin {
                origin_name = o;
            }
        }

        let (origin, claim) = match self.origins.named(&origin_name) {
            None => return Err(Failure::unconfigured(origin_name)),
            Some(Named::Origin(o)) => (o.clone(), None),
            Some(Named::Pool(p)) => {
                let claim = p.claim(&headers, None).expect("a pool has members");
                (claim.origin().clone(), Some(claim))
            }
        };
        if let Some(tcp) = origin.tcp_target() {
            let session = super::services::AccessSession {
                head,
                headers: &headers,
                target: tcp,
                origin: origin.config(),
            };
            return Box::pin(self.tcp_over_websocket(session, send, recv, state.admitted)).await;
        }
        set_origin_headers(&mut headers, head, origin.config())?;
        if head.trailers {
            // The client accepts trailers (gRPC): the origin is told so.
            headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        }
        let (body, upgrade_recv, body_stop) =
            self.request_body(framing, &mut headers, recv, state, head.trailers);
        let method = Method::from_bytes(head.method.as_bytes())
            .map_err(|_| Failure::bad_request("invalid method".into()))?;
        let uri: http::Uri = target
            .parse()
            .map_err(|_| Failure::bad_request("invalid path".into()))?;
        let parts = OriginRequest {
            method,
            uri,
            headers,
            body,
            client: head.client_addr.as_deref().and_then(|a| a.parse().ok()),
        };
        let (resp, origin_name) = match self
            .exchange(
                parts,
                (origin, claim),
                send,
                body_stop,
                &state.admitted.ctx.metrics,
            )
            .await?
        {
            Exchanged::Answer(resp, name) => (resp, name),
            Exchanged::Done(outcome) => return Ok(outcome),
        };
        let upgrade = head.upgrade.as_deref().zip(upgrade_recv);
        self.relay_response(resp, upgrade, origin_name, send, state, head)
            .await
    }

    /// Sends the request to its origin, or to the member of its pool it was claimed for, and
    /// waits for the response head — unless the edge gives up first (the client left:
    /// dropping the origin future abandons the request and closes its connection), or a body
    /// hook stops the body first (the client then gets the plugin's answer). A pool's request
    /// whose connection failed before its body was read is sent once more, to another member.
    async fn exchange(
        &self,
        req: OriginRequest,
        (mut origin, mut claim): (
            Arc<crate::origin::Origin>,
            Option<crate::origin::pool::Claim>,
        ),
        send: &mut Reply,
        mut body_stop: Option<tokio::sync::oneshot::Receiver<body::Stop>>,
        metrics: &Metrics,
    ) -> Result<Exchanged, Failure> {
        let OriginRequest {
            method,
            uri,
            headers,
            body,
            client,
        } = req;
        // Only a pool's request may go twice: it keeps its headers, and its body is handed
        // over when first read, so that a failed connection leaves it here, unread.
        // Without a pool the body goes as it is, without a hand-over wrapper.
        let (retry, mut headers, mut body) = match &claim {
            Some(_) => {
                let held = relay::Deferred::new(body);
                let handed = held.body();
                (Some((headers.clone(), held)), headers, handed)
            }
            None => (None, headers, body),
        };
        let mut retried = false;
        // A safe method whose body was never read may also go again when its connection
        // died before any answer (a member stopping with the request on a kept-alive
        // connection): it changes nothing, wherever it went.
        let safe = matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
        loop {
            let mut req = Request::new(body);
            *req.method_mut() = method.clone();
            *req.uri_mut() = uri.clone();
            *req.headers_mut() = headers;
            let name = origin.config().name.clone();
            // A stop is sent before the body it stops fails, so that polling it first never
            // takes the origin's failure on the cut body for the answer.
            let result = tokio::select! {
                biased;
                Some(stop) = until_stopped(&mut body_stop) => {
                    return match stop {
                        body::Stop::Respond(status, headers, body, plugin) => {
                            answer_local(send, status, headers, body, plugin).await.map(Exchanged::Done)
                        }
                        body::Stop::Failed(refused) => Err(Failure::plugin(refused)),
                    };
                }
                r = origin.send_for(req, client) => r,
                _ = send.stopped() => return Err(Failure::Cancelled { origin: name }),
            };
            if let Some(c) = &claim {
                c.answered(result.is_ok());
            }
            match (result, &claim, &retry) {
                (Ok(resp), _, _) => return Ok(Exchanged::Answer(resp, name)),
                (Err(e), Some(c), Some((h, held)))
                    if !retried
                        && held.unread()
                        && (e.before_sending() || (safe && e.no_answer())) =>
                {
                    if let Some(next) = c.another(h) {
                        warn!(origin = %name, kind = e.kind(), cause = %e, retry = %next.origin().config().name, "origin request failed before an answer; retrying on another pool member");
                        metrics
                            .origin_errors
                            .get_or_create(&OriginErrorLabels {
                                origin: name.clone(),
                                kind: e.kind(),
                            })
                            .inc();
                        origin = next.origin().clone();
                        claim = Some(next);
                        (headers, body) = (h.clone(), held.body());
                        retried = true;
                        continue;
                    }
                    warn!(origin = %name, kind = e.kind(), cause = %e, "origin request failed");
                    return Err(Failure::origin(e, name));
                }
                (Err(e), _, _) => {
                    warn!(origin = %name, kind = e.kind(), cause = %e, "origin request failed");
                    return Err(Failure::origin(e, name));
                }
            }
        }
    }

    /// The request body for the origin, framed, through the chain's body hooks if any
    /// implements them (with the receiver of their stop); an upgrade keeps the receive half.
    fn request_body(
        &self,
        framing: Framing,
        headers: &mut http::HeaderMap,
        recv: RecvStream,
        state: &mut RequestState<'_, '_>,
        framed: bool,
    ) -> (
        relay::HttpBody,
        Option<RecvStream>,
        Option<tokio::sync::oneshot::Receiver<body::Stop>>,
    ) {
        let filter = match framing {
            Framing::Length(_) | Framing::Chunked => {
                state.chain.as_mut().and_then(|c| c.body_filter(None))
            }
            Framing::Upgrade(_) | Framing::Empty(_) => None,
        };
        // Body hooks change the body as it streams: its length is known only at the end.
        let framing = match (&filter, framing) {
            (Some(_), Framing::Length(_)) => Framing::Chunked,
            (_, framing) => framing,
        };
        let (body, upgrade_recv) = framing.apply(headers, recv, &state.bytes_in);
        let body = relay::with_idle_timeout(body, self.body_idle_timeout);
        let body = if framed { relay::unframed(body) } else { body };
        match filter {
            Some(f) => {
                let (body, stop) = f.spawn(body);
                (body, upgrade_recv, Some(stop))
            }
            None => (body, upgrade_recv, None),
        }
    }

    /// The request's place in the ingress rules: the normalised target, the matching rule and
    /// its origin, and the end-to-end headers with their framing checked.
    fn route(&self, head: &RequestHead, headers: Headers, host: &str) -> Result<Routed, Failure> {
        let (path, target) = normalize_target(&head.path, &self.paths)
            .map_err(|e| Failure::bad_request(e.to_string()))?;
        let Some(m) = self.ingress.find(host, &path) else {
            // Validation guarantees a catch-all; answer sensibly anyway.
            return Err(Failure::Answer {
                status: StatusCode::BAD_GATEWAY,
                message: "no ingress rule matches".into(),
                public: None,
                origin: String::new(),
                kind: "ingress",
                origin_failure: false,
            });
        };
        Method::from_bytes(head.method.as_bytes())
            .map_err(|_| Failure::bad_request("invalid method".into()))?;
        let Headers {
            map: mut headers,
            invalid,
        } = headers;
        if invalid > 0 {
            debug!(invalid, "dropped invalid request headers");
        }
        strip_hop_by_hop(&mut headers);
        headers.remove(HOST);
        let framing = Framing::of(head, &headers)?;
        Ok(Routed {
            rule: m.index,
            target,
            headers,
            framing,
            origin_name: m.rule.origin.clone(),
        })
    }

    /// Runs the response chain on the origin's head, sends it to the edge, then streams the
    /// body (or, after a 101, the upgraded connection both ways).
    async fn relay_response(
        &self,
        mut resp: http::Response<relay::HttpBody>,
        upgrade: Option<(&str, RecvStream)>,
        origin_name: String,
        send: &mut Reply,
        state: &mut RequestState<'_, '_>,
        head: &RequestHead,
    ) -> Result<Outcome, Failure> {
        let head_request = head.method == "HEAD";
        let (bytes_in, run) = (&state.bytes_in, &mut state.chain);
        let mut status = resp.status();
        let (upgrade, declined) = match upgrade {
            Some((name, recv)) if status == StatusCode::SWITCHING_PROTOCOLS => {
                (Some((name, recv, hyper::upgrade::on(&mut resp))), None)
            }
            other => (None, other),
        };
        if let Some((_, mut r)) = declined {
            // Upgrade declined by the origin: no raw bytes will follow.
            let _ = r.stop(proto::code::STREAM_CANCELLED);
        }
        let mut resp_headers = std::mem::take(resp.headers_mut());
        strip_hop_by_hop(&mut resp_headers);
        let mut replaced = None;
        if let Some(chain) = run.as_mut() {
            replaced = Box::pin(chain.on_response(&mut status, &mut resp_headers))
                .await
                .map_err(Failure::plugin_after_origin)?;
        }
        if let Some(body) = &replaced {
            // The origin's body is discarded unread; the plugin's gets an exact length.
            resp_headers.remove(TRANSFER_ENCODING);
            resp_headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let has_body = replaced.is_none()
            && upgrade.is_none()
            && !head_request
            && !matches!(status.as_u16(), 100..=199 | 204 | 304);
        let filter = match run.as_mut() {
            Some(chain) if has_body => chain.body_filter(Some(status.as_u16())),
            _ => None,
        };
        if filter.is_some() {
            // Body hooks change the body as it streams: its length is known only at the end.
            resp_headers.remove(CONTENT_LENGTH);
        }
        if let Some((name, _, _)) = &upgrade {
            if let Ok(v) = HeaderValue::from_str(name) {
                resp_headers.insert(UPGRADE, v);
            }
        }
        let short = relay::announced_length(&resp_headers).is_some_and(|n| n <= SHORT_BODY);
        let resp_head = ResponseHead {
            status: status.as_u16(),
            headers: resp_headers.into(),
            source: ResponseSource::Origin,
        };
        let head_frame = encode_response_head(send.heads, &resp_head, &origin_name)?;

        let mut outcome = Outcome {
            status: status.as_u16(),
            origin: origin_name,
            source: ResponseSource::Origin,
            bytes_out: 0,
            error: None,
        };
        if let Some((_, recv, on_upgrade)) = upgrade {
            send_head(send, head_frame, &outcome.origin).await?;
            match self.splice(on_upgrade, send, recv).await {
                Ok((up, down)) => {
                    bytes_in.fetch_add(up, Ordering::Relaxed);
                    outcome.bytes_out = down;
                }
                Err(e) => {
                    let _ = send.reset(proto::code::STREAM_ORIGIN_FAILED);
                    outcome.error = Some(e);
                }
            }
            return Ok(outcome);
        }
        let body = match replaced {
            Some(body) => relay::full(body),
            None => relay::with_idle_timeout(resp.into_body(), self.body_idle_timeout),
        };
        // A body hook's stop cuts the response: its head is already on its way, and the
        // failure is reported like an origin failing mid-body.
        let body = match filter {
            Some(f) => f.spawn(body).0,
            None => body,
        };
        // A stream whose client accepts trailers carries them back (gRPC's status).
        let body = if head.trailers {
            relay::framed(body)
        } else {
            body
        };
        stream_body(head_frame, body, send, short, &mut outcome).await;
        Ok(outcome)
    }

    /// After a 101: relays the upgraded origin connection and the stream both ways; (bytes
    /// up, bytes down).
    async fn splice(
        &self,
        on_upgrade: hyper::upgrade::OnUpgrade,
        send: &mut Reply,
        mut recv: RecvStream,
    ) -> Result<(u64, u64), String> {
        let upgraded = on_upgrade
            .await
            .map_err(|e| format!("origin upgrade failed: {e}"))?;
        let r = relay::splice(
            TokioIo::new(upgraded),
            &mut send.send,
            &mut recv,
            self.body_idle_timeout,
        )
        .await;
        r.result
            .map(|()| (r.received, r.sent))
            .map_err(|e| format!("upgraded connection failed: {e}"))
    }
}

/// The origin's response head as a frame. A head too large for a frame is the origin's
/// fault (a protocol error, answered 502).
pub(super) fn encode_response_head(
    heads: HeadCodec,
    head: &ResponseHead,
    origin: &str,
) -> Result<Bytes, Failure> {
    heads.encode_response(head).map_err(|e| {
        warn!(%origin, cause = %e, "the origin's response head is too large to relay");
        Failure::origin(
            OriginError::Protocol {
                origin: origin.to_string(),
                detail: format!("response head too large: {e}"),
            },
            origin.to_string(),
        )
    })
}

/// Sends an encoded response head alone; a stream that fails means the edge left.
pub(super) async fn send_head(
    send: &mut SendStream,
    frame: Bytes,
    origin: &str,
) -> Result<(), Failure> {
    send.write_chunk(frame).await.map_err(|e| {
        debug!(cause = %e, "could not send the response head to the edge");
        Failure::Cancelled {
            origin: origin.to_string(),
        }
    })
}

/// Host, `x-forwarded-host` and the request id as the origin gets them. A Host set by a
/// plugin wins; otherwise the origin's `host-header` or the authority the edge validated.
fn set_origin_headers(
    headers: &mut http::HeaderMap,
    head: &RequestHead,
    origin: &crate::config::OriginConfig,
) -> Result<(), Failure> {
    if !headers.contains_key(HOST) {
        let host_value = origin.host_header.as_deref().unwrap_or(&head.authority);
        let host_header = HeaderValue::from_str(host_value)
            .map_err(|_| Failure::bad_request("invalid host".into()))?;
        headers.insert(HOST, host_header);
    }
    if origin.host_header.is_some() {
        if let Ok(v) = HeaderValue::from_str(&head.authority) {
            headers.insert("x-forwarded-host", v);
        }
    }
    // The edge puts the id among the head's headers as well: set again only if that differs.
    let id = &head.request_id;
    let mut ids = headers.get_all(REQUEST_ID).iter();
    let intact = ids.next().is_some_and(|v| v.as_bytes() == id.as_bytes()) && ids.next().is_none();
    if !intact {
        if let Ok(v) = HeaderValue::from_str(id) {
            headers.insert(REQUEST_ID, v);
        }
    }
    Ok(())
}

/// What goes to the origin: the request as the rules and plugins left it.
struct OriginRequest {
    method: Method,
    uri: http::Uri,
    headers: http::HeaderMap,
    body: relay::HttpBody,
    /// The client's address, for an origin that reads a PROXY protocol header.
    client: Option<std::net::SocketAddr>,
}

/// How an exchange with the origin ended.
enum Exchanged {
    /// The origin (or the pool member named) answered with this head.
    Answer(http::Response<relay::HttpBody>, String),
    /// A body hook answered the client instead.
    Done(Outcome),
}

/// How the request body is framed towards the origin. Decided by the connector from what the
/// edge established, never copied from client headers, so that the origin reads exactly the
/// request the rules and plugins saw and not a byte more.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Framing {
    /// An upgrade to this protocol: no body; the stream carries the new protocol after a 101.
    Upgrade(String),
    /// No body; `Some(0)` keeps a client's `content-length: 0`.
    Empty(Option<u64>),
    /// A body of exactly this many bytes.
    Length(u64),
    /// A body of unknown length, sent chunked (whatever the method: a `GET` keeps its body).
    Chunked,
}

impl Framing {
    fn of(head: &RequestHead, headers: &http::HeaderMap) -> Result<Self, Failure> {
        let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
        let length = match (lengths.next(), lengths.next()) {
            (None, _) => None,
            (Some(v), None) => Some(
                std::str::from_utf8(v.as_bytes())
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| Failure::bad_request("invalid content-length".into()))?,
            ),
            (Some(_), Some(_)) => {
                return Err(Failure::bad_request(
                    "several content-length headers".into(),
                ))
            }
        };
        Ok(match (&head.upgrade, head.empty_body, length) {
            (Some(name), _, _) => Framing::Upgrade(name.clone()),
            (None, true, Some(n)) if n > 0 => {
                return Err(Failure::bad_request(
                    "content-length on a request without a body".into(),
                ))
            }
            (None, true, length) => Framing::Empty(length),
            (None, false, Some(n)) => Framing::Length(n),
            (None, false, None) => Framing::Chunked,
        })
    }

    /// Sets the framing headers and builds the body; an upgrade keeps the receive half for
    /// the raw bytes after 101.
    fn apply(
        self,
        headers: &mut http::HeaderMap,
        recv: RecvStream,
        bytes_in: &Arc<AtomicU64>,
    ) -> (relay::HttpBody, Option<RecvStream>) {
        headers.remove(CONTENT_LENGTH);
        headers.remove(TRANSFER_ENCODING);
        let (name, value) = match self {
            Framing::Upgrade(name) => {
                headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
                if let Ok(v) = HeaderValue::from_str(&name) {
                    headers.insert(UPGRADE, v);
                }
                return (relay::empty(), Some(recv));
            }
            Framing::Empty(length) => {
                if let Some(n) = length {
                    headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
                }
                recv.release();
                return (relay::empty(), None);
            }
            Framing::Length(n) => (CONTENT_LENGTH, HeaderValue::from(n)),
            Framing::Chunked => (TRANSFER_ENCODING, HeaderValue::from_static("chunked")),
        };
        headers.insert(name, value);
        (relay::recv_body_counted(recv, bytes_in.clone()), None)
    }
}

/// The request as plugins see it, before any grant restricts it.
fn request_view(
    head: &RequestHead,
    host: &str,
    target: &str,
    headers: &http::HeaderMap,
    rule: usize,
) -> RequestView {
    RequestView {
        method: head.method.clone(),
        scheme: head.scheme.clone(),
        authority: head.authority.clone(),
        path: target.to_string(),
        headers: headers.clone(),
        request_id: head.request_id.clone(),
        hostname: host.to_string(),
        ingress_rule: rule as u32,
        client_addr: head.client_addr.clone(),
    }
}

/// The send half of a request stream, with the head encoding of its connection.
pub(super) struct Reply {
    pub send: SendStream,
    pub heads: HeadCodec,
    /// The stream's bodies are framed (its request head set `trailers`).
    pub framed: bool,
}

impl std::ops::Deref for Reply {
    type Target = SendStream;
    fn deref(&self) -> &SendStream {
        &self.send
    }
}

impl std::ops::DerefMut for Reply {
    fn deref_mut(&mut self) -> &mut SendStream {
        &mut self.send
    }
}

/// Sends the response head and streams `body` after it; a body failing mid-way resets the
/// stream. `short`: the head waits for a short body, to leave in one packet with it.
async fn stream_body(
    head_frame: Bytes,
    body: relay::HttpBody,
    send: &mut Reply,
    short: bool,
    outcome: &mut Outcome,
) {
    match relay::pump(head_frame, body, send, short).await {
        Ok(n) => outcome.bytes_out = n,
        Err(PumpError::Body(e)) => {
            warn!(origin = %outcome.origin, cause = %e, "origin failed mid-body; resetting the stream");
            let _ = send.reset(proto::code::STREAM_ORIGIN_FAILED);
            outcome.error = Some(format!("origin failed mid-body: {e}"));
        }
        Err(PumpError::Stream(e)) => {
            debug!(cause = %e, "the edge stopped reading the response");
            outcome.error = Some("cancelled mid-body".into());
        }
    }
}

/// Resolves when a body hook stopped the body (`None`: never, as without body hooks).
/// A filter that ends without a stop closes its sender: the receiver is then dropped, so that
/// a retry's second wait never polls a completed receiver.
async fn until_stopped(
    stop: &mut Option<tokio::sync::oneshot::Receiver<body::Stop>>,
) -> Option<body::Stop> {
    match stop.as_mut() {
        Some(rx) => match rx.await {
            Ok(s) => Some(s),
            Err(_) => {
                *stop = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// Sends a plugin's local response.
async fn answer_local(
    send: &mut Reply,
    status: StatusCode,
    mut headers: http::HeaderMap,
    body: Bytes,
    plugin: String,
) -> Result<Outcome, Failure> {
    // 204 and 304 carry no body (RFC 9110 §15.3.5, §15.4.5); any other gets an exact length.
    let body = if matches!(status.as_u16(), 204 | 304) {
        Bytes::new()
    } else {
        body
    };
    if status.as_u16() != 204 {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let head = ResponseHead {
        status: status.as_u16(),
        headers: headers.into(),
        source: ResponseSource::Plugin,
    };
    if !send_whole_answer(send, &head, body.clone()).await {
        return Err(Failure::Cancelled {
            origin: String::new(),
        });
    }
    debug!(%plugin, status = status.as_u16(), "a plugin answered locally");
    Ok(Outcome {
        status: status.as_u16(),
        origin: String::new(),
        source: ResponseSource::Plugin,
        bytes_out: body.len() as u64,
        error: None,
    })
}

/// How a request ended without an origin response to relay.
pub(super) enum Failure {
    /// Answer the edge with an error produced by the connector.
    Answer {
        status: StatusCode,
        /// For the log and the audit record; may name origins and addresses.
        message: String,
        /// For the client, when `message` must not reach it.
        public: Option<&'static str>,
        origin: String,
        kind: &'static str,
        origin_failure: bool,
    },
    /// The edge went away; nothing to answer.
    Cancelled { origin: String },
}

impl Failure {
    /// The chosen origin is not in the configuration.
    fn unconfigured(origin: String) -> Self {
        Failure::Answer {
            status: StatusCode::BAD_GATEWAY,
            message: format!("origin {origin:?} is not configured"),
            public: Some("no origin is available for this request"),
            origin,
            kind: "config",
            origin_failure: false,
        }
    }

    fn bad_request(message: String) -> Self {
        Failure::Answer {
            status: StatusCode::BAD_REQUEST,
            message,
            public: None,
            origin: String::new(),
            kind: "bad-request",
            origin_failure: false,
        }
    }

    /// A plugin failure after the origin answered: never a 503 that invites a retry of a
    /// request the origin may have acted on.
    fn plugin_after_origin(refused: Refused) -> Self {
        match Failure::plugin(refused) {
            Failure::Answer {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message,
                public,
                origin,
                kind,
                origin_failure,
            } => Failure::Answer {
                status: StatusCode::BAD_GATEWAY,
                message,
                public,
                origin,
                kind,
                origin_failure,
            },
            other => other,
        }
    }

    /// A fail-closed plugin failure: a 502 that names no plugin internals; or, when no
    /// instance could be had, a 503 the client may retry.
    fn plugin(refused: Refused) -> Self {
        if refused.error == crate::plugin::PluginError::Unavailable {
            return Failure::Answer {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "too many requests in flight for a plugin; retry shortly".into(),
                public: None,
                origin: String::new(),
                kind: "plugin-unavailable",
                origin_failure: false,
            };
        }
        Failure::Answer {
            status: StatusCode::BAD_GATEWAY,
            message: "the request could not be processed".into(),
            public: None,
            origin: String::new(),
            kind: match refused.error.kind() {
                "trap" => "plugin-trap",
                "timeout" => "plugin-timeout",
                "memory" => "plugin-memory",
                "invalid-decision" => "plugin-invalid-decision",
                _ => "plugin-instantiate",
            },
            origin_failure: false,
        }
    }

    pub(super) fn origin(e: OriginError, origin: String) -> Self {
        Failure::Answer {
            status: e.status(),
            message: e.to_string(),
            public: Some(e.public_text()),
            origin,
            kind: e.kind(),
            origin_failure: true,
        }
    }
}

/// A stream whose first frame is not a valid head: reset both ways.
fn refuse_malformed(send: &mut Reply, recv: &mut RecvStream, e: &dyn std::fmt::Display) {
    warn!(cause = %e, "bad request stream from the edge");
    let _ = send.reset(proto::code::STREAM_PROTOCOL);
    let _ = recv.stop(proto::code::STREAM_PROTOCOL);
}

/// Answers a request at once with 503 and `Retry-After` when `max-concurrent-requests` are
/// already in flight: nothing is queued, nothing of its body is read.
async fn refuse_busy(mut send: Reply, mut recv: RecvStream, limit: usize) {
    let _ = recv.stop(proto::code::STREAM_CANCELLED);
    let message = format!("too many requests in flight (max-concurrent-requests = {limit})");
    answer_error(&mut send, StatusCode::SERVICE_UNAVAILABLE, &message).await;
}

/// Sends a connector-made error response (a 503 says when to retry); returns the body size.
async fn answer_error(send: &mut Reply, status: StatusCode, message: &str) -> u64 {
    let body = format!("sluice connector: {message}\n");
    let mut headers = http::HeaderMap::with_capacity(3);
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    let head = ResponseHead {
        status: status.as_u16(),
        headers: headers.into(),
        source: ResponseSource::Connector,
    };
    send_whole_answer(send, &head, Bytes::copy_from_slice(body.as_bytes())).await;
    body.len() as u64
}

/// Sends a response made here (head and whole body) in one write and finishes the stream;
/// `false`, with the stream reset, when the head cannot be encoded or the edge left.
async fn send_whole_answer(send: &mut Reply, head: &ResponseHead, body: Bytes) -> bool {
    let sent = match send.heads.encode_response(head) {
        Ok(frame) if send.framed => {
            let prefix = proto::body::data_prefix(body.len());
            send.write_all_chunks(&mut [frame, prefix, body])
                .await
                .is_ok()
        }
        Ok(frame) => send.write_all_chunks(&mut [frame, body]).await.is_ok(),
        Err(_) => false,
    };
    if sent {
        let _ = send.finish();
    } else {
        let _ = send.reset(proto::code::STREAM_CANCELLED);
    }
    sent
}
