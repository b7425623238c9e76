//! End-to-end tests: real Dovecot, real IMAP clients, the broker and the agent on loopback.
//! Each module names a property.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking"
)]

mod bad_input;
mod cli;
mod deny;
mod expiry;
mod idle;
mod imap_binding;
mod local_user;
mod login;
mod reauthorization;
mod reconnect;
mod renewal;
mod revocation;
mod roaming;
mod shutdown;
mod tunnel;
mod two_hosts;
