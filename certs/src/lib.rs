//! Postern identities and the X.509 certificates that carry them.
//!
//! This crate is the one mapping between an [`Identity`] — who someone is, as (issuer, subject),
//! and how they authenticated — and a client certificate: the user id in the SAN URI, the
//! authentication context in one small non-critical extension, EKU clientAuth. Around that
//! mapping it holds the broker's two CAs ([`ClientCa`] for client certificates, [`ServerCa`] for
//! its own TLS certificate), issuance from a signing request that proves possession of a P-256
//! or Ed25519 key, verification of a client certificate at a given time ([`ClientVerifier`]),
//! the rustls configurations of both ends, and [`connection_role`], which decides what a
//! finished handshake may do.
//!
//! Time is always passed in; nothing here reads the clock. Files are touched only by [`store`]
//! and only when asked. It is not a general PKI: no intermediates, no revocation lists (the
//! broker revokes through policy), no other key types.

mod bundle;
mod ca;
mod csr;
mod extension;
mod identity;
mod local;
mod pin;
mod proof;
mod secret;
pub mod store;
mod tls;
mod verify;

#[cfg(feature = "test-util")]
pub mod testdata;

pub use bundle::{
    BUNDLE_FORMAT, Bundle, BundleError, BundleService, Login, MAX_BUNDLE_LEN, check_key_matches,
    pem_block,
};
pub use ca::{CaError, ClientCa, Generated, IssueError, ServerCa};
pub use csr::{CsrError, KeyRequest, MAX_CSR_LEN, PublicKey};
pub use extension::{
    AUTH_CONTEXT_OID, MAX_AMR, MAX_AMR_LEN, MAX_EMAIL_LEN, MAX_EXTENSION_LEN, MAX_GROUP_LEN,
    MAX_GROUPS, MAX_TEXT_LEN, POSTERN_OID_ARC,
};
pub use identity::{
    AuthContext, DeviceId, Identity, IdentityError, Issuance, LineageId, LoginFlow,
    MAX_ID_PART_LEN, RandomId, UserId,
};
pub use local::{LOCAL_TLS_LIFETIME, LocalTls};
pub use pin::{Pin, PinError, pinned_cas, pinned_client_config};
pub use proof::{DeviceKey, ProofError};
pub use secret::{Sealed, SecretPem};
pub use tls::{
    ClientCredential, Role, RoleError, TlsError, check_server_chain, client_config,
    connection_role, provider, server_config,
};
pub use verify::{
    CertificateContents, ClientVerifier, TlsClientVerifier, TrustError, VerifiedClient,
    VerifyError, VerifyLimits, inspect_unverified, share_a_key,
};

/// A time as RFC 3339 in UTC, to the second, for messages and logs.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    date_time(time)
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "(time out of range)".to_owned())
}

/// Reads an RFC 3339 time (any offset), if certificates can express it.
pub fn parse_rfc3339(text: &str) -> Option<std::time::SystemTime> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| verify::system_time(t.unix_timestamp()))
}

/// The time `seconds` after the Unix epoch, if certificates can express it (up to the year
/// 9999). Use it for any count of seconds read from the wire or a file: adding a large
/// `Duration` to a `SystemTime` panics.
pub fn unix_time(seconds: u64) -> Option<std::time::SystemTime> {
    (seconds <= MAX_UNIX_SECONDS)
        .then(|| std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
}

/// Last second certificates (GeneralizedTime) can express: 9999-12-31T23:59:59Z.
pub(crate) const MAX_UNIX_SECONDS: u64 = 253_402_300_799;

/// `time` to whole seconds, if certificates can express it.
pub(crate) fn date_time(time: std::time::SystemTime) -> Option<time::OffsetDateTime> {
    let seconds = time
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .ok()?
        .as_secs();
    if seconds > MAX_UNIX_SECONDS {
        return None;
    }
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(seconds).ok()?).ok()
}
