//! PROXY protocol headers: how an origin — a TCP service behind a public port, or an HTTP
//! origin with `proxy-protocol` — learns the client's address, which it would otherwise see
//! as the connector's.
//!
//! The binary v2 form with the `PROXY` command over TCP (no TLVs): a fixed 12-byte signature,
//! version and command, family and transport, the address block length, then source and
//! destination addresses and ports; v2's `LOCAL` command for a connection of the connector's
//! own (a health check). And the text v1 form, `PROXY TCP4 src dst sport dport\r\n`, or
//! `PROXY UNKNOWN\r\n` for the connector's own.

use std::net::{IpAddr, SocketAddr};

/// The v2 signature every header starts with.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command `PROXY`.
const VERSION_PROXY: u8 = 0x21;
/// `AF_INET` + `STREAM`.
const TCP_V4: u8 = 0x11;
/// `AF_INET6` + `STREAM`.
const TCP_V6: u8 = 0x21;

/// The header announcing a TCP connection from `client` to `server` (the edge's address the
/// client reached). IPv4 clients of a dual-stack listener (`::ffff:a.b.c.d`) are given as
/// IPv4; mixed families, both as IPv6 (IPv4 mapped).
pub fn header(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_PROXY);
    match (client.ip().to_canonical(), server.ip().to_canonical()) {
        (IpAddr::V4(c), IpAddr::V4(s)) => {
            out.push(TCP_V4);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&c.octets());
            out.extend_from_slice(&s.octets());
        }
        (c, s) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(TCP_V6);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(c).octets());
            out.extend_from_slice(&v6(s).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&server.port().to_be_bytes());
    out
}

/// The v2 header of a connection the connector makes on its own behalf (a health check):
/// the `LOCAL` command, no addresses.
pub fn local() -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0, 0]);
    out
}

/// The v1 (text) header of a TCP connection from `client` to `server`; `None`: the
/// connector's own (`PROXY UNKNOWN`).
pub fn v1(addrs: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let Some((client, server)) = addrs else {
        return b"PROXY UNKNOWN\r\n".to_vec();
    };
    let (c, s) = (client.ip().to_canonical(), server.ip().to_canonical());
    let line = match (c, s) {
        (IpAddr::V4(c), IpAddr::V4(s)) => format!("PROXY TCP4 {c} {s}"),
        (c, s) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            format!("PROXY TCP6 {} {}", v6(c), v6(s))
        }
    };
    format!("{line} {} {}\r\n", client.port(), server.port()).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_headers_and_the_connectors_own_are_byte_exact() {
        let addrs = (
            "203.0.113.7:50000".parse().unwrap(),
            "192.0.2.1:8080".parse().unwrap(),
        );
        assert_eq!(
            v1(Some(addrs)),
            b"PROXY TCP4 203.0.113.7 192.0.2.1 50000 8080\r\n"
        );
        let mixed = (
            "[2001:db8::7]:40000".parse().unwrap(),
            "192.0.2.1:80".parse().unwrap(),
        );
        assert_eq!(
            v1(Some(mixed)),
            b"PROXY TCP6 2001:db8::7 ::ffff:192.0.2.1 40000 80\r\n"
        );
        assert_eq!(v1(None), b"PROXY UNKNOWN\r\n");
        assert_eq!(local(), b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00");
    }

    #[test]
    fn an_ipv4_header_is_byte_exact() {
        let h = header(
            "203.0.113.7:50000".parse().unwrap(),
            "192.0.2.1:2222".parse().unwrap(),
        );
        let mut expected = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0, 12]);
        expected.extend_from_slice(&[203, 0, 113, 7, 192, 0, 2, 1]);
        expected.extend_from_slice(&50000u16.to_be_bytes());
        expected.extend_from_slice(&2222u16.to_be_bytes());
        assert_eq!(h, expected);
    }

    #[test]
    fn ipv6_and_mixed_families_use_the_ipv6_block() {
        let h = header(
            "[2001:db8::7]:40000".parse().unwrap(),
            "192.0.2.1:22".parse().unwrap(),
        );
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(
            h[16..32],
            "2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(
            h[32..48],
            "::ffff:192.0.2.1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(&h[48..], &[0x9c, 0x40, 0, 22]);
    }

    #[test]
    fn ipv4_clients_of_a_dual_stack_listener_are_given_as_ipv4() {
        let h = header(
            "[::ffff:203.0.113.7]:50000".parse().unwrap(),
            "[::ffff:192.0.2.1]:2222".parse().unwrap(),
        );
        assert_eq!(
            h,
            header(
                "203.0.113.7:50000".parse().unwrap(),
                "192.0.2.1:2222".parse().unwrap()
            )
        );
        assert_eq!(h.len(), 16 + 12);
    }
}
