//! How an agent that has never met a broker knows it is the right one: pins and public roots.
//!
//! A pin is `sha256/` and the base64 of the SHA-256 of a CA's SubjectPublicKeyInfo, as an admin
//! hands it out with the login command. The broker sends that CA after its own certificate; the
//! agent accepts the chain only when a CA in it has a pinned key and the broker's certificate is
//! valid for the broker's name under that CA. There is no trust on first use.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::digest;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::tls::{TlsError, provider};

/// The SHA-256 of a CA's public key (SubjectPublicKeyInfo DER).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pin([u8; 32]);

/// Why a pin does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a pin: expected `sha256/` and 44 characters of base64, as `postern-broker init` prints"
)]
pub struct PinError(String);

/// Checks a broker's certificate against pinned CA keys.
#[derive(Debug)]
struct PinnedVerifier {
    pins: Vec<Pin>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Pin {
    /// The pin of a certificate's public key.
    pub fn of(certificate: &CertificateDer<'_>) -> Result<Self, TlsError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(certificate)
            .map_err(|e| TlsError::Unusable(format!("the certificate does not parse: {e}")))?;
        Ok(Self::of_spki(parsed.public_key().raw))
    }

    /// The pin of SubjectPublicKeyInfo DER.
    pub fn of_spki(spki: &[u8]) -> Self {
        let mut pin = [0; 32];
        pin.copy_from_slice(digest::digest(&digest::SHA256, spki).as_ref());
        Self(pin)
    }

    /// Whether `certificate`'s public key is this one.
    pub fn matches(&self, certificate: &CertificateDer<'_>) -> bool {
        Self::of(certificate).is_ok_and(|pin| pin == *self)
    }
}

impl FromStr for Pin {
    type Err = PinError;

    fn from_str(text: &str) -> Result<Self, PinError> {
        let error = || PinError(text.chars().take(80).collect());
        let encoded = text.strip_prefix("sha256/").ok_or_else(error)?;
        let bytes = STANDARD.decode(encoded).map_err(|_| error())?;
        Ok(Self(bytes.try_into().map_err(|_| error())?))
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256/{}", STANDARD.encode(self.0))
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A TLS client configuration without client certificate that accepts a server certificate only
/// when it is valid for the server name under a CA, sent in the chain, whose key is pinned.
pub fn pinned_client_config(pins: &[Pin], alpn: &[u8]) -> Result<ClientConfig, TlsError> {
    if pins.is_empty() {
        return Err(TlsError::NoRoots("no pin given".into()));
    }
    let verifier = PinnedVerifier {
        pins: pins.to_vec(),
        provider: provider(),
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

/// The certificates of `chain` whose keys are pinned: the CAs an agent keeps after a pinned
/// connection, to verify the broker from then on.
pub fn pinned_cas(pins: &[Pin], chain: &[CertificateDer<'static>]) -> Vec<CertificateDer<'static>> {
    chain
        .iter()
        .skip(1)
        .filter(|certificate| pins.iter().any(|pin| pin.matches(certificate)))
        .cloned()
        .collect()
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchors: Vec<CertificateDer<'static>> = intermediates
            .iter()
            .filter(|certificate| self.pins.iter().any(|pin| pin.matches(certificate)))
            .map(|certificate| certificate.clone().into_owned())
            .collect();
        if anchors.is_empty() {
            return Err(rustls::Error::General(
                "the broker sent no CA certificate with a pinned key: check the pin, or ask the admin \
                 whether the broker's certificate file holds its CA after its own certificate"
                    .into(),
            ));
        }
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(anchors);
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_round_trip_and_reject_garbage() {
        let pin = Pin::of_spki(b"key");
        let text = pin.to_string();
        assert!(text.starts_with("sha256/") && text.len() == 7 + 44);
        assert_eq!(text.parse::<Pin>(), Ok(pin));
        for bad in ["", "sha256/", "sha1/abcd", "sha256/!!!", "sha256/AAAA"] {
            assert!(bad.parse::<Pin>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_pinned_cas_after_the_leaf_are_kept() {
        let server_ca = crate::testdata::server_ca().certificate().clone();
        let other = crate::testdata::client_ca().certificate().clone();
        let pin = Pin::of(&server_ca).unwrap();
        let chain = vec![server_ca.clone(), other.clone(), server_ca.clone()];
        assert_eq!(pinned_cas(&[pin], &chain), vec![server_ca]);
    }
}
