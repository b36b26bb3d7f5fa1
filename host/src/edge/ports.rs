//! Public TCP and UDP ports (`[[tunnel.port]]`): each accepted TCP connection, and each UDP
//! flow (one client address and port), becomes a session stream to a connector of the port's
//! tunnel, which connects it to the `[[service]]` the port names.
//!
//! A port is bound when the edge starts (changing ports needs a restart). Clients outside its
//! `allow` list are closed at accept (TCP) or their datagrams dropped (UDP); past
//! `max-sessions` new sessions or flows are refused the same way. Sessions run as the edge's
//! client connections do: on shutdown they get the grace period, then their connector
//! connections close and they end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use super::registry::InFlight;
use super::EdgeShared;
use crate::config::PortConfig;
use crate::proto::{io::read_frame, SessionHead, SessionProtocol, SessionReply};
use crate::relay;
use crate::services::udp::{DatagramLink, DatagramSink, DatagramSource};
use crate::services::{self, SessionLabels, SessionRecord};
use crate::transport::{RecvStream, SendStream};

/// Time the connector has to connect to the service's origin and answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Datagrams queued for one UDP flow while its stream opens or is busy; more are dropped, as
/// a congested network would.
const FLOW_QUEUE: usize = 256;

/// Why the edge binds a port, and what it shows of it.
#[derive(Debug, Clone)]
pub struct PortInfo {
    /// The tunnel the port belongs to.
    pub tunnel: String,
    /// The service it leads to.
    pub service: String,
    /// TCP or UDP.
    pub protocol: SessionProtocol,
    /// The bound address.
    pub addr: SocketAddr,
}

/// A bound public port.
pub(super) enum Bound {
    Tcp(TcpListener),
    Udp(Arc<UdpSocket>),
}

/// One bound port with its tunnel and settings.
pub(super) struct Port {
    pub tunnel: String,
    pub config: PortConfig,
    pub socket: Bound,
}

impl Port {
    /// Binds `config`'s address.
    pub async fn bind(tunnel: &str, config: &PortConfig) -> std::io::Result<Port> {
        let socket = match config.protocol {
            SessionProtocol::Tcp => Bound::Tcp(TcpListener::bind(config.listen).await?),
            SessionProtocol::Udp => Bound::Udp(Arc::new(UdpSocket::bind(config.listen).await?)),
        };
        Ok(Port {
            tunnel: tunnel.to_string(),
            config: config.clone(),
            socket,
        })
    }

    /// What `/status` and the tests see of it.
    pub fn info(&self) -> PortInfo {
        let addr = match &self.socket {
            Bound::Tcp(l) => l.local_addr(),
            Bound::Udp(s) => s.local_addr(),
        };
        PortInfo {
            tunnel: self.tunnel.clone(),
            service: self.config.service.clone(),
            protocol: self.config.protocol,
            addr: addr.unwrap_or(self.config.listen),
        }
    }

    /// Serves the port until `shutdown`; sessions run on `tracker`.
    pub async fn serve(
        self,
        shared: Arc<EdgeShared>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let info = self.info();
        let port = Arc::new(PortCtx {
            tunnel: self.tunnel,
            config: self.config,
            addr: info.addr,
            shared,
            warnings: services::Throttle::default(),
        });
        let span = tracing::info_span!("port", tunnel = %port.tunnel, service = %port.config.service, addr = %port.addr);
        match self.socket {
            Bound::Tcp(listener) => {
                serve_tcp(listener, port, shutdown, tracker)
                    .instrument(span)
                    .await
            }
            Bound::Udp(socket) => {
                serve_udp(socket, port, shutdown, tracker)
                    .instrument(span)
                    .await
            }
        }
    }
}

/// What every session of one port shares.
struct PortCtx {
    tunnel: String,
    config: PortConfig,
    addr: SocketAddr,
    shared: Arc<EdgeShared>,
    /// Refused sessions are logged at most once a second.
    warnings: services::Throttle,
}

impl PortCtx {
    fn labels(&self) -> SessionLabels {
        SessionLabels {
            tunnel: self.tunnel.clone(),
            service: self.config.service.clone(),
            protocol: self.config.protocol.as_str(),
        }
    }

    fn refused(&self, why: &'static str) {
        self.shared.metrics.sessions.refused(
            &self.tunnel,
            &self.config.service,
            self.config.protocol,
            why,
        );
    }

    /// Whether a refusal may be logged now (at most one a second per port).
    fn may_warn(&self) -> bool {
        self.warnings.allow()
    }

    fn head(&self, client: SocketAddr) -> SessionHead {
        SessionHead {
            session_id: services::session_id(),
            service: self.config.service.clone(),
            protocol: self.config.protocol,
            client_addr: client,
            listen_addr: self.addr,
            flow: None,
        }
    }

    fn record(&self, head: &SessionHead) -> SessionRecord {
        SessionRecord::open(
            self.shared.metrics.sessions.clone(),
            self.labels(),
            &head.session_id,
            &head.client_addr.to_string(),
            self.shared.config.access_log,
        )
    }

    /// Opens a session stream on a connection of the port's tunnel and waits for the
    /// connector to connect to the origin. A connector that lacks the service or is at its
    /// limit says so, and another connector of the tunnel is tried. A UDP flow over QUIC is
    /// offered a QUIC-datagram path, kept when the connector accepts it. On failure, the
    /// reason as a metric label.
    async fn open(&self, head: &mut SessionHead) -> Result<Opened, &'static str> {
        let mut tried = Vec::new();
        loop {
            match self.attempt(head, &tried).await {
                Ok(opened) => return Ok(opened),
                Err(Attempt::Refused { connector }) if tried.len() < MAX_CONNECTORS_TRIED => {
                    tried.push(connector);
                }
                Err(Attempt::Refused { .. }) => return Err("connector-refused"),
                Err(Attempt::Offline) if !tried.is_empty() => return Err("connector-refused"),
                Err(Attempt::Offline) => {
                    if self.may_warn() {
                        if self.shared.registry.live_connections(&self.tunnel) == 0 {
                            warn!(client = %head.client_addr, "the tunnel is offline (no connector is connected); session refused");
                        } else {
                            warn!(client = %head.client_addr, "the tunnel's connectors predate TCP and UDP services (upgrade them); session refused");
                        }
                    }
                    return Err("offline");
                }
                Err(Attempt::Failed(why)) => return Err(why),
            }
        }
    }

    /// One try on a connection of a connector not in `skip`.
    async fn attempt(&self, head: &mut SessionHead, skip: &[String]) -> Result<Opened, Attempt> {
        let Some(in_flight) = self.shared.registry.pick_for_session(&self.tunnel, skip) else {
            return Err(Attempt::Offline);
        };
        let link = match (&in_flight.conn().flows, head.protocol) {
            (Some(router), SessionProtocol::Udp) => Some(router.open_next(&in_flight.conn().conn)),
            _ => None,
        };
        head.flow = link.as_ref().map(DatagramLink::id);
        let frame = head.encode().map_err(|_| Attempt::Failed("edge-refused"))?;
        let (send, mut recv) = super::dispatch::open_stream(&in_flight, &frame, false)
            .await
            .map_err(|e| {
                if self.may_warn() {
                    warn!(cause = %e, "could not open a session stream to the connector");
                }
                Attempt::Failed("connector-failed")
            })?;
        match tokio::time::timeout(REPLY_TIMEOUT, read_frame::<_, SessionReply>(&mut recv)).await {
            Ok(Ok(SessionReply {
                error: None,
                datagrams,
                ..
            })) => Ok(Opened {
                send,
                recv,
                link: link.filter(|_| datagrams),
                _in_flight: in_flight,
            }),
            Ok(Ok(SessionReply {
                error: Some(e),
                elsewhere,
                ..
            })) => {
                if self.may_warn() {
                    warn!(client = %head.client_addr, session_id = %head.session_id, connector = %in_flight.conn().connector_id, reason = ?e, "the connector refused the session");
                }
                if elsewhere {
                    Err(Attempt::Refused {
                        connector: in_flight.conn().connector_id.clone(),
                    })
                } else {
                    Err(Attempt::Failed("connector-refused"))
                }
            }
            Ok(Err(e)) => {
                if self.may_warn() {
                    warn!(cause = %e, "the connector did not answer the session");
                }
                Err(Attempt::Failed("connector-failed"))
            }
            Err(_) => {
                if self.may_warn() {
                    warn!("the connector did not answer the session in time");
                }
                Err(Attempt::Failed("connector-failed"))
            }
        }
    }
}

/// Connectors one session tries before it is refused.
const MAX_CONNECTORS_TRIED: usize = 4;

/// How one try to open a session went wrong.
enum Attempt {
    /// No (other) connector of the tunnel serves sessions.
    Offline,
    /// This connector lacks the service or is at its limit; another may accept.
    Refused { connector: String },
    /// Anything else, as a metric label.
    Failed(&'static str),
}

/// A session the connector accepted.
struct Opened {
    send: SendStream,
    recv: RecvStream,
    /// A UDP flow's QUIC-datagram path, when both ends use one.
    link: Option<DatagramLink>,
    /// Counts the stream against its connection until the session ends.
    _in_flight: InFlight,
}

async fn serve_tcp(
    listener: TcpListener,
    port: Arc<PortCtx>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(port.config.max_sessions));
    loop {
        let Some((tcp, client)) = crate::net::accept(&listener, &shutdown, "public port").await
        else {
            return;
        };
        if !port.config.allows(client.ip()) {
            debug!(%client, "client not in the port's allow list; closed");
            port.refused("denied");
            abort(tcp);
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            debug!(%client, "port at max-sessions; closed");
            port.refused("limit");
            abort(tcp);
            continue;
        };
        tracker.spawn(tcp_session(tcp, client, port.clone(), permit).in_current_span());
    }
}

/// Closes a client's connection with a reset: it never looks like a session that ended.
fn abort(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}

async fn tcp_session(
    tcp: TcpStream,
    client: SocketAddr,
    port: Arc<PortCtx>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let mut head = port.head(client);
    // The address the client reached (on a wildcard listener, the one it connected to), for
    // a PROXY protocol header.
    if let Ok(local) = tcp.local_addr() {
        head.listen_addr = local;
    }
    let Opened {
        mut send,
        mut recv,
        _in_flight,
        ..
    } = match port.open(&mut head).await {
        Ok(s) => s,
        Err(why) => {
            port.refused(why);
            return abort(tcp);
        }
    };
    let record = port.record(&head);
    let r = relay::splice(tcp, &mut send, &mut recv, port.config.idle_timeout).await;
    services::end_stream(&mut send, recv, &r.result).await;
    record.close(r.sent, r.received, &r.result);
}

/// Open UDP flows of one port, by client address.
type Flows = Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Bytes>>>>;

/// Bytes of datagrams one UDP port holds queued for its flows (while a flow's stream opens,
/// or while it waits on back-pressure); past it, datagrams are dropped.
const PORT_QUEUE_BYTES: usize = 4 << 20;

async fn serve_udp(
    socket: Arc<UdpSocket>,
    port: Arc<PortCtx>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let flows: Flows = Arc::default();
    let queued = Arc::new(AtomicUsize::new(0));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, client) = tokio::select! {
            () = shutdown.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                // An ICMP error for an earlier reply: nothing to do.
                Err(_) => continue,
            },
        };
        if !port.config.allows(client.ip()) {
            port.refused("denied");
            continue;
        }
        if queued.load(Ordering::Relaxed) + n > PORT_QUEUE_BYTES {
            continue;
        }
        let datagram = Bytes::copy_from_slice(&buf[..n]);
        let mut map = flows.lock().unwrap_or_else(|p| p.into_inner());
        let datagram = match map.get(&client) {
            None => datagram,
            Some(tx) => match tx.try_send(datagram) {
                Ok(()) => {
                    queued.fetch_add(n, Ordering::Relaxed);
                    continue;
                }
                Err(mpsc::error::TrySendError::Full(_)) => continue,
                // The flow just ended: this datagram starts a new one.
                Err(mpsc::error::TrySendError::Closed(d)) => {
                    map.remove(&client);
                    d
                }
            },
        };
        if map.len() >= port.config.max_sessions {
            port.refused("limit");
            continue;
        }
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        if tx.try_send(datagram).is_ok() {
            queued.fetch_add(n, Ordering::Relaxed);
        }
        map.insert(client, tx.clone());
        drop(map);
        let source = QueuedSource {
            rx,
            queued: queued.clone(),
        };
        let sink = ClientSink {
            socket: socket.clone(),
            client,
        };
        tracker.spawn(udp_flow(source, sink, port.clone(), flows.clone(), tx).in_current_span());
    }
}

/// A flow's datagrams from its client, as the port's receive loop queued them.
struct QueuedSource {
    rx: mpsc::Receiver<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl DatagramSource for QueuedSource {
    async fn recv(&mut self) -> std::io::Result<Option<Bytes>> {
        let d = self.rx.recv().await;
        if let Some(d) = &d {
            self.queued.fetch_sub(d.len(), Ordering::Relaxed);
        }
        Ok(d)
    }
}

impl Drop for QueuedSource {
    fn drop(&mut self) {
        // Whatever is still queued leaves the port's budget with the flow.
        self.rx.close();
        while let Ok(d) = self.rx.try_recv() {
            self.queued.fetch_sub(d.len(), Ordering::Relaxed);
        }
    }
}

/// Replies to a flow's client, from the port's socket.
struct ClientSink {
    socket: Arc<UdpSocket>,
    client: SocketAddr,
}

impl DatagramSink for ClientSink {
    async fn send(&self, datagram: &[u8]) -> std::io::Result<()> {
        self.socket.send_to(datagram, self.client).await.map(drop)
    }
}

async fn udp_flow(
    source: QueuedSource,
    sink: ClientSink,
    port: Arc<PortCtx>,
    flows: Flows,
    mine: mpsc::Sender<Bytes>,
) {
    let client = sink.client;
    let mut head = port.head(client);
    match port.open(&mut head).await {
        Ok(Opened {
            mut send,
            mut recv,
            link,
            _in_flight,
        }) => {
            let record = port.record(&head);
            let counters = port
                .shared
                .metrics
                .sessions
                .datagram_counters(record.labels());
            let idle = port.config.idle_timeout;
            let r =
                services::udp::relay(source, &sink, &mut send, &mut recv, link, idle, &counters)
                    .await;
            services::end_stream(&mut send, recv, &r.result).await;
            record.close(r.sent, r.received, &r.result);
        }
        Err(why) => port.refused(why),
    }
    let mut map = flows.lock().unwrap_or_else(|p| p.into_inner());
    if map.get(&client).is_some_and(|tx| tx.same_channel(&mine)) {
        map.remove(&client);
    }
}
