//! Relaying a UDP flow over a stream: each datagram framed with its length
//! ([`crate::proto::encode_datagram`]), both ways, until the stream ends or the flow is idle.

use std::time::Duration;

use bytes::Bytes;

use crate::proto::{encode_datagram, DatagramDecoder};
use crate::transport::{RecvStream, SendStream};

/// Bytes read from the stream at once.
const READ_CHUNK: usize = 64 * 1024;

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

/// Relays datagrams between `peer` and the stream until the stream ends, the peer closes, or
/// nothing moves either way for `idle` (then `TimedOut`). Finishes the stream when done.
/// Returns (bytes from the peer into the stream, bytes from the stream to the peer), payload
/// only.
pub async fn relay<P: DatagramPeer>(
    peer: &mut P,
    send: &mut SendStream,
    mut recv: RecvStream,
    idle: Duration,
) -> std::io::Result<(u64, u64)> {
    let (mut into, mut out) = (0u64, 0u64);
    let mut decoder = DatagramDecoder::new();
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let result = loop {
        tokio::select! {
            d = peer.recv() => match d {
                Ok(Some(d)) => {
                    let frame = encode_datagram(&d).map_err(std::io::Error::other)?;
                    send.write_chunk(frame).await.map_err(std::io::Error::from)?;
                    into += d.len() as u64;
                }
                Ok(None) => break Ok(()),
                // An ICMP error for an earlier datagram (nothing listens at the origin): UDP
                // loses it as it would without the tunnel, and the flow goes on.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => break Err(e),
            },
            chunk = recv.read_chunk(READ_CHUNK) => match chunk {
                Ok(Some(chunk)) => {
                    decoder.push(&chunk);
                    while let Some(d) = decoder.next_datagram().map_err(std::io::Error::other)? {
                        match peer.send(&d).await {
                            Ok(()) => out += d.len() as u64,
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                            Err(e) => return Err(e),
                        }
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
    result.map(|()| (into, out))
}
