//! The connector's side of TCP and UDP services: session streams from the edge's public ports
//! ([`Pipeline::serve_session`]) and `sluice access` WebSocket requests routed to a `tcp://`
//! origin ([`Pipeline::tcp_over_websocket`]).

use http::header::{HeaderValue, CONNECTION, UPGRADE};
use http::{HeaderMap, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, warn};

use super::pipeline::{
    encode_response_head, send_head, Admitted, Failure, Outcome, Pipeline, Reply,
};
use crate::admin::Metrics;
use crate::config::{OriginConfig, OriginTarget, ServiceConfig, SocketTarget};
use crate::origin::{connect_tcp, OriginError};
use crate::proto::{
    self, io::write_frame, RequestHead, ResponseHead, ResponseSource, SessionHead, SessionProtocol,
    SessionReply,
};
use crate::relay;
use crate::services::{self, websocket, SessionLabels, SessionRecord};
use crate::transport::{RecvStream, SendStream};

/// A `sluice access` request routed to a TCP origin.
pub(super) struct AccessSession<'a> {
    pub head: &'a RequestHead,
    pub headers: &'a HeaderMap,
    pub target: &'a SocketTarget,
    pub origin: &'a OriginConfig,
}

/// A session stream from the edge, as the connector received it.
pub(super) struct SessionStream {
    pub head: SessionHead,
    pub send: SendStream,
    pub recv: RecvStream,
    /// A session permit, if one was free.
    pub permit: Option<OwnedSemaphorePermit>,
    /// The connection and its flow router, over QUIC.
    pub datagrams: Option<(
        crate::transport::Connection,
        std::sync::Arc<services::udp::FlowRouter>,
    )>,
}

/// Why a session from a public port could not start: the one place its reply text and its
/// metric label come from.
enum Refusal {
    UnknownService,
    Limit(usize),
    /// The edge's port is TCP and the service UDP, or the reverse.
    WrongProtocol(SessionProtocol),
    Origin(OriginError),
}

impl Refusal {
    fn kind(&self) -> &'static str {
        match self {
            Refusal::UnknownService => "unknown-service",
            Refusal::Limit(_) => "limit",
            Refusal::WrongProtocol(_) => "wrong-protocol",
            Refusal::Origin(e) => e.kind(),
        }
    }

    /// The reply to the edge, which logs it (the origin's address stays here).
    fn reply(&self, service: &str) -> String {
        match self {
            Refusal::UnknownService => format!(
                "the connector has no service {service:?}: add a [[service]] block naming it"
            ),
            Refusal::Limit(n) => format!("too many sessions (max-sessions = {n})"),
            Refusal::WrongProtocol(port) => format!(
                "the edge's port is {} but the connector's service {service:?} is not: make both tcp or both udp",
                port.as_str()
            ),
            Refusal::Origin(e) => format!("{} ({})", e.public_text(), e.kind()),
        }
    }
}

impl Pipeline {
    /// Serves a session stream from one of the edge's public ports: connects to the service's
    /// origin, answers the edge, then relays until either side ends or the session idles.
    pub(super) async fn serve_session(&self, s: SessionStream, metrics: &Metrics, limit: usize) {
        let SessionStream {
            head,
            mut send,
            mut recv,
            permit,
            datagrams,
        } = s;
        let labels = SessionLabels {
            tunnel: self.tunnel().to_string(),
            service: head.service.clone(),
            protocol: head.protocol.as_str(),
        };
        let started = match (self.services.get(&head.service), permit) {
            (None, _) => Err(Refusal::UnknownService),
            (Some(_), None) => Err(Refusal::Limit(limit)),
            (Some(service), _) if service_protocol(service) != head.protocol => {
                Err(Refusal::WrongProtocol(head.protocol))
            }
            (Some(service), Some(permit)) => match connect(service, &head).await {
                Ok(origin) => Ok((service, origin, permit)),
                Err(e) => Err(Refusal::Origin(e)),
            },
        };
        let (service, origin, _permit) = match started {
            Ok(s) => s,
            Err(refusal) => {
                if self.session_warnings().allow() {
                    let cause = match &refusal {
                        Refusal::Origin(e) => e.to_string(),
                        other => other.reply(&head.service),
                    };
                    warn!(service = %head.service, client = %head.client_addr, kind = refusal.kind(), %cause, "session refused");
                }
                metrics.sessions.refused(
                    &labels.tunnel,
                    &labels.service,
                    head.protocol,
                    refusal.kind(),
                );
                let reply = SessionReply {
                    error: Some(refusal.reply(&head.service)),
                    datagrams: false,
                    elsewhere: matches!(
                        refusal,
                        Refusal::UnknownService | Refusal::Limit(_) | Refusal::WrongProtocol(_)
                    ),
                };
                if write_frame(&mut send, &reply).await.is_ok() {
                    let _ = send.finish();
                }
                return;
            }
        };
        // A UDP flow over QUIC takes the datagram path the edge offered.
        let link = match (&origin, head.flow, &datagrams) {
            (SessionOrigin::Udp(_), Some(id), Some((conn, router))) => router.open(conn, id),
            _ => None,
        };
        let reply = SessionReply {
            error: None,
            datagrams: link.is_some(),
            elsewhere: false,
        };
        if write_frame(&mut send, &reply).await.is_err() {
            return;
        }
        let record = SessionRecord::open(
            metrics.sessions.clone(),
            labels,
            &head.session_id,
            &head.client_addr.to_string(),
            self.access_log(),
        );
        // `sent` is what the origin sent into the tunnel: down.
        let r = match origin {
            SessionOrigin::Tcp(tcp) => {
                relay::splice(tcp, &mut send, &mut recv, self.session_idle_timeout).await
            }
            SessionOrigin::Udp(socket) => {
                let origin = services::udp::ConnectedSocket(std::sync::Arc::new(socket));
                let counters = metrics.sessions.datagram_counters(record.labels());
                let idle = self.udp_idle_timeout;
                let sink = origin.clone();
                services::udp::relay(origin, &sink, &mut send, &mut recv, link, idle, &counters)
                    .await
            }
        };
        services::end_stream(&mut send, recv, &r.result).await;
        debug!(service = %service.name, up = r.received, down = r.sent, "session ended");
        record.close(r.received, r.sent, &r.result);
    }

    /// A `sluice access tcp` WebSocket request whose rule (or plugin) chose a TCP origin:
    /// exchanges the request's permit for a session permit, connects, answers `101` and
    /// bridges the WebSocket to the origin connection.
    pub(super) async fn tcp_over_websocket(
        &self,
        s: AccessSession<'_>,
        send: &mut Reply,
        recv: RecvStream,
        admitted: &mut Admitted,
    ) -> Result<Outcome, Failure> {
        let name = s.origin.name.clone();
        let key = match (s.head.upgrade.as_deref(), s.headers.get("sec-websocket-key")) {
            (Some(u), Some(key)) if u.eq_ignore_ascii_case("websocket") => key.clone(),
            _ => {
                return Err(Failure::Answer {
                    status: StatusCode::BAD_REQUEST,
                    message: format!("origin {name:?} is a TCP service; the request is not a WebSocket upgrade"),
                    public: Some("this hostname leads to a TCP service: connect with `sluice access tcp --hostname HOST`"),
                    origin: name,
                    kind: "bad-request",
                    origin_failure: false,
                })
            }
        };
        let tunnel = self.tunnel().to_string();
        let Ok(permit) = admitted.ctx.admission.sessions.clone().try_acquire_owned() else {
            self.session_metrics_refused(&tunnel, &name, "limit");
            return Err(Failure::Answer {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!(
                    "too many sessions (max-sessions = {})",
                    admitted.ctx.limits.1
                ),
                public: None,
                origin: name,
                kind: "limit",
                origin_failure: false,
            });
        };
        // A session does not count against max-concurrent-requests, nor as a request in flight.
        admitted.request = None;
        admitted.gauge = None;
        let _permit = permit;
        let tcp = match connect_tcp(&name, s.target, s.origin.connect_timeout).await {
            Ok(t) => t,
            Err(e) => {
                self.session_metrics_refused(&tunnel, &name, e.kind());
                warn!(origin = %name, kind = e.kind(), cause = %e, "TCP origin unreachable");
                return Err(Failure::origin(e, name));
            }
        };

        let mut headers = HeaderMap::new();
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        if let Ok(v) = HeaderValue::from_str(&websocket::accept_key(key.as_bytes())) {
            headers.insert("sec-websocket-accept", v);
        }
        let offered = s
            .headers
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == websocket::SUBPROTOCOL);
        if offered {
            headers.insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(websocket::SUBPROTOCOL),
            );
        }
        let head = ResponseHead {
            status: 101,
            headers: headers.into(),
            source: ResponseSource::Origin,
        };
        let frame = encode_response_head(send.heads, &head, &name)?;
        send_head(&mut send.send, frame, &name).await?;

        let record = SessionRecord::open(
            self.session_metrics(),
            SessionLabels {
                tunnel,
                service: name.clone(),
                protocol: SessionProtocol::Tcp.as_str(),
            },
            &s.head.request_id,
            s.head.client_addr.as_deref().unwrap_or(""),
            self.access_log(),
        );
        let io = tokio::io::join(recv, &mut send.send);
        let ws =
            WebSocketStream::from_raw_socket(io, Role::Server, Some(websocket::config())).await;
        // The WebSocket's `received` went to the origin (up); `sent` came from it (down).
        let ping = Some(self.ping_interval());
        let r = websocket::bridge(ws, tcp, self.session_idle_timeout, ping).await;
        if r.result.is_err() {
            let _ = send.send.reset(proto::code::STREAM_SESSION_ENDED);
        }
        let error = r.result.as_ref().err().map(|e| e.to_string());
        record.close(r.received, r.sent, &r.result);
        Ok(Outcome {
            status: 101,
            origin: name,
            source: ResponseSource::Origin,
            bytes_out: r.sent,
            error,
        })
    }
}

/// The origin end of a session from a public port.
enum SessionOrigin {
    Tcp(tokio::net::TcpStream),
    Udp(tokio::net::UdpSocket),
}

/// Connects to a service's origin: TCP (then the PROXY protocol header, when asked for) or a
/// UDP socket connected to it.
async fn connect(
    service: &ServiceConfig,
    head: &SessionHead,
) -> Result<SessionOrigin, OriginError> {
    match (&service.target, head.protocol) {
        (OriginTarget::Tcp(target), SessionProtocol::Tcp) => {
            let mut tcp = connect_tcp(&service.name, target, service.connect_timeout).await?;
            if service.proxy_protocol {
                let header = services::proxy_protocol::header(head.client_addr, head.listen_addr);
                tcp.write_all(&header)
                    .await
                    .map_err(|e| OriginError::Unreachable {
                        origin: service.name.clone(),
                        detail: format!("writing the PROXY protocol header: {e}"),
                    })?;
            }
            Ok(SessionOrigin::Tcp(tcp))
        }
        (OriginTarget::Udp(target), SessionProtocol::Udp) => connect_udp(&service.name, target)
            .await
            .map(SessionOrigin::Udp),
        // Checked by the caller (`service_protocol`).
        (_, protocol) => Err(OriginError::Protocol {
            origin: service.name.clone(),
            detail: format!("not a {} service", protocol.as_str()),
        }),
    }
}

/// Whether a service is reached over TCP or UDP.
fn service_protocol(service: &ServiceConfig) -> SessionProtocol {
    match service.target {
        OriginTarget::Udp(_) => SessionProtocol::Udp,
        _ => SessionProtocol::Tcp,
    }
}

/// A UDP socket connected to `target` (resolved now).
async fn connect_udp(
    name: &str,
    target: &SocketTarget,
) -> Result<tokio::net::UdpSocket, OriginError> {
    let unreachable = |detail: String| OriginError::Unreachable {
        origin: name.to_string(),
        detail,
    };
    let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("the name has no address".into()))?;
    let local: std::net::SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(local)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    socket
        .connect(addr)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    Ok(socket)
}
