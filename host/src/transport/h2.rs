//! The sluice protocol over HTTP/2 on TLS 1.3 over TCP, for networks that drop UDP.
//!
//! The connector dials and is the TLS client; on that connection the *edge* is the HTTP/2
//! client and the connector the HTTP/2 server, so that the edge opens every stream (as over
//! QUIC) and nothing on the origin's network listens. Each sluice stream is one HTTP/2
//! request: `POST /control` (the first, opened by the edge right after the handshake) or
//! `POST /stream`. The request body carries what the edge sends, the response body what the
//! connector sends, both exactly the bytes a QUIC stream would carry; the connector's
//! `200` response head goes out with its first bytes. A reset is `RST_STREAM` with the
//! sluice stream code; `END_STREAM` is the FIN.
//!
//! HTTP/2 flow control gives the same back-pressure as QUIC's: a sender waits for window
//! credit ([`SendHalf::write`]), and a receiver returns credit only as the bytes are taken
//! from it.
//!
//! Dropping both halves of a stream before the peer ended its side resets it. On the
//! connector's side, after a complete answer, h2 sends what was queued first and then
//! `RST_STREAM(NO_ERROR)` (RFC 9113 §8.1: a server may answer before the request body ends),
//! which the edge reads as QUIC's `STOP_SENDING`. On the edge's side dropping is giving up (the
//! client left): `RST_STREAM(CANCEL)` at once, queued bytes discarded, so an edge that must
//! deliver what it wrote keeps the stream until the connector is done with it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::coalesce::{self, Open};
use super::{ConnectionError, HandshakeError, RecvStream, SendStream, StreamError};
use crate::wake::Dormant;

/// Path of the control stream.
pub const CONTROL_PATH: &str = "/control";
/// Path of every request stream.
pub const STREAM_PATH: &str = "/stream";

/// Per-stream receive window, as QUIC's.
const STREAM_WINDOW: u32 = 1 << 20;
/// Per-connection receive window, as QUIC's.
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Frames up to 64 KiB: fewer frame headers on bulk transfers.
const MAX_FRAME: u32 = 64 << 10;
/// Largest header block accepted: sluice puts heads in the body, so HTTP/2's own headers are
/// a method and a path.
const MAX_HEADER_LIST: u32 = 16 << 10;
/// How long a closing connection gets to send its GOAWAY.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

type Incoming = (
    http::Request<::h2::RecvStream>,
    ::h2::server::SendResponse<Bytes>,
);

/// One HTTP/2 connection between a connector and an edge; clones share it.
#[derive(Clone)]
pub struct Connection(Arc<Inner>);

struct Inner {
    peer: SocketAddr,
    role: Role,
    state: Arc<State>,
}

enum Role {
    /// The edge's side: it opens streams.
    Edge(::h2::client::SendRequest<Bytes>),
    /// The connector's side: streams the edge opened, in order.
    Connector(tokio::sync::Mutex<mpsc::UnboundedReceiver<Incoming>>),
}

/// What the task driving the connection and the handles share.
struct State {
    /// Why the connection ended, once it has.
    ended: watch::Sender<Option<ConnectionError>>,
    /// Cancelled by [`Connection::close`].
    closing: CancellationToken,
    /// The code and reason [`Connection::close`] was given.
    close: Mutex<Option<(u32, String)>>,
}

impl State {
    fn new() -> Arc<State> {
        Arc::new(State {
            ended: watch::Sender::new(None),
            closing: CancellationToken::new(),
            close: Mutex::new(None),
        })
    }

    fn end(&self, why: String) {
        self.ended.send_if_modified(|ended| {
            ended.is_none() && {
                *ended = Some(ConnectionError::Http2(why.into()));
                true
            }
        });
    }

    fn local_close(&self) -> (u32, String) {
        self.close
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or((0, String::new()))
    }
}

impl Drop for Inner {
    /// As a QUIC connection does, one whose last handle is dropped closes.
    fn drop(&mut self) {
        self.state.closing.cancel();
    }
}

impl Connection {
    pub(super) fn remote_address(&self) -> SocketAddr {
        self.0.peer
    }

    /// The edge opens a stream at `path`.
    pub(super) async fn open_bi(
        &self,
        path: &str,
    ) -> Result<(SendStream, RecvStream), ConnectionError> {
        let Role::Edge(requests) = &self.0.role else {
            return Err(ConnectionError::Http2(
                "only the edge opens streams over HTTP/2".into(),
            ));
        };
        let mut requests = requests.clone().ready().await.map_err(|e| self.lost(e))?;
        let uri = match path {
            CONTROL_PATH => http::Uri::from_static("https://sluice/control"),
            _ => http::Uri::from_static("https://sluice/stream"),
        };
        let request = http::Request::post(uri)
            .body(())
            .expect("a static method and URI");
        let (response, send) = requests
            .send_request(request, false)
            .map_err(|e| self.lost(e))?;
        let open = counted(path);
        Ok((
            SendStream::Http2(SendHalf::new(Sending::Open(send)), open()),
            RecvStream::Http2(RecvHalf::new(Receiving::Waiting(response)), open()),
        ))
    }

    /// The connector takes the next stream the edge opened, which must be at `path`.
    async fn accept_at(&self, path: &str) -> Result<(SendStream, RecvStream), ConnectionError> {
        let Role::Connector(incoming) = &self.0.role else {
            return Err(ConnectionError::Http2(
                "only the connector accepts streams over HTTP/2".into(),
            ));
        };
        let mut incoming = incoming.lock().await;
        loop {
            let Some((request, mut respond)) = incoming.recv().await else {
                return Err(self.ended());
            };
            if request.uri().path() != path {
                respond.send_reset(::h2::Reason::from(crate::proto::code::STREAM_PROTOCOL));
                continue;
            }
            let open = counted(path);
            return Ok((
                SendStream::Http2(SendHalf::new(Sending::Respond(respond)), open()),
                RecvStream::Http2(RecvHalf::new(Receiving::Open(request.into_body())), open()),
            ));
        }
    }

    pub(super) async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        self.accept_at(STREAM_PATH).await
    }

    pub(super) async fn accept_control(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        self.accept_at(CONTROL_PATH).await
    }

    pub(super) fn close(&self, code: u32, reason: &[u8]) {
        let reason = String::from_utf8_lossy(reason).into_owned();
        let mut close = self.0.state.close.lock().unwrap_or_else(|p| p.into_inner());
        close.get_or_insert((code, reason));
        drop(close);
        self.0.state.closing.cancel();
    }

    pub(super) fn close_reason(&self) -> Option<ConnectionError> {
        self.0.state.ended.borrow().clone()
    }

    pub(super) async fn closed(&self) -> ConnectionError {
        let mut ended = self.0.state.ended.subscribe();
        let why = match ended.wait_for(Option::is_some).await {
            Ok(why) => why.clone(),
            Err(_) => None,
        };
        why.unwrap_or_else(|| ConnectionError::Http2("connection dropped".into()))
    }

    fn ended(&self) -> ConnectionError {
        self.close_reason()
            .unwrap_or_else(|| ConnectionError::Http2("connection closed".into()))
    }

    fn lost(&self, e: ::h2::Error) -> ConnectionError {
        self.close_reason()
            .unwrap_or_else(|| ConnectionError::Http2(describe(&e).into()))
    }
}

/// Says why an HTTP/2 connection ended, in the words of the transport.
fn describe(e: &::h2::Error) -> String {
    if e.is_go_away() {
        format!(
            "the peer closed the connection (GOAWAY code {:#x})",
            e.reason().map_or(0, u32::from)
        )
    } else if e.is_io() {
        format!("connection lost: {e}")
    } else {
        format!("HTTP/2 error: {e}")
    }
}

/// How a stream at `path` counts among the process's open streams (see [`coalesce`]).
fn counted(path: &str) -> fn() -> Open {
    if path == CONTROL_PATH {
        Open::control
    } else {
        Open::request
    }
}

/// The edge's side of a connection the connector dialled: TLS is done, the edge now runs the
/// HTTP/2 client.
pub async fn edge<T>(io: T, peer: SocketAddr) -> Result<super::Connection, HandshakeError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (requests, connection) = ::h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake(io)
        .await?;
    let state = State::new();
    let driver = state.clone();
    coalesce::spawn(async move {
        // Polled when it fires only, not for each frame that wakes this task.
        let closing = Dormant::new(driver.closing.cancelled());
        let why = tokio::select! {
            r = connection => match r {
                Ok(()) => "the connector closed the connection".to_string(),
                Err(e) => describe(&e),
            },
            // The HTTP/2 client cannot send a GOAWAY of its own: dropping the connection
            // closes the socket.
            () = closing => {
                let (code, reason) = driver.local_close();
                format!("closed by the edge (code {code:#x}): {reason}")
            }
        };
        driver.end(why);
    });
    Ok(super::Connection::Http2(Connection(Arc::new(Inner {
        peer,
        role: Role::Edge(requests),
        state,
    }))))
}

/// The connector's side of a connection it dialled: TLS is done, the connector now runs the
/// HTTP/2 server.
pub async fn connector<T>(io: T, peer: SocketAddr) -> Result<super::Connection, HandshakeError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = ::h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(crate::tls::MAX_REQUEST_STREAMS)
        .handshake::<T, Bytes>(io)
        .await?;
    let state = State::new();
    let driver = state.clone();
    let (streams, incoming) = mpsc::unbounded_channel();
    coalesce::spawn(async move {
        // Kept across turns and polled when it fires only, not for each frame that wakes
        // this task.
        let mut closing = Dormant::new(driver.closing.cancelled());
        // Unbounded, yet bounded by the stream limit this side advertised.
        let why = loop {
            tokio::select! {
                next = connection.accept() => match next {
                    Some(Ok(stream)) => {
                        // Nobody accepting any more: the stream is dropped and reset.
                        let _ = streams.send(stream);
                    }
                    Some(Err(e)) => break describe(&e),
                    None => break "the edge closed the connection".to_string(),
                },
                () = &mut closing => {
                    let (code, reason) = driver.local_close();
                    connection.abrupt_shutdown(::h2::Reason::from(code));
                    let flushed = std::future::poll_fn(|cx| connection.poll_closed(cx));
                    let _ = tokio::time::timeout(CLOSE_FLUSH, flushed).await;
                    break format!("closed by the connector (code {code:#x}): {reason}");
                }
            }
        };
        driver.end(why);
    });
    Ok(super::Connection::Http2(Connection(Arc::new(Inner {
        peer,
        role: Role::Connector(tokio::sync::Mutex::new(incoming)),
        state,
    }))))
}

/// The sending half of an HTTP/2 sluice stream.
pub struct SendHalf {
    state: Sending,
    /// `END_STREAM` was sent.
    finished: bool,
    /// `RST_STREAM` was sent.
    reset: bool,
}

enum Sending {
    /// The connector's side before its first byte: the response head is not sent yet.
    Respond(::h2::server::SendResponse<Bytes>),
    Open(::h2::SendStream<Bytes>),
}

impl SendHalf {
    fn new(state: Sending) -> SendHalf {
        SendHalf {
            state,
            finished: false,
            reset: false,
        }
    }

    /// The stream, sending the connector's response head first if it is not sent yet.
    fn open(&mut self, end: bool) -> Result<&mut ::h2::SendStream<Bytes>, StreamError> {
        if self.finished || self.reset {
            return Err(StreamError::Closed);
        }
        if let Sending::Respond(respond) = &mut self.state {
            let head = http::Response::new(());
            let stream = respond.send_response(head, end).map_err(stream_error)?;
            self.state = Sending::Open(stream);
            if end {
                self.finished = true;
            }
        }
        match &mut self.state {
            Sending::Open(stream) => Ok(stream),
            Sending::Respond(_) => unreachable!("replaced above"),
        }
    }

    /// Sends all of `data` as window credit allows.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<Result<(), StreamError>> {
        let stream = self.open(false)?;
        while !data.is_empty() {
            stream.reserve_capacity(data.len());
            match ready!(stream.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let chunk = data.split_to(n.min(data.len()));
                    stream.send_data(chunk, false).map_err(stream_error)?;
                }
                Some(Err(e)) => return Poll::Ready(Err(stream_error(e))),
                None => return Poll::Ready(Err(gone(stream, cx))),
            }
        }
        Poll::Ready(Ok(()))
    }

    pub(super) async fn write(&mut self, mut data: Bytes) -> Result<(), StreamError> {
        std::future::poll_fn(|cx| self.poll_send(cx, &mut data)).await
    }

    pub(super) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<Result<usize, StreamError>> {
        let stream = self.open(false)?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            stream.reserve_capacity(buf.len());
            match ready!(stream.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    stream
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(stream_error)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(stream_error(e))),
                None => return Poll::Ready(Err(gone(stream, cx))),
            }
        }
    }

    pub(super) fn finish(&mut self) -> Result<(), StreamError> {
        let already = matches!(self.state, Sending::Respond(_));
        let stream = self.open(true)?;
        if !already {
            stream.send_data(Bytes::new(), true).map_err(stream_error)?;
        }
        self.finished = true;
        Ok(())
    }

    pub(super) fn reset(&mut self, code: u32) -> Result<(), StreamError> {
        if self.reset {
            return Err(StreamError::Closed);
        }
        self.reset = true;
        let reason = ::h2::Reason::from(code);
        match &mut self.state {
            Sending::Respond(respond) => respond.send_reset(reason),
            Sending::Open(stream) => stream.send_reset(reason),
        }
        Ok(())
    }

    pub(super) fn poll_stopped(&mut self, cx: &mut Context<'_>) -> Poll<Result<u32, StreamError>> {
        let polled = match &mut self.state {
            Sending::Respond(respond) => respond.poll_reset(cx),
            Sending::Open(stream) => stream.poll_reset(cx),
        };
        Poll::Ready(ready!(polled).map(u32::from).map_err(stream_error))
    }
}

impl Drop for SendHalf {
    /// As a QUIC send stream does, one dropped without finish or reset finishes.
    fn drop(&mut self) {
        if !self.finished && !self.reset {
            let _ = self.finish();
        }
    }
}

/// What a stream whose capacity can no longer grow ended with.
fn gone(stream: &mut ::h2::SendStream<Bytes>, cx: &mut Context<'_>) -> StreamError {
    match stream.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => StreamError::Reset(reason.into()),
        Poll::Ready(Err(e)) => stream_error(e),
        Poll::Pending => StreamError::Closed,
    }
}

/// A stream-level failure: a reset keeps its code.
fn stream_error(e: ::h2::Error) -> StreamError {
    match e.reason() {
        Some(reason) if e.is_reset() => StreamError::Reset(reason.into()),
        _ => StreamError::Connection(ConnectionError::Http2(describe(&e).into())),
    }
}

/// The receiving half of an HTTP/2 sluice stream.
pub struct RecvHalf {
    state: Receiving,
    /// What is left of the last chunk read.
    rest: Bytes,
}

enum Receiving {
    /// The edge's side before the connector's response head.
    Waiting(::h2::client::ResponseFuture),
    Open(::h2::RecvStream),
    /// The stream ended cleanly.
    Ended,
    /// Failed or stopped: reading again is an error.
    Closed,
}

impl RecvHalf {
    fn new(state: Receiving) -> RecvHalf {
        RecvHalf {
            state,
            rest: Bytes::new(),
        }
    }

    pub(super) fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<Result<Option<Bytes>, StreamError>> {
        if !self.rest.is_empty() {
            let n = max.min(self.rest.len());
            return Poll::Ready(Ok(Some(self.rest.split_to(n))));
        }
        loop {
            match &mut self.state {
                Receiving::Waiting(response) => {
                    let polled = ready!(Pin::new(response).poll(cx));
                    match polled {
                        Ok(response) if response.status() == http::StatusCode::OK => {
                            self.state = Receiving::Open(response.into_body());
                        }
                        Ok(response) => {
                            self.state = Receiving::Closed;
                            return Poll::Ready(Err(ConnectionError::Http2(
                                format!("the peer answered a stream with {}", response.status())
                                    .into(),
                            )
                            .into()));
                        }
                        Err(e) => {
                            self.state = Receiving::Closed;
                            return Poll::Ready(Err(stream_error(e)));
                        }
                    }
                }
                Receiving::Open(body) => match ready!(body.poll_data(cx)) {
                    Some(Ok(mut data)) => {
                        // The credit goes back as the bytes leave: a reader that stops
                        // reading stops the sender.
                        let _ = body.flow_control().release_capacity(data.len());
                        if data.is_empty() {
                            continue;
                        }
                        if data.len() > max {
                            self.rest = data.split_off(max);
                        }
                        return Poll::Ready(Ok(Some(data)));
                    }
                    Some(Err(e)) => {
                        self.state = Receiving::Closed;
                        return Poll::Ready(Err(stream_error(e)));
                    }
                    None => {
                        self.state = Receiving::Ended;
                        return Poll::Ready(Ok(None));
                    }
                },
                Receiving::Ended => return Poll::Ready(Ok(None)),
                Receiving::Closed => return Poll::Ready(Err(StreamError::Closed)),
            }
        }
    }

    pub(super) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        match ready!(self.poll_chunk(cx, buf.remaining())) {
            Ok(Some(chunk)) => buf.put_slice(&chunk),
            Ok(None) => {}
            Err(e) => return Poll::Ready(Err(e.into())),
        }
        Poll::Ready(Ok(()))
    }

    /// Stops reading: what else arrives is read and discarded in a task of its own, so that
    /// the peer's writer is not stalled on a window nobody returns (h2 gives a dropped
    /// stream's credit back to the connection only, not to the stream), for at most
    /// [`DISCARD_LIMIT`].
    pub(super) fn stop(&mut self) {
        self.rest = Bytes::new();
        let state = std::mem::replace(&mut self.state, Receiving::Closed);
        let (Receiving::Open(mut body), Ok(runtime)) =
            (state, tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(async move {
            let discard = async {
                while let Some(Ok(data)) = std::future::poll_fn(|cx| body.poll_data(cx)).await {
                    let _ = body.flow_control().release_capacity(data.len());
                }
            };
            let _ = tokio::time::timeout(DISCARD_LIMIT, discard).await;
        });
    }
}

/// How long a stopped stream's remaining bytes are read and discarded.
const DISCARD_LIMIT: Duration = Duration::from_secs(30);

/// The connector dials an edge's TCP listener: TCP, TLS 1.3 with the sluice HTTP/2 ALPN,
/// then the HTTP/2 server side.
pub async fn dial(
    addr: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<super::Connection, HandshakeError> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|_| HandshakeError::Tls(format!("invalid server name {server_name:?}")))?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    configure(&tcp);
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| HandshakeError::Tls(e.to_string()))?;
    check_alpn(stream.get_ref().1.alpn_protocol())?;
    connector(stream, addr).await
}

/// The edge accepts a connector's TCP connection: TLS 1.3 with the sluice HTTP/2 ALPN, then
/// the HTTP/2 client side.
pub async fn accept(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
) -> Result<super::Connection, HandshakeError> {
    configure(&tcp);
    accept_on(tcp, peer, tls).await
}

/// [`accept`] on a connection already configured ([`configure`]).
pub(super) async fn accept_on<T>(
    tcp: T,
    peer: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
) -> Result<super::Connection, HandshakeError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stream = tls
        .accept(tcp)
        .await
        .map_err(|e| HandshakeError::Tls(e.to_string()))?;
    check_alpn(stream.get_ref().1.alpn_protocol())?;
    edge(stream, peer).await
}

/// A peer that offered no ALPN at all passes rustls' own check: refused here.
fn check_alpn(alpn: Option<&[u8]>) -> Result<(), HandshakeError> {
    match alpn {
        Some(p) if p == crate::proto::ALPN_TCP => Ok(()),
        other => {
            Err(HandshakeError::Alpn(other.map_or("none".into(), |p| {
                String::from_utf8_lossy(p).into_owned()
            })))
        }
    }
}

/// No Nagle delay (a request head must not wait for an acknowledgement), and keep-alive
/// probes so that a silently dead peer is noticed.
pub(super) fn configure(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(5));
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}
