//! Moving HTTP bodies and upgraded sockets across QUIC streams, with back-pressure.
//!
//! Nothing here buffers a whole body: a QUIC receive stream becomes an HTTP body that reads one
//! chunk when the HTTP side asks for one, and an HTTP body is written to a QUIC send stream one
//! frame at a time, waiting for flow-control credit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use tokio::io::{AsyncRead, AsyncWrite};

/// Error type of bodies that cross the tunnel.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type used on both sides.
pub type HttpBody = BoxBody<Bytes, BoxError>;

/// Largest chunk read from a QUIC stream at once.
const CHUNK: usize = 64 * 1024;

/// An HTTP body that yields what arrives on `recv` until FIN; a reset becomes a body error.
pub fn recv_body(recv: quinn::RecvStream) -> HttpBody {
    recv_body_counted(recv, Arc::default())
}

/// Like [`recv_body`], adding the bytes read to `counter`.
pub fn recv_body_counted(recv: quinn::RecvStream, counter: Arc<AtomicU64>) -> HttpBody {
    let stream = futures_util::stream::unfold(Some(recv), move |state| {
        let counter = counter.clone();
        async move {
            let mut recv = state?;
            match recv.read_chunk(CHUNK, true).await {
                Ok(Some(chunk)) => {
                    counter.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                    Some((Ok(Frame::data(chunk.bytes)), Some(recv)))
                }
                Ok(None) => None,
                Err(e) => Some((Err(BoxError::from(e)), None)),
            }
        }
    });
    BoxBody::new(StreamBody::new(stream))
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

/// Why pumping a body into a QUIC stream stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// The HTTP body failed (client or origin went away mid-body).
    #[error("body failed: {0}")]
    Body(BoxError),
    /// The QUIC stream failed (peer reset or stopped it, connection lost).
    #[error("stream failed: {0}")]
    Stream(#[from] quinn::WriteError),
}

/// Writes every data frame of `body` to `send`, returning the byte count. Trailers are
/// dropped. Does not finish or reset `send`: the caller decides.
pub async fn pump<B>(mut body: B, send: &mut quinn::SendStream) -> Result<u64, PumpError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| PumpError::Body(e.into()))?;
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            send.write_chunk(data).await?;
        }
    }
    Ok(total)
}

/// Copies bytes both ways between an upgraded HTTP connection and a QUIC stream pair until
/// both directions end, or until no byte has moved either way for `idle`. Returns (bytes to
/// QUIC, bytes from QUIC).
pub async fn splice<T, W>(
    io: T,
    send: W,
    recv: quinn::RecvStream,
    idle: std::time::Duration,
) -> std::io::Result<(u64, u64)>
where
    T: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    let moved = Arc::new(AtomicU64::new(0));
    // Every byte either way passes through `io`: watching it watches both directions.
    let mut io = Counted {
        inner: io,
        moved: moved.clone(),
    };
    let mut quic = tokio::io::join(recv, send);
    let quiet = async {
        let mut seen = moved.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(idle).await;
            let now = moved.load(Ordering::Relaxed);
            if now == seen {
                return;
            }
            seen = now;
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut io, &mut quic) => r,
        () = quiet => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the upgraded connection was idle for {idle:?}"),
        )),
    }
}

/// Counts the bytes read and written through `inner`.
struct Counted<T> {
    inner: T,
    moved: Arc<AtomicU64>,
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
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
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
            self.moved.fetch_add(*n as u64, Ordering::Relaxed);
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
}
