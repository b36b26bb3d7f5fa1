//! TLS on the client side of the edge (HTTPS with HTTP/1.1 and HTTP/2) and towards origins
//! (verified by default, custom CA, server-name override, the danger knob).

mod support;

use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;

/// An edge with an HTTPS listener presenting `public`, and a registered connector whose
/// origin echoes requests (its address returned too).
async fn https_tunnel(
    public: &sluice::config::TlsIdentity,
) -> (EdgeHandle, ConnectorHandle, std::net::SocketAddr) {
    let origin = echo_origin("web").await;
    let public = public.clone();
    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], move |c| {
        c.https = Some(sluice::config::HttpsConfig {
            listen: loopback(),
            identity: public,
        });
    })
    .await;
    let conn = start_connector(connector_config(
        &edge,
        "app",
        "t",
        vec![http_origin("web", origin)],
        vec![],
    ))
    .await;
    conn.registered(1).await;
    (edge, conn, origin)
}

#[tokio::test]
async fn https_listener_speaks_http1_and_http2() {
    let public = identity();
    let (edge, conn, _origin) = https_tunnel(&public).await;
    let https = edge.https.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // HTTP/2, negotiated by ALPN; the authority comes from :authority.
    let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
    let tls = client_tls(&public, &[b"h2"])
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, c) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(c);
    let req = Request::get("https://app.test/h2")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Full::<bytes::Bytes>::default())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["path"], "/h2");
    assert_eq!(body["headers"]["x-forwarded-proto"][0], "https");
    assert_eq!(body["headers"]["host"][0], "app.test");
    assert_eq!(
        body["headers"]["cookie"],
        serde_json::json!(["a=1; b=2"]),
        "HTTP/2 cookies are joined for HTTP/1.1"
    );

    // HTTP/1.1 over TLS.
    let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
    let tls = client_tls(&public, &[b"http/1.1"])
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, c) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(c);
    let req = Request::get("/h1")
        .header("host", "app.test")
        .body(Full::<bytes::Bytes>::default())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    conn.stop().await;
}

/// An HTTPS origin with a self-signed certificate for "localhost".
async fn tls_origin() -> (std::net::SocketAddr, sluice::config::TlsIdentity) {
    start_tls_origin(|_req: Request<Incoming>| async {
        Response::new(sluice::relay::full("secure hello"))
    })
    .await
}

#[tokio::test]
async fn tls_origins_are_verified_by_default() {
    let (addr, id) = tls_origin().await;
    let url: http::Uri = format!("https://{addr}").parse().unwrap();
    let target = sluice::config::OriginTarget::Http(url);
    let mut trusted = sluice::config::OriginConfig::new("trusted", target.clone());
    trusted.ca = id.chain.clone();
    trusted.server_name = Some("localhost".into());
    let untrusted = sluice::config::OriginConfig::new("untrusted", target.clone());
    let mut danger = sluice::config::OriginConfig::new("danger", target);
    danger.danger_accept_invalid_certs = true;

    let edge = start_edge(vec![tunnel("app", "t", &["app.test"])], |_| {}).await;
    let cfg = connector_config(
        &edge,
        "app",
        "t",
        vec![trusted, untrusted, danger],
        vec![
            rule(None, Some("^/trusted"), "trusted"),
            rule(None, Some("^/danger"), "danger"),
            rule(None, None, "untrusted"),
        ],
    );
    let conn = start_connector(cfg).await;
    conn.registered(1).await;

    let reply = get(edge.http, "app.test", "/trusted").await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "secure hello"));
    let reply = get(edge.http, "app.test", "/untrusted").await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        reply.text(),
        "sluice connector: the TLS handshake with the origin failed\n"
    );
    let reply = get(edge.http, "app.test", "/danger").await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "secure hello"));
    conn.stop().await;
}

#[tokio::test]
async fn a_reload_replaces_the_listener_certificates_for_new_handshakes() {
    let (old_https, new_https, new_quic) = (identity(), identity(), identity());
    let (edge, conn, origin) = https_tunnel(&old_https).await;
    conn.registered(2).await;
    let https = edge.https.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let handshake = |trusted: &sluice::config::TlsIdentity| {
        let connector = client_tls(trusted, &[b"http/1.1"]);
        let name = name.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
            connector.connect(name, tcp).await
        }
    };
    assert!(handshake(&old_https).await.is_ok());
    assert!(handshake(&new_https).await.is_err());

    // New certificates for both listeners, as a SIGHUP after a renewal applies them.
    let mut cfg = sluice::config::EdgeConfig::new(loopback(), new_quic.clone());
    cfg.https = Some(sluice::config::HttpsConfig {
        listen: loopback(),
        identity: new_https.clone(),
    });
    cfg.tunnels = vec![tunnel("app", "t", &["app.test"])];
    edge.reloader.clone().unwrap().reload(&cfg);
    assert!(handshake(&new_https).await.is_ok());
    assert!(handshake(&old_https).await.is_err());

    // A connector that trusts only the new QUIC certificate registers; the connections made
    // before the renewal stay.
    let mut renewed = connector_config(&edge, "app", "t", vec![http_origin("web", origin)], vec![]);
    renewed.edge_ca = new_quic.chain.clone();
    renewed.ha_connections = 1;
    let second = start_connector(renewed.clone()).await;
    second.registered(1).await;
    assert_eq!(conn.state.registered(), 2);
    // The TCP listener for connectors presents the same, renewed certificate.
    renewed.protocol = sluice::config::TransportChoice::Http2;
    renewed.connector_id = "over-tcp".into();
    let over_tcp = start_connector(renewed).await;
    over_tcp.registered(1).await;
    let protocols: Vec<_> = over_tcp
        .state
        .connections()
        .iter()
        .map(|c| c.protocol)
        .collect();
    assert_eq!(protocols, [sluice::transport::Protocol::Http2]);
    over_tcp.stop().await;
    second.stop().await;
    conn.stop().await;
}
