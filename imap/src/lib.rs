//! IMAP as the Postern broker needs it to bind a mail login to the person who passed MFA.
//!
//! Before login the broker is a command-level proxy: [`command::Reader`] frames and parses what
//! the mail client sends (bounded lines and literals), [`response::Reader`] frames what the
//! server answers, [`login`] turns a login name into the canonical form the server will read and
//! decodes SASL PLAIN. After login the broker copies bytes, and [`watch`] follows command and
//! response boundaries in them without keeping them, so that it can refuse commands that would
//! undo the binding (`UNAUTHENTICATE`, `COMPRESS`) and end a session between two responses.
//! [`lockout`] counts failed logins.
//!
//! Nothing here does I/O or reads a clock: bytes and instants go in, values come out. That is
//! what lets the parsers be fuzzed (`imap/fuzz`).

use std::fmt;

pub mod command;
pub mod lockout;
pub mod login;
pub mod response;
pub mod watch;

/// Bytes that must not reach a log: passwords and SASL responses. `Debug` shows only the length.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(pub Vec<u8>);

impl Secret {
    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Whether `b` may appear in an IMAP atom (RFC 9051 `ATOM-CHAR`).
pub(crate) fn is_atom_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
}

/// Whether `b` may appear in an IMAP `astring` without quoting (`ASTRING-CHAR`).
pub(crate) fn is_astring_char(b: u8) -> bool {
    is_atom_char(b) || b == b']'
}

/// `bytes` as an IMAP quoted string when they can be one, else `None`.
pub fn quoted(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes
        .iter()
        .any(|&b| matches!(b, 0 | b'\r' | b'\n') || b >= 0x80)
    {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.push(b'"');
    for &b in bytes {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    Some(out)
}

/// A literal marker (`{n}`, `{n+}`, `~{n}`) at the end of `line`, read as leniently as a server
/// might (any number of digits, leading zeros): where it starts, the length, whether the sender
/// waits for a continuation, and whether it is a binary literal. `Some(Err(()))` for a marker
/// whose length is out of range (more than 2³² − 1).
pub(crate) fn literal_marker(line: &[u8]) -> Option<Result<Marker, ()>> {
    let inner_end = line.len().checked_sub(1)?;
    if line[inner_end] != b'}' {
        return None;
    }
    let open = line[..inner_end].iter().rposition(|&b| b == b'{')?;
    let mut digits = &line[open + 1..inner_end];
    let sync = match digits.last() {
        Some(b'+') => {
            digits = &digits[..digits.len() - 1];
            false
        }
        _ => true,
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let significant = &digits[digits.iter().take_while(|&&d| d == b'0').count()..];
    if significant.len() > 10 {
        return Some(Err(()));
    }
    let len = significant
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    if len > u64::from(u32::MAX) {
        return Some(Err(()));
    }
    let binary = open > 0 && line[open - 1] == b'~';
    Some(Ok(Marker {
        start: if binary { open - 1 } else { open },
        len,
        sync,
        binary,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Marker {
    pub(crate) start: usize,
    pub(crate) len: u64,
    pub(crate) sync: bool,
    pub(crate) binary: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_literal_markers() {
        let marker = |line: &[u8]| {
            literal_marker(line).map(|m| m.map(|m| (m.start, m.len, m.sync, m.binary)))
        };
        assert_eq!(marker(b"a LOGIN {5}"), Some(Ok((8, 5, true, false))));
        assert_eq!(
            marker(b"a LOGIN alice {12+}"),
            Some(Ok((14, 12, false, false)))
        );
        assert_eq!(marker(b"a APPEND x ~{3}"), Some(Ok((11, 3, true, true))));
        // As leniently as a server reads it.
        assert_eq!(
            marker(b"a {000000000020+}"),
            Some(Ok((2, 20, false, false)))
        );
        assert_eq!(marker(b"a {99999999999}"), Some(Err(())));
        assert_eq!(marker(b"a {4294967296}"), Some(Err(())));
        for line in [&b"a LOGIN x}"[..], b"a {}", b"a {+}", b"a {1a}", b"}", b""] {
            assert_eq!(marker(line), None, "{line:?}");
        }
    }

    #[test]
    fn quotes_what_it_can() {
        assert_eq!(quoted(b"a\"b\\c").unwrap(), b"\"a\\\"b\\\\c\"");
        assert_eq!(quoted(b"a\r\nb"), None);
        assert_eq!(quoted("é".as_bytes()), None);
    }
}
