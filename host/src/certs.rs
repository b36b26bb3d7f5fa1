//! `sluice cert new`: a private CA and a server certificate it signed, with the extensions
//! TLS clients check (the leaf is `CA:FALSE`, `serverAuth`, with its names as SANs), and
//! PKCS#8 keys.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Certificates and keys, PEM-encoded.
pub struct Issued {
    /// The CA certificate: what connectors (or clients) trust (`edge-ca`).
    pub ca_cert: String,
    /// The CA's key: keep it offline; it signs the next leaf.
    pub ca_key: String,
    /// The server certificate (leaf, then the CA).
    pub cert: String,
    /// The server's key.
    pub key: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// How long the leaf is valid, in years (browsers would want less; connectors do not care).
const LEAF_YEARS: i32 = 2;
/// How long the CA is valid, in years.
const CA_YEARS: i32 = 10;

/// Issues a CA and a server certificate for `names` (DNS names) and `ips`.
pub fn new_server_certs(names: &[String], ips: &[IpAddr]) -> Result<Issued, String> {
    if names.is_empty() && ips.is_empty() {
        return Err("give at least one --name or --ip".into());
    }
    for name in names {
        crate::config::HostPattern::try_from(name.as_str())
            .map_err(|e| format!("invalid --name {name:?}: {e}"))?;
    }
    let fail = |e: rcgen::Error| format!("cannot issue the certificates: {e}");
    let year = this_year();
    let label = names
        .first()
        .cloned()
        .or_else(|| ips.first().map(IpAddr::to_string))
        .unwrap_or_default();

    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, format!("sluice CA for {label}"));
    ca.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    ca.not_after = rcgen::date_time_ymd(year + CA_YEARS, 1, 1);
    let ca_key = KeyPair::generate().map_err(fail)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(fail)?;

    let mut leaf = CertificateParams::new(names.to_vec()).map_err(fail)?;
    leaf.subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.distinguished_name.push(DnType::CommonName, label);
    leaf.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    leaf.not_after = rcgen::date_time_ymd(year + LEAF_YEARS, 1, 1);
    let key = KeyPair::generate().map_err(fail)?;
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).map_err(fail)?;

    Ok(Issued {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        cert: format!("{}{}", cert.pem(), ca_cert.pem()),
        key: key.serialize_pem(),
    })
}

/// The current year (UTC), near enough for validity periods that start a year back.
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    1970 + (secs / 31_556_952) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsIdentity;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    fn identity(issued: &Issued) -> TlsIdentity {
        TlsIdentity {
            chain: CertificateDer::pem_slice_iter(issued.cert.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap(),
            key: PrivateKeyDer::from_pem_slice(issued.key.as_bytes()).unwrap(),
        }
    }

    #[test]
    fn the_leaf_passes_the_listener_checks_and_the_ca_verifies_it() {
        let issued = new_server_certs(
            &["edge.example.com".into()],
            &["127.0.0.1".parse().unwrap()],
        )
        .unwrap();
        assert!(
            issued.key.starts_with("-----BEGIN PRIVATE KEY-----"),
            "PKCS#8"
        );
        let id = identity(&issued);
        assert_eq!(id.chain.len(), 2, "leaf then CA");
        crate::tls::check_server_identity(&id).unwrap();
        // A client trusting only the CA accepts the leaf for its DNS name and its IP.
        let ca = CertificateDer::from_pem_slice(issued.ca_cert.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        for name in ["edge.example.com", "127.0.0.1"] {
            let name = rustls_pki_types::ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(
                    &id.chain[0],
                    &id.chain[1..],
                    &name,
                    &[],
                    rustls_pki_types::UnixTime::now(),
                )
                .unwrap();
        }
    }

    #[test]
    fn a_ca_certificate_or_a_foreign_key_is_refused_with_a_reason() {
        let issued = new_server_certs(&["edge.example.com".into()], &[]).unwrap();
        // The CA as a server certificate: what `openssl req -x509` produces by default.
        let as_server = TlsIdentity {
            chain: vec![CertificateDer::from_pem_slice(issued.ca_cert.as_bytes()).unwrap()],
            key: PrivateKeyDer::from_pem_slice(issued.ca_key.as_bytes()).unwrap(),
        };
        let err = crate::tls::check_server_identity(&as_server).unwrap_err();
        assert!(err.contains("CA:TRUE"), "{err}");
        // The leaf with the CA's key.
        let mut mismatched = identity(&issued);
        mismatched.key = PrivateKeyDer::from_pem_slice(issued.ca_key.as_bytes()).unwrap();
        let err = crate::tls::check_server_identity(&mismatched).unwrap_err();
        assert!(err.contains("does not belong to the certificate"), "{err}");
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(new_server_certs(&[], &[]).is_err());
        assert!(new_server_certs(&["not a name".into()], &[]).is_err());
    }
}
