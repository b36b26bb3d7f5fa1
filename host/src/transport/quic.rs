//! QUIC endpoints on UDP sockets sized for a tunnel's traffic.
//!
//! A tunnel carries bulk transfers in bursts of many datagrams; the kernel's default UDP
//! receive buffer (~208 KiB on Linux) overflows under such a burst and every drop costs a
//! retransmission and a congestion-window cut. Both ends therefore ask for
//! [`SOCKET_BUFFER`] bytes each way, within what the kernel allows (`net.core.rmem_max`,
//! `net.core.wmem_max`), and say once when they got less.
//!
//! quinn's own tasks run on a runtime of ours, [`Coalescing`], which lets a busy process's
//! stream writes gather into shared packets.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tracing::info;

use super::coalesce::Deferring;

/// Receive and send buffer asked for each QUIC socket.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// The largest UDP payload an edge accepts, and that path MTU discovery searches up to.
///
/// quinn stops its search at 1,452 bytes by default, the most an Ethernet path carries. An edge
/// and its connectors on one host (loopback) or on a jumbo-frame network carry more, and every
/// packet has a fixed cost (a header to seal, an acknowledgement to track): on loopback a
/// 10 MiB download goes about 1.6 times as fast with 6,500-byte datagrams as with 1,452. On an
/// ordinary path the probes above the path's MTU are lost and discovery settles where it would
/// have anyway; they are a handful of padding-only packets every ten minutes.
///
/// Not more than 6,500: quinn hands the kernel up to ten datagrams at once in one segmented
/// send, which the kernel caps at 64 KiB. Ten larger datagrams fail as a whole, which quinn
/// takes for a black hole and falls back to 1,200 bytes (seen with 8,952 and 65,527).
///
/// Only the edge accepts them; a connector keeps quinn's 1,472. quinn sizes an endpoint's
/// receive buffer by the largest datagram it accepts (room for 32 reads of 64 coalesced
/// datagrams): 13 MB instead of 3 MB, touched whenever the process falls behind its socket. A
/// connector busy with plugins does, under many small requests (its peak RSS went from 39 to
/// 50 MB when it accepted them too), and it is the side that often runs on a small host beside
/// its services. So downloads, which the edge receives, travel in large datagrams; uploads in
/// Ethernet-sized ones, as before.
pub const MAX_DATAGRAM: u16 = 6_500;

/// Binds a QUIC endpoint on `addr`: a server when `server` is given, else a client only.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Like quinn's own binding: a `[::]` endpoint also reaches IPv4 peers.
        let _ = socket.set_only_v6(false);
    }
    size_buffers(&socket);
    socket.bind(&addr.into())?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
    let runtime = Arc::new(Coalescing(runtime));
    let mut config = quinn::EndpointConfig::default();
    if server.is_some() {
        config
            .max_udp_payload_size(MAX_DATAGRAM)
            .map_err(|e| std::io::Error::other(format!("QUIC datagram size: {e}")))?;
    }
    quinn::Endpoint::new(config, server, socket.into(), runtime)
}

/// Asks for [`SOCKET_BUFFER`] both ways; logs what the kernel granted when it is less.
fn size_buffers(socket: &Socket) {
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    // Linux reports twice what it grants (its own bookkeeping is counted in).
    let granted = |size: std::io::Result<usize>| size.map(|s| s / 2).unwrap_or(0);
    let recv = granted(socket.recv_buffer_size());
    let send = granted(socket.send_buffer_size());
    if recv < SOCKET_BUFFER || send < SOCKET_BUFFER {
        info!(
            wanted = SOCKET_BUFFER,
            recv,
            send,
            "the kernel caps this QUIC socket's buffers; bulk transfers may lose datagrams \
             (raise net.core.rmem_max and net.core.wmem_max)"
        );
    }
}

/// quinn's runtime, with the tasks quinn spawns (the endpoint's driver and each connection's)
/// deferred while the process is busy (see [`super::coalesce`]).
#[derive(Debug)]
struct Coalescing(Arc<dyn quinn::Runtime>);

impl quinn::Runtime for Coalescing {
    fn new_timer(&self, at: std::time::Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        self.0.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(Box::pin(Deferring::new(future)))
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        self.0.wrap_udp_socket(socket)
    }

    fn now(&self) -> std::time::Instant {
        self.0.now()
    }
}

/// A QUIC connection on loopback between two fresh endpoints, for unit tests: the endpoints
/// (kept alive by the caller), the server's side and the client's side.
#[cfg(test)]
pub(crate) async fn loopback_pair() -> ([quinn::Endpoint; 2], quinn::Connection, quinn::Connection)
{
    let id = crate::tls::self_signed(&["localhost"]).unwrap();
    let server = crate::tls::quic_server(crate::tls::ServerCert::new(&id).unwrap()).unwrap();
    let server_ep = endpoint("127.0.0.1:0".parse().unwrap(), Some(server)).unwrap();
    let mut client_ep = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
    client_ep.set_default_client_config(crate::tls::quic_client(&id.chain).unwrap());
    let addr = server_ep.local_addr().unwrap();
    let connecting = client_ep.connect(addr, "localhost").unwrap();
    let incoming = server_ep.accept().await.unwrap();
    let (server_conn, client_conn) = tokio::join!(incoming, connecting);
    (
        [server_ep, client_ep],
        server_conn.unwrap(),
        client_conn.unwrap(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loopback_paths_carry_datagrams_larger_than_ethernet() {
        let (_eps, server, client) = loopback_pair().await;
        let accepting = server.clone();
        let reader = tokio::spawn(async move {
            let (_send, mut recv) = accepting.accept_bi().await.unwrap();
            recv.read_to_end(8 << 20).await.unwrap().len()
        });
        let (mut send, _recv) = client.open_bi().await.unwrap();
        send.write_all(&vec![7u8; 4 << 20]).await.unwrap();
        send.finish().unwrap();
        let read = tokio::time::timeout(std::time::Duration::from_secs(20), reader);
        assert_eq!(read.await.unwrap().unwrap(), 4 << 20);
        // Discovery runs beside the traffic; wait for it rather than for a fixed time.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while client.stats().path.current_mtu <= 1452 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let path = client.stats().path;
        assert!(
            path.current_mtu > 1452 && path.current_mtu <= MAX_DATAGRAM,
            "{path:?}"
        );
        assert_eq!(path.black_holes_detected, 0, "{path:?}");
        // The client (a connector) accepts only what quinn does by default: the server's
        // datagrams stay Ethernet-sized, and so does the client's receive buffer.
        let back = server.stats().path;
        assert!(back.current_mtu <= 1472, "{back:?}");
    }

    #[tokio::test]
    async fn sockets_get_large_buffers_within_the_kernel_limit() {
        let ep = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = ep.local_addr().unwrap();
        assert!(addr.ip().is_loopback() && addr.port() != 0);
        // What the kernel allows an unprivileged socket at most, from its own setting.
        let max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        let probe = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        let default = probe.recv_buffer_size().unwrap() / 2;
        size_buffers(&probe);
        let got = probe.recv_buffer_size().unwrap() / 2;
        match max {
            Some(max) => assert_eq!(got, SOCKET_BUFFER.min(max), "default was {default}"),
            None => assert!(got > default),
        }
    }
}
