//! Bodies and upgraded connections through the tunnel: large transfers byte-exact, WebSocket
//! frames both ways, and a failure mid-body that must not look like a clean end.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use support::*;
use tokio_tungstenite::tungstenite::Message;

const BIG: u64 = 64 << 20;

/// Deterministic bytes: block `i` of 64 KiB filled from a tiny xorshift seeded with `i`.
fn block(i: u64) -> Bytes {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(64 * 1024);
    while out.len() < 64 * 1024 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(out)
}

fn body_of(total: u64) -> sluice::relay::HttpBody {
    let blocks = total / (64 * 1024);
    let stream = futures_util::stream::iter(
        (0..blocks).map(|i| Ok::<_, sluice::relay::BoxError>(Frame::data(block(i)))),
    );
    BodyExt::boxed(StreamBody::new(stream))
}

fn digest_of(total: u64) -> String {
    let mut h = Sha256::new();
    for i in 0..total / (64 * 1024) {
        h.update(block(i));
    }
    hex::encode(h.finalize())
}

/// POST /upload → "len sha256" of the body; GET /download/N → N deterministic bytes;
/// GET /broken → half a declared body, then the connection dies.
async fn transfer_origin() -> std::net::SocketAddr {
    start_origin(|req: Request<Incoming>| async move {
        let path = req.uri().path().to_string();
        if path == "/upload" {
            let mut body = req.into_body();
            let mut h = Sha256::new();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    n += data.len() as u64;
                    h.update(&data);
                }
            }
            return Response::new(sluice::relay::full(format!(
                "{n} {}",
                hex::encode(h.finalize())
            )));
        }
        if let Some(n) = path.strip_prefix("/download/") {
            let n: u64 = n.parse().unwrap();
            let mut resp = Response::new(body_of(n));
            resp.headers_mut().insert("content-length", n.into());
            return resp;
        }
        // /broken: 128 KiB chunked, then the origin fails.
        let stream = futures_util::stream::unfold(0u64, |i| async move {
            match i {
                0 | 1 => Some((Ok(Frame::data(block(i))), i + 1)),
                2 => {
                    // Let the head and the first bytes reach the client before failing.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Some((
                        Err::<Frame<Bytes>, sluice::relay::BoxError>("origin crashed".into()),
                        3,
                    ))
                }
                _ => None,
            }
        });
        // No content-length: chunked, so only a reset (not a short body) can tell the client.
        Response::new(BodyExt::boxed(StreamBody::new(stream)))
    })
    .await
}

async fn next(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Message {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

/// Signals when dropped.
struct DropSignal(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

over_both_transports! {
    #[tokio::test]
    async fn large_upload_and_download_arrive_byte_exact() {
        let origin = transfer_origin().await;
        let (edge, conn) = app_tunnel(vec![http_origin("o", origin)]).await;

        let tcp = tokio::net::TcpStream::connect(edge.http).await.unwrap();
        let (mut sender, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(c);

        // Upload without a content-length: streamed chunked all the way.
        let req = Request::post("/upload")
            .header("host", "app.test")
            .body(body_of(BIG))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(300), sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let text = String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        assert_eq!(text, format!("{BIG} {}", digest_of(BIG)));

        // Download on the same client connection.
        let req = Request::get(format!("/download/{BIG}"))
            .header("host", "app.test")
            .body(sluice::relay::empty())
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(300), sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-length"], BIG.to_string().as_str());
        let mut body = resp.into_body();
        let mut h = Sha256::new();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(d) = frame.unwrap().into_data() {
                n += d.len() as u64;
                h.update(&d);
            }
        }
        assert_eq!(n, BIG);
        assert_eq!(hex::encode(h.finalize()), digest_of(BIG));
        conn.stop().await;
    }

    #[tokio::test]
    async fn origin_failure_mid_body_is_not_a_clean_end() {
        let origin = transfer_origin().await;
        let (edge, conn) = app_tunnel(vec![http_origin("o", origin)]).await;

        let tcp = tokio::net::TcpStream::connect(edge.http).await.unwrap();
        let (mut sender, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(c);
        let req = Request::get("/broken")
            .header("host", "app.test")
            .body(sluice::relay::empty())
            .unwrap();
        let resp = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let result = tokio::time::timeout(WAIT, resp.into_body().collect())
            .await
            .unwrap();
        assert!(
            result.is_err(),
            "a truncated body must surface as an error to the client"
        );
        conn.stop().await;
    }

    #[tokio::test]
    async fn websocket_frames_flow_both_ways() {
        // A WebSocket echo origin that also greets first, so both directions are exercised.
        let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
        let origin = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
                    ws.send(Message::text("hello from origin")).await.unwrap();
                    while let Some(Ok(msg)) = ws.next().await {
                        match msg {
                            Message::Text(t) => {
                                ws.send(Message::text(format!("echo: {t}"))).await.unwrap()
                            }
                            Message::Binary(b) => ws.send(Message::binary(b)).await.unwrap(),
                            Message::Close(_) => break,
                            _ => {}
                        }
                    }
                });
            }
        });
        let (edge, conn) = app_tunnel(vec![http_origin("ws", origin)]).await;

        let tcp = tokio::net::TcpStream::connect(edge.http).await.unwrap();
        let (mut ws, resp) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::client_async("ws://app.test/socket", tcp),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(next(&mut ws).await, Message::text("hello from origin"));
        for i in 0..20 {
            ws.send(Message::text(format!("ping {i}"))).await.unwrap();
            assert_eq!(
                next(&mut ws).await,
                Message::text(format!("echo: ping {i}"))
            );
        }
        let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        ws.send(Message::binary(blob.clone())).await.unwrap();
        assert_eq!(next(&mut ws).await, Message::binary(blob));
        ws.close(None).await.unwrap();
        conn.stop().await;
    }

    #[tokio::test]
    async fn client_leaving_mid_download_stops_the_origin_body() {
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel();
        let gone_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(gone_tx)));
        let origin = start_origin(move |_req: Request<Incoming>| {
            let signal = DropSignal(gone_tx.lock().unwrap().take());
            async move {
                // An endless body, one 16 KiB chunk every 20 ms; the signal fires when hyper drops it.
                let stream = futures_util::stream::unfold(signal, |signal| async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Some((
                        Ok::<_, sluice::relay::BoxError>(Frame::data(Bytes::from(vec![
                            7u8;
                            16 * 1024
                        ]))),
                        signal,
                    ))
                });
                Response::new(BodyExt::boxed(StreamBody::new(stream)))
            }
        })
        .await;
        let (edge, conn) = app_tunnel(vec![http_origin("o", origin)]).await;

        let tcp = tokio::net::TcpStream::connect(edge.http).await.unwrap();
        let (mut sender, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        let client_conn = tokio::spawn(c);
        let req = Request::get("/stream")
            .header("host", "app.test")
            .body(sluice::relay::empty())
            .unwrap();
        let resp = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        let mut body = resp.into_body();
        let mut got = 0;
        while got < 64 * 1024 {
            let frame = tokio::time::timeout(WAIT, body.frame())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            got += frame.data_ref().map_or(0, |d| d.len());
        }
        // The client goes away mid-body.
        drop(body);
        drop(sender);
        client_conn.abort();
        tokio::time::timeout(WAIT, gone_rx)
            .await
            .expect("the origin kept streaming after the client left")
            .unwrap();
        conn.stop().await;
    }
}
