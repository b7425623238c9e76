//! The Postern certificate extension: the authentication context and attributes, in DER.
//!
//! ```text
//! PosternAuthContext ::= SEQUENCE {
//!   version   INTEGER (1),
//!   issuance  ENUMERATED { login(0), admin(1) },
//!   flow      ENUMERATED { none(0), deviceCode(1) },  -- none exactly when issuance is admin
//!   authTime  INTEGER (0..MAX),                        -- seconds since 1970-01-01T00:00:00Z
//!   amr       SEQUENCE SIZE (0..16) OF UTF8String,
//!   acr       UTF8String,                              -- empty: the IdP sent none
//!   lineage   OCTET STRING (SIZE (16)),
//!   device    OCTET STRING (SIZE (16)),
//!   email     UTF8String,                              -- empty: no trusted email
//!   name      UTF8String,                              -- empty: no name
//!   groups    SEQUENCE SIZE (0..32) OF UTF8String
//! }
//! ```
//!
//! The extension is non-critical and at most [`MAX_EXTENSION_LEN`] bytes.

use std::time::{Duration, SystemTime};

use yasna::{ASN1Error, ASN1ErrorKind, ASN1Result, BERReader};

use crate::identity::{AuthContext, IdentityError, Issuance, LoginFlow, RandomId};

/// Arc for Postern's object identifiers: a private arc derived from a random GUID under
/// `1.2.840.113556.1.8000.2554`, the arc delegated for exactly that use.
pub const POSTERN_OID_ARC: &[u64] = &[
    1, 2, 840, 113556, 1, 8000, 2554, 42629, 52131, 29118, 20000, 46647, 13154090, 11353360,
];

/// Object identifier of the authentication-context extension: [`POSTERN_OID_ARC`]`.1`.
pub const AUTH_CONTEXT_OID: &[u64] = &[
    1, 2, 840, 113556, 1, 8000, 2554, 42629, 52131, 29118, 20000, 46647, 13154090, 11353360, 1,
];

/// Largest encoded extension, in bytes.
pub const MAX_EXTENSION_LEN: usize = 2048;
/// Most `amr` values in a certificate.
pub const MAX_AMR: usize = 16;
/// Longest `amr` value, in bytes.
pub const MAX_AMR_LEN: usize = 32;
/// Most groups in a certificate.
pub const MAX_GROUPS: usize = 32;
/// Longest group name, in bytes.
pub const MAX_GROUP_LEN: usize = 128;
/// Longest email address, in bytes.
pub const MAX_EMAIL_LEN: usize = 254;
/// Longest `acr` or display name, in bytes.
pub const MAX_TEXT_LEN: usize = 128;

const VERSION: i64 = 1;

/// What the extension holds: everything in an [`Identity`](crate::Identity) but the user id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attributes {
    pub(crate) email: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) groups: Vec<String>,
    pub(crate) auth: AuthContext,
}

impl Attributes {
    /// Checks every limit, so that the broker never issues what it would refuse to read.
    pub(crate) fn check(&self) -> Result<(), IdentityError> {
        let text = |value: &str, max: usize, what: &'static str| {
            if value.len() > max {
                Err(IdentityError::TooLarge(what))
            } else if value.chars().any(char::is_control) {
                Err(IdentityError::Unprintable(what))
            } else {
                Ok(())
            }
        };
        let list = |values: &[String], count: usize, max: usize, what: &'static str| {
            if values.len() > count || values.iter().any(String::is_empty) {
                return Err(IdentityError::TooLarge(what));
            }
            values.iter().try_for_each(|v| text(v, max, what))
        };
        list(&self.auth.amr, MAX_AMR, MAX_AMR_LEN, "amr")?;
        list(&self.groups, MAX_GROUPS, MAX_GROUP_LEN, "groups")?;
        text(
            self.auth.acr.as_deref().unwrap_or_default(),
            MAX_TEXT_LEN,
            "acr",
        )?;
        text(
            self.email.as_deref().unwrap_or_default(),
            MAX_EMAIL_LEN,
            "email",
        )?;
        text(
            self.name.as_deref().unwrap_or_default(),
            MAX_TEXT_LEN,
            "name",
        )?;
        if unix_seconds(self.auth.auth_time).is_none() {
            return Err(IdentityError::TooLarge("auth_time"));
        }
        Ok(())
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, IdentityError> {
        self.check()?;
        let (issuance, flow) = match self.auth.issuance {
            Issuance::Login(LoginFlow::DeviceCode) => (0, 1),
            Issuance::Admin => (1, 0),
        };
        let auth_time = unix_seconds(self.auth.auth_time).unwrap_or_default();
        let der = yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_i64(VERSION);
                w.next().write_enum(issuance);
                w.next().write_enum(flow);
                w.next().write_i64(auth_time);
                w.next().write_sequence_of(|w| {
                    for amr in &self.auth.amr {
                        w.next().write_utf8_string(amr);
                    }
                });
                w.next()
                    .write_utf8_string(self.auth.acr.as_deref().unwrap_or_default());
                w.next().write_bytes(self.auth.lineage.as_bytes());
                w.next().write_bytes(self.auth.device.as_bytes());
                w.next()
                    .write_utf8_string(self.email.as_deref().unwrap_or_default());
                w.next()
                    .write_utf8_string(self.name.as_deref().unwrap_or_default());
                w.next().write_sequence_of(|w| {
                    for group in &self.groups {
                        w.next().write_utf8_string(group);
                    }
                });
            })
        });
        if der.len() > MAX_EXTENSION_LEN {
            return Err(IdentityError::TooLarge("the Postern extension"));
        }
        Ok(der)
    }

    /// Decodes strict DER and checks every limit. `None` for anything else.
    pub(crate) fn decode(der: &[u8]) -> Option<Self> {
        if der.len() > MAX_EXTENSION_LEN {
            return None;
        }
        let attributes = yasna::parse_der(der, |r| {
            r.read_sequence(|r| {
                if r.next().read_i64()? != VERSION {
                    return Err(invalid());
                }
                let issuance = match (r.next().read_enum()?, r.next().read_enum()?) {
                    (0, 1) => Issuance::Login(LoginFlow::DeviceCode),
                    (1, 0) => Issuance::Admin,
                    _ => return Err(invalid()),
                };
                let auth_time = u64::try_from(r.next().read_i64()?).map_err(|_| invalid())?;
                let amr = read_strings(r.next(), MAX_AMR)?;
                let acr = non_empty(r.next().read_utf8string()?);
                let lineage = read_id(r.next())?;
                let device = read_id(r.next())?;
                let email = non_empty(r.next().read_utf8string()?);
                let name = non_empty(r.next().read_utf8string()?);
                let groups = read_strings(r.next(), MAX_GROUPS)?;
                let auth_time = SystemTime::UNIX_EPOCH
                    .checked_add(Duration::from_secs(auth_time))
                    .ok_or_else(invalid)?;
                Ok(Attributes {
                    email,
                    name,
                    groups,
                    auth: AuthContext {
                        issuance,
                        amr,
                        acr,
                        auth_time,
                        lineage,
                        device,
                    },
                })
            })
        })
        .ok()?;
        attributes.check().ok()?;
        Some(attributes)
    }
}

fn invalid() -> ASN1Error {
    ASN1Error::new(ASN1ErrorKind::Invalid)
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

fn read_id(r: BERReader<'_, '_>) -> ASN1Result<RandomId> {
    let bytes: [u8; 16] = r.read_bytes()?.try_into().map_err(|_| invalid())?;
    Ok(RandomId::from_bytes(bytes))
}

fn read_strings(r: BERReader<'_, '_>, max: usize) -> ASN1Result<Vec<String>> {
    let mut values = Vec::new();
    r.read_sequence_of(|r| {
        if values.len() == max {
            return Err(invalid());
        }
        values.push(r.read_utf8string()?);
        Ok(())
    })?;
    Ok(values)
}

/// Whole seconds since 1970 for a time certificates can express.
fn unix_seconds(time: SystemTime) -> Option<i64> {
    crate::date_time(time).map(time::OffsetDateTime::unix_timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Attributes {
        Attributes {
            email: Some("alice@example.org".into()),
            name: Some("Alice".into()),
            groups: vec!["staff".into(), "mail".into()],
            auth: AuthContext {
                issuance: Issuance::Login(LoginFlow::DeviceCode),
                amr: vec!["pwd".into(), "otp".into()],
                acr: None,
                auth_time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000),
                lineage: RandomId::from_bytes([1; 16]),
                device: RandomId::from_bytes([2; 16]),
            },
        }
    }

    #[test]
    fn round_trips() {
        let attributes = sample();
        let der = attributes.encode().unwrap();
        assert_eq!(Attributes::decode(&der), Some(attributes));

        let admin = Attributes {
            email: None,
            name: None,
            groups: vec![],
            auth: AuthContext {
                issuance: Issuance::Admin,
                amr: vec![],
                ..sample().auth
            },
        };
        assert_eq!(Attributes::decode(&admin.encode().unwrap()), Some(admin));
    }

    #[test]
    fn limits_hold_on_both_sides() {
        let mut many = sample();
        many.groups = (0..=MAX_GROUPS).map(|i| format!("g{i}")).collect();
        assert_eq!(many.encode(), Err(IdentityError::TooLarge("groups")));

        let mut long = sample();
        long.auth.amr = vec!["x".repeat(MAX_AMR_LEN + 1)];
        assert_eq!(long.encode(), Err(IdentityError::TooLarge("amr")));

        let mut control = sample();
        control.name = Some("Alice\u{1b}[31m".into());
        assert_eq!(control.encode(), Err(IdentityError::Unprintable("name")));

        let mut far = sample();
        far.auth.auth_time =
            SystemTime::UNIX_EPOCH + Duration::from_secs(crate::MAX_UNIX_SECONDS + 1);
        assert_eq!(far.encode(), Err(IdentityError::TooLarge("auth_time")));

        let mut empty = sample();
        empty.groups = vec![String::new()];
        assert!(empty.encode().is_err());
    }

    #[test]
    fn inconsistent_or_trailing_bytes_are_refused() {
        let der = sample().encode().unwrap();
        let mut trailing = der.clone();
        trailing.push(0);
        assert_eq!(Attributes::decode(&trailing), None);
        assert_eq!(Attributes::decode(&der[..der.len() - 1]), None);
        // issuance = admin with flow = deviceCode: the enum bytes sit at fixed offsets.
        let mut mixed = der.clone();
        let issuance_at = der
            .windows(3)
            .position(|w| w == [0x0a, 0x01, 0x00])
            .unwrap();
        mixed[issuance_at + 2] = 1;
        assert_eq!(Attributes::decode(&mixed), None);
    }

    #[test]
    fn arbitrary_bytes_do_not_panic() {
        let der = sample().encode().unwrap();
        for i in 0..der.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bytes = der.clone();
                bytes[i] ^= flip;
                let _ = Attributes::decode(&bytes);
            }
        }
    }
}
