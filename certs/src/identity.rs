//! Who a certificate speaks for, and how that person proved it.

use std::fmt;
use std::time::SystemTime;

/// Longest issuer or subject, in bytes (OpenID Connect caps `sub` at 255 ASCII characters).
pub const MAX_ID_PART_LEN: usize = 255;

/// A person (or machine) as the identity provider names it: the issuer and the subject it
/// assigned. This pair — never the email — is who someone is.
///
/// Its canonical text form, [`UserId::uri`], is the issuer URL with the subject as fragment
/// (`https://idp.example.org/realms/acme#248289761001`). That string is the certificate's SAN
/// URI and the Cedar `User` id. OpenID issuers have no fragment, so the split is unambiguous.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId {
    issuer: String,
    subject: String,
}

/// The identity a client certificate carries.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// Who this is.
    pub user: UserId,
    /// The email address, present only when the broker trusts it (verified at the IdP, or an
    /// admin typed it). An attribute for policy and display, never the identity.
    pub email: Option<String>,
    /// A display name.
    pub name: Option<String>,
    /// Groups named at issuance. Few or none: the security team's entity data is the live
    /// source of group membership.
    pub groups: Vec<String>,
    /// How and when this identity was authenticated.
    pub auth: AuthContext,
}

/// The authentication behind a certificate, carried in the Postern extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthContext {
    /// Whether the certificate came from a login or from an administrator.
    pub issuance: Issuance,
    /// Authentication methods the IdP reported (`amr`), such as `pwd` and `otp`.
    pub amr: Vec<String>,
    /// Authentication context class the IdP reported (`acr`).
    pub acr: Option<String>,
    /// When the person authenticated at the IdP (`auth_time`); for admin issuance, when the
    /// certificate was issued. Whole seconds, as certificates hold it; renewals keep the
    /// original value.
    pub auth_time: SystemTime,
    /// The chain of renewals this certificate belongs to.
    pub lineage: LineageId,
    /// The broker-assigned id of the device that holds the key.
    pub device: DeviceId,
}

/// How a certificate was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Issuance {
    /// A person logged in at the identity provider.
    Login(LoginFlow),
    /// An administrator ran `postern-broker issue`; no login happened.
    Admin,
}

/// The OAuth flow of a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LoginFlow {
    /// The device authorization grant (RFC 8628).
    DeviceCode,
}

/// A 128-bit random id, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RandomId([u8; 16]);

/// The id shared by a certificate and all its renewals.
pub type LineageId = RandomId;

/// The id the broker gave a device when it first enrolled.
pub type DeviceId = RandomId;

/// Why an identity cannot be represented.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The issuer is not an absolute URI without query and fragment.
    #[error("issuer `{0}` is not an absolute URI of printable ASCII without `?` or `#`")]
    BadIssuer(String),
    /// The subject is empty, too long or holds control characters.
    #[error("subject is empty, longer than {MAX_ID_PART_LEN} bytes, or holds control characters")]
    BadSubject,
    /// A SAN URI is not the canonical form of a user id.
    #[error("`{0}` is not a Postern user id")]
    BadUri(String),
    /// A lineage or device id is not 32 lowercase hex digits.
    #[error("`{0}` is not a lineage or device id (32 hex digits)")]
    BadRandomId(String),
    /// An attribute is too long or there are too many of them.
    #[error("{0} exceeds the certificate's size limits")]
    TooLarge(&'static str),
    /// An attribute holds control characters.
    #[error("{0} holds control characters")]
    Unprintable(&'static str),
}

impl UserId {
    /// Checks and pairs an issuer and a subject.
    pub fn new(issuer: &str, subject: &str) -> Result<Self, IdentityError> {
        if !valid_issuer(issuer) {
            return Err(IdentityError::BadIssuer(issuer.to_owned()));
        }
        if subject.is_empty()
            || subject.len() > MAX_ID_PART_LEN
            || subject.chars().any(char::is_control)
        {
            return Err(IdentityError::BadSubject);
        }
        Ok(Self {
            issuer: issuer.to_owned(),
            subject: subject.to_owned(),
        })
    }

    /// The identity provider that vouches for this user.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The subject the identity provider assigned.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The canonical URI: issuer, `#`, and the subject with every byte outside the URI
    /// fragment alphabet percent-encoded (upper-case hex).
    pub fn uri(&self) -> String {
        let mut uri = String::with_capacity(self.issuer.len() + 1 + self.subject.len());
        uri.push_str(&self.issuer);
        uri.push('#');
        for &byte in self.subject.as_bytes() {
            if is_fragment_char(byte) {
                uri.push(char::from(byte));
            } else {
                uri.push('%');
                uri.push(char::from(HEX_UPPER[usize::from(byte >> 4)]));
                uri.push(char::from(HEX_UPPER[usize::from(byte & 0xf)]));
            }
        }
        uri
    }

    /// Parses the canonical URI. Any other spelling of the same user is refused, so that one
    /// user has exactly one URI.
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::BadUri(uri.to_owned());
        let (issuer, fragment) = uri.split_once('#').ok_or_else(bad)?;
        let subject = percent_decode(fragment).ok_or_else(bad)?;
        let user = Self::new(issuer, &subject).map_err(|_| bad())?;
        if user.uri() != uri {
            return Err(bad());
        }
        Ok(user)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({})", self.uri())
    }
}

impl Identity {
    /// A short name for people: the email when there is one, the user id otherwise.
    pub fn display_name(&self) -> String {
        self.email.clone().unwrap_or_else(|| self.user.uri())
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("user", &self.user)
            .field("email", &self.email)
            .field("groups", &self.groups)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl Issuance {
    /// `login` or `admin`, the issuance kind policy sees.
    pub fn kind(self) -> &'static str {
        match self {
            Issuance::Login(_) => "login",
            Issuance::Admin => "admin",
        }
    }
}

impl LoginFlow {
    /// The stable name of the flow, as policy and audit see it.
    pub fn as_str(self) -> &'static str {
        match self {
            LoginFlow::DeviceCode => "device_code",
        }
    }
}

impl RandomId {
    /// A fresh id from the operating system's secure random generator.
    pub fn generate() -> Result<Self, ring::error::Unspecified> {
        let mut bytes = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)?;
        Ok(Self(bytes))
    }

    /// The id's bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for RandomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for RandomId {
    type Err = IdentityError;

    /// Reads the 32 hex digits [`Display`](fmt::Display) writes.
    fn from_str(text: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::BadRandomId(text.chars().take(40).collect());
        if text.len() != 32 {
            return Err(bad());
        }
        let mut bytes = [0u8; 16];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Self(bytes))
    }
}

impl fmt::Debug for RandomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// RFC 3986 `fragment` characters, less `%` (always encoded) and `#`.
fn is_fragment_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&byte)
}

/// RFC 3986 characters of an absolute URI, less `?` and `#`: OpenID issuers have neither.
fn valid_issuer(issuer: &str) -> bool {
    let Some((scheme, rest)) = issuer.split_once(':') else {
        return false;
    };
    let mut scheme_bytes = scheme.bytes();
    let scheme_ok = scheme_bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && scheme_bytes.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    let rest_ok = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~:/[]@!$&'()*+,;=%".contains(&b));
    scheme_ok && rest_ok && issuer.len() <= MAX_ID_PART_LEN
}

fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let (hex, tail) = tail.split_first_chunk::<2>()?;
            let digits = std::str::from_utf8(hex).ok()?;
            bytes.push(u8::from_str_radix(digits, 16).ok()?);
            rest = tail;
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn random_ids_read_back_what_they_show() {
        let id = RandomId::from_bytes([0xab; 16]);
        assert_eq!(id.to_string().parse::<RandomId>(), Ok(id));
        for bad in [
            "",
            "ab",
            &"g".repeat(32),
            &"a".repeat(33),
            "é".repeat(16).as_str(),
        ] {
            assert!(
                matches!(bad.parse::<RandomId>(), Err(IdentityError::BadRandomId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn uri_is_issuer_and_encoded_subject() {
        let user = UserId::new("https://idp.example.org/realms/acme", "248289761001").unwrap();
        assert_eq!(
            user.uri(),
            "https://idp.example.org/realms/acme#248289761001"
        );
        let odd = UserId::new("https://idp.example.org", "a b#c%d/é").unwrap();
        assert_eq!(odd.uri(), "https://idp.example.org#a%20b%23c%25d/%C3%A9");
        assert_eq!(UserId::from_uri(&odd.uri()).unwrap(), odd);
    }

    #[test]
    fn only_the_canonical_uri_parses() {
        for uri in [
            "https://idp.example.org#a%62",   // `b` need not be encoded
            "https://idp.example.org#%c3%a9", // lower-case hex
            "https://idp.example.org#a%2",
            "https://idp.example.org#",
            "https://idp.example.org",
            "https://idp.example.org?x=1#a",
            "idp.example.org#a",
            "https://idp.example.org#%FF",
        ] {
            assert!(UserId::from_uri(uri).is_err(), "{uri}");
        }
    }

    #[test]
    fn issuers_are_absolute_uris() {
        for ok in [
            "https://idp.example.org",
            "https://login.microsoftonline.com/tid/v2.0",
            "postern-admin:gw.example.org",
        ] {
            assert!(UserId::new(ok, "s").is_ok(), "{ok}");
        }
        for bad in [
            "",
            "idp",
            "https://a b",
            "https://a?b",
            "https://a#b",
            ":x",
            "1a:x",
            "https://é",
        ] {
            assert!(UserId::new(bad, "s").is_err(), "{bad}");
        }
        assert!(UserId::new("https://a", "s\n").is_err());
        assert!(UserId::new("https://a", &"s".repeat(256)).is_err());
    }

    proptest! {
        #[test]
        fn uri_round_trips(subject in "[^\\p{Cc}]{1,60}") {
            let user = UserId::new("https://idp.example.org/realm", &subject).unwrap();
            prop_assert_eq!(UserId::from_uri(&user.uri()), Ok(user));
        }
    }
}
