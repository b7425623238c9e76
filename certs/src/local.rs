//! The agent's local TLS: a per-device CA, name-constrained to localhost and the loopback
//! addresses, that signs one server certificate and is then forgotten.
//!
//! Mail clients that insist on TLS to `localhost:993` trust this CA once (`postern trust`).
//! Whatever trusts a CA trusts all it signs, so the CA's key is never written anywhere: it
//! signs the server certificate in memory and is dropped. Its name constraints (critical) mean
//! that even a stolen copy of it could vouch for nothing but loopback names. When the server
//! certificate nears its end, a new CA is made and has to be trusted again.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
    SanType,
};

use crate::ca::{random_serial, validity};
use crate::{CaError, SecretPem};

/// Lifetime of the local CA and its server certificate: under the 825 days macOS accepts for a
/// TLS server certificate.
pub const LOCAL_TLS_LIFETIME: Duration = Duration::from_secs(800 * 24 * 3600);

/// A local CA certificate and the server certificate it signed.
#[derive(Debug, Clone)]
pub struct LocalTls {
    /// The CA certificate, PEM: what mail clients trust.
    pub ca_pem: String,
    /// The server certificate followed by the CA certificate, PEM.
    pub chain_pem: String,
    /// The server certificate's key.
    pub key: SecretPem,
}

impl LocalTls {
    /// Makes a CA, has it sign a certificate for `localhost`, `127.0.0.1` and `::1`, and
    /// forgets the CA's key.
    pub fn generate(now: SystemTime) -> Result<Self, CaError> {
        let (not_before, not_after) = validity(now, LOCAL_TLS_LIFETIME)
            .ok_or(CaError::BadCertificate("clock out of range".into()))?;
        Self::sign(not_before, not_after).map_err(CaError::Generate)
    }

    fn sign(
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = DistinguishedName::new();
        ca.distinguished_name
            .push(DnType::OrganizationName, "Postern");
        ca.distinguished_name.push(
            DnType::CommonName,
            "Postern local mail CA (this device only)",
        );
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.name_constraints = Some(NameConstraints {
            permitted_subtrees: vec![
                GeneralSubtree::DnsName("localhost".into()),
                GeneralSubtree::IpAddress(CidrSubnet::V4([127, 0, 0, 0], [255, 0, 0, 0])),
                GeneralSubtree::IpAddress(CidrSubnet::V6(
                    std::net::Ipv6Addr::LOCALHOST.octets(),
                    [0xff; 16],
                )),
            ],
            excluded_subtrees: Vec::new(),
        });
        ca.not_before = not_before;
        ca.not_after = not_after;
        ca.serial_number = Some(random_serial()?);
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca, ca_key);

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut server = CertificateParams::default();
        server.distinguished_name = DistinguishedName::new();
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
        ];
        server.is_ca = IsCa::ExplicitNoCa;
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.not_before = not_before;
        server.not_after = not_after;
        server.serial_number = Some(random_serial()?);
        let cert = server.signed_by(&key, &issuer)?;
        // `issuer`, and with it the CA's key, is dropped here.
        Ok(Self {
            ca_pem: ca_cert.pem(),
            chain_pem: format!("{}{}", cert.pem(), ca_cert.pem()),
            key: SecretPem::new(key.serialize_pem()),
        })
    }

    /// When the server certificate ends; `None` when the chain cannot be read.
    pub fn not_after(&self) -> Option<SystemTime> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(self.chain_pem.as_bytes()).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
        let seconds = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
    }

    /// The TLS settings of a local listener serving this certificate.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, crate::TlsError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_slice_iter(self.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| crate::TlsError::Unusable(format!("the local certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(self.key.expose().as_bytes())
            .map_err(|e| crate::TlsError::Unusable(format!("the local key: {e}")))?;
        let config = rustls::ServerConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    fn verify(tls: &LocalTls, name: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(tls.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            crate::provider(),
        )
        .build()
        .unwrap();
        let chain: Vec<_> = CertificateDer::pem_slice_iter(tls.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            &*verifier,
            &chain[0],
            &chain[1..],
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
    }

    #[test]
    fn serves_loopback_names_only() {
        let tls = LocalTls::generate(SystemTime::now()).unwrap();
        for name in ["localhost", "127.0.0.1", "::1"] {
            verify(&tls, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(verify(&tls, "mail.example.org").is_err());
    }

    #[test]
    fn the_ca_is_name_constrained_critically() {
        let tls = LocalTls::generate(SystemTime::now()).unwrap();
        let der = CertificateDer::from_pem_slice(tls.ca_pem.as_bytes()).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&der).unwrap();
        let constraints = ca
            .extensions()
            .iter()
            .find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_NAME_CONSTRAINTS)
            .expect("a name constraints extension");
        assert!(constraints.critical);
        let left = tls
            .not_after()
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(left > LOCAL_TLS_LIFETIME - Duration::from_secs(60));
        tls.server_config().unwrap();
    }
}
