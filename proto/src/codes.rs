//! Application error codes for QUIC `CONNECTION_CLOSE` and `RESET_STREAM`/`STOP_SENDING`.

use std::fmt;

/// Why a tunnel connection was closed, sent as the QUIC application error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseCode {
    /// The closing side is done; nothing went wrong.
    Normal,
    /// The broker is shutting down.
    ShuttingDown,
    /// The connection asked for the tunnel protocol without a valid client certificate.
    IdentityRequired,
    /// The peer broke the protocol.
    ProtocolViolation,
    /// A code this version does not know.
    Unrecognized(u64),
}

/// Why a tunnel stream was reset or stopped, sent as the QUIC application error code.
///
/// A reset tells the other end that the forwarded byte stream is cut short, so that it is never
/// taken for a complete one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResetCode {
    /// The connection on the far side of the relay failed or was reset.
    PeerReset,
    /// The relay was cancelled: the broker or agent is shutting down.
    Cancelled,
    /// The stream did not follow the protocol (for example a malformed `Open`).
    ProtocolViolation,
    /// A code this version does not know.
    Unrecognized(u64),
}

impl CloseCode {
    /// The code for a value read from the wire.
    pub fn from_u64(value: u64) -> Self {
        match value {
            0 => Self::Normal,
            1 => Self::ShuttingDown,
            2 => Self::IdentityRequired,
            3 => Self::ProtocolViolation,
            other => Self::Unrecognized(other),
        }
    }

    /// The value written on the wire.
    pub fn to_u64(self) -> u64 {
        match self {
            Self::Normal => 0,
            Self::ShuttingDown => 1,
            Self::IdentityRequired => 2,
            Self::ProtocolViolation => 3,
            Self::Unrecognized(other) => other,
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Normal => f.write_str("closed normally"),
            Self::ShuttingDown => f.write_str("broker is shutting down"),
            Self::IdentityRequired => f.write_str("a valid client certificate is required"),
            Self::ProtocolViolation => f.write_str("protocol violation"),
            Self::Unrecognized(code) => write!(f, "closed with code {code}"),
        }
    }
}

impl ResetCode {
    /// The code for a value read from the wire.
    pub fn from_u64(value: u64) -> Self {
        match value {
            1 => Self::PeerReset,
            2 => Self::Cancelled,
            3 => Self::ProtocolViolation,
            other => Self::Unrecognized(other),
        }
    }

    /// The value written on the wire.
    pub fn to_u64(self) -> u64 {
        match self {
            Self::PeerReset => 1,
            Self::Cancelled => 2,
            Self::ProtocolViolation => 3,
            Self::Unrecognized(other) => other,
        }
    }
}

impl fmt::Display for ResetCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PeerReset => f.write_str("the connection on the other side failed"),
            Self::Cancelled => f.write_str("cancelled"),
            Self::ProtocolViolation => f.write_str("protocol violation"),
            Self::Unrecognized(code) => write!(f, "reset with code {code}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for value in 0..16 {
            assert_eq!(CloseCode::from_u64(value).to_u64(), value);
            assert_eq!(ResetCode::from_u64(value).to_u64(), value);
        }
    }
}
