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
use std::sync::Arc;
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
    let mut c = WebSocketConfig::default();
    c.max_message_size = Some(MAX_MESSAGE);
    c.max_frame_size = Some(MAX_MESSAGE);
    c
}

/// The `Sec-WebSocket-Accept` answer to a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key)
}

/// Relays a TCP-like byte stream `io` and a WebSocket both ways, half-closes included, until
/// both directions ended, or nothing moved for `idle` (`TimedOut`). Returns (bytes from the
/// WebSocket written to `io`, bytes from `io` sent on the WebSocket).
pub async fn bridge<S, T>(
    ws: WebSocketStream<S>,
    io: T,
    idle: Duration,
) -> std::io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let moved = Arc::new(AtomicU64::new(0));
    let (mut sink, mut stream) = ws.split();
    let (mut reader, mut writer) = tokio::io::split(io);
    let (into_io, out_of_io) = (AtomicU64::new(0), AtomicU64::new(0));

    let inbound = async {
        while let Some(msg) = stream.next().await {
            match msg.map_err(ws_error)? {
                Message::Binary(data) if data.is_empty() => break,
                Message::Binary(data) => {
                    writer.write_all(&data).await?;
                    // A no-op on sockets; standard output holds bytes until flushed.
                    writer.flush().await?;
                    into_io.fetch_add(data.len() as u64, Ordering::Relaxed);
                    moved.fetch_add(data.len() as u64, Ordering::Relaxed);
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
        loop {
            let n = reader.read(&mut buf).await?;
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
            out_of_io.fetch_add(n as u64, Ordering::Relaxed);
            moved.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
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
    let both = async {
        let ((), mut sink) = tokio::try_join!(inbound, outbound)?;
        let _ = sink.send(Message::Close(None)).await;
        let _ = sink.close().await;
        Ok::<_, std::io::Error>(())
    };
    tokio::select! {
        r = both => r?,
        () = quiet => return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the session was idle for {idle:?}"),
        )),
    }
    Ok((into_io.into_inner(), out_of_io.into_inner()))
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
