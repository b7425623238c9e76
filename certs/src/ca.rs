//! The two certificate authorities of a broker and what they sign.
//!
//! The client CA signs short-lived client certificates that carry an [`Identity`]; the server CA
//! signs the broker's own TLS certificate. They are different keys with different types, so one
//! can never sign what belongs to the other.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, ServerName};

use crate::csr::PublicKey;
use crate::extension::{AUTH_CONTEXT_OID, Attributes};
use crate::identity::{Identity, IdentityError};
use crate::secret::SecretPem;

/// The CA that signs client certificates.
pub struct ClientCa(CaKey);

/// The CA that signs the broker's server certificate.
pub struct ServerCa(CaKey);

/// A freshly generated CA or key, as PEM, for the caller to store.
pub struct Generated {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM. Secret.
    pub key_pem: SecretPem,
}

/// Why a CA could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The certificate is not a CA certificate we can use.
    #[error("not a usable CA certificate: {0}")]
    BadCertificate(String),
    /// The key cannot be read or is of an unsupported type.
    #[error("the CA key cannot be used: {0}")]
    BadKey(rcgen::Error),
    /// The key does not belong to the certificate.
    #[error("the CA key does not belong to the CA certificate")]
    KeyMismatch,
    /// Generating a key or certificate failed.
    #[error("could not generate the CA: {0}")]
    Generate(rcgen::Error),
}

/// Why a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The identity does not fit in a certificate.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The host name is neither a DNS name nor an IP address.
    #[error("`{0}` is not a valid host name or IP address")]
    BadHostName(String),
    /// The requested lifetime ends after the CA's own certificate.
    #[error(
        "the certificate would outlive its CA (which ends {ca_not_after}); use a shorter lifetime, or rotate the CA (docs/operations.md)"
    )]
    OutlivesCa {
        /// When the CA certificate ends, RFC 3339.
        ca_not_after: String,
    },
    /// The system clock is outside the range certificates can express.
    #[error("the system clock is out of range")]
    Clock,
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

struct CaKey {
    cert: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl ClientCa {
    /// Creates a client CA named `name`, valid from `now` for `lifetime`.
    pub fn generate(
        name: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<(Self, Generated), CaError> {
        CaKey::generate(&format!("Postern client CA ({name})"), now, lifetime)
            .map(|(key, generated)| (Self(key), generated))
    }

    /// Loads a client CA from its certificate and private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        CaKey::from_pem(cert_pem, key_pem).map(Self)
    }

    /// Loads a client CA from its DER certificate and PEM private key.
    pub fn from_der(cert: CertificateDer<'static>, key_pem: &str) -> Result<Self, CaError> {
        CaKey::from_der(cert, key_pem).map(Self)
    }

    /// The CA certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.0.cert
    }

    /// Signs a client certificate for `identity` and `key`, valid from `now` for `lifetime`.
    ///
    /// Everything in the certificate comes from the arguments: nothing a requester wrote in a
    /// CSR other than its public key reaches it.
    pub fn issue(
        &self,
        identity: &Identity,
        key: &PublicKey,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<CertificateDer<'static>, IssueError> {
        let attributes = Attributes {
            email: identity.email.clone(),
            name: identity.name.clone(),
            groups: identity.groups.clone(),
            auth: identity.auth.clone(),
        };
        let mut params = self.0.leaf_params(now, lifetime)?;
        // An empty subject makes the SAN extension critical (RFC 5280, 4.2.1.6).
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.user.uri().try_into()?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.custom_extensions = vec![CustomExtension::from_oid_content(
            AUTH_CONTEXT_OID,
            attributes.encode()?,
        )];
        let spki = rcgen::SubjectPublicKeyInfo::from_der(key.spki_der())?;
        Ok(params.signed_by(&spki, &self.0.issuer)?.der().clone())
    }
}

impl ServerCa {
    /// Creates a server CA named `name`, valid from `now` for `lifetime`.
    pub fn generate(
        name: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<(Self, Generated), CaError> {
        CaKey::generate(&format!("Postern server CA ({name})"), now, lifetime)
            .map(|(key, generated)| (Self(key), generated))
    }

    /// Loads a server CA from its certificate and private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        CaKey::from_pem(cert_pem, key_pem).map(Self)
    }

    /// Loads a server CA from its DER certificate and PEM private key.
    pub fn from_der(cert: CertificateDer<'static>, key_pem: &str) -> Result<Self, CaError> {
        CaKey::from_der(cert, key_pem).map(Self)
    }

    /// The CA certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.0.cert
    }

    /// Creates a key and a server certificate for `host_name` (a DNS name or an IP address).
    pub fn issue_server(
        &self,
        host_name: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Generated, IssueError> {
        let san = match ServerName::try_from(host_name) {
            Ok(ServerName::DnsName(_)) => SanType::DnsName(host_name.try_into()?),
            Ok(ServerName::IpAddress(ip)) => SanType::IpAddress(std::net::IpAddr::from(ip)),
            _ => return Err(IssueError::BadHostName(host_name.to_owned())),
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = self.0.leaf_params(now, lifetime)?;
        params
            .distinguished_name
            .push(DnType::CommonName, host_name);
        params.subject_alt_names = vec![san];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.0.issuer)?;
        Ok(Generated {
            cert_pem: cert.pem(),
            key_pem: SecretPem::new(key.serialize_pem()),
        })
    }
}

impl CaKey {
    fn generate(
        common_name: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<(Self, Generated), CaError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Postern");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let (not_before, not_after) =
            validity(now, lifetime).ok_or(CaError::BadCertificate("clock out of range".into()))?;
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial().map_err(CaError::Generate)?);
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        let generated = Generated {
            cert_pem: cert.pem(),
            key_pem: SecretPem::new(key.serialize_pem()),
        };
        let ca = Self::from_pem(&generated.cert_pem, generated.key_pem.expose())?;
        Ok((ca, generated))
    }

    fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        use rustls_pki_types::pem::PemObject;

        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CaError::BadCertificate(e.to_string()))?;
        Self::from_der(cert, key_pem)
    }

    fn from_der(cert: CertificateDer<'static>, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(CaError::BadKey)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| CaError::BadCertificate(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(CaError::BadCertificate(
                "basic constraints do not say CA".into(),
            ));
        }
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(CaError::KeyMismatch);
        }
        let not_after = crate::verify::system_time(parsed.validity().not_after.timestamp())
            .ok_or(CaError::BadCertificate("validity out of range".into()))?;
        let issuer = rcgen::Issuer::from_ca_cert_der(&cert, key).map_err(CaError::BadKey)?;
        Ok(Self {
            cert,
            issuer,
            not_after,
        })
    }

    fn leaf_params(
        &self,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<CertificateParams, IssueError> {
        let (not_before, not_after) = validity(now, lifetime).ok_or(IssueError::Clock)?;
        if SystemTime::from(not_after) > self.not_after {
            return Err(IssueError::OutlivesCa {
                ca_not_after: crate::rfc3339(self.not_after),
            });
        }
        let mut params = CertificateParams::default();
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

impl fmt::Debug for ClientCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCa").finish_non_exhaustive()
    }
}

impl fmt::Debug for ServerCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCa").finish_non_exhaustive()
    }
}

impl fmt::Debug for Generated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Generated")
            .field("key_pem", &self.key_pem)
            .finish_non_exhaustive()
    }
}

/// Whole-second validity from `now` for `lifetime`, as certificates express it.
pub(crate) fn validity(
    now: SystemTime,
    lifetime: Duration,
) -> Option<(time::OffsetDateTime, time::OffsetDateTime)> {
    let start = crate::date_time(now)?;
    let end = crate::date_time(now.checked_add(lifetime)?)?;
    Some((start, end))
}

/// A positive 128-bit serial number from the system's secure random generator.
pub(crate) fn random_serial() -> Result<SerialNumber, rcgen::Error> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}
