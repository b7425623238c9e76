//! The device's key used outside TLS: to prove, when renewing or logging out, that the agent
//! holds the key of its current certificate.

use std::fmt;

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use crate::csr::PublicKey;
use crate::secret::SecretPem;

/// A device's private key, P-256 or Ed25519, able to sign proofs of possession.
pub struct DeviceKey {
    inner: Inner,
    public: PublicKey,
}

enum Inner {
    P256(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// Why a key cannot sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The PEM is not a PKCS#8 P-256 or Ed25519 private key.
    #[error("the private key is not a PKCS#8 P-256 or Ed25519 key")]
    UnsupportedKey,
    /// Signing failed.
    #[error("signing failed")]
    Sign,
}

impl DeviceKey {
    /// Reads a PKCS#8 PEM private key as written by [`crate::KeyRequest::generate`].
    pub fn from_pem(pem: &SecretPem) -> Result<Self, ProofError> {
        let der = match PrivateKeyDer::from_pem_slice(pem.expose().as_bytes()) {
            Ok(PrivateKeyDer::Pkcs8(der)) => der,
            _ => return Err(ProofError::UnsupportedKey),
        };
        let pkcs8 = der.secret_pkcs8_der();
        let rng = SystemRandom::new();
        let inner = if let Ok(key) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng)
        {
            Inner::P256(key)
        } else if let Ok(key) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8) {
            Inner::Ed25519(key)
        } else {
            return Err(ProofError::UnsupportedKey);
        };
        let key_pair =
            rcgen::KeyPair::from_pem(pem.expose()).map_err(|_| ProofError::UnsupportedKey)?;
        let public = PublicKey::from_key_pair(&key_pair);
        // Cross-check the two parsers: the public key must be the one ring signs with.
        let raw = match &inner {
            Inner::P256(key) => key.public_key().as_ref(),
            Inner::Ed25519(key) => key.public_key().as_ref(),
        };
        if !public.spki_der().ends_with(raw) {
            return Err(ProofError::UnsupportedKey);
        }
        Ok(Self { inner, public })
    }

    /// Signs `message`: ECDSA-SHA256 (ASN.1) for P-256, Ed25519 otherwise.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, ProofError> {
        match &self.inner {
            Inner::P256(key) => key
                .sign(&SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| ProofError::Sign),
            Inner::Ed25519(key) => Ok(key.sign(message).as_ref().to_vec()),
        }
    }

    /// The public half.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceKey").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyRequest;

    #[test]
    fn signatures_verify_with_the_public_key_only() {
        let request = KeyRequest::generate().unwrap();
        let key = DeviceKey::from_pem(&request.key_pem).unwrap();
        let from_csr = PublicKey::from_csr_pem(request.csr_pem.as_bytes()).unwrap();
        assert_eq!(key.public_key(), &from_csr);
        let signature = key.sign(b"message").unwrap();
        let public = PublicKey::from_spki_der(from_csr.spki_der()).unwrap();
        assert_eq!(public.verify(b"message", &signature), Ok(()));
        assert!(public.verify(b"messagf", &signature).is_err());
        let other = DeviceKey::from_pem(&KeyRequest::generate().unwrap().key_pem).unwrap();
        assert!(other.public_key().verify(b"message", &signature).is_err());
    }

    #[test]
    fn ed25519_keys_sign_too() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let key = DeviceKey::from_pem(&SecretPem::new(pair.serialize_pem())).unwrap();
        let signature = key.sign(b"m").unwrap();
        assert_eq!(key.public_key().verify(b"m", &signature), Ok(()));
    }

    #[test]
    fn other_keys_are_refused() {
        assert!(PublicKey::from_spki_der(b"\x30\x00").is_err());
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert_eq!(
            DeviceKey::from_pem(&SecretPem::new(p384.serialize_pem())).err(),
            Some(ProofError::UnsupportedKey)
        );
        assert!(
            PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&p384))
                .is_err()
        );
    }
}
