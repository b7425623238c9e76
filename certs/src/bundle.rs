//! Identity bundles: everything a device needs to reach a broker, in one TOML file.
//!
//! `postern-broker issue` writes a bundle for a headless machine or for break-glass use;
//! `postern login --bundle` imports it. The agent keeps its own identity in the same format.

use std::collections::BTreeMap;

use postern_proto::ServiceName;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::secret::{Sealed, SecretPem};
use crate::tls::ClientCredential;
use crate::verify::{CertificateContents, VerifyError, inspect_unverified};

/// The format line of version 1 bundles.
pub const BUNDLE_FORMAT: &str = "postern-bundle/1";

/// The `server_trust` of a bundle whose broker has a publicly trusted certificate.
const PUBLIC_ROOTS: &str = "public-roots";

/// Largest bundle read, in bytes.
pub const MAX_BUNDLE_LEN: usize = 256 * 1024;

const HEADER: &str = "\
# Postern identity bundle.
# It holds a private key unless it was issued for a signing request: keep it secret.
# Import it with `postern login --bundle FILE`, then delete this file.
";

/// A device's credentials and where to use them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Address the agent dials: `HOST:PORT`.
    pub broker: String,
    /// Name in the broker's server certificate.
    pub server_name: String,
    /// CA certificates the broker's certificate is checked against; none means the publicly
    /// trusted roots.
    pub server_cas: Vec<CertificateDer<'static>>,
    /// The client certificate.
    pub certificate: CertificateDer<'static>,
    /// The client key, unless the certificate was issued for a key made elsewhere.
    pub key: Option<SecretPem>,
    /// The broker's services and the local port each is served on by default.
    pub services: BTreeMap<ServiceName, BundleService>,
    /// What renews the certificate, when it came from `postern login`.
    pub login: Option<Login>,
}

/// The state of a login: how to renew it and until when it may be renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// The refresh token, sealed by the broker; absent when the IdP gave none.
    pub sealed: Option<Sealed>,
    /// When the login ends: no renewal reaches past it.
    pub session_ends: std::time::SystemTime,
}

/// A service as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleService {
    /// Local port the agent listens on by default.
    pub port: u16,
    /// How the agent serves it locally: `tcp` (default) or `imap`.
    #[serde(default, with = "kind", skip_serializing_if = "is_tcp")]
    pub protocol: postern_proto::ServiceKind,
}

fn is_tcp(kind: &postern_proto::ServiceKind) -> bool {
    *kind == postern_proto::ServiceKind::Tcp
}

/// `ServiceKind` by its name in bundles.
mod kind {
    use postern_proto::ServiceKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(kind: &ServiceKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(kind.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ServiceKind, D::Error> {
        let name = String::deserialize(d)?;
        ServiceKind::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown service protocol `{name}` (known: tcp, imap); this postern may be older than the broker"
            ))
        })
    }
}

/// Why a bundle cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The file is not a bundle.
    #[error("not a Postern identity bundle: {0}")]
    Syntax(String),
    /// The bundle is of an unknown format version.
    #[error("unknown bundle format `{0}` (this version reads `{BUNDLE_FORMAT}`)")]
    Format(String),
    /// A PEM field is unusable.
    #[error("the bundle's `{0}` is not valid PEM")]
    Pem(&'static str),
    /// A field has an invalid value.
    #[error("the bundle's `{0}` is invalid")]
    Field(&'static str),
    /// A service name is invalid.
    #[error("the bundle names an invalid service `{0}`")]
    Service(String),
    /// The certificate does not carry a Postern identity.
    #[error(transparent)]
    Certificate(#[from] VerifyError),
    /// The key is missing.
    #[error("the bundle holds no private key")]
    NoKey,
    /// The key does not belong to the certificate.
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBundle {
    format: String,
    broker: String,
    server_name: String,
    server_ca: String,
    /// `"public-roots"` when `server_ca` is empty: trusting every public CA is never implied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server_trust: Option<String>,
    certificate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default)]
    services: BTreeMap<String, BundleService>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    login: Option<RawLogin>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogin {
    session_ends: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed_refresh_token: Option<String>,
}

impl Bundle {
    /// Parses a bundle and checks that its parts are usable.
    pub fn from_toml(text: &str) -> Result<Self, BundleError> {
        if text.len() > MAX_BUNDLE_LEN {
            return Err(BundleError::Syntax(format!(
                "larger than {MAX_BUNDLE_LEN} bytes"
            )));
        }
        let raw: RawBundle =
            toml::from_str(text).map_err(|e| BundleError::Syntax(e.message().to_owned()))?;
        if raw.format != BUNDLE_FORMAT {
            return Err(BundleError::Format(raw.format));
        }
        let server_cas = CertificateDer::pem_slice_iter(raw.server_ca.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| BundleError::Pem("server_ca"))?;
        match (server_cas.is_empty(), raw.server_trust.as_deref()) {
            (false, None) | (true, Some(PUBLIC_ROOTS)) => {}
            (true, None) => return Err(BundleError::Pem("server_ca")),
            (_, Some(_)) => return Err(BundleError::Field("server_trust")),
        }
        let certificate = CertificateDer::from_pem_slice(raw.certificate.as_bytes())
            .map_err(|_| BundleError::Pem("certificate"))?;
        let services = raw
            .services
            .into_iter()
            .map(|(name, service)| {
                Ok((
                    ServiceName::new(&name).map_err(|_| BundleError::Service(name))?,
                    service,
                ))
            })
            .collect::<Result<_, BundleError>>()?;
        let login = raw
            .login
            .map(|login| {
                let session_ends = crate::parse_rfc3339(&login.session_ends)
                    .ok_or(BundleError::Field("login.session_ends"))?;
                let sealed = login
                    .sealed_refresh_token
                    .map(|text| STANDARD.decode(text).map(Sealed::new))
                    .transpose()
                    .map_err(|_| BundleError::Field("login.sealed_refresh_token"))?;
                Ok::<_, BundleError>(Login {
                    sealed,
                    session_ends,
                })
            })
            .transpose()?;
        let bundle = Self {
            broker: raw.broker,
            server_name: raw.server_name,
            server_cas,
            certificate,
            key: raw.key.map(SecretPem::new),
            services,
            login,
        };
        bundle.inspect()?;
        if bundle.key.is_some() {
            bundle.credential()?;
        }
        Ok(bundle)
    }

    /// The bundle as TOML, with a header saying what it is.
    pub fn to_toml(&self) -> String {
        let pem = |der: &[u8]| pem_block("CERTIFICATE", der);
        let raw = RawBundle {
            format: BUNDLE_FORMAT.to_owned(),
            broker: self.broker.clone(),
            server_name: self.server_name.clone(),
            server_ca: self.server_cas.iter().map(|c| pem(c)).collect(),
            server_trust: self.server_cas.is_empty().then(|| PUBLIC_ROOTS.to_owned()),
            certificate: pem(&self.certificate),
            key: self.key.as_ref().map(|k| k.expose().to_owned()),
            services: self
                .services
                .iter()
                .map(|(name, s)| (name.to_string(), *s))
                .collect(),
            login: self.login.as_ref().map(|login| RawLogin {
                session_ends: crate::rfc3339(login.session_ends),
                sealed_refresh_token: login.sealed.as_ref().map(|s| STANDARD.encode(s.expose())),
            }),
        };
        // Serializing plain strings and maps cannot fail.
        format!("{HEADER}{}", toml::to_string(&raw).unwrap_or_default())
    }

    /// Reads the certificate without verifying it, to show who it is for and until when.
    pub fn inspect(&self) -> Result<CertificateContents, VerifyError> {
        inspect_unverified(&self.certificate)
    }

    /// The certificate and key for a TLS client, after checking that they belong together.
    pub fn credential(&self) -> Result<ClientCredential, BundleError> {
        let key_pem = self.key.as_ref().ok_or(BundleError::NoKey)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.expose().as_bytes())
            .map_err(|_| BundleError::Pem("key"))?;
        check_key_matches(&self.certificate, key_pem)?;
        Ok(ClientCredential {
            chain: vec![self.certificate.clone()],
            key,
        })
    }
}

/// Checks that `key_pem` is the private key of `certificate`.
pub fn check_key_matches(
    certificate: &CertificateDer<'_>,
    key_pem: &SecretPem,
) -> Result<(), BundleError> {
    let key = rcgen::KeyPair::from_pem(key_pem.expose()).map_err(|_| BundleError::Pem("key"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate)
        .map_err(|_| BundleError::Pem("certificate"))?;
    if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        return Err(BundleError::KeyMismatch);
    }
    Ok(())
}

/// PEM text of one DER block.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
