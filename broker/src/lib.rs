//! The Postern broker.
//!
//! One UDP port at the edge. For each QUIC connection it verifies the client certificate and
//! reads the identity in it; for each stream it reads which service the agent wants, asks the
//! Cedar policies (`postern-policy`), connects to that service — only ever to one named in
//! `broker.toml` — and relays bytes both ways; every decision and every session end goes to
//! the audit trail. It also sets up a broker folder (`init`) and issues identity bundles for
//! machines (`issue`).
//!
//! The binary is a thin wrapper over [`cli::main`]; tests drive the same functions in-process.

pub mod audit;
pub mod authz;
pub mod cli;
pub mod config;
pub mod enroll;
pub mod id_token;
mod imap;
pub mod init;
pub mod issue;
mod metrics;
pub mod oidc;
pub mod revoke;
pub mod seal;
pub mod serve;

pub use serve::{Broker, Checked, StartError, check};
