//! Following an IMAP session after login without keeping it.
//!
//! The broker copies bytes once the login succeeded, but it still frames both directions, so
//! that no command that would undo the login binding reaches the server: `UNAUTHENTICATE` (a
//! second, unchecked login), `COMPRESS` (which would hide the framing from here on), another
//! `LOGIN` or `AUTHENTICATE`, `STARTTLS`. It also lets the broker end a session between two
//! responses with `* BYE`.
//!
//! The client side and the server must agree on where each command starts, so the watch is
//! strict rather than clever; what it cannot follow with certainty ends the session:
//! - A command line is held until its tag and name are known, and forwarded only if the name is
//!   allowed: a forbidden line never reaches the server, not even in part.
//! - Lock-step: after a line that waits for a continuation (a synchronising literal `{n}`, or
//!   `IDLE`), nothing more from the client is forwarded until the server has answered that
//!   command, with `+` (the literal follows, or IDLE runs) or with its tagged reply (it does
//!   not). Tags of commands in flight must be unique, so a reply names one command.
//! - Non-synchronising literals (`{n+}`), which a server that rejects the command would read
//!   as commands, end the session; `LITERAL+` is removed from what the client is told.
//! - Control characters in a command line, tags longer than a client would send, `IDLE` with
//!   arguments and literal lengths out of range end the session.

use std::collections::HashSet;

use crate::{is_astring_char, is_atom_char, literal_marker};

/// Longest response line the server side keeps to rewrite; longer lines pass unchanged.
const MAX_LINE: usize = 8 * 1024;
/// Longest tag and command name together that a command line may start with.
const HEAD: usize = 96;
/// Bytes at the end of a line kept to find a literal marker; longer markers are malformed.
const TAIL: usize = 32;
/// Commands in flight at once (pipelining); more ends the session.
const MAX_IN_FLIGHT: usize = 1024;

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

/// Whether a capability is hidden from the client after login: those of the commands in
/// [`FORBIDDEN`], and non-synchronising literals.
pub fn hidden(capability: &[u8]) -> bool {
    let upper = capability.to_ascii_uppercase();
    matches!(
        &upper[..],
        b"UNAUTHENTICATE" | b"STARTTLS" | b"LITERAL+" | b"LITERAL-" | b"LOGINDISABLED" | b"SASL-IR"
    ) || upper.starts_with(b"COMPRESS=")
        || upper.starts_with(b"AUTH=")
}

/// Why the client's bytes stopped being forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// A command waits for the server's answer: forward nothing more from the client until
    /// [`Server`] has seen it.
    Await,
    /// A command of [`FORBIDDEN`], with why: its line must not reach the server.
    Forbidden(&'static str, &'static str),
    /// Something the watch cannot follow with certainty: end the session.
    Malformed(&'static str),
}

/// What the server has yet to answer before more client bytes may pass.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Waiting {
    /// A synchronising literal of this length.
    Literal { tag: Vec<u8>, len: u64 },
    /// `IDLE`.
    Idle { tag: Vec<u8> },
}

/// Where the client side is within a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Line {
    /// At the start of a command: its head is held until the name is known.
    #[default]
    Head,
    /// In a command line whose name was allowed, or in its continuation after a literal.
    Rest,
    /// In the line that ends an `IDLE` (`DONE`): no command, no literal.
    IdleEnd,
}

/// The client's side of a session after login.
#[derive(Debug, Default)]
pub struct Client {
    line: Line,
    /// The start of the current command line, held until its name is known.
    head: Vec<u8>,
    /// The end of the current line, for its literal marker.
    tail: Vec<u8>,
    /// Literal bytes still to pass.
    literal: u64,
    /// The tag of the current command.
    tag: Vec<u8>,
    /// The current line is an `IDLE` command.
    idle: bool,
    waiting: Option<Waiting>,
    in_flight: HashSet<Vec<u8>>,
}

impl Client {
    /// Takes `bytes` from the client and appends to `out` what may be forwarded to the server
    /// now. Returns how many of `bytes` were taken, and why not all, if not all: the rest is
    /// fed again after [`Stop::Await`]; after any other stop the session ends.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> (usize, Option<Stop>) {
        let mut at = 0;
        while at < bytes.len() {
            if self.waiting.is_some() {
                return (at, Some(Stop::Await));
            }
            if self.literal > 0 {
                let take = usize::try_from(self.literal)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - at);
                out.extend_from_slice(&bytes[at..at + take]);
                at += take;
                self.literal -= take as u64;
                continue;
            }
            if self.line == Line::Head {
                match self.head_byte(bytes[at], out) {
                    Ok(()) => at += 1,
                    Err(stop) => return (at, Some(stop)),
                }
                continue;
            }
            let rest = &bytes[at..];
            let end = rest.iter().position(|&b| b == b'\n');
            let piece = &rest[..end.map_or(rest.len(), |e| e + 1)];
            if piece.iter().any(|&b| is_control(b)) {
                return (
                    at,
                    Some(Stop::Malformed("a control character in a command")),
                );
            }
            out.extend_from_slice(piece);
            self.remember(piece);
            at += piece.len();
            if end.is_some()
                && let Err(stop) = self.end_line()
            {
                return (at, Some(stop));
            }
        }
        let stop = self.waiting.is_some().then_some(Stop::Await);
        (at, stop)
    }

    /// Whether a command waits for the server's answer.
    pub fn is_waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// The server sent a `+` continuation.
    fn continuation(&mut self) {
        match self.waiting.take() {
            Some(Waiting::Literal { len, .. }) => self.literal = len,
            Some(Waiting::Idle { .. }) => self.line = Line::IdleEnd,
            // Lock-step: no client byte passed since; nothing to re-read.
            None => {}
        }
    }

    /// The server answered the command tagged `tag`.
    fn tagged(&mut self, tag: &[u8]) {
        self.in_flight.remove(tag);
        let waits_for_it = match &self.waiting {
            Some(Waiting::Literal { tag: t, .. } | Waiting::Idle { tag: t }) => t == tag,
            None => false,
        };
        if waits_for_it {
            // Refused before its literal, or IDLE refused: what follows is a new command.
            self.waiting = None;
            self.line = Line::Head;
        }
    }

    /// One byte of the start of a command line, held in `head` until the name is known.
    fn head_byte(&mut self, b: u8, out: &mut Vec<u8>) -> Result<(), Stop> {
        if is_control(b) {
            return Err(Stop::Malformed("a control character in a command"));
        }
        let tag_end = self.head.iter().position(|&c| c == b' ');
        let name_ended = match tag_end {
            None if b == b' ' || b == b'\r' || b == b'\n' => {
                if b != b' ' || self.head.is_empty() {
                    return Err(Stop::Malformed("a command without a tag"));
                }
                false
            }
            None if !is_astring_char(b) || b == b'+' => {
                return Err(Stop::Malformed("a command tag IMAP does not allow"));
            }
            None => false,
            // The name is a run of atom characters; whatever else follows ends it.
            Some(_) => !is_atom_char(b),
        };
        if !name_ended {
            if self.head.len() >= HEAD {
                return Err(Stop::Malformed(
                    "a command tag or name longer than clients send",
                ));
            }
            self.head.push(b);
            return Ok(());
        }
        let tag_end = tag_end.unwrap_or_default();
        let (tag, name) = (&self.head[..tag_end], &self.head[tag_end + 1..]);
        if name.is_empty() {
            return Err(Stop::Malformed("a command without a name"));
        }
        let upper = name.to_ascii_uppercase();
        if let Some((name, why)) = FORBIDDEN.iter().find(|(n, _)| n.as_bytes() == upper) {
            return Err(Stop::Forbidden(name, why));
        }
        if upper == b"IDLE" {
            if b != b'\r' && b != b'\n' {
                return Err(Stop::Malformed("IDLE with arguments"));
            }
            self.idle = true;
        }
        if !self.in_flight.insert(tag.to_vec()) {
            return Err(Stop::Malformed(
                "a tag reused while its command is still running",
            ));
        }
        if self.in_flight.len() > MAX_IN_FLIGHT {
            return Err(Stop::Malformed("too many commands in flight"));
        }
        self.tag = tag.to_vec();
        let head = std::mem::take(&mut self.head);
        out.extend_from_slice(&head);
        self.remember(&head);
        self.line = Line::Rest;
        // The byte that ended the name is the first of the rest of the line.
        out.push(b);
        self.remember(&[b]);
        if b == b'\n' {
            self.end_line()?;
        }
        Ok(())
    }

    fn remember(&mut self, bytes: &[u8]) {
        self.tail
            .extend_from_slice(&bytes[bytes.len().saturating_sub(TAIL)..]);
        let excess = self.tail.len().saturating_sub(TAIL);
        self.tail.drain(..excess);
    }

    /// The line just ended: a literal to come, a command complete, or an IDLE begun.
    fn end_line(&mut self) -> Result<(), Stop> {
        let tail = std::mem::take(&mut self.tail);
        let text = tail.strip_suffix(b"\n").unwrap_or(&tail);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if self.line == Line::IdleEnd {
            // `DONE` (or whatever the server takes to end IDLE): no literal, whatever it ends in.
            self.line = Line::Head;
            return Ok(());
        }
        if std::mem::take(&mut self.idle) {
            self.waiting = Some(Waiting::Idle {
                tag: self.tag.clone(),
            });
            self.line = Line::Rest;
            return Ok(());
        }
        match literal_marker(text) {
            None => {
                self.line = Line::Head;
                Ok(())
            }
            Some(Err(())) => Err(Stop::Malformed("a literal length out of range")),
            Some(Ok(marker)) if !marker.sync => Err(Stop::Malformed(
                "a literal sent without waiting (LITERAL+) after login",
            )),
            Some(Ok(marker)) => {
                self.waiting = Some(Waiting::Literal {
                    tag: self.tag.clone(),
                    len: marker.len,
                });
                self.line = Line::Rest;
                Ok(())
            }
        }
    }
}

/// A control character a command line must not hold (CR and LF end lines).
fn is_control(b: u8) -> bool {
    (b < 0x20 && b != b'\r' && b != b'\n') || b == 0x7f
}

/// The server's side of a session after login.
#[derive(Debug, Default)]
pub struct Server {
    literal: u64,
    line: Vec<u8>,
    /// The current line is longer than [`MAX_LINE`] and passes unchanged.
    overlong: bool,
    /// Whether the current line continues a response after a literal.
    continued: bool,
    /// Whether the current response may announce literals (untagged data, not a status).
    data: bool,
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
                self.line.extend_from_slice(piece);
                let excess = self.line.len().saturating_sub(TAIL);
                self.line.drain(..excess);
            } else {
                self.line.extend_from_slice(piece);
                if self.line.len() > MAX_LINE {
                    // Classified from its start; only its end is kept, for a literal marker.
                    if !self.continued {
                        self.classify(client);
                    }
                    out.extend_from_slice(&self.line);
                    let excess = self.line.len().saturating_sub(TAIL);
                    self.line.drain(..excess);
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

    /// What kind of response the current line starts, and what the client side learns from it.
    fn classify(&mut self, client: &mut Client) {
        let line = &self.line;
        if line.first() == Some(&b'+') {
            self.data = false;
            client.continuation();
            return;
        }
        let mut words = line.split(|&b| b == b' ' || b == b'\r' || b == b'\n');
        let first = words.next().unwrap_or_default();
        let second = words.next().unwrap_or_default().to_ascii_uppercase();
        let status = matches!(&second[..], b"OK" | b"NO" | b"BAD" | b"BYE" | b"PREAUTH");
        if first == b"*" {
            // Status responses carry text, never a literal (RFC 9051, resp-text).
            self.data = !status;
        } else {
            self.data = false;
            client.tagged(first);
        }
    }

    fn end_line(&mut self, out: &mut Vec<u8>, client: &mut Client) {
        let overlong = std::mem::take(&mut self.overlong);
        if !overlong && !self.continued {
            self.classify(client);
        }
        let line = std::mem::take(&mut self.line);
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let marker = if self.data {
            literal_marker(text).and_then(Result::ok)
        } else {
            None
        };
        if !overlong {
            // Most lines name no capability: they pass without being rewritten.
            let lists_capabilities = line
                .windows(b"CAPABILITY".len())
                .any(|w| w.eq_ignore_ascii_case(b"CAPABILITY"));
            if marker.is_none() && !self.continued && lists_capabilities {
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
            let (_, stop) = watch.feed(piece, &mut forwarded);
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

    fn forbidden(stop: &Option<Stop>, name: &str) -> bool {
        matches!(stop, Some(Stop::Forbidden(n, _)) if *n == name)
    }

    fn malformed(stop: &Option<Stop>) -> bool {
        matches!(stop, Some(Stop::Malformed(_)))
    }

    #[test]
    fn a_forbidden_command_never_reaches_the_server_even_in_part() {
        for step in [1, 3, 1000] {
            let mut watch = Client::default();
            let (sent, stop) = client(
                &mut watch,
                b"a NOOP\r\nb unauthenticate\r\nc LOGIN bob pw\r\n",
                step,
            );
            assert_eq!(sent, b"a NOOP\r\n");
            assert!(forbidden(&stop, "UNAUTHENTICATE"), "{stop:?}");
            for (input, name) in [
                (&b"x COMPRESS DEFLATE\r\n"[..], "COMPRESS"),
                (b"x LOGIN{5}\r\n", "LOGIN"),
                (b"x Compress(\r\n", "COMPRESS"),
                (b"x AUTHENTICATE PLAIN\r\n", "AUTHENTICATE"),
            ] {
                let mut watch = Client::default();
                let (sent, stop) = client(&mut watch, input, step);
                assert!(sent.is_empty(), "{input:?}");
                assert!(forbidden(&stop, name), "{input:?}: {stop:?}");
            }
        }
    }

    #[test]
    fn what_cannot_be_followed_ends_the_session() {
        for input in [
            &b"a UNAUTHENTICATE\0\r\n"[..],
            b"a NOOP\x01\r\n",
            b"a IDLE {5}\r\n",
            b"a XYZZY {20+}\r\nb COMPRESS DEFLATE\r\n",
            b"a APPEND INBOX {99999999999}\r\n",
            b" NOOP\r\n",
            b"a\"b NOOP\r\n",
            b"a NOOP\r\na NOOP\r\n",
        ] {
            let mut watch = Client::default();
            let (_, stop) = client(&mut watch, input, 7);
            assert!(malformed(&stop), "{input:?}: {stop:?}");
        }
        let mut long = vec![b'a'; 120];
        long.extend_from_slice(b" UNAUTHENTICATE\r\n");
        let mut watch = Client::default();
        let (sent, stop) = client(&mut watch, &long, 9);
        assert!(sent.is_empty());
        assert!(malformed(&stop));
    }

    #[test]
    fn literal_bytes_pass_unread_once_the_server_asked_for_them() {
        let mut watch = Client::default();
        let mut replies = Server::default();
        let (sent, stop) = client(&mut watch, b"a APPEND INBOX {15}\r\nb UNAUTHENTICATE", 100);
        assert_eq!(
            (sent.as_slice(), stop),
            (&b"a APPEND INBOX {15}\r\n"[..], Some(Stop::Await))
        );
        server(&mut replies, &mut watch, b"+ Ready\r\n");
        // The server reads the 15 bytes as the message, and so does the watch.
        let (sent, stop) = client(&mut watch, b"b UNAUTHENTICATE\r\nc NOOP\r\n", 100);
        assert_eq!((sent.len(), stop), (26, None));
    }

    #[test]
    fn a_refused_literal_leaves_the_next_bytes_to_be_read_as_a_command() {
        let mut watch = Client::default();
        let mut replies = Server::default();
        client(&mut watch, b"z NOOP\r\na APPEND INBOX {15}\r\n", 100);
        // Another command's reply does not count; the refusal of this one does.
        server(&mut replies, &mut watch, b"* 3 EXISTS\r\nz OK done\r\n");
        assert!(watch.is_waiting());
        server(&mut replies, &mut watch, b"a NO [TOOBIG] no\r\n");
        assert!(!watch.is_waiting());
        let (sent, stop) = client(&mut watch, b"b UNAUTHENTICATE\r\n", 100);
        assert!(sent.is_empty());
        assert!(forbidden(&stop, "UNAUTHENTICATE"));
    }

    #[test]
    fn idle_waits_for_its_own_continuation() {
        let mut watch = Client::default();
        let mut replies = Server::default();
        // Nothing passes behind IDLE until the server has answered it.
        let (sent, stop) = client(&mut watch, b"a IDLE\r\nDONE\r\nb IDLE\r\n", 100);
        assert_eq!(
            (sent.as_slice(), stop),
            (&b"a IDLE\r\n"[..], Some(Stop::Await))
        );
        server(&mut replies, &mut watch, b"+ idling\r\n");
        let (sent, stop) = client(
            &mut watch,
            b"DONE\r\nb IDLE\r\nDONE\r\nc XYZZY {20}\r\n",
            100,
        );
        assert_eq!(
            (sent.as_slice(), stop),
            (&b"DONE\r\nb IDLE\r\n"[..], Some(Stop::Await))
        );
        server(&mut replies, &mut watch, b"a OK done\r\n+ idling\r\n");
        let (sent, stop) = client(
            &mut watch,
            b"DONE\r\nc XYZZY {20}\r\nd COMPRESS DEFLATE\r\n",
            100,
        );
        assert_eq!(
            (sent.as_slice(), stop),
            (&b"DONE\r\nc XYZZY {20}\r\n"[..], Some(Stop::Await))
        );
        // The unknown command is refused: the bytes behind it are a command.
        server(&mut replies, &mut watch, b"b OK done\r\nc BAD unknown\r\n");
        let (_, stop) = client(&mut watch, b"d COMPRESS DEFLATE\r\n", 100);
        assert!(forbidden(&stop, "COMPRESS"));
        // The line that ends an IDLE holds no literal, whatever it ends in.
        let mut watch = Client::default();
        client(&mut watch, b"a IDLE\r\n", 100);
        server(&mut replies, &mut watch, b"+ idling\r\n");
        let (_, stop) = client(&mut watch, b"x {5}\r\nb NOOP\r\n", 100);
        assert_eq!(stop, None);
    }

    #[test]
    fn a_carriage_return_split_from_its_marker_does_not_hide_it() {
        let mut watch = Client::default();
        let (_, stop) = client(&mut watch, b"a APPEND INBOX {20\r+}\r\n", 19);
        assert_eq!(stop, None, "`{{20\\r+}}` is no marker");
        let mut watch = Client::default();
        let (_, stop) = client(&mut watch, b"a APPEND INBOX {20+}\r\n", 19);
        assert!(malformed(&stop));
    }

    #[test]
    fn hides_capabilities_and_finds_boundaries() {
        let mut watch = Client::default();
        let mut replies = Server::default();
        let out = server(
            &mut replies,
            &mut watch,
            b"* CAPABILITY IMAP4rev1 IDLE UNAUTHENTICATE COMPRESS=DEFLATE LITERAL+\r\n* 1 FETCH (BODY[] {9}\r\n* CAPABI",
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
        // A status response's text never announces a literal, whatever it echoes.
        server(
            &mut replies,
            &mut watch,
            b"a NO Mailbox doesn't exist: x{9}\r\n",
        );
        assert!(replies.at_boundary());
        server(&mut replies, &mut watch, b"* OK [ALERT] x{9}\r\n");
        assert!(replies.at_boundary());
    }

    proptest::proptest! {
        #[test]
        fn forwards_a_prefix_or_stops(input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096), step in 1usize..64) {
            let mut watch = Client::default();
            let mut replies = Server::default();
            let (sent, _) = client(&mut watch, &input, step);
            proptest::prop_assert!(input.starts_with(&sent));
            let out = server(&mut replies, &mut watch, &input);
            proptest::prop_assert!(out.len() <= input.len());
        }
    }
}
