//! Sealing refresh tokens: what an agent keeps to renew, readable only by the broker.
//!
//! A sealed token is `version ‖ key id (8) ‖ nonce (12) ‖ AES-256-GCM ciphertext`, the header
//! authenticated as associated data with a fixed label. The plaintext
//! is JSON ([`SealedLogin`]): the refresh token with everything a renewal must keep — who, how they
//! authenticated, the lineage and device, the key the agent must prove it holds, and when the
//! login ends. A copy stolen from a laptop renews nothing without that key, and nothing at all
//! after the login's end.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

const VERSION: u8 = 1;
const KEY_ID_LEN: usize = 8;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
const AAD: &[u8] = b"postern sealed refresh token v1";
const FILE_LABEL: &str = "postern-seal-key-v1:";

/// The key that seals refresh tokens, as ring's key schedule.
pub struct SealKey {
    id: [u8; KEY_ID_LEN],
    key: LessSafeKey,
}

/// The key that seals, and retired keys that still open what they sealed: rotation without
/// logging everyone out.
#[derive(Debug)]
pub struct SealKeys {
    current: SealKey,
    retired: Vec<SealKey>,
}

/// What a sealed token holds.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SealedLogin {
    /// The IdP's refresh token.
    pub refresh_token: String,
    /// The issuer.
    pub issuer: String,
    /// The subject.
    pub subject: String,
    /// The email address, when trusted.
    pub email: Option<String>,
    /// Whether the IdP said the email is verified.
    pub email_verified: bool,
    /// The display name.
    pub name: Option<String>,
    /// Groups from the login.
    pub groups: Vec<String>,
    /// Authentication methods of the login.
    pub amr: Vec<String>,
    /// Authentication context class of the login.
    pub acr: Option<String>,
    /// When the person authenticated, in seconds since the Unix epoch.
    pub auth_time: u64,
    /// Whether the IdP reported `auth_time` (otherwise it is the token's `iat`).
    pub auth_time_reported: bool,
    /// When the login ends, in seconds since the Unix epoch.
    pub session_ends: u64,
    /// The lineage, hex.
    pub lineage: String,
    /// The device, hex.
    pub device: String,
    /// SubjectPublicKeyInfo DER of the key the agent must prove it holds, base64.
    pub device_key: String,
}

/// Why a sealed token cannot be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// It is not a sealed token of this version.
    #[error("not a sealed token")]
    Malformed,
    /// It was sealed under another key (rotated away, or another broker's).
    #[error("sealed under a key this broker does not hold")]
    UnknownKey,
    /// The ciphertext does not authenticate.
    #[error("the sealed token does not authenticate")]
    Forged,
    /// The key file is unusable.
    #[error("the seal key file is not one `postern-broker init` writes: {0}")]
    KeyFile(String),
    /// No randomness.
    #[error("no randomness available")]
    Random,
}

impl SealKey {
    /// A fresh random key, as the text of its key file.
    pub fn generate_file_text() -> Result<String, SealError> {
        let mut bytes = [0; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SealError::Random)?;
        let text = format!("{FILE_LABEL}{}\n", STANDARD.encode(bytes));
        bytes.fill(0);
        Ok(text)
    }

    /// Reads the text of a key file.
    pub fn from_file_text(text: &str) -> Result<Self, SealError> {
        let encoded = text
            .trim()
            .strip_prefix(FILE_LABEL)
            .ok_or_else(|| SealError::KeyFile(format!("it does not start with `{FILE_LABEL}`")))?;
        let bytes = STANDARD
            .decode(encoded)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| SealError::KeyFile("it does not hold 32 bytes of base64".into()))?;
        Self::from_bytes(bytes)
    }

    fn from_bytes(mut bytes: [u8; 32]) -> Result<Self, SealError> {
        let mut hash = digest::Context::new(&digest::SHA256);
        hash.update(b"postern seal key id");
        hash.update(&bytes);
        let mut id = [0; KEY_ID_LEN];
        id.copy_from_slice(&hash.finish().as_ref()[..KEY_ID_LEN]);
        let key = UnboundKey::new(&AES_256_GCM, &bytes);
        bytes.fill(0);
        let key = LessSafeKey::new(key.map_err(|_| SealError::KeyFile("bad key".into()))?);
        Ok(Self { id, key })
    }

    /// Seals `contents` under a fresh random nonce.
    pub fn seal(&self, contents: &SealedLogin) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut out = Vec::with_capacity(HEADER_LEN + 1024);
        out.push(VERSION);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&nonce);
        let mut data = serde_json::to_vec(contents).map_err(|_| SealError::Malformed)?;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(&out)),
                &mut data,
            )
            .map_err(|_| SealError::Random)?;
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// Opens a sealed token made by [`SealKey::seal`] with this key.
    pub fn open(&self, sealed: &[u8]) -> Result<SealedLogin, SealError> {
        if sealed.len() < HEADER_LEN + AES_256_GCM.tag_len() || sealed[0] != VERSION {
            return Err(SealError::Malformed);
        }
        if sealed[1..=KEY_ID_LEN] != self.id {
            return Err(SealError::UnknownKey);
        }
        let mut nonce = [0; NONCE_LEN];
        nonce.copy_from_slice(&sealed[1 + KEY_ID_LEN..HEADER_LEN]);
        let mut data = sealed[HEADER_LEN..].to_vec();
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(&sealed[..HEADER_LEN])),
                &mut data,
            )
            .map_err(|_| SealError::Forged)?;
        serde_json::from_slice(plain).map_err(|_| SealError::Malformed)
    }
}

impl SealKeys {
    /// `current` seals and opens; `retired` only open.
    pub fn new(current: SealKey, retired: Vec<SealKey>) -> Self {
        Self { current, retired }
    }

    /// Seals with the current key.
    pub fn seal(&self, contents: &SealedLogin) -> Result<Vec<u8>, SealError> {
        self.current.seal(contents)
    }

    /// Opens with whichever key sealed it, if this broker holds it.
    pub fn open(&self, sealed: &[u8]) -> Result<SealedLogin, SealError> {
        let id = sealed.get(1..=KEY_ID_LEN).ok_or(SealError::Malformed)?;
        std::iter::once(&self.current)
            .chain(&self.retired)
            .find(|key| key.id == id)
            .ok_or(SealError::UnknownKey)?
            .open(sealed)
    }
}

/// The associated data: a fixed label, then the header (version, key id, nonce).
fn aad(header: &[u8]) -> Vec<u8> {
    [AAD, header].concat()
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealKey")
            .field("id", &format_args!("{:02x?}", self.id))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for SealedLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedLogin")
            .field("issuer", &self.issuer)
            .field("subject", &self.subject)
            .field("lineage", &self.lineage)
            .field("session_ends", &self.session_ends)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents() -> SealedLogin {
        SealedLogin {
            refresh_token: "rt-secret".into(),
            issuer: "https://idp".into(),
            subject: "alice".into(),
            email: None,
            email_verified: false,
            name: None,
            groups: vec![],
            amr: vec!["pwd".into(), "otp".into()],
            acr: None,
            auth_time: 1,
            auth_time_reported: true,
            session_ends: 2,
            lineage: "00".into(),
            device: "11".into(),
            device_key: "AA==".into(),
        }
    }

    #[test]
    fn sealed_tokens_open_only_under_their_key_and_unmodified() {
        let text = SealKey::generate_file_text().unwrap();
        let key = SealKey::from_file_text(&text).unwrap();
        let sealed = key.seal(&contents()).unwrap();
        assert_eq!(key.open(&sealed), Ok(contents()));
        assert_ne!(key.seal(&contents()).unwrap(), sealed, "nonces differ");
        let reread = SealKey::from_file_text(&text).unwrap();
        assert_eq!(reread.open(&sealed), Ok(contents()));

        let other = SealKey::from_file_text(&SealKey::generate_file_text().unwrap()).unwrap();
        assert_eq!(other.open(&sealed), Err(SealError::UnknownKey));
        // Every byte after the key id is authenticated, the nonce included.
        for i in 1 + KEY_ID_LEN..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[i] ^= 1;
            assert_eq!(key.open(&tampered), Err(SealError::Forged), "byte {i}");
        }
        assert_eq!(key.open(&sealed[..10]), Err(SealError::Malformed));
        assert!(!format!("{:?} {:?}", contents(), key).contains("rt-secret"));
    }

    #[test]
    fn retired_keys_still_open_what_they_sealed() {
        let key = |text: &str| SealKey::from_file_text(text).unwrap();
        let (old, new) = (
            SealKey::generate_file_text().unwrap(),
            SealKey::generate_file_text().unwrap(),
        );
        let sealed_before = key(&old).seal(&contents()).unwrap();
        let keys = SealKeys::new(key(&new), vec![key(&old)]);
        assert_eq!(keys.open(&sealed_before), Ok(contents()));
        let sealed_now = keys.seal(&contents()).unwrap();
        assert_eq!(key(&new).open(&sealed_now), Ok(contents()));
        let without_old = SealKeys::new(key(&new), vec![]);
        assert_eq!(without_old.open(&sealed_before), Err(SealError::UnknownKey));
        assert_eq!(without_old.open(b"\x01"), Err(SealError::Malformed));
    }

    #[test]
    fn key_files_are_checked() {
        assert!(SealKey::from_file_text("").is_err());
        assert!(SealKey::from_file_text("postern-seal-key-v1:AAAA").is_err());
    }
}
