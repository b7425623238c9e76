//! Client commands before login: framing of lines and literals, and the commands the broker
//! understands.
//!
//! The broker reads one complete command at a time and decides on it before it reads the next,
//! so pipelined commands wait in the reader. Synchronising literals (`{n}`) make the reader ask
//! for a continuation ([`Event::Continue`]); `LITERAL+` literals (`{n+}`) do not. NUL bytes and
//! binary literals (`~{n}`) are refused.

use crate::{Marker, Secret, is_astring_char, literal_marker};

/// Bounds on one command before login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest line, without its line end.
    pub line: usize,
    /// Largest literal.
    pub literal: usize,
    /// Largest command, lines and literals together.
    pub command: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            line: 8 * 1024,
            literal: 8 * 1024,
            command: 16 * 1024,
        }
    }
}

/// A command tag: 1 to 64 `ASTRING-CHAR`s other than `+`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag(String);

impl Tag {
    /// Longest tag accepted.
    pub const MAX_LEN: usize = 64;

    /// Checks `bytes` and wraps them.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        let valid = !bytes.is_empty()
            && bytes.len() <= Self::MAX_LEN
            && bytes.iter().all(|&b| is_astring_char(b) && b != b'+');
        // Checked ASCII above.
        valid.then(|| Self(bytes.iter().map(|&b| char::from(b)).collect()))
    }

    /// The tag as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A complete client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The client's tag, used in the answer.
    pub tag: Tag,
    /// What is asked.
    pub kind: Kind,
}

/// The commands the broker tells apart before login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `CAPABILITY`.
    Capability,
    /// `NOOP`.
    Noop,
    /// `LOGOUT`.
    Logout,
    /// `ID` with its parameters (which the broker does not pass on).
    Id,
    /// `STARTTLS`.
    StartTls,
    /// `LOGIN user password`.
    Login {
        /// The login name as sent.
        user: Vec<u8>,
        /// The password.
        password: Secret,
    },
    /// `AUTHENTICATE mechanism [initial-response]`.
    Authenticate {
        /// The mechanism name, upper case.
        mechanism: String,
        /// The SASL-IR initial response as sent (base64, or `=` for empty).
        initial: Option<Secret>,
    },
    /// Any other command, by its upper-case name.
    Other(String),
}

/// What the reader found in the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The client announced a synchronising literal and waits for a `+` continuation.
    Continue,
    /// A complete command.
    Command(Command),
    /// A line answering a SASL challenge (after [`Reader::expect_sasl_response`]): base64 text,
    /// or `*` to cancel.
    SaslResponse(Secret),
    /// A command the broker cannot accept, complete or abandoned: answer `BAD` with the tag when
    /// there is one, and read on.
    Bad {
        /// The command's tag, when it could be read.
        tag: Option<Tag>,
        /// Why, for the client.
        reason: &'static str,
    },
    /// The stream cannot be followed any more: say `BYE` and close.
    Fatal(&'static str),
}

/// Frames and parses client commands from bytes as they arrive.
#[derive(Debug, Default)]
pub struct Reader {
    limits: Limits,
    input: Vec<u8>,
    parts: Vec<Vec<u8>>,
    size: usize,
    literal: Option<usize>,
    bad: Option<&'static str>,
    sasl: bool,
    fatal: bool,
}

impl Reader {
    /// A reader with `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Adds bytes received from the client.
    pub fn push(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// Whether the reader holds bytes it has not turned into events: more than a partial
    /// command means the client pipelined.
    pub fn buffered(&self) -> usize {
        self.input.len()
    }

    /// Hands over the bytes not yet read, for the relay after login.
    pub fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.input)
    }

    /// The next line is the answer to a SASL challenge, not a command.
    pub fn expect_sasl_response(&mut self) {
        self.sasl = true;
    }

    /// The next event, or `None` when more bytes are needed.
    pub fn next_event(&mut self) -> Option<Event> {
        if self.fatal {
            return None;
        }
        loop {
            if let Some(len) = self.literal {
                if self.input.len() < len {
                    return None;
                }
                let literal: Vec<u8> = self.input.drain(..len).collect();
                if literal.contains(&0) {
                    self.bad.get_or_insert("a literal holds a NUL byte");
                }
                self.parts.push(literal);
                self.literal = None;
                continue;
            }
            let Some(end) = self.input.iter().position(|&b| b == b'\n') else {
                if self.input.len() > self.limits.line + 1 {
                    return Some(self.fail("line too long"));
                }
                return None;
            };
            let mut line: Vec<u8> = self.input.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.len() > self.limits.line {
                return Some(self.fail("line too long"));
            }
            if std::mem::take(&mut self.sasl) {
                return Some(Event::SaslResponse(Secret(line)));
            }
            if line.contains(&0) {
                self.bad.get_or_insert("a command holds a NUL byte");
            }
            self.size += line.len();
            if self.size > self.limits.command {
                return Some(self.fail("command too long"));
            }
            let marker = match literal_marker(&line) {
                None => {
                    self.parts.push(line);
                    return Some(self.complete());
                }
                Some(Ok(marker)) => marker,
                // Sent without waiting or not, its end cannot be followed.
                Some(Err(())) => return Some(self.fail("literal too large")),
            };
            if let Some(event) = self.literal_announced(line, marker) {
                return Some(event);
            }
        }
    }

    /// A line ending in a literal marker: checks the literal and waits for it.
    fn literal_announced(&mut self, mut line: Vec<u8>, marker: Marker) -> Option<Event> {
        let len = usize::try_from(marker.len).unwrap_or(usize::MAX);
        let too_large =
            len > self.limits.literal || self.size.saturating_add(len) > self.limits.command;
        if marker.binary {
            self.bad
                .get_or_insert("binary literals are not accepted before login");
        } else if too_large {
            self.bad.get_or_insert("literal too large");
        }
        if marker.sync && self.bad.is_some() {
            // The client waits for a continuation and abandons the command on `BAD`.
            line.truncate(marker.start);
            self.parts.push(line);
            return Some(self.abandon());
        }
        if too_large {
            // Sent without waiting: its end cannot be followed without reading it all.
            return Some(self.fail("literal too large"));
        }
        line.truncate(marker.start);
        self.parts.push(line);
        self.literal = Some(len);
        self.size += len;
        marker.sync.then_some(Event::Continue)
    }

    fn fail(&mut self, reason: &'static str) -> Event {
        self.fatal = true;
        self.input.clear();
        Event::Fatal(reason)
    }

    fn abandon(&mut self) -> Event {
        let parts = std::mem::take(&mut self.parts);
        let reason = self.bad.take().unwrap_or("malformed command");
        self.size = 0;
        Event::Bad {
            tag: leading_tag(&parts),
            reason,
        }
    }

    fn complete(&mut self) -> Event {
        if self.bad.is_some() {
            return self.abandon();
        }
        let parts = std::mem::take(&mut self.parts);
        self.size = 0;
        match parse(&parts) {
            Ok(command) => Event::Command(command),
            Err(reason) => Event::Bad {
                tag: leading_tag(&parts),
                reason,
            },
        }
    }
}

fn leading_tag(parts: &[Vec<u8>]) -> Option<Tag> {
    let first = parts.first()?;
    let end = first.iter().position(|&b| b == b' ').unwrap_or(first.len());
    Tag::new(&first[..end])
}

/// Walks the parts of a command: lines, each but the last followed by a literal.
struct Cursor<'a> {
    parts: &'a [Vec<u8>],
    part: usize,
    at: usize,
}

enum Token<'a> {
    Atom(&'a [u8]),
    Quoted(Vec<u8>),
    Literal(&'a [u8]),
}

impl<'a> Cursor<'a> {
    fn line(&self) -> &'a [u8] {
        // Parts alternate line, literal, line, …; the cursor stays on lines.
        &self.parts[self.part][self.at..]
    }

    fn at_end(&self) -> bool {
        self.line().is_empty() && self.part + 1 >= self.parts.len()
    }

    fn space(&mut self) -> Result<(), &'static str> {
        if self.line().first() == Some(&b' ') {
            self.at += 1;
            Ok(())
        } else {
            Err("expected a space")
        }
    }

    fn byte(&mut self, b: u8) -> bool {
        if self.line().first() == Some(&b) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn atom(&mut self) -> Result<&'a [u8], &'static str> {
        let line = self.line();
        let len = line.iter().take_while(|&&b| is_astring_char(b)).count();
        if len == 0 {
            return Err("expected an atom");
        }
        self.at += len;
        Ok(&line[..len])
    }

    fn string(&mut self) -> Result<Token<'a>, &'static str> {
        let line = self.line();
        if line.is_empty() {
            // A literal follows the end of this line.
            let literal = self.parts.get(self.part + 1).ok_or("expected a string")?;
            if self.part + 2 >= self.parts.len() {
                return Err("expected a line after a literal");
            }
            self.part += 2;
            self.at = 0;
            return Ok(Token::Literal(literal));
        }
        if line[0] != b'"' {
            return self.atom().map(Token::Atom);
        }
        let mut out = Vec::new();
        let mut i = 1;
        loop {
            match line.get(i) {
                None => return Err("unterminated quoted string"),
                Some(b'"') => break,
                Some(b'\\') => match line.get(i + 1) {
                    Some(&c @ (b'"' | b'\\')) => {
                        out.push(c);
                        i += 2;
                    }
                    _ => return Err("bad escape in a quoted string"),
                },
                Some(&c) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        self.at += i + 1;
        Ok(Token::Quoted(out))
    }

    fn astring(&mut self) -> Result<Vec<u8>, &'static str> {
        Ok(match self.string()? {
            Token::Atom(a) | Token::Literal(a) => a.to_vec(),
            Token::Quoted(q) => q,
        })
    }

    /// `ID` parameters: `NIL` or a parenthesised list of strings and `NIL`s.
    fn id_parameters(&mut self) -> Result<(), &'static str> {
        if !self.byte(b'(') {
            let atom = self.atom()?;
            return if atom.eq_ignore_ascii_case(b"NIL") {
                Ok(())
            } else {
                Err("ID takes NIL or a list")
            };
        }
        let mut first = true;
        while !self.byte(b')') {
            if !first {
                self.space()?;
            }
            self.string()?;
            first = false;
        }
        Ok(())
    }
}

fn parse(parts: &[Vec<u8>]) -> Result<Command, &'static str> {
    let mut cursor = Cursor {
        parts,
        part: 0,
        at: 0,
    };
    let tag_end = parts[0]
        .iter()
        .position(|&b| b == b' ')
        .unwrap_or(parts[0].len());
    let tag = Tag::new(&parts[0][..tag_end]).ok_or("malformed tag")?;
    cursor.at = tag_end;
    cursor.space().map_err(|_| "missing command")?;
    let name = cursor.atom().map_err(|_| "missing command")?;
    if name.len() > 32 {
        return Err("unknown command");
    }
    let name = name.to_ascii_uppercase();
    let kind = match &name[..] {
        b"CAPABILITY" => Kind::Capability,
        b"NOOP" => Kind::Noop,
        b"LOGOUT" => Kind::Logout,
        b"STARTTLS" => Kind::StartTls,
        b"ID" => {
            cursor.space()?;
            cursor.id_parameters()?;
            Kind::Id
        }
        b"LOGIN" => {
            cursor.space()?;
            let user = cursor.astring()?;
            cursor.space()?;
            let password = Secret(cursor.astring()?);
            Kind::Login { user, password }
        }
        b"AUTHENTICATE" => {
            cursor.space()?;
            let mechanism = cursor.atom()?.to_ascii_uppercase();
            let initial = if cursor.at_end() {
                None
            } else {
                cursor.space()?;
                Some(Secret(cursor.atom()?.to_vec()))
            };
            Kind::Authenticate {
                // Atoms are ASCII.
                mechanism: mechanism.iter().map(|&b| char::from(b)).collect(),
                initial,
            }
        }
        _ => {
            return Ok(Command {
                tag,
                kind: Kind::Other(name.iter().map(|&b| char::from(b)).collect()),
            });
        }
    };
    if !cursor.at_end() {
        return Err("unexpected arguments");
    }
    Ok(Command { tag, kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(input: &[u8]) -> Vec<Event> {
        let mut reader = Reader::new(Limits::default());
        reader.push(input);
        std::iter::from_fn(|| reader.next_event()).collect()
    }

    fn command(input: &[u8]) -> Kind {
        match &events(input)[..] {
            [Event::Command(c)] => c.kind.clone(),
            other => panic!("{input:?}: {other:?}"),
        }
    }

    fn login(user: &[u8], password: &[u8]) -> Kind {
        Kind::Login {
            user: user.to_vec(),
            password: Secret(password.to_vec()),
        }
    }

    #[test]
    fn reads_login_in_every_string_form() {
        assert_eq!(
            command(b"a1 LOGIN alice secret\r\n"),
            login(b"alice", b"secret")
        );
        assert_eq!(
            command(b"a1 login \"al\\\"ice\" \"p w\"\r\n"),
            login(b"al\"ice", b"p w")
        );
        assert_eq!(
            events(b"a1 LOGIN {5}\r\nalice {3}\r\np w\r\n"),
            vec![
                Event::Continue,
                Event::Continue,
                Event::Command(Command {
                    tag: Tag::new(b"a1").unwrap(),
                    kind: login(b"alice", b"p w")
                })
            ]
        );
        assert_eq!(
            command(b"a1 LOGIN {5+}\r\nalice {3+}\r\np\r\n\r\n"),
            login(b"alice", b"p\r\n")
        );
        assert_eq!(command(b"x LOGIN alice pw\n"), login(b"alice", b"pw"));
    }

    #[test]
    fn waits_for_whole_commands_split_anywhere() {
        let input = b"a1 LOGIN {5}\r\nalice {3+}\r\np w\r\nb NOOP\r\n";
        for split in 0..input.len() {
            let mut reader = Reader::new(Limits::default());
            let mut seen = Vec::new();
            for piece in [&input[..split], &input[split..]] {
                reader.push(piece);
                seen.extend(std::iter::from_fn(|| reader.next_event()));
            }
            assert_eq!(seen.len(), 3, "split at {split}: {seen:?}");
            assert_eq!(seen[0], Event::Continue);
            assert!(matches!(&seen[1], Event::Command(c) if c.kind == login(b"alice", b"p w")));
            assert!(matches!(&seen[2], Event::Command(c) if c.kind == Kind::Noop));
        }
    }

    #[test]
    fn keeps_pipelined_commands_for_later() {
        let mut reader = Reader::new(Limits::default());
        reader.push(b"a LOGIN alice x\r\nb LOGIN bob y\r\n");
        assert!(matches!(reader.next_event(), Some(Event::Command(_))));
        assert_eq!(reader.take_rest(), b"b LOGIN bob y\r\n");
    }

    #[test]
    fn reads_authenticate_and_sasl_responses() {
        assert_eq!(
            command(b"a AUTHENTICATE plain\r\n"),
            Kind::Authenticate {
                mechanism: "PLAIN".into(),
                initial: None
            }
        );
        assert_eq!(
            command(b"a AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n"),
            Kind::Authenticate {
                mechanism: "PLAIN".into(),
                initial: Some(Secret(b"AGFsaWNlAHB3".to_vec()))
            }
        );
        let mut reader = Reader::new(Limits::default());
        reader.push(b"a AUTHENTICATE PLAIN\r\n*\r\n");
        assert!(matches!(reader.next_event(), Some(Event::Command(_))));
        reader.expect_sasl_response();
        assert_eq!(
            reader.next_event(),
            Some(Event::SaslResponse(Secret(b"*".to_vec())))
        );
    }

    #[test]
    fn tells_other_commands_apart() {
        assert_eq!(command(b"a capability\r\n"), Kind::Capability);
        assert_eq!(command(b"a STARTTLS\r\n"), Kind::StartTls);
        assert_eq!(command(b"a ID NIL\r\n"), Kind::Id);
        assert_eq!(
            command(b"a ID (\"name\" \"Thunderbird\" \"version\" NIL)\r\n"),
            Kind::Id
        );
        assert_eq!(command(b"a select INBOX\r\n"), Kind::Other("SELECT".into()));
        assert_eq!(
            command(b"a UNAUTHENTICATE\r\n"),
            Kind::Other("UNAUTHENTICATE".into())
        );
    }

    #[test]
    fn refuses_bad_commands_and_reads_on() {
        let bad = |input: &[u8], want: Option<&str>| {
            let seen = events(input);
            match &seen[..] {
                [Event::Bad { tag, .. }, Event::Command(next)] => {
                    assert_eq!(tag.as_ref().map(Tag::as_str), want, "{input:?}");
                    assert_eq!(next.kind, Kind::Noop);
                }
                other => panic!("{input:?}: {other:?}"),
            }
        };
        bad(b"a LOGIN alice\r\nn NOOP\r\n", Some("a"));
        bad(b"a LOGIN alice pw extra\r\nn NOOP\r\n", Some("a"));
        bad(b"a LOGIN al\0ice pw\r\nn NOOP\r\n", Some("a"));
        bad(b"a LOGIN {3+}\r\na\0b pw\r\nn NOOP\r\n", Some("a"));
        bad(b"a NOOP x\r\nn NOOP\r\n", Some("a"));
        bad(b"+a NOOP\r\nn NOOP\r\n", None);
        bad(b"\r\nn NOOP\r\n", None);
        bad(b"a LOGIN \"alice pw\r\nn NOOP\r\n", Some("a"));
        // A refused synchronising literal is never sent: the next line is a new command.
        bad(b"a LOGIN ~{3}\r\nn NOOP\r\n", Some("a"));
        bad(b"a LOGIN {9000}\r\nn NOOP\r\n", Some("a"));
    }

    #[test]
    fn gives_up_where_framing_is_lost() {
        assert_eq!(
            events(b"a LOGIN {9000+}\r\n"),
            vec![Event::Fatal("literal too large")]
        );
        assert_eq!(events(&[b'a'; 9000]), vec![Event::Fatal("line too long")]);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_stays_bounded(input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let mut reader = Reader::new(Limits { line: 64, literal: 64, command: 128 });
            for chunk in input.chunks(7) {
                reader.push(chunk);
                while let Some(event) = reader.next_event() {
                    if event == Event::Continue { continue; }
                }
                proptest::prop_assert!(reader.size <= 128 + 64);
            }
        }
    }
}
