//! Client connections on the public listeners, and what bounds them: connections per client
//! address, a deadline for the first request and for idleness between requests (HTTP/1.1 and
//! HTTP/2 alike), and a stall limit on writes to a client that stops reading.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use super::{dispatch, EdgeShared};
use crate::admin::metrics::KindLabels;
use crate::relay;

/// Accepts client connections on one listener until shutdown.
pub(super) async fn serve_clients(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<EdgeShared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let scheme: &'static str = if tls.is_some() { "https" } else { "http" };
    let per_client = PerClient::default();
    loop {
        let Some((tcp, peer)) = crate::net::accept(&listener, &shutdown, "client").await else {
            return;
        };
        let Some(slot) = per_client.admit(peer.ip(), shared.config.max_connections_per_client)
        else {
            debug!(%peer, "closing a client connection: too many from this address");
            shared
                .metrics
                .rejected
                .get_or_create(&KindLabels {
                    kind: "client-connections",
                })
                .inc();
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            warn!(%peer, cause = %e, "failed to set TCP_NODELAY");
        }
        let conn = ClientConn {
            shared: shared.clone(),
            peer,
            scheme,
            stop: shutdown.child_token(),
        };
        let tls = tls.clone();
        tracker.spawn(
            async move {
                conn.serve(tcp, tls, Arc::new(slot)).await;
            }
            .instrument(tracing::debug_span!("client", %peer)),
        );
    }
}

/// Drives a client connection to its end; when `$stop` is cancelled (shutdown, or the
/// connection went idle), lets it finish the request in flight (HTTP/1.1: no more keep-alive;
/// HTTP/2: GOAWAY). A macro because hyper's HTTP/1 and auto-protocol connections share
/// `graceful_shutdown` by name only, not through a trait.
///
/// The graceful phase is bounded by `$bound()`: an HTTP/2 client that never answers the
/// GOAWAY's PING cannot keep the connection past it.
///
/// When `$kill` is cancelled instead (a client that stopped reading), the connection is
/// dropped at once.
macro_rules! serve_gracefully {
    ($conn:ident, $stop:expr, $bound:expr, $kill:expr) => {{
        tokio::pin!($conn);
        // Polled only when they fire, not on each of the connection's wake-ups.
        let mut kill = crate::wake::Dormant::new($kill.cancelled());
        let stop = crate::wake::Dormant::new($stop.cancelled());
        let result = tokio::select! {
            r = $conn.as_mut() => Some(r),
            _ = &mut kill => None,
            _ = stop => {
                $conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = tokio::time::timeout($bound(), $conn.as_mut()) => r.ok(),
                    _ = kill => None,
                }
            }
        };
        match result {
            Some(Err(e)) => tracing::debug!(cause = %e, "client connection ended with an error"),
            None => tracing::debug!("client connection did not close gracefully in time; dropped"),
            Some(Ok(())) => {}
        }
    }};
}

/// One accepted client connection.
struct ClientConn {
    shared: Arc<EdgeShared>,
    peer: SocketAddr,
    scheme: &'static str,
    /// Cancelled on shutdown or when the connection has been idle too long.
    stop: CancellationToken,
}

impl ClientConn {
    /// How long a connection asked to close gracefully may take: on shutdown, the grace
    /// period; when closed for idleness (no request in flight), only the header timeout.
    fn graceful_bound(&self, idle: &std::sync::atomic::AtomicBool) -> Duration {
        let cfg = &self.shared.config;
        if idle.load(std::sync::atomic::Ordering::Relaxed) {
            cfg.header_read_timeout
        } else {
            cfg.grace_period
        }
    }
}

impl ClientConn {
    /// Serves the connection; `slot` is its place under `max-connections-per-client`, which
    /// an upgraded connection carries on (see [`HeldSlot`]).
    async fn serve(
        self,
        tcp: tokio::net::TcpStream,
        tls: Option<TlsAcceptor>,
        slot: Arc<ClientSlot>,
    ) {
        let cfg = &self.shared.config;
        let activity = Arc::new(Activity::new(cfg.header_read_timeout, cfg.idle_timeout));
        let went_idle = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watchdog = {
            let (activity, stop, went_idle) =
                (activity.clone(), self.stop.clone(), went_idle.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = activity.idle() => {
                        debug!("closing an idle client connection");
                        went_idle.store(true, std::sync::atomic::Ordering::Relaxed);
                        stop.cancel();
                    }
                    _ = stop.cancelled() => {}
                }
            })
        };
        // A client that stops reading a response it asked for is cut off: on HTTP/2 it can do
        // that while the socket stays writable (it withholds flow-control credit).
        let kill = CancellationToken::new();
        let stall_watch = {
            let (activity, kill) = (activity.clone(), kill.clone());
            let limit = cfg.body_idle_timeout;
            tokio::spawn(async move {
                activity.stalled(limit).await;
                debug!("closing a client connection: a response went unread for {limit:?}");
                kill.cancel();
            })
        };
        let bound = || self.graceful_bound(&went_idle);
        let (shared, scheme) = (self.shared.clone(), self.scheme);
        let peer = Arc::new(Peer::new(self.peer, HeldSlot(slot)));
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let request = activity.begin();
            let peer = peer.clone();
            let shared = shared.clone();
            async move {
                let resp = dispatch::handle(req, shared, peer, scheme).await?;
                // The request counts as active until its response body has been sent.
                Ok::<_, std::convert::Infallible>(resp.map(|b| request.watch(b)))
            }
        });
        let stall = cfg.body_idle_timeout;
        let max_buf = cfg.max_header_size.max(8192);
        match tls {
            None => {
                let io = TokioIo::new(StallIo::new(tcp, stall));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(cfg.header_read_timeout)
                    .max_buf_size(max_buf)
                    .serve_connection(io, svc)
                    .with_upgrades();
                serve_gracefully!(conn, self.stop, bound, kill);
            }
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(cfg.header_read_timeout, acceptor.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(cause = %e, "client TLS handshake failed");
                        watchdog.abort();
                        stall_watch.abort();
                        return;
                    }
                    Err(_) => {
                        debug!("client TLS handshake timed out");
                        watchdog.abort();
                        stall_watch.abort();
                        return;
                    }
                };
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(cfg.header_read_timeout)
                    .max_buf_size(max_buf);
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Some(Duration::from_secs(20)))
                    .keep_alive_timeout(Duration::from_secs(20))
                    .max_header_list_size(cfg.max_header_size.min(u32::MAX as usize) as u32);
                let io = TokioIo::new(StallIo::new(stream, stall));
                let conn = builder.serve_connection_with_upgrades(io, svc);
                serve_gracefully!(conn, self.stop, bound, kill);
            }
        }
        watchdog.abort();
        stall_watch.abort();
    }
}

/// The client at the other end of a connection, as each of its requests tells the connector,
/// written out once for the connection rather than for every request.
pub(super) struct Peer {
    pub addr: SocketAddr,
    /// `addr` as text: the request head's `client_addr`.
    pub addr_text: String,
    /// The address's IP as a header value: the edge's own `x-forwarded-for` entry.
    pub ip: HeaderValue,
    /// The connection's place, which an upgraded request takes over.
    pub slot: HeldSlot,
}

impl Peer {
    fn new(addr: SocketAddr, slot: HeldSlot) -> Peer {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .expect("an IP address is a valid header value");
        Peer {
            addr,
            addr_text: addr.to_string(),
            ip,
            slot,
        }
    }
}

/// Open client connections per IP address.
#[derive(Debug, Default, Clone)]
struct PerClient(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl PerClient {
    /// One more connection from `ip`, unless it has `max` already.
    fn admit(&self, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(ip).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(ClientSlot(self.clone(), ip))
    }
}

/// Holds one connection's place in [`PerClient`] until dropped.
struct ClientSlot(PerClient, IpAddr);

/// A connection's place under `max-connections-per-client`: an upgraded connection outlives
/// hyper's connection task and keeps its place with this.
#[derive(Clone)]
pub(super) struct HeldSlot(
    // Never read: held for its `Drop`.
    #[allow(dead_code)] Arc<ClientSlot>,
);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.1);
            }
        }
    }
}

/// Requests in flight on one connection, and when the last one ended.
#[derive(Debug)]
struct Activity {
    /// How long a connection may go without a request before its first one, and after it.
    first: Duration,
    idle: Duration,
    state: Mutex<ActivityState>,
    changed: tokio::sync::Notify,
    /// For each response being sent: when it last handed a frame to hyper that hyper has
    /// not come back for (None while it waits for data itself).
    unread: Mutex<Vec<std::sync::Weak<Mutex<Option<Instant>>>>>,
}

#[derive(Debug)]
struct ActivityState {
    active: usize,
    /// When the connection was accepted, or the last request ended.
    since: Instant,
    /// Whether any request has begun.
    seen: bool,
    /// What the watchdog ([`Activity::idle`]) last saw: `None` while it waits for the last
    /// request to end, else the deadline it sleeps until. A request that ends wakes it only
    /// if it waits for that, or if the new deadline comes before the one it sleeps until, so
    /// a busy keep-alive connection does not wake its watchdog (and re-arm its timer) on
    /// every request.
    watched: Option<Instant>,
}

impl Activity {
    fn new(first: Duration, idle: Duration) -> Self {
        Activity {
            first,
            idle,
            state: Mutex::new(ActivityState {
                active: 0,
                since: Instant::now(),
                seen: false,
                watched: None,
            }),
            changed: tokio::sync::Notify::new(),
            unread: Mutex::new(Vec::new()),
        }
    }

    /// When the connection goes idle if no request begins before then.
    fn deadline(&self, s: &ActivityState) -> Instant {
        s.since + if s.seen { self.idle } else { self.first }
    }

    /// Counts a request as active until the returned guard is dropped.
    fn begin(self: &Arc<Self>) -> RequestActive {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.active += 1;
        s.seen = true;
        RequestActive(self.clone())
    }

    /// Resolves once a response has waited `limit` for hyper to take its next frame, which
    /// hyper does only as the client reads. Cancel safe.
    async fn stalled(&self, limit: Duration) {
        let every = (limit / 4).max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(every).await;
            let mut unread = self.unread.lock().unwrap_or_else(|p| p.into_inner());
            unread.retain(|w| w.strong_count() > 0);
            let stalled = unread.iter().filter_map(|w| w.upgrade()).any(|handed| {
                let since = *handed.lock().unwrap_or_else(|p| p.into_inner());
                since.is_some_and(|t| t.elapsed() >= limit)
            });
            if stalled {
                return;
            }
        }
    }

    /// Resolves once the connection has had no request in flight for `idle` (or, before its
    /// first request, for `first`). Cancel safe.
    async fn idle(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let deadline = {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                s.watched = (s.active == 0).then(|| self.deadline(&s));
                s.watched
            };
            match deadline {
                Some(d) if d <= Instant::now() => return,
                Some(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(d) => {}
                        _ = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// Marks a request as in flight on its connection until dropped.
struct RequestActive(Arc<Activity>);

impl RequestActive {
    /// `body`, watched for a client that stops taking it (see [`Activity::stalled`]); the
    /// request stays active until it is dropped.
    fn watch(self, body: relay::HttpBody) -> relay::HttpBody {
        let handed = Arc::new(Mutex::new(None));
        self.0
            .unread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&handed));
        http_body_util::combinators::BoxBody::new(Watched {
            body,
            handed,
            _active: self,
        })
    }
}

/// A response body that records when it handed out a frame and when it was asked again.
struct Watched {
    body: relay::HttpBody,
    handed: Arc<Mutex<Option<Instant>>>,
    /// Held for its `Drop`.
    _active: RequestActive,
}

impl http_body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = relay::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, relay::BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let handed_out = matches!(polled, Poll::Ready(Some(Ok(_))));
        *self.handed.lock().unwrap_or_else(|p| p.into_inner()) = handed_out.then(Instant::now);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for RequestActive {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        s.active -= 1;
        s.since = Instant::now();
        // The watchdog finds a later deadline by itself when it wakes at the one it has.
        let sooner = s.watched.is_none_or(|at| self.0.deadline(&s) < at);
        let wake = s.active == 0 && sooner;
        drop(s);
        if wake {
            self.0.changed.notify_waiters();
        }
    }
}

/// A socket whose writes fail with `TimedOut` once one has waited `limit` for the peer to
/// read: a client that stops reading its response cannot hold the request open forever.
struct StallIo<T> {
    inner: T,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> StallIo<T> {
    fn new(inner: T, limit: Duration) -> Self {
        StallIo {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Passes a ready result through (and clears the stall timer); on `Pending`, fails once
    /// the stall has lasted `limit`.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        use std::future::Future;
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn connections_per_client_are_capped_and_released() {
        let per = PerClient::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| per.admit(a, 3).unwrap()).collect();
        assert!(per.admit(a, 3).is_none());
        assert!(per.admit(b, 3).is_some());
        drop(held);
        assert!(per.admit(a, 3).is_some());
        assert!(
            per.0.lock().unwrap().get(&a).is_some_and(|n| *n == 0)
                || per.0.lock().unwrap().get(&a).is_none()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_after_its_last_request() {
        let (first, idle) = (Duration::from_secs(10), Duration::from_secs(60));
        let activity = Arc::new(Activity::new(first, idle));
        // Before any request: the first-request deadline.
        let start = Instant::now();
        activity.idle().await;
        assert_eq!(start.elapsed(), first);
        // A request in flight is never idle, however long it takes.
        let request = activity.begin();
        let waiter = {
            let a = activity.clone();
            tokio::spawn(async move { a.idle().await })
        };
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!waiter.is_finished());
        let ended = Instant::now();
        drop(request);
        waiter.await.unwrap();
        assert_eq!(ended.elapsed(), idle);
    }

    /// The watchdog, spawned, with a count of its polls.
    fn watched(activity: &Arc<Activity>) -> (tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
        let polls = Arc::new(AtomicUsize::new(0));
        let (a, p) = (activity.clone(), polls.clone());
        let handle = tokio::spawn(async move {
            let idle = a.idle();
            tokio::pin!(idle);
            std::future::poll_fn(|cx| {
                p.fetch_add(1, Ordering::Relaxed);
                idle.as_mut().poll(cx)
            })
            .await
        });
        (handle, polls)
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_does_not_wake_its_watchdog_on_every_request() {
        let idle = Duration::from_secs(60);
        let activity = Arc::new(Activity::new(Duration::from_secs(10), idle));
        drop(activity.begin());
        let (watchdog, polls) = watched(&activity);
        tokio::task::yield_now().await;
        for _ in 0..1000 {
            let request = activity.begin();
            tokio::task::yield_now().await;
            drop(request);
            tokio::task::yield_now().await;
        }
        let polled = polls.load(Ordering::Relaxed);
        assert!(
            polled <= 2,
            "the watchdog was polled {polled} times for 1000 requests"
        );
        // It still finds the connection idle exactly `idle` after the last request.
        let ended = Instant::now();
        watchdog.await.unwrap();
        assert_eq!(ended.elapsed(), idle);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_shorter_than_the_first_request_timeout_holds() {
        let (first, idle) = (Duration::from_secs(60), Duration::from_secs(1));
        let activity = Arc::new(Activity::new(first, idle));
        let (watchdog, _) = watched(&activity);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!watchdog.is_finished());
        // The watchdog sleeps until the first-request deadline; the request's end brings the
        // deadline forward, and wakes it.
        drop(activity.begin());
        let ended = Instant::now();
        watchdog.await.unwrap();
        assert_eq!(ended.elapsed(), idle);
    }
}
