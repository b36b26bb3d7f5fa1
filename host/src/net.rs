//! Socket helpers shared by every listener.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Pause after a failed accept.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// The next connection on `listener`, or `None` once `shutdown` is cancelled. A failed accept
/// (out of file descriptors, most likely) is logged, naming `what` the listener serves, and
/// followed by a short pause rather than a spin.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => return None,
        };
        match accepted {
            Ok(a) => return Some(a),
            Err(e) => {
                warn!(cause = %e, "failed to accept a {what} connection");
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
        }
    }
}
