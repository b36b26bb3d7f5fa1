//! The connections a connector and an edge speak the sluice protocol over: QUIC, or HTTP/2 on
//! TLS over TCP where UDP is blocked.
//!
//! Both carry the same protocol ([`crate::proto`]): one control stream, then one bidirectional
//! stream per request opened by the edge, each with flow control, a clean end (FIN or
//! `END_STREAM`) and a reset with an application code. [`Connection`], [`SendStream`] and
//! [`RecvStream`] give the rest of the host that one model, with QUIC's semantics:
//!
//! - a send stream dropped without [`SendStream::finish`] or [`SendStream::reset`] finishes
//!   (as quinn's does), so a failure must always be an explicit reset;
//! - [`RecvStream::stop`] tells the peer to stop sending (QUIC `STOP_SENDING`); HTTP/2 has no
//!   such frame, so there the rest of the stream is read and discarded instead (for at most
//!   30 s), which keeps the peer's writer moving;
//! - [`SendStream::stopped`] completes when the peer stopped or reset the stream.
//!
//! Over HTTP/2 the roles of the two halves differ from QUIC's: the connector dials the TCP
//! connection and is the TLS client, but it is the HTTP/2 *server*, so that the edge (the
//! HTTP/2 client) opens the streams, as over QUIC, and nothing on the origin's network listens.
//! The control stream is therefore the first stream the edge opens, where over QUIC it is the
//! first the connector opens ([`Connection::open_control`], [`Connection::accept_control`]).

mod coalesce;
pub mod h2;
pub mod quic;

use coalesce::Open;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The transport a connection runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// QUIC over UDP.
    Quic,
    /// HTTP/2 on TLS 1.3 over TCP.
    Http2,
}

impl Protocol {
    /// The name used in logs, metrics labels and `/ready`: `quic` or `http2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Quic => "quic",
            Protocol::Http2 => "http2",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection ended or could not carry a new stream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectionError {
    /// The QUIC connection ended.
    #[error(transparent)]
    Quic(#[from] quinn::ConnectionError),
    /// The HTTP/2 connection ended.
    #[error("{0}")]
    Http2(std::sync::Arc<str>),
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// A QUIC connection could not be started.
    #[error(transparent)]
    QuicConnect(#[from] quinn::ConnectError),
    /// The QUIC handshake failed.
    #[error(transparent)]
    Quic(#[from] quinn::ConnectionError),
    /// The TCP connection failed.
    #[error("TCP: {0}")]
    Io(#[from] io::Error),
    /// The TLS handshake failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The peer does not speak sluice over HTTP/2.
    #[error("the peer did not agree on ALPN sluice-h2/1 (it offered {0})")]
    Alpn(String),
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2: {0}")]
    Http2(#[from] ::h2::Error),
}

/// Why a stream could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer reset the stream (or, for a send stream, stopped it) with this code.
    #[error("stream reset by the peer (code {0:#x})")]
    Reset(u32),
    /// The stream was already finished or reset here.
    #[error("stream already closed")]
    Closed,
    /// The connection ended.
    #[error("connection lost: {0}")]
    Connection(#[from] ConnectionError),
    /// A QUIC stream failed.
    #[error(transparent)]
    QuicWrite(#[from] quinn::WriteError),
    /// A QUIC stream failed.
    #[error(transparent)]
    QuicRead(#[from] quinn::ReadError),
}

impl From<StreamError> for io::Error {
    fn from(e: StreamError) -> io::Error {
        let kind = match e {
            StreamError::Reset(_) => io::ErrorKind::ConnectionReset,
            StreamError::Closed => io::ErrorKind::NotConnected,
            _ => io::ErrorKind::BrokenPipe,
        };
        io::Error::new(kind, e)
    }
}

/// A connection between a connector and an edge, on either transport. Cloning gives another
/// handle to the same connection.
#[derive(Clone)]
pub enum Connection {
    /// QUIC.
    Quic(quinn::Connection),
    /// HTTP/2 over TLS over TCP.
    Http2(h2::Connection),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Connection({}, {})",
            self.protocol(),
            self.remote_address()
        )
    }
}

impl Connection {
    /// The transport.
    pub fn protocol(&self) -> Protocol {
        match self {
            Connection::Quic(_) => Protocol::Quic,
            Connection::Http2(_) => Protocol::Http2,
        }
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Connection::Quic(c) => c.remote_address(),
            Connection::Http2(c) => c.remote_address(),
        }
    }

    /// The edge opens a request stream.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match self {
            Connection::Quic(c) => Ok(quic_pair(c.open_bi().await?)),
            Connection::Http2(c) => c.open_bi(h2::STREAM_PATH).await,
        }
    }

    /// The connector accepts the next request stream.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match self {
            Connection::Quic(c) => Ok(quic_pair(c.accept_bi().await?)),
            Connection::Http2(c) => c.accept_bi().await,
        }
    }

    /// The connector's side of the control stream: over QUIC it opens it; over HTTP/2 it
    /// accepts the first stream the edge opens.
    pub async fn open_control(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match self {
            Connection::Quic(c) => Ok(quic_halves(c.open_bi().await?, Open::control)),
            Connection::Http2(c) => c.accept_control().await,
        }
    }

    /// The edge's side of the control stream: over QUIC it accepts the first stream the
    /// connector opens; over HTTP/2 it opens it.
    pub async fn accept_control(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match self {
            Connection::Quic(c) => Ok(quic_halves(c.accept_bi().await?, Open::control)),
            Connection::Http2(c) => c.open_bi(h2::CONTROL_PATH).await,
        }
    }

    /// Closes the connection with an application `code` and `reason` (HTTP/2 carries only
    /// the code, in its GOAWAY).
    pub fn close(&self, code: u32, reason: &[u8]) {
        match self {
            Connection::Quic(c) => c.close(code.into(), reason),
            Connection::Http2(c) => c.close(code, reason),
        }
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        match self {
            Connection::Quic(c) => c.close_reason().map(Into::into),
            Connection::Http2(c) => c.close_reason(),
        }
    }

    /// The largest unreliable datagram the connection can send now: QUIC datagrams on a QUIC
    /// connection whose peer accepts them; `None` over HTTP/2, which has none.
    pub fn max_datagram_size(&self) -> Option<usize> {
        match self {
            Connection::Quic(c) => c.max_datagram_size(),
            Connection::Http2(_) => None,
        }
    }

    /// Sends one unreliable datagram (it may be lost, like a UDP packet); `false` when it
    /// could not be sent (too large, datagrams unsupported, the connection closed).
    pub fn send_datagram(&self, data: Bytes) -> bool {
        match self {
            Connection::Quic(c) => c.send_datagram(data).is_ok(),
            Connection::Http2(_) => false,
        }
    }

    /// The next datagram from the peer; never completes over HTTP/2 until the connection
    /// ends.
    pub async fn read_datagram(&self) -> Result<Bytes, ConnectionError> {
        match self {
            Connection::Quic(c) => Ok(c.read_datagram().await?),
            Connection::Http2(c) => Err(c.closed().await),
        }
    }

    /// Waits until the connection ends; returns why.
    pub async fn closed(&self) -> ConnectionError {
        match self {
            Connection::Quic(c) => c.closed().await.into(),
            Connection::Http2(c) => c.closed().await,
        }
    }
}

/// Both halves of a QUIC request stream.
fn quic_pair(pair: (quinn::SendStream, quinn::RecvStream)) -> (SendStream, RecvStream) {
    quic_halves(pair, Open::request)
}

/// Both halves of a QUIC stream, each counted by `open`.
fn quic_halves(
    (send, recv): (quinn::SendStream, quinn::RecvStream),
    open: fn() -> Open,
) -> (SendStream, RecvStream) {
    (
        SendStream::Quic(send, open()),
        RecvStream::Quic(recv, open()),
    )
}

/// The sending half of a stream.
pub enum SendStream {
    /// QUIC.
    Quic(quinn::SendStream, Open),
    /// HTTP/2.
    Http2(h2::SendHalf, Open),
}

impl std::fmt::Debug for SendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SendStream::Quic(..) => "SendStream(quic)",
            SendStream::Http2(..) => "SendStream(http2)",
        })
    }
}

impl SendStream {
    /// Writes `data`, waiting for flow-control credit.
    pub async fn write_chunk(&mut self, data: Bytes) -> Result<(), StreamError> {
        match self {
            SendStream::Quic(s, _) => Ok(s.write_chunk(data).await?),
            SendStream::Http2(s, _) => s.write(data).await,
        }
    }

    /// Writes every chunk of `chunks`, in order (QUIC may pack them into one packet).
    pub async fn write_all_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), StreamError> {
        match self {
            SendStream::Quic(s, _) => Ok(s.write_all_chunks(chunks).await?),
            SendStream::Http2(s, _) => {
                for chunk in chunks {
                    s.write(std::mem::take(chunk)).await?;
                }
                Ok(())
            }
        }
    }

    /// Writes a copy of `data`.
    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), StreamError> {
        self.write_chunk(Bytes::copy_from_slice(data)).await
    }

    /// Ends the stream cleanly after what was written.
    pub fn finish(&mut self) -> Result<(), StreamError> {
        match self {
            SendStream::Quic(s, _) => s.finish().map_err(|_| StreamError::Closed),
            SendStream::Http2(s, _) => s.finish(),
        }
    }

    /// Abandons the stream with `code`: the peer reads an error, never a clean end.
    pub fn reset(&mut self, code: u32) -> Result<(), StreamError> {
        match self {
            SendStream::Quic(s, _) => s.reset(code.into()).map_err(|_| StreamError::Closed),
            SendStream::Http2(s, _) => s.reset(code),
        }
    }

    /// Waits until the peer stops or resets the stream (`Some(code)`), or, over QUIC, until
    /// everything written was received (`None`). Over HTTP/2 a stream that ends normally
    /// stays pending until its connection ends.
    pub async fn stopped(&mut self) -> Result<Option<u32>, StreamError> {
        match self {
            SendStream::Quic(s, _) => s
                .stopped()
                .await
                .map(|code| code.map(|c| c.into_inner() as u32))
                .map_err(|e| match e {
                    quinn::StoppedError::ConnectionLost(e) => ConnectionError::from(e).into(),
                    _ => StreamError::Closed,
                }),
            SendStream::Http2(s, _) => std::future::poll_fn(|cx| s.poll_stopped(cx))
                .await
                .map(Some),
        }
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SendStream::Quic(s, _) => Pin::new(s).poll_write(cx, buf).map_err(Into::into),
            SendStream::Http2(s, _) => s.poll_write(cx, buf).map_err(Into::into),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s, _) => Pin::new(s).poll_flush(cx),
            SendStream::Http2(..) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s, _) => Pin::new(s).poll_shutdown(cx),
            SendStream::Http2(s, _) => Poll::Ready(match s.finish() {
                Ok(()) | Err(StreamError::Closed) => Ok(()),
                Err(e) => Err(e.into()),
            }),
        }
    }
}

/// The receiving half of a stream.
pub enum RecvStream {
    /// QUIC.
    Quic(quinn::RecvStream, Open),
    /// HTTP/2.
    Http2(h2::RecvHalf, Open),
}

impl std::fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecvStream::Quic(..) => "RecvStream(quic)",
            RecvStream::Http2(..) => "RecvStream(http2)",
        })
    }
}

impl RecvStream {
    /// The next chunk of at most `max` bytes, in order; `None` at the clean end.
    pub fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<Result<Option<Bytes>, StreamError>> {
        match self {
            RecvStream::Quic(s, _) => {
                let read = ready!(std::pin::pin!(s.read_chunk(max, true)).poll(cx));
                Poll::Ready(read.map(|c| c.map(|c| c.bytes)).map_err(Into::into))
            }
            RecvStream::Http2(s, _) => s.poll_chunk(cx, max),
        }
    }

    /// The next chunk of at most `max` bytes; `None` at the clean end.
    pub async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, StreamError> {
        std::future::poll_fn(|cx| self.poll_chunk(cx, max)).await
    }

    /// Lets go of a stream whose end should already be here (a request head that announced
    /// no body came with its FIN). Reading that FIN first, without waiting, matters over
    /// QUIC: dropping a stream that was not read to its end sends STOP_SENDING, one packet
    /// more per request, which also pushes the peer into acknowledging at once. Anything
    /// else (data the head did not announce, no FIN yet) is dropped as before.
    pub fn release(mut self) {
        use futures_util::FutureExt;
        let _ = self.read_chunk(1).now_or_never();
    }

    /// Tells the peer to stop sending (over HTTP/2: discards the rest as it arrives).
    pub fn stop(&mut self, code: u32) -> Result<(), StreamError> {
        match self {
            RecvStream::Quic(s, _) => s.stop(code.into()).map_err(|_| StreamError::Closed),
            RecvStream::Http2(s, _) => {
                s.stop();
                Ok(())
            }
        }
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RecvStream::Quic(s, _) => Pin::new(s).poll_read(cx, buf),
            RecvStream::Http2(s, _) => s.poll_read(cx, buf),
        }
    }
}

/// Both ends of one connection on loopback, for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    use super::*;

    /// The edge's and the connector's side of one connection; the QUIC endpoints live as
    /// long.
    pub struct Loopback {
        pub edge: Connection,
        pub connector: Connection,
        _endpoints: Option<[quinn::Endpoint; 2]>,
        /// Writes of the edge's TCP socket, over HTTP/2.
        edge_writes: Arc<AtomicU64>,
    }

    impl Loopback {
        /// What the edge has handed the kernel so far: UDP datagrams over QUIC, writes of its
        /// TCP socket over HTTP/2.
        pub fn edge_sends(&self) -> u64 {
            match &self.edge {
                Connection::Quic(c) => c.stats().udp_tx.datagrams,
                Connection::Http2(_) => self.edge_writes.load(Ordering::Relaxed),
            }
        }
    }

    /// A registered-style connection pair over `protocol`, TLS verified against a fresh
    /// self-signed certificate.
    pub async fn pair(protocol: Protocol) -> Loopback {
        let edge_writes = Arc::new(AtomicU64::new(0));
        match protocol {
            Protocol::Quic => {
                let (endpoints, edge, connector) = quic::loopback_pair().await;
                Loopback {
                    edge: Connection::Quic(edge),
                    connector: Connection::Quic(connector),
                    _endpoints: Some(endpoints),
                    edge_writes,
                }
            }
            Protocol::Http2 => {
                let id = crate::tls::self_signed(&["localhost"]).unwrap();
                let server =
                    crate::tls::tcp_server(crate::tls::ServerCert::new(&id).unwrap()).unwrap();
                let client = Arc::new(crate::tls::tcp_client(&id.chain).unwrap());
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let accept = async {
                    let (tcp, peer) = listener.accept().await.unwrap();
                    h2::configure(&tcp);
                    let tcp = Counted(tcp, edge_writes.clone());
                    h2::accept_on(tcp, peer, Arc::new(server).into()).await
                };
                let (edge, connector) = tokio::join!(accept, h2::dial(addr, "localhost", client));
                Loopback {
                    edge: edge.unwrap(),
                    connector: connector.unwrap(),
                    _endpoints: None,
                    edge_writes,
                }
            }
        }
    }

    /// A socket that counts the writes that hand it bytes.
    struct Counted<T>(T, Arc<AtomicU64>);

    impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let written = ready!(Pin::new(&mut self.0).poll_write(cx, buf));
            if matches!(written, Ok(n) if n > 0) {
                self.1.fetch_add(1, Ordering::Relaxed);
            }
            Poll::Ready(written)
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let written = ready!(Pin::new(&mut self.0).poll_write_vectored(cx, bufs));
            if matches!(written, Ok(n) if n > 0) {
                self.1.fetch_add(1, Ordering::Relaxed);
            }
            Poll::Ready(written)
        }

        fn is_write_vectored(&self) -> bool {
            self.0.is_write_vectored()
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `recv` to its end; the bytes, or the failure.
    async fn read_all(recv: &mut RecvStream) -> Result<Vec<u8>, StreamError> {
        let mut got = Vec::new();
        while let Some(chunk) = recv.read_chunk(64 << 10).await? {
            got.extend_from_slice(&chunk);
        }
        Ok(got)
    }

    /// The connector answers before the edge finished sending (a 503 to a request whose body
    /// is still arriving), stops reading and drops the stream at once: the answer arrives whole
    /// and ends cleanly, over either transport.
    #[tokio::test]
    async fn an_answer_finished_before_the_request_ended_arrives_whole() {
        for protocol in [Protocol::Quic, Protocol::Http2] {
            let pair = testing::pair(protocol).await;
            let (mut edge_send, mut edge_recv) = pair.edge.open_bi().await.unwrap();
            edge_send
                .write_all(b"head, and a body still coming")
                .await
                .unwrap();
            let (mut send, mut recv) = pair.connector.accept_bi().await.unwrap();
            recv.stop(crate::proto::code::STREAM_CANCELLED).unwrap();
            send.write_all(&[7; 100_000]).await.unwrap();
            send.finish().unwrap();
            drop((send, recv));
            let got =
                tokio::time::timeout(std::time::Duration::from_secs(10), read_all(&mut edge_recv))
                    .await
                    .unwrap_or_else(|_| panic!("{protocol}: the answer never ended"));
            assert_eq!(
                got.map(|b| b.len())
                    .unwrap_or_else(|e| panic!("{protocol}: {e}")),
                100_000
            );
        }
    }

    /// The edge gives up on a stream (the client left): the connector sees it at once.
    #[tokio::test]
    async fn an_abandoned_stream_is_seen_as_stopped() {
        for protocol in [Protocol::Quic, Protocol::Http2] {
            let pair = testing::pair(protocol).await;
            let (mut edge_send, edge_recv) = pair.edge.open_bi().await.unwrap();
            edge_send.write_all(b"head").await.unwrap();
            edge_send.finish().unwrap();
            let (mut send, _recv) = pair.connector.accept_bi().await.unwrap();
            drop((edge_send, edge_recv));
            let stopped = tokio::time::timeout(std::time::Duration::from_secs(5), send.stopped())
                .await
                .unwrap_or_else(|_| panic!("{protocol}: the connector never saw the edge leave"));
            assert!(matches!(stopped, Ok(Some(_))), "{protocol}: {stopped:?}");
        }
    }

    /// A receiver that stops reading never stalls the sender: QUIC tells it to stop, HTTP/2
    /// reads and discards the rest (more than a stream window of it here).
    #[tokio::test]
    async fn a_stopped_stream_never_stalls_its_sender() {
        for protocol in [Protocol::Quic, Protocol::Http2] {
            let pair = testing::pair(protocol).await;
            let (mut edge_send, _edge_recv) = pair.edge.open_bi().await.unwrap();
            edge_send.write_all(b"head").await.unwrap();
            let (_send, mut recv) = pair.connector.accept_bi().await.unwrap();
            recv.stop(crate::proto::code::STREAM_CANCELLED).unwrap();
            let upload = async {
                for _ in 0..64 {
                    edge_send
                        .write_chunk(Bytes::from(vec![0; 64 << 10]))
                        .await?;
                }
                Ok::<_, StreamError>(())
            };
            // QUIC: the writer learns it was stopped; HTTP/2: the 4 MiB go through.
            tokio::time::timeout(std::time::Duration::from_secs(10), upload)
                .await
                .unwrap_or_else(|_| panic!("{protocol}: the sender stalled"))
                .ok();
        }
    }

    /// A request that announced no body comes with its FIN; letting go of it sends no
    /// STOP_SENDING (which would cost a packet, and an immediate acknowledgement, per request).
    #[tokio::test]
    async fn releasing_an_ended_stream_sends_no_stop_sending() {
        let pair = testing::pair(Protocol::Quic).await;
        let (Connection::Quic(_), Connection::Quic(connector)) = (&pair.edge, &pair.connector)
        else {
            unreachable!()
        };
        let (mut edge_send, mut edge_recv) = pair.edge.open_bi().await.unwrap();
        edge_send.write_all(b"head").await.unwrap();
        edge_send.finish().unwrap();
        // Resolves once the connector acknowledged everything, the FIN included.
        let acked = tokio::time::timeout(std::time::Duration::from_secs(5), edge_send.stopped())
            .await
            .expect("the connector never acknowledged the stream");
        assert!(matches!(acked, Ok(None)), "{acked:?}");

        let (mut send, mut recv) = pair.connector.accept_bi().await.unwrap();
        assert_eq!(
            recv.read_chunk(64).await.unwrap().as_deref(),
            Some(&b"head"[..])
        );
        recv.release();
        // An answer after the release: once the edge has it all, anything queued before it
        // has been sent too.
        send.write_all(b"answer").await.unwrap();
        send.finish().unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), read_all(&mut edge_recv))
            .await
            .expect("the answer never ended");
        assert_eq!(got.unwrap(), b"answer");
        assert_eq!(connector.stats().frame_tx.stop_sending, 0);
    }

    /// Many streams written in one turn of a busy worker (an edge forwarding requests that
    /// arrived together): they leave in fewer sends than streams, over either transport,
    /// where each used to leave alone right after its write (see [`coalesce`]).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn streams_written_in_one_turn_share_sends() {
        const STREAMS: usize = 64;
        for protocol in [Protocol::Quic, Protocol::Http2] {
            let pair = testing::pair(protocol).await;
            let connector = pair.connector.clone();
            let reader = tokio::spawn(async move {
                let mut kept = Vec::new();
                for _ in 0..STREAMS {
                    let (send, mut recv) = connector.accept_bi().await.unwrap();
                    read_all(&mut recv).await.unwrap();
                    // Kept open: an answer would be more for the edge to acknowledge.
                    kept.push(send);
                }
                kept
            });
            let before = pair.edge_sends();
            // Spawned from a task on the worker: all are runnable before any runs.
            let opener = pair.edge.clone();
            let writers = tokio::spawn(async move {
                (0..STREAMS)
                    .map(|_| {
                        let edge = opener.clone();
                        tokio::spawn(async move {
                            let (mut send, recv) = edge.open_bi().await.unwrap();
                            send.write_all(b"GET / HTTP/1.1").await.unwrap();
                            send.finish().unwrap();
                            (send, recv)
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap();
            let bound = std::time::Duration::from_secs(20);
            tokio::time::timeout(bound, reader)
                .await
                .unwrap_or_else(|_| panic!("{protocol}: the streams never all arrived"))
                .unwrap();
            let sent = pair.edge_sends() - before;
            for w in writers {
                w.abort();
            }
            assert!(
                (sent as usize) < STREAMS / 2,
                "{protocol}: {sent} sends for {STREAMS} streams"
            );
        }
    }

    /// A connection whose last handle is dropped closes, and its peer sees it end.
    #[tokio::test]
    async fn a_dropped_connection_closes() {
        for protocol in [Protocol::Quic, Protocol::Http2] {
            let mut pair = testing::pair(protocol).await;
            // Drops the connector's only handle; the QUIC endpoints stay.
            pair.connector = pair.edge.clone();
            tokio::time::timeout(std::time::Duration::from_secs(5), pair.edge.closed())
                .await
                .unwrap_or_else(|_| panic!("{protocol}: the connection stayed open"));
        }
    }
}
