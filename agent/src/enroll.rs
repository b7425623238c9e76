//! The enrollment client: asking a broker who it is, logging in, renewing and logging out over
//! `postern-enroll/1`.
//!
//! The broker is verified before anything it says is used: against pinned CA keys, a CA file,
//! the CAs of the stored identity, or the publicly trusted roots. Never on first use.

use std::sync::Arc;
use std::time::Duration;

use postern_certs::{Bundle, BundleService, DeviceKey, KeyRequest, Login, Pin, Sealed, SecretPem};
use postern_proto::{
    ALPN_ENROLL, DeviceCode, FailCode, Failure, Issued, PROOF_EXPORTER_LABEL, PROOF_EXPORTER_LEN,
    ProofOf, Reply, Request, Revocation, Welcome, proof_message,
};
use postern_transport::{FrameError, read_frame, write_frame};
use quinn::Connection;
use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::tunnel::{TUNING, TunnelError, dial, endpoint};

/// How the agent knows the broker is the right one.
#[derive(Debug, Clone)]
pub enum Trust {
    /// A CA in the broker's chain has one of these keys.
    Pins(Vec<Pin>),
    /// The broker's certificate chains to one of these CAs.
    Cas(Vec<CertificateDer<'static>>),
    /// The broker's certificate chains to a publicly trusted root.
    PublicRoots,
}

/// A verified enrollment connection to a broker.
#[derive(Debug)]
pub struct Session {
    connection: Connection,
    endpoint: quinn::Endpoint,
    /// `HOST:PORT` dialled.
    pub broker: String,
    /// The name the broker's certificate was verified for.
    pub server_name: String,
    /// The CAs to verify the broker with from now on (empty: public roots).
    pub server_cas: Vec<CertificateDer<'static>>,
}

/// Why an enrollment operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The broker could not be reached or verified.
    #[error(transparent)]
    Connect(#[from] TunnelError),
    /// The broker refused, with a reason for people.
    #[error("{}", .0.reason())]
    Refused(Failure),
    /// The broker said something this agent does not understand.
    #[error("the broker's answer is invalid: {0}")]
    Protocol(String),
    /// The connection failed midway.
    #[error("the connection to the broker failed: {0}")]
    Lost(String),
    /// Something local failed (keys, files).
    #[error("{0}")]
    Local(String),
    /// A new login replaced the identity being renewed.
    #[error("the stored identity was replaced by a new login")]
    Replaced,
    /// There is no usable stored identity (logged out, or the file is spoiled).
    #[error("{0}")]
    NoIdentity(String),
}

/// What a login or renewal produced, ready to be stored.
#[derive(Debug)]
pub struct Enrolled {
    /// The new identity.
    pub bundle: Bundle,
}

/// Progress of a login, for the person at the keyboard.
#[derive(Debug)]
pub enum Progress<'a> {
    /// The code to approve.
    Code(&'a DeviceCode),
    /// The broker polled the IdP; still waiting.
    Waiting,
}

impl Session {
    /// Connects to `broker` (`HOST:PORT`), verifying it as `trust` says, for `HOST`.
    pub async fn connect(broker: &str, trust: &Trust) -> Result<Self, EnrollError> {
        let (host, _) = split_host(broker).ok_or_else(|| {
            EnrollError::Local(format!(
                "`{broker}` is not HOST:PORT, such as gw.example.org:4433 or [2001:db8::1]:4433"
            ))
        })?;
        Self::connect_named(broker, &host, trust).await
    }

    /// Connects to the broker of a stored identity, verified as it was at login.
    pub async fn connect_for(identity: &Bundle) -> Result<Self, EnrollError> {
        let trust = if identity.server_cas.is_empty() {
            Trust::PublicRoots
        } else {
            Trust::Cas(identity.server_cas.clone())
        };
        Self::connect_named(&identity.broker, &identity.server_name, &trust).await
    }

    /// Connects to `broker`, verifying it as `trust` says, for `host`.
    async fn connect_named(broker: &str, host: &str, trust: &Trust) -> Result<Self, EnrollError> {
        let host = host.to_owned();
        let setup = |e: &dyn std::fmt::Display| EnrollError::Local(e.to_string());
        let tls = match trust {
            Trust::Pins(pins) => postern_certs::pinned_client_config(pins, ALPN_ENROLL),
            Trust::Cas(cas) => postern_certs::client_config(cas, None, ALPN_ENROLL),
            Trust::PublicRoots => postern_certs::client_config(&[], None, ALPN_ENROLL),
        }
        .map_err(|e| setup(&e))?;
        let quic = QuicClientConfig::try_from(tls).map_err(|e| setup(&e))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(TUNING.transport_config());
        let endpoint = endpoint()?;
        let connection = dial(&endpoint, &config, broker, &host).await?;
        let server_cas = match trust {
            Trust::Pins(pins) => {
                let chain = connection
                    .peer_identity()
                    .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                    .map(|chain| *chain)
                    .unwrap_or_default();
                let cas = postern_certs::pinned_cas(pins, &chain);
                if cas.is_empty() {
                    // The verifier accepted only chains holding a pinned CA; never widen trust.
                    return Err(EnrollError::Protocol(
                        "the broker's chain holds no pinned CA after the handshake".into(),
                    ));
                }
                cas
            }
            Trust::Cas(cas) => cas.clone(),
            Trust::PublicRoots => Vec::new(),
        };
        Ok(Self {
            connection,
            endpoint,
            broker: broker.to_owned(),
            server_name: host,
            server_cas,
        })
    }

    /// Asks the broker who it is and what it offers.
    pub async fn hello(&self) -> Result<Welcome, EnrollError> {
        let mut recv = self.ask(&Request::Hello).await?;
        match self.read(&mut recv).await? {
            Reply::Welcome(welcome) => Ok(welcome),
            Reply::Failed(failure) => Err(EnrollError::Refused(failure)),
            other => Err(unexpected(&other)),
        }
    }

    /// Logs a person in: makes a key, asks the broker to certify it after the person approves
    /// the code that `progress` shows.
    pub async fn login(
        &self,
        welcome: &Welcome,
        mut progress: impl FnMut(Progress<'_>),
    ) -> Result<Enrolled, EnrollError> {
        let request = KeyRequest::generate()
            .map_err(|e| EnrollError::Local(format!("cannot make a key: {e}")))?;
        let csr = csr_der(&request.csr_pem)?;
        let mut recv = self.ask(&Request::Login { csr }).await?;
        loop {
            match self.read(&mut recv).await? {
                Reply::Device(code) => progress(Progress::Code(&code)),
                Reply::Pending => progress(Progress::Waiting),
                Reply::Issued(issued) => {
                    let services = welcome
                        .services
                        .iter()
                        .map(|(name, port, protocol)| {
                            let service = BundleService {
                                port: *port,
                                protocol: *protocol,
                            };
                            (name.clone(), service)
                        })
                        .collect();
                    return self.enrolled(issued, request.key_pem, services);
                }
                Reply::Failed(failure) => return Err(EnrollError::Refused(failure)),
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// Renews `identity`: a new key, certified for the same login.
    pub async fn renew(&self, identity: &Bundle) -> Result<Enrolled, EnrollError> {
        let sealed = sealed_of(identity)?;
        let request = KeyRequest::generate()
            .map_err(|e| EnrollError::Local(format!("cannot make a key: {e}")))?;
        let csr = csr_der(&request.csr_pem)?;
        let proof = self.prove(identity, ProofOf::Renew, &csr, sealed)?;
        let renew = Request::Renew {
            csr,
            sealed: sealed.expose().to_vec(),
            proof,
        };
        let mut recv = self.ask(&renew).await?;
        match self.read(&mut recv).await? {
            Reply::Issued(issued) => {
                self.enrolled(issued, request.key_pem, identity.services.clone())
            }
            Reply::Failed(failure) => Err(EnrollError::Refused(failure)),
            other => Err(unexpected(&other)),
        }
    }

    /// Ends the login of `identity` at the broker, which revokes the refresh token at the IdP
    /// where it can; says what became of it.
    pub async fn logout(&self, identity: &Bundle) -> Result<Revocation, EnrollError> {
        let sealed = sealed_of(identity)?;
        let proof = self.prove(identity, ProofOf::Logout, &[], sealed)?;
        let logout = Request::Logout {
            sealed: sealed.expose().to_vec(),
            proof,
        };
        let mut recv = self.ask(&logout).await?;
        match self.read(&mut recv).await? {
            Reply::LoggedOut(revocation) => Ok(revocation),
            Reply::Failed(failure) => Err(EnrollError::Refused(failure)),
            other => Err(unexpected(&other)),
        }
    }

    /// Closes the connection and waits briefly for the broker to learn of it.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    fn prove(
        &self,
        identity: &Bundle,
        operation: ProofOf,
        csr: &[u8],
        sealed: &Sealed,
    ) -> Result<Vec<u8>, EnrollError> {
        let key = identity
            .key
            .as_ref()
            .ok_or_else(|| EnrollError::Local("the identity holds no private key".into()))?;
        let key = DeviceKey::from_pem(key).map_err(|e| EnrollError::Local(e.to_string()))?;
        let mut exported = [0u8; PROOF_EXPORTER_LEN];
        self.connection
            .export_keying_material(&mut exported, PROOF_EXPORTER_LABEL, b"")
            .map_err(|_| EnrollError::Local("cannot export keying material".into()))?;
        key.sign(&proof_message(operation, &exported, csr, sealed.expose()))
            .map_err(|e| EnrollError::Local(e.to_string()))
    }

    fn enrolled(
        &self,
        issued: Issued,
        key: SecretPem,
        services: std::collections::BTreeMap<postern_proto::ServiceName, BundleService>,
    ) -> Result<Enrolled, EnrollError> {
        let certificate = issued
            .chain
            .into_iter()
            .next()
            .map(CertificateDer::from)
            .ok_or_else(|| EnrollError::Protocol("no certificate".into()))?;
        let bundle = Bundle {
            broker: self.broker.clone(),
            server_name: self.server_name.clone(),
            server_cas: self.server_cas.clone(),
            certificate,
            key: Some(key),
            services,
            login: Some(Login {
                sealed: issued.sealed.map(Sealed::new),
                session_ends: postern_certs::unix_time(issued.session_ends).ok_or_else(|| {
                    EnrollError::Protocol("the login's end is out of range".into())
                })?,
            }),
        };
        // The certificate must be for this key and carry an identity.
        bundle
            .credential()
            .map_err(|e| EnrollError::Protocol(e.to_string()))?;
        bundle
            .inspect()
            .map_err(|e| EnrollError::Protocol(e.to_string()))?;
        Ok(Enrolled { bundle })
    }

    /// Opens a stream, writes `request` and finishes the agent's side; the answers follow on
    /// the returned stream.
    async fn ask(&self, request: &Request) -> Result<quinn::RecvStream, EnrollError> {
        let (mut send, recv) = self
            .connection
            .open_bi()
            .await
            .map_err(|e| EnrollError::Lost(crate::tunnel::explain(&e)))?;
        write_frame(&mut send, request)
            .await
            .map_err(|e| EnrollError::Lost(e.to_string()))?;
        let _ = send.finish();
        Ok(recv)
    }

    async fn read(&self, recv: &mut quinn::RecvStream) -> Result<Reply, EnrollError> {
        read_frame::<Reply>(recv).await.map_err(|e| match e {
            FrameError::Decode(e) => EnrollError::Protocol(e.to_string()),
            FrameError::Read(e) => match self.connection.close_reason() {
                Some(reason) => EnrollError::Lost(crate::tunnel::explain(&reason)),
                None => EnrollError::Lost(e.to_string()),
            },
        })
    }
}

impl EnrollError {
    /// Whether only a new `postern login` helps.
    pub fn login_required(&self) -> bool {
        matches!(self, EnrollError::Refused(f) if f.code() == FailCode::LoginRequired)
    }
}

fn sealed_of(identity: &Bundle) -> Result<&Sealed, EnrollError> {
    identity
        .login
        .as_ref()
        .and_then(|login| login.sealed.as_ref())
        .ok_or_else(|| {
            EnrollError::Refused(Failure::new(
                FailCode::LoginRequired,
                "this identity cannot be renewed (it came from an administrator's bundle, or the identity provider gave no refresh token)",
            ))
        })
}

fn csr_der(pem: &str) -> Result<Vec<u8>, EnrollError> {
    rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map(|der| der.as_ref().to_vec())
        .map_err(|e| EnrollError::Local(format!("cannot encode the signing request: {e}")))
}

fn unexpected(reply: &Reply) -> EnrollError {
    EnrollError::Protocol(format!("unexpected {reply:?}"))
}

/// The host of `HOST:PORT`, brackets removed from IPv6 addresses.
fn split_host(broker: &str) -> Option<(String, u16)> {
    let (host, port) = broker.rsplit_once(':')?;
    let port = port.parse().ok().filter(|p| *p != 0)?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_split() {
        assert_eq!(
            split_host("gw.example.org:4433"),
            Some(("gw.example.org".into(), 4433))
        );
        assert_eq!(split_host("[::1]:4433"), Some(("::1".into(), 4433)));
        for bad in ["gw.example.org", ":4433", "gw:0", "::1:4433", "gw:x"] {
            assert_eq!(split_host(bad), None, "{bad}");
        }
    }
}
