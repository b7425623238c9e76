//! The Postern agent, `postern`.
//!
//! It keeps this device's identity (imported with `postern login`), listens on loopback for
//! each service the broker offers, and carries every accepted connection over one QUIC
//! connection to the broker, authenticated with the device's client certificate. It never
//! decides who may reach what: the broker does.
//!
//! The binary is a thin wrapper over [`cli::main`]; tests drive the same functions in-process.

pub mod cli;
pub mod enroll;
pub mod home;
pub mod local;
pub mod login;
pub mod renew;
pub mod trust;
pub mod tunnel;
pub mod up;
pub mod wake;

pub use home::Home;
pub use up::{Agent, UpError};
