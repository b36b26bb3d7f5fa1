//! Moving HTTP bodies and upgraded sockets across QUIC streams, with back-pressure.
//!
//! Nothing here buffers a whole body: a QUIC receive stream becomes an HTTP body that reads one
//! chunk when the HTTP side asks for one, and an HTTP body is written to a QUIC send stream one
//! frame at a time, waiting for flow-control credit.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http_body::{Body, Frame};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::transport::{RecvStream, SendStream, StreamError};

/// Error type of bodies that cross the tunnel.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type used on both sides.
pub type HttpBody = BoxBody<Bytes, BoxError>;

/// Largest chunk read from a QUIC stream at once.
const CHUNK: usize = 64 * 1024;

/// Largest body frame [`recv_body`] joins from chunks that have already arrived.
const COALESCE: usize = 64 * 1024;

/// Smallest chunk [`recv_body`] hands over as it is, without joining it to others: hyper's
/// HTTP/1 writer gathers up to sixteen frames into one vectored write, and sixteen of these
/// already make 64 KiB. Only smaller chunks (a path MTU of about 1.2 KB) are worth a copy.
const JOIN_BELOW: usize = 4 * 1024;

/// An HTTP body that yields what arrives on `recv` until FIN; a reset becomes a body error.
pub fn recv_body(recv: RecvStream) -> HttpBody {
    recv_body_counted(recv, Arc::default())
}

/// Like [`recv_body`], adding the bytes read to `counter`.
pub fn recv_body_counted(recv: RecvStream, counter: Arc<AtomicU64>) -> HttpBody {
    BoxBody::new(RecvBody {
        recv: Some(recv),
        next: None,
        counter,
    })
}

/// The body of a QUIC receive stream.
///
/// After each chunk it looks, without waiting, whether the FIN is already there, so that
/// [`Body::is_end_stream`] is true as soon as it can be: an HTTP writer that stops at the
/// announced `content-length` then drops a stream read to its end, and QUIC sends no
/// STOP_SENDING (one packet more per request) for it.
struct RecvBody {
    /// `None` once the stream ended or failed.
    recv: Option<RecvStream>,
    /// What was read while looking for the FIN (a chunk or the stream's failure), yielded
    /// next.
    next: Option<Result<Bytes, BoxError>>,
    counter: Arc<AtomicU64>,
}

impl RecvBody {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        let Some(recv) = self.recv.as_mut() else {
            return Poll::Ready(None);
        };
        let read = ready!(recv.poll_chunk(cx, CHUNK));
        Poll::Ready(match read {
            Ok(Some(chunk)) => {
                self.counter
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                Some(Ok(chunk))
            }
            Ok(None) => {
                self.recv = None;
                None
            }
            Err(e) => {
                self.recv = None;
                Some(Err(e.into()))
            }
        })
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        // A chunk kept from the last poll goes through the same look-ahead as a fresh one:
        // returned alone, the FIN behind it would go unseen.
        let mut chunk = match this.next.take() {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            None => match ready!(this.poll_chunk(cx)) {
                Some(Ok(chunk)) => chunk,
                other => return Poll::Ready(other.map(|r| r.map(Frame::data))),
            },
        };
        // QUIC hands over what one packet carried (about 1.2 KB on most paths): what has
        // already arrived behind a small chunk is joined into one frame of up to COALESCE
        // bytes, so that the HTTP writer downstream handles (and writes) tens of kilobytes at
        // a time, not a packet's worth. Large chunks (large datagrams on loopback, HTTP/2 DATA
        // frames of what the sender wrote) go as they are: the writer gathers them without a
        // copy.
        let mut joined: Option<BytesMut> = None;
        loop {
            // What follows, if it is already there: the FIN ends the body now; a failure (a
            // reset must never look like a clean end), or a chunk that is not joined, is kept
            // for the next poll.
            match this.poll_chunk(cx) {
                Poll::Ready(Some(Ok(more))) => {
                    let len = joined.as_ref().map_or(chunk.len(), BytesMut::len);
                    if len >= COALESCE || chunk.len() >= JOIN_BELOW || more.len() >= JOIN_BELOW {
                        this.next = Some(Ok(more));
                        break;
                    }
                    let buf = joined.get_or_insert_with(|| {
                        let mut b = BytesMut::with_capacity(COALESCE + JOIN_BELOW);
                        b.extend_from_slice(&chunk);
                        b
                    });
                    buf.extend_from_slice(&more);
                }
                Poll::Ready(Some(Err(e))) => {
                    this.next = Some(Err(e));
                    break;
                }
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        if let Some(buf) = joined {
            chunk = buf.freeze();
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_none() && self.next.is_none()
    }
}

/// Any body, boxed, its error boxed.
pub fn boxed<B>(body: B) -> HttpBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// An empty body.
pub fn empty() -> HttpBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body holding `data`.
pub fn full(data: impl Into<Bytes>) -> HttpBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// The body length `headers` announce with a single, valid `content-length`.
pub fn announced_length(headers: &http::HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let length = values.next()?.to_str().ok()?.parse().ok()?;
    values.next().is_none().then_some(length)
}

/// Why pumping a body into a QUIC stream stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// The HTTP body failed (client or origin went away mid-body).
    #[error("body failed: {0}")]
    Body(BoxError),
    /// The QUIC stream failed (peer reset or stopped it, connection lost).
    #[error("stream failed: {0}")]
    Stream(#[from] StreamError),
}

/// Writes `head` (an encoded frame, possibly empty), then every data frame of `body` to
/// `send`, and finishes the stream when the body ends; returns the body's byte count.
/// Trailers are dropped. On an error the stream is left as it is: the caller resets it or not.
///
/// A small answer leaves in one packet: when the body's first chunk is already there, it is
/// written together with the head, and the FIN follows without yielding to the runtime, so
/// that QUIC's connection task, woken by the first write, finds the whole answer (a head, a
/// body and a FIN sent one by one cost up to three packets and their acknowledgements).
/// With `head_waits` (a small body of announced length), the head waits for the first chunk
/// even when it is not there yet: an HTTP/1 origin's head often reaches us a moment before
/// its body, and a client can do nothing with the head of a short answer without its body.
pub async fn pump<B>(
    head: Bytes,
    mut body: B,
    send: &mut SendStream,
    head_waits: bool,
) -> Result<u64, PumpError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut total = 0u64;
    let mut pending = Some(head).filter(|h| !h.is_empty());
    loop {
        let next = match pending.as_ref().map(|_| body.frame().now_or_never()) {
            // Unless told to, the head waits for a chunk that is already there, never for one
            // that is not.
            Some(None) if !head_waits => {
                send.write_chunk(pending.take().expect("checked")).await?;
                body.frame().await
            }
            Some(None) => body.frame().await,
            Some(Some(next)) => next,
            None => body.frame().await,
        };
        let Some(frame) = next else { break };
        let frame = frame.map_err(|e| PumpError::Body(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        match pending.take() {
            Some(head) => send.write_all_chunks(&mut [head, data]).await?,
            None => send.write_chunk(data).await?,
        }
        if body.is_end_stream() {
            break;
        }
    }
    if let Some(head) = pending {
        send.write_chunk(head).await?;
    }
    // Fails only when the stream was already finished or reset: nothing left to do then.
    let _ = send.finish();
    Ok(total)
}

/// Bytes copied at once each way by [`splice`].
const SPLICE_BUF: usize = 64 * 1024;

/// What a relay between a byte stream outside the tunnel and the tunnel moved, and how it
/// ended. The counts hold whatever the ending, so a session that idled or failed is still
/// accounted for.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes from the outside stream into the tunnel.
    pub sent: u64,
    /// Bytes from the tunnel to the outside stream.
    pub received: u64,
    /// `Ok` when both directions ended; `TimedOut` when nothing moved for the idle timeout.
    pub result: std::io::Result<()>,
}

/// Copies bytes both ways between `io` (an upgraded HTTP connection, a TCP session's socket)
/// and a stream pair until both directions end, or until no byte has moved either way for
/// `idle`. A half-close either way is passed on.
pub async fn splice<T, W>(
    io: T,
    send: W,
    recv: &mut RecvStream,
    idle: std::time::Duration,
) -> Relayed
where
    T: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    let (read, written) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // Every byte either way passes through `io`: watching it watches both directions.
    let mut io = Counted {
        inner: io,
        read: read.clone(),
        written: written.clone(),
    };
    let mut stream = tokio::io::join(recv, send);
    let quiet = quiet(idle, || {
        read.load(Ordering::Relaxed) + written.load(Ordering::Relaxed)
    });
    let result = tokio::select! {
        // 64 KiB at a time rather than tokio's default 8 KiB: a quarter of the stream writes
        // and syscalls per byte of a bulk session.
        r = tokio::io::copy_bidirectional_with_sizes(&mut io, &mut stream, SPLICE_BUF, SPLICE_BUF) => r.map(drop),
        () = quiet => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("nothing moved either way for {idle:?}"),
        )),
    };
    Relayed {
        sent: read.load(Ordering::Relaxed),
        received: written.load(Ordering::Relaxed),
        result,
    }
}

/// Completes once `moved` (a count of what a relay moved) has not changed for a whole `idle`
/// period: the relay is idle.
pub async fn quiet(idle: std::time::Duration, moved: impl Fn() -> u64) {
    let mut seen = moved();
    loop {
        tokio::time::sleep(idle).await;
        let now = moved();
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// Counts the bytes read from and written to `inner`.
struct Counted<T> {
    inner: T,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &polled {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Fails `body` with [`BodyIdle`] when, while it is being read, no data arrives for `idle`: a
/// peer that trickles or stalls a body cannot hold a request (and its admission slot) open
/// indefinitely.
pub fn with_idle_timeout(body: HttpBody, idle: std::time::Duration) -> HttpBody {
    BoxBody::new(IdleBody {
        body,
        idle,
        timer: None,
    })
}

/// A body moved no data for longer than its idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no body data for {0:?}")]
pub struct BodyIdle(pub std::time::Duration);

struct IdleBody {
    body: HttpBody,
    idle: std::time::Duration,
    /// Armed while the reader waits for data; cleared by every frame.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Body for IdleBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use std::future::Future;
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Pending => {
                let idle = self.idle;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyIdle(idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
            ready => {
                self.timer = None;
                ready
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Keeps `guard` alive for as long as `body` is (an in-flight count, say).
pub fn with_guard<G: Send + Sync + Unpin + 'static>(body: HttpBody, guard: G) -> HttpBody {
    BoxBody::new(Guarded {
        body,
        _guard: guard,
    })
}

struct Guarded<G> {
    body: HttpBody,
    _guard: G,
}

impl<G: Unpin> Body for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::testing::Loopback;
    use crate::transport::{Connection, Protocol};
    use http_body_util::StreamBody;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn an_idle_body_fails_and_a_moving_one_does_not() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
            );
        let mut body = with_idle_timeout(
            BoxBody::new(StreamBody::new(stream)),
            Duration::from_secs(5),
        );
        let feeder = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .unwrap();
            }
            // Then stall, keeping the sender alive.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tx);
        });
        for _ in 0..3 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "x");
        }
        let start = tokio::time::Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<BodyIdle>(), "{err}");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        feeder.abort();
    }

    /// A stream opened by the edge's side of a loopback connection over `protocol`, carrying
    /// `data`, then FIN (or a reset with `reset`), as the connector's side receives it, with
    /// the sending half kept for its `stopped()`.
    async fn stream_with(
        protocol: Protocol,
        data: &'static [u8],
        reset: Option<u32>,
    ) -> (Loopback, SendStream, RecvStream) {
        let pair = crate::transport::testing::pair(protocol).await;
        let (mut send, _) = pair.edge.open_bi().await.unwrap();
        send.write_all(data).await.unwrap();
        match reset {
            Some(code) => send.reset(code).unwrap(),
            None => send.finish().unwrap(),
        }
        let (_, recv) = pair.connector.accept_bi().await.unwrap();
        (pair, send, recv)
    }

    #[tokio::test]
    async fn a_body_read_to_its_last_byte_ends_and_its_stream_is_not_stopped() {
        // QUIC only: HTTP/2 has no STOP_SENDING.
        let (_pair, mut send, recv) = stream_with(Protocol::Quic, &[7; 100], None).await;
        read_to_last_byte(recv_body(recv), &mut send, 100).await;
    }

    /// Reads `body` up to its `total`-th byte and no further, as an HTTP writer that stops at
    /// `content-length` does; checks that the FIN was seen with the last byte, and that
    /// dropping the body then sends no STOP_SENDING. The sizes of the frames read.
    async fn read_to_last_byte(
        mut body: HttpBody,
        send: &mut SendStream,
        total: usize,
    ) -> Vec<usize> {
        let mut sizes = Vec::new();
        while sizes.iter().sum::<usize>() < total {
            let frame = body.frame().await.unwrap().unwrap();
            sizes.push(frame.into_data().unwrap().len());
        }
        assert!(body.is_end_stream(), "the FIN was there with the last byte");
        drop(body);
        let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped())
            .await
            .unwrap();
        assert_eq!(
            stopped.unwrap(),
            None,
            "no STOP_SENDING for a stream read to its end"
        );
        sizes
    }

    #[tokio::test]
    async fn a_body_hands_large_chunks_over_as_they_are() {
        for protocol in [Protocol::Quic, Protocol::Http2] {
            large_chunks_are_not_joined(protocol).await;
        }
    }

    /// Small writes, then 8 KiB writes: every byte arrives in order, and over HTTP/2 no frame
    /// is larger than the 8 KiB chunks (before, chunks that had arrived were joined up to
    /// 64 KiB).
    async fn large_chunks_are_not_joined(protocol: Protocol) {
        const LARGE: usize = 8 * 1024;
        let pair = crate::transport::testing::pair(protocol).await;
        let (mut send, _) = pair.edge.open_bi().await.unwrap();
        let mut sent = Vec::new();
        for i in 0..64u8 {
            let chunk = Bytes::from(vec![i; 100]);
            sent.extend_from_slice(&chunk);
            send.write_chunk(chunk).await.unwrap();
        }
        let small = sent.len();
        for i in 0..32u8 {
            let chunk = Bytes::from(vec![i.wrapping_mul(7); LARGE]);
            sent.extend_from_slice(&chunk);
            send.write_chunk(chunk).await.unwrap();
        }
        send.finish().unwrap();
        let (_, recv) = pair.connector.accept_bi().await.unwrap();
        let mut body = recv_body(recv);
        let mut got = Vec::new();
        while let Some(frame) = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .unwrap()
        {
            let data = frame.unwrap().into_data().unwrap();
            // Over HTTP/2 a chunk is at most what the sender wrote (flow control may split a
            // write, never join two); over QUIC it is what a packet carried, which depends on
            // the path's MTU: there only the bytes are checked. Whether small chunks are
            // joined depends on when they arrive, so it is not asserted.
            if protocol == Protocol::Http2 && got.len() >= small {
                assert!(
                    data.len() <= LARGE,
                    "{protocol}: a {} byte frame joined 8 KiB chunks",
                    data.len()
                );
            }
            got.extend_from_slice(&data);
        }
        assert!(
            got == sent,
            "{protocol}: the body's bytes differ from those sent"
        );
    }

    /// Reads a stream from the edge's side to its end, as `recv_body` does; for warming up.
    async fn drain(mut recv: RecvStream) {
        while recv.read_chunk(CHUNK).await.unwrap().is_some() {}
    }

    #[tokio::test]
    async fn a_last_chunk_kept_from_the_poll_before_still_finds_the_fin_behind_it() {
        // QUIC, the download direction (connector to edge), where loopback carries datagrams
        // larger than JOIN_BELOW once path MTU discovery has found them.
        let pair = crate::transport::testing::pair(Protocol::Quic).await;
        let (Connection::Quic(edge), Connection::Quic(connector)) = (&pair.edge, &pair.connector)
        else {
            unreachable!("a QUIC pair")
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while connector.stats().path.current_mtu < 5000 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                connector.stats().path
            );
            let (mut ask, recv) = pair.edge.open_bi().await.unwrap();
            ask.finish().unwrap();
            let (mut send, _) = pair.connector.accept_bi().await.unwrap();
            send.write_all(&[1; 256 * 1024]).await.unwrap();
            send.finish().unwrap();
            drain(recv).await;
        }
        // Two packets, each carrying more than JOIN_BELOW, the FIN in the second: the body
        // keeps the second chunk while it yields the first, and must still see the FIN when it
        // yields the second.
        let payload = usize::from(connector.stats().path.current_mtu) - 50;
        let total = payload + JOIN_BELOW + 600;
        let (mut ask, recv) = pair.edge.open_bi().await.unwrap();
        ask.finish().unwrap();
        let (mut send, _) = pair.connector.accept_bi().await.unwrap();
        let frames_before = edge.stats().frame_rx.stream;
        // Written and finished before the connection's driver runs (this runtime has one
        // thread), so the FIN travels with the last bytes.
        send.write_all(&vec![9; total]).await.unwrap();
        send.finish().unwrap();
        while edge.stats().frame_rx.stream < frames_before + 2 {
            assert!(tokio::time::Instant::now() < deadline + Duration::from_secs(5));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let sizes = read_to_last_byte(recv_body(recv), &mut send, total).await;
        assert!(
            sizes.len() == 2 && sizes.iter().all(|&n| n >= JOIN_BELOW),
            "two large chunks expected, got {sizes:?}"
        );
    }

    #[tokio::test]
    async fn a_reset_after_the_data_is_an_error_never_a_clean_end() {
        for protocol in [Protocol::Quic, Protocol::Http2] {
            a_reset_after_the_data_is_an_error(protocol).await;
        }
    }

    async fn a_reset_after_the_data_is_an_error(protocol: Protocol) {
        let (_pair, _send, recv) = stream_with(protocol, &[7; 100], Some(9)).await;
        let mut body = recv_body(recv);
        let mut got = 0;
        let err = loop {
            match tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .unwrap()
            {
                Some(Ok(frame)) => {
                    got += frame.into_data().unwrap().len();
                    assert!(!body.is_end_stream());
                }
                Some(Err(e)) => break e,
                None => panic!("{protocol}: a reset stream ended cleanly after {got} bytes"),
            }
        };
        assert!(err.to_string().contains("reset"), "{protocol}: {err}");
    }
}

/// `body` as a framed body ([`crate::proto::body`]): each data frame behind its prefix, and
/// its trailers, if any, as the last frame. For a stream whose head set `trailers`.
pub fn framed(body: HttpBody) -> HttpBody {
    BoxBody::new(Framed {
        inner: body,
        pending: None,
    })
}

struct Framed {
    inner: HttpBody,
    /// A data frame whose prefix was just yielded.
    pending: Option<Bytes>,
}

impl Body for Framed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(data) = this.pending.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let frame = match frame.into_data() {
            Ok(data) if data.len() > crate::proto::body::MAX_DATA => {
                return Poll::Ready(Some(Err("a body frame over 16 MiB".into())))
            }
            Ok(data) => {
                let prefix = crate::proto::body::data_prefix(data.len());
                this.pending = Some(data);
                prefix
            }
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => {
                    match crate::proto::body::encode_trailers(&crate::headers::to_wire(&trailers)) {
                        Ok(b) => b,
                        Err(e) => return Poll::Ready(Some(Err(e.into()))),
                    }
                }
                Err(_) => Bytes::new(),
            },
        };
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.inner.is_end_stream()
    }
}

/// The body a framed body ([`crate::proto::body`]) carries: data and trailers frames as
/// they were sent. A frame cut off at FIN, or a malformed one, is a body error.
pub fn unframed(body: HttpBody) -> HttpBody {
    BoxBody::new(Unframed {
        inner: Some(body),
        decoder: crate::proto::body::BodyDecoder::default(),
    })
}

struct Unframed {
    /// `None` once the framed body ended.
    inner: Option<HttpBody>,
    decoder: crate::proto::body::BodyDecoder,
}

impl Body for Unframed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use crate::proto::body::BodyFrame;
        let this = self.get_mut();
        loop {
            match this.decoder.next_frame() {
                Ok(Some(BodyFrame::Data(d))) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                Ok(Some(BodyFrame::Trailers(list))) => {
                    let (trailers, _) = crate::headers::from_wire(&list);
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Ok(None) => {}
                Err(e) => {
                    this.inner = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(Pin::new(inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        this.decoder.push(&data);
                    }
                }
                Some(Err(e)) => {
                    this.inner = None;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    this.inner = None;
                    if let Err(e) = this.decoder.finish() {
                        return Poll::Ready(Some(Err(e.into())));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

/// A body handed over only when first read, so that whoever made it can take it back if it
/// never was: a request whose connection failed can go elsewhere with its body whole.
#[derive(Clone)]
pub struct Deferred(Arc<std::sync::Mutex<Option<HttpBody>>>);

impl Deferred {
    /// Holds `body`.
    pub fn new(body: HttpBody) -> Self {
        Deferred(Arc::new(std::sync::Mutex::new(Some(body))))
    }

    /// A body that takes the held one on its first read.
    pub fn body(&self) -> HttpBody {
        BoxBody::new(Handed {
            from: self.clone(),
            taken: None,
        })
    }

    /// Whether nothing has read the body yet.
    pub fn unread(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

struct Handed {
    from: Deferred,
    taken: Option<HttpBody>,
}

impl Body for Handed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.taken.is_none() {
            this.taken = this.from.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        match this.taken.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(Some(Err("the body was already sent".into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.taken {
            Some(b) => b.is_end_stream(),
            None => self
                .from
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_some_and(|b| b.is_end_stream()),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.taken {
            Some(b) => b.size_hint(),
            None => self
                .from
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|b| b.size_hint())
                .unwrap_or_default(),
        }
    }
}
