//! HTTP/1.1 origin connections driven by the task of the request that uses them.
//!
//! A keep-alive client that spawns a task per connection (hyper-util's) makes every request
//! cross one more task each way: the request's task hands the head to the connection's task,
//! which writes it, reads the answer and wakes the request's task again. On a small request
//! those two wake-ups, often across worker threads, cost more than the HTTP/1 work itself.
//!
//! Here the request's task polls the connection itself: while it waits for the response head,
//! and then, through [`Pooled`], each time the response body is read. When the body has ended
//! and the connection is ready for another request, it goes back to the idle list, where
//! nobody polls it; the next request to take it first polls it once to see whether the origin
//! closed it meanwhile. A request that a reused connection could not even send (it was closed
//! before the request was written) goes again on a fresh connection, as hyper-util's client
//! does.
//!
//! HTTP/2 origins and upgrades keep hyper-util's client: an HTTP/2 connection is shared by
//! concurrent requests, so it needs a task of its own, and an upgraded connection outlives
//! its request.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};

use super::connect::{OriginConnector, OriginIo};
use crate::relay::{BoxError, HttpBody};

/// Boxed: a connection (with its TLS state) is large, and it moves between the idle list,
/// the request and the response body on every request.
type Conn = Box<Connection<MaybeHttpsStream<OriginIo>, HttpBody>>;

/// How long a connection must have been idle before a request on it is worth a copy for
/// going again: an origin closes an idle connection after its keep-alive timeout, seconds
/// at least; one in steady use is never idle that long.
const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(100);

/// Why a request did not get a response head.
#[derive(Debug)]
pub(super) enum SendError {
    /// No connection could be made (nothing of the request went out).
    Connect(BoxError),
    /// The exchange on an established connection failed.
    Request(hyper::Error),
}

/// The idle keep-alive connections of one HTTP/1.1 origin, and how to make more.
pub(super) struct Pool {
    connector: HttpsConnector<OriginConnector>,
    idle: Mutex<VecDeque<Idle>>,
    /// Scheme and authority of the origin: where connections go, and the `host` of a request
    /// that has none.
    scheme: &'static str,
    authority: String,
    max_idle: usize,
    idle_timeout: Duration,
    /// Whether the sweeping task runs.
    sweeping: AtomicBool,
}

/// A connection waiting for its next request.
struct Idle {
    sender: SendRequest<HttpBody>,
    conn: Conn,
    since: Instant,
}

impl Pool {
    /// A pool making connections to `scheme://authority` with `connector`, keeping at most
    /// `max_idle` idle ones for at most `idle_timeout` each.
    pub(super) fn new(
        connector: HttpsConnector<OriginConnector>,
        (scheme, authority): (&'static str, String),
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            connector,
            scheme,
            authority,
            idle: Mutex::new(VecDeque::new()),
            max_idle,
            idle_timeout,
            sweeping: AtomicBool::new(false),
        })
    }

    /// Sends `req` (its URI: path and query) on an idle connection or a new one, and waits for
    /// the response head. The returned body drives the connection until it has been read.
    pub(super) async fn send(
        self: &Arc<Self>,
        req: Request<HttpBody>,
    ) -> Result<Response<HttpBody>, SendError> {
        let (mut parts, body) = req.into_parts();
        if !parts.headers.contains_key(http::header::HOST) {
            if let Ok(host) = http::HeaderValue::from_str(&self.authority) {
                parts.headers.insert(http::header::HOST, host);
            }
        }
        // Origin form on the wire, whatever the caller gave.
        if parts.uri.scheme().is_some() || parts.uri.path_and_query().is_none() {
            parts.uri = match parts.uri.path_and_query() {
                Some(p) => http::Uri::from(p.clone()),
                None => http::Uri::from_static("/"),
            };
        }
        // A request that changes nothing and has no body may go again when a reused
        // connection turns out to have been closed by the origin as the request went out
        // (its keep-alive timeout raced the request): nothing was answered, and the origin
        // could not have acted on it twice.
        let replayable = matches!(
            parts.method,
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        ) && body.is_end_stream();
        // A body still being sent when the answer's head arrives must go on without waiting
        // for someone to read the answer: see `Pooled`.
        let (body, sent) = match body.is_end_stream() {
            true => (body, None),
            false => {
                let sent = Arc::new(AtomicBool::new(false));
                let body = HttpBody::new(Tracked {
                    body,
                    sent: sent.clone(),
                });
                (body, Some(sent))
            }
        };
        let mut req = Request::from_parts(parts, body);
        let mut replayed = false;
        loop {
            let idle = match replayed {
                // Once a connection failed that way, the copy goes on a new one.
                true => None,
                false => self.checkout(),
            };
            let (sender, conn, idle_for) = match idle {
                Some((idle, idle_for)) => (idle.sender, idle.conn, Some(idle_for)),
                None => {
                    // Boxed: a new connection's setup (TCP, TLS, handshake) is most of
                    // this future's size, and every request's task would carry it whether it
                    // connects or, as most do, reuses an idle connection.
                    let (sender, conn) = Box::pin(self.connect()).await?;
                    (sender, conn, None)
                }
            };
            let reused = idle_for.is_some();
            let again =
                (replayable && !replayed && idle_for.is_some_and(|d| d >= REPLAY_AFTER_IDLE))
                    .then(|| bodiless_copy(&req));
            match exchange(sender, conn, req).await {
                Ok((resp, conn)) => return Ok(self.answer(resp, conn, sent.as_deref())),
                Err(mut e) => match (e.take_message(), again) {
                    // Closed before the request was written: nothing reached the origin.
                    (Some(unsent), _) if reused => req = unsent,
                    (_, Some(copy)) if closed_unanswered(e.error()) => {
                        req = copy;
                        replayed = true;
                    }
                    _ => return Err(SendError::Request(e.into_error())),
                },
            }
        }
    }

    /// The response, whose body drives `conn` while it is read. If the request's body was
    /// still being sent, the connection gets a task of its own instead (it is not reused): the
    /// body must keep going while the answer waits for its reader, as an origin may stream
    /// its answer while it reads the body.
    fn answer(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        conn: Option<(SendRequest<HttpBody>, Conn)>,
        sent: Option<&AtomicBool>,
    ) -> Response<HttpBody> {
        let (parts, body) = resp.into_parts();
        if sent.is_some_and(|s| !s.load(Ordering::Acquire)) {
            if let Some((_, conn)) = conn {
                finish(conn);
            }
            let body = http_body_util::BodyExt::map_err(body, |e| -> BoxError { Box::new(e) });
            return Response::from_parts(parts, HttpBody::new(body));
        }
        let mut pooled = Pooled {
            body,
            conn,
            pool: self.clone(),
        };
        if pooled.body.is_end_stream() {
            pooled.release();
        }
        Response::from_parts(parts, HttpBody::new(pooled))
    }

    async fn connect(&self) -> Result<(SendRequest<HttpBody>, Conn), SendError> {
        use tower_service::Service;
        let uri: http::Uri = format!("{}://{}/", self.scheme, self.authority)
            .parse()
            .map_err(|e| SendError::Connect(Box::new(e)))?;
        let io = self
            .connector
            .clone()
            .call(uri)
            .await
            .map_err(SendError::Connect)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| SendError::Connect(Box::new(e)))?;
        Ok((sender, Box::new(conn)))
    }

    /// The most recently used idle connection that is still open, if any, and how long it
    /// was idle.
    fn checkout(&self) -> Option<(Idle, Duration)> {
        loop {
            // Checked outside the lock: a check polls the connection (a read, TLS).
            let mut c = self
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_back()?;
            let idle_for = c.since.elapsed();
            if idle_for < self.idle_timeout && still_open(&mut c.sender, &mut c.conn) {
                return Some((c, idle_for));
            }
        }
    }

    /// Drops the idle connections that expired or that their origin closed.
    fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let timeout = self.idle_timeout;
        idle.retain_mut(|c| c.since.elapsed() < timeout && still_open(&mut c.sender, &mut c.conn));
    }

    /// Sweeps the idle list now and then while the pool lives (started by its first idle
    /// connection, on the runtime that uses it): nothing else polls an idle connection, so
    /// one the origin closed would hold its socket until the next request.
    fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::downgrade(self);
        let every = (self.idle_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match pool.upgrade() {
                    Some(pool) => pool.sweep(),
                    None => return,
                }
            }
        });
    }

    fn checkin(self: &Arc<Self>, sender: SendRequest<HttpBody>, conn: Conn) {
        if self.max_idle == 0 {
            return;
        }
        self.start_sweeping();
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Oldest first: the expired ones, then any beyond the limit.
        while idle
            .front()
            .is_some_and(|c| now.duration_since(c.since) >= self.idle_timeout)
            || idle.len() >= self.max_idle
        {
            idle.pop_front();
        }
        idle.push_back(Idle {
            sender,
            conn,
            since: now,
        });
    }
}

/// A copy of a request without a body (its head only).
fn bodiless_copy(req: &Request<HttpBody>) -> Request<HttpBody> {
    let mut copy = Request::new(crate::relay::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// The connection closed (or was reset) before any byte of an answer.
fn closed_unanswered(e: &hyper::Error) -> bool {
    use std::error::Error;
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            );
        }
        source = s.source();
    }
    false
}

/// What a connection no request is using can do.
enum State {
    /// Take another request.
    Ready,
    /// Nothing more: still busy with the last exchange (a request body the origin answered
    /// before reading), or told to close.
    Busy,
    /// Nothing: the origin closed it (or sent something unasked).
    Ended,
}

/// Polls a connection no request is using once, without anyone to wake.
fn state(sender: &mut SendRequest<HttpBody>, conn: &mut Conn) -> State {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(conn).poll(&mut cx) {
        Poll::Ready(_) => State::Ended,
        Poll::Pending if sender.is_ready() => State::Ready,
        Poll::Pending => State::Busy,
    }
}

/// Whether an idle connection can take a request.
fn still_open(sender: &mut SendRequest<HttpBody>, conn: &mut Conn) -> bool {
    matches!(state(sender, conn), State::Ready)
}

/// Drives a connection no request will use again to its end on a task of its own (it closes
/// once its last exchange is done).
fn finish(conn: Conn) {
    tokio::spawn(async move {
        let _ = conn.await;
    });
}

/// A request body that says when it has all been read.
struct Tracked {
    body: HttpBody,
    sent: Arc<AtomicBool>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if frame.is_none() || this.body.is_end_stream() {
            this.sent.store(true, Ordering::Release);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Sends `req` on `conn`, polling the connection until the response head arrives. Hands the
/// connection back with the response, unless it has ended, so that reading the body drives it.
async fn exchange(
    mut sender: SendRequest<HttpBody>,
    conn: Conn,
    req: Request<HttpBody>,
) -> Result<
    (Response<Incoming>, Option<(SendRequest<HttpBody>, Conn)>),
    hyper::client::conn::TrySendError<Request<HttpBody>>,
> {
    let mut response = std::pin::pin!(sender.try_send_request(req));
    let mut conn = Some(conn);
    let resp = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = response.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if let Some(c) = conn.as_mut() {
            if Pin::new(c).poll(cx).is_ready() {
                // The connection ended: dropping it hands its error (or "dispatch gone") to
                // the response, if it did not have one already.
                conn = None;
            }
            // The poll may have read the head: take it now rather than after a wake-up.
            return response.as_mut().poll(cx);
        }
        Poll::Pending
    })
    .await?;
    Ok((resp, conn.map(|c| (sender, c))))
}

/// A response body that drives its connection while it is read, and returns the connection
/// to the pool once it has ended.
struct Pooled {
    body: Incoming,
    conn: Option<(SendRequest<HttpBody>, Conn)>,
    pool: Arc<Pool>,
}

impl Pooled {
    /// The body has ended: the connection goes back to the pool if it can take another
    /// request (it may still be sending a request body the origin did not wait for, or have
    /// been told `Connection: close`).
    fn release(&mut self) {
        if let Some((mut sender, mut conn)) = self.conn.take() {
            match state(&mut sender, &mut conn) {
                State::Ready => self.pool.checkin(sender, conn),
                // Still writing what the origin did not wait for: it finishes on its own.
                State::Busy => finish(conn),
                State::Ended => {}
            }
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some((_, conn)) = this.conn.as_mut() {
            if Pin::new(conn).poll(cx).is_ready() {
                // Ended; whatever it still had for the body is in the body's channel.
                this.conn = None;
            }
        }
        match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
            None => {
                this.release();
                Poll::Ready(None)
            }
            Some(Ok(frame)) => {
                // Trailers end a body; a reader may not poll past them.
                if frame.is_trailers() || this.body.is_end_stream() {
                    this.release();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.conn = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
