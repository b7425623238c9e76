//! Frames of the enrollment protocol (`postern-enroll/1`): learning about a broker, logging in,
//! renewing a certificate and logging out.
//!
//! Each operation is one bidirectional stream on a connection without a client certificate. The
//! agent writes one [`Request`]; the broker answers with [`Reply`] frames and finishes the
//! stream after the last one. Bodies are sequences of fields: byte strings and text with a
//! 2-byte length, lists with a 1-byte count, integers big endian. Every length is checked against
//! the frame's remaining body, which the header already bounded.

use std::fmt;

use crate::frame::{DecodeError, Frame, encode_frame, split};
use crate::service::{ServiceKind, ServiceName};

/// Largest body of an enrollment frame, in bytes.
pub const MAX_ENROLL_BODY_LEN: usize = 16 * 1024;

/// Largest certificate signing request, in bytes of DER.
pub const MAX_CSR_LEN: usize = 4096;

/// Largest sealed refresh token, in bytes.
pub const MAX_SEALED_LEN: usize = 12 * 1024;

/// Largest proof of possession of the previous key (a signature), in bytes.
pub const MAX_PROOF_LEN: usize = 256;

/// Longest text field (names, URLs, codes), in bytes of UTF-8.
pub const MAX_TEXT_LEN: usize = 1024;

/// Most services a broker announces.
pub const MAX_SERVICES: usize = 64;

/// Most certificates in an issued chain.
pub const MAX_CHAIN_LEN: usize = 4;

/// Longest failure reason, in bytes of UTF-8.
pub const MAX_FAILURE_REASON_LEN: usize = 512;

/// The label of the TLS exporter the proof of possession signs (RFC 5705, RFC 8446 §7.5).
///
/// Binding the signature to the connection's keying material means a proof seen once cannot
/// be replayed on another connection.
pub const PROOF_EXPORTER_LABEL: &[u8] = b"EXPORTER-postern-proof-of-possession";

/// Bytes of keying material exported for the proof.
pub const PROOF_EXPORTER_LEN: usize = 32;

const TYPE_HELLO: u8 = 0x10;
const TYPE_LOGIN: u8 = 0x11;
const TYPE_RENEW: u8 = 0x12;
const TYPE_LOGOUT: u8 = 0x13;

const TYPE_WELCOME: u8 = 0x20;
const TYPE_DEVICE: u8 = 0x21;
const TYPE_PENDING: u8 = 0x22;
const TYPE_ISSUED: u8 = 0x23;
const TYPE_FAILED: u8 = 0x24;
const TYPE_LOGGED_OUT: u8 = 0x25;

/// What the agent asks on an enrollment stream.
#[derive(Clone, PartialEq, Eq)]
pub enum Request {
    /// Who is this broker, which identity provider does it use, which services does it offer?
    Hello,
    /// Log a person in and certify the key of this signing request (DER).
    Login {
        /// A PKCS#10 request for a key made on the device.
        csr: Vec<u8>,
    },
    /// Certify a new key for the same login, without the person.
    Renew {
        /// A PKCS#10 request for the new key.
        csr: Vec<u8>,
        /// The sealed refresh token from the last [`Issued`].
        sealed: Vec<u8>,
        /// A signature with the previous key over the proof message (see `docs/wire-protocol.md`).
        proof: Vec<u8>,
    },
    /// End the login: the broker revokes the refresh token at the identity provider.
    Logout {
        /// The sealed refresh token from the last [`Issued`].
        sealed: Vec<u8>,
        /// A signature with the current key over the proof message.
        proof: Vec<u8>,
    },
}

/// What the broker answers on an enrollment stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The answer to [`Request::Hello`].
    Welcome(Welcome),
    /// The person must approve this code at the identity provider.
    Device(DeviceCode),
    /// Still waiting for the person; sent after each poll of the identity provider.
    Pending,
    /// A certificate, and what renews it.
    Issued(Issued),
    /// The operation failed; the stream ends.
    Failed(Failure),
    /// The login ended.
    LoggedOut(Revocation),
}

/// What became of the refresh token at logout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// The identity provider revoked it.
    Revoked,
    /// The identity provider offers no revocation (RFC 7009).
    Unsupported,
    /// Revocation was attempted and failed.
    Failed,
}

/// What a broker says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The broker's name, as in its certificate.
    pub broker: String,
    /// The identity provider people log in at (its issuer URL), empty when login is not set up.
    pub idp: String,
    /// Services, the local port each is served on by default, and how.
    pub services: Vec<(ServiceName, u16, ServiceKind)>,
}

/// A device authorization the person completes in a browser (RFC 8628, section 3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCode {
    /// Where to go.
    pub verification_uri: String,
    /// The same page with the code filled in, when the identity provider offers it.
    pub verification_uri_complete: Option<String>,
    /// The code to type, and to compare with what the page shows.
    pub user_code: String,
    /// Seconds until the code expires.
    pub expires_in: u32,
}

/// A certificate issued by a login or a renewal.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate chain, leaf first, DER.
    pub chain: Vec<Vec<u8>>,
    /// The sealed refresh token to renew with; absent when the login cannot be renewed.
    pub sealed: Option<Vec<u8>>,
    /// When the login ends (`auth_time` plus the maximum session age), in seconds since the Unix
    /// epoch: no renewal reaches past it.
    pub session_ends: u64,
}

/// Why an enrollment operation failed: a code for programs and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    code: FailCode,
    reason: String,
}

/// Machine-readable reason of a [`Failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailCode {
    /// Policy refused the login or renewal (for example: no second factor).
    NotPermitted,
    /// The person refused the request at the identity provider.
    AccessDenied,
    /// The code was not approved in time.
    Expired,
    /// The identity provider could not be reached.
    IdpUnavailable,
    /// The identity provider refused the broker's request or answered with something invalid.
    IdpError,
    /// The login cannot be renewed any more: the person must log in again.
    LoginRequired,
    /// The request is malformed (for example: a signing request for an unsupported key).
    BadRequest,
    /// Too many logins in progress; trying again later may work.
    Busy,
    /// The broker is shutting down.
    ShuttingDown,
    /// The broker could not carry out or record the operation.
    Internal,
    /// This broker has no identity provider configured.
    NotConfigured,
    /// The agent gave up (Ctrl-C) before the login finished. Recorded in the audit trail; the
    /// agent is gone when it would be sent.
    Cancelled,
    /// A code this version does not know. Never holds a known code.
    Unrecognized(u16),
}

impl Frame for Request {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        let Some(raw) = split::<Self>(buf)? else {
            return Ok(None);
        };
        let mut body = Fields::new(raw.body, "request");
        let request = match raw.kind {
            TYPE_HELLO => Request::Hello,
            TYPE_LOGIN => Request::Login {
                csr: body.bytes(MAX_CSR_LEN)?,
            },
            TYPE_RENEW => Request::Renew {
                csr: body.bytes(MAX_CSR_LEN)?,
                sealed: body.bytes(MAX_SEALED_LEN)?,
                proof: body.bytes(MAX_PROOF_LEN)?,
            },
            TYPE_LOGOUT => Request::Logout {
                sealed: body.bytes(MAX_SEALED_LEN)?,
                proof: body.bytes(MAX_PROOF_LEN)?,
            },
            other => return Err(DecodeError::UnexpectedType(other)),
        };
        body.end()?;
        Ok(Some((request, raw.total)))
    }

    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let kind = match self {
            Request::Hello => TYPE_HELLO,
            Request::Login { csr } => {
                put_bytes(&mut body, csr, MAX_CSR_LEN);
                TYPE_LOGIN
            }
            Request::Renew { csr, sealed, proof } => {
                put_bytes(&mut body, csr, MAX_CSR_LEN);
                put_bytes(&mut body, sealed, MAX_SEALED_LEN);
                put_bytes(&mut body, proof, MAX_PROOF_LEN);
                TYPE_RENEW
            }
            Request::Logout { sealed, proof } => {
                put_bytes(&mut body, sealed, MAX_SEALED_LEN);
                put_bytes(&mut body, proof, MAX_PROOF_LEN);
                TYPE_LOGOUT
            }
        };
        encode_frame(kind, &[&body])
    }

    fn body_limit(kind: u8) -> Result<usize, DecodeError> {
        match kind {
            TYPE_HELLO => Ok(0),
            TYPE_LOGIN => Ok(2 + MAX_CSR_LEN),
            TYPE_RENEW => Ok(6 + MAX_CSR_LEN + MAX_SEALED_LEN + MAX_PROOF_LEN),
            TYPE_LOGOUT => Ok(4 + MAX_SEALED_LEN + MAX_PROOF_LEN),
            other => Err(DecodeError::UnexpectedType(other)),
        }
    }
}

impl fmt::Debug for Request {
    /// Sealed tokens and proofs are credentials: only their lengths are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Hello => f.write_str("Hello"),
            Request::Login { csr } => f
                .debug_struct("Login")
                .field("csr_len", &csr.len())
                .finish(),
            Request::Renew { csr, sealed, proof } => f
                .debug_struct("Renew")
                .field("csr_len", &csr.len())
                .field("sealed_len", &sealed.len())
                .field("proof_len", &proof.len())
                .finish(),
            Request::Logout { sealed, proof } => f
                .debug_struct("Logout")
                .field("sealed_len", &sealed.len())
                .field("proof_len", &proof.len())
                .finish(),
        }
    }
}

impl Frame for Reply {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        let Some(raw) = split::<Self>(buf)? else {
            return Ok(None);
        };
        let mut body = Fields::new(raw.body, "reply");
        let reply = match raw.kind {
            TYPE_WELCOME => {
                let broker = body.text(MAX_TEXT_LEN)?;
                let idp = body.text(MAX_TEXT_LEN)?;
                let count = usize::from(body.u8()?);
                if count > MAX_SERVICES {
                    return Err(DecodeError::Malformed("Welcome"));
                }
                let mut services = Vec::with_capacity(count);
                for _ in 0..count {
                    let name = ServiceName::from_wire(&body.bytes(crate::MAX_SERVICE_NAME_LEN)?)?;
                    let port = body.u16()?;
                    let kind = ServiceKind::from_wire(body.u8()?)
                        .ok_or(DecodeError::Malformed("Welcome"))?;
                    services.push((name, port, kind));
                }
                Reply::Welcome(Welcome {
                    broker,
                    idp,
                    services,
                })
            }
            TYPE_DEVICE => {
                let verification_uri = body.text(MAX_TEXT_LEN)?;
                let complete = body.text(MAX_TEXT_LEN)?;
                let user_code = body.text(MAX_TEXT_LEN)?;
                let expires_in = body.u32()?;
                Reply::Device(DeviceCode {
                    verification_uri,
                    verification_uri_complete: (!complete.is_empty()).then_some(complete),
                    user_code,
                    expires_in,
                })
            }
            TYPE_PENDING => Reply::Pending,
            TYPE_ISSUED => {
                let count = usize::from(body.u8()?);
                if count == 0 || count > MAX_CHAIN_LEN {
                    return Err(DecodeError::Malformed("Issued"));
                }
                let mut chain = Vec::with_capacity(count);
                for _ in 0..count {
                    chain.push(body.bytes(MAX_ENROLL_BODY_LEN)?);
                }
                let sealed = body.bytes(MAX_SEALED_LEN)?;
                let session_ends = body.u64()?;
                Reply::Issued(Issued {
                    chain,
                    sealed: (!sealed.is_empty()).then_some(sealed),
                    session_ends,
                })
            }
            TYPE_FAILED => {
                let code = FailCode::from_u16(body.u16()?);
                let reason = body.text(MAX_FAILURE_REASON_LEN)?;
                Reply::Failed(Failure { code, reason })
            }
            TYPE_LOGGED_OUT => Reply::LoggedOut(match body.u8()? {
                0 => Revocation::Unsupported,
                1 => Revocation::Revoked,
                2 => Revocation::Failed,
                _ => return Err(DecodeError::Malformed("LoggedOut")),
            }),
            other => return Err(DecodeError::UnexpectedType(other)),
        };
        body.end()?;
        Ok(Some((reply, raw.total)))
    }

    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let kind = match self {
            Reply::Welcome(welcome) => {
                put_text(&mut body, &welcome.broker, MAX_TEXT_LEN);
                put_text(&mut body, &welcome.idp, MAX_TEXT_LEN);
                let services = &welcome.services[..welcome.services.len().min(MAX_SERVICES)];
                body.push(u8::try_from(services.len()).unwrap_or(u8::MAX));
                for (name, port, kind) in services {
                    put_bytes(&mut body, name.as_str().as_bytes(), usize::MAX);
                    body.extend_from_slice(&port.to_be_bytes());
                    body.push(kind.to_wire());
                }
                TYPE_WELCOME
            }
            Reply::Device(device) => {
                put_text(&mut body, &device.verification_uri, MAX_TEXT_LEN);
                put_text(
                    &mut body,
                    device.verification_uri_complete.as_deref().unwrap_or(""),
                    MAX_TEXT_LEN,
                );
                put_text(&mut body, &device.user_code, MAX_TEXT_LEN);
                body.extend_from_slice(&device.expires_in.to_be_bytes());
                TYPE_DEVICE
            }
            Reply::Pending => TYPE_PENDING,
            Reply::Issued(issued) => {
                debug_assert!(
                    (1..=MAX_CHAIN_LEN).contains(&issued.chain.len()),
                    "an issued chain has 1 to {MAX_CHAIN_LEN} certificates"
                );
                let chain = &issued.chain[..issued.chain.len().min(MAX_CHAIN_LEN)];
                body.push(u8::try_from(chain.len()).unwrap_or(u8::MAX));
                for certificate in chain {
                    put_bytes(&mut body, certificate, MAX_ENROLL_BODY_LEN);
                }
                put_bytes(
                    &mut body,
                    issued.sealed.as_deref().unwrap_or(&[]),
                    MAX_SEALED_LEN,
                );
                body.extend_from_slice(&issued.session_ends.to_be_bytes());
                TYPE_ISSUED
            }
            Reply::Failed(failure) => {
                body.extend_from_slice(&failure.code.to_u16().to_be_bytes());
                put_text(&mut body, &failure.reason, MAX_FAILURE_REASON_LEN);
                TYPE_FAILED
            }
            Reply::LoggedOut(revocation) => {
                body.push(match revocation {
                    Revocation::Unsupported => 0,
                    Revocation::Revoked => 1,
                    Revocation::Failed => 2,
                });
                TYPE_LOGGED_OUT
            }
        };
        encode_frame(kind, &[&body])
    }

    fn body_limit(kind: u8) -> Result<usize, DecodeError> {
        match kind {
            TYPE_WELCOME | TYPE_DEVICE | TYPE_ISSUED => Ok(MAX_ENROLL_BODY_LEN),
            TYPE_PENDING => Ok(0),
            TYPE_FAILED => Ok(4 + MAX_FAILURE_REASON_LEN),
            TYPE_LOGGED_OUT => Ok(1),
            other => Err(DecodeError::UnexpectedType(other)),
        }
    }
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("chain_len", &self.chain.len())
            .field("sealed", &self.sealed.as_ref().map(|_| "<redacted>"))
            .field("session_ends", &self.session_ends)
            .finish()
    }
}

impl Failure {
    /// A failure with a reason for people, made printable and cut to
    /// [`MAX_FAILURE_REASON_LEN`] bytes.
    pub fn new(code: FailCode, reason: &str) -> Self {
        Self {
            code,
            reason: crate::frame::printable(reason, MAX_FAILURE_REASON_LEN),
        }
    }

    /// The machine-readable code.
    pub fn code(&self) -> FailCode {
        self.code
    }

    /// The sentence for people.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason, self.code)
    }
}

impl FailCode {
    /// The code for a value read from the wire.
    pub fn from_u16(value: u16) -> Self {
        match value {
            1 => Self::NotPermitted,
            2 => Self::AccessDenied,
            3 => Self::Expired,
            4 => Self::IdpUnavailable,
            5 => Self::IdpError,
            6 => Self::LoginRequired,
            7 => Self::BadRequest,
            8 => Self::Busy,
            9 => Self::ShuttingDown,
            10 => Self::Internal,
            11 => Self::NotConfigured,
            12 => Self::Cancelled,
            other => Self::Unrecognized(other),
        }
    }

    /// The value written on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            Self::NotPermitted => 1,
            Self::AccessDenied => 2,
            Self::Expired => 3,
            Self::IdpUnavailable => 4,
            Self::IdpError => 5,
            Self::LoginRequired => 6,
            Self::BadRequest => 7,
            Self::Busy => 8,
            Self::ShuttingDown => 9,
            Self::Internal => 10,
            Self::NotConfigured => 11,
            Self::Cancelled => 12,
            Self::Unrecognized(other) => other,
        }
    }

    /// A stable lowercase name, used in logs and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotPermitted => "not_permitted",
            Self::AccessDenied => "access_denied",
            Self::Expired => "expired",
            Self::IdpUnavailable => "idp_unavailable",
            Self::IdpError => "idp_error",
            Self::LoginRequired => "login_required",
            Self::BadRequest => "bad_request",
            Self::Busy => "busy",
            Self::ShuttingDown => "shutting_down",
            Self::Internal => "internal",
            Self::NotConfigured => "not_configured",
            Self::Cancelled => "cancelled",
            Self::Unrecognized(_) => "unrecognized",
        }
    }
}

impl fmt::Display for FailCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unrecognized(code) => write!(f, "code {code}"),
            known => f.write_str(known.as_str()),
        }
    }
}

/// What a proof of possession is for: it is part of the signed message, so that a proof made
/// for one request is worth nothing for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofOf {
    /// A renewal (with its CSR).
    Renew,
    /// A logout.
    Logout,
}

/// The message a proof of possession signs: a fixed context, the operation, the connection's
/// exported keying material, the CSR (empty for a logout) and the sealed token, each with its
/// length.
///
/// `exported` is [`PROOF_EXPORTER_LEN`] bytes from the TLS exporter with
/// [`PROOF_EXPORTER_LABEL`].
pub fn proof_message(operation: ProofOf, exported: &[u8], csr: &[u8], sealed: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(64 + exported.len() + csr.len() + sealed.len());
    message.extend_from_slice(b"postern proof of possession v1\0");
    let label: &[u8] = match operation {
        ProofOf::Renew => b"renew",
        ProofOf::Logout => b"logout",
    };
    message.extend_from_slice(label);
    message.push(0);
    for part in [exported, csr, sealed] {
        message.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
        message.extend_from_slice(part);
    }
    message
}

/// Reads the fields of one frame body in order.
struct Fields<'a> {
    rest: &'a [u8],
    frame: &'static str,
}

impl<'a> Fields<'a> {
    fn new(body: &'a [u8], frame: &'static str) -> Self {
        Self { rest: body, frame }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.rest.len() {
            return Err(DecodeError::Malformed(self.frame));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut bytes = [0; 4];
        bytes.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(bytes))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(bytes))
    }

    fn bytes(&mut self, limit: usize) -> Result<Vec<u8>, DecodeError> {
        let len = usize::from(self.u16()?);
        if len > limit {
            return Err(DecodeError::TooLong { len, limit });
        }
        Ok(self.take(len)?.to_vec())
    }

    fn text(&mut self, limit: usize) -> Result<String, DecodeError> {
        let bytes = self.bytes(limit)?;
        let text = String::from_utf8(bytes).map_err(|_| DecodeError::BadReason)?;
        if text.chars().any(char::is_control) {
            return Err(DecodeError::BadReason);
        }
        Ok(text)
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(self.frame))
        }
    }
}

/// Appends a 2-byte length and the bytes, cut to `limit`. Callers keep within it (the broker
/// checks a sealed token's size before it sends one); cutting only keeps the frame valid.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8], limit: usize) {
    debug_assert!(bytes.len() <= limit, "a field over its limit would be cut");
    let bytes = &bytes[..bytes.len().min(limit).min(usize::from(u16::MAX))];
    out.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Appends text made printable and cut to `limit` bytes at a character boundary.
fn put_text(out: &mut Vec<u8>, text: &str, limit: usize) {
    put_bytes(out, crate::frame::printable(text, limit).as_bytes(), limit);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn round_trip_request(request: Request) {
        let bytes = request.encode();
        assert_eq!(Request::decode(&bytes), Ok(Some((request, bytes.len()))));
    }

    fn round_trip_reply(reply: Reply) {
        let bytes = reply.encode();
        assert_eq!(Reply::decode(&bytes), Ok(Some((reply, bytes.len()))));
    }

    #[test]
    fn every_frame_round_trips() {
        round_trip_request(Request::Hello);
        round_trip_request(Request::Login { csr: vec![1; 300] });
        round_trip_request(Request::Renew {
            csr: vec![1; MAX_CSR_LEN],
            sealed: vec![2; MAX_SEALED_LEN],
            proof: vec![3; MAX_PROOF_LEN],
        });
        round_trip_request(Request::Logout {
            sealed: vec![2; 100],
            proof: vec![3; 64],
        });
        round_trip_reply(Reply::Welcome(Welcome {
            broker: "gw.example.org".into(),
            idp: "https://idp.example.org".into(),
            services: vec![
                (ServiceName::new("imap").unwrap(), 993, ServiceKind::Imap),
                (ServiceName::new("git").unwrap(), 2222, ServiceKind::Tcp),
            ],
        }));
        round_trip_reply(Reply::Device(DeviceCode {
            verification_uri: "https://idp.example.org/device".into(),
            verification_uri_complete: None,
            user_code: "BCDF-GHJK".into(),
            expires_in: 300,
        }));
        round_trip_reply(Reply::Pending);
        round_trip_reply(Reply::Issued(Issued {
            chain: vec![vec![0x30; 3000], vec![0x30; 600]],
            sealed: Some(vec![9; 700]),
            session_ends: 1_900_000_000,
        }));
        round_trip_reply(Reply::Failed(Failure::new(
            FailCode::NotPermitted,
            "a second factor is required",
        )));
        round_trip_reply(Reply::LoggedOut(Revocation::Revoked));
        round_trip_reply(Reply::LoggedOut(Revocation::Unsupported));
        round_trip_reply(Reply::LoggedOut(Revocation::Failed));
    }

    #[test]
    fn trailing_or_missing_fields_are_malformed() {
        let mut bytes = Request::Login { csr: vec![1; 4] }.encode();
        bytes[2] += 1;
        bytes.push(0);
        assert_eq!(
            Request::decode(&bytes),
            Err(DecodeError::Malformed("request"))
        );
        // A field claiming more than the body holds.
        assert_eq!(
            Request::decode(b"\x11\x00\x02\x00\x05"),
            Err(DecodeError::Malformed("request"))
        );
        // A field longer than its own limit, inside a frame within its limit.
        let mut renew = vec![0x12, 0x00, 0x00];
        let mut body = vec![0x10, 0x01];
        body.extend_from_slice(&[0; 0x1001]);
        renew[1..3].copy_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        renew.extend_from_slice(&body);
        assert!(matches!(
            Request::decode(&renew),
            Err(DecodeError::TooLong { len: 0x1001, .. })
        ));
        assert_eq!(
            Reply::decode(b"\x25\x00\x01\x03"),
            Err(DecodeError::Malformed("LoggedOut"))
        );
        assert_eq!(
            Reply::decode(b"\x23\x00\x01\x00"),
            Err(DecodeError::Malformed("Issued"))
        );
    }

    #[test]
    fn directions_and_limits_come_from_the_header() {
        assert_eq!(
            Request::decode(&Reply::Pending.encode()),
            Err(DecodeError::UnexpectedType(TYPE_PENDING))
        );
        assert_eq!(
            Reply::decode(&Request::Hello.encode()),
            Err(DecodeError::UnexpectedType(TYPE_HELLO))
        );
        assert_eq!(
            Request::frame_len(&[TYPE_HELLO, 0, 1]),
            Err(DecodeError::TooLong { len: 1, limit: 0 })
        );
        assert!(Reply::frame_len(&[TYPE_ISSUED, 0xff, 0xff]).is_err());
    }

    #[test]
    fn debug_redacts_credentials() {
        let request = Request::Renew {
            csr: vec![1],
            sealed: b"secret-token".to_vec(),
            proof: vec![3],
        };
        assert!(!format!("{request:?}").contains("115"));
        let issued = Issued {
            chain: vec![vec![1]],
            sealed: Some(b"secret".to_vec()),
            session_ends: 0,
        };
        assert!(format!("{issued:?}").contains("redacted"));
    }

    #[test]
    fn text_is_printable() {
        let device = Reply::Device(DeviceCode {
            verification_uri: "https://idp\n\x1b[2J".into(),
            verification_uri_complete: None,
            user_code: "A".into(),
            expires_in: 1,
        });
        let Ok(Some((Reply::Device(decoded), _))) = Reply::decode(&device.encode()) else {
            panic!("does not decode");
        };
        assert_eq!(decoded.verification_uri, "https://idp\u{fffd}\u{fffd}[2J");
        assert_eq!(
            Reply::decode(b"\x24\x00\x05\x00\x01\x00\x01\x07"),
            Err(DecodeError::BadReason)
        );
    }

    #[test]
    fn proof_messages_separate_their_parts() {
        let renew = |csr: &[u8], sealed: &[u8]| proof_message(ProofOf::Renew, b"k", csr, sealed);
        assert_ne!(renew(b"ab", b"c"), renew(b"a", b"bc"));
        assert_ne!(
            proof_message(ProofOf::Logout, b"k", b"", b"s"),
            proof_message(ProofOf::Renew, b"k", b"", b"s")
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            if let Ok(Some((request, used))) = Request::decode(&bytes) {
                prop_assert_eq!(&request.encode()[..], &bytes[..used]);
            }
            let _ = Reply::decode(&bytes);
        }
    }
}
