//! Integration tests of `postern-certs`: issuance, verification and roles against the test PKI.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking"
)]

mod issue;
mod role;
mod verify;
