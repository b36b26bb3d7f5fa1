//! The per-stream pipeline: one request from the edge, through ingress and (later) plugin
//! hooks, to the origin and back.
//!
//! ```text
//!  RequestHead ─▶ normalise path ─▶ ingress match ─▶ [on-request hooks] ─▶ origin chosen
//!                                                                            │
//!  ResponseHead ◀─ [on-response hooks, reverse] ◀─ response head ◀── proxy ◀─┘
//!        │
//!        └─▶ body streamed ─▶ FIN (or reset on failure) ─▶ [on-complete hooks]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use http::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn, Instrument};

use tokio::sync::OwnedSemaphorePermit;

use crate::admin::metrics::{InFlightGauge, KindLabels};
use crate::admin::Metrics;
use crate::config::{normalize_host, ConnectorConfig};
use crate::headers::{from_wire, strip_hop_by_hop, to_wire, REQUEST_ID};
use crate::ingress::{normalize_target, Ingress};
use crate::origin::{OriginError, Origins};
use crate::proto::{self, io::read_frame, io::write_frame, RequestHead, ResponseHead, ResponseSource};
use crate::relay::{self, PumpError};
use crate::tls::TlsError;

/// How long the edge has to send a request head once it opened a stream.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Ingress rules and origins: everything a request needs, swapped as a whole on reload.
#[derive(Debug)]
pub struct Pipeline {
    ingress: Ingress,
    origins: Origins,
    access_log: bool,
}

/// What happened to one request, for the access log (and the on-complete hook).
#[derive(Debug)]
struct Outcome {
    status: u16,
    origin: String,
    source: ResponseSource,
    bytes_out: u64,
    error: Option<String>,
}

impl Pipeline {
    /// Builds origins and ingress from a validated config.
    pub fn new(config: &ConnectorConfig) -> Result<Self, TlsError> {
        Ok(Pipeline {
            ingress: Ingress::new(config.ingress.clone()),
            origins: Origins::new(&config.origins)?,
            access_log: config.access_log,
        })
    }

    /// Serves one request stream opened by the edge, holding `permit` (admission control)
    /// until it is done. Never panics on peer input.
    pub async fn handle(
        self: Arc<Self>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        metrics: Arc<Metrics>,
        permit: OwnedSemaphorePermit,
    ) {
        let _permit = permit;
        let _gauge = InFlightGauge::new(&metrics.in_flight);
        let head: RequestHead = match tokio::time::timeout(HEAD_TIMEOUT, read_frame(&mut recv)).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                warn!(cause = %e, "bad request stream from the edge");
                let _ = send.reset(proto::code::STREAM_PROTOCOL);
                let _ = recv.stop(proto::code::STREAM_PROTOCOL);
                return;
            }
            Err(_) => {
                warn!("the edge opened a stream but sent no request head");
                let _ = send.reset(proto::code::STREAM_PROTOCOL);
                return;
            }
        };
        let span = tracing::info_span!("request", id = %head.request_id);
        self.serve(head, send, recv, &metrics).instrument(span).await
    }

    async fn serve(&self, head: RequestHead, mut send: quinn::SendStream, recv: quinn::RecvStream, metrics: &Metrics) {
        let start = Instant::now();
        let host = normalize_host(&head.authority);
        let outcome = match self.proxy(&head, &host, &mut send, recv).await {
            Ok(o) => o,
            Err(Failure::Answer { status, message, origin, kind, origin_failure }) => {
                if origin_failure {
                    metrics.origin_errors.get_or_create(&KindLabels { kind }).inc();
                }
                let bytes_out = answer_error(&mut send, status, &message).await;
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
                Outcome { status: 499, origin, source: ResponseSource::Connector, bytes_out: 0, error: Some("cancelled".into()) }
            }
        };

        // ── Hook point: on-complete. Audit plugins see the outcome here, after the answer
        //    was sent, off the client's critical path.
        let elapsed = start.elapsed();
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

    async fn proxy(
        &self,
        head: &RequestHead,
        host: &str,
        send: &mut quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Result<Outcome, Failure> {
        let (path, target) = normalize_target(&head.path).map_err(|e| Failure::bad_request(e.to_string()))?;
        let Some(m) = self.ingress.find(host, &path) else {
            // Validation guarantees a catch-all; answer sensibly anyway.
            return Err(Failure::Answer {
                status: StatusCode::BAD_GATEWAY,
                message: "no ingress rule matches".into(),
                origin: String::new(),
                kind: "ingress",
                origin_failure: false,
            });
        };

        // ── Hook point: on-request. The rule's plugin chain runs here, in order: it may edit
        //    headers, rewrite `target`, choose another configured origin, or answer locally.
        let origin_name = m.rule.origin.clone();
        let Some(origin) = self.origins.get(&origin_name) else {
            return Err(Failure::Answer {
                status: StatusCode::BAD_GATEWAY,
                message: format!("origin {origin_name:?} is not configured"),
                origin: origin_name,
                kind: "config",
                origin_failure: false,
            });
        };

        let method = Method::from_bytes(head.method.as_bytes()).map_err(|_| Failure::bad_request("invalid method".into()))?;
        let (mut headers, invalid) = from_wire(&head.headers);
        if invalid > 0 {
            debug!(invalid, "dropped invalid request headers");
        }
        strip_hop_by_hop(&mut headers);
        headers.remove(HOST);
        let host_value = origin.config().host_header.clone().unwrap_or_else(|| head.authority.clone());
        let host_header = HeaderValue::from_str(&host_value).map_err(|_| Failure::bad_request("invalid host".into()))?;
        headers.insert(HOST, host_header);
        if origin.config().host_header.is_some() {
            if let Ok(v) = HeaderValue::from_str(&head.authority) {
                headers.insert("x-forwarded-host", v);
            }
        }
        if let Ok(v) = HeaderValue::from_str(&head.request_id) {
            headers.insert(REQUEST_ID, v);
        }

        // An upgrade keeps the QUIC receive half for the raw bytes after 101.
        let (body, mut upgrade_recv) = match &head.upgrade {
            Some(proto_name) => {
                headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
                if let Ok(v) = HeaderValue::from_str(proto_name) {
                    headers.insert(UPGRADE, v);
                }
                (relay::empty(), Some(recv))
            }
            None if head.empty_body => (relay::empty(), None),
            None => (relay::recv_body(recv), None),
        };
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = target.parse().map_err(|_| Failure::bad_request("invalid path".into()))?;
        *req.headers_mut() = headers;

        // Wait for the origin's answer, unless the edge gives up first (client gone): dropping
        // the origin future abandons the request and closes its connection.
        let stopped = send.stopped();
        let result = tokio::select! {
            r = origin.send(req) => r,
            _ = stopped => return Err(Failure::Cancelled { origin: origin_name }),
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                warn!(origin = %origin_name, kind = e.kind(), cause = %e, "origin request failed");
                return Err(Failure::origin(e, origin_name));
            }
        };

        // ── Hook point: on-response. The chain runs in reverse on status and headers here.
        let status = resp.status();
        let on_upgrade = (status == StatusCode::SWITCHING_PROTOCOLS && upgrade_recv.is_some())
            .then(|| hyper::upgrade::on(&mut resp));
        let mut resp_headers = resp.headers().clone();
        strip_hop_by_hop(&mut resp_headers);
        if on_upgrade.is_some() {
            if let Some(p) = &head.upgrade {
                if let Ok(v) = HeaderValue::from_str(p) {
                    resp_headers.insert(UPGRADE, v);
                }
            }
        }
        let resp_head = ResponseHead { status: status.as_u16(), headers: to_wire(&resp_headers), source: ResponseSource::Origin };
        if let Err(e) = write_frame(send, &resp_head).await {
            debug!(cause = %e, "could not send the response head to the edge");
            return Err(Failure::Cancelled { origin: origin_name });
        }

        let mut outcome = Outcome {
            status: status.as_u16(),
            origin: origin_name,
            source: ResponseSource::Origin,
            bytes_out: 0,
            error: None,
        };
        if let (Some(on_upgrade), Some(recv)) = (on_upgrade, upgrade_recv.take()) {
            match on_upgrade.await {
                Ok(upgraded) => {
                    match relay::splice(TokioIo::new(upgraded), &mut *send, recv).await {
                        Ok((_, down)) => outcome.bytes_out = down,
                        Err(e) => {
                            let _ = send.reset(proto::code::STREAM_ORIGIN_FAILED);
                            outcome.error = Some(format!("upgraded connection failed: {e}"));
                        }
                    }
                }
                Err(e) => {
                    let _ = send.reset(proto::code::STREAM_ORIGIN_FAILED);
                    outcome.error = Some(format!("origin upgrade failed: {e}"));
                }
            }
            return Ok(outcome);
        }
        if let Some(mut r) = upgrade_recv {
            // Upgrade declined by the origin: no raw bytes will follow.
            let _ = r.stop(proto::code::STREAM_CANCELLED);
        }

        match relay::pump(resp.into_body(), send).await {
            Ok(n) => {
                outcome.bytes_out = n;
                let _ = send.finish();
            }
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
        Ok(outcome)
    }
}

/// How a request ended without an origin response to relay.
enum Failure {
    /// Answer the edge with an error produced by the connector.
    Answer { status: StatusCode, message: String, origin: String, kind: &'static str, origin_failure: bool },
    /// The edge went away; nothing to answer.
    Cancelled { origin: String },
}

impl Failure {
    fn bad_request(message: String) -> Self {
        Failure::Answer { status: StatusCode::BAD_REQUEST, message, origin: String::new(), kind: "bad-request", origin_failure: false }
    }

    fn origin(e: OriginError, origin: String) -> Self {
        Failure::Answer { status: e.status(), message: e.to_string(), origin, kind: e.kind(), origin_failure: true }
    }
}

/// Answers a stream at once with 503 and `Retry-After` when `max-concurrent-requests` are
/// already in flight: nothing is queued, nothing is read.
pub async fn refuse_busy(mut send: quinn::SendStream, mut recv: quinn::RecvStream, limit: usize) {
    let _ = recv.stop(proto::code::STREAM_CANCELLED);
    let body = format!("sluice connector: too many requests in flight (max-concurrent-requests = {limit})\n");
    let head = ResponseHead {
        status: 503,
        headers: vec![
            (CONTENT_TYPE.as_str().to_string(), "text/plain; charset=utf-8".into()),
            ("content-length".to_string(), body.len().to_string().as_str().into()),
            ("retry-after".to_string(), "1".into()),
        ],
        source: ResponseSource::Connector,
    };
    if write_frame(&mut send, &head).await.is_ok() && send.write_all(body.as_bytes()).await.is_ok() {
        let _ = send.finish();
    } else {
        let _ = send.reset(proto::code::STREAM_CANCELLED);
    }
}

/// Sends a connector-made error response; returns the body size.
async fn answer_error(send: &mut quinn::SendStream, status: StatusCode, message: &str) -> u64 {
    let body = format!("sluice connector: {message}\n");
    let head = ResponseHead {
        status: status.as_u16(),
        headers: vec![
            (CONTENT_TYPE.as_str().to_string(), "text/plain; charset=utf-8".into()),
            ("content-length".to_string(), body.len().to_string().as_str().into()),
        ],
        source: ResponseSource::Connector,
    };
    if write_frame(send, &head).await.is_ok() && send.write_all(body.as_bytes()).await.is_ok() {
        let _ = send.finish();
    } else {
        let _ = send.reset(proto::code::STREAM_CANCELLED);
    }
    body.len() as u64
}
