//! Relaying a UDP flow through the tunnel: each datagram framed with its length on the flow's
//! stream ([`crate::proto::encode_datagram`]) or, over QUIC, sent as a QUIC datagram tagged
//! with the flow's id ([`crate::proto::encode_flow_datagram`]), both ways, until the stream
//! ends or the flow is idle.
//!
//! QUIC datagrams keep UDP's behaviour through the tunnel: a lost packet is not retransmitted
//! and does not hold up the ones behind it (a stream would do both). Each connection has one
//! [`FlowRouter`] that hands the QUIC datagrams it receives to their flows.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::proto::{decode_flow_datagram, encode_datagram, encode_flow_datagram, DatagramDecoder};
use crate::relay::Relayed;
use crate::transport::{Connection, RecvStream, SendStream};

/// Bytes read from the stream at once.
const READ_CHUNK: usize = 64 * 1024;

/// QUIC datagrams (each at most a path MTU) queued for one flow before they are dropped, as
/// a congested network would.
const FLOW_QUEUE: usize = 64;

/// Where a flow's datagrams come from outside the tunnel: the client (at the edge) or the
/// origin (at the connector).
pub trait DatagramSource {
    /// The next datagram; `None` when the flow was closed on this side. Must be cancel safe.
    fn recv(&mut self) -> impl std::future::Future<Output = std::io::Result<Option<Bytes>>> + Send;
}

/// Where a flow's datagrams from the tunnel go.
pub trait DatagramSink {
    /// Sends one datagram.
    fn send(
        &self,
        datagram: &[u8],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

/// The origin of a flow, at the connector: a UDP socket connected to it, both source and sink.
#[derive(Clone)]
pub struct ConnectedSocket(pub Arc<tokio::net::UdpSocket>);

impl DatagramSource for ConnectedSocket {
    async fn recv(&mut self) -> std::io::Result<Option<Bytes>> {
        let mut buf = vec![0u8; crate::proto::MAX_DATAGRAM];
        let n = self.0.recv(&mut buf).await?;
        buf.truncate(n);
        Ok(Some(Bytes::from(buf)))
    }
}

impl DatagramSink for ConnectedSocket {
    async fn send(&self, datagram: &[u8]) -> std::io::Result<()> {
        self.0.send(datagram).await.map(drop)
    }
}

/// The UDP flows of one QUIC connection, by flow id: where its received QUIC datagrams go.
#[derive(Debug, Default)]
pub struct FlowRouter {
    flows: Mutex<HashMap<u32, mpsc::Sender<Bytes>>>,
    next: AtomicU32,
}

impl FlowRouter {
    /// A router with its reader task on `conn` (none over HTTP/2, which has no datagrams).
    pub fn start(conn: &Connection) -> Option<Arc<FlowRouter>> {
        conn.max_datagram_size()?;
        let router = Arc::new(FlowRouter::default());
        tokio::spawn(router.clone().run(conn.clone()));
        Some(router)
    }

    /// Hands each datagram of `conn` to its flow until the connection ends. Datagrams of
    /// unknown flows (ended, or never opened) and those a busy flow has no room for are
    /// dropped.
    async fn run(self: Arc<Self>, conn: Connection) {
        while let Ok(d) = conn.read_datagram().await {
            let Some((flow, payload)) = decode_flow_datagram(d) else {
                continue;
            };
            let flows = self.flows.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(tx) = flows.get(&flow) {
                let _ = tx.try_send(payload);
            }
        }
    }

    /// Opens flow `id` (the edge's choice, at the connector); `None` if it is taken.
    pub fn open(self: &Arc<Self>, conn: &Connection, id: u32) -> Option<DatagramLink> {
        let mut flows = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        if flows.contains_key(&id) {
            return None;
        }
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        flows.insert(id, tx);
        Some(DatagramLink {
            tx: LinkSender {
                conn: conn.clone(),
                id,
                router: self.clone(),
            },
            rx,
        })
    }

    /// Opens a flow under a fresh id (at the edge).
    pub fn open_next(self: &Arc<Self>, conn: &Connection) -> DatagramLink {
        loop {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            if let Some(link) = self.open(conn, id) {
                return link;
            }
        }
    }
}

/// A flow's QUIC-datagram path: its id, what arrives for it, and the connection to send on.
/// Dropping it forgets the flow.
#[derive(Debug)]
pub struct DatagramLink {
    tx: LinkSender,
    rx: mpsc::Receiver<Bytes>,
}

impl DatagramLink {
    /// The flow's id.
    pub fn id(&self) -> u32 {
        self.tx.id
    }
}

/// The sending side of a [`DatagramLink`]; forgets the flow when dropped.
#[derive(Debug)]
struct LinkSender {
    conn: Connection,
    id: u32,
    router: Arc<FlowRouter>,
}

impl LinkSender {
    /// Sends one payload as a QUIC datagram; `false` when it does not fit one (then it goes
    /// on the stream) or cannot be sent.
    fn send(&self, payload: &[u8]) -> bool {
        let fits = self
            .conn
            .max_datagram_size()
            .is_some_and(|max| payload.len() + 4 <= max);
        fits && self
            .conn
            .send_datagram(encode_flow_datagram(self.id, payload))
    }
}

impl Drop for LinkSender {
    fn drop(&mut self) {
        let mut flows = self.router.flows.lock().unwrap_or_else(|p| p.into_inner());
        flows.remove(&self.id);
    }
}

/// Counts a flow's datagrams into the tunnel by carrier, as they are sent.
#[derive(Debug, Clone, Default)]
pub struct DatagramCounters {
    /// Sent as QUIC datagrams.
    pub quic: prometheus_client::metrics::counter::Counter,
    /// Sent on the flow's stream.
    pub stream: prometheus_client::metrics::counter::Counter,
}

/// Relays a UDP flow between `source`/`sink` outside the tunnel and the tunnel (the stream,
/// and QUIC datagrams when `link` is given), both directions at once, until the stream ends,
/// the source closes, or no datagram moves either way for `idle` (`TimedOut`). A direction
/// that waits (the stream's back-pressure) never holds up the other or the idle timeout.
/// The caller ends the stream ([`super::end_stream`]).
pub async fn relay<S: DatagramSource, K: DatagramSink>(
    mut source: S,
    sink: &K,
    send: &mut SendStream,
    recv: &mut RecvStream,
    link: Option<DatagramLink>,
    idle: Duration,
    counters: &DatagramCounters,
) -> Relayed {
    let (sent, received, moved) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let (link_tx, mut link_rx) = match link {
        Some(l) => (Some(l.tx), Some(l.rx)),
        None => (None, None),
    };
    let into_tunnel = async {
        loop {
            let d = match source.recv().await {
                Ok(Some(d)) => d,
                Ok(None) => return Ok(()),
                // An ICMP error for an earlier datagram (nothing listens at the origin): UDP
                // loses it as it would without the tunnel, and the flow goes on.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            };
            if link_tx.as_ref().is_some_and(|l| l.send(&d)) {
                counters.quic.inc();
            } else {
                let frame = encode_datagram(&d).map_err(std::io::Error::other)?;
                send.write_chunk(frame).await?;
                counters.stream.inc();
            }
            sent.fetch_add(d.len() as u64, Ordering::Relaxed);
            moved.fetch_add(1, Ordering::Relaxed);
        }
    };
    let out_of_tunnel = async {
        let mut decoder = DatagramDecoder::new();
        loop {
            let datagram = async {
                match link_rx.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(d) = datagram => deliver(sink, &d, &received, &moved).await?,
                chunk = recv.read_chunk(READ_CHUNK) => match chunk? {
                    Some(chunk) => {
                        decoder.push(&chunk);
                        while let Some(d) = decoder.next_datagram().map_err(std::io::Error::other)? {
                            deliver(sink, &d, &received, &moved).await?;
                        }
                    }
                    None if decoder.pending() == 0 => return Ok(()),
                    None => return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the flow's stream ended inside a datagram",
                    )),
                },
            }
        }
    };
    let quiet = crate::relay::quiet(idle, || moved.load(Ordering::Relaxed));
    let result: std::io::Result<()> = tokio::select! {
        r = into_tunnel => r,
        r = out_of_tunnel => r,
        () = quiet => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no datagram either way for {idle:?}"),
        )),
    };
    Relayed {
        sent: sent.into_inner(),
        received: received.into_inner(),
        result,
    }
}

/// Sends one datagram from the tunnel to the sink; a refused one (ICMP) is lost as UDP's are.
async fn deliver<K: DatagramSink>(
    sink: &K,
    d: &[u8],
    received: &AtomicU64,
    moved: &AtomicU64,
) -> std::io::Result<()> {
    moved.fetch_add(1, Ordering::Relaxed);
    match sink.send(d).await {
        Ok(()) => {
            received.fetch_add(d.len() as u64, Ordering::Relaxed);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(e),
    }
}
