//! Relaying a UDP flow through the tunnel: each datagram framed with its length on the flow's
//! stream ([`crate::proto::encode_datagram`]) or, over QUIC, sent as a QUIC datagram tagged
//! with the flow's id ([`crate::proto::encode_flow_datagram`]), both ways, until the stream
//! ends or the flow is idle.
//!
//! QUIC datagrams keep UDP's behaviour through the tunnel: a lost packet is not retransmitted
//! and does not hold up the ones behind it (a stream would do both). Each connection has one
//! [`FlowRouter`] that hands the QUIC datagrams it receives to their flows.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::proto::{decode_flow_datagram, encode_datagram, encode_flow_datagram, DatagramDecoder};
use crate::transport::{Connection, RecvStream, SendStream};

/// Bytes read from the stream at once.
const READ_CHUNK: usize = 64 * 1024;

/// QUIC datagrams queued for one flow before they are dropped (as a congested network would).
const FLOW_QUEUE: usize = 256;

/// One end of a UDP flow outside the tunnel: the client (at the edge) or the origin (at the
/// connector).
pub trait DatagramPeer {
    /// The next datagram from the peer; `None` when the flow was closed on this side.
    /// Must be cancel safe.
    fn recv(&mut self) -> impl std::future::Future<Output = std::io::Result<Option<Bytes>>> + Send;
    /// Sends one datagram to the peer.
    fn send(
        &mut self,
        datagram: &[u8],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

/// The origin of a flow, at the connector: a UDP socket connected to it.
pub struct ConnectedSocket(pub tokio::net::UdpSocket);

impl DatagramPeer for ConnectedSocket {
    async fn recv(&mut self) -> std::io::Result<Option<Bytes>> {
        let mut buf = vec![0u8; crate::proto::MAX_DATAGRAM];
        let n = self.0.recv(&mut buf).await?;
        buf.truncate(n);
        Ok(Some(Bytes::from(buf)))
    }

    async fn send(&mut self, datagram: &[u8]) -> std::io::Result<()> {
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
            conn: conn.clone(),
            id,
            rx,
            router: self.clone(),
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
/// Closing it (dropping) forgets the flow.
#[derive(Debug)]
pub struct DatagramLink {
    conn: Connection,
    id: u32,
    rx: mpsc::Receiver<Bytes>,
    router: Arc<FlowRouter>,
}

impl DatagramLink {
    /// The flow's id.
    pub fn id(&self) -> u32 {
        self.id
    }

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

impl Drop for DatagramLink {
    fn drop(&mut self) {
        let mut flows = self.router.flows.lock().unwrap_or_else(|p| p.into_inner());
        flows.remove(&self.id);
    }
}

/// What a flow carried.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlowStats {
    /// Payload bytes from the peer into the tunnel.
    pub into: u64,
    /// Payload bytes from the tunnel to the peer.
    pub out: u64,
}

/// Counts a flow's datagrams into the tunnel by carrier, as they are sent.
#[derive(Debug, Clone, Default)]
pub struct DatagramCounters {
    /// Sent as QUIC datagrams.
    pub quic: prometheus_client::metrics::counter::Counter,
    /// Sent on the flow's stream.
    pub stream: prometheus_client::metrics::counter::Counter,
}

/// Waits for the next QUIC datagram of the flow; never, without a datagram path.
async fn next_datagram(link: &mut Option<DatagramLink>) -> Option<Bytes> {
    match link {
        Some(l) => l.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Relays datagrams between `peer` and the tunnel (the stream, and QUIC datagrams when `link`
/// is given) until the stream ends, the peer closes, or nothing moves either way for `idle`
/// (then `TimedOut`). Finishes the stream when done.
pub async fn relay<P: DatagramPeer>(
    peer: &mut P,
    send: &mut SendStream,
    mut recv: RecvStream,
    mut link: Option<DatagramLink>,
    idle: Duration,
    counters: &DatagramCounters,
) -> (FlowStats, std::io::Result<()>) {
    let mut stats = FlowStats::default();
    let mut decoder = DatagramDecoder::new();
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let result = loop {
        tokio::select! {
            d = peer.recv() => match d {
                Ok(Some(d)) => {
                    if link.as_ref().is_some_and(|l| l.send(&d)) {
                        counters.quic.inc();
                    } else {
                        let frame = match encode_datagram(&d) {
                            Ok(f) => f,
                            Err(e) => break Err(std::io::Error::other(e)),
                        };
                        if let Err(e) = send.write_chunk(frame).await {
                            break Err(e.into());
                        }
                        counters.stream.inc();
                    }
                    stats.into += d.len() as u64;
                }
                Ok(None) => break Ok(()),
                // An ICMP error for an earlier datagram (nothing listens at the origin): UDP
                // loses it as it would without the tunnel, and the flow goes on.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => break Err(e),
            },
            Some(d) = next_datagram(&mut link) => {
                if let Err(e) = deliver(peer, &d, &mut stats).await {
                    break Err(e);
                }
            }
            chunk = recv.read_chunk(READ_CHUNK) => match chunk {
                Ok(Some(chunk)) => {
                    decoder.push(&chunk);
                    let mut failed = None;
                    loop {
                        match decoder.next_datagram() {
                            Ok(Some(d)) => {
                                if let Err(e) = deliver(peer, &d, &mut stats).await {
                                    failed = Some(e);
                                    break;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                failed = Some(std::io::Error::other(e));
                                break;
                            }
                        }
                    }
                    if let Some(e) = failed {
                        break Err(e);
                    }
                }
                Ok(None) if decoder.pending() == 0 => break Ok(()),
                Ok(None) => break Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the flow's stream ended inside a datagram",
                )),
                Err(e) => break Err(e.into()),
            },
            () = &mut timer => break Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no datagram either way for {idle:?}"),
            )),
        }
        timer.as_mut().reset(tokio::time::Instant::now() + idle);
    };
    let _ = send.finish();
    (stats, result)
}

/// Sends one datagram from the tunnel to the peer; a refused one (ICMP) is lost as UDP's are.
async fn deliver<P: DatagramPeer>(
    peer: &mut P,
    d: &[u8],
    stats: &mut FlowStats,
) -> std::io::Result<()> {
    match peer.send(d).await {
        Ok(()) => {
            stats.out += d.len() as u64;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(e),
    }
}
