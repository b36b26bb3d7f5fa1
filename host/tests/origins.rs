//! Origin kinds through the real tunnel: HTTP/1.1 and HTTP/2 (h2c with prior knowledge, h2 by
//! ALPN), over TCP and unix sockets, plain and TLS, and TLS with a client certificate. One
//! server that speaks whatever it is offered answers with the protocol version it saw; each
//! kind is a row of one table.

mod support;

use std::path::PathBuf;
use std::sync::Arc;

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
