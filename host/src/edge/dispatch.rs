//! Dispatch of one client request: host → tunnel → connection → QUIC stream, and back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, CONTENT_TYPE, COOKIE, HOST};
use http::{Request, Response, StatusCode, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn, Instrument};

use super::registry::{Admitted, InFlight};
use super::EdgeShared;
use crate::admin::metrics::{InFlightGauge, KindLabels};
use crate::config::normalize_host;
use crate::headers::{from_wire, requested_upgrade, strip_hop_by_hop, to_wire, REQUEST_ID};
use crate::proto::{self, io::read_frame, RequestHead, ResponseHead};
use crate::relay::{self, HttpBody};

/// Handles one client request. Always answers: errors become small plain-text responses.
pub(super) async fn handle(
    req: Request<Incoming>,
    shared: Arc<EdgeShared>,
    client: SocketAddr,
    scheme: &'static str,
) -> Result<Response<HttpBody>, Infallible> {
    let request_id = new_request_id();
    let span = tracing::info_span!("request", id = %request_id);
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let host = req
        .uri()
        .host()
        .map(str::to_string)
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|v| v.to_str().ok())
                .map(normalize_host)
        })
        .unwrap_or_default();
    let (resp, tunnel) = forward(req, &shared, client, scheme, &request_id)
        .instrument(span.clone())
        .await;
    let elapsed = start.elapsed();
    shared.metrics.observe(resp.status().as_u16(), elapsed);
    if shared.config.access_log {
        info!(
            target: "sluice::access",
            %method,
            host = %host,
            %path,
            status = resp.status().as_u16(),
            duration_ms = elapsed.as_millis() as u64,
            tunnel = tunnel.as_deref().unwrap_or("-"),
            request_id = %request_id,
            client = %client,
            "request"
        );
    }
    Ok(resp)
}

async fn forward(
    req: Request<Incoming>,
    shared: &EdgeShared,
    client: SocketAddr,
    scheme: &'static str,
    request_id: &str,
) -> (Response<HttpBody>, Option<String>) {
    let gauge = InFlightGauge::new(&shared.metrics.in_flight);
    let authority = req.uri().authority().map(|a| a.to_string()).or_else(|| {
        req.headers()
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    let Some(authority) = authority else {
        return (
            plain(
                StatusCode::BAD_REQUEST,
                "sluice: the request has no Host header\n",
                request_id,
            ),
            None,
        );
    };
    let host = normalize_host(&authority);
    let Some(tunnel) = shared.registry.tunnel_for_host(&host) else {
        return (
            plain(
                StatusCode::NOT_FOUND,
                &format!("sluice: no tunnel serves host {host}\n"),
                request_id,
            ),
            None,
        );
    };
    let admitted = match shared.registry.admit(&tunnel) {
        Ok(a) => a,
        Err(limit) => {
            shared
                .metrics
                .rejected
                .get_or_create(&KindLabels {
                    kind: "tunnel-limit",
                })
                .inc();
            let mut resp = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "sluice: tunnel {tunnel} is at its limit of {limit} concurrent requests\n"
                ),
                request_id,
            );
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            return (resp, Some(tunnel));
        }
    };
    let resp = forward_admitted(
        req,
        shared,
        client,
        scheme,
        request_id,
        authority,
        host,
        &tunnel,
        (gauge, admitted),
    )
    .await;
    (resp, Some(tunnel))
}

#[allow(clippy::too_many_arguments)]
async fn forward_admitted(
    mut req: Request<Incoming>,
    shared: &EdgeShared,
    client: SocketAddr,
    scheme: &'static str,
    request_id: &str,
    authority: String,
    host: String,
    tunnel: &str,
    guards: (InFlightGauge, Admitted),
) -> Response<HttpBody> {
    let upgrade = if req.version() == Version::HTTP_11 {
        requested_upgrade(req.headers())
    } else {
        None
    };
    let on_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let version = req.version();
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(HOST);
    headers.remove(REQUEST_ID);
    if version == Version::HTTP_2 {
        join_cookies(&mut headers);
    }
    set_forwarded(
        &mut headers,
        shared.config.trust_forwarded_for,
        client,
        scheme,
        &authority,
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID, v);
    }
    let head = RequestHead {
        request_id: request_id.to_string(),
        method: parts.method.to_string(),
        scheme: scheme.to_string(),
        authority: authority.clone(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        headers: to_wire(&headers),
        client_addr: Some(client.to_string()),
        upgrade: upgrade.clone(),
        empty_body: body.is_end_stream(),
    };
    let frame = match proto::encode(&head) {
        Ok(f) => f,
        Err(_) => {
            return plain(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "sluice: the request head is too large\n",
                request_id,
            )
        }
    };

    // Open a stream and send the head; a connection that fails before anything reached the
    // connector is skipped and the next one tried.
    let mut tried = Vec::new();
    let (in_flight, mut send, mut recv) = loop {
        let Some(in_flight) = shared.registry.pick(&tunnel, &tried) else {
            warn!(tunnel = %tunnel, %host, "no live connection for the tunnel");
            return plain(
                StatusCode::BAD_GATEWAY,
                &format!("sluice: tunnel {tunnel} is offline (no connector is connected)\n"),
                request_id,
            );
        };
        match open_stream(&in_flight, &frame).await {
            Ok((send, recv)) => break (in_flight, send, recv),
            Err(e) => {
                debug!(tunnel = %tunnel, connection = in_flight.conn().id, cause = %e, "could not open a stream, trying another connection");
                tried.push(in_flight.conn().id);
            }
        }
    };
    let connection = in_flight.conn().id;

    // Upload the body concurrently with waiting for the answer (an origin may answer early).
    let mut held_send = None;
    if upgrade.is_none() {
        tokio::spawn(
            async move {
                match relay::pump(body, &mut send).await {
                    Ok(_) => {
                        let _ = send.finish();
                    }
                    Err(e) => {
                        debug!(cause = %e, "request body upload stopped");
                        let _ = send.reset(proto::code::STREAM_CANCELLED);
                    }
                }
            }
            .in_current_span(),
        );
    } else {
        held_send = Some(send);
    }

    let resp_head: ResponseHead = match read_frame(&mut recv).await {
        Ok(h) => h,
        Err(e) => {
            warn!(tunnel = %tunnel, connection, cause = %e, "the connector did not answer the request");
            if let Some(mut s) = held_send {
                let _ = s.reset(proto::code::STREAM_CANCELLED);
            }
            return plain(
                StatusCode::BAD_GATEWAY,
                "sluice: the connector did not answer\n",
                request_id,
            );
        }
    };
    let Ok(status) = StatusCode::from_u16(resp_head.status) else {
        warn!(tunnel = %tunnel, connection, status = resp_head.status, "the connector sent an invalid status");
        return plain(
            StatusCode::BAD_GATEWAY,
            "sluice: the connector sent an invalid response\n",
            request_id,
        );
    };
    let (mut resp_headers, invalid) = from_wire(&resp_head.headers);
    if invalid > 0 {
        debug!(invalid, "dropped invalid response headers");
    }
    strip_hop_by_hop(&mut resp_headers);
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp_headers.insert(REQUEST_ID, v);
    }

    if let (Some(proto_name), Some(on_upgrade), Some(send)) =
        (&upgrade, on_upgrade, held_send.take())
    {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            resp_headers.insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
            if let Ok(v) = HeaderValue::from_str(proto_name) {
                resp_headers.insert(http::header::UPGRADE, v);
            }
            tokio::spawn(
                async move {
                    let _in_flight = (in_flight, guards);
                    match on_upgrade.await {
                        Ok(upgraded) => {
                            let mut send = send;
                            match relay::splice(TokioIo::new(upgraded), &mut send, recv).await {
                                Ok((up, down)) => debug!(up, down, "upgraded connection closed"),
                                Err(e) => {
                                    debug!(cause = %e, "upgraded connection failed");
                                    let _ = send.reset(proto::code::STREAM_CANCELLED);
                                }
                            }
                        }
                        Err(e) => {
                            debug!(cause = %e, "client upgrade failed");
                            let mut send = send;
                            let _ = send.reset(proto::code::STREAM_CANCELLED);
                        }
                    }
                }
                .in_current_span(),
            );
            let mut resp = Response::new(relay::empty());
            *resp.status_mut() = status;
            *resp.headers_mut() = resp_headers;
            return resp;
        }
        // The origin declined the upgrade: a normal response, and no more request bytes.
        let mut send = send;
        let _ = send.finish();
    }

    let body = relay::with_guard(relay::recv_body(recv), (in_flight, guards));
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = resp_headers;
    debug!(tunnel = %tunnel, connection, source = ?resp_head.source, status = status.as_u16(), "response head relayed");
    resp
}

/// How long opening a stream and writing its head may take before another connection is
/// tried (a connector that grants no stream credit must not stall requests).
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn open_stream(
    in_flight: &InFlight,
    frame: &[u8],
) -> Result<(quinn::SendStream, quinn::RecvStream), Box<dyn std::error::Error + Send + Sync>> {
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
    Ok((send, recv))
}

/// Sets `x-forwarded-for`, `-proto` and `-host`. Client-sent values survive only when the edge
/// trusts a proxy in front of it.
fn set_forwarded(
    headers: &mut http::HeaderMap,
    trust: bool,
    client: SocketAddr,
    scheme: &str,
    authority: &str,
) {
    let ip = client.ip().to_string();
    let previous: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let xff = if trust && !previous.is_empty() {
        format!("{}, {ip}", previous.join(", "))
    } else {
        ip
    };
    if !trust {
        // Other spellings of the same claims are not the edge's either.
        headers.remove("forwarded");
        headers.remove("x-real-ip");
    }
    let keep_proto = trust && headers.contains_key("x-forwarded-proto");
    let keep_host = trust && headers.contains_key("x-forwarded-host");
    headers.remove("x-forwarded-for");
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    if !keep_proto {
        headers.insert(
            "x-forwarded-proto",
            HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }),
        );
    }
    if !keep_host {
        headers.remove("x-forwarded-host");
        if let Ok(v) = HeaderValue::from_str(authority) {
            headers.insert("x-forwarded-host", v);
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

/// A random 128-bit request id, hex encoded.
fn new_request_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}
