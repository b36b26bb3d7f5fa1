//! gRPC end to end: a tonic client speaking HTTP/2 to the edge's HTTPS listener reaches a
//! tonic server behind the tunnel (an `h2c://` origin). Unary calls, a bidirectional stream of
//! 10,000 messages, and failures whose `grpc-status` and `grpc-message` travel in trailers
//! after a body — which needs the tunnel's framed bodies in both directions.
//!
//! The service is written by hand (what `tonic-build` would generate), so that the test needs
//! no `protoc`.

// tonic's own `Status` is large; the test's streams carry it as tonic does.
#![allow(clippy::result_large_err)]

mod support;

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use sluice::config::{OriginConfig, OriginTarget};
use support::*;
use tonic::codec::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
struct EchoRequest {
    #[prost(string, tag = "1")]
    message: String,
    /// A non-zero gRPC status code the server answers with instead.
    #[prost(int32, tag = "2")]
    fail_code: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EchoReply {
    #[prost(string, tag = "1")]
    message: String,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;
type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, tonic::Status>> + Send>>;

fn status_of(code: i32) -> tonic::Status {
    tonic::Status::new(
        tonic::Code::from(code),
        format!("asked to fail with {code}"),
    )
}

/// `sluice.test.Echo`: `Unary` answers the message (or fails as asked); `Chat` echoes every
/// message of the stream, and fails the stream at the first one that asks to.
#[derive(Clone)]
struct Echo;

struct Unary;

impl tonic::server::UnaryService<EchoRequest> for Unary {
    type Response = EchoReply;
    type Future = BoxFuture<Result<tonic::Response<EchoReply>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<EchoRequest>) -> Self::Future {
        let req = request.into_inner();
        Box::pin(async move {
            match req.fail_code {
                0 => Ok(tonic::Response::new(EchoReply {
                    message: req.message,
                })),
                code => Err(status_of(code)),
            }
        })
    }
}

struct Chat;

impl tonic::server::StreamingService<EchoRequest> for Chat {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Result<tonic::Response<ReplyStream>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<EchoRequest>>) -> Self::Future {
        let incoming = request.into_inner();
        Box::pin(async move {
            let replies = incoming
                .map(|item| match item {
                    Ok(req) if req.fail_code != 0 => Err(status_of(req.fail_code)),
                    Ok(req) => Ok(EchoReply {
                        message: req.message,
                    }),
                    Err(status) => Err(status),
                })
                // The first failure ends the stream (its status goes in the trailers).
                .scan(false, |failed, item| {
                    let out = (!*failed).then_some(item);
                    if let Some(Err(_)) = &out {
                        *failed = true;
                    }
                    std::future::ready(out)
                });
            Ok(tonic::Response::new(Box::pin(replies) as ReplyStream))
        })
    }
}

impl<B> tower_service::Service<http::Request<B>> for Echo
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default());
            Ok(match req.uri().path() {
                "/sluice.test.Echo/Unary" => grpc.unary(Unary, req).await,
                "/sluice.test.Echo/Chat" => grpc.streaming(Chat, req).await,
                _ => tonic::Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "sluice.test.Echo";
}

/// The tonic server, speaking HTTP/2 in the clear on a loopback port.
async fn grpc_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Echo)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

/// An edge with an HTTPS listener (HTTP/2 by ALPN) serving `app.test`, and a connector
/// sending it to `origin`.
async fn h2_tunnel(origin: OriginConfig) -> (EdgeHandle, ConnectorHandle) {
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |c| {
        c.https = Some(sluice::config::HttpsConfig {
            listen: loopback(),
            identity: c.quic_identity.clone(),
        });
    })
    .await;
    let conn = start_connector(connector_config(&edge, "app", "t", vec![origin], vec![])).await;
    conn.registered(sluice::config::DEFAULT_HA_CONNECTIONS as usize)
        .await;
    (edge, conn)
}

/// A tonic client of the edge's HTTPS listener, for `app.test`.
async fn grpc_client(edge: &EdgeHandle) -> tonic::client::Grpc<tonic::transport::Channel> {
    let https = edge.https.expect("the edge has an HTTPS listener");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&edge.ca_pem))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{https}"))
        .unwrap()
        .origin("https://app.test".parse().unwrap())
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("connect to the edge");
    tonic::client::Grpc::new(channel)
}

async fn unary(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    message: &str,
    fail_code: i32,
) -> Result<EchoReply, tonic::Status> {
    client.ready().await.unwrap();
    let request = EchoRequest {
        message: message.into(),
        fail_code,
    };
    client
        .unary(
            tonic::Request::new(request),
            http::uri::PathAndQuery::from_static("/sluice.test.Echo/Unary"),
            ProstCodec::<EchoRequest, EchoReply>::default(),
        )
        .await
        .map(tonic::Response::into_inner)
}

async fn chat(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    requests: Vec<EchoRequest>,
) -> (Vec<String>, Result<(), tonic::Status>) {
    client.ready().await.unwrap();
    let response = client
        .streaming(
            tonic::Request::new(futures_util::stream::iter(requests)),
            http::uri::PathAndQuery::from_static("/sluice.test.Echo/Chat"),
            ProstCodec::<EchoRequest, EchoReply>::default(),
        )
        .await;
    let mut stream = match response {
        Ok(r) => r.into_inner(),
        Err(status) => return (Vec::new(), Err(status)),
    };
    let mut got = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(reply)) => got.push(reply.message),
            Ok(None) => return (got, Ok(())),
            Err(status) => return (got, Err(status)),
        }
    }
}

#[tokio::test]
async fn grpc_calls_and_streams_cross_the_tunnel_with_their_status() {
    let server = grpc_server().await;
    let mut origin = OriginConfig::new(
        "grpc",
        OriginTarget::parse(&format!("h2c://{server}")).unwrap(),
    );
    origin.http2 = true;
    let (edge, conn) = h2_tunnel(origin).await;
    let mut client = grpc_client(&edge).await;

    let reply = tokio::time::timeout(WAIT, unary(&mut client, "hello", 0))
        .await
        .unwrap()
        .expect("a unary call");
    assert_eq!(reply.message, "hello");
    let failed = unary(&mut client, "x", tonic::Code::NotFound as i32)
        .await
        .unwrap_err();
    assert_eq!(failed.code(), tonic::Code::NotFound);
    assert_eq!(failed.message(), "asked to fail with 5");

    // 10,000 messages each way on one stream, ending with an OK status in the trailers.
    let requests: Vec<EchoRequest> = (0..10_000)
        .map(|i| EchoRequest {
            message: format!("m{i}"),
            fail_code: 0,
        })
        .collect();
    let (got, end) = tokio::time::timeout(WAIT * 4, chat(&mut client, requests))
        .await
        .expect("the stream of 10,000 messages did not finish");
    end.expect("the stream ends with OK");
    assert_eq!(got.len(), 10_000);
    assert!(got.iter().enumerate().all(|(i, m)| *m == format!("m{i}")));

    // A stream that fails after two replies: the status comes in trailers, after a body.
    let requests = vec![
        EchoRequest {
            message: "a".into(),
            fail_code: 0,
        },
        EchoRequest {
            message: "b".into(),
            fail_code: 0,
        },
        EchoRequest {
            message: "c".into(),
            fail_code: tonic::Code::Aborted as i32,
        },
        EchoRequest {
            message: "d".into(),
            fail_code: 0,
        },
    ];
    let (got, end) = chat(&mut client, requests).await;
    assert_eq!(got, ["a", "b"]);
    let status = end.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Aborted);
    assert_eq!(status.message(), "asked to fail with 10");
    conn.stop().await;
}

/// Trailers in both directions, seen by plain HTTP/2 ends: a client's request trailers reach
/// the origin, and the origin's response trailers reach the client.
#[tokio::test]
async fn trailers_cross_the_tunnel_both_ways() {
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    type Frames = StreamBody<
        futures_util::stream::Iter<
            std::vec::IntoIter<Result<Frame<bytes::Bytes>, std::convert::Infallible>>,
        >,
    >;
    fn with_trailers(data: bytes::Bytes, name: &'static str, value: &'static str) -> Frames {
        let mut trailers = http::HeaderMap::new();
        trailers.insert(name, http::HeaderValue::from_static(value));
        StreamBody::new(futures_util::stream::iter(vec![
            Ok(Frame::data(data)),
            Ok(Frame::trailers(trailers)),
        ]))
    }

    // The origin answers with what it got, and trailers of its own.
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let got = req.into_body().collect().await.unwrap();
                        let checksum = got
                            .trailers()
                            .and_then(|t| t.get("x-checksum"))
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_else(|| "none".into());
                        let text =
                            format!("{} + {checksum}", String::from_utf8_lossy(&got.to_bytes()));
                        Ok::<_, std::convert::Infallible>(http::Response::new(with_trailers(
                            text.into(),
                            "x-sum",
                            "42",
                        )))
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let mut origin =
        OriginConfig::new("h2", OriginTarget::parse(&format!("h2c://{addr}")).unwrap());
    origin.http2 = true;
    let (edge, conn) = h2_tunnel(origin).await;

    let tls = tls_connect(edge.https.unwrap(), &edge.identity, b"h2").await;
    let (mut sender, c) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(c);
    let req = http::Request::post("https://app.test/upload")
        .header("te", "trailers")
        .body(with_trailers(
            bytes::Bytes::from_static(b"hello"),
            "x-checksum",
            "abc",
        ))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.trailers().and_then(|t| t.get("x-sum")).unwrap(), "42");
    assert_eq!(&got.to_bytes()[..], b"hello + abc");
    conn.stop().await;
}
