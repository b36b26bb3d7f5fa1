//! TCP sessions carried in a WebSocket: how `sluice access tcp` reaches a `tcp://` origin
//! through the edge's HTTPS listener.
//!
//! WebSocket rather than HTTP/2 extended CONNECT (RFC 8441) because it works over HTTP/1.1,
//! through every proxy and load balancer that passes WebSockets (a TLS-terminating proxy in
//! front of the edge, a corporate proxy), the edge already relays WebSocket upgrades like any
//! request, and the request passes ingress rules and `on-request` plugins unchanged. Extended
//! CONNECT needs HTTP/2 end to end and support in every hop, which is rarer.
//!
//! The bytes travel as binary messages. WebSocket has no half-close, so one is added: an
//! **empty binary message** ends the sender's direction (as a TCP FIN), and the other
//! direction goes on until it ends too; then the side that ends last sends a Close frame. The
//! sub-protocol [`SUBPROTOCOL`] names this convention.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The WebSocket sub-protocol of a sluice TCP session.
pub const SUBPROTOCOL: &str = "sluice-tcp.v1";

/// Largest message or frame accepted: what a peer can make us hold per session. Ours are at
/// most [`READ_CHUNK`] bytes.
const MAX_MESSAGE: usize = 256 * 1024;

/// Bytes read from the TCP side at once (one message).
const READ_CHUNK: usize = 64 * 1024;

/// The WebSocket limits of a session.
pub fn config() -> WebSocketConfig {
    WebSocketConfig {
        max_message_size: Some(MAX_MESSAGE),
        max_frame_size: Some(MAX_MESSAGE),
        ..Default::default()
    }
}

/// The `Sec-WebSocket-Accept` answer to a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key)
}

/// Relays a TCP-like byte stream `io` and a WebSocket both ways, half-closes included, until
/// both directions ended, or no data moved for `idle` (`TimedOut`). With `ping`, a WebSocket
/// ping goes out at that interval while `io` has sent nothing, so that proxies and the edge,
/// which close connections idle for their own timeouts, see a quiet session as alive (pings
/// do not count as data for `idle`). `sent` counts bytes from `io` onto the WebSocket.
pub async fn bridge<S, T>(
    ws: WebSocketStream<S>,
    io: T,
    idle: Duration,
    ping: Option<Duration>,
) -> crate::relay::Relayed
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let (mut reader, mut writer) = tokio::io::split(io);
    let (received, sent) = (AtomicU64::new(0), AtomicU64::new(0));
    let moved = || received.load(Ordering::Relaxed) + sent.load(Ordering::Relaxed);

    let inbound = async {
        while let Some(msg) = stream.next().await {
            match msg.map_err(ws_error)? {
                Message::Binary(data) if data.is_empty() => break,
                Message::Binary(data) => {
                    writer.write_all(&data).await?;
                    // A no-op on sockets; standard output holds bytes until flushed.
                    writer.flush().await?;
                    received.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Message::Close(_) => break,
                // Pings are answered by the library; text has no meaning here.
                _ => {}
            }
        }
        writer.shutdown().await
    };
    let outbound = async {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut ticks = ping.map(|every| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            let tick = async {
                match ticks.as_mut() {
                    Some(t) => t.tick().await,
                    None => std::future::pending().await,
                }
            };
            let n = tokio::select! {
                n = reader.read(&mut buf) => n?,
                _ = tick => {
                    sink.send(Message::Ping(Vec::new())).await.map_err(ws_error)?;
                    continue;
                }
            };
            if n == 0 {
                // Our half-close: an empty binary message.
                sink.send(Message::Binary(Vec::new()))
                    .await
                    .map_err(ws_error)?;
                return Ok::<_, std::io::Error>(sink);
            }
            sink.send(Message::Binary(buf[..n].to_vec()))
                .await
                .map_err(ws_error)?;
            sent.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(t) = ticks.as_mut() {
                t.reset();
            }
        }
    };
    let quiet = crate::relay::quiet(idle, moved);
    let both = async {
        let ((), mut sink) = tokio::try_join!(inbound, outbound)?;
        let _ = sink.send(Message::Close(None)).await;
        let _ = sink.close().await;
        Ok::<_, std::io::Error>(())
    };
    let result = tokio::select! {
        r = both => r,
        () = quiet => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no data either way for {idle:?}"),
        )),
    };
    crate::relay::Relayed {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        result,
    }
}

fn ws_error(e: tokio_tungstenite::tungstenite::Error) -> std::io::Error {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Io(io) => io,
        Error::ConnectionClosed | Error::AlreadyClosed => {
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "the WebSocket closed")
        }
        other => std::io::Error::other(other),
    }
}
