//! One connection slot to one edge: dial, register, serve streams, and re-dial with
//! exponential back-off and jitter whenever the connection is lost.
//!
//! With `protocol = "auto"` a slot dials QUIC first and falls back to HTTP/2 over TCP after
//! [`QUIC_ATTEMPTS`] failed QUIC handshakes in a row (at once when QUIC cannot even start);
//! while on HTTP/2 it probes QUIC with back-off and moves back as soon as a QUIC connection
//! registers, the HTTP/2 one draining as a replaced connection does (no request is dropped).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use arc_swap::ArcSwap;

use super::pipeline::{self, Pipeline, StreamContext};
use super::ConnectorState;
use crate::admin::metrics::KindLabels;
use crate::admin::Metrics;
use crate::config::{connector_split_host_port, BackoffConfig, ConnectorConfig, TransportChoice};
use crate::proto::{self, io::read_frame, io::write_frame, Control, HeadCodec, Register, Rejected};
use crate::services::udp::FlowRouter;
use crate::transport::{
    Connection, ConnectionError, HandshakeError, Protocol, RecvStream, SendStream,
};
use crate::wake::Dormant;

/// What a connector says it runs, in its registrations.
pub const SOFTWARE: &str = concat!("sluice/", env!("CARGO_PKG_VERSION"));

/// Time allowed for the handshake plus registration.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(15);

/// Under `protocol = "auto"`, the time a QUIC handshake gets before it counts as failed: a
/// network that drops UDP answers nothing at all, and waiting longer only delays the fallback.
const QUIC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Under `protocol = "auto"`, failed QUIC handshakes in a row before a slot falls back to
/// HTTP/2.
pub const QUIC_ATTEMPTS: u32 = 2;

/// The first QUIC probe of a slot on HTTP/2 waits the back-off of this attempt (1.6 s with the
/// default back-off), later ones longer, up to the back-off cap.
const PROBE_FIRST_STEP: u32 = 4;

/// What every session of a connector shares.
pub(super) struct Shared {
    pub config: Arc<ConnectorConfig>,
    pub pipeline: Arc<ArcSwap<Pipeline>>,
    pub dialer: Dialer,
    /// Cancelled when the grace period ran out: every connection closes at once.
    pub cut_off: CancellationToken,
    pub state: Arc<ConnectorState>,
    /// Request streams in flight, waited for when draining.
    pub streams: TaskTracker,
    pub metrics: Arc<Metrics>,
    /// Admission control: requests and sessions in flight.
    pub admission: pipeline::Admission,
    /// The token connections register with; a reload may change it.
    pub token: Arc<tokio::sync::watch::Sender<crate::secret::Secret>>,
    /// Taken by a slot while it re-registers after a token change, so that connections are
    /// replaced one at a time.
    pub rotation: Arc<tokio::sync::Mutex<()>>,
    /// Tasks serving registered connections (a replaced connection drains in its own).
    pub links: TaskTracker,
    /// Digest of the ingress rules and plugins now serving; a reload may change it.
    pub digest: Arc<tokio::sync::watch::Sender<String>>,
}

/// How a connector reaches its edges: its one QUIC endpoint, and TLS for either transport.
#[derive(Clone)]
pub(super) struct Dialer {
    pub endpoint: quinn::Endpoint,
    pub quic: quinn::ClientConfig,
    pub tcp: Arc<rustls::ClientConfig>,
}

impl Dialer {
    /// TLS trusting the system roots plus the configured `edge-ca`, and a QUIC endpoint on an
    /// ephemeral port.
    pub fn new(config: &ConnectorConfig) -> Result<Dialer, super::ConnectorError> {
        let endpoint = bind_endpoint().map_err(|source| super::ConnectorError::Bind {
            what: "QUIC socket for edges",
            addr: "[::]:0 and 0.0.0.0:0".into(),
            source,
        })?;
        Ok(Dialer {
            endpoint,
            quic: crate::tls::quic_client(&config.edge_ca)?,
            tcp: Arc::new(crate::tls::tcp_client(&config.edge_ca)?),
        })
    }

    /// The handshake over `protocol` (QUIC on the endpoint, or TCP, TLS and HTTP/2), within
    /// `limit`.
    pub async fn connect(
        &self,
        protocol: Protocol,
        addr: std::net::SocketAddr,
        server_name: &str,
        limit: Duration,
    ) -> Result<Connection, SessionError> {
        let failed = |e: HandshakeError| SessionError::Handshake(protocol, e);
        let handshake = async {
            match protocol {
                Protocol::Quic => {
                    let connecting = self
                        .endpoint
                        .connect_with(self.quic.clone(), addr, server_name)
                        .map_err(|e| failed(e.into()))?;
                    Ok(Connection::Quic(
                        connecting.await.map_err(|e| failed(e.into()))?,
                    ))
                }
                Protocol::Http2 => crate::transport::h2::dial(addr, server_name, self.tcp.clone())
                    .await
                    .map_err(failed),
            }
        };
        tokio::time::timeout(limit, handshake)
            .await
            .unwrap_or(Err(SessionError::HandshakeTimeout(protocol, limit)))
    }
}

/// A QUIC endpoint on an ephemeral port, dual-stack when the host allows it.
fn bind_endpoint() -> std::io::Result<quinn::Endpoint> {
    let v6: std::net::SocketAddr = "[::]:0".parse().expect("valid literal");
    let v4: std::net::SocketAddr = "0.0.0.0:0".parse().expect("valid literal");
    use crate::transport::quic::endpoint;
    endpoint(v6, None).or_else(|_| endpoint(v4, None))
}

/// Opens the control stream on `conn`, sends `register` and reads the edge's answer.
pub(super) async fn register(
    conn: &Connection,
    register: Register,
) -> Result<(SendStream, RecvStream, proto::Registered), SessionError> {
    let (mut send, mut recv) = conn.open_control().await?;
    write_frame(&mut send, &Control::Register(register)).await?;
    match read_frame::<_, Control>(&mut recv).await? {
        Control::Registered(ok) => Ok((send, recv, ok)),
        Control::Rejected(rej) => Err(SessionError::Rejected(rej)),
        _ => Err(SessionError::Unexpected),
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error("cannot resolve the edge address: {0}")]
    Resolve(String),
    #[error("cannot connect over {0}: {1}")]
    Handshake(Protocol, HandshakeError),
    #[error("no {0} handshake within {1:?}")]
    HandshakeTimeout(Protocol, Duration),
    #[error("connection failed: {0}")]
    Connection(#[from] ConnectionError),
    #[error("registration timed out")]
    Timeout,
    #[error("control stream: {0}")]
    Frame(#[from] proto::io::FrameIoError),
    #[error("the edge refused the registration: {}", .0.message)]
    Rejected(Rejected),
    #[error("the edge answered registration with an unexpected message")]
    Unexpected,
}

/// Keeps one connection slot alive until shutdown.
pub(super) async fn run(
    edge: String,
    index: u32,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut attempt = 0u32;
    let mut selector = Selector::new(shared.config.protocol);
    loop {
        let mut registered_at = None;
        let result = session(
            &edge,
            index,
            &shared,
            &mut selector,
            &mut registered_at,
            &shutdown,
        )
        .await;
        if shutdown.is_cancelled() {
            return;
        }
        let retry_after = match result {
            Ok(reason) => {
                info!(%reason, "connection to the edge lost");
                None
            }
            Err(e) => {
                let asked = failed(&shared, &e, "connection to the edge failed");
                if selector.failed(&e) {
                    // A new transport is tried at once.
                    continue;
                }
                asked
            }
        };
        if registered_at.is_some_and(|t: Instant| t.elapsed() >= shared.config.backoff.stable) {
            attempt = 0;
        }
        let delay = retry_after.unwrap_or_else(|| backoff_delay(&shared.config.backoff, attempt));
        attempt = attempt.saturating_add(1);
        debug!(
            delay_ms = delay.as_millis() as u64,
            attempt, "reconnecting after back-off"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The transport a slot dials, and the `auto` fallback between them.
struct Selector {
    choice: TransportChoice,
    current: Protocol,
    /// Failed QUIC handshakes in a row.
    quic_failures: u32,
}

impl Selector {
    fn new(choice: TransportChoice) -> Selector {
        let current = match choice {
            TransportChoice::Http2 => Protocol::Http2,
            TransportChoice::Auto | TransportChoice::Quic => Protocol::Quic,
        };
        Selector {
            choice,
            current,
            quic_failures: 0,
        }
    }

    /// Whether a slot on HTTP/2 probes QUIC in the background.
    fn probes(&self) -> bool {
        self.choice == TransportChoice::Auto && self.current == Protocol::Http2
    }

    /// Counts a failed dial; true when the slot switched transports (and says why, once).
    fn failed(&mut self, e: &SessionError) -> bool {
        if self.choice != TransportChoice::Auto {
            return false;
        }
        let (protocol, at_once) = match e {
            SessionError::Handshake(p, HandshakeError::QuicConnect(_)) => (*p, true),
            SessionError::Handshake(p, _) | SessionError::HandshakeTimeout(p, _) => (*p, false),
            _ => return false,
        };
        match protocol {
            Protocol::Quic => {
                self.quic_failures += 1;
                if at_once || self.quic_failures >= QUIC_ATTEMPTS {
                    warn!(cause = %e, failed_attempts = self.quic_failures, "QUIC does not get through to the edge (UDP blocked?); falling back to HTTP/2 over TCP for this connection");
                    self.current = Protocol::Http2;
                    self.quic_failures = 0;
                    return true;
                }
                false
            }
            Protocol::Http2 => {
                warn!(cause = %e, "HTTP/2 over TCP does not get through to the edge either; trying QUIC again");
                self.current = Protocol::Quic;
                false
            }
        }
    }

    fn registered(&mut self, protocol: Protocol) {
        self.current = protocol;
        if protocol == Protocol::Quic {
            self.quic_failures = 0;
        }
    }
}

/// Counts and logs a failed dial or registration; returns the pause the edge asked for, if
/// any (never longer than the back-off cap).
fn failed(shared: &Shared, e: &SessionError, what: &str) -> Option<Duration> {
    let kind = match e {
        SessionError::Rejected(_) => "rejected",
        _ => "connect",
    };
    shared
        .metrics
        .registration_failures
        .get_or_create(&KindLabels { kind })
        .inc();
    match e {
        SessionError::Rejected(rej) => {
            warn!(code = ?rej.code, reason = %rej.message, "{what}: the edge refused the registration");
            rej.retry_after_ms
                .map(|ms| Duration::from_millis(ms).min(shared.config.backoff.max))
        }
        other => {
            warn!(cause = %other, "{what}");
            None
        }
    }
}

/// Exponential back-off with "equal jitter": half the step fixed, half random.
pub fn backoff_delay(cfg: &BackoffConfig, attempt: u32) -> Duration {
    let step = cfg
        .initial
        .saturating_mul(1u32 << attempt.min(20))
        .min(cfg.max);
    let half = step / 2;
    half + rand::thread_rng().gen_range(Duration::ZERO..=half)
}

/// One connection slot: dial and register, then serve streams until the connection ends.
/// Returns why it ended once registered.
///
/// When the token changes (a reload), the slot registers a second connection with the new
/// token *before* draining the one registered with the old token, one slot at a time across
/// the connector, so the tunnel never has fewer registered connections than before the
/// rotation. If the edge refuses the new token, the old connection keeps serving and the
/// slot tries again after a back-off.
async fn session(
    edge: &str,
    index: u32,
    shared: &Arc<Shared>,
    selector: &mut Selector,
    registered_at: &mut Option<Instant>,
    shutdown: &CancellationToken,
) -> Result<String, SessionError> {
    let mut tokens = shared.token.subscribe();
    let token = tokens.borrow_and_update().clone();
    let link = tokio::select! {
        r = dial(edge, index, shared, &token, selector.current) => r?,
        _ = shutdown.cancelled() => return Ok("shutting down".into()),
    };
    selector.registered(link.conn.protocol());
    *registered_at = Some(Instant::now());
    let mut serving = Serving::start(link, shared, shutdown);
    // Set while a rotation is due: when to try registering with the new token next.
    let mut rotate_at: Option<tokio::time::Instant> = None;
    let mut attempt = 0u32;
    // Set while on HTTP/2 under `auto`: when to try QUIC next.
    let mut probes = 0u32;
    let mut probe_at = selector.probes().then(|| probe_time(shared, &mut probes));
    loop {
        // What to register next, and why: a new token, or QUIC again.
        let replace = tokio::select! {
            ended = &mut serving.task => {
                return Ok(ended.unwrap_or_else(|e| format!("connection task failed: {e}")));
            }
            // `Shared` holds the sender for as long as sessions run: `changed` cannot fail.
            Ok(()) = tokens.changed() => {
                tokens.borrow_and_update();
                rotate_at = Some(tokio::time::Instant::now());
                attempt = 0;
                continue;
            }
            _ = sleep_until_some(rotate_at) => Replace::Token,
            _ = sleep_until_some(probe_at) => Replace::Transport,
        };
        let protocol = match replace {
            Replace::Token => selector.current,
            Replace::Transport => Protocol::Quic,
        };
        let Some(dialled) =
            dial_replacement(edge, index, shared, &tokens, protocol, shutdown).await
        else {
            return Ok("shutting down".into());
        };
        match (dialled, replace) {
            (Ok(link), _) => {
                match replace {
                    Replace::Token => info!("registered a connection with the new token; draining the one registered with the old token"),
                    Replace::Transport => info!(probes, "QUIC gets through again: moved this connection from HTTP/2 to QUIC; draining the HTTP/2 one"),
                }
                selector.registered(link.conn.protocol());
                // A rotation that registered replaces the old connection whatever its
                // transport; QUIC needs no more probing.
                rotate_at = None;
                probe_at = selector.probes().then(|| probe_time(shared, &mut probes));
                *registered_at = Some(Instant::now());
                serving.replace(link, shared, shutdown);
            }
            (Err(e), Replace::Token) => {
                let asked = failed(shared, &e, "could not register a connection with the new token; the one registered with the old token keeps serving");
                let delay = asked.unwrap_or_else(|| backoff_delay(&shared.config.backoff, attempt));
                attempt = attempt.saturating_add(1);
                debug!(
                    delay_ms = delay.as_millis() as u64,
                    "trying the new token again after back-off"
                );
                rotate_at = Some(tokio::time::Instant::now() + delay);
            }
            (Err(e), Replace::Transport) => {
                debug!(cause = %e, probes, "QUIC probe failed; staying on HTTP/2");
                probe_at = Some(probe_time(shared, &mut probes));
            }
        }
    }
}

/// The registered connection a slot serves, in a task of its own.
struct Serving {
    task: tokio::task::JoinHandle<String>,
    /// Cancelled to drain it.
    drain: CancellationToken,
}

impl Serving {
    fn start(link: Link, shared: &Arc<Shared>, shutdown: &CancellationToken) -> Serving {
        let drain = shutdown.child_token();
        let task = shared
            .links
            .spawn(serve(link, shared.clone(), drain.clone()).in_current_span());
        Serving { task, drain }
    }

    /// Serves `link` from now on. The old connection drains on its own: Drain, the edge's
    /// acknowledgement once its requests are relayed, then close.
    fn replace(&mut self, link: Link, shared: &Arc<Shared>, shutdown: &CancellationToken) {
        self.drain.cancel();
        *self = Serving::start(link, shared, shutdown);
    }
}

/// Registers a second connection for the slot, one slot at a time across the connector (so
/// that replacements never leave a tunnel short of connections); `None` on shutdown.
async fn dial_replacement(
    edge: &str,
    index: u32,
    shared: &Shared,
    tokens: &tokio::sync::watch::Receiver<crate::secret::Secret>,
    protocol: Protocol,
    shutdown: &CancellationToken,
) -> Option<Result<Link, SessionError>> {
    let _turn = tokio::select! {
        t = shared.rotation.clone().lock_owned() => t,
        _ = shutdown.cancelled() => return None,
    };
    let token = tokens.borrow().clone();
    tokio::select! {
        r = dial(edge, index, shared, &token, protocol) => Some(r),
        _ = shutdown.cancelled() => None,
    }
}

/// Why a slot registers a second connection while its first one serves.
#[derive(Clone, Copy)]
enum Replace {
    /// The token changed.
    Token,
    /// QUIC may work again (`auto` on HTTP/2).
    Transport,
}

/// When the next QUIC probe of a slot on HTTP/2 is due; counts it.
fn probe_time(shared: &Shared, probes: &mut u32) -> tokio::time::Instant {
    let delay = backoff_delay(
        &shared.config.backoff,
        PROBE_FIRST_STEP.saturating_add(*probes),
    );
    *probes = probes.saturating_add(1);
    tokio::time::Instant::now() + delay
}

/// The next ingress digest `digests` sees, and the receiver for the one after; `None` once
/// the sender is gone.
async fn next_digest(
    mut digests: tokio::sync::watch::Receiver<String>,
) -> Option<(tokio::sync::watch::Receiver<String>, String)> {
    digests.changed().await.ok()?;
    let digest = digests.borrow_and_update().clone();
    Some((digests, digest))
}

/// Sleeps until `at`, or forever when `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A registered connection: the connection and both halves of its control stream. It counts
/// as registered until dropped.
struct Link {
    conn: Connection,
    control_send: SendStream,
    control_recv: RecvStream,
    /// The ingress digest, as of the one sent in `Register`: a later change is sent on.
    digests: tokio::sync::watch::Receiver<String>,
    /// The head encoding the edge chose.
    heads: HeadCodec,
    _count: CountGuard,
}

/// Dials `edge` over `protocol` and registers one connection with `token`.
async fn dial(
    edge: &str,
    index: u32,
    shared: &Shared,
    token: &crate::secret::Secret,
    protocol: Protocol,
) -> Result<Link, SessionError> {
    let (host, port) = connector_split_host_port(edge).map_err(SessionError::Resolve)?;
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| SessionError::Resolve(e.to_string()))?
        .next()
        .ok_or_else(|| SessionError::Resolve("no address found".into()))?;
    let server_name = shared.config.edge_server_name.clone().unwrap_or(host);
    // Subscribed before the digest is read, so that a reload after this point is sent on.
    let mut digests = shared.digest.subscribe();
    let digest = digests.borrow_and_update().clone();

    // Under `auto` a silent UDP path must fail fast, so that the fallback comes soon.
    let limit = match (protocol, shared.config.protocol) {
        (Protocol::Quic, TransportChoice::Auto) => QUIC_HANDSHAKE_TIMEOUT,
        _ => REGISTER_TIMEOUT,
    };
    let dial = tokio::time::timeout(REGISTER_TIMEOUT, async {
        let conn = shared
            .dialer
            .connect(protocol, addr, &server_name, limit)
            .await?;
        let (send, recv, ok) = register(
            &conn,
            Register {
                version: proto::VERSION,
                tunnel: shared.config.tunnel.clone(),
                token: token.clone(),
                connector_id: shared.config.connector_id.clone(),
                conn_index: index,
                software: Some(SOFTWARE.to_string()),
                digest: Some(digest),
                heads: HeadCodec::offered(),
                probe: false,
                sessions: true,
                trailers: true,
            },
        )
        .await?;
        info!(edge_id = %ok.edge_id, connection = ok.connection_id, %addr, %protocol, "registered with the edge");
        Ok::<_, SessionError>((
            conn,
            send,
            recv,
            HeadCodec::chosen(ok.heads.as_deref()),
            ok.connection_id,
        ))
    });
    let (conn, control_send, control_recv, heads, connection_id) =
        dial.await.map_err(|_| SessionError::Timeout)??;
    let key = shared.state.link(super::LinkInfo {
        edge: edge.to_string(),
        index,
        protocol,
        connection_id,
    });
    shared.metrics.registered_on(protocol).inc();
    Ok(Link {
        conn,
        control_send,
        control_recv,
        digests,
        heads,
        _count: CountGuard(shared.state.clone(), shared.metrics.clone(), protocol, key),
    })
}

/// Serves streams on `link` until the connection ends. Once `drain` is cancelled (shutdown,
/// or a rotation replaced this connection), tells the edge to route nothing new here and keeps
/// serving: the edge acknowledges once every request it routed here has been relayed whole,
/// and only then is the connection closed — or when `grace-period` has passed since the drain
/// began (an edge that never acknowledges, a lost control stream).
async fn serve(link: Link, shared: Arc<Shared>, drain: CancellationToken) -> String {
    let Link {
        conn,
        mut control_send,
        control_recv,
        digests,
        heads,
        _count,
    } = link;
    let ctx = Arc::new(StreamContext {
        heads,
        metrics: shared.metrics.clone(),
        admission: shared.admission.clone(),
        limits: (
            shared.config.max_concurrent_requests,
            shared.config.max_sessions,
        ),
        datagrams: FlowRouter::start(&conn).map(|router| (conn.clone(), router)),
    });
    let mut draining = false;
    let acked = drain_ack(control_recv);
    tokio::pin!(acked);
    let mut ack_pending = true;
    let mut deadline = None;
    // Rare events, kept across turns and polled only when they fire: the loop wakes for every
    // stream the edge opens.
    let mut cut_off = Dormant::new(shared.cut_off.cancelled());
    let mut drained = Dormant::new(drain.cancelled());
    let mut digest = Dormant::new(next_digest(digests));
    loop {
        tokio::select! {
            () = &mut cut_off => {
                conn.close(proto::code::CLOSE_NORMAL, b"connector shutting down");
                return "the grace period ran out".into();
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => accept_stream(&shared, &ctx, send, recv),
                Err(e) => return e.to_string(),
            },
            Some((digests, changed)) = &mut digest, if !draining => {
                digest = Dormant::new(next_digest(digests));
                if let Err(e) = write_frame(&mut control_send, &Control::Digest(proto::Digest { digest: changed })).await {
                    warn!(cause = %e, "could not send the new ingress digest to the edge");
                }
            }
            () = &mut drained, if !draining => {
                draining = true;
                deadline = Some(tokio::time::Instant::now() + shared.config.grace_period);
                match write_frame(&mut control_send, &Control::Drain).await {
                    Ok(()) => info!("sent drain to the edge"),
                    Err(e) => warn!(cause = %e, "could not send drain to the edge"),
                }
            }
            acked = &mut acked, if draining && ack_pending => {
                ack_pending = false;
                if acked {
                    info!("the edge acknowledged the drain; closing the connection");
                    conn.close(proto::code::CLOSE_NORMAL, b"drained");
                    return "drained".into();
                }
                warn!("the control stream ended before the edge acknowledged the drain; waiting for the grace period");
            }
            _ = sleep_until_some(deadline) => {
                warn!("the edge did not acknowledge the drain within the grace period; closing the connection");
                conn.close(proto::code::CLOSE_NORMAL, b"drain timed out");
                return "drain timed out".into();
            }
        }
    }
}

/// Starts serving one stream (a request or a session); its own limit is applied once its
/// head says which it is.
fn accept_stream(shared: &Shared, ctx: &Arc<StreamContext>, send: SendStream, recv: RecvStream) {
    // Each stream runs on the pipeline current when it arrived.
    let pipeline = shared.pipeline.load_full();
    // Boxed: the request's future is several kilobytes, and a task copies what it holds when it
    // is spawned and again when it completes.
    let request = Box::pin(pipeline.handle(send, recv, ctx.clone()));
    shared.streams.spawn(request.in_current_span());
}

/// Reads the edge's control messages until `DrainAck` (true) or the end of the stream
/// (false). Not cancel safe: keep the future, do not re-create it.
async fn drain_ack(mut recv: RecvStream) -> bool {
    loop {
        match read_frame::<_, Control>(&mut recv).await {
            Ok(Control::DrainAck) => return true,
            Ok(other) => debug!(message = ?other, "ignored a control message from the edge"),
            Err(_) => return false,
        }
    }
}

/// Uncounts a registered connection when it ends.
struct CountGuard(Arc<ConnectorState>, Arc<Metrics>, Protocol, u64);

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.unlink(self.3);
        self.1.registered_on(self.2).dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let cfg = BackoffConfig::default();
        for attempt in 0..40 {
            let step = cfg
                .initial
                .saturating_mul(1u32 << attempt.min(20))
                .min(cfg.max);
            let d = backoff_delay(&cfg, attempt);
            assert!(
                d >= step / 2 && d <= step,
                "attempt {attempt}: {d:?} vs step {step:?}"
            );
        }
        assert!(backoff_delay(&cfg, 0) <= Duration::from_millis(100));
        assert!(backoff_delay(&cfg, 30) >= Duration::from_secs(15));
    }
}
