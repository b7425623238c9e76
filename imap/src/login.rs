//! Login names as the mail server reads them, and SASL PLAIN messages.
//!
//! A login name is checked and sent in one canonical form, so that what policy decides on is
//! what the server logs in: `ALICE`, `alice@example.org` and `alice` are one mailbox when the
//! server lowercases names and adds its default domain. Characters a server may read as a
//! separator (master user `*`, Cyrus/Courier `%`, sub-addresses `+`, `!`, `/`, `=` …) and
//! non-ASCII are refused unless the configuration allows them.

use base64::Engine as _;

use crate::Secret;

/// Longest login name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// How the mail server reads login names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The server lowercases names (Dovecot's `%Lu`, Cyrus's `username_tolower`).
    pub lowercase: bool,
    /// The server's default domain, and what it does with it.
    pub domain: Option<(String, DomainForm)>,
    /// Characters allowed beyond `a-z A-Z 0-9 . - _ @`.
    pub extra: String,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            lowercase: true,
            domain: None,
            extra: String::new(),
        }
    }
}

/// What a server with a default domain logs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainForm {
    /// Full addresses: `alice` becomes `alice@domain`; other domains stay as they are.
    Address,
    /// Local parts: `alice@domain` becomes `alice`; other domains are refused.
    Local,
}

/// A login name in the form the server reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canonical {
    /// What is sent to the server and is the id of the Cedar `Mailbox`.
    pub name: String,
    /// The name as a full address when a domain is known (`Mailbox.address`), else the name.
    pub address: String,
}

/// Why a login name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty or too long.
    #[error("the login name is empty or longer than {MAX_NAME_LEN} bytes")]
    Length,
    /// Holds bytes that are not ASCII.
    #[error("the login name holds characters that are not ASCII")]
    NotAscii,
    /// Holds a character the server may read as a separator.
    #[error("the login name holds `{0}`, which the mail server may read as a separator")]
    Character(char),
    /// More than one `@`, or one at either end.
    #[error("the login name is not of the form `name` or `name@domain`")]
    Shape,
    /// A domain other than the server's, where the server logs in local parts.
    #[error("the login name names the domain `{0}`; this mail server serves only its own domain")]
    OtherDomain(String),
}

impl Rules {
    /// `raw` in canonical form.
    pub fn canonical(&self, raw: &[u8]) -> Result<Canonical, NameError> {
        if raw.is_empty() || raw.len() > MAX_NAME_LEN {
            return Err(NameError::Length);
        }
        if !raw.is_ascii() {
            return Err(NameError::NotAscii);
        }
        let allowed = |c: char| {
            c.is_ascii_alphanumeric()
                || matches!(c, '.' | '-' | '_' | '@')
                || self.extra.contains(c)
        };
        // ASCII, checked above.
        let mut name: String = raw.iter().map(|&b| char::from(b)).collect();
        if let Some(bad) = name.chars().find(|&c| !allowed(c)) {
            return Err(NameError::Character(bad));
        }
        if self.lowercase {
            name.make_ascii_lowercase();
        }
        let (local, domain) = match name.split_once('@') {
            Some((local, domain)) => (local, Some(domain)),
            None => (name.as_str(), None),
        };
        if local.is_empty() || domain.is_some_and(|d| d.is_empty() || d.contains('@')) {
            return Err(NameError::Shape);
        }
        let (name, address) = match (&self.domain, domain) {
            (None, _) => (name.clone(), name.clone()),
            (Some((own, DomainForm::Address)), None) => {
                let full = format!("{local}@{own}");
                (full.clone(), full)
            }
            (Some((_, DomainForm::Address)), Some(_)) => (name.clone(), name.clone()),
            (Some((own, DomainForm::Local)), domain) => {
                if let Some(domain) = domain.filter(|d| !d.eq_ignore_ascii_case(own)) {
                    return Err(NameError::OtherDomain(domain.to_owned()));
                }
                (local.to_owned(), format!("{local}@{own}"))
            }
        };
        Ok(Canonical { name, address })
    }
}

/// A decoded SASL PLAIN message (RFC 4616).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plain {
    /// The identity to act as; empty for "the one authenticating".
    pub authzid: Vec<u8>,
    /// The identity whose password this is.
    pub authcid: Vec<u8>,
    /// The password.
    pub password: Secret,
}

/// Why a PLAIN message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlainError {
    /// Not base64.
    #[error("the PLAIN response is not base64")]
    Base64,
    /// Not exactly two NUL separators.
    #[error("the PLAIN response does not hold exactly three fields")]
    Fields,
    /// An authorization identity other than the authentication identity.
    #[error("logging in as another user (authorization identity) is not allowed")]
    Authzid,
}

/// Decodes a base64 PLAIN response (`=` is an empty one) and checks that it acts for nobody else.
pub fn decode_plain(base64: &[u8]) -> Result<Plain, PlainError> {
    let bytes = if base64 == b"=" {
        Vec::new()
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(base64)
            .map_err(|_| PlainError::Base64)?
    };
    let mut fields = bytes.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(PlainError::Fields);
    };
    if !authzid.is_empty() && authzid != authcid {
        return Err(PlainError::Authzid);
    }
    Ok(Plain {
        authzid: authzid.to_vec(),
        authcid: authcid.to_vec(),
        password: Secret(password.to_vec()),
    })
}

/// The base64 PLAIN response that logs in as `name` with `password`, acting for nobody else.
pub fn encode_plain(name: &str, password: &Secret) -> Secret {
    let mut message = Vec::with_capacity(name.len() + password.0.len() + 2);
    message.push(0);
    message.extend_from_slice(name.as_bytes());
    message.push(0);
    message.extend_from_slice(password.expose());
    Secret(
        base64::engine::general_purpose::STANDARD
            .encode(message)
            .into_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(domain: Option<(&str, DomainForm)>) -> Rules {
        Rules {
            domain: domain.map(|(d, f)| (d.to_owned(), f)),
            ..Rules::default()
        }
    }

    fn name(rules: &Rules, raw: &str) -> Result<(String, String), NameError> {
        rules.canonical(raw.as_bytes()).map(|c| (c.name, c.address))
    }

    #[test]
    fn canonicalises_like_the_server() {
        let plain = rules(None);
        assert_eq!(name(&plain, "ALICE"), Ok(("alice".into(), "alice".into())));
        assert_eq!(
            name(&plain, "Alice@Example.org"),
            Ok(("alice@example.org".into(), "alice@example.org".into()))
        );
        let address = rules(Some(("example.org", DomainForm::Address)));
        assert_eq!(
            name(&address, "alice"),
            Ok(("alice@example.org".into(), "alice@example.org".into()))
        );
        assert_eq!(
            name(&address, "alice@other.example"),
            Ok(("alice@other.example".into(), "alice@other.example".into()))
        );
        let local = rules(Some(("example.org", DomainForm::Local)));
        assert_eq!(
            name(&local, "ALICE@example.ORG"),
            Ok(("alice".into(), "alice@example.org".into()))
        );
        assert_eq!(
            name(&local, "alice@other.example"),
            Err(NameError::OtherDomain("other.example".into()))
        );
        let preserve = Rules {
            lowercase: false,
            ..Rules::default()
        };
        assert_eq!(
            name(&preserve, "Alice"),
            Ok(("Alice".into(), "Alice".into()))
        );
    }

    #[test]
    fn refuses_separators_and_odd_shapes() {
        let r = rules(None);
        for (raw, err) in [
            ("alice*master", NameError::Character('*')),
            ("alice%other", NameError::Character('%')),
            ("alice+x", NameError::Character('+')),
            ("alice bob", NameError::Character(' ')),
            ("alice\"", NameError::Character('"')),
            ("bob!alice", NameError::Character('!')),
            ("älice", NameError::NotAscii),
            ("", NameError::Length),
            ("@example.org", NameError::Shape),
            ("alice@", NameError::Shape),
            ("a@b@c", NameError::Shape),
        ] {
            assert_eq!(name(&r, raw), Err(err), "{raw:?}");
        }
        assert_eq!(name(&r, &"a".repeat(256)), Err(NameError::Length));
        let plus = Rules {
            extra: "+".into(),
            ..Rules::default()
        };
        assert!(name(&plus, "alice+x").is_ok());
    }

    #[test]
    fn decodes_plain_for_oneself_only() {
        let encode = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let plain = decode_plain(encode(b"\0alice\0pw").as_bytes()).unwrap();
        assert_eq!(
            (plain.authcid.as_slice(), plain.password.expose()),
            (&b"alice"[..], &b"pw"[..])
        );
        assert!(decode_plain(encode(b"alice\0alice\0pw").as_bytes()).is_ok());
        assert_eq!(
            decode_plain(encode(b"bob\0alice\0pw").as_bytes()),
            Err(PlainError::Authzid)
        );
        assert_eq!(
            decode_plain(encode(b"\0alice\0p\0w").as_bytes()),
            Err(PlainError::Fields)
        );
        assert_eq!(
            decode_plain(encode(b"alice\0pw").as_bytes()),
            Err(PlainError::Fields)
        );
        assert_eq!(decode_plain(b"=").unwrap_err(), PlainError::Fields);
        assert_eq!(decode_plain(b"!!"), Err(PlainError::Base64));
        let round = decode_plain(encode_plain("alice", &Secret(b"p w".to_vec())).expose()).unwrap();
        assert_eq!(
            (round.authzid.len(), round.authcid.as_slice()),
            (0, &b"alice"[..])
        );
    }
}
