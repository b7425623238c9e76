//! Server responses before login: framing, status, and capability lists the broker rewrites.

use crate::literal_marker;

/// Largest response the broker reads before login, literals included.
pub const MAX_RESPONSE: usize = 64 * 1024;

/// One complete server response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The bytes as received, with every line end and literal.
    pub raw: Vec<u8>,
    /// What kind of response it is.
    pub kind: ResponseKind,
}

/// The kinds of server response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseKind {
    /// `+ …`: the server waits for more from the client.
    Continue,
    /// `* …`, with the status when it is `OK`, `NO`, `BAD`, `PREAUTH` or `BYE`.
    Untagged(Option<Status>),
    /// `tag STATUS …`.
    Tagged {
        /// The tag.
        tag: Vec<u8>,
        /// The status.
        status: Status,
    },
}

/// A response status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `OK`.
    Ok,
    /// `NO`.
    No,
    /// `BAD`.
    Bad,
    /// `PREAUTH`.
    Preauth,
    /// `BYE`.
    Bye,
}

/// Why the server's bytes cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// A response was larger than [`MAX_RESPONSE`].
    #[error("the mail server sent a response larger than {MAX_RESPONSE} bytes before login")]
    TooLarge,
    /// A line was neither `+`, `*` nor a tagged status response.
    #[error("the mail server sent something that is not an IMAP response")]
    Malformed,
}

/// Frames server responses from bytes as they arrive.
#[derive(Debug, Default)]
pub struct Reader {
    input: Vec<u8>,
    /// Bytes of `input` already known to belong to the response being read.
    scanned: usize,
    literal: usize,
}

impl Reader {
    /// Adds bytes received from the server.
    pub fn push(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// Hands over the bytes not yet read, for the relay after login.
    pub fn take_rest(&mut self) -> Vec<u8> {
        self.scanned = 0;
        self.literal = 0;
        std::mem::take(&mut self.input)
    }

    /// The next complete response, `Ok(None)` when more bytes are needed.
    pub fn next_response(&mut self) -> Result<Option<Response>, ResponseError> {
        loop {
            if self.literal > 0 {
                if self.input.len() < self.scanned + self.literal {
                    return self.bounded();
                }
                self.scanned += self.literal;
                self.literal = 0;
            }
            let Some(end) = self.input[self.scanned..].iter().position(|&b| b == b'\n') else {
                return self.bounded();
            };
            let line_end = self.scanned + end;
            let line = &self.input[self.scanned..line_end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match literal_marker(line) {
                Some(Err(())) => return Err(ResponseError::TooLarge),
                Some(Ok(marker)) if !marker.binary => {
                    self.literal =
                        usize::try_from(marker.len).map_err(|_| ResponseError::TooLarge)?;
                    self.scanned = line_end + 1;
                    if self.scanned + self.literal > MAX_RESPONSE {
                        return Err(ResponseError::TooLarge);
                    }
                }
                _ => {
                    let raw: Vec<u8> = self.input.drain(..=line_end).collect();
                    self.scanned = 0;
                    let kind = classify(&raw)?;
                    return Ok(Some(Response { raw, kind }));
                }
            }
        }
    }

    fn bounded(&self) -> Result<Option<Response>, ResponseError> {
        if self.input.len() > MAX_RESPONSE {
            Err(ResponseError::TooLarge)
        } else {
            Ok(None)
        }
    }
}

fn classify(raw: &[u8]) -> Result<ResponseKind, ResponseError> {
    if raw.first() == Some(&b'+') {
        return Ok(ResponseKind::Continue);
    }
    let mut words = raw.splitn(3, |&b| b == b' ');
    let first = words.next().unwrap_or_default();
    let status = words.next().map(|w| {
        let w = w.strip_suffix(b"\n").unwrap_or(w);
        let w = w.strip_suffix(b"\r").unwrap_or(w);
        status(w)
    });
    if first == b"*" {
        return Ok(ResponseKind::Untagged(status.flatten()));
    }
    match status.flatten() {
        Some(status @ (Status::Ok | Status::No | Status::Bad)) if !first.is_empty() => {
            Ok(ResponseKind::Tagged {
                tag: first.to_vec(),
                status,
            })
        }
        _ => Err(ResponseError::Malformed),
    }
}

fn status(word: &[u8]) -> Option<Status> {
    Some(match &word.to_ascii_uppercase()[..] {
        b"OK" => Status::Ok,
        b"NO" => Status::No,
        b"BAD" => Status::Bad,
        b"PREAUTH" => Status::Preauth,
        b"BYE" => Status::Bye,
        _ => return None,
    })
}

/// `line` (one response line, no literal) with the capability list it carries rewritten by
/// `keep`: a `* CAPABILITY …` response, or a `[CAPABILITY …]` response code after a status.
/// Other lines come back unchanged.
pub fn rewrite_capabilities(line: &[u8], keep: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let Some((start, end)) = capability_span(line) else {
        return line.to_vec();
    };
    let mut out = line[..start].to_vec();
    let kept: Vec<&[u8]> = line[start..end]
        .split(|&b| b == b' ')
        .filter(|c| !c.is_empty() && keep(c))
        .collect();
    out.extend_from_slice(&kept.join(&b' '));
    out.extend_from_slice(&line[end..]);
    out
}

/// The capabilities `line` lists, when it lists any.
pub fn capabilities(line: &[u8]) -> Vec<Vec<u8>> {
    capability_span(line).map_or_else(Vec::new, |(start, end)| {
        line[start..end]
            .split(|&b| b == b' ')
            .filter(|c| !c.is_empty())
            .map(<[u8]>::to_ascii_uppercase)
            .collect()
    })
}

/// Where the list of capabilities in `line` starts and ends.
fn capability_span(line: &[u8]) -> Option<(usize, usize)> {
    let upper = line.to_ascii_uppercase();
    let text_end = upper
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(upper.len());
    let mut words = upper[..text_end].splitn(3, |&b| b == b' ');
    let (first, second) = (words.next()?, words.next()?);
    let rest_at = first.len() + second.len() + 2;
    if first == b"*" && second == b"CAPABILITY" {
        return Some((rest_at.min(text_end), text_end));
    }
    // Only after a status: `* OK [CAPABILITY …]`, `tag OK [CAPABILITY …]`.
    status(second)?;
    let code = b"[CAPABILITY ";
    if upper[..text_end].get(rest_at..rest_at + code.len()) != Some(&code[..]) {
        return None;
    }
    let start = rest_at + code.len();
    let end = start
        + upper
            .get(start..text_end)?
            .iter()
            .position(|&b| b == b']')?;
    Some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8]) -> Result<Vec<Response>, ResponseError> {
        let mut reader = Reader::default();
        reader.push(input);
        std::iter::from_fn(|| reader.next_response().transpose()).collect()
    }

    #[test]
    fn frames_and_classifies() {
        let seen = all(b"* OK [CAPABILITY IMAP4rev1] ready\r\n+ \r\n* 1 FETCH (BODY[] {5}\r\nab\r\nc)\r\nP1 NO [AUTHENTICATIONFAILED] no\r\n").unwrap();
        let kinds: Vec<_> = seen.iter().map(|r| r.kind.clone()).collect();
        assert_eq!(
            kinds,
            vec![
                ResponseKind::Untagged(Some(Status::Ok)),
                ResponseKind::Continue,
                ResponseKind::Untagged(None),
                ResponseKind::Tagged {
                    tag: b"P1".to_vec(),
                    status: Status::No
                },
            ]
        );
        assert_eq!(seen[2].raw, b"* 1 FETCH (BODY[] {5}\r\nab\r\nc)\r\n");
        assert_eq!(
            all(b"* PREAUTH hi\r\n").unwrap()[0].kind,
            ResponseKind::Untagged(Some(Status::Preauth))
        );
        assert_eq!(all(b"garbage\r\n"), Err(ResponseError::Malformed));
        assert_eq!(all(b"P1 PREAUTH x\r\n"), Err(ResponseError::Malformed));
    }

    #[test]
    fn bounds_what_it_keeps() {
        assert_eq!(
            all(&vec![b'*'; MAX_RESPONSE + 1]),
            Err(ResponseError::TooLarge)
        );
        assert_eq!(all(b"* X {99999999}\r\n"), Err(ResponseError::TooLarge));
    }

    #[test]
    fn rewrites_capability_lists() {
        let drop_unauth = |c: &[u8]| !c.eq_ignore_ascii_case(b"UNAUTHENTICATE");
        assert_eq!(
            rewrite_capabilities(
                b"* CAPABILITY IMAP4rev1 UNAUTHENTICATE IDLE\r\n",
                drop_unauth
            ),
            b"* CAPABILITY IMAP4rev1 IDLE\r\n"
        );
        assert_eq!(
            rewrite_capabilities(
                b"P1 OK [CAPABILITY IMAP4rev1 unauthenticate] Logged in\r\n",
                drop_unauth
            ),
            b"P1 OK [CAPABILITY IMAP4rev1] Logged in\r\n"
        );
        assert_eq!(
            rewrite_capabilities(b"* OK [ALERT] UNAUTHENTICATE\r\n", drop_unauth),
            b"* OK [ALERT] UNAUTHENTICATE\r\n"
        );
        // A line end inside the status gives no list (and no panic).
        assert!(capabilities(b"* OK\r[CAPABILITY X]\r\n").is_empty());
        assert_eq!(
            capabilities(b"* OK [CAPABILITY IMAP4rev1 sasl-ir] hi\r\n"),
            vec![b"IMAP4REV1".to_vec(), b"SASL-IR".to_vec()]
        );
    }
}
