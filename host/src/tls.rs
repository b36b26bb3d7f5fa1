//! TLS configurations: the edge's QUIC and HTTPS servers, the connector's view of edges, and
//! the connector's client for `https://` origins. All use rustls with the ring provider.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::TlsIdentity;
use crate::proto;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the certificate, key or settings.
    #[error("invalid TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    /// The settings are not usable for QUIC.
    #[error("invalid QUIC TLS setup: {0}")]
    Quic(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The provider of the tunnel's own links (QUIC and TCP, edge and connector), which offers
/// AES-128-GCM first. The edge, like any rustls server, follows the client's order, so the
/// connector's choice decides: a connector of this version runs its link on AES-128-GCM
/// rather than on rustls's first choice, AES-256-GCM. X25519, the key exchange, gives about
/// 128 bits of security, which a 256-bit key does not raise, and AES-256 takes 14 rounds per
/// block against 10 (sealing and opening were a quarter of each process's CPU on bulk
/// transfers). The other suites stay, in rustls's order, for peers that lack it; a connector
/// of an earlier version still gets AES-256-GCM. Public HTTPS listeners and origin clients
/// keep rustls's defaults.
fn tunnel_provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let first = rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
    p.cipher_suites.sort_by_key(|s| s.suite() != first);
    Arc::new(p)
}

/// System roots, loaded once. Unreadable entries are skipped (and logged once).
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for err in &loaded.errors {
            tracing::debug!(cause = %err, "skipped part of the system certificate store");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
        tracing::debug!(added, ignored, "loaded system root certificates");
        roots
    })
}

fn roots_with(extra: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = system_roots().clone();
    for cert in extra {
        roots.add(cert.clone())?;
    }
    Ok(roots)
}

/// A listener's certificate and key, which a reload may replace: handshakes after
/// [`ServerCert::replace`] present the new pair, connections already open keep theirs.
#[derive(Debug)]
pub struct ServerCert(arc_swap::ArcSwap<CertifiedKey>);

impl ServerCert {
    /// Checks that `identity`'s key matches its certificate.
    pub fn new(identity: &TlsIdentity) -> Result<Arc<ServerCert>, TlsError> {
        Ok(Arc::new(ServerCert(arc_swap::ArcSwap::from_pointee(
            certified_key(identity)?,
        ))))
    }

    /// Presents `identity` from the next handshake on.
    pub fn replace(&self, identity: &TlsIdentity) -> Result<(), TlsError> {
        self.0.store(Arc::new(certified_key(identity)?));
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The certificate chain and its loaded key; fails when the key is not the certificate's.
fn certified_key(identity: &TlsIdentity) -> Result<CertifiedKey, TlsError> {
    Ok(CertifiedKey::from_der(
        identity.chain.clone(),
        identity.key.clone_key(),
        &provider(),
    )?)
}

/// Checks what a listener needs of its certificate and key, so that a file that would fail
/// at start or at a client's handshake is refused when it is read: the key matches the
/// certificate, and the certificate is valid now and usable by a server (not a CA
/// certificate, which clients refuse as `CaUsedAsEndEntity`). The names it holds are not
/// checked: only clients know which name they expect.
pub fn check_server_identity(identity: &TlsIdentity) -> Result<(), String> {
    certified_key(identity).map_err(|e| match e {
        TlsError::Rustls(rustls::Error::InconsistentKeys(_)) => {
            "the private key does not belong to the certificate (the first one in the file)"
                .to_string()
        }
        other => other.to_string(),
    })?;
    let (leaf, rest) = identity
        .chain
        .split_first()
        .ok_or("the certificate file holds no certificate")?;
    // Verify the leaf against the chain's last certificate as if it were trusted: what
    // remains are the leaf's own defects.
    let mut anchor = RootCertStore::empty();
    let top = rest.last().unwrap_or(leaf);
    anchor
        .add(top.clone())
        .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(anchor), provider())
            .build()
            .map_err(|e| e.to_string())?;
    let probe = ServerName::try_from("name-not-checked.invalid").expect("valid name");
    match verifier.verify_server_cert(leaf, rest, &probe, &[], UnixTime::now()) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. },
        )) => Ok(()),
        Err(e) if e.to_string().contains("CaUsedAsEndEntity") => Err(
            "the certificate is a CA certificate (basicConstraints CA:TRUE), which clients refuse \
             for a server (CaUsedAsEndEntity): use `sluice cert new`, or with openssl add \
             `-addext basicConstraints=critical,CA:FALSE`"
                .into(),
        ),
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
        )) => Err("the certificate has expired".into()),
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidYet
            | rustls::CertificateError::NotValidYetContext { .. },
        )) => Err("the certificate is not valid yet".into()),
        Err(e) => Err(format!("the certificate is not usable by a server: {e}")),
    }
}

/// The edge's QUIC server config: TLS 1.3, ALPN `sluice/1`.
pub fn quic_server(cert: Arc<ServerCert>) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(tunnel_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // A connector opens one stream, the control stream; every other stream is the edge's.
    cfg.transport_config(Arc::new(transport(1)));
    Ok(cfg)
}

/// The connector's QUIC client config: system roots plus `extra_ca`, ALPN `sluice/1`.
pub fn quic_client(extra_ca: &[CertificateDer<'static>]) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(tunnel_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots_with(extra_ca)?)
        .with_no_client_auth();
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport(MAX_REQUEST_STREAMS)));
    Ok(cfg)
}

/// A client's TLS config for the edge's HTTPS listener (`sluice access`): system roots plus
/// `extra_ca`; the caller sets ALPN.
pub fn https_client(
    extra_ca: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots_with(extra_ca)?)
        .with_no_client_auth())
}

/// The edge's TLS config for connectors over TCP: TLS 1.3 only, ALPN `sluice-h2/1`, the
/// same certificate as the QUIC listener.
pub fn tcp_server(cert: Arc<ServerCert>) -> Result<rustls::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(tunnel_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![proto::ALPN_TCP.to_vec()];
    Ok(tls)
}

/// The connector's TLS config for edges over TCP: system roots plus `extra_ca`, TLS 1.3,
/// ALPN `sluice-h2/1`.
pub fn tcp_client(extra_ca: &[CertificateDer<'static>]) -> Result<rustls::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(tunnel_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots_with(extra_ca)?)
        .with_no_client_auth();
    tls.alpn_protocols = vec![proto::ALPN_TCP.to_vec()];
    Ok(tls)
}

/// Request streams the edge may have open at once on one connector connection.
pub const MAX_REQUEST_STREAMS: u32 = 4096;

/// QUIC transport settings of both ends; `peer_streams` is how many bidirectional streams the
/// peer may open at once.
///
/// The edge opens one bidirectional stream per request, so the connector's grant is the
/// number of concurrent requests one connection can carry; the edge grants a connector only
/// its control stream. Windows bound the memory a single stream or connection can hold in
/// flight.
fn transport(peer_streams: u32) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(peer_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.keep_alive_interval(Some(std::time::Duration::from_secs(10)));
    // Infallible: 30 s is far below the VarInt limit.
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(std::time::Duration::from_secs(30)).expect("30s fits"),
    ));
    t.stream_receive_window((1u32 << 20).into());
    t.receive_window((16u32 << 20).into());
    t.send_window(16 << 20);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(crate::transport::quic::MAX_DATAGRAM);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// The edge's HTTPS server config: HTTP/2 and HTTP/1.1 by ALPN.
pub fn https_server(cert: Arc<ServerCert>) -> Result<rustls::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

/// TLS client config for an `https://` (or `unix+tls:`) origin, presenting `identity` if the
/// origin asks for a client certificate. hyper-rustls sets ALPN itself (h2 and http/1.1, or
/// http/1.1 only).
pub fn origin_client(
    extra_ca: &[CertificateDer<'static>],
    danger_accept_invalid_certs: bool,
    identity: Option<&crate::config::TlsIdentity>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = if danger_accept_invalid_certs {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider())))
    } else {
        builder.with_root_certificates(roots_with(extra_ca)?)
    };
    Ok(match identity {
        Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    })
}

/// Verifier for `danger-accept-invalid-certs`: checks signatures, trusts any certificate.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A self-signed identity for the given names (the demo and tests).
pub fn self_signed(names: &[&str]) -> Result<TlsIdentity, rcgen::Error> {
    let ck = rcgen::generate_simple_self_signed(
        names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )?;
    Ok(TlsIdentity {
        chain: vec![ck.cert.der().clone()],
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite;

    /// A TLS handshake over loopback TCP between `client` and the edge's TCP-transport
    /// server config with identity `id`; the suite each end negotiated.
    async fn handshake(
        id: &TlsIdentity,
        client: rustls::ClientConfig,
    ) -> (CipherSuite, CipherSuite) {
        let server = tcp_server(ServerCert::new(id).unwrap()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let accepted = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            tls.get_ref().1.negotiated_cipher_suite().unwrap().suite()
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await
            .unwrap();
        let ours = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        (ours, accepted.await.unwrap())
    }

    #[tokio::test]
    async fn the_tunnel_runs_on_aes_128_gcm_and_accepts_a_peer_that_prefers_another_suite() {
        let id = self_signed(&["localhost"]).unwrap();
        let client = tcp_client(&id.chain).unwrap();
        let suite = CipherSuite::TLS13_AES_128_GCM_SHA256;
        assert_eq!(handshake(&id, client).await, (suite, suite));

        // A connector of an earlier version offers rustls's order, AES-256-GCM first: the
        // edge follows the client's preference.
        let older = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots_with(&id.chain).unwrap())
            .with_no_client_auth();
        let suite = CipherSuite::TLS13_AES_256_GCM_SHA384;
        assert_eq!(handshake(&id, older).await, (suite, suite));
    }
}
