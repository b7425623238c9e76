//! Following an IMAP session after login without keeping it.
//!
//! The broker copies bytes once the login succeeded, but it still frames both directions:
//! [`Client`] finds where each command starts, so that commands that would undo the login
//! binding (`UNAUTHENTICATE`, `COMPRESS` which would hide the framing, another `LOGIN`) are
//! stopped before their line ends; [`Server`] finds where each response ends, removes those
//! capabilities from what the client is told, and lets the broker end a session between two
//! responses with `* BYE`.
//!
//! Both sides must agree on where literals are. A synchronising literal (`{n}`) is sent only
//! after the server's `+`; when the server refuses it with a tagged answer instead, the bytes that
//! follow are commands. So while a client's literal waits, [`Client`] holds the client's bytes
//! until [`Server`] has seen which of the two the server answered.

use crate::literal_marker;

/// Longest response line the server side keeps to rewrite; longer lines pass unchanged.
const MAX_LINE: usize = 8 * 1024;
/// Bytes of a command line kept to find its tag and name.
const HEAD: usize = 96;
/// Bytes at the end of a line kept to find a literal marker (`~{4294967295+}` is 14).
const TAIL: usize = 16;

/// Commands refused after login, with why.
pub const FORBIDDEN: &[(&str, &str)] = &[
    (
        "UNAUTHENTICATE",
        "would allow a second login that Postern does not check",
    ),
    ("LOGIN", "a session logs in once"),
    ("AUTHENTICATE", "a session logs in once"),
    ("COMPRESS", "would hide the session from Postern's checks"),
    ("STARTTLS", "the session is already encrypted"),
];

/// Whether a capability is hidden from the client: the commands of [`FORBIDDEN`].
pub fn hidden(capability: &[u8]) -> bool {
    let upper = capability.to_ascii_uppercase();
    upper == b"UNAUTHENTICATE" || upper == b"STARTTLS" || upper.starts_with(b"COMPRESS=")
}

/// Why the client's bytes stopped being forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// A synchronising literal waits for the server's answer: forward nothing more from the
    /// client until [`Server`] has seen it.
    Await,
    /// A command of [`FORBIDDEN`]: its line must not reach the server.
    Forbidden(&'static str, &'static str),
}

/// The client's side of a session after login.
#[derive(Debug, Default)]
pub struct Client {
    literal: u64,
    awaiting: Option<(Vec<u8>, u64)>,
    head: Vec<u8>,
    tail: Vec<u8>,
    /// Whether the current line continues a command after a literal.
    continued: bool,
    /// The command this line belongs to.
    tag: Vec<u8>,
    /// The current line ends an `IDLE`: it is not a command and holds no literal.
    idle_terminator: bool,
    /// An `IDLE` was sent and its `+` has not been seen yet.
    idle_plus: Option<Vec<u8>>,
    /// After a line's name was checked, the rest of it is not inspected byte by byte.
    name_checked: bool,
    /// The current line is an `IDLE` command.
    idle_line: bool,
}

impl Client {
    /// How many of `bytes` may be forwarded to the server now, and why not all, if not all.
    pub fn feed(&mut self, bytes: &[u8]) -> (usize, Option<Stop>) {
        let mut at = 0;
        while at < bytes.len() {
            if self.awaiting.is_some() {
                return (at, Some(Stop::Await));
            }
            if self.literal > 0 {
                let take = usize::try_from(self.literal)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - at);
                at += take;
                self.literal -= take as u64;
                continue;
            }
            if !self.name_checked && !self.continued {
                let b = bytes[at];
                if let Some(stop) = self.head_byte(b) {
                    return (at, Some(stop));
                }
                at += 1;
                if b == b'\n' {
                    self.end_line();
                }
                continue;
            }
            let rest = &bytes[at..];
            match rest.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    self.remember_tail(&rest[..end]);
                    at += end + 1;
                    self.end_line();
                }
                None => {
                    self.remember_tail(rest);
                    at = bytes.len();
                }
            }
        }
        let stop = self.awaiting.is_some().then_some(Stop::Await);
        (at, stop)
    }

    /// The server sent a `+` continuation.
    fn continuation(&mut self) {
        if self.idle_plus.take().is_some() {
            return;
        }
        if let Some((_, len)) = self.awaiting.take() {
            self.literal = len;
        }
    }

    /// The server completed the command tagged `tag`.
    fn tagged(&mut self, tag: &[u8]) {
        if self.idle_plus.as_deref() == Some(tag) {
            self.idle_plus = None;
            self.idle_terminator = false;
        }
        if self.awaiting.as_ref().is_some_and(|(t, _)| t == tag) {
            // The literal was refused and will not be sent.
            self.awaiting = None;
            self.continued = false;
        }
    }

    /// Looks at one byte of the start of a command line; stops before the byte that ends a
    /// forbidden command's name.
    fn head_byte(&mut self, b: u8) -> Option<Stop> {
        let ends_word = matches!(b, b' ' | b'\r' | b'\n');
        if ends_word {
            let mut words = self.head.split(|&c| c == b' ');
            if let (Some(tag), Some(name), None) = (words.next(), words.next(), words.next())
                && !name.is_empty()
            {
                self.name_checked = true;
                self.tag = tag.to_vec();
                let upper = name.to_ascii_uppercase();
                if let Some((name, why)) = FORBIDDEN.iter().find(|(n, _)| n.as_bytes() == upper) {
                    return Some(Stop::Forbidden(name, why));
                }
                if upper == b"IDLE" && b != b' ' {
                    self.idle_plus = Some(tag.to_vec());
                    self.idle_line = true;
                }
            }
        }
        if self.head.len() >= HEAD {
            self.name_checked = true;
        } else if b != b'\r' && b != b'\n' {
            self.head.push(b);
        }
        self.remember_tail(&[b]);
        None
    }

    fn remember_tail(&mut self, bytes: &[u8]) {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        self.tail
            .extend_from_slice(&bytes[bytes.len().saturating_sub(TAIL)..]);
        let excess = self.tail.len().saturating_sub(TAIL);
        self.tail.drain(..excess);
    }

    fn end_line(&mut self) {
        let tail = std::mem::take(&mut self.tail);
        let tail = tail.strip_suffix(b"\n").unwrap_or(&tail);
        let tail = tail.strip_suffix(b"\r").unwrap_or(tail);
        let was_terminator = std::mem::take(&mut self.idle_terminator);
        let marker = if was_terminator {
            None
        } else {
            literal_marker(tail)
        };
        if std::mem::take(&mut self.idle_line) {
            // The line just ended was the `IDLE` command: the next one ends it.
            self.idle_terminator = true;
        }
        self.head.clear();
        self.name_checked = false;
        match marker {
            Some(marker) if marker.sync => {
                self.awaiting = Some((self.tag.clone(), marker.len));
                self.continued = true;
            }
            Some(marker) => {
                self.literal = marker.len;
                self.continued = true;
            }
            None => self.continued = false,
        }
    }
}

/// The server's side of a session after login.
#[derive(Debug, Default)]
pub struct Server {
    literal: u64,
    line: Vec<u8>,
    /// The current line is longer than [`MAX_LINE`] and passes unchanged.
    overlong: bool,
    tail: Vec<u8>,
    /// Whether the current line continues a response after a literal.
    continued: bool,
}

impl Server {
    /// Copies `bytes` to `out`, rewriting capability lists, and tells `client` what the server
    /// answered.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>, client: &mut Client) {
        let mut at = 0;
        while at < bytes.len() {
            if self.literal > 0 {
                let take = usize::try_from(self.literal)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - at);
                out.extend_from_slice(&bytes[at..at + take]);
                at += take;
                self.literal -= take as u64;
                continue;
            }
            let rest = &bytes[at..];
            let (piece, complete) = match rest.iter().position(|&b| b == b'\n') {
                Some(end) => (&rest[..=end], true),
                None => (rest, false),
            };
            at += piece.len();
            if self.overlong {
                out.extend_from_slice(piece);
                self.tail
                    .extend_from_slice(&piece[piece.len().saturating_sub(TAIL)..]);
                let excess = self.tail.len().saturating_sub(TAIL + 2);
                self.tail.drain(..excess);
            } else {
                self.line.extend_from_slice(piece);
                if self.line.len() > MAX_LINE {
                    out.extend_from_slice(&self.line);
                    let keep = self.line.len().saturating_sub(TAIL + 2);
                    self.tail = self.line.split_off(keep);
                    self.line.clear();
                    self.overlong = true;
                }
            }
            if complete {
                self.end_line(out, client);
            }
        }
    }

    /// Whether the bytes so far end between two responses, where a `* BYE` can go.
    pub fn at_boundary(&self) -> bool {
        self.literal == 0 && self.line.is_empty() && !self.overlong && !self.continued
    }

    fn end_line(&mut self, out: &mut Vec<u8>, client: &mut Client) {
        let line = std::mem::take(&mut self.line);
        let overlong = std::mem::take(&mut self.overlong);
        let tail = std::mem::take(&mut self.tail);
        let ending = if overlong { &tail[..] } else { &line[..] };
        let ending = ending.strip_suffix(b"\n").unwrap_or(ending);
        let ending = ending.strip_suffix(b"\r").unwrap_or(ending);
        let marker = literal_marker(ending);
        if !overlong {
            if !self.continued {
                if line.first() == Some(&b'+') {
                    client.continuation();
                } else if line.first() != Some(&b'*') {
                    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
                    client.tagged(&line[..end]);
                }
            }
            if marker.is_none() && !self.continued {
                out.extend_from_slice(&crate::response::rewrite_capabilities(&line, |c| {
                    !hidden(c)
                }));
            } else {
                out.extend_from_slice(&line);
            }
        }
        match marker {
            Some(marker) => {
                self.literal = marker.len;
                self.continued = true;
            }
            None => self.continued = false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` to a client watch in pieces of `step` bytes; what was forwarded and how it
    /// stopped.
    fn client(watch: &mut Client, input: &[u8], step: usize) -> (Vec<u8>, Option<Stop>) {
        let mut forwarded = Vec::new();
        for piece in input.chunks(step.max(1)) {
            let (n, stop) = watch.feed(piece);
            forwarded.extend_from_slice(&piece[..n]);
            if stop.is_some() {
                return (forwarded, stop);
            }
        }
        (forwarded, None)
    }

    fn server(watch: &mut Server, client: &mut Client, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        watch.feed(input, &mut out, client);
        out
    }

    #[test]
    fn stops_forbidden_commands_before_their_line_ends() {
        for step in [1, 3, 1000] {
            let mut watch = Client::default();
            let (sent, stop) = client(
                &mut watch,
                b"a NOOP\r\nb unauthenticate\r\nc LOGIN bob pw\r\n",
                step,
            );
            assert_eq!(sent, b"a NOOP\r\nb unauthenticate");
            assert!(matches!(stop, Some(Stop::Forbidden("UNAUTHENTICATE", _))));
            let mut watch = Client::default();
            let (sent, stop) = client(&mut watch, b"x COMPRESS DEFLATE\r\n", step);
            assert_eq!(sent, b"x COMPRESS");
            assert!(matches!(stop, Some(Stop::Forbidden("COMPRESS", _))));
        }
    }

    #[test]
    fn skips_literals_without_looking_inside() {
        let input = b"a APPEND INBOX {20+}\r\nb UNAUTHENTICATE\r\n\r\nc NOOP\r\n";
        let mut watch = Client::default();
        let (sent, stop) = client(&mut watch, input, 5);
        assert_eq!((sent.as_slice(), stop), (&input[..], None));
    }

    #[test]
    fn holds_a_synchronising_literal_until_the_server_decides() {
        let mut watch = Client::default();
        let mut replies = Server::default();
        let (sent, stop) = client(&mut watch, b"a APPEND INBOX {15}\r\nb UNAUTHENTICATE", 100);
        assert_eq!(
            (sent.as_slice(), stop),
            (&b"a APPEND INBOX {15}\r\n"[..], Some(Stop::Await))
        );
        // Accepted: the held bytes are the literal.
        server(&mut replies, &mut watch, b"+ Ready\r\n");
        let (sent, stop) = client(&mut watch, b"b UNAUTHENTICATE\r\nc NOOP\r\n", 100);
        assert_eq!((sent.len(), stop), (26, None));

        // Refused: the held bytes are a command.
        let mut watch = Client::default();
        client(&mut watch, b"a APPEND INBOX {15}\r\n", 100);
        server(
            &mut replies,
            &mut watch,
            b"* 3 EXISTS\r\nz OK earlier\r\na NO [TOOBIG] no\r\n",
        );
        let (sent, stop) = client(&mut watch, b"b UNAUTHENTICATE\r\n", 100);
        assert_eq!(sent, b"b UNAUTHENTICATE");
        assert!(matches!(stop, Some(Stop::Forbidden(..))));
    }

    #[test]
    fn an_idle_continuation_is_not_a_literal_go_ahead() {
        let mut watch = Client::default();
        let mut replies = Server::default();
        let (_, stop) = client(&mut watch, b"a IDLE\r\nDONE\r\nb APPEND x {5}\r\n", 100);
        assert_eq!(stop, Some(Stop::Await));
        server(
            &mut replies,
            &mut watch,
            b"+ idling\r\na OK done\r\nb NO no\r\n",
        );
        let (sent, stop) = client(&mut watch, b"c UNAUTHENTICATE\r\n", 100);
        assert_eq!(sent, b"c UNAUTHENTICATE");
        assert!(matches!(stop, Some(Stop::Forbidden(..))));
        // The line ending an IDLE holds no literal, whatever it ends in.
        let mut watch = Client::default();
        let (_, stop) = client(&mut watch, b"a IDLE\r\nx {5}\r\nb NOOP\r\n", 100);
        assert_eq!(stop, None);
    }

    #[test]
    fn hides_capabilities_and_finds_boundaries() {
        let mut watch = Client::default();
        let mut replies = Server::default();
        let out = server(
            &mut replies,
            &mut watch,
            b"* CAPABILITY IMAP4rev1 IDLE UNAUTHENTICATE COMPRESS=DEFLATE\r\n* 1 FETCH (BODY[] {9}\r\n* CAPABI",
        );
        assert_eq!(
            out,
            b"* CAPABILITY IMAP4rev1 IDLE\r\n* 1 FETCH (BODY[] {9}\r\n* CAPABI"
        );
        assert!(!replies.at_boundary());
        let out = server(&mut replies, &mut watch, b"LI)\r\n");
        assert_eq!(out, b"LI)\r\n");
        assert!(replies.at_boundary());
        let out = server(&mut replies, &mut watch, &[b'x'; MAX_LINE + 100]);
        assert_eq!(out.len(), MAX_LINE + 100);
        assert!(!replies.at_boundary());
        server(&mut replies, &mut watch, b" {3}\r\nabc\r\n");
        assert!(replies.at_boundary());
    }

    proptest::proptest! {
        #[test]
        fn forwards_every_byte_or_stops(input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096), step in 1usize..64) {
            let mut watch = Client::default();
            let mut replies = Server::default();
            let (sent, _) = client(&mut watch, &input, step);
            proptest::prop_assert!(input.starts_with(&sent));
            let out = server(&mut replies, &mut watch, &input);
            proptest::prop_assert!(out.len() <= input.len());
        }
    }
}
