//! The wire protocol between the `postern` agent and `postern-broker`.
//!
//! Everything the two ends say to each other inside QUIC is defined here: the ALPN ids that
//! carry the protocol version, the frames that open a tunnel stream, the frames of enrollment
//! (login, renewal, logout), their size limits, and the
//! codes used to close connections and reset streams. The crate is data only — it performs no
//! I/O, takes bytes and returns values — so that every decoder can be property-tested and fuzzed
//! (`proto/fuzz/`). `docs/wire-protocol.md` is the normative description; this crate is its
//! reference implementation.
//!
//! It is not a transport: reading frames from QUIC streams lives in `postern-transport`.

mod codes;
mod enroll;
mod frame;
mod service;

pub use codes::{CloseCode, ResetCode};
pub use enroll::{
    DeviceCode, FailCode, Failure, Issued, MAX_CHAIN_LEN, MAX_CSR_LEN, MAX_ENROLL_BODY_LEN,
    MAX_FAILURE_REASON_LEN, MAX_PROOF_LEN, MAX_SEALED_LEN, MAX_SERVICES, MAX_TEXT_LEN,
    PROOF_EXPORTER_LABEL, PROOF_EXPORTER_LEN, ProofOf, Reply, Request, Revocation, Welcome,
    proof_message,
};
pub use frame::{
    Answer, DecodeError, Frame, HEADER_LEN, MAX_BODY_LEN, MAX_REASON_LEN, Notice, Open, Refusal,
    RefuseCode,
};
pub use service::{MAX_SERVICE_NAME_LEN, ServiceKind, ServiceName, ServiceNameError};

/// ALPN id of the tunnel protocol, version 1: mutual TLS, one stream per forwarded connection.
pub const ALPN_TUNNEL: &[u8] = b"postern/1";

/// ALPN id of the enrollment protocol, version 1: server authentication only, used to log in.
pub const ALPN_ENROLL: &[u8] = b"postern-enroll/1";
