//! rustls configurations for both ends of a QUIC connection, and the role of a connection.
//!
//! Both ends speak TLS 1.3 only (QUIC requires it) with the `ring` provider. The server offers
//! client authentication but does not require it at the TLS layer: the enrollment protocol runs
//! without a client certificate. [`connection_role`] is the one place that turns a finished
//! handshake into what the connection may do, and it requires a valid client certificate for
//! the tunnel protocol. Neither end enables 0-RTT, and the server keeps no resumption state, so
//! every connection is a full handshake checked against the current time and CA set.

use std::sync::Arc;
use std::time::SystemTime;

use postern_proto::{ALPN_ENROLL, ALPN_TUNNEL};
use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::verify::{ClientVerifier, TlsClientVerifier, VerifiedClient, VerifyError};

/// What a connection may do, decided once its handshake is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The tunnel protocol, for the identity in the verified client certificate.
    Tunnel(Box<VerifiedClient>),
    /// The enrollment protocol: unauthenticated, used to log in.
    Enroll,
}

/// Why a connection has no role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    /// The client did not negotiate a protocol this broker speaks.
    #[error("no supported application protocol was negotiated")]
    NoProtocol,
    /// The tunnel protocol was asked for without a client certificate.
    #[error("the tunnel protocol requires a client certificate")]
    IdentityRequired,
    /// The client certificate did not verify.
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key was refused by rustls.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    /// None of the CA certificates could be used as a trust anchor.
    #[error("no usable CA certificate for the broker: {0}")]
    NoRoots(String),
    /// The broker's own certificate would not be accepted by agents.
    #[error("{0}")]
    Unusable(String),
}

/// The crypto provider every Postern TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The broker's TLS configuration: its certificate, optional client authentication through
/// `verifier`, and the ALPN ids it speaks (see [`connection_role`]).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    verifier: Arc<ClientVerifier>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(TlsClientVerifier::new(verifier)))
        .with_single_cert(chain, key)?;
    config.alpn_protocols = alpn.iter().map(|id| id.to_vec()).collect();
    config.max_early_data_size = 0;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(config)
}

/// A client certificate chain and its private key.
#[derive(Debug)]
pub struct ClientCredential {
    /// The certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
}

/// The agent's TLS configuration: the broker is verified against `server_cas` (a set, so that
/// the server CA can rotate; empty means the publicly trusted roots), the client presents `client` when given, and offers `alpn`.
pub fn client_config(
    server_cas: &[CertificateDer<'static>],
    client: Option<ClientCredential>,
    alpn: &[u8],
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    if server_cas.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    } else {
        let (added, _ignored) = roots.add_parsable_certificates(server_cas.iter().cloned());
        if added == 0 {
            return Err(TlsError::NoRoots(
                "none of the server CA certificates could be parsed".into(),
            ));
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut config = match client {
        Some(credential) => builder.with_client_auth_cert(credential.chain, credential.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

/// Checks that `chain` is a certificate agents trusting `server_cas` accept for `host_name` at
/// `now`, and returns when it ends: a broker checks its own certificate before it serves.
pub fn check_server_chain(
    chain: &[CertificateDer<'static>],
    server_cas: &[CertificateDer<'static>],
    host_name: &str,
    now: SystemTime,
) -> Result<SystemTime, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(server_cas.iter().cloned());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::NoRoots(e.to_string()))?;
    let (end_entity, intermediates) = chain
        .split_first()
        .ok_or_else(|| TlsError::Unusable("the certificate file is empty".into()))?;
    let name = rustls_pki_types::ServerName::try_from(host_name.to_owned())
        .map_err(|_| TlsError::Unusable(format!("`{host_name}` is not a host name")))?;
    let at = rustls_pki_types::UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        &*verifier,
        end_entity,
        intermediates,
        &name,
        &[],
        at,
    )?;
    let (_, parsed) = x509_parser::parse_x509_certificate(end_entity)
        .map_err(|e| TlsError::Unusable(format!("the certificate does not parse: {e}")))?;
    crate::verify::system_time(parsed.validity().not_after.timestamp())
        .ok_or_else(|| TlsError::Unusable("the certificate's validity is out of range".into()))
}

/// Decides what a connection may do from its negotiated ALPN and the client's certificates.
///
/// The tunnel protocol requires a client certificate that `verifier` accepts at `now`; the
/// enrollment protocol ignores any certificate. Any other protocol has no role.
pub fn connection_role(
    alpn: Option<&[u8]>,
    peer_certificates: Option<&[CertificateDer<'_>]>,
    verifier: &ClientVerifier,
    now: SystemTime,
) -> Result<Role, RoleError> {
    match alpn {
        Some(ALPN_TUNNEL) => {
            let leaf = peer_certificates
                .and_then(<[_]>::first)
                .ok_or(RoleError::IdentityRequired)?;
            Ok(Role::Tunnel(Box::new(verifier.verify(leaf, now)?)))
        }
        Some(ALPN_ENROLL) => Ok(Role::Enroll),
        _ => Err(RoleError::NoProtocol),
    }
}
