//! One gibibyte through a TCP session, byte-exact, with flat memory. Alone in its test binary:
//! it measures the resident memory of the whole process (edge, connector, origin and client),
//! which tests running beside it would disturb.

mod support;

use std::time::Duration;

use sluice::proto::SessionProtocol;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test]
async fn a_gibibyte_through_a_tcp_session_arrives_byte_exact_with_flat_memory() {
    const TOTAL: u64 = 1 << 30;
    const CHUNK: usize = 256 * 1024;
    // An origin that sends TOTAL bytes of a known sequence, then closes.
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let origin = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut sent = 0u64;
        let mut buf = vec![0u8; CHUNK];
        while sent < TOTAL {
            fill(&mut buf, sent);
            tcp.write_all(&buf).await.unwrap();
            sent += CHUNK as u64;
        }
    });
    fn fill(buf: &mut [u8], offset: u64) {
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = (at ^ (at >> 8) ^ (at >> 20)) as u8;
        }
    }
    let (edge, _conn) = services_tunnel(
        vec![port("bulk", SessionProtocol::Tcp)],
        vec![service("bulk", &format!("tcp://{origin}"))],
        |_| {},
        |_| {},
    )
    .await;
    let mut tcp = TcpStream::connect(port_addr(&edge, "bulk")).await.unwrap();
    let mut got = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut received = 0u64;
    let mut baseline = None;
    let mut peak = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while received < TOTAL {
        tokio::time::timeout_at(deadline, tcp.read_exact(&mut got))
            .await
            .expect("the transfer took more than 10 minutes")
            .unwrap();
        fill(&mut want, received);
        assert!(got == want, "bytes differ in the chunk at {received}");
        received += CHUNK as u64;
        if received == 128 << 20 {
            baseline = Some(rss());
        }
        peak = peak.max(rss() * u64::from(baseline.is_some()));
    }
    let mut end = [0u8; 1];
    assert_eq!(
        tokio::time::timeout(WAIT, tcp.read(&mut end))
            .await
            .unwrap()
            .unwrap(),
        0
    );
    // Flat: after the first 128 MiB, the process (edge, connector, origin and client) grew by
    // less than 64 MiB while another 896 MiB went through.
    let baseline = baseline.unwrap();
    assert!(
        peak < baseline + (64 << 20),
        "resident memory grew from {} MiB to {} MiB",
        baseline >> 20,
        peak >> 20
    );
}
