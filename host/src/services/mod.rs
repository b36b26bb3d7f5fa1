//! TCP and UDP services through the tunnel, shared by both roles: what a session is counted,
//! logged and relayed as.
//!
//! A session reaches a service in one of two ways:
//! - through a **public port** of the edge (`[[tunnel.port]]`): the edge opens a session
//!   stream ([`crate::proto::SessionHead`]) to a connector, which connects to the
//!   `[[service]]`'s origin; TCP bytes or UDP datagrams then flow on that stream;
//! - through **`sluice access tcp`**: a WebSocket request to the edge's HTTPS listener, routed
//!   like any request (ingress rules, `on-request` plugins) to a `tcp://` origin; the
//!   connector bridges the WebSocket to a TCP connection ([`websocket`]).
//!
//! Either way a session has a cap, an idle timeout, metrics by service and one access-log
//! line when it ends ([`SessionRecord`]).

pub mod proxy_protocol;
pub mod udp;
pub mod websocket;

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::info;

use crate::proto::SessionProtocol;

/// Labels of the session gauges and counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    /// Tunnel id.
    pub tunnel: String,
    /// Service name (`[[service]]`), or the origin's name for `sluice access` sessions.
    pub service: String,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
}

/// Labels of the sessions counter: how each ended or why it never started.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionOutcomeLabels {
    /// Tunnel id.
    pub tunnel: String,
    /// Service name.
    pub service: String,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// `closed` (ended normally), `idle` (idle timeout), `failed` (a side failed mid-session),
    /// or why it did not start: `denied`, `limit`, `offline`, `unknown-service`, or the
    /// origin failure kind (`refused`, `connect-timeout`, `unreachable`).
    pub outcome: &'static str,
}

/// Labels of the session byte counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionBytesLabels {
    /// Tunnel id.
    pub tunnel: String,
    /// Service name.
    pub service: String,
    /// `up` (client to origin) or `down` (origin to client).
    pub direction: &'static str,
}

/// Labels of the UDP datagram counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CarrierLabels {
    /// Tunnel id.
    pub tunnel: String,
    /// Service name.
    pub service: String,
    /// `quic-datagram` or `stream` (over HTTP/2, or too large for a QUIC datagram).
    pub carrier: &'static str,
}

/// The session metrics of one role.
#[derive(Debug, Default)]
pub struct SessionMetrics {
    /// Sessions (TCP) and flows (UDP) open now.
    pub active: Family<SessionLabels, Gauge>,
    /// Sessions ended or refused, by outcome.
    pub sessions: Family<SessionOutcomeLabels, Counter>,
    /// Bytes relayed, by direction.
    pub bytes: Family<SessionBytesLabels, Counter>,
    /// UDP datagrams sent into the tunnel, by carrier.
    pub datagrams: Family<CarrierLabels, Counter>,
}

impl SessionMetrics {
    /// Registers the families in a role's registry (`<prefix>_sessions_active`, …).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "sessions_active",
            "TCP sessions and UDP flows open, by tunnel, service and protocol",
            self.active.clone(),
        );
        registry.register(
            "sessions",
            "TCP sessions and UDP flows ended or refused, by outcome",
            self.sessions.clone(),
        );
        registry.register(
            "session_bytes",
            "Bytes relayed by TCP sessions and UDP flows, by direction (up: client to origin)",
            self.bytes.clone(),
        );
        registry.register(
            "udp_datagrams",
            "UDP datagrams sent into the tunnel, by carrier: quic-datagram, or stream (HTTP/2, or too large for a QUIC datagram)",
            self.datagrams.clone(),
        );
    }

    /// Counts a session that did not start.
    pub fn refused(
        &self,
        tunnel: &str,
        service: &str,
        protocol: SessionProtocol,
        why: &'static str,
    ) {
        self.sessions
            .get_or_create(&SessionOutcomeLabels {
                tunnel: tunnel.to_string(),
                service: service.to_string(),
                protocol: protocol.as_str(),
                outcome: why,
            })
            .inc();
    }

    /// The counters of the datagrams a UDP flow of `labels` sends into the tunnel, by carrier,
    /// for [`udp::relay`] to count as it goes.
    pub fn datagram_counters(&self, labels: &SessionLabels) -> udp::DatagramCounters {
        let counter = |carrier| {
            self.datagrams
                .get_or_create(&CarrierLabels {
                    tunnel: labels.tunnel.clone(),
                    service: labels.service.clone(),
                    carrier,
                })
                .clone()
        };
        udp::DatagramCounters {
            quic: counter("quic-datagram"),
            stream: counter("stream"),
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Both sides closed.
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    /// A side failed (reset, I/O error, the connection to the other role lost).
    Failed,
}

impl Ending {
    /// The metric label and log value.
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::Closed => "closed",
            Ending::Idle => "idle",
            Ending::Failed => "failed",
        }
    }

    /// The ending of a relay that returned `r`.
    pub fn of(r: &std::io::Result<()>) -> Ending {
        match r {
            Ok(_) => Ending::Closed,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ending::Idle,
            Err(_) => Ending::Failed,
        }
    }
}

/// One open session: counted in `sessions_active` while it lives, logged and counted once
/// when [`SessionRecord::close`] is called.
#[derive(Debug)]
pub struct SessionRecord {
    metrics: Arc<SessionMetrics>,
    labels: SessionLabels,
    id: String,
    client: String,
    start: Instant,
    access_log: bool,
}

impl SessionRecord {
    /// Starts counting a session of `service`.
    pub fn open(
        metrics: Arc<SessionMetrics>,
        labels: SessionLabels,
        id: &str,
        client: &str,
        access_log: bool,
    ) -> Self {
        metrics.active.get_or_create(&labels).inc();
        SessionRecord {
            metrics,
            labels,
            id: id.to_string(),
            client: client.to_string(),
            start: Instant::now(),
            access_log,
        }
    }

    /// The session's labels.
    pub fn labels(&self) -> &SessionLabels {
        &self.labels
    }

    /// Ends the session: adds its bytes (`up`: client to origin), counts how it ended and
    /// writes its access-log line.
    pub fn close(self, up: u64, down: u64, result: &std::io::Result<()>) {
        let ending = Ending::of(result);
        let error = result.as_ref().err().map(|e| e.to_string());
        let error = error.as_deref();
        let l = &self.labels;
        for (direction, n) in [("up", up), ("down", down)] {
            self.metrics
                .bytes
                .get_or_create(&SessionBytesLabels {
                    tunnel: l.tunnel.clone(),
                    service: l.service.clone(),
                    direction,
                })
                .inc_by(n);
        }
        self.metrics
            .sessions
            .get_or_create(&SessionOutcomeLabels {
                tunnel: l.tunnel.clone(),
                service: l.service.clone(),
                protocol: l.protocol,
                outcome: ending.as_str(),
            })
            .inc();
        if self.access_log {
            info!(
                target: "sluice::access",
                session_id = %self.id,
                tunnel = %l.tunnel,
                service = %l.service,
                protocol = l.protocol,
                client = %self.client,
                bytes_up = up,
                bytes_down = down,
                duration_ms = self.start.elapsed().as_millis() as u64,
                outcome = ending.as_str(),
                error = error.unwrap_or(""),
                "session"
            );
        }
    }
}

impl Drop for SessionRecord {
    fn drop(&mut self) {
        self.metrics.active.get_or_create(&self.labels).dec();
    }
}

/// How long a session that idled keeps reading what the other role still sends, after its
/// FIN, so that the other role ends its side normally instead of seeing its stream stopped.
const IDLE_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Ends a session's stream as the relay ended: a reset both ways when something failed; a FIN
/// when both sides closed; after an idle timeout, a FIN, then whatever the other role still
/// sends is read (for at most [`IDLE_LINGER`]) until its FIN, so that both roles record a
/// normal end.
pub async fn end_stream(
    send: &mut crate::transport::SendStream,
    mut recv: crate::transport::RecvStream,
    result: &std::io::Result<()>,
) {
    match Ending::of(result) {
        Ending::Failed => {
            let _ = send.reset(crate::proto::code::STREAM_SESSION_ENDED);
            let _ = recv.stop(crate::proto::code::STREAM_SESSION_ENDED);
        }
        Ending::Closed => {
            let _ = send.finish();
        }
        Ending::Idle => {
            let _ = send.finish();
            let rest = async { while let Ok(Some(_)) = recv.read_chunk(64 * 1024).await {} };
            let _ = tokio::time::timeout(IDLE_LINGER, rest).await;
        }
    }
}

/// Lets a warning through at most once a second: sessions are opened by anyone who can reach
/// a port, and a refusal each must not flood the log.
#[derive(Debug)]
pub struct Throttle {
    started: Instant,
    /// Milliseconds since `started` of the last warning, plus one second (0: none yet).
    last: std::sync::atomic::AtomicU64,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            started: Instant::now(),
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Throttle {
    /// Whether a warning may be logged now.
    pub fn allow(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.started.elapsed().as_millis() as u64 + 1000;
        let last = self.last.load(Relaxed);
        now >= last + 1000
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }
}

/// A fresh session id (`s-` and 16 hexadecimal digits).
pub fn session_id() -> String {
    format!("s-{:016x}", rand::random::<u64>())
}
