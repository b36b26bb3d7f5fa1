//! Accepting connector connections: the QUIC handshake, registration and the control stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn, Instrument};

use super::registry::{AddError, ConnEntry, Registrant, Registry};
use super::EdgeShared;
use crate::proto::{
    self, io::read_frame, io::write_frame, Control, HeadCodec, RejectCode, Rejected,
};
use crate::secret::Secret;
use crate::transport::{Connection, ConnectionError, HandshakeError, RecvStream, SendStream};

/// Why a connection was not registered.
#[derive(Debug, thiserror::Error)]
enum RegisterError {
    #[error("connection failed: {0}")]
    Connection(#[from] ConnectionError),
    #[error("no control stream within the registration timeout")]
    Timeout,
    #[error("bad control stream: {0}")]
    Frame(#[from] proto::io::FrameIoError),
    #[error("{}", .0.message)]
    Rejected(Rejected),
    /// A connectivity check that passed: answered, never routed.
    #[error("connectivity check")]
    Probe,
}

/// Serves one incoming connector connection, over either transport, until it closes: the
/// handshake (`incoming`), registration, then the control stream. Never panics on peer
/// input. `handshake` is held until the connection is registered or refused.
pub(super) async fn serve(
    incoming: impl std::future::Future<Output = Result<Connection, HandshakeError>>,
    peer: SocketAddr,
    shared: Arc<EdgeShared>,
    handshake: tokio::sync::OwnedSemaphorePermit,
) {
    let failed = |kind: &'static str| {
        shared
            .metrics
            .registration_failures
            .get_or_create(&crate::admin::metrics::KindLabels { kind })
            .inc();
    };
    // The handshake and the registration together get `register-timeout`.
    let deadline = tokio::time::Instant::now() + shared.config.register_timeout;
    let conn = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            failed("handshake");
            warn!(%peer, cause = %e, "connector handshake failed (wrong ALPN, certificate or protocol); connection closed");
            return;
        }
        Err(_) => {
            failed("timeout");
            debug!(%peer, "connector handshake timed out");
            return;
        }
    };
    let registered = tokio::time::timeout_at(deadline, register(&conn, peer, &shared)).await;
    let (tunnel, entry, control_send, mut control) = match registered {
        Ok(Ok(r)) => r,
        Ok(Err(RegisterError::Probe)) => return,
        Ok(Err(RegisterError::Rejected(rej))) => {
            failed(match rej.code {
                RejectCode::Unauthorized => "unauthorized",
                RejectCode::UnsupportedVersion => "version",
                _ => "bad-request",
            });
            // Already logged and answered by `register`.
            debug!(%peer, code = ?rej.code, "registration refused");
            return;
        }
        Ok(Err(e)) => {
            failed("protocol");
            warn!(%peer, cause = %e, "closing connector connection: registration failed");
            conn.close(proto::code::CLOSE_PROTOCOL, b"registration failed");
            return;
        }
        Err(_) => {
            failed("timeout");
            warn!(%peer, cause = %RegisterError::Timeout, "closing connector connection: registration failed");
            conn.close(proto::code::CLOSE_PROTOCOL, b"registration timeout");
            return;
        }
    };

    drop(handshake);

    // Control loop: Drain and future messages, until the stream or connection ends.
    let mut control_send = Some(control_send);
    let reason = loop {
        match read_frame::<_, Control>(&mut control).await {
            Ok(Control::Drain) => {
                info!(tunnel = %tunnel, connection = entry.id, connector = %entry.connector_id, "connector is draining: no new requests go to this connection");
                shared.registry.drain(&entry);
                if let Some(send) = control_send.take() {
                    tokio::spawn(acknowledge_drain(entry.clone(), send).in_current_span());
                }
            }
            Ok(Control::Digest(d)) => {
                let digest = printable(&d.digest);
                if entry.digest().as_ref() != Some(&digest) {
                    info!(tunnel = %tunnel, connection = entry.id, connector = ?entry.connector_id, digest = ?digest, "connector reloaded its ingress rules");
                    entry.set_digest(digest);
                    shared.replicas_changed(&tunnel);
                }
            }
            Ok(Control::Unknown) => {
                debug!(connection = entry.id, "ignored an unknown control message")
            }
            Ok(other) => {
                warn!(tunnel = %tunnel, connection = entry.id, message = ?other, "closing connector connection: unexpected control message");
                conn.close(proto::code::CLOSE_PROTOCOL, b"unexpected control message");
                break "protocol error".to_string();
            }
            Err(proto::io::FrameIoError::Closed) => {
                // The connector finished its control stream; keep serving until it closes.
                break conn.closed().await.to_string();
            }
            Err(e) => {
                if conn.close_reason().is_none() {
                    warn!(tunnel = %tunnel, connection = entry.id, cause = %e, "closing connector connection: bad control stream");
                    conn.close(proto::code::CLOSE_PROTOCOL, b"bad control frame");
                }
                break conn.closed().await.to_string();
            }
        }
    };
    shared.registry.remove(&tunnel, entry.id);
    connections(&shared, &tunnel, entry.protocol()).dec();
    shared.replicas_changed(&tunnel);
    info!(tunnel = %tunnel, connection = entry.id, connector = %entry.connector_id, %reason, "connector connection closed");
}

/// After a connectivity check: the checker closes the connection once it has read the answer;
/// one that does not is closed after a moment (within the registration timeout).
async fn finish_probe(conn: &Connection) {
    if tokio::time::timeout(Duration::from_secs(2), conn.closed())
        .await
        .is_err()
    {
        conn.close(proto::code::CLOSE_NORMAL, b"connectivity check done");
    }
}

/// Once every request routed to a draining connection has been relayed whole, tells the
/// connector it may close the connection.
async fn acknowledge_drain(entry: Arc<ConnEntry>, mut send: SendStream) {
    entry.wait_idle().await;
    match write_frame(&mut send, &Control::DrainAck).await {
        Ok(()) => debug!(connection = entry.id, "drain acknowledged"),
        Err(e) => debug!(connection = entry.id, cause = %e, "could not acknowledge the drain"),
    }
    // Keep the stream open until the connector closes the connection.
    let _ = send.stopped().await;
}

/// A registered connection: tunnel id, registry entry and both halves of the control stream.
type Registration = (String, Arc<ConnEntry>, SendStream, RecvStream);

/// Runs the registration exchange.
async fn register(
    conn: &Connection,
    peer: SocketAddr,
    shared: &EdgeShared,
) -> Result<Registration, RegisterError> {
    let (mut send, mut recv) = conn.accept_control().await?;
    let msg: Control = read_frame(&mut recv).await?;
    let reg = match msg {
        Control::Register(r) => r,
        other => {
            let kind = match other {
                Control::Unknown => "an unknown message",
                _ => "a message other than register",
            };
            let rej = Rejected {
                code: RejectCode::BadRequest,
                message: format!("expected register as the first control message, got {kind}"),
                retry_after_ms: None,
            };
            warn!(%peer, reason = %rej.message, "registration refused");
            reject(conn, &mut send, &rej).await;
            return Err(RegisterError::Rejected(rej));
        }
    };
    if let Err(rej) = reg.check_version() {
        warn!(%peer, tunnel = ?clip(&reg.tunnel), connector = ?clip(&reg.connector_id), reason = %rej.message, "registration refused");
        reject(conn, &mut send, &rej).await;
        return Err(RegisterError::Rejected(rej));
    }
    if !authorized(shared, &reg.tunnel, &reg.token) {
        let rej = Rejected {
            code: RejectCode::Unauthorized,
            message: "unknown tunnel or wrong token".into(),
            retry_after_ms: None,
        };
        // Peer-controlled strings: quoted and clipped, never trusted as log text.
        warn!(%peer, tunnel = ?clip(&reg.tunnel), connector = ?clip(&reg.connector_id), reason = %rej.message, "registration refused");
        reject(conn, &mut send, &rej).await;
        return Err(RegisterError::Rejected(rej));
    }

    if reg.probe {
        let ok = Control::Registered(proto::Registered {
            connection_id: 0,
            edge_id: shared.config.edge_id.clone(),
            heads: None,
            trailers: false,
        });
        write_frame(&mut send, &ok).await?;
        let _ = send.finish();
        info!(%peer, tunnel = %reg.tunnel, connector = ?clip(&reg.connector_id), protocol = %conn.protocol(), "connectivity check passed (not routed)");
        // The stream stays until the checker, having read the answer, closes the connection
        // (over HTTP/2 dropping it now could discard the answer).
        finish_probe(conn).await;
        return Err(RegisterError::Probe);
    }

    // Route, then answer. The registry re-checks the token under the lock a reload takes, so
    // a registration racing a token rotation is refused here rather than kept.
    let id = shared.registry.allocate_id();
    let registrant = Registrant {
        token_sha256: reg.token.sha256(),
        connector_id: printable(&reg.connector_id),
        conn_index: reg.conn_index,
        software: reg.software.as_deref().map(printable),
        digest: reg.digest.as_deref().map(printable),
        heads: HeadCodec::chosen(HeadCodec::choose(&reg.heads)),
        sessions: reg.sessions,
        trailers: reg.trailers,
        conn: conn.clone(),
    };
    let entry = match shared.registry.add(&reg.tunnel, id, registrant) {
        Ok(entry) => entry,
        Err(e) => {
            let rej = Rejected {
                code: match e {
                    AddError::Revoked => RejectCode::Unauthorized,
                    AddError::Full(_) => RejectCode::Unavailable,
                },
                message: e.to_string(),
                retry_after_ms: matches!(e, AddError::Full(_)).then_some(30_000),
            };
            warn!(%peer, tunnel = ?clip(&reg.tunnel), connector = ?clip(&reg.connector_id), reason = %rej.message, "registration refused");
            reject(conn, &mut send, &rej).await;
            return Err(RegisterError::Rejected(rej));
        }
    };
    // If the answer cannot be sent, or the registration timeout cancels this future first,
    // the entry leaves the registry with it.
    let unroute = Unroute {
        registry: &shared.registry,
        tunnel: &reg.tunnel,
        id,
        armed: true,
    };
    let ok = Control::Registered(proto::Registered {
        connection_id: id,
        edge_id: shared.config.edge_id.clone(),
        heads: HeadCodec::choose(&reg.heads).map(str::to_string),
        trailers: reg.trailers,
    });
    write_frame(&mut send, &ok).await?;
    unroute.disarm();
    connections(shared, &reg.tunnel, entry.protocol()).inc();
    shared.replicas_changed(&reg.tunnel);
    info!(
        %peer,
        tunnel = %reg.tunnel,
        connector = ?clip(&reg.connector_id),
        conn_index = reg.conn_index,
        connection = entry.id,
        software = ?reg.software.as_deref().map(clip),
        digest = ?reg.digest.as_deref().map(clip),
        "connector registered"
    );
    Ok((reg.tunnel, entry, send, recv))
}

/// The registered-connections gauge of `tunnel` over `protocol`.
fn connections(
    shared: &EdgeShared,
    tunnel: &str,
    protocol: &'static str,
) -> prometheus_client::metrics::gauge::Gauge {
    shared
        .metrics
        .registered
        .get_or_create(&crate::admin::metrics::ConnectionLabels {
            tunnel: tunnel.to_string(),
            protocol,
        })
        .clone()
}

/// Removes a registry entry when dropped armed.
struct Unroute<'a> {
    registry: &'a Registry,
    tunnel: &'a str,
    id: u64,
    armed: bool,
}

impl Unroute<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Unroute<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.registry.remove(self.tunnel, self.id);
        }
    }
}

/// A peer-supplied string as the edge keeps it (for logs, `/status` and terminals): at most
/// 64 bytes, control characters replaced.
fn printable(s: &str) -> String {
    clip(s)
        .chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// At most 64 bytes of a peer-supplied string, cut at a character boundary.
fn clip(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Token check in constant time. An unknown tunnel costs the same hash and comparison.
fn authorized(shared: &EdgeShared, tunnel: &str, token: &Secret) -> bool {
    match shared.registry.tunnel(tunnel) {
        Some(t) => t.accepts(token),
        None => {
            let _ = token.matches_sha256(&[0u8; 32]);
            false
        }
    }
}

/// Sends `Rejected`, gives it a moment to arrive, then closes the connection.
async fn reject(conn: &Connection, send: &mut SendStream, rej: &Rejected) {
    if write_frame(send, &Control::Rejected(rej.clone()))
        .await
        .is_ok()
        && send.finish().is_ok()
    {
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    }
    conn.close(proto::code::CLOSE_REJECTED, rej.message.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_strings_are_clipped_and_lose_their_control_characters() {
        assert_eq!(printable("replica-1"), "replica-1");
        assert_eq!(
            printable("a\x1b[31mred\nline"),
            "a\u{fffd}[31mred\u{fffd}line"
        );
        let long = "é".repeat(40);
        let kept = printable(&long);
        assert!(kept.len() <= 64 && kept.chars().all(|c| c == 'é'), "{kept}");
    }
}
