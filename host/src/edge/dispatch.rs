//! Dispatch of one client request: host → tunnel → connection → QUIC stream, and back.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{
    HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, COOKIE, HOST, TRANSFER_ENCODING, UPGRADE,
};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn, Instrument};

use super::client::Peer;
use super::registry::{Admitted, InFlight};
use super::EdgeShared;
use crate::admin::metrics::{InFlightGauge, KindLabels, TunnelId, TunnelLabels};
use crate::authority::Authority;
use crate::headers::{
    requested_upgrade, strip_hop_by_hop, REQUEST_ID_HEADER as REQUEST_ID, X_FORWARDED_FOR,
    X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REAL_IP,
};
use crate::proto::{self, io::read_payload, HeadCodec, Headers, RequestHead, ResponseSource};
use crate::relay::{self, HttpBody};
use crate::transport::{RecvStream, SendStream};

/// Handles one client request. Always answers: errors become small plain-text responses.
pub(super) async fn handle(
    req: Request<Incoming>,
    shared: Arc<EdgeShared>,
    client: Arc<Peer>,
    scheme: &'static str,
) -> Result<Response<HttpBody>, Infallible> {
    let request_id = new_request_id();
    let span = tracing::info_span!("request", id = %request_id);
    let start = Instant::now();
    let method = req.method().clone();
    // Copied only for the access log.
    let path = shared
        .config
        .access_log
        .then(|| req.uri().path().to_string());
    let routed = forward(req, &shared, &client, scheme, &request_id)
        .instrument(span.clone())
        .await;
    let elapsed = start.elapsed();
    let status = routed.resp.status().as_u16();
    shared
        .metrics
        .observe(routed.tunnel.as_ref(), status, routed.reason, elapsed);
    if shared.config.access_log {
        info!(
            target: "sluice::access",
            %method,
            host = routed.host.as_deref().unwrap_or("-"),
            path = path.as_deref().unwrap_or("-"),
            status,
            reason = routed.reason,
            duration_ms = elapsed.as_millis() as u64,
            tunnel = routed.tunnel.as_deref().unwrap_or("-"),
            request_id = %request_id,
            client = %client.addr,
            "request"
        );
    }
    Ok(routed.resp)
}

/// Why the edge answered a request itself. The one source of the status, the `reason` label
/// of `requests_total` and the body the client reads (which names no connector or origin).
#[derive(Debug)]
enum EdgeAnswer {
    /// The request is malformed (the reason is safe to show).
    Malformed(String),
    /// `CONNECT`: the edge is a gateway for its hostnames, not a forward proxy.
    Connect,
    /// No tunnel serves the host.
    UnknownHost(String),
    /// The tunnel is at its `max-concurrent-requests`.
    TunnelLimit(usize),
    /// The request head does not fit in a frame.
    HeadTooLarge,
    /// No connector connection is registered for the tunnel.
    Offline,
    /// The connector did not answer, or answered with something invalid.
    ConnectorFailed,
}

impl EdgeAnswer {
    fn status(&self) -> StatusCode {
        match self {
            EdgeAnswer::Malformed(_) => StatusCode::BAD_REQUEST,
            EdgeAnswer::Connect => StatusCode::METHOD_NOT_ALLOWED,
            EdgeAnswer::UnknownHost(_) => StatusCode::NOT_FOUND,
            EdgeAnswer::TunnelLimit(_) => StatusCode::SERVICE_UNAVAILABLE,
            EdgeAnswer::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            EdgeAnswer::Offline | EdgeAnswer::ConnectorFailed => StatusCode::BAD_GATEWAY,
        }
    }

    /// The `reason` label.
    fn reason(&self) -> &'static str {
        match self {
            EdgeAnswer::Offline => "offline",
            EdgeAnswer::ConnectorFailed => "connector-failed",
            _ => "edge-refused",
        }
    }

    fn body(&self, tunnel: Option<&str>) -> String {
        let tunnel = tunnel.unwrap_or("-");
        match self {
            EdgeAnswer::Malformed(reason) => format!("sluice: {reason}\n"),
            EdgeAnswer::Connect => "sluice: CONNECT is not relayed\n".into(),
            EdgeAnswer::UnknownHost(host) => format!("sluice: no tunnel serves host {host}\n"),
            EdgeAnswer::TunnelLimit(limit) => {
                format!("sluice: tunnel {tunnel} is at its limit of {limit} concurrent requests\n")
            }
            EdgeAnswer::HeadTooLarge => "sluice: the request head is too large\n".into(),
            EdgeAnswer::Offline => {
                format!("sluice: tunnel {tunnel} is offline (no connector is connected)\n")
            }
            EdgeAnswer::ConnectorFailed => "sluice: the connector did not answer\n".into(),
        }
    }

    fn response(&self, tunnel: Option<&str>, request_id: &str) -> Response<HttpBody> {
        let mut resp = plain(self.status(), &self.body(tunnel), request_id);
        if let EdgeAnswer::TunnelLimit(_) = self {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// A response and how far the request got, for the access log and the metrics.
struct Routed {
    resp: Response<HttpBody>,
    /// The request's host, kept for the access log when it is on.
    host: Option<String>,
    tunnel: Option<Arc<str>>,
    reason: &'static str,
}

impl Routed {
    fn refused(
        answer: EdgeAnswer,
        host: Option<String>,
        tunnel: Option<Arc<str>>,
        request_id: &str,
    ) -> Self {
        Routed {
            resp: answer.response(tunnel.as_deref(), request_id),
            reason: answer.reason(),
            host,
            tunnel,
        }
    }
}

/// What the edge established about a request before routing it.
struct Checked {
    authority: Authority,
    /// An allowed protocol the client asks to upgrade to.
    upgrade: Option<String>,
}

async fn forward(
    req: Request<Incoming>,
    shared: &EdgeShared,
    client: &Peer,
    scheme: &'static str,
    request_id: &str,
) -> Routed {
    if req.method() == Method::CONNECT {
        return Routed::refused(EdgeAnswer::Connect, None, None, request_id);
    }
    let checked = match check(&req, &shared.config.allowed_upgrades) {
        Ok(c) => c,
        Err(reason) => {
            debug!(%reason, "refused a malformed request");
            return Routed::refused(EdgeAnswer::Malformed(reason), None, None, request_id);
        }
    };
    let host = checked.authority.host();
    // Copied only for the access log.
    let logged_host = shared.config.access_log.then(|| host.to_string());
    let Some((tunnel, admitted)) = shared.registry.route(host) else {
        return Routed::refused(
            EdgeAnswer::UnknownHost(host.to_string()),
            logged_host,
            None,
            request_id,
        );
    };
    let gauge = InFlightGauge::new(&shared.metrics.in_flight.get_or_create(&TunnelLabels {
        tunnel: TunnelId(tunnel.clone()),
    }));
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(limit) => {
            shared
                .metrics
                .rejected
                .get_or_create(&KindLabels {
                    kind: "tunnel-limit",
                })
                .inc();
            return Routed::refused(
                EdgeAnswer::TunnelLimit(limit),
                logged_host,
                Some(tunnel),
                request_id,
            );
        }
    };
    let request = Forwarded {
        shared,
        client,
        scheme,
        request_id,
        tunnel: &tunnel,
    };
    let (resp, reason) = match request
        .forward_admitted(req, checked, (gauge, admitted))
        .await
    {
        Ok(answered) => answered,
        Err(answer) => (answer.response(Some(&tunnel), request_id), answer.reason()),
    };
    Routed {
        resp,
        reason,
        host: logged_host,
        tunnel: Some(tunnel),
    }
}

/// Validates what routing and framing depend on: one Host that agrees with the request
/// target's authority, and no body on an upgrade. The error is the reason given with a 400.
fn check(req: &Request<Incoming>, allowed_upgrades: &[String]) -> Result<Checked, String> {
    let authority = request_authority(req)?;
    let upgrade = if req.version() == Version::HTTP_11 {
        requested_upgrade(req.headers(), allowed_upgrades)
    } else {
        None
    };
    // The bytes after an upgrade request's head belong to the new protocol: a body as well
    // would leave the origin to guess where the request ends.
    if upgrade.is_some()
        && (!req.body().is_end_stream() || req.headers().contains_key(TRANSFER_ENCODING))
    {
        return Err("an upgrade request cannot carry a body".into());
    }
    Ok(Checked { authority, upgrade })
}

/// The authority a request is for: the request target's (HTTP/2 `:authority`, HTTP/1.1
/// absolute-form) or else the one Host header. Both present and disagreeing is refused rather
/// than resolved, so that no hop downstream can read the other one.
fn request_authority(req: &Request<Incoming>) -> Result<Authority, String> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let (host, extra) = (hosts.next(), hosts.next());
    if extra.is_some() {
        return Err("the request has more than one Host header".into());
    }
    let host = host
        .map(|v| {
            let text = v.to_str().map_err(|_| "the Host header is not ASCII")?;
            Authority::parse(text).map_err(|e| format!("invalid Host header: {e}"))
        })
        .transpose()?;
    let target = req
        .uri()
        .authority()
        .map(|a| {
            Authority::parse(a.as_str()).map_err(|e| format!("invalid request authority: {e}"))
        })
        .transpose()?;
    match (target, host) {
        (Some(t), Some(h)) if t != h => {
            Err("the request target's authority and the Host header disagree".into())
        }
        (Some(a), _) | (None, Some(a)) => Ok(a),
        (None, None) => Err("the request has no Host header".into()),
    }
}

/// One admitted request on its way to a connector.
struct Forwarded<'a> {
    shared: &'a EdgeShared,
    client: &'a Peer,
    scheme: &'static str,
    request_id: &'a str,
    tunnel: &'a str,
}

impl Forwarded<'_> {
    /// Relays an admitted request; the answer comes with its `reason` label (who answered).
    async fn forward_admitted(
        &self,
        mut req: Request<Incoming>,
        checked: Checked,
        guards: (InFlightGauge, Admitted),
    ) -> Result<(Response<HttpBody>, &'static str), EdgeAnswer> {
        let on_upgrade = checked
            .upgrade
            .as_ref()
            .map(|_| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let mut head = self.request_head(parts, &body, &checked);
        // A request without a body is one packet: head and FIN together.
        let no_body = checked.upgrade.is_none() && body.is_end_stream();
        let (in_flight, send, mut recv) = self.open_any(&mut head, no_body).await?;
        let framed = head.trailers;
        let (connection, heads) = (in_flight.conn().id, in_flight.conn().heads);
        // The request counts (against the tunnel, the connection, the drain) until both its
        // upload and its response are done.
        let counted = Arc::new((in_flight, guards));

        // Upload the body concurrently with waiting for the answer (an origin may answer
        // early); an upgrade keeps the send half for the bytes after 101.
        let mut held_send = None;
        if no_body {
            drop(send);
        } else if checked.upgrade.is_none() {
            let body =
                relay::with_idle_timeout(relay::boxed(body), self.shared.config.body_idle_timeout);
            let body = if framed { relay::framed(body) } else { body };
            tokio::spawn(upload(body, send, counted.clone()).in_current_span());
        } else {
            held_send = Some(send);
        }

        let (status, mut resp_headers, reason) =
            match self.response_head(&mut recv, connection, heads).await {
                Ok(h) => h,
                Err(answer) => {
                    if let Some(mut s) = held_send {
                        let _ = s.reset(proto::code::STREAM_CANCELLED);
                    }
                    return Err(answer);
                }
            };

        if let (Some(proto_name), Some(on_upgrade), Some(mut send)) =
            (&checked.upgrade, on_upgrade, held_send.take())
        {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                resp_headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
                if let Ok(v) = HeaderValue::from_str(proto_name) {
                    resp_headers.insert(UPGRADE, v);
                }
                let idle = self.shared.config.body_idle_timeout;
                let held = (counted, self.client.slot.clone());
                tokio::spawn(splice_upgraded(on_upgrade, send, recv, idle, held).in_current_span());
                return Ok((response(status, resp_headers, relay::empty()), reason));
            }
            // The origin declined the upgrade: a normal response, and no more request bytes.
            let _ = send.finish();
        }

        let body =
            relay::with_idle_timeout(relay::recv_body(recv), self.shared.config.body_idle_timeout);
        let body = if framed { relay::unframed(body) } else { body };
        debug!(tunnel = %self.tunnel, connection, status = status.as_u16(), "response head relayed");
        Ok((
            response(status, resp_headers, relay::with_guard(body, counted)),
            reason,
        ))
    }

    /// The head sent to the connector: end-to-end headers only, the edge's own
    /// `x-forwarded-*` and request id, the canonical authority, and one `content-length`
    /// exactly when the client framed its body by length.
    fn request_head(
        &self,
        parts: http::request::Parts,
        body: &Incoming,
        checked: &Checked,
    ) -> RequestHead {
        let mut headers = parts.headers;
        let declared_length = headers.contains_key(CONTENT_LENGTH);
        // An HTTP/2 client that accepts trailers (gRPC's does) gets them through the tunnel,
        // on connections whose connector reads framed bodies (see `open_any`).
        let trailers = parts.version == Version::HTTP_2
            && headers
                .get_all(http::header::TE)
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        strip_hop_by_hop(&mut headers);
        headers.remove(HOST);
        headers.remove(REQUEST_ID);
        headers.remove(CONTENT_LENGTH);
        if declared_length && checked.upgrade.is_none() {
            // What hyper framed the body by (it refuses conflicting lengths), not the bytes
            // the client wrote; without `content-length` the connector sends it chunked.
            if let Some(n) = body.size_hint().exact() {
                headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
        if parts.version == Version::HTTP_2 {
            join_cookies(&mut headers);
        }
        let authority = checked.authority.to_string();
        set_forwarded(
            &mut headers,
            self.shared.config.trust_forwarded_for,
            &self.client.ip,
            self.scheme,
            &authority,
        );
        if let Ok(v) = HeaderValue::from_str(self.request_id) {
            headers.insert(REQUEST_ID, v);
        }
        RequestHead {
            request_id: self.request_id.to_string(),
            method: parts.method.to_string(),
            scheme: self.scheme.to_string(),
            authority,
            path: parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            headers: headers.into(),
            client_addr: Some(self.client.addr_text.clone()),
            upgrade: checked.upgrade.clone(),
            empty_body: checked.upgrade.is_some() || body.is_end_stream(),
            trailers: trailers && checked.upgrade.is_none(),
        }
    }

    /// Opens a stream on a live connection of the tunnel and sends `head` in the encoding of
    /// that connection; a connection that fails before anything reached the connector is
    /// skipped and the next one tried.
    /// Trailers are asked for only of a connector that reads framed bodies: `head.trailers`
    /// says afterwards whether this stream's bodies are framed.
    async fn open_any(
        &self,
        head: &mut RequestHead,
        finish: bool,
    ) -> Result<(InFlight, SendStream, RecvStream), EdgeAnswer> {
        let mut tried = Vec::new();
        let wants_trailers = head.trailers;
        loop {
            let Some(in_flight) = self.shared.registry.pick(self.tunnel, &tried) else {
                warn!(tunnel = %self.tunnel, "no live connection for the tunnel");
                return Err(EdgeAnswer::Offline);
            };
            head.trailers = wants_trailers && in_flight.conn().trailers;
            let Ok(frame) = in_flight.conn().heads.encode_request(head) else {
                return Err(EdgeAnswer::HeadTooLarge);
            };
            match open_stream(&in_flight, &frame, finish).await {
                Ok((send, recv)) => return Ok((in_flight, send, recv)),
                Err(e) => {
                    debug!(tunnel = %self.tunnel, connection = in_flight.conn().id, cause = %e, "could not open a stream, trying another connection");
                    tried.push(in_flight.conn().id);
                }
            }
        }
    }

    /// Reads the connector's response head, with the `reason` label of who produced it.
    async fn response_head(
        &self,
        recv: &mut RecvStream,
        connection: u64,
        heads: HeadCodec,
    ) -> Result<(StatusCode, http::HeaderMap, &'static str), EdgeAnswer> {
        let tunnel = self.tunnel;
        let read = read_payload(recv).await;
        let head = read
            .and_then(|p| Ok(heads.decode_response(&p.into())?))
            .map_err(|e| {
                warn!(%tunnel, connection, cause = %e, "the connector did not answer the request");
                EdgeAnswer::ConnectorFailed
            })?;
        let status = StatusCode::from_u16(head.status).map_err(|_| {
            warn!(%tunnel, connection, status = head.status, "the connector sent an invalid status");
            EdgeAnswer::ConnectorFailed
        })?;
        let reason = match head.source {
            ResponseSource::Origin => "origin",
            ResponseSource::Plugin => "plugin",
            ResponseSource::Connector | ResponseSource::Other => "connector",
        };
        let Headers {
            map: mut headers,
            invalid,
        } = head.headers;
        if invalid > 0 {
            debug!(invalid, "dropped invalid response headers");
        }
        strip_hop_by_hop(&mut headers);
        if let Ok(v) = HeaderValue::from_str(self.request_id) {
            headers.insert(REQUEST_ID, v);
        }
        debug!(source = ?head.source, "response head received");
        Ok((status, headers, reason))
    }
}

/// A response with `status`, `headers` and `body`.
fn response(status: StatusCode, headers: http::HeaderMap, body: HttpBody) -> Response<HttpBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// Streams the client's body to the connector; a body that fails resets the stream so that
/// it never looks complete. `_counted` keeps the request counted until the upload ends.
async fn upload<G>(body: HttpBody, mut send: SendStream, _counted: G) {
    match relay::pump(Bytes::new(), body, &mut send, false).await {
        Ok(_) => {}
        Err(e) => {
            debug!(cause = %e, "request body upload stopped");
            let _ = send.reset(proto::code::STREAM_CANCELLED);
        }
    }
}

/// Relays an upgraded client connection over the stream until both directions end or it has
/// been idle for `idle`; `_held` (the request's counts, the client's connection place) lives
/// as long.
async fn splice_upgraded<G>(
    on_upgrade: hyper::upgrade::OnUpgrade,
    mut send: SendStream,
    mut recv: RecvStream,
    idle: std::time::Duration,
    _held: G,
) {
    match on_upgrade.await {
        Ok(upgraded) => {
            let r = relay::splice(TokioIo::new(upgraded), &mut send, &mut recv, idle).await;
            let (up, down) = (r.sent, r.received);
            match r.result {
                Ok(()) => debug!(up, down, "upgraded connection closed"),
                Err(e) => {
                    debug!(up, down, cause = %e, "upgraded connection failed");
                    let _ = send.reset(proto::code::STREAM_CANCELLED);
                }
            }
        }
        Err(e) => {
            debug!(cause = %e, "client upgrade failed");
            let _ = send.reset(proto::code::STREAM_CANCELLED);
        }
    }
}

/// How long opening a stream and writing its head may take before another connection is
/// tried (a connector that grants no stream credit must not stall requests).
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens a request stream on `in_flight`'s connection and writes the head `frame`; with
/// `finish`, the FIN follows at once (no body).
pub(super) async fn open_stream(
    in_flight: &InFlight,
    frame: &[u8],
    finish: bool,
) -> Result<(SendStream, RecvStream), Box<dyn std::error::Error + Send + Sync>> {
    let (mut send, recv) = tokio::time::timeout(OPEN_TIMEOUT, in_flight.conn().conn.open_bi())
        .await
        .map_err(|_| "no stream credit from the connector in time")??;
    let written = tokio::time::timeout(OPEN_TIMEOUT, send.write_all(frame))
        .await
        .map_err(|_| "the request head could not be sent in time");
    if let Err(e) = written.and_then(|r| r.map_err(|_| "the request head could not be sent")) {
        // Never let a partial head end in a clean FIN.
        let _ = send.reset(proto::code::STREAM_CANCELLED);
        return Err(e.into());
    }
    if finish {
        // Cannot fail: the stream was just opened and written by this task alone.
        let _ = send.finish();
    }
    Ok((send, recv))
}

/// Sets `x-forwarded-for`, `-proto` and `-host`. Client-sent values survive only when the edge
/// trusts a proxy in front of it.
fn set_forwarded(
    headers: &mut http::HeaderMap,
    trust: bool,
    ip: &HeaderValue,
    scheme: &str,
    authority: &str,
) {
    let previous: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let xff = if trust && !previous.is_empty() {
        let ip = ip.to_str().expect("an IP address is ASCII");
        HeaderValue::from_str(&format!("{}, {ip}", previous.join(", "))).ok()
    } else {
        Some(ip.clone())
    };
    if !trust {
        // Other spellings of the same claims are not the edge's either.
        headers.remove(http::header::FORWARDED);
        headers.remove(X_REAL_IP);
    }
    let keep_proto = trust && headers.contains_key(X_FORWARDED_PROTO);
    let keep_host = trust && headers.contains_key(X_FORWARDED_HOST);
    headers.remove(X_FORWARDED_FOR);
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if !keep_proto {
        headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }),
        );
    }
    if !keep_host {
        headers.remove(X_FORWARDED_HOST);
        if let Ok(v) = HeaderValue::from_str(authority) {
            headers.insert(X_FORWARDED_HOST, v);
        }
    }
}

/// HTTP/2 may split cookies into several fields; HTTP/1.1 origins expect one (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut http::HeaderMap) {
    let values: Vec<String> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    if values.len() > 1 {
        if let Ok(v) = HeaderValue::from_str(&values.join("; ")) {
            headers.insert(COOKIE, v);
        }
    }
}

/// A small plain-text response produced by the edge itself.
fn plain(status: StatusCode, text: &str, request_id: &str) -> Response<HttpBody> {
    let mut resp = Response::new(relay::full(text.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// A random 128-bit request id, hex encoded (into a buffer: `hex::encode` pushes one `char`
/// at a time, a thousand instructions on every request).
fn new_request_id() -> String {
    let mut text = [0u8; 32];
    hex::encode_to_slice(rand::random::<[u8; 16]>(), &mut text)
        .expect("16 bytes are 32 hex digits");
    String::from_utf8(text.to_vec()).expect("hex digits are ASCII")
}
