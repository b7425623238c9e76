//! Service names: the only way an agent can name a destination.

use std::fmt;
use std::str::FromStr;

/// Longest service name, in bytes.
pub const MAX_SERVICE_NAME_LEN: usize = 63;

/// The name of a service configured at the broker, such as `imap`.
///
/// A name is 1 to 63 bytes: a lowercase ASCII letter followed by lowercase letters, digits, `-`
/// or `_`. The same name appears in `broker.toml`, in Cedar (`Service::"imap"`) and on the wire,
/// so it is kept to characters that need no quoting anywhere.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(String);

/// Why a string is not a valid [`ServiceName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceNameError {
    /// The name is empty.
    #[error("a service name cannot be empty")]
    Empty,
    /// The name is longer than [`MAX_SERVICE_NAME_LEN`].
    #[error("a service name has at most {MAX_SERVICE_NAME_LEN} characters")]
    TooLong,
    /// The name holds a character outside `a-z 0-9 - _` or does not start with a letter.
    #[error(
        "a service name starts with a lowercase letter and holds only `a-z`, `0-9`, `-` and `_`"
    )]
    InvalidCharacter,
}

impl ServiceName {
    /// Checks `name` and wraps it.
    pub fn new(name: &str) -> Result<Self, ServiceNameError> {
        Self::check(name.as_bytes())?;
        Ok(Self(name.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn from_wire(bytes: &[u8]) -> Result<Self, ServiceNameError> {
        Self::check(bytes)?;
        // `check` admits ASCII only.
        Ok(Self(bytes.iter().map(|&b| char::from(b)).collect()))
    }

    fn check(bytes: &[u8]) -> Result<(), ServiceNameError> {
        let (first, rest) = bytes.split_first().ok_or(ServiceNameError::Empty)?;
        if bytes.len() > MAX_SERVICE_NAME_LEN {
            return Err(ServiceNameError::TooLong);
        }
        let valid_rest =
            |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_';
        if !first.is_ascii_lowercase() || !rest.iter().all(valid_rest) {
            return Err(ServiceNameError::InvalidCharacter);
        }
        Ok(())
    }
}

impl FromStr for ServiceName {
    type Err = ServiceNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl AsRef<str> for ServiceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// How the agent serves a service to local programs, as the broker announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ServiceKind {
    /// Plain TCP: bytes are forwarded as they are.
    #[default]
    Tcp,
    /// IMAP: the agent serves TLS on loopback with its local certificate, and the broker checks
    /// the login.
    Imap,
}

impl ServiceKind {
    /// The name used in configuration and bundles: `tcp` or `imap`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::Tcp => "tcp",
            ServiceKind::Imap => "imap",
        }
    }

    /// The kind named `name`, if known.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "tcp" => Some(ServiceKind::Tcp),
            "imap" => Some(ServiceKind::Imap),
            _ => None,
        }
    }

    pub(crate) fn to_wire(self) -> u8 {
        match self {
            ServiceKind::Tcp => 0,
            ServiceKind::Imap => 1,
        }
    }

    pub(crate) fn from_wire(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(ServiceKind::Tcp),
            1 => Some(ServiceKind::Imap),
            _ => None,
        }
    }
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for name in [
            "imap",
            "smtp-submission",
            "a",
            "sieve_4190",
            &"x".repeat(63),
        ] {
            assert_eq!(ServiceName::new(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(ServiceName::new(""), Err(ServiceNameError::Empty));
        assert_eq!(
            ServiceName::new(&"x".repeat(64)),
            Err(ServiceNameError::TooLong)
        );
        for name in [
            "IMAP", "1imap", "-imap", "im ap", "imap.", "imäp", "imap\0", "im\"ap",
        ] {
            assert_eq!(
                ServiceName::new(name),
                Err(ServiceNameError::InvalidCharacter),
                "{name:?}"
            );
        }
    }
}
