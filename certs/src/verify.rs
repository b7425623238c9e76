//! Verifying client certificates at a given time and reading the identity they carry.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::extension::{AUTH_CONTEXT_OID, Attributes};
use crate::identity::{Identity, UserId};

/// Checks client certificates against the broker's client CAs.
///
/// Accepted are certificates signed directly by one of the trusted CAs (matched by key, no
/// intermediates), inside their validity give or take the allowed clock skew, no longer-lived
/// than allowed, for client authentication, with exactly one Postern user id and one Postern
/// extension.
pub struct ClientVerifier {
    cas: Vec<TrustedCa>,
    anchors: Vec<TrustAnchor<'static>>,
    hints: Vec<DistinguishedName>,
    limits: VerifyLimits,
    algorithms: WebPkiSupportedAlgorithms,
}

/// Bounds applied when verifying a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyLimits {
    /// Clock difference tolerated at both ends of the validity. Default: 60 s.
    pub max_clock_skew: Duration,
    /// Longest validity period accepted. Default: 24 h.
    pub max_lifetime: Duration,
}

/// What a client certificate says: its identity and its validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateContents {
    /// The identity the certificate carries.
    pub identity: Identity,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// SHA-256 of the certificate's DER, lower-case hex.
    pub fingerprint: String,
}

/// A client certificate that verified. Only [`ClientVerifier::verify`] makes one; its contents
/// are reached through `Deref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedClient(CertificateContents);

/// Why a client certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The bytes are not an X.509 certificate.
    #[error("the certificate is not valid X.509")]
    Malformed,
    /// No trusted client CA signed the certificate.
    #[error("the certificate was not issued by this broker's client CA ({0})")]
    Untrusted(webpki::Error),
    /// The certificate's validity starts in the future.
    #[error("the certificate is not valid before {}", crate::rfc3339(*.0))]
    NotYetValid(SystemTime),
    /// The certificate has expired.
    #[error("the certificate expired at {}", crate::rfc3339(*.0))]
    Expired(SystemTime),
    /// The certificate's validity is longer than allowed.
    #[error("the certificate is valid for {} which exceeds the limit of {}", hours(*.lifetime), hours(*.limit))]
    LifetimeTooLong {
        /// The certificate's validity period.
        lifetime: Duration,
        /// The limit.
        limit: Duration,
    },
    /// The CA that signed the certificate has itself expired.
    #[error("the client CA that signed the certificate expired at {}", crate::rfc3339(*.0))]
    CaExpired(SystemTime),
    /// The certificate lacks the client-authentication extended key usage.
    #[error("the certificate is not for client authentication")]
    NotClientAuth,
    /// The certificate does not carry exactly one valid Postern identity.
    #[error("the certificate carries no valid Postern identity: {0}")]
    BadIdentity(&'static str),
}

/// Why a CA certificate cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// No CA certificate was given.
    #[error("no CA certificate given")]
    Empty,
    /// A CA certificate cannot be parsed or is not a CA.
    #[error("certificate {index} of the CA set is not a usable CA certificate")]
    BadCa {
        /// Position in the set, from 0.
        index: usize,
    },
}

/// A verifier for rustls that applies a [`ClientVerifier`] during the handshake.
///
/// Client authentication is offered and optional: a connection without a certificate
/// completes, and [`connection_role`](crate::connection_role) decides what it may do.
#[derive(Debug, Clone)]
pub struct TlsClientVerifier {
    inner: Arc<ClientVerifier>,
    provider: Arc<CryptoProvider>,
}

struct TrustedCa {
    /// As webpki's trust anchors hold it: the SubjectPublicKeyInfo without its outer tag.
    spki: Vec<u8>,
    not_after: SystemTime,
}

impl Default for VerifyLimits {
    fn default() -> Self {
        Self {
            max_clock_skew: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(24 * 3600),
        }
    }
}

impl ClientVerifier {
    /// A verifier trusting each CA in `client_cas` (a set, so that CAs can rotate).
    pub fn new(
        client_cas: &[CertificateDer<'static>],
        limits: VerifyLimits,
    ) -> Result<Self, TrustError> {
        if client_cas.is_empty() {
            return Err(TrustError::Empty);
        }
        let mut cas = Vec::new();
        let mut anchors = Vec::new();
        for (index, der) in client_cas.iter().enumerate() {
            let bad = || TrustError::BadCa { index };
            let (_, parsed) = x509_parser::parse_x509_certificate(der).map_err(|_| bad())?;
            if !parsed.is_ca() {
                return Err(bad());
            }
            let not_after = system_time(parsed.validity().not_after.timestamp()).ok_or_else(bad)?;
            let anchor = webpki::anchor_from_trusted_cert(der)
                .map_err(|_| bad())?
                .to_owned();
            cas.push(TrustedCa {
                spki: anchor.subject_public_key_info.to_vec(),
                not_after,
            });
            anchors.push(anchor);
        }
        let hints = anchors
            .iter()
            .map(|a| DistinguishedName::in_sequence(a.subject.as_ref()))
            .collect();
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        Ok(Self {
            cas,
            anchors,
            hints,
            limits,
            algorithms,
        })
    }

    /// Verifies `end_entity` at `now` and returns what it certifies.
    ///
    /// Intermediates are never used: client certificates are signed by a client CA directly.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        now: SystemTime,
    ) -> Result<VerifiedClient, VerifyError> {
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|_| VerifyError::Malformed)?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(end_entity).map_err(|_| VerifyError::Malformed)?;
        let (not_before, not_after) = validity(&parsed)?;

        // The signature is checked first, at a time inside the certificate's own validity, so
        // that every later check reads signed content.
        let at = now.clamp(not_before, not_after);
        let path = ee
            .verify_for_usage(
                self.algorithms.all,
                &self.anchors,
                &[],
                unix_time(at),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(VerifyError::Untrusted)?;
        let anchor_spki = path.anchor().subject_public_key_info.as_ref();
        let ca = self.cas.iter().find(|ca| ca.spki == anchor_spki);

        let skew = self.limits.max_clock_skew;
        let lifetime = not_after.duration_since(not_before).unwrap_or_default();
        if lifetime > self.limits.max_lifetime {
            return Err(VerifyError::LifetimeTooLong {
                lifetime,
                limit: self.limits.max_lifetime,
            });
        }
        if now.checked_add(skew).is_some_and(|late| late < not_before) {
            return Err(VerifyError::NotYetValid(not_before));
        }
        if not_after.checked_add(skew).is_some_and(|grace| grace < now) {
            return Err(VerifyError::Expired(not_after));
        }
        match ca {
            Some(ca)
                if ca
                    .not_after
                    .checked_add(skew)
                    .is_some_and(|grace| grace < now) =>
            {
                return Err(VerifyError::CaExpired(ca.not_after));
            }
            Some(_) => {}
            None => return Err(VerifyError::Untrusted(webpki::Error::UnknownIssuer)),
        }

        contents(end_entity, &parsed, not_before, not_after).map(VerifiedClient)
    }
}

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("cas", &self.cas.len())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Reads a client certificate without verifying it: for showing a device its own certificate.
///
/// Nothing returned here may be used to make an access decision; that takes a
/// [`VerifiedClient`].
pub fn inspect_unverified(der: &CertificateDer<'_>) -> Result<CertificateContents, VerifyError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(der).map_err(|_| VerifyError::Malformed)?;
    let (not_before, not_after) = validity(&parsed)?;
    contents(der, &parsed, not_before, not_after)
}

/// Whether any certificate in `a` has the same public key as any in `b`: the broker's client
/// and server CAs must be different keys.
pub fn share_a_key(a: &[CertificateDer<'_>], b: &[CertificateDer<'_>]) -> bool {
    let keys = |certs: &[CertificateDer<'_>]| -> Vec<Vec<u8>> {
        certs
            .iter()
            .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
            .map(|(_, cert)| cert.public_key().raw.to_vec())
            .collect()
    };
    let b = keys(b);
    keys(a).iter().any(|key| b.contains(key))
}

impl std::ops::Deref for VerifiedClient {
    type Target = CertificateContents;

    fn deref(&self) -> &CertificateContents {
        &self.0
    }
}

impl TlsClientVerifier {
    /// Wraps `verifier` for rustls.
    pub fn new(verifier: Arc<ClientVerifier>) -> Self {
        Self {
            inner: verifier,
            provider: crate::tls::provider(),
        }
    }
}

impl ClientCertVerifier for TlsClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.inner.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.inner.verify(
            end_entity,
            SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs()),
        ) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(err) => Err(rustls::Error::InvalidCertificate(certificate_error(
                err, now,
            ))),
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls error with the TLS alert closest to `err`, so that the agent can tell its user
/// what went wrong; `now` is the time of the check.
fn certificate_error(err: VerifyError, now: UnixTime) -> CertificateError {
    match err {
        VerifyError::Expired(not_after) | VerifyError::CaExpired(not_after) => {
            CertificateError::ExpiredContext {
                time: now,
                not_after: unix_time(not_after),
            }
        }
        VerifyError::NotYetValid(not_before) => CertificateError::NotValidYetContext {
            time: now,
            not_before: unix_time(not_before),
        },
        VerifyError::Untrusted(webpki::Error::UnknownIssuer) => CertificateError::UnknownIssuer,
        VerifyError::Untrusted(
            webpki::Error::InvalidSignatureForPublicKey
            | webpki::Error::UnsupportedSignatureAlgorithmContext(_)
            | webpki::Error::SignatureAlgorithmMismatch,
        ) => CertificateError::BadSignature,
        VerifyError::Untrusted(
            webpki::Error::RequiredEkuNotFoundContext(_) | webpki::Error::CaUsedAsEndEntity,
        )
        | VerifyError::NotClientAuth => CertificateError::InvalidPurpose,
        VerifyError::LifetimeTooLong { .. } => CertificateError::ApplicationVerificationFailure,
        VerifyError::Untrusted(_) | VerifyError::Malformed | VerifyError::BadIdentity(_) => {
            CertificateError::BadEncoding
        }
    }
}

/// The contents of a parsed certificate.
fn contents(
    der: &[u8],
    parsed: &X509Certificate<'_>,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateContents, VerifyError> {
    Ok(CertificateContents {
        identity: read_identity(parsed)?,
        not_before,
        not_after,
        serial: hex(parsed.raw_serial()),
        fingerprint: hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref()),
    })
}

fn validity(cert: &X509Certificate<'_>) -> Result<(SystemTime, SystemTime), VerifyError> {
    let validity = cert.validity();
    let not_before = system_time(validity.not_before.timestamp()).ok_or(VerifyError::Malformed)?;
    let not_after = system_time(validity.not_after.timestamp()).ok_or(VerifyError::Malformed)?;
    if not_after < not_before {
        return Err(VerifyError::Malformed);
    }
    Ok((not_before, not_after))
}

fn read_identity(cert: &X509Certificate<'_>) -> Result<Identity, VerifyError> {
    let eku = cert
        .extended_key_usage()
        .map_err(|_| VerifyError::NotClientAuth)?;
    if !eku.is_some_and(|eku| eku.value.client_auth) {
        return Err(VerifyError::NotClientAuth);
    }

    let san = cert
        .subject_alternative_name()
        .map_err(|_| VerifyError::BadIdentity("duplicate subject alternative names"))?
        .ok_or(VerifyError::BadIdentity("no subject alternative name"))?;
    let [GeneralName::URI(uri)] = san.value.general_names.as_slice() else {
        return Err(VerifyError::BadIdentity(
            "the subject alternative name must be exactly one URI",
        ));
    };
    let user = UserId::from_uri(uri)
        .map_err(|_| VerifyError::BadIdentity("the URI is not a Postern user id"))?;

    let mut ours = cert.extensions().iter().filter(|ext| {
        ext.oid
            .iter()
            .is_some_and(|arcs| arcs.eq(AUTH_CONTEXT_OID.iter().copied()))
    });
    let (Some(ext), None) = (ours.next(), ours.next()) else {
        return Err(VerifyError::BadIdentity(
            "there must be exactly one Postern extension",
        ));
    };
    if ext.critical {
        return Err(VerifyError::BadIdentity(
            "the Postern extension must not be critical",
        ));
    }
    let attributes = Attributes::decode(ext.value).ok_or(VerifyError::BadIdentity(
        "the Postern extension is malformed",
    ))?;
    Ok(Identity {
        user,
        email: attributes.email,
        name: attributes.name,
        groups: attributes.groups,
        auth: attributes.auth,
    })
}

pub(crate) fn system_time(timestamp: i64) -> Option<SystemTime> {
    let seconds = u64::try_from(timestamp).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

fn unix_time(time: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(
        time.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

fn hours(duration: Duration) -> String {
    let minutes = duration.as_secs() / 60;
    format!("{}h{:02}m", minutes / 60, minutes % 60)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
