//! Certificate signing requests: made on the device, checked by the broker.
//!
//! A request proves possession of a key and offers its public half; nothing else in it is used.
//! Only P-256 (signed with ECDSA-SHA256) and Ed25519 keys are accepted.

use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

use crate::secret::SecretPem;

/// Largest signing request accepted, in bytes of DER.
pub const MAX_CSR_LEN: usize = postern_proto::MAX_CSR_LEN;

/// A public key the broker may certify: P-256 or Ed25519, in SubjectPublicKeyInfo DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    spki: Vec<u8>,
}

/// A key pair made on this device and a request to certify it.
#[derive(Debug)]
pub struct KeyRequest {
    /// The private key, PKCS#8 PEM. It never leaves the device.
    pub key_pem: SecretPem,
    /// The signing request, PEM, to hand to the broker.
    pub csr_pem: String,
}

/// Why a signing request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// The request is larger than [`MAX_CSR_LEN`].
    #[error("the signing request is larger than {MAX_CSR_LEN} bytes")]
    TooLarge,
    /// The request is not PEM or DER of a PKCS#10 request.
    #[error("not a PKCS#10 certificate signing request")]
    Malformed,
    /// The key is neither P-256 nor Ed25519.
    #[error("unsupported key type: use a P-256 or Ed25519 key")]
    UnsupportedKey,
    /// The request's signature does not verify with its key.
    #[error("the signing request's signature is invalid")]
    BadSignature,
}

impl PublicKey {
    /// Checks and parses a PEM signing request, verifying that it is signed by its own key.
    pub fn from_csr_pem(pem: &[u8]) -> Result<Self, CsrError> {
        if pem.len() > 2 * MAX_CSR_LEN {
            return Err(CsrError::TooLarge);
        }
        let der =
            CertificateSigningRequestDer::from_pem_slice(pem).map_err(|_| CsrError::Malformed)?;
        Self::from_csr_der(&der)
    }

    /// Checks and parses a DER signing request, verifying that it is signed by its own key.
    pub fn from_csr_der(der: &[u8]) -> Result<Self, CsrError> {
        if der.len() > MAX_CSR_LEN {
            return Err(CsrError::TooLarge);
        }
        let (rest, csr) =
            X509CertificationRequest::from_der(der).map_err(|_| CsrError::Malformed)?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed);
        }
        let info = &csr.certification_request_info;
        let spki = &info.subject_pki;
        let key_alg = &spki.algorithm;
        let sig_alg = &csr.signature_algorithm.algorithm;
        let verifier: &dyn VerificationAlgorithm =
            if key_alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
                let curve = key_alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
                if curve != Some(OID_EC_P256) || *sig_alg != OID_SIG_ECDSA_WITH_SHA256 {
                    return Err(CsrError::UnsupportedKey);
                }
                &signature::ECDSA_P256_SHA256_ASN1
            } else if key_alg.algorithm == OID_SIG_ED25519 && key_alg.parameters.is_none() {
                if *sig_alg != OID_SIG_ED25519 {
                    return Err(CsrError::UnsupportedKey);
                }
                &signature::ED25519
            } else {
                return Err(CsrError::UnsupportedKey);
            };
        if csr.signature_value.unused_bits != 0 || spki.subject_public_key.unused_bits != 0 {
            return Err(CsrError::Malformed);
        }
        UnparsedPublicKey::new(verifier, &spki.subject_public_key.data)
            .verify(info.raw, &csr.signature_value.data)
            .map_err(|_| CsrError::BadSignature)?;
        Ok(Self {
            spki: spki.raw.to_vec(),
        })
    }

    /// The public key of a key pair held here (admin issuance makes the key itself).
    pub fn from_key_pair(key: &rcgen::KeyPair) -> Self {
        Self {
            spki: rcgen::PublicKeyData::subject_public_key_info(key),
        }
    }

    /// A P-256 or Ed25519 key from SubjectPublicKeyInfo DER, such as one kept in a sealed token.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, CsrError> {
        let key = Self { spki: der.to_vec() };
        key.algorithm()?;
        Ok(key)
    }

    /// SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// Checks `signature` over `message`: ECDSA-SHA256 (ASN.1) for P-256, Ed25519 otherwise.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), CsrError> {
        let (algorithm, key) = self.algorithm()?;
        UnparsedPublicKey::new(algorithm, key)
            .verify(message, signature)
            .map_err(|_| CsrError::BadSignature)
    }

    fn algorithm(&self) -> Result<(&'static dyn VerificationAlgorithm, &[u8]), CsrError> {
        use x509_parser::x509::SubjectPublicKeyInfo;
        let (rest, spki) =
            SubjectPublicKeyInfo::from_der(&self.spki).map_err(|_| CsrError::Malformed)?;
        if !rest.is_empty() || spki.subject_public_key.unused_bits != 0 {
            return Err(CsrError::Malformed);
        }
        let alg = &spki.algorithm;
        let algorithm: &'static dyn VerificationAlgorithm = if alg.algorithm
            == OID_KEY_TYPE_EC_PUBLIC_KEY
            && alg.parameters.as_ref().and_then(|p| p.as_oid().ok()) == Some(OID_EC_P256)
        {
            &signature::ECDSA_P256_SHA256_ASN1
        } else if alg.algorithm == OID_SIG_ED25519 && alg.parameters.is_none() {
            &signature::ED25519
        } else {
            return Err(CsrError::UnsupportedKey);
        };
        // The key bytes are the tail of the DER, so they can be borrowed from it.
        let key_len = spki.subject_public_key.data.len();
        Ok((algorithm, &self.spki[self.spki.len() - key_len..]))
    }
}

impl KeyRequest {
    /// Makes a P-256 key pair and a signing request for it, with an empty subject.
    pub fn generate() -> Result<Self, rcgen::Error> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key)?;
        Ok(Self {
            key_pem: SecretPem::new(key.serialize_pem()),
            csr_pem: csr.pem()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(alg: &'static rcgen::SignatureAlgorithm) -> (rcgen::KeyPair, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["ignored.example".into()]).unwrap();
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let csr = params.serialize_request(&key).unwrap();
        (key, csr.der().to_vec())
    }

    #[test]
    fn accepts_p256_and_ed25519() {
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ED25519] {
            let (key, der) = request(alg);
            let public = PublicKey::from_csr_der(&der).unwrap();
            assert_eq!(public, PublicKey::from_key_pair(&key));
        }
        let generated = KeyRequest::generate().unwrap();
        assert!(PublicKey::from_csr_pem(generated.csr_pem.as_bytes()).is_ok());
    }

    #[test]
    fn refuses_other_keys() {
        let (_, der) = request(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(PublicKey::from_csr_der(&der), Err(CsrError::UnsupportedKey));
    }

    #[test]
    fn refuses_a_tampered_request() {
        let (_, der) = request(&rcgen::PKCS_ECDSA_P256_SHA256);
        let at = der
            .windows(15)
            .position(|w| w == b"ignored.example")
            .unwrap();
        let mut tampered = der.clone();
        tampered[at] = b'j';
        assert_eq!(
            PublicKey::from_csr_der(&tampered),
            Err(CsrError::BadSignature)
        );
        assert_eq!(
            PublicKey::from_csr_der(&der[..der.len() - 2]),
            Err(CsrError::Malformed)
        );
        let mut trailing = der;
        trailing.push(0);
        assert_eq!(PublicKey::from_csr_der(&trailing), Err(CsrError::Malformed));
        assert_eq!(
            PublicKey::from_csr_pem(b"not pem"),
            Err(CsrError::Malformed)
        );
        assert_eq!(
            PublicKey::from_csr_der(&vec![0x30; MAX_CSR_LEN + 1]),
            Err(CsrError::TooLarge)
        );
    }
}
