//! The committed test PKI, and helpers to issue test certificates from it.
//!
//! Regenerate with `cargo run -p postern-certs --features test-util --example regenerate-testdata`.
//! The CAs and the server certificate (for `localhost`) are valid for fifty years from the day
//! they were made. None of these keys protects anything.
#![expect(
    clippy::expect_used,
    reason = "the committed fixtures are known good; a failure is a broken checkout"
)]

use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{
    AuthContext, ClientCa, ClientCredential, ClientVerifier, Identity, Issuance, KeyRequest,
    LoginFlow, PublicKey, RandomId, SecretPem, ServerCa, UserId, VerifyLimits,
};

/// Client CA certificate, PEM.
pub static CLIENT_CA_PEM: &str = include_str!("../testdata/client-ca.pem");
/// Client CA key, PEM.
pub static CLIENT_CA_KEY: &str = include_str!("../testdata/client-ca.key");
/// Server CA certificate, PEM.
pub static SERVER_CA_PEM: &str = include_str!("../testdata/server-ca.pem");
/// Server CA key, PEM.
pub static SERVER_CA_KEY: &str = include_str!("../testdata/server-ca.key");
/// Server certificate for `localhost`, PEM.
pub static SERVER_PEM: &str = include_str!("../testdata/server.pem");
/// Server key, PEM.
pub static SERVER_KEY: &str = include_str!("../testdata/server.key");
/// A client CA the broker does not trust, PEM.
pub static OTHER_CA_PEM: &str = include_str!("../testdata/other-ca.pem");
/// Key of the untrusted client CA, PEM.
pub static OTHER_CA_KEY: &str = include_str!("../testdata/other-ca.key");

/// Lifetime of the committed CAs and server certificate.
pub const FIXTURE_LIFETIME: Duration = Duration::from_secs(50 * 365 * 24 * 3600);

/// The trusted client CA.
pub fn client_ca() -> ClientCa {
    ClientCa::from_pem(CLIENT_CA_PEM, CLIENT_CA_KEY).expect("committed client CA")
}

/// A client CA nobody trusts.
pub fn other_ca() -> ClientCa {
    ClientCa::from_pem(OTHER_CA_PEM, OTHER_CA_KEY).expect("committed other CA")
}

/// The server CA.
pub fn server_ca() -> ServerCa {
    ServerCa::from_pem(SERVER_CA_PEM, SERVER_CA_KEY).expect("committed server CA")
}

/// A verifier trusting the test client CA with default limits.
pub fn client_verifier() -> ClientVerifier {
    ClientVerifier::new(
        &[client_ca().certificate().clone()],
        VerifyLimits::default(),
    )
    .expect("committed client CA")
}

/// The server certificate chain and key, for `localhost`.
pub fn server_credential() -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_slice_iter(SERVER_PEM.as_bytes())
        .collect::<Result<_, _>>()
        .expect("server cert");
    (
        chain,
        PrivateKeyDer::from_pem_slice(SERVER_KEY.as_bytes()).expect("server key"),
    )
}

/// The server CA certificates, as an agent trusts them.
pub fn server_cas() -> Vec<CertificateDer<'static>> {
    vec![server_ca().certificate().clone()]
}

/// Alice, who logged in with a password and a one-time code at `auth_time` (whole seconds, as
/// certificates hold it).
pub fn alice(auth_time: SystemTime) -> Identity {
    let seconds = auth_time
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let auth_time = SystemTime::UNIX_EPOCH + Duration::from_secs(seconds);
    Identity {
        user: UserId::new("https://idp.example.org", "alice-0001").expect("valid user id"),
        email: Some("alice@example.org".into()),
        name: Some("Alice".into()),
        groups: vec!["staff".into()],
        auth: AuthContext {
            issuance: Issuance::Login(LoginFlow::DeviceCode),
            amr: vec!["pwd".into(), "otp".into()],
            acr: None,
            auth_time,
            lineage: RandomId::generate().expect("random"),
            device: RandomId::generate().expect("random"),
        },
    }
}

/// A fresh key and a certificate for it from `ca`, valid from `now` for `lifetime`.
pub fn issue(
    ca: &ClientCa,
    identity: &Identity,
    now: SystemTime,
    lifetime: Duration,
) -> ClientCredential {
    let request = KeyRequest::generate().expect("key generation");
    let key = PublicKey::from_csr_pem(request.csr_pem.as_bytes()).expect("own CSR");
    let cert = ca.issue(identity, &key, now, lifetime).expect("issuance");
    ClientCredential {
        chain: vec![cert],
        key: private_key(&request.key_pem),
    }
}

/// DER of a PEM private key.
pub fn private_key(pem: &SecretPem) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.expose().as_bytes()).expect("generated key")
}

/// TLS for both ends of a tunnel connection from the committed PKI: the broker's (server
/// certificate for `localhost`, client certificates from the client CA required) and an
/// agent's with a fresh certificate for alice, valid from `now` for `lifetime`.
pub fn tunnel_tls(
    now: SystemTime,
    lifetime: Duration,
) -> (rustls::ServerConfig, rustls::ClientConfig) {
    let (chain, key) = server_credential();
    let server = crate::server_config(
        chain,
        key,
        std::sync::Arc::new(client_verifier()),
        &[postern_proto::ALPN_TUNNEL],
    )
    .expect("server TLS");
    let credential = issue(&client_ca(), &alice(now), now, lifetime);
    let client = crate::client_config(&server_cas(), Some(credential), postern_proto::ALPN_TUNNEL)
        .expect("client TLS");
    (server, client)
}
