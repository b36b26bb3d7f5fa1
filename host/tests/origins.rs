//! Origin kinds through the real tunnel: HTTP/1.1 and HTTP/2 (h2c with prior knowledge, h2 by
//! ALPN), over TCP and unix sockets, plain and TLS, and TLS with a client certificate. One
//! server that speaks whatever it is offered answers with the protocol version it saw; each
//! kind is a row of one table.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice::config::{OriginConfig, OriginTarget, TlsIdentity};
use support::*;
use tokio::io::{AsyncRead, AsyncWrite};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where the test server listens.
enum Listen {
    Tcp,
    Unix(PathBuf),
}

/// Starts a server on `listen`, under TLS with `tls` if given, speaking HTTP/1.1 or HTTP/2
/// (whichever the client starts with, or ALPN chose), answering `{version:?}`. Returns the
/// TCP address (for a TCP listener).
async fn version_server(
    listen: Listen,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Option<std::net::SocketAddr> {
    let (tcp, unix) = match listen {
        Listen::Tcp => (
            Some(tokio::net::TcpListener::bind(loopback()).await.unwrap()),
            None,
        ),
        Listen::Unix(path) => (None, Some(tokio::net::UnixListener::bind(path).unwrap())),
    };
    let addr = tcp.as_ref().map(|l| l.local_addr().unwrap());
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let io: Box<dyn Io> = match (&tcp, &unix) {
                (Some(l), _) => match l.accept().await {
                    Ok((s, _)) => Box::new(s),
                    Err(_) => return,
                },
                (_, Some(l)) => match l.accept().await {
                    Ok((s, _)) => Box::new(s),
                    Err(_) => return,
                },
                _ => return,
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let io: Box<dyn Io> = match acceptor {
                    Some(a) => match a.accept(io).await {
                        Ok(s) => Box::new(s),
                        Err(_) => return,
                    },
                    None => io,
                };
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(Response::new(sluice::relay::full(format!(
                        "{:?}",
                        req.version()
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    addr
}

/// A server TLS config for "localhost" offering h2 and http/1.1, requiring a client
/// certificate issued by `client_ca` if given.
fn server_tls(
    id: &TlsIdentity,
    client_ca: Option<&rcgen::Certificate>,
) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// A CA and a client certificate it issued.
fn client_pki() -> (rcgen::Certificate, TlsIdentity) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["connector".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let id = TlsIdentity {
        chain: vec![cert.der().clone()],
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    };
    (ca, id)
}

fn origin(url: &str) -> OriginConfig {
    let mut o = OriginConfig::new("web", OriginTarget::parse(url).unwrap());
    o.http2 = url.starts_with("h2c://");
    o
}

/// One origin kind: how to start its server, its origin, and the version it should see.
struct Case {
    name: &'static str,
    origin: OriginConfig,
    expect: &'static str,
}

#[tokio::test]
async fn every_origin_kind_answers_through_the_tunnel() {
    let dir = std::env::temp_dir().join(format!("sluice-origins-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let id = identity();
    let (client_ca, client_id) = client_pki();
    let plain = version_server(Listen::Tcp, None).await.unwrap();
    let tls = version_server(Listen::Tcp, Some(server_tls(&id, None)))
        .await
        .unwrap();
    let mtls = version_server(Listen::Tcp, Some(server_tls(&id, Some(&client_ca))))
        .await
        .unwrap();
    let sock = dir.join("plain.sock");
    version_server(Listen::Unix(sock.clone()), None).await;
    let tls_sock = dir.join("tls.sock");
    version_server(Listen::Unix(tls_sock.clone()), Some(server_tls(&id, None))).await;

    let with_tls = |url: String, http2: bool, client: Option<&TlsIdentity>| {
        let mut o = origin(&url);
        o.ca = id.chain.clone();
        o.http2 = http2;
        o.client_identity = client.cloned();
        o
    };
    let cases = [
        Case {
            name: "http",
            origin: origin(&format!("http://{plain}")),
            expect: "HTTP/1.1",
        },
        Case {
            name: "h2c",
            origin: origin(&format!("h2c://{plain}")),
            expect: "HTTP/2.0",
        },
        Case {
            name: "https",
            origin: with_tls(format!("https://localhost:{}", tls.port()), false, None),
            expect: "HTTP/1.1",
        },
        Case {
            name: "https, h2 by ALPN",
            origin: with_tls(format!("https://localhost:{}", tls.port()), true, None),
            expect: "HTTP/2.0",
        },
        Case {
            name: "unix",
            origin: origin(&format!("unix:{}", sock.display())),
            expect: "HTTP/1.1",
        },
        Case {
            name: "unix+tls, h2 by ALPN",
            origin: with_tls(format!("unix+tls:{}", tls_sock.display()), true, None),
            expect: "HTTP/2.0",
        },
        Case {
            name: "https with a client certificate",
            origin: with_tls(
                format!("https://localhost:{}", mtls.port()),
                false,
                Some(&client_id),
            ),
            expect: "HTTP/1.1",
        },
    ];
    for case in cases {
        let (edge, conn) = app_tunnel(vec![case.origin]).await;
        for _ in 0..2 {
            let reply = get(edge.http, "app.test", "/").await;
            assert_eq!(
                (reply.status, reply.text().as_str()),
                (200, case.expect),
                "{}",
                case.name
            );
        }
        conn.stop().await;
    }

    // The origin that wants a client certificate refuses a connector without one.
    let (edge, conn) = app_tunnel(vec![with_tls(
        format!("https://localhost:{}", mtls.port()),
        false,
        None,
    )])
    .await;
    assert_eq!(get(edge.http, "app.test", "/").await.status, 502);
    conn.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An origin that reads a PROXY protocol header (v1 or v2) first, then serves HTTP/1.1 on the
/// rest of the connection, answering with the source address the header gave; counts its
/// connections.
async fn proxy_protocol_origin(
    connections: Arc<std::sync::atomic::AtomicUsize>,
) -> std::net::SocketAddr {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                tcp.read_exact(&mut first).await.unwrap();
                let source = if first[0] == b'P' {
                    // v1: a text line.
                    let mut line = vec![first[0]];
                    while !line.ends_with(b"\r\n") && line.len() < 108 {
                        let mut b = [0u8; 1];
                        tcp.read_exact(&mut b).await.unwrap();
                        line.push(b[0]);
                    }
                    let line = String::from_utf8(line).unwrap();
                    let parts: Vec<&str> = line.trim_end().split(' ').collect();
                    format!("v1 {} {}", parts[2], parts[4])
                } else {
                    // v2: 16 bytes, then the address block.
                    let mut head = [0u8; 15];
                    tcp.read_exact(&mut head).await.unwrap();
                    let len = u16::from_be_bytes([head[13], head[14]]) as usize;
                    let mut block = vec![0u8; len];
                    tcp.read_exact(&mut block).await.unwrap();
                    assert_eq!(head[12], 0x11, "TCP over IPv4");
                    let ip = std::net::Ipv4Addr::new(block[0], block[1], block[2], block[3]);
                    let port = u16::from_be_bytes([block[8], block[9]]);
                    format!("v2 {ip} {port}")
                };
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let source = source.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(Response::new(sluice::relay::full(
                            source,
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn proxy_protocol_tells_the_origin_each_clients_address() {
    for version in [
        sluice::config::ProxyVersion::V1,
        sluice::config::ProxyVersion::V2,
    ] {
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let addr = proxy_protocol_origin(connections.clone()).await;
        let mut o = origin(&format!("http://{addr}"));
        o.proxy_protocol = Some(version);
        let (edge, conn) = app_tunnel(vec![o]).await;
        let tag = match version {
            sluice::config::ProxyVersion::V1 => "v1",
            sluice::config::ProxyVersion::V2 => "v2",
        };
        for _ in 0..2 {
            // Each request comes from a connection of its own (`send` opens one), and the
            // origin hears of that connection's address.
            let tcp = tokio::net::TcpStream::connect(edge.http).await.unwrap();
            let local = tcp.local_addr().unwrap();
            let (mut sender, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(c);
            let resp = sender
                .send_request(
                    Request::get("/")
                        .header("host", "app.test")
                        .body(http_body_util::Full::<bytes::Bytes>::default())
                        .unwrap(),
                )
                .await
                .unwrap();
            use http_body_util::BodyExt;
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(
                String::from_utf8_lossy(&body),
                format!("{tag} {} {}", local.ip(), local.port())
            );
        }
        // A connection carries one client's requests: never shared.
        assert_eq!(
            connections.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "{tag}"
        );
        conn.stop().await;
    }
}

/// A hand-written HTTP/1.1 origin that numbers its connections and answers each request with
/// the number of the connection it came on. `/close` answers with `Connection: close`,
/// `/hangup` answers and then, when `hang_up` is notified, closes without having said so (a
/// keep-alive timeout) and notifies `hung_up`; after `/drop-next`, the next request on that
/// connection is read and the connection closed without an answer; `/empty` answers 204.
async fn numbering_origin(
    hang_up: Arc<tokio::sync::Notify>,
    hung_up: Arc<tokio::sync::Notify>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut number = 0;
        while let Ok((mut tcp, _)) = listener.accept().await {
            number += 1;
            let (hang_up, hung_up) = (hang_up.clone(), hung_up.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut drop_next = false;
                loop {
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 1024];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    buf.drain(..head_end);
                    if drop_next {
                        return;
                    }
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let body = number.to_string();
                    let reply = match path.as_str() {
                        "/empty" => "HTTP/1.1 204 No Content\r\n\r\n".to_string(),
                        "/close" => format!(
                            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        ),
                        _ => format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        ),
                    };
                    if tcp.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                    if path == "/close" {
                        return;
                    }
                    drop_next = path == "/drop-next";
                    if path == "/hangup" {
                        hang_up.notified().await;
                        drop(tcp);
                        hung_up.notify_one();
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// HTTP/1.1 origin connections are kept alive and reused, also after a response without a
/// body; one the origin closed, with or without saying so, is replaced, and the request that
/// follows is answered.
#[tokio::test]
async fn keep_alive_connections_are_reused_and_closed_ones_replaced() {
    let (hang_up, hung_up) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let addr = numbering_origin(hang_up.clone(), hung_up.clone()).await;
    let (edge, conn) = app_tunnel(vec![http_origin("web", addr)]).await;
    let on = |reply: Reply| {
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.text()
    };
    for _ in 0..10 {
        assert_eq!(on(get(edge.http, "app.test", "/").await), "1");
    }
    for _ in 0..3 {
        assert_eq!(get(edge.http, "app.test", "/empty").await.status, 204);
    }
    assert_eq!(on(get(edge.http, "app.test", "/").await), "1");
    assert_eq!(on(get(edge.http, "app.test", "/close").await), "1");
    assert_eq!(on(get(edge.http, "app.test", "/").await), "2");
    // Closed while idle: the next request finds the connection closed, or sends on it as
    // the close arrives and goes again on a new one.
    for n in 2..12 {
        assert_eq!(
            on(get(edge.http, "app.test", "/hangup").await),
            n.to_string()
        );
        hang_up.notify_one();
        tokio::time::timeout(Duration::from_secs(10), hung_up.notified())
            .await
            .expect("the origin closes the connection");
    }
    assert_eq!(on(get(edge.http, "app.test", "/").await), "12");
    // Closed as a request arrived: a GET goes again on a new connection; a POST, which the
    // origin may have acted on, does not.
    // (After a pause: a connection idle for less than 100 ms is not worth a copy of the
    // request, an origin's keep-alive timeout being longer.)
    assert_eq!(on(get(edge.http, "app.test", "/drop-next").await), "12");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(on(get(edge.http, "app.test", "/").await), "13");
    assert_eq!(on(get(edge.http, "app.test", "/drop-next").await), "13");
    let post = Request::post("/")
        .header("host", "app.test")
        .body(http_body_util::Full::from("x"))
        .unwrap();
    assert_eq!(send(edge.http, post).await.status, 502);
    assert_eq!(on(get(edge.http, "app.test", "/").await), "14");
    conn.stop().await;
}

/// An origin that answers as soon as it has a request's head, then reads the body to its end
/// (by `content-length`) and reports how many bytes it got.
async fn early_answer_origin(
    got: tokio::sync::mpsc::UnboundedSender<usize>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let got = got.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    let mut chunk = [0u8; 4096];
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                let reply = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if tcp.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
                let mut read = buf.len() - head_end;
                let mut chunk = vec![0u8; 64 << 10];
                while read < length {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => read += n,
                    }
                }
                let _ = got.send(read);
            });
        }
    });
    addr
}

/// An origin that answers before it has read a request's body still gets the whole body.
#[tokio::test]
async fn a_body_still_going_when_the_origin_answers_is_sent_whole() {
    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    let addr = early_answer_origin(tx).await;
    let (edge, conn) = app_tunnel(vec![http_origin("web", addr)]).await;
    let size = 4 << 20;
    let post = Request::post("/up")
        .header("host", "app.test")
        .body(http_body_util::Full::from(vec![b'u'; size]))
        .unwrap();
    let reply = send(edge.http, post).await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
    let read = tokio::time::timeout(Duration::from_secs(20), got.recv())
        .await
        .expect("the origin reads the body to its end")
        .unwrap();
    assert_eq!(read, size);
    conn.stop().await;
}
