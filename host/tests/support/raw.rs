//! Raw HTTP/1.1 on both sides of the tunnel: an origin that records exactly the bytes it
//! receives and parses them strictly, a client that writes exactly the bytes it is given, and
//! a minimal HTTP/2 client that writes frames by hand (for requests no HTTP/2 library sends).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::WAIT;

/// One request as the strict origin parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Which origin connection carried it (0, 1, … in accept order).
    pub conn: usize,
    pub method: String,
    pub target: String,
    /// Header fields as received, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What the strict origin observed, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete, well-framed request.
    Request(Seen),
    /// Bytes that are not a well-framed HTTP/1.1 request; the connection was closed.
    Violation { conn: usize, why: String },
    /// The peer closed the connection in the middle of a request (nothing was served).
    Truncated { conn: usize },
}

/// An HTTP/1.1 origin on a raw socket. Every request is parsed by the strictest reading of
/// RFC 9112 (CRLF only, no obs-fold, one Host, never both or several lengths…) and answered
/// `200` with body `ok <target>`. Upgrades are declined, as a static file server does.
#[derive(Clone)]
pub struct RawOrigin {
    pub addr: SocketAddr,
    events: Arc<Mutex<Vec<Event>>>,
}

impl RawOrigin {
    pub async fn start() -> Self {
        let listener = TcpListener::bind(super::loopback()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = events.clone();
        let conns = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let conn = conns.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(tcp, conn, log.clone()));
            }
        });
        RawOrigin { addr, events }
    }

    /// Everything observed so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until a request with `target` has been seen.
    pub async fn wait_for(&self, target: &str) -> Seen {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let found = self.events().into_iter().find_map(|e| match e {
                Event::Request(s) if s.target == target => Some(s),
                _ => None,
            });
            if let Some(s) = found {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the origin never received {target}; it saw {:#?}",
                self.events()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn serve(mut tcp: TcpStream, conn: usize, events: Arc<Mutex<Vec<Event>>>) {
    let mut buf = Vec::new();
    loop {
        match parse_request(&buf, conn) {
            Parsed::Done(seen, used) => {
                buf.drain(..used);
                let body = format!("ok {}", seen.target);
                events.lock().unwrap().push(Event::Request(seen));
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{body}",
                    body.len()
                );
                if tcp.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            Parsed::Bad(why) => {
                events.lock().unwrap().push(Event::Violation { conn, why });
                return;
            }
            Parsed::More => {}
        }
        let mut chunk = [0u8; 8192];
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                if !buf.is_empty() {
                    events.lock().unwrap().push(Event::Truncated { conn });
                }
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

enum Parsed {
    Done(Seen, usize),
    More,
    Bad(String),
}

/// Splits off one CRLF-terminated line starting at `at`; a bare CR or LF is a violation.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, String> {
    let rest = &buf[at..];
    let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
        return if rest.contains(&b'\r') && !rest.ends_with(b"\r") {
            Err("bare CR".into())
        } else {
            Ok(None)
        };
    };
    if lf == 0 || rest[lf - 1] != b'\r' {
        return Err("bare LF".into());
    }
    let text = &rest[..lf - 1];
    if text.contains(&b'\r') {
        return Err("bare CR".into());
    }
    Ok(Some((text, at + lf + 1)))
}

fn parse_request(buf: &[u8], conn: usize) -> Parsed {
    match parse_inner(buf, conn) {
        Ok(Some((seen, used))) => Parsed::Done(seen, used),
        Ok(None) => Parsed::More,
        Err(why) => Parsed::Bad(why),
    }
}

fn parse_inner(buf: &[u8], conn: usize) -> Result<Option<(Seen, usize)>, String> {
    let Some((request_line, mut at)) = line(buf, 0)? else {
        return Ok(None);
    };
    let request_line = std::str::from_utf8(request_line).map_err(|_| "non-UTF-8 request line")?;
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, "HTTP/1.1"] = parts[..] else {
        return Err(format!("bad request line {request_line:?}"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!("bad method {method:?}"));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b >= 0x7f) {
        return Err(format!("bad target {target:?}"));
    }
    let mut headers = Vec::new();
    loop {
        let Some((text, next)) = line(buf, at)? else {
            return Ok(None);
        };
        at = next;
        if text.is_empty() {
            break;
        }
        if text[0] == b' ' || text[0] == b'\t' {
            return Err("obs-fold".into());
        }
        let text = std::str::from_utf8(text).map_err(|_| "non-UTF-8 header")?;
        let (name, value) = text.split_once(':').ok_or("header without a colon")?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(format!("bad header name {name:?}"));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Err(format!("control byte in header {name}"));
        }
        headers.push((name.to_ascii_lowercase(), value.to_string()));
    }
    let count = |n: &str| headers.iter().filter(|(h, _)| h == n).count();
    if count("host") != 1 {
        return Err(format!("{} Host headers", count("host")));
    }
    let value = |n: &str| headers.iter().find(|(h, _)| h == n).map(|(_, v)| v.clone());
    let body = match (count("content-length"), count("transfer-encoding")) {
        (0, 0) => Vec::new(),
        (1, 0) => {
            let v = value("content-length").unwrap();
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 12 {
                return Err(format!("bad content-length {v:?}"));
            }
            let n: usize = v.parse().unwrap();
            if buf.len() < at + n {
                return Ok(None);
            }
            let body = buf[at..at + n].to_vec();
            at += n;
            body
        }
        (0, 1) => {
            if value("transfer-encoding").unwrap() != "chunked" {
                return Err("transfer-encoding other than chunked".into());
            }
            let Some((body, used)) = chunked(buf, at)? else {
                return Ok(None);
            };
            at = used;
            body
        }
        (cl, te) => return Err(format!("{cl} content-length and {te} transfer-encoding")),
    };
    Ok(Some((
        Seen {
            conn,
            method: method.to_string(),
            target: target.to_string(),
            headers,
            body,
        },
        at,
    )))
}

fn chunked(buf: &[u8], mut at: usize) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    loop {
        let Some((size_line, next)) = line(buf, at)? else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(size_line).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or("");
        if size_text.is_empty()
            || size_text.len() > 8
            || !size_text.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(format!("bad chunk size {size_text:?}"));
        }
        let size = usize::from_str_radix(size_text, 16).unwrap();
        at = next;
        if size == 0 {
            // Trailer section, then the final CRLF.
            loop {
                let Some((t, next)) = line(buf, at)? else {
                    return Ok(None);
                };
                at = next;
                if t.is_empty() {
                    return Ok(Some((body, at)));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        at += size + 2;
    }
}

/// A response read off a raw client connection.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

/// Writes `bytes` on a fresh connection to `addr` and reads one response (framed by
/// content-length, chunked, or connection close). `None` if the peer closed without answering.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Option<RawReply> {
    tokio::time::timeout(WAIT, async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        // The peer may answer and close before reading everything (a 400 mid-request).
        let _ = tcp.write_all(bytes).await;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let (head_end, head) = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break (i + 4, String::from_utf8_lossy(&buf[..i]).into_owned());
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let status: u16 = head.get(9..12)?.parse().ok()?;
        let lower = head.to_ascii_lowercase();
        let length = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let chunked = lower.contains("transfer-encoding: chunked");
        loop {
            let have = buf.len() - head_end;
            let done = match length {
                Some(n) => have >= n,
                None if chunked => buf[head_end..].ends_with(b"0\r\n\r\n"),
                None => status == 101 || status == 204 || status == 304,
            };
            if done {
                break;
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        Some(RawReply {
            status,
            head,
            body: buf[head_end..].to_vec(),
        })
    })
    .await
    .expect("raw exchange timed out")
}

/// HTTP/2 by hand: a connection preface, then frames built byte by byte, so that a request
/// can break rules a real client library refuses to break.
pub mod h2 {
    use super::*;

    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    /// A frame: type, flags, stream id, payload.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn integer(out: &mut Vec<u8>, prefix_bits: u8, first: u8, mut n: usize) {
        let max = (1usize << prefix_bits) - 1;
        if n < max {
            out.push(first | n as u8);
            return;
        }
        out.push(first | max as u8);
        n -= max;
        while n >= 128 {
            out.push((n % 128 + 128) as u8);
            n /= 128;
        }
        out.push(n as u8);
    }

    /// An HPACK block of literal fields without indexing and without Huffman coding: every
    /// byte of every name and value reaches the server exactly as given.
    pub fn header_block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(0x00);
            integer(&mut out, 7, 0, name.len());
            out.extend_from_slice(name);
            integer(&mut out, 7, 0, value.len());
            out.extend_from_slice(value);
        }
        out
    }

    /// How the server answered stream 1.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Answer {
        /// A response whose `:status` was a static-table entry (200, 204, 206, 304, 400, 404,
        /// 500).
        Status(u16),
        /// A response with another status (literal-coded).
        OtherStatus,
        /// The stream was reset with this error code.
        Reset(u32),
        /// The connection was closed with GOAWAY or at the TCP level.
        Closed,
    }

    /// Connects with TLS (ALPN h2) to `addr`, sends the preface, empty SETTINGS and `frames`
    /// (which use stream 1), and returns how stream 1 was answered.
    pub async fn exchange(
        addr: SocketAddr,
        identity: &sluice::config::TlsIdentity,
        frames: &[Vec<u8>],
    ) -> Answer {
        tokio::time::timeout(WAIT, async {
            let mut tls = super::super::tls_connect(addr, identity, b"h2").await;
            let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            out.extend(frame(SETTINGS, 0, 0, &[]));
            for f in frames {
                out.extend_from_slice(f);
            }
            if tls.write_all(&out).await.is_err() {
                return Answer::Closed;
            }
            let mut buf = Vec::new();
            let mut chunk = [0u8; 16384];
            loop {
                while buf.len() >= 9 {
                    let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
                    if buf.len() < 9 + len {
                        break;
                    }
                    let (kind, stream) = (
                        buf[3],
                        u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
                    );
                    let payload = buf[9..9 + len].to_vec();
                    buf.drain(..9 + len);
                    match (kind, stream) {
                        (HEADERS, 1) => {
                            return match payload.first() {
                                Some(b) if (0x88..=0x8e).contains(b) => Answer::Status(
                                    [200, 204, 206, 304, 400, 404, 500][(b - 0x88) as usize],
                                ),
                                _ => Answer::OtherStatus,
                            }
                        }
                        (RST_STREAM, 1) => {
                            return Answer::Reset(u32::from_be_bytes(
                                payload[..4].try_into().unwrap(),
                            ))
                        }
                        (GOAWAY, _) => return Answer::Closed,
                        _ => {}
                    }
                }
                match tls.read(&mut chunk).await {
                    Ok(0) | Err(_) => return Answer::Closed,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .expect("h2 exchange timed out")
    }
}
