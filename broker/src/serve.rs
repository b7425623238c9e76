//! The QUIC endpoint: one task per connection, one per stream, each decision audited.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use postern_certs::store::{self, StoreError};
use postern_certs::{
    CaError, ClientCa, ClientVerifier, Role, VerifiedClient, VerifyLimits, connection_role,
};
use postern_imap::login::Canonical;
use postern_policy::{
    Action, Authentication, Certificate, Decision, LoadError, Policies, Principal, Request,
};
use postern_proto::{
    ALPN_ENROLL, ALPN_TUNNEL, Answer, CloseCode, Notice, Open, Refusal, RefuseCode, ResetCode,
    ServiceName,
};
use postern_transport::{
    FrameError, RelayEnd, Tuning, close_code, read_frame, relay, reset_code, write_frame,
};
use quinn::crypto::rustls::{HandshakeData, QuicServerConfig};
use quinn::{Connection, Endpoint, Incoming, ReadError, ReadExactError, RecvStream, SendStream};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::audit::{Audit, Connect, Event};
use crate::authz::{Authority, Denial, Live, Snapshot};
use crate::config::{Config, Protocol, ServiceConfig};
use crate::enroll::Enrollment;
use crate::revoke::{Revocations, RevocationsError};

/// A bound broker, ready to [`run`](Broker::run).
#[derive(Debug)]
pub struct Broker {
    endpoint: Endpoint,
    metrics: Option<tokio::net::TcpListener>,
    shared: Arc<Shared>,
}

/// Why the broker could not start. Each is a configuration problem (exit code 64).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A certificate or key file could not be read.
    #[error("{0}")]
    Pki(#[from] StoreError),
    /// The certificates or keys cannot be used together.
    #[error("`{}`: {message}", path.display())]
    BadPki {
        /// The file at fault.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The policies do not load.
    #[error("policies in `{}`: {source}", path.display())]
    Policy {
        /// The policy folder.
        path: std::path::PathBuf,
        /// The problems.
        source: LoadError,
    },
    /// The revocation list does not load.
    #[error("{0}")]
    Revocations(#[from] RevocationsError),
    /// The audit trail cannot be opened.
    #[error("cannot open the audit trail `{target}`: {source}")]
    Audit {
        /// The file.
        target: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The metrics address cannot be bound.
    #[error("cannot listen on TCP {addr} for metrics (`metrics.listen`): {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The UDP address cannot be bound.
    #[error("cannot listen on UDP {addr}: {error}{hint}")]
    Bind {
        /// The address from `broker.listen`.
        addr: SocketAddr,
        /// The cause (not a `source`: the message says it already).
        error: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
}

/// Time a client has to complete the QUIC and TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress above which a client must first prove its address (QUIC Retry),
/// so that forged source addresses cannot pile up state.
const RETRY_ABOVE: usize = 64;

/// How often a connection's path is looked at: a migrated connection's sessions are asked
/// again within this (and the re-check) of the move.
const PATH_CHECK: Duration = Duration::from_millis(500);

/// Handshakes in progress above which new ones are refused outright.
const MAX_HANDSHAKES: usize = 4096;

/// Longest reason from a failed handshake kept in the audit trail, in characters.
const MAX_AUDITED_REASON: usize = 256;

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    verifier: Arc<ClientVerifier>,
    /// Policies, entities and revocations in force, and the live sessions they govern.
    pub(crate) authority: Arc<Authority>,
    services: BTreeMap<ServiceName, Service>,
    pub(crate) audit: Arc<Audit>,
    pub(crate) enrollment: Enrollment,
    /// Cancelled to stop accepting connections and streams.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled to cut sessions that are still open.
    abort: CancellationToken,
    next_connection: AtomicU64,
    next_session: AtomicU64,
    pub(crate) open_sessions: AtomicUsize,
    /// Open sessions per user id, against `limits.max_sessions_per_user`.
    per_user: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// Connections to services being made, against `limits.max_pending_connects`.
    connect_slots: tokio::sync::Semaphore,
    handshakes: AtomicUsize,
    /// Lockout counters of IMAP logins.
    imap: crate::imap::Gate,
}

#[derive(Debug)]
struct Service {
    config: ServiceConfig,
    policy: postern_policy::Service,
    /// TLS to an IMAP server.
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A verified tunnel connection, shared by its streams.
struct Peer {
    id: u64,
    connection: Connection,
    /// Cancelled to cut this connection's sessions: shutdown, or the certificate ended.
    cut: CancellationToken,
    /// Set when the certificate ended while the connection was open.
    expired: std::sync::atomic::AtomicBool,
    client: VerifiedClient,
    principal: Principal,
    authentication: Authentication,
    /// The device id, as policies see it.
    device: String,
}

/// One of a user's open sessions, counted for as long as it lives.
struct UserSlot<'a> {
    shared: &'a Shared,
    user: String,
}

impl<'a> UserSlot<'a> {
    /// Counts a session of `user`, unless they have as many as the limit already.
    fn take(shared: &'a Shared, user: &str) -> Option<Self> {
        let mut counts = shared
            .per_user
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = counts.entry(user.to_owned()).or_insert(0);
        if *count >= shared.config.limits.max_sessions_per_user {
            return None;
        }
        *count += 1;
        Some(Self {
            shared,
            user: user.to_owned(),
        })
    }
}

impl Drop for UserSlot<'_> {
    fn drop(&mut self) {
        let mut counts = self
            .shared
            .per_user
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

/// Counts something in progress (sessions, handshakes) for as long as it lives.
struct Counted<'a>(&'a AtomicUsize);

impl Broker {
    /// Loads certificates and policies, opens the audit trail and binds the UDP socket.
    ///
    /// Must run inside a Tokio runtime.
    pub fn start(config: Config) -> Result<Self, StartError> {
        let Loaded {
            server_config,
            verifier,
            policies,
            revocations,
            services,
            enrollment,
            ..
        } = Loaded::from_config(&config, SystemTime::now())?;
        let authority = Arc::new(Authority::new(
            &config.policy_dir,
            config.policy.time_zone.clone(),
            policies,
            revocations,
        ));
        if let Err(err) = authority.listen_for_hangup() {
            warn!(error = %err, "cannot listen for SIGHUP; policy changes are still taken in from the folder");
        }
        let audit = Arc::new(
            Audit::open(&config.audit).map_err(|source| StartError::Audit {
                target: match &config.audit {
                    crate::config::AuditTarget::File(path) => path.display().to_string(),
                    crate::config::AuditTarget::Stdout => "-".into(),
                },
                source,
            })?,
        );
        let endpoint = postern_transport::endpoint(config.listen, Some(server_config)).map_err(|error| StartError::Bind {
            addr: config.listen,
            hint: match error.kind() {
                std::io::ErrorKind::AddrInUse => {
                    "; another process uses this port: stop it, or choose another `broker.listen`"
                }
                std::io::ErrorKind::PermissionDenied => {
                    "; ports below 1024 need privileges: grant CAP_NET_BIND_SERVICE or choose another port"
                }
                std::io::ErrorKind::AddrNotAvailable => "; this machine has no such address",
                _ => "",
            },
            error,
        })?;

        let metrics = config
            .metrics
            .map(|addr| {
                std::net::TcpListener::bind(addr)
                    .and_then(|listener| {
                        listener.set_nonblocking(true)?;
                        tokio::net::TcpListener::from_std(listener)
                    })
                    .map_err(|source| StartError::Metrics { addr, source })
            })
            .transpose()?;
        let pending_connects = config.limits.max_pending_connects;
        let imap_settings = config.imap;
        let shared = Shared {
            config,
            verifier,
            authority,
            services,
            audit,
            enrollment,
            shutdown: CancellationToken::new(),
            abort: CancellationToken::new(),
            next_connection: AtomicU64::new(1),
            next_session: AtomicU64::new(1),
            open_sessions: AtomicUsize::new(0),
            per_user: std::sync::Mutex::new(std::collections::HashMap::new()),
            connect_slots: tokio::sync::Semaphore::new(pending_connects),
            handshakes: AtomicUsize::new(0),
            imap: crate::imap::Gate::new(imap_settings),
        };
        Ok(Self {
            endpoint,
            metrics,
            shared: Arc::new(shared),
        })
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    /// The address of the metrics endpoint, when `metrics.listen` set one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Cancelling this token starts a graceful shutdown: no new connections or streams, open
    /// sessions get `limits.shutdown_grace` to finish.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Cancelling this token cuts open sessions at once (a second Ctrl-C).
    pub fn abort_token(&self) -> CancellationToken {
        self.shared.abort.clone()
    }

    /// Serves until shut down, then drains.
    pub async fn run(self) {
        let Broker {
            endpoint,
            metrics,
            shared,
        } = self;
        let listen = endpoint.local_addr().unwrap_or(shared.config.listen);
        let policies = shared.authority.current().policies.len();
        shared.audit.record_or_log(&Event::BrokerStart {
            listen,
            policies,
            services: shared.services.keys().map(ToString::to_string).collect(),
        });
        info!(%listen, policies, "broker serving");
        if let Some(listener) = metrics {
            tokio::spawn(crate::metrics::serve(
                listener,
                shared.clone(),
                shared.shutdown.clone(),
            ));
        }
        let authority = tokio::spawn(shared.authority.clone().run(
            shared.audit.clone(),
            shared.config.policy.recheck_interval,
            shared.shutdown.clone(),
        ));

        let connections = TaskTracker::new();
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let pending = shared.handshakes.load(Ordering::Relaxed);
                    if pending >= MAX_HANDSHAKES {
                        debug!(client.addr = %incoming.remote_address(), "too many handshakes in progress; refusing");
                        incoming.refuse();
                    } else if pending >= RETRY_ABOVE && !incoming.remote_address_validated() {
                        // Only fails for an address validated already, which this is not.
                        let _ = incoming.retry();
                    } else {
                        connections.spawn(connection(incoming, shared.clone()));
                    }
                }
                () = shared.shutdown.cancelled() => break,
            }
        }

        // New connections are refused outright (rather than left unanswered), so that agents
        // try again soon, and reach the restarted broker or another replica.
        let refusing = tokio::spawn({
            let endpoint = endpoint.clone();
            async move {
                while let Some(incoming) = endpoint.accept().await {
                    incoming.refuse();
                }
            }
        });
        let grace = shared.config.limits.shutdown_grace;
        let sessions = shared.open_sessions.load(Ordering::Relaxed);
        info!(sessions, grace = %humantime::format_duration(grace), "shutting down: no new connections; open sessions may finish");
        shared
            .audit
            .record_or_log(&Event::BrokerDrain { sessions, grace });
        connections.close();
        let mut sessions_cut = 0;
        tokio::select! {
            () = connections.wait() => {}
            () = tokio::time::sleep(grace) => {}
            () = shared.abort.cancelled() => {}
        }
        if !connections.is_empty() {
            sessions_cut = shared.open_sessions.load(Ordering::Relaxed);
            warn!(sessions = sessions_cut, "cutting the sessions still open");
            shared.abort.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
        }
        refusing.abort();
        endpoint.close(
            close_code(CloseCode::ShuttingDown),
            b"broker is shutting down",
        );
        authority.abort();
        shared.audit.record_or_log(&Event::BrokerStop {
            reason: "shutdown",
            sessions_cut,
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        info!("broker stopped");
    }
}

/// The broker's transport settings under `limits`: no keep-alives of its own (agents send
/// them), and no streams towards agents but the control stream the agent allows.
pub fn tuning(limits: &crate::config::Limits) -> Tuning {
    Tuning {
        idle_timeout: limits.idle_timeout,
        keep_alive: None,
        max_concurrent_streams: limits.max_streams_per_connection,
        control_streams: 0,
    }
}

/// Everything a configuration names, loaded and checked; nothing bound yet.
struct Loaded {
    server_config: quinn::ServerConfig,
    verifier: Arc<ClientVerifier>,
    policies: Policies,
    revocations: Revocations,
    services: BTreeMap<ServiceName, Service>,
    enrollment: Enrollment,
    server_not_after: SystemTime,
    client_cas: usize,
}

/// What `postern-broker check` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Services configured.
    pub services: usize,
    /// Policies loaded.
    pub policies: usize,
    /// CA certificates whose client certificates are accepted.
    pub client_cas: usize,
    /// When the broker's own certificate ends.
    pub server_not_after: SystemTime,
}

/// Loads and checks everything `serve` would, without binding or writing anything.
pub fn check(config: &Config) -> Result<Checked, StartError> {
    let loaded = Loaded::from_config(config, SystemTime::now())?;
    Ok(Checked {
        services: loaded.services.len(),
        policies: loaded.policies.len(),
        client_cas: loaded.client_cas,
        server_not_after: loaded.server_not_after,
    })
}

impl Loaded {
    fn from_config(config: &Config, now: SystemTime) -> Result<Self, StartError> {
        let pki = &config.pki;
        for key in [&pki.server_key, &pki.client_ca_key] {
            if store::readable_by_others(key).unwrap_or(false) {
                warn!(path = %key.display(), "private key file is readable by other users; run `chmod 600` on it");
            }
        }
        let bad = |path: &std::path::Path, message: String| StartError::BadPki {
            path: path.to_owned(),
            message,
        };
        let chain = store::read_certificates(&pki.server_cert)?;
        let (_, key) = store::read_private_key(&pki.server_key)?;
        let server_cas = store::read_certificates(&pki.server_ca)?;
        let server_not_after =
            postern_certs::check_server_chain(&chain, &server_cas, &config.hostname, now).map_err(
                |e| {
                    bad(
                        &pki.server_cert,
                        format!(
                            "agents trusting `{}` would refuse it for `{}`: {e}",
                            pki.server_ca.display(),
                            config.hostname
                        ),
                    )
                },
            )?;
        if server_not_after.duration_since(now).unwrap_or_default()
            < Duration::from_secs(30 * 24 * 3600)
        {
            warn!(not_after = %postern_certs::rfc3339(server_not_after), "the broker's certificate ends within 30 days; renew it (docs/operations.md)");
        }
        let client_cas = store::read_certificates(&pki.client_ca)?;
        if postern_certs::share_a_key(&client_cas, &server_cas)
            || postern_certs::share_a_key(&client_cas, &chain)
        {
            let message = format!(
                "a key in it is also in `{}` or the server certificate: whoever holds the server key could then \
                 issue identities; use separate CAs (docs/operations.md)",
                pki.server_ca.display()
            );
            return Err(bad(&pki.client_ca, message));
        }
        let enrollment = Enrollment::from_config(config, signing_ca(config)?)?;
        let limits = VerifyLimits {
            max_clock_skew: pki.max_clock_skew,
            max_lifetime: pki.max_cert_lifetime,
        };
        let verifier = Arc::new(
            ClientVerifier::new(&client_cas, limits)
                .map_err(|e| bad(&pki.client_ca, e.to_string()))?,
        );
        let tls =
            postern_certs::server_config(chain, key, verifier.clone(), &[ALPN_TUNNEL, ALPN_ENROLL])
                .map_err(|e| bad(&pki.server_key, e.to_string()))?;
        let quic =
            QuicServerConfig::try_from(tls).map_err(|e| bad(&pki.server_cert, e.to_string()))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        server_config.transport_config(tuning(&config.limits).transport_config());

        let policies =
            Policies::load_dir(&config.policy_dir).map_err(|source| StartError::Policy {
                path: config.policy_dir.clone(),
                source,
            })?;
        let revocations = Revocations::load(&config.policy_dir)?;
        let services = config
            .services
            .iter()
            .map(|(name, service)| {
                let policy = postern_policy::Service {
                    name: name.to_string(),
                    protocol: service.protocol.as_str().to_owned(),
                    tags: service.tags.clone(),
                };
                let tls = match &service.protocol {
                    crate::config::Protocol::Imap(imap) => crate::imap::client_config(imap)
                        .map_err(|message| StartError::BadPki {
                            path: imap.ca_file.clone().unwrap_or_else(|| config.path.clone()),
                            message: format!("TLS to the mail server of `{name}`: {message}"),
                        })?,
                    crate::config::Protocol::Tcp => None,
                };
                Ok((
                    name.clone(),
                    Service {
                        config: service.clone(),
                        policy,
                        tls,
                    },
                ))
            })
            .collect::<Result<_, StartError>>()?;
        Ok(Self {
            server_config,
            verifier,
            policies,
            revocations,
            services,
            enrollment,
            server_not_after,
            client_cas: client_cas.len(),
        })
    }
}

/// The client CA whose key is `pki.client_ca_key`: it signs new client certificates.
pub(crate) fn signing_ca(config: &Config) -> Result<ClientCa, StartError> {
    let pki = &config.pki;
    let (key, _) = store::read_private_key(&pki.client_ca_key)?;
    let mut problems = Vec::new();
    for certificate in store::read_certificates(&pki.client_ca)? {
        match ClientCa::from_der(certificate, key.expose()) {
            Ok(ca) => return Ok(ca),
            Err(CaError::KeyMismatch) => {}
            Err(err) => problems.push(err.to_string()),
        }
    }
    let message = if problems.is_empty() {
        format!(
            "it is the key of no certificate in `{}`; it must belong to one of them",
            pki.client_ca.display()
        )
    } else {
        problems.join("; ")
    };
    Err(StartError::BadPki {
        path: pki.client_ca_key.clone(),
        message,
    })
}

async fn connection(incoming: Incoming, shared: Arc<Shared>) {
    let source = incoming.remote_address();
    let handshake = {
        let _counted = Counted::new(&shared.handshakes);
        tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await
    };
    let connection = match handshake {
        Ok(Ok(connection)) => connection,
        // A peer that never answers (or a forged source address) is not worth an audit line.
        Ok(Err(quinn::ConnectionError::TimedOut)) | Err(_) => {
            debug!(client.addr = %source, "handshake timed out");
            return;
        }
        Ok(Err(err)) => {
            debug!(client.addr = %source, error = %err, "handshake failed");
            let reason: String = format!("handshake failed: {err}")
                .chars()
                .take(MAX_AUDITED_REASON)
                .collect();
            shared
                .audit
                .record_or_log(&Event::ConnectionDeny { source, reason });
            return;
        }
    };
    let alpn = connection
        .handshake_data()
        .and_then(|data| data.downcast::<HandshakeData>().ok())
        .and_then(|data| data.protocol);
    let certificates = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok());
    let role = connection_role(
        alpn.as_deref(),
        certificates.as_deref().map(Vec::as_slice),
        &shared.verifier,
        SystemTime::now(),
    );
    let client = match role {
        Ok(Role::Tunnel(client)) => *client,
        Ok(Role::Enroll) => {
            crate::enroll::serve_connection(connection, source, shared).await;
            return;
        }
        Err(postern_certs::RoleError::NoProtocol) => {
            shared.audit.record_or_log(&Event::ConnectionDeny {
                source,
                reason: "no supported protocol negotiated".into(),
            });
            connection.close(
                close_code(CloseCode::ProtocolViolation),
                b"unsupported protocol",
            );
            return;
        }
        Err(err) => {
            info!(client.addr = %source, error = %err, "connection refused");
            shared.audit.record_or_log(&Event::ConnectionDeny {
                source,
                reason: err.to_string(),
            });
            connection.close(
                close_code(CloseCode::IdentityRequired),
                err.to_string().as_bytes(),
            );
            return;
        }
    };

    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("connection", connection.id = id, user.id = %client.identity.user);
    let peer = Arc::new(Peer {
        id,
        cut: shared.abort.child_token(),
        expired: std::sync::atomic::AtomicBool::new(false),
        principal: Principal::from_identity(&client.identity),
        authentication: Authentication::from_identity(&client.identity),
        device: client.identity.auth.device.to_string(),
        client,
        connection,
    });
    serve_connection(peer, shared, source)
        .instrument(span)
        .await;
}

async fn serve_connection(peer: Arc<Peer>, shared: Arc<Shared>, source: SocketAddr) {
    let started = Instant::now();
    shared.audit.record_or_log(&Event::ConnectionOpen {
        connection: peer.id,
        source,
        client: &peer.client,
    });
    info!(client.addr = %source, user.email = peer.client.identity.email.as_deref().unwrap_or(""), "connection open");

    // Sessions live as long as their lineage (the login and its renewals) has a valid
    // certificate: a renewal presented on another connection carries them on.
    let lineage = peer.client.identity.auth.lineage;
    let skew = shared.config.pki.max_clock_skew;
    shared
        .authority
        .lineage_seen(lineage, peer.client.not_after, SystemTime::now());
    let mut end = peer.client.not_after;
    let expiry = tokio::time::sleep(until(end, skew));
    tokio::pin!(expiry);
    let streams = TaskTracker::new();
    let mut draining = false;
    // A new path is a new source address: policies about networks are asked again.
    let mut path = peer.connection.remote_address();
    let mut path_check = tokio::time::interval(PATH_CHECK);
    let reason = loop {
        tokio::select! {
            _ = path_check.tick() => {
                let now_at = peer.connection.remote_address();
                if now_at != path {
                    info!(from = %path, to = %now_at, "connection moved to a new path: asking again for its sessions");
                    shared.audit.record_or_log(&Event::ConnectionMigrate {
                        connection: peer.id,
                        from: path,
                        to: now_at,
                        identity: &peer.client.identity,
                    });
                    path = now_at;
                    shared.authority.recheck_connection(peer.id, SystemTime::now()).await;
                }
            }
            () = &mut expiry => {
                let renewed = shared.authority.lineage_end(&lineage).filter(|later| *later > end);
                if let Some(later) = renewed {
                    info!(until = %postern_certs::rfc3339(later), "certificate ended, but its login was renewed: open sessions go on; new streams need the new certificate");
                    end = later;
                    expiry.as_mut().reset(tokio::time::Instant::now() + until(end, skew));
                    continue;
                }
                peer.expired.store(true, Ordering::Relaxed);
                peer.cut.cancel();
                info!("certificate ended: closing the connection and its sessions");
                peer.connection.close(close_code(CloseCode::IdentityRequired), b"certificate expired");
                break "certificate expired".to_owned();
            }
            accepted = peer.connection.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(stream(peer.clone(), shared.clone(), send, recv));
                }
                Err(err) => break err.to_string(),
            },
            () = shared.shutdown.cancelled(), if !draining => {
                draining = true;
                streams.close();
                // Told at once rather than at the agent's next stream, so that it moves its
                // new streams elsewhere while these finish. (Without open streams the
                // connection closes at once, which says as much.) An agent that allows no
                // control stream never lets it open: the notice is then given up.
                if !streams.is_empty() {
                    let connection = peer.connection.clone();
                    let grace = shared.config.limits.shutdown_grace;
                    streams.spawn(async move {
                        let told = tokio::time::timeout(NOTICE_TIMEOUT, tell_to_move(&connection, grace)).await;
                        if !matches!(told, Ok(Ok(()))) {
                            debug!("the agent could not be told to move; it learns at its next stream");
                        }
                    });
                }
            }
            () = streams.wait(), if draining => {
                peer.connection.close(close_code(CloseCode::ShuttingDown), b"broker is shutting down");
                break "broker shutting down".to_owned();
            }
        }
    };
    streams.close();
    streams.wait().await;
    info!(reason = %reason, "connection closed");
    shared.audit.record_or_log(&Event::ConnectionClose {
        connection: peer.id,
        source: peer.connection.remote_address(),
        identity: &peer.client.identity,
        duration: started.elapsed(),
        reason,
    });
}

/// Longest the broker tries to tell an agent to move when it starts draining.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(5);

/// Tells the agent on its control stream that this broker is draining.
async fn tell_to_move(connection: &quinn::Connection, grace: Duration) -> Result<(), String> {
    let mut send = connection.open_uni().await.map_err(|e| e.to_string())?;
    write_frame(&mut send, &Notice::Move { grace })
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let _ = send.stopped().await;
    Ok(())
}

async fn stream(peer: Arc<Peer>, shared: Arc<Shared>, mut send: SendStream, mut recv: RecvStream) {
    let session = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let source = peer.connection.remote_address();
    let open = match tokio::time::timeout(
        shared.config.limits.open_timeout,
        read_frame::<Open>(&mut recv),
    )
    .await
    {
        Ok(Ok(open)) => open,
        // The agent gave up on the stream (its program went away) or the connection died:
        // nothing was asked, nothing to decide.
        Ok(Err(FrameError::Read(ReadExactError::ReadError(
            ReadError::Reset(_) | ReadError::ConnectionLost(_),
        )))) => {
            debug!("stream ended before it named a service");
            return;
        }
        malformed => {
            let reason = match malformed {
                Ok(Err(err)) => format!("malformed stream header: {err}"),
                _ => format!(
                    "no service named within {}",
                    humantime::format_duration(shared.config.limits.open_timeout)
                ),
            };
            let connect = peer.connect(session, source, "", None);
            return refuse_malformed(&shared, connect, &mut send, &mut recv, reason);
        }
    };
    let name = open.service.as_str();
    let span = info_span!("session", session.id = session, service = name);

    async {
        let now = SystemTime::now();
        let service = match admit(&peer, &shared, &open.service, now) {
            Ok(service) => service,
            Err((code, reason)) => {
                return refuse(&shared, peer.connect(session, source, name, None), &mut send, code, reason).await;
            }
        };
        // The mailbox an IMAP session logged in to: re-checks ask about it too, so such a
        // session's question is its own.
        let mailbox = Arc::new(std::sync::OnceLock::<Canonical>::new());
        let question = match service.config.protocol {
            Protocol::Imap(_) => format!("{name}#{session}"),
            Protocol::Tcp => name.to_owned(),
        };
        // Registered before the decision: a reload from here on re-checks this session.
        let live = Arc::new(Live {
            session,
            question: (peer.id, question),
            recheck: Box::new({
                let (peer, policy) = (peer.clone(), service.policy.clone());
                let authority = shared.authority.clone();
                let mailbox = mailbox.clone();
                move |snapshot: &Snapshot, zoned: &jiff::Zoned| {
                    let source = peer.connection.remote_address();
                    // The lineage's certificate, which a renewal may have extended.
                    let not_after = authority
                        .lineage_end(&peer.client.identity.auth.lineage)
                        .map_or(peer.client.not_after, |end| end.max(peer.client.not_after));
                    authorize(snapshot, &peer, &policy, source, zoned, not_after, mailbox.get()).err()
                }
            }),
            cut: peer.cut.child_token(),
            ended: std::sync::OnceLock::new(),
        });
        let _registration = shared.authority.register(live.clone());
        // Read after registering: a move of the connection from here on re-checks this session.
        let source = peer.connection.remote_address();
        let decision = loop {
            let snapshot = shared.authority.current();
            let result = authorize(
                &snapshot,
                &peer,
                &service.policy,
                source,
                &shared.authority.zoned(now),
                peer.client.not_after,
                None,
            );
            // Decided with a snapshot that was replaced meanwhile: ask the new one.
            if shared.authority.current().generation == snapshot.generation {
                break result;
            }
        };
        let decision = match decision {
            Ok(decision) => decision,
            Err(denial) => {
                let connect = peer.connect(session, source, name, denial.decision.as_ref());
                return refuse(&shared, connect, &mut send, RefuseCode::NotPermitted, denial.reason).await;
            }
        };
        let Some(_user_slot) = UserSlot::take(&shared, &peer.principal.id) else {
            let reason = format!(
                "{} has {} sessions open, the most this broker allows (`limits.max_sessions_per_user`); close some mail clients, or ask your administrator",
                peer.client.identity.display_name(),
                shared.config.limits.max_sessions_per_user
            );
            let connect = peer.connect(session, source, name, Some(&decision));
            return refuse(&shared, connect, &mut send, RefuseCode::Busy, reason).await;
        };
        let audited = peer.connect(session, source, name, Some(&decision));
        // The service is reached while the decision goes on record: the agent hears nothing,
        // and no byte passes, until both are done.
        let allowed = Event::ConnectAllow(audited);
        let (recorded, reached) = tokio::join!(
            shared.audit.record(&allowed),
            reach(&shared, &service.config, service.tls.as_ref(), name),
        );
        if let Err(err) = recorded {
            tracing::error!(error = %err, "cannot write the audit trail: refusing the session");
            let reason = "the broker cannot write its audit trail; access is refused until it can";
            return answer(&mut send, Answer::Refused(Refusal::new(RefuseCode::Internal, reason))).await;
        }

        let _session = Counted::new(&shared.open_sessions);
        let started = Instant::now();
        let close = |reason: String, from: u64, to: u64| {
            if let Some(ended) = live.ended.get() {
                let denial = &ended.denial;
                let policies = denial.decision.as_ref().map_or(&[][..], |d| &d.policies);
                let errors = denial.decision.as_ref().map_or(&[][..], |d| &d.errors);
                info!(generation = ended.generation, policies = ?policies, reason = %denial.reason, "session no longer allowed: ended");
                shared.audit.record_or_log(&Event::SessionDeny {
                    connect: Connect { policies, errors, ..audited },
                    kind: denial.kind,
                    reason: &denial.reason,
                    generation: ended.generation,
                    trigger: ended.trigger.as_str(),
                });
            }
            shared.audit.record_or_log(&Event::SessionClose {
                connect: audited,
                bytes_from_client: from,
                bytes_to_client: to,
                duration: started.elapsed(),
                reason: &reason,
            });
        };
        let upstream = match reached {
            Ok(upstream) => upstream,
            Err((refusal, reason)) => {
                answer(&mut send, Answer::Refused(refusal)).await;
                return close(reason, 0, 0);
            }
        };
        if let Err(err) = write_frame(&mut send, &Answer::Opened).await {
            return close(format!("client_gone: {err}"), 0, 0);
        }
        info!("session open");
        let (relayed, imap_reason) = match upstream {
            Upstream::Imap(mail, imap) => {
                let ended = serve_imap(&peer, &shared, &service.policy, imap, &live, &mailbox, audited, (send, recv), mail).await;
                (ended.relayed, ended.reason)
            }
            Upstream::Tcp(tcp) => (relay(send, recv, tcp, &live.cut).await, None),
        };
        // The expiry cut closes the connection too; whichever the relay noticed first, the
        // session ended because the certificate did.
        let expired = peer.expired.load(Ordering::Relaxed);
        let reason = match (&relayed.end, live.ended.get()) {
            (_, None) if imap_reason.is_some() => imap_reason.unwrap_or_default(),
            (RelayEnd::Cancelled, Some(ended)) => match ended.denial.kind {
                "revoked" => "revoked".to_owned(),
                _ => "policy_denied".to_owned(),
            },
            (RelayEnd::Closed, _) => "closed".to_owned(),
            (RelayEnd::Cancelled | RelayEnd::ConnectionLost(_), _) if expired => "certificate_expired".to_owned(),
            (RelayEnd::QuicReset(_) | RelayEnd::QuicStopped(_), _) => "client_reset".to_owned(),
            (RelayEnd::ConnectionLost(why), _) => format!("connection_lost: {why}"),
            (RelayEnd::TcpFailed(kind), _) => format!("upstream_failed: {kind}"),
            (RelayEnd::Cancelled, None) => "shutdown".to_owned(),
        };
        info!(bytes.from_client = relayed.from_quic, bytes.to_client = relayed.to_quic, %reason, "session closed");
        close(reason, relayed.from_quic, relayed.to_quic);
    }
    .instrument(span)
    .await;
}

/// Time from now until `end` plus the tolerated clock skew; zero when that has passed.
fn until(end: SystemTime, skew: Duration) -> Duration {
    end.checked_add(skew)
        .and_then(|end| end.duration_since(SystemTime::now()).ok())
        .unwrap_or_default()
}

/// What does not depend on policy: the broker is not shutting down, the certificate has not
/// ended, the service exists.
fn admit<'a>(
    peer: &Peer,
    shared: &'a Shared,
    name: &ServiceName,
    now: SystemTime,
) -> Result<&'a Service, (RefuseCode, String)> {
    if shared.shutdown.is_cancelled() {
        return Err((
            RefuseCode::ShuttingDown,
            "the broker is shutting down; connect again in a moment".into(),
        ));
    }
    let not_after = peer.client.not_after;
    if not_after
        .checked_add(shared.config.pki.max_clock_skew)
        .is_some_and(|end| end < now)
    {
        let reason = format!(
            "this device's certificate expired at {}; get a new identity (`postern login --bundle FILE`) and restart `postern up`",
            postern_certs::rfc3339(not_after)
        );
        return Err((RefuseCode::CertificateExpired, reason));
    }
    shared.services.get(name).ok_or_else(|| {
        let known: Vec<_> = shared.services.keys().map(ToString::to_string).collect();
        let reason = format!(
            "this broker has no service `{name}` (it has: {})",
            known.join(", ")
        );
        (RefuseCode::UnknownService, reason)
    })
}

/// Whether `peer` may use `service` now, from `source`: revocations first, then Cedar. The one
/// path for the first decision and every re-check. `not_after` is the end of the lineage's
/// latest certificate, which a renewal may have moved past the connection's own.
fn authorize(
    snapshot: &Snapshot,
    peer: &Peer,
    service: &postern_policy::Service,
    source: SocketAddr,
    zoned: &jiff::Zoned,
    not_after: SystemTime,
    mailbox: Option<&Canonical>,
) -> Result<Decision, Denial> {
    let identity = &peer.client.identity;
    if let Some(reason) = snapshot.revocations.check(&crate::revoke::Subject {
        user: &peer.principal.id,
        auth_time: identity.auth.auth_time,
        issued: peer.client.not_before,
        lineage: Some(&identity.auth.lineage),
        device: &identity.auth.device,
    }) {
        return Err(Denial {
            kind: "revoked",
            reason: format!("{reason} (`postern login`)"),
            decision: None,
        });
    }
    let certificate = Certificate {
        not_before: peer.client.not_before,
        not_after,
    };
    let ask = |action| {
        snapshot.policies.authorize(&Request {
            principal: &peer.principal,
            authentication: &peer.authentication,
            device: &peer.device,
            source: source.ip(),
            now: zoned,
            action,
        })
    };
    let decision = ask(Action::Connect {
        service,
        certificate,
    });
    if !decision.is_allowed() {
        return Err(Denial {
            kind: "policy",
            reason: format!(
                "policy does not allow {} to reach `{}`; ask your administrator if you need it",
                identity.display_name(),
                service.name
            ),
            decision: Some(decision),
        });
    }
    let Some(mailbox) = mailbox else {
        return Ok(decision);
    };
    let decision = ask(Action::ImapLogin {
        mailbox: &mailbox.name,
        address: &mailbox.address,
        service,
        certificate,
    });
    if decision.is_allowed() {
        return Ok(decision);
    }
    Err(Denial {
        kind: "policy",
        reason: format!(
            "policy does not allow {} to open the mailbox `{}`; ask your administrator if you need it",
            identity.display_name(),
            mailbox.name
        ),
        decision: Some(decision),
    })
}

/// Where a session's bytes go.
enum Upstream<'a> {
    /// An IMAP server past its greeting, and how to treat it.
    Imap(crate::imap::Mail, &'a crate::config::ImapService),
    /// A TCP service.
    Tcp(TcpStream),
}

/// An IMAP session: the login binding, then the watched relay.
#[expect(
    clippy::too_many_arguments,
    reason = "the session's parts, each used once"
)]
async fn serve_imap(
    peer: &Arc<Peer>,
    shared: &Arc<Shared>,
    service: &postern_policy::Service,
    imap: &crate::config::ImapService,
    live: &Live,
    mailbox: &std::sync::OnceLock<Canonical>,
    connect: Connect<'_>,
    (send, recv): (SendStream, RecvStream),
    mail: crate::imap::Mail,
) -> crate::imap::Ended {
    let authorize = |canonical: &Canonical| {
        let snapshot = shared.authority.current();
        let source = peer.connection.remote_address();
        let zoned = shared.authority.zoned(SystemTime::now());
        let not_after = shared
            .authority
            .lineage_end(&peer.client.identity.auth.lineage)
            .map_or(peer.client.not_after, |end| end.max(peer.client.not_after));
        authorize(
            &snapshot,
            peer,
            service,
            source,
            &zoned,
            not_after,
            Some(canonical),
        )
        .map(|decision| decision.policies)
        .map_err(|denial| crate::imap::Denied {
            reason: denial.reason,
            policies: denial.decision.map(|d| d.policies).unwrap_or_default(),
        })
    };
    let audit = |step, mailbox: Option<&str>, reason: Option<&str>, policies: &[String]| {
        shared.audit.record_or_log(&Event::Imap {
            connect: Connect {
                policies,
                ..connect
            },
            step,
            mailbox,
            reason,
        });
    };
    let cut_reason = || {
        live.ended.get().map_or_else(
            || "The gateway is closing this session; connect again".to_owned(),
            |ended| ended.denial.reason.clone(),
        )
    };
    let session = crate::imap::Session {
        gate: &shared.imap,
        rules: &imap.login,
        user: &peer.principal.id,
        who: peer.client.identity.display_name(),
        source: peer.connection.remote_address(),
        forward_address: imap.forward_client_address,
        session_id: connect.session,
        authorize: &authorize,
        audit: &audit,
        logged_in: mailbox,
        cut: &live.cut,
        cut_reason: &cut_reason,
        drain: &shared.shutdown,
    };
    crate::imap::serve(session, send, recv, mail).await
}

async fn refuse(
    shared: &Shared,
    connect: Connect<'_>,
    send: &mut SendStream,
    code: RefuseCode,
    reason: String,
) {
    info!(code = code.as_str(), %reason, "refused");
    shared.audit.record_or_log(&Event::ConnectDeny {
        connect,
        code: code.as_str(),
        reason: reason.clone(),
    });
    answer(send, Answer::Refused(Refusal::new(code, &reason))).await;
}

fn refuse_malformed(
    shared: &Shared,
    connect: Connect<'_>,
    send: &mut SendStream,
    recv: &mut RecvStream,
    reason: String,
) {
    info!(%reason, "stream refused");
    shared.audit.record_or_log(&Event::ConnectDeny {
        connect,
        code: "protocol_violation",
        reason,
    });
    let _ = send.reset(reset_code(ResetCode::ProtocolViolation));
    let _ = recv.stop(reset_code(ResetCode::ProtocolViolation));
}

async fn answer(send: &mut SendStream, answer: Answer) {
    // The agent may be gone already; there is nobody left to tell.
    if write_frame(send, &answer).await.is_ok() {
        let _ = send.finish();
    }
}

/// Reaches a session's service: a TCP connection, and for an IMAP service its greeting over
/// TLS. On failure, the refusal for the agent and the reason for the audit trail.
async fn reach<'a>(
    shared: &Shared,
    config: &'a ServiceConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
    name: &str,
) -> Result<Upstream<'a>, (Refusal, String)> {
    let upstream_addr = || format!("{}:{}", config.host, config.port);
    let connect_timeout = shared.config.limits.connect_timeout;
    let Ok(Ok(_connecting)) =
        tokio::time::timeout(connect_timeout, shared.connect_slots.acquire()).await
    else {
        let reason = "the broker is making too many connections at once; try again in a moment";
        warn!("too many connections to services in progress (`limits.max_pending_connects`)");
        return Err((
            Refusal::new(RefuseCode::Busy, reason),
            "busy: too many connections to services in progress".into(),
        ));
    };
    let upstream = match connect_upstream(config, connect_timeout).await {
        Ok(upstream) => upstream,
        Err((code, detail)) => {
            warn!(upstream = %upstream_addr(), error = %detail, "service unreachable");
            let reason = format!(
                "`{name}` cannot be reached from the broker right now ({detail}); try again later, or tell your administrator if it persists"
            );
            return Err((
                Refusal::new(code, &reason),
                format!("{}: {detail}", code.as_str()),
            ));
        }
    };
    match &config.protocol {
        Protocol::Imap(imap) => {
            let connected =
                tokio::time::timeout(connect_timeout, crate::imap::connect(upstream, imap, tls))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "no IMAP greeting within {}",
                            humantime::format_duration(connect_timeout)
                        ))
                    });
            match connected {
                Ok(mail) => Ok(Upstream::Imap(mail, imap)),
                Err(detail) => {
                    warn!(upstream = %upstream_addr(), error = %detail, "mail server unusable");
                    let reason = format!(
                        "`{name}` cannot be used from the broker right now ({detail}); try again later, or tell your administrator if it persists"
                    );
                    Err((
                        Refusal::new(RefuseCode::UpstreamUnavailable, &reason),
                        format!("upstream_unavailable: {detail}"),
                    ))
                }
            }
        }
        Protocol::Tcp => Ok(Upstream::Tcp(upstream)),
    }
}

/// Connects to a configured service, trying each address its host resolves to in turn, each
/// with a share of `timeout`, so that one silent address does not hide the others.
async fn connect_upstream(
    service: &ServiceConfig,
    timeout: Duration,
) -> Result<TcpStream, (RefuseCode, String)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let resolved = tokio::time::timeout_at(
        deadline,
        tokio::net::lookup_host((service.host.as_str(), service.port)),
    )
    .await;
    let addresses: Vec<SocketAddr> = match resolved {
        Ok(Ok(addresses)) => addresses.collect(),
        Ok(Err(err)) => {
            return Err((
                RefuseCode::UpstreamUnavailable,
                format!("cannot resolve the service's host: {err}"),
            ));
        }
        Err(_) => {
            return Err((
                RefuseCode::UpstreamTimeout,
                "resolving the service's host took too long".into(),
            ));
        }
    };
    let share = timeout / u32::try_from(addresses.len().max(1)).unwrap_or(u32::MAX);
    let mut last = (
        RefuseCode::UpstreamUnavailable,
        "the service's host resolves to no address".to_owned(),
    );
    for address in addresses {
        let attempt_deadline =
            deadline.min(tokio::time::Instant::now() + share.max(Duration::from_millis(500)));
        match tokio::time::timeout_at(attempt_deadline, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                // Without it an interactive protocol can stall on Nagle's algorithm and delayed ACKs.
                stream
                    .set_nodelay(true)
                    .map_err(|e| (RefuseCode::UpstreamUnavailable, e.to_string()))?;
                return Ok(stream);
            }
            Ok(Err(err)) => last = (RefuseCode::UpstreamUnavailable, err.to_string()),
            Err(_) => {
                last = (
                    RefuseCode::UpstreamTimeout,
                    format!("no answer within {}", humantime::format_duration(timeout)),
                )
            }
        }
    }
    Err(last)
}

impl Peer {
    fn connect<'a>(
        &'a self,
        session: u64,
        source: SocketAddr,
        service: &'a str,
        decision: Option<&'a Decision>,
    ) -> Connect<'a> {
        Connect {
            connection: self.id,
            session,
            source,
            identity: &self.client.identity,
            service,
            policies: decision.map_or(&[], |d| &d.policies),
            errors: decision.map_or(&[], |d| &d.errors),
        }
    }
}

impl<'a> Counted<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
