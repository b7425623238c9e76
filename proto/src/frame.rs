//! Frames that open a tunnel stream: `Open` from the agent, `Opened` or `Refused` from the broker.
//!
//! Every frame is `type (1 byte) ‖ length (2 bytes, big endian) ‖ body (length bytes)`. The
//! type and the length are checked against that type's limit, at most [`MAX_BODY_LEN`], before a
//! body is read.

use std::fmt;

use crate::service::{MAX_SERVICE_NAME_LEN, ServiceName, ServiceNameError};

/// Bytes before a frame's body: its type and its length.
pub const HEADER_LEN: usize = 3;

/// Largest body of a tunnel frame, in bytes; each type has its own, smaller limit
/// ([`Frame::body_limit`]). Enrollment frames have their own limits (`MAX_ENROLL_BODY_LEN`).
pub const MAX_BODY_LEN: usize = 1024;

/// Longest reason in a `Refused` frame, in bytes of UTF-8.
pub const MAX_REASON_LEN: usize = 512;

// Every type's limit stays within the largest body.
const _: () = assert!(MAX_SERVICE_NAME_LEN <= MAX_BODY_LEN && 2 + MAX_REASON_LEN <= MAX_BODY_LEN);

const TYPE_OPEN: u8 = 0x01;
const TYPE_OPENED: u8 = 0x02;
const TYPE_REFUSED: u8 = 0x03;
const TYPE_MOVE: u8 = 0x04;

/// A frame that can be written to and read from a stream.
pub trait Frame: Sized {
    /// Decodes one frame from the start of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds only part of a frame, and the frame with the number
    /// of bytes it took otherwise. Bytes after the frame are left alone: on a tunnel stream they
    /// are the forwarded connection's data.
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError>;

    /// Encodes the frame, header included.
    fn encode(&self) -> Vec<u8>;

    /// The longest body a frame of type `kind` may have in this direction.
    fn body_limit(kind: u8) -> Result<usize, DecodeError>;

    /// Total length (header and body) of the frame whose header is `header`.
    ///
    /// Fails when the type is not expected in this direction or the announced body exceeds that
    /// type's limit, so that a reader can allocate exactly what this returns.
    fn frame_len(header: &[u8; HEADER_LEN]) -> Result<usize, DecodeError> {
        let limit = Self::body_limit(header[0])?;
        let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
        if len > limit {
            return Err(DecodeError::TooLong { len, limit });
        }
        Ok(HEADER_LEN + len)
    }
}

/// The first frame on every tunnel stream, written by the agent: which service to reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The service, as named in the broker's configuration.
    pub service: ServiceName,
}

/// The broker's answer to [`Open`]. After `Opened` the stream carries the connection's bytes;
/// after `Refused` the broker finishes the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The service is connected; bytes flow from here on.
    Opened,
    /// The broker will not connect this stream.
    Refused(Refusal),
}

/// A frame on the broker's control stream: the one unidirectional stream the broker may open
/// towards the agent, to tell it something about the whole connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The broker is draining (an upgrade, a restart): streams open on this connection go on
    /// for up to `grace`; new streams belong on a fresh connection, to this broker once it is
    /// back or to another one.
    Move {
        /// How long open streams may still run here, at most; whole seconds on the wire.
        grace: std::time::Duration,
    },
}

/// Why a stream was refused: a code for programs and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    code: RefuseCode,
    reason: String,
}

/// Machine-readable reason for a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefuseCode {
    /// Policy does not allow this identity to reach this service.
    NotPermitted,
    /// The broker has no service by that name.
    UnknownService,
    /// The broker could not connect to the service.
    UpstreamUnavailable,
    /// The service did not accept the connection in time.
    UpstreamTimeout,
    /// The client certificate of this connection is no longer valid.
    CertificateExpired,
    /// The broker is shutting down and takes no new streams.
    ShuttingDown,
    /// A limit was reached; trying again later may work.
    Busy,
    /// The broker could not record or carry out the decision.
    Internal,
    /// A code this version does not know, sent by a newer broker. Never holds a known code.
    Unrecognized(u16),
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The header announces a body larger than the frame type allows.
    #[error("frame body of {len} bytes exceeds the limit of {limit}")]
    TooLong {
        /// Announced body length.
        len: usize,
        /// Limit for this frame type.
        limit: usize,
    },
    /// The frame type is not one expected at this point.
    #[error("unexpected frame type {0:#04x}")]
    UnexpectedType(u8),
    /// An `Open` frame names an invalid service.
    #[error("invalid service name: {0}")]
    ServiceName(#[from] ServiceNameError),
    /// A body does not have the layout of its frame type.
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    /// A refusal reason is not UTF-8 or holds control characters.
    #[error("refusal reason is not printable UTF-8")]
    BadReason,
}

/// A whole frame at the start of a buffer, not yet interpreted.
pub(crate) struct RawFrame<'a> {
    pub(crate) kind: u8,
    pub(crate) body: &'a [u8],
    pub(crate) total: usize,
}

/// Splits a whole frame of `F` off the start of `buf`, or `None` when more bytes are needed.
pub(crate) fn split<F: Frame>(buf: &[u8]) -> Result<Option<RawFrame<'_>>, DecodeError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let total = F::frame_len(header)?;
    Ok(buf.get(HEADER_LEN..total).map(|body| RawFrame {
        kind: header[0],
        body,
        total,
    }))
}

pub(crate) fn encode_frame(kind: u8, body: &[&[u8]]) -> Vec<u8> {
    let len: usize = body.iter().map(|part| part.len()).sum();
    // Constructors keep every body within its type's limit, which fits in a u16.
    let len16 = u16::try_from(len).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(HEADER_LEN + len);
    out.push(kind);
    out.extend_from_slice(&len16.to_be_bytes());
    for part in body {
        out.extend_from_slice(part);
    }
    out
}

impl Frame for Open {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        let Some(RawFrame { kind, body, total }) = split::<Self>(buf)? else {
            return Ok(None);
        };
        if kind != TYPE_OPEN {
            return Err(DecodeError::UnexpectedType(kind));
        }
        let service = ServiceName::from_wire(body)?;
        Ok(Some((Open { service }, total)))
    }

    fn encode(&self) -> Vec<u8> {
        encode_frame(TYPE_OPEN, &[self.service.as_str().as_bytes()])
    }

    fn body_limit(kind: u8) -> Result<usize, DecodeError> {
        match kind {
            TYPE_OPEN => Ok(MAX_SERVICE_NAME_LEN),
            other => Err(DecodeError::UnexpectedType(other)),
        }
    }
}

impl Frame for Answer {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        let Some(RawFrame { kind, body, total }) = split::<Self>(buf)? else {
            return Ok(None);
        };
        let answer = match kind {
            // `body_limit` admits no body for `Opened`.
            TYPE_OPENED => Answer::Opened,
            TYPE_REFUSED => Answer::Refused(Refusal::decode_body(body)?),
            other => return Err(DecodeError::UnexpectedType(other)),
        };
        Ok(Some((answer, total)))
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Answer::Opened => encode_frame(TYPE_OPENED, &[]),
            Answer::Refused(refusal) => encode_frame(
                TYPE_REFUSED,
                &[
                    &refusal.code.to_u16().to_be_bytes(),
                    refusal.reason.as_bytes(),
                ],
            ),
        }
    }

    fn body_limit(kind: u8) -> Result<usize, DecodeError> {
        match kind {
            TYPE_OPENED => Ok(0),
            TYPE_REFUSED => Ok(2 + MAX_REASON_LEN),
            other => Err(DecodeError::UnexpectedType(other)),
        }
    }
}

impl Frame for Notice {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        let Some(RawFrame { kind, body, total }) = split::<Self>(buf)? else {
            return Ok(None);
        };
        let notice = match kind {
            TYPE_MOVE => {
                let seconds = body
                    .first_chunk::<4>()
                    .filter(|_| body.len() == 4)
                    .ok_or(DecodeError::Malformed("Move"))?;
                Notice::Move {
                    grace: std::time::Duration::from_secs(u64::from(u32::from_be_bytes(*seconds))),
                }
            }
            other => return Err(DecodeError::UnexpectedType(other)),
        };
        Ok(Some((notice, total)))
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Notice::Move { grace } => {
                let seconds = u32::try_from(grace.as_secs()).unwrap_or(u32::MAX);
                encode_frame(TYPE_MOVE, &[&seconds.to_be_bytes()])
            }
        }
    }

    fn body_limit(kind: u8) -> Result<usize, DecodeError> {
        match kind {
            TYPE_MOVE => Ok(4),
            other => Err(DecodeError::UnexpectedType(other)),
        }
    }
}

impl Refusal {
    /// A refusal with a reason for people.
    ///
    /// The reason is cut to [`MAX_REASON_LEN`] bytes at a character boundary and control
    /// characters are replaced, so that any string makes a valid frame.
    pub fn new(code: RefuseCode, reason: &str) -> Self {
        Self {
            code,
            reason: printable(reason, MAX_REASON_LEN),
        }
    }

    /// The machine-readable code.
    pub fn code(&self) -> RefuseCode {
        self.code
    }

    /// The sentence for people; printable UTF-8 of at most [`MAX_REASON_LEN`] bytes.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Decodes a body that `Answer::body_limit` already bounded.
    fn decode_body(body: &[u8]) -> Result<Self, DecodeError> {
        let (code, reason) = body
            .split_first_chunk::<2>()
            .ok_or(DecodeError::Malformed("Refused"))?;
        let reason = std::str::from_utf8(reason).map_err(|_| DecodeError::BadReason)?;
        if reason.chars().any(char::is_control) {
            return Err(DecodeError::BadReason);
        }
        Ok(Self {
            code: RefuseCode::from_u16(u16::from_be_bytes(*code)),
            reason: reason.to_owned(),
        })
    }
}

/// `text` with control characters replaced, cut to `limit` bytes at a character boundary.
pub(crate) fn printable(text: &str, limit: usize) -> String {
    let mut clean = String::with_capacity(text.len().min(limit));
    for c in text.chars() {
        let c = if c.is_control() {
            char::REPLACEMENT_CHARACTER
        } else {
            c
        };
        if clean.len() + c.len_utf8() > limit {
            break;
        }
        clean.push(c);
    }
    clean
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason, self.code)
    }
}

impl RefuseCode {
    /// The code for a value read from the wire.
    pub fn from_u16(value: u16) -> Self {
        match value {
            1 => Self::NotPermitted,
            2 => Self::UnknownService,
            3 => Self::UpstreamUnavailable,
            4 => Self::UpstreamTimeout,
            5 => Self::CertificateExpired,
            6 => Self::ShuttingDown,
            7 => Self::Busy,
            8 => Self::Internal,
            other => Self::Unrecognized(other),
        }
    }

    /// The value written on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            Self::NotPermitted => 1,
            Self::UnknownService => 2,
            Self::UpstreamUnavailable => 3,
            Self::UpstreamTimeout => 4,
            Self::CertificateExpired => 5,
            Self::ShuttingDown => 6,
            Self::Busy => 7,
            Self::Internal => 8,
            Self::Unrecognized(other) => other,
        }
    }

    /// A stable lowercase name, used in logs and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotPermitted => "not_permitted",
            Self::UnknownService => "unknown_service",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::CertificateExpired => "certificate_expired",
            Self::ShuttingDown => "shutting_down",
            Self::Busy => "busy",
            Self::Internal => "internal",
            Self::Unrecognized(_) => "unrecognized",
        }
    }
}

impl fmt::Display for RefuseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unrecognized(code) => write!(f, "code {code}"),
            known => f.write_str(known.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn open(name: &str) -> Open {
        Open {
            service: ServiceName::new(name).unwrap(),
        }
    }

    #[test]
    fn open_has_the_documented_layout() {
        assert_eq!(open("imap").encode(), b"\x01\x00\x04imap");
        assert_eq!(Answer::Opened.encode(), b"\x02\x00\x00");
        let refused = Answer::Refused(Refusal::new(RefuseCode::UnknownService, "no"));
        assert_eq!(refused.encode(), b"\x03\x00\x04\x00\x02no");
        let moved = Notice::Move {
            grace: std::time::Duration::from_secs(30),
        };
        assert_eq!(moved.encode(), b"\x04\x00\x04\x00\x00\x00\x1e");
    }

    #[test]
    fn notices_round_trip_and_refuse_other_layouts() {
        for seconds in [0, 1, 30, u64::from(u32::MAX)] {
            let notice = Notice::Move {
                grace: std::time::Duration::from_secs(seconds),
            };
            let bytes = notice.encode();
            assert_eq!(Notice::decode(&bytes), Ok(Some((notice, bytes.len()))));
        }
        // Longer than a u32 of seconds: the most the wire can say.
        let long = Notice::Move {
            grace: std::time::Duration::from_secs(u64::MAX),
        };
        assert_eq!(long.encode(), b"\x04\x00\x04\xff\xff\xff\xff");
        assert_eq!(
            Notice::decode(b"\x04\x00\x03\x00\x00\x1e"),
            Err(DecodeError::Malformed("Move"))
        );
        assert!(matches!(
            Notice::decode(b"\x04\x00\x05\x00\x00\x00\x1e\x00"),
            Err(DecodeError::TooLong { len: 5, limit: 4 })
        ));
        assert_eq!(
            Notice::decode(b"\x02\x00\x00"),
            Err(DecodeError::UnexpectedType(0x02))
        );
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let bytes = open("imap").encode();
        for end in 0..bytes.len() {
            assert_eq!(
                Open::decode(&bytes[..end]),
                Ok(None),
                "prefix of {end} bytes"
            );
        }
    }

    #[test]
    fn bytes_after_a_frame_are_left_alone() {
        let mut bytes = Answer::Opened.encode();
        bytes.extend_from_slice(b"* OK IMAP ready");
        assert_eq!(
            Answer::decode(&bytes),
            Ok(Some((Answer::Opened, HEADER_LEN)))
        );
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        assert_eq!(
            Open::decode(b"\x01\xff\xff"),
            Err(DecodeError::TooLong {
                len: 0xffff,
                limit: 63
            })
        );
        assert_eq!(Open::frame_len(&[1, 0, 63]), Ok(HEADER_LEN + 63));
        assert_eq!(
            Open::frame_len(&[1, 0, 64]),
            Err(DecodeError::TooLong { len: 64, limit: 63 })
        );
        assert_eq!(
            Open::frame_len(&[2, 0, 0]),
            Err(DecodeError::UnexpectedType(2)),
            "the type is checked first"
        );
        assert_eq!(Answer::frame_len(&[3, 0x02, 0x02]), Ok(HEADER_LEN + 514));
        assert!(Answer::frame_len(&[3, 0x02, 0x03]).is_err());
        assert_eq!(
            Answer::frame_len(&[2, 0, 1]),
            Err(DecodeError::TooLong { len: 1, limit: 0 })
        );
    }

    #[test]
    fn frames_are_checked_per_direction() {
        assert_eq!(
            Open::decode(&Answer::Opened.encode()),
            Err(DecodeError::UnexpectedType(2))
        );
        assert_eq!(
            Answer::decode(&open("imap").encode()),
            Err(DecodeError::UnexpectedType(1))
        );
        assert_eq!(
            Answer::decode(b"\x02\x00\x01x"),
            Err(DecodeError::TooLong { len: 1, limit: 0 })
        );
        assert_eq!(
            Answer::decode(b"\x03\x00\x01x"),
            Err(DecodeError::Malformed("Refused"))
        );
        assert_eq!(
            Open::decode(b"\x01\x00\x00"),
            Err(DecodeError::ServiceName(ServiceNameError::Empty))
        );
    }

    #[test]
    fn reasons_are_printable_and_bounded() {
        assert_eq!(
            Answer::decode(b"\x03\x00\x03\x00\x01\x1b"),
            Err(DecodeError::BadReason)
        );
        assert_eq!(
            Answer::decode(b"\x03\x00\x03\x00\x01\xff"),
            Err(DecodeError::BadReason)
        );
        let long = Refusal::new(RefuseCode::Internal, &"é".repeat(400));
        assert!(long.reason().len() <= MAX_REASON_LEN);
        assert_eq!(
            Refusal::new(RefuseCode::Internal, "a\nb\x1b[2J").reason(),
            "a\u{fffd}b\u{fffd}[2J"
        );
        let too_long = [&[3u8, 0x02, 0x03, 0, 1][..], &[b'x'; 513]].concat();
        assert!(matches!(
            Answer::decode(&too_long),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn unknown_codes_survive_a_round_trip() {
        for value in [0, 9, 1000, u16::MAX] {
            assert_eq!(RefuseCode::from_u16(value), RefuseCode::Unrecognized(value));
            assert_eq!(RefuseCode::from_u16(value).to_u16(), value);
        }
        for value in 1..=8 {
            assert_eq!(RefuseCode::from_u16(value).to_u16(), value);
        }
    }

    fn service_name() -> impl Strategy<Value = ServiceName> {
        "[a-z][a-z0-9_-]{0,62}".prop_map(|s| ServiceName::new(&s).unwrap())
    }

    fn answer() -> impl Strategy<Value = Answer> {
        prop_oneof![
            Just(Answer::Opened),
            (any::<u16>(), any::<String>()).prop_map(|(code, reason)| {
                Answer::Refused(Refusal::new(RefuseCode::from_u16(code), &reason))
            }),
        ]
    }

    proptest! {
        #[test]
        fn open_round_trips(service in service_name(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let frame = Open { service };
            let mut bytes = frame.encode();
            let len = bytes.len();
            bytes.extend_from_slice(&tail);
            prop_assert_eq!(Open::decode(&bytes), Ok(Some((frame, len))));
        }

        #[test]
        fn answer_round_trips(answer in answer()) {
            let bytes = answer.encode();
            prop_assert_eq!(Answer::decode(&bytes), Ok(Some((answer, bytes.len()))));
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_decode_canonically(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(Some((open, used))) = Open::decode(&bytes) {
                prop_assert_eq!(&open.encode()[..], &bytes[..used]);
            }
            if let Ok(Some((answer, used))) = Answer::decode(&bytes) {
                prop_assert_eq!(&answer.encode()[..], &bytes[..used]);
            }
        }
    }
}
