//! The QUIC connection to the broker, and opening a stream per local connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use postern_certs::{Bundle, ClientCredential};
use postern_proto::{
    ALPN_TUNNEL, Answer, CloseCode, Notice, Open, Refusal, RefuseCode, ServiceName,
};
use postern_transport::{Tuning, read_frame, write_frame};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tracing::{debug, info};

/// Default interval of keep-alive packets: well inside the UDP timeouts of common NATs and
/// firewalls (30 s and more) and the broker's idle timeout, so that a quiet IMAP IDLE keeps its
/// tunnel for as long as it likes. `postern up --keep-alive` changes it.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Shortest and longest keep-alive interval `postern up` accepts: more often wastes battery and
/// data; the longest leaves four keep-alives in the default idle timeout (120 s), so that a few
/// lost packets do not cost the connection, and is as long as many NATs keep a quiet flow.
pub const KEEP_ALIVE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(30);

/// Whether `every` is a keep-alive interval `postern up` accepts; if not, what to choose.
pub fn check_keep_alive(every: Duration) -> Result<(), String> {
    if KEEP_ALIVE_RANGE.contains(&every) {
        return Ok(());
    }
    Err(format!(
        "a keep-alive every {} would not keep the tunnel well: choose between {}s and {}s (the default is {}s)",
        humantime::format_duration(every),
        KEEP_ALIVE_RANGE.start().as_secs(),
        KEEP_ALIVE_RANGE.end().as_secs(),
        KEEP_ALIVE.as_secs()
    ))
}

/// A connection that hears nothing from the broker for this long is given up (the broker's
/// own `limits.idle_timeout` applies too: the smaller wins).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Transport settings of the agent's connections with keep-alives every `keep_alive`.
pub const fn tuning(keep_alive: Duration) -> Tuning {
    Tuning {
        idle_timeout: IDLE_TIMEOUT,
        keep_alive: Some(keep_alive),
        // The broker opens no streams towards the agent but its control stream.
        max_concurrent_streams: 0,
        control_streams: 1,
    }
}

/// The agent's default transport settings.
pub const TUNING: Tuning = tuning(KEEP_ALIVE);

/// Longest a notice on the broker's control stream may take to arrive once the stream is open.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(5);

/// Delay between starting connection attempts to successive broker addresses.
const ATTEMPT_STAGGER: Duration = Duration::from_millis(250);

/// Time a connection attempt to one address may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time the broker has to answer `Open`; its own budget (naming and connecting to the
/// service) is well below.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a program that connects while the tunnel is down waits for it to come back (a
/// broker restart, a network change) before its connection is closed.
pub const LOCAL_WAIT: Duration = Duration::from_secs(15);

/// While a broker drains, a program waits for its successor up to the drain's end plus this
/// (time to start again), when that is longer than [`LOCAL_WAIT`]...
const RESTART_ALLOWANCE: Duration = Duration::from_secs(10);

/// ...but never longer than this: about as long as mail programs wait for a server's greeting.
const DRAIN_WAIT_MAX: Duration = Duration::from_secs(60);

/// First wait before reconnecting after the connection was lost; it doubles with every failed
/// attempt up to [`RECONNECT_MAX`], with jitter, so that agents do not come back in a storm.
const RECONNECT_FIRST: Duration = Duration::from_millis(200);

/// Longest wait between reconnection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// A connection that lived this long was a success: the waits start over after it is lost.
const STABLE: Duration = Duration::from_secs(10);

/// Failures counted for a refusal of this identity: the wait goes straight to the longest.
const PERMANENT_FAILURES: u32 = 8;

/// The connection to the broker, made on first use and remade when it is lost.
#[derive(Debug)]
pub struct Tunnel {
    endpoint: Endpoint,
    /// TLS and transport settings; replaced when the certificate is renewed.
    config: Mutex<quinn::ClientConfig>,
    broker: String,
    server_name: String,
    slot: Mutex<Slot>,
    state: tokio::sync::watch::Sender<TunnelState>,
    /// Woken when the connection for new streams is replaced (renewal, a draining broker), so
    /// that `keep_connected` follows the new one.
    replaced: tokio::sync::Notify,
    tuning: Tuning,
    /// When the certificate in use ends: the tunnel does not reconnect by itself with an ended
    /// one (renewal, or a new login, hands it the next).
    not_after: std::sync::Mutex<SystemTime>,
    /// When the grace period of a broker that said it drains ends: programs that connect
    /// meanwhile wait for its successor until then.
    drain_ends: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// What the tunnel is doing, for `postern status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelState {
    /// Not connected yet: nothing has needed it.
    Idle,
    /// Connected to this broker address since then.
    Connected(SocketAddr, SystemTime),
    /// Not reconnecting: the certificate ended at this time; renewal or a new login is needed.
    CertificateEnded(SystemTime),
    /// Lost or never made; the next attempt is this soon, and this was the last failure.
    Reconnecting {
        /// Attempts that failed in a row.
        failures: u32,
        /// Until the next attempt.
        next: Duration,
        /// Why the connection is not there, for people.
        reason: String,
    },
}

/// The current connection, or why the last attempt to make one failed.
#[derive(Debug, Default)]
struct Slot {
    connection: Option<Connection>,
    failure: Option<(Instant, TunnelError)>,
}

/// Why a stream could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TunnelError {
    /// The broker's name did not resolve.
    #[error("cannot resolve the broker address `{broker}`: {detail}")]
    Resolve {
        /// `HOST:PORT` from the identity.
        broker: String,
        /// The resolver's error.
        detail: String,
    },
    /// No address of the broker could be connected to.
    #[error("cannot connect to the broker at {broker}: {detail}")]
    Connect {
        /// `HOST:PORT` from the identity.
        broker: String,
        /// What went wrong, for people.
        detail: String,
        /// Whether trying again could help: not when the broker refused this identity.
        transient: bool,
    },
    /// The broker refused the stream.
    #[error("the broker refused: {0}")]
    Refused(Refusal),
    /// The connection failed while opening the stream.
    #[error("the connection to the broker failed: {0}")]
    Lost(String),
    /// The agent could not set up QUIC.
    #[error("cannot set up the QUIC endpoint: {0}")]
    Setup(String),
    /// The certificate cannot be used now (it ended during sleep and is not renewed); this says
    /// why and what to do.
    #[error("{0}")]
    Unready(String),
}

impl Tunnel {
    /// A tunnel for the identity in `bundle`; nothing is sent until it is used.
    pub fn new(bundle: &Bundle, credential: ClientCredential) -> Result<Self, TunnelError> {
        Self::with_tuning(bundle, credential, TUNING)
    }

    /// Like [`new`](Self::new), with other transport settings (another keep-alive interval).
    pub fn with_tuning(
        bundle: &Bundle,
        credential: ClientCredential,
        tuning: Tuning,
    ) -> Result<Self, TunnelError> {
        let not_after = certificate_end(bundle)?;
        let config = Mutex::new(client_config(bundle, credential, tuning)?);
        Ok(Self {
            tuning,
            not_after: std::sync::Mutex::new(not_after),
            drain_ends: std::sync::Mutex::new(None),
            endpoint: endpoint()?,
            config,
            broker: bundle.broker.clone(),
            server_name: bundle.server_name.clone(),
            slot: Mutex::new(Slot::default()),
            state: tokio::sync::watch::Sender::new(TunnelState::Idle),
            replaced: tokio::sync::Notify::new(),
        })
    }

    /// The live connection, connecting first if there is none.
    pub async fn connection(&self) -> Result<Connection, TunnelError> {
        let asked = Instant::now();
        let mut slot = self.slot.lock().await;
        if let Some(connection) = slot
            .connection
            .as_ref()
            .filter(|c| c.close_reason().is_none())
        {
            return Ok(connection.clone());
        }
        // Callers that queued behind an attempt that failed share its result instead of each
        // waiting for an attempt of their own.
        if let Some((failed_at, failure)) = &slot.failure
            && *failed_at >= asked
        {
            return Err(failure.clone());
        }
        match self.connect().await {
            Ok(connection) => {
                info!(broker = %self.broker, remote = %connection.remote_address(), "connected to the broker");
                self.state.send_replace(TunnelState::Connected(
                    connection.remote_address(),
                    SystemTime::now(),
                ));
                *slot = Slot {
                    connection: Some(connection.clone()),
                    failure: None,
                };
                Ok(connection)
            }
            Err(failure) => {
                slot.failure = Some((Instant::now(), failure.clone()));
                Err(failure)
            }
        }
    }

    /// Stops handing out `connection` for new streams (its open streams go on).
    async fn set_aside(&self, connection: &Connection) {
        let mut slot = self.slot.lock().await;
        if slot
            .connection
            .as_ref()
            .is_some_and(|current| current.stable_id() == connection.stable_id())
        {
            slot.connection = None;
        }
        self.replaced.notify_waiters();
    }

    /// What the tunnel is doing; changes are announced on the receiver.
    pub fn state(&self) -> tokio::sync::watch::Receiver<TunnelState> {
        self.state.subscribe()
    }

    /// Keeps the connection up until `stop`: when it is lost (broker restart, network gone) it
    /// is made again at once, then after waits that double with every failure (with jitter), so
    /// that programs find it ready and many agents do not come back all at once.
    pub async fn keep_connected(&self, stop: tokio_util::sync::CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            // Enabled before the certificate is looked at, so that a renewal in between is not
            // missed.
            let renewed = self.replaced.notified();
            tokio::pin!(renewed);
            renewed.as_mut().enable();
            let ended = *self.not_after.lock().unwrap_or_else(|e| e.into_inner());
            if ended <= SystemTime::now() {
                // Offering an ended certificate only earns a refusal (and an audit entry): wait
                // for the renewal, which replaces it.
                self.state.send_if_modified(|state| {
                    let waiting = TunnelState::CertificateEnded(ended);
                    (*state != waiting).then(|| *state = waiting).is_some()
                });
                tokio::select! {
                    () = renewed => {}
                    () = stop.cancelled() => return,
                }
                continue;
            }
            let attempt = tokio::select! {
                attempt = self.connection() => attempt,
                () = stop.cancelled() => return,
            };
            let reason = match attempt {
                Ok(connection) => {
                    let remote = connection.remote_address();
                    if !matches!(*self.state.borrow(), TunnelState::Connected(at, _) if at == remote)
                    {
                        self.state
                            .send_replace(TunnelState::Connected(remote, SystemTime::now()));
                    }
                    let since = Instant::now();
                    let closed = tokio::select! {
                        reason = connection.closed() => reason,
                        // New streams use another connection now: follow it, and let this one
                        // close when its last session ends.
                        () = self.replaced.notified() => continue,
                        grace = told_to_move(&connection) => {
                            info!(
                                grace_s = grace.as_secs(),
                                "the broker is shutting down: programs connected through it may go on for up to {}s; new ones wait for a fresh connection",
                                grace.as_secs()
                            );
                            *self.drain_ends.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(tokio::time::Instant::now() + grace);
                            self.set_aside(&connection).await;
                            // Waits like after a loss, so that a broker that says this at once
                            // every time is not asked again and again.
                            failures = if since.elapsed() >= STABLE { 0 } else { failures.saturating_add(1) };
                            let next = backoff(failures);
                            self.state.send_replace(TunnelState::Reconnecting {
                                failures,
                                next,
                                reason: "the broker is shutting down".into(),
                            });
                            tokio::select! {
                                () = tokio::time::sleep(next) => {}
                                () = stop.cancelled() => return,
                            }
                            continue;
                        }
                        () = stop.cancelled() => return,
                    };
                    if !transient(&closed) {
                        // The broker refused this identity (TLS 1.3 tells the client after the
                        // handshake): trying again soon cannot help; renewal or login will.
                        failures = failures.max(PERMANENT_FAILURES);
                    } else if since.elapsed() >= STABLE {
                        failures = 0;
                    } else {
                        failures = failures.saturating_add(1);
                    }
                    let reason = explain(&closed);
                    info!(%reason, "connection to the broker lost; reconnecting");
                    reason
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    if !err.is_transient() {
                        failures = failures.max(PERMANENT_FAILURES);
                    }
                    err.to_string()
                }
            };
            if *self.not_after.lock().unwrap_or_else(|e| e.into_inner()) <= SystemTime::now() {
                // Lost because the certificate ended: no point in trying again with it.
                continue;
            }
            let next = backoff(failures);
            if failures > 0 {
                debug!(failures, next_ms = next.as_millis(), %reason, "the broker cannot be reached; trying again");
            }
            self.state.send_replace(TunnelState::Reconnecting {
                failures,
                next,
                reason,
            });
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = self.replaced.notified() => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Opens a stream to `service` and waits for the broker's answer. While the tunnel is down
    /// it waits up to [`LOCAL_WAIT`] for it to come back before giving up, or, while a broker
    /// drains, until its grace period ends and its successor has had time to start.
    pub async fn open(
        &self,
        service: &ServiceName,
    ) -> Result<(SendStream, RecvStream), TunnelError> {
        let now = tokio::time::Instant::now();
        let drain_ends = *self.drain_ends.lock().unwrap_or_else(|e| e.into_inner());
        let wait = drain_ends
            .filter(|end| *end > now)
            .map_or(LOCAL_WAIT, |end| {
                (end - now + RESTART_ALLOWANCE).clamp(LOCAL_WAIT, DRAIN_WAIT_MAX)
            });
        let deadline = now + wait;
        let mut retried = false;
        loop {
            let attempt = tokio::time::timeout_at(deadline, self.connection()).await;
            let connection = match attempt.unwrap_or_else(|_| {
                Err(TunnelError::Lost(format!(
                    "the broker did not come back within {}s",
                    wait.as_secs()
                )))
            }) {
                Ok(connection) => connection,
                Err(err) if err.is_transient() && tokio::time::Instant::now() < deadline => {
                    debug!(error = %err, "no connection to the broker yet; waiting for it");
                    // Woken when the tunnel's state changes, or after a while anyway: at most a
                    // few attempts a second per waiting program.
                    let mut state = self.state();
                    let next_look =
                        deadline.min(tokio::time::Instant::now() + Duration::from_millis(500));
                    let _ = tokio::time::timeout_at(next_look, state.changed()).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(err) => return Err(err),
            };
            match self.try_open(&connection, service).await {
                Err(TunnelError::Lost(_)) if !retried && connection.close_reason().is_some() => {
                    // The connection died (broker restart, network change): make a new one once.
                    debug!("connection lost; reconnecting");
                    retried = true;
                }
                Err(TunnelError::Lost(detail)) => {
                    let detail = connection
                        .close_reason()
                        .map_or(detail, |reason| explain(&reason));
                    return Err(TunnelError::Lost(detail));
                }
                Err(TunnelError::Refused(refusal))
                    if refusal.code() == RefuseCode::ShuttingDown
                        && tokio::time::Instant::now() < deadline =>
                {
                    // The broker is draining (an upgrade): sessions open on this connection
                    // finish there, new ones wait for a fresh connection, to the restarted
                    // broker or another replica.
                    info!("the broker is shutting down; new connections wait for it to come back");
                    self.set_aside(&connection).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    /// Moves the tunnel to `socket`: open connections migrate to the new path (QUIC connection
    /// migration, with a new connection id) and their sessions go on. quinn sends a ping on the
    /// new path at once, so the broker learns the new address without waiting for a keep-alive.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> std::io::Result<()> {
        self.endpoint.rebind(socket)
    }

    /// Where the tunnel's connection goes now, if there is one.
    pub async fn remote(&self) -> Option<SocketAddr> {
        let slot = self.slot.lock().await;
        slot.connection
            .as_ref()
            .filter(|c| c.close_reason().is_none())
            .map(Connection::remote_address)
    }

    /// The local address of the endpoint's socket.
    pub fn local(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Closes the connection and waits briefly for the broker to learn of it.
    pub async fn close(&self) {
        self.endpoint.close(
            postern_transport::close_code(CloseCode::Normal),
            b"agent stopped",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    async fn try_open(
        &self,
        connection: &Connection,
        service: &ServiceName,
    ) -> Result<(SendStream, RecvStream), TunnelError> {
        let lost = |e: &dyn std::fmt::Display| TunnelError::Lost(e.to_string());
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| lost(&e))?;
        write_frame(
            &mut send,
            &Open {
                service: service.clone(),
            },
        )
        .await
        .map_err(|e| lost(&e))?;
        match tokio::time::timeout(ANSWER_TIMEOUT, read_frame::<Answer>(&mut recv)).await {
            Ok(Ok(Answer::Opened)) => Ok((send, recv)),
            Ok(Ok(Answer::Refused(refusal))) => Err(TunnelError::Refused(refusal)),
            Ok(Err(err)) => Err(lost(&err)),
            Err(_) => Err(TunnelError::Lost(format!(
                "the broker did not answer within {}s",
                ANSWER_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Stops handing out the current connection for new streams, whatever it is (after a
    /// wake, when it may be dead at the broker): new streams go over a fresh connection, and
    /// sessions on this one go on if it still lives.
    pub async fn set_aside_current(&self) {
        self.slot.lock().await.connection = None;
        self.replaced.notify_waiters();
    }

    async fn connect(&self) -> Result<Connection, TunnelError> {
        let config = self.config.lock().await.clone();
        dial(&self.endpoint, &config, &self.broker, &self.server_name).await
    }

    /// Uses a renewed certificate from now on: new streams go over a new connection, while
    /// streams already open keep the connection they run on.
    pub async fn renewed(
        &self,
        bundle: &Bundle,
        credential: ClientCredential,
    ) -> Result<(), TunnelError> {
        let not_after = certificate_end(bundle)?;
        *self.config.lock().await = client_config(bundle, credential, self.tuning)?;
        *self.not_after.lock().unwrap_or_else(|e| e.into_inner()) = not_after;
        *self.slot.lock().await = Slot::default();
        self.replaced.notify_waiters();
        Ok(())
    }
}

/// Whether a failed handshake may succeed later (the broker restarting, the network coming
/// back), rather than never for this identity (its certificate refused).
fn transient(error: &ConnectionError) -> bool {
    match error {
        ConnectionError::TransportError(err) => !is_tls_alert(err.code),
        ConnectionError::ConnectionClosed(close) => !is_tls_alert(close.error_code),
        ConnectionError::ApplicationClosed(close) => {
            close.error_code != postern_transport::close_code(CloseCode::IdentityRequired)
        }
        ConnectionError::VersionMismatch => false,
        _ => true,
    }
}

/// TLS alerts travel as QUIC errors 0x100–0x1ff: the handshake itself was refused.
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

impl TunnelError {
    /// Whether waiting for the broker could help: it is restarting or out of reach, rather than
    /// refusing this identity or this service.
    pub fn is_transient(&self) -> bool {
        match self {
            TunnelError::Resolve { .. } | TunnelError::Lost(_) => true,
            TunnelError::Connect { transient, .. } => *transient,
            TunnelError::Refused(_) | TunnelError::Setup(_) | TunnelError::Unready(_) => false,
        }
    }
}

/// The wait before reconnection attempt `failures + 1`: none right after a loss, then doubling
/// from [`RECONNECT_FIRST`] up to [`RECONNECT_MAX`], each drawn between half and all of it.
fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return RECONNECT_FIRST;
    }
    let ceiling = RECONNECT_FIRST
        .saturating_mul(1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX))
        .min(RECONNECT_MAX);
    let mut byte = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    let fraction = f64::from(u16::from_le_bytes(byte)) / f64::from(u16::MAX);
    ceiling.mul_f64(0.5 + fraction / 2.0)
}

fn client_config(
    bundle: &Bundle,
    credential: ClientCredential,
    tuning: Tuning,
) -> Result<quinn::ClientConfig, TunnelError> {
    let setup = |e: &dyn std::fmt::Display| TunnelError::Setup(e.to_string());
    let tls = postern_certs::client_config(&bundle.server_cas, Some(credential), ALPN_TUNNEL)
        .map_err(|e| setup(&e))?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| setup(&e))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
    client_config.transport_config(tuning.transport_config());
    Ok(client_config)
}

fn certificate_end(bundle: &Bundle) -> Result<SystemTime, TunnelError> {
    bundle
        .inspect()
        .map(|certificate| certificate.not_after)
        .map_err(|e| TunnelError::Setup(e.to_string()))
}

/// Waits for the broker to say on its control stream that it is draining, and returns the
/// grace period it gives open streams. Never returns while the broker says nothing else; other
/// notices, and malformed ones, are skipped.
async fn told_to_move(connection: &Connection) -> Duration {
    loop {
        let Ok(mut recv) = connection.accept_uni().await else {
            // The connection ended: `closed()` tells why.
            return std::future::pending().await;
        };
        match tokio::time::timeout(NOTICE_TIMEOUT, read_frame::<Notice>(&mut recv)).await {
            Ok(Ok(Notice::Move { grace })) => return grace,
            Ok(Err(err)) => {
                debug!(error = %err, "ignoring a notice this agent does not understand");
                let _ = recv.stop(postern_transport::reset_code(
                    postern_proto::ResetCode::ProtocolViolation,
                ));
            }
            Err(_) => debug!("the broker opened its control stream but sent no notice"),
        }
    }
}

/// A QUIC endpoint on a dual-stack socket, which reaches IPv4 and IPv6 addresses alike.
pub(crate) fn endpoint() -> Result<Endpoint, TunnelError> {
    postern_transport::endpoint(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)), None)
        .or_else(|_| {
            postern_transport::endpoint(
                SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
                None,
            )
        })
        .map_err(|e| TunnelError::Setup(e.to_string()))
}

/// Connects to every address `broker` resolves to, staggered, and keeps the first that
/// completes the handshake.
pub(crate) async fn dial(
    endpoint: &Endpoint,
    config: &quinn::ClientConfig,
    broker: &str,
    server_name: &str,
) -> Result<Connection, TunnelError> {
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host(broker)
        .await
        .map_err(|e| TunnelError::Resolve {
            broker: broker.to_owned(),
            detail: e.to_string(),
        })?
        .collect();
    if addresses.is_empty() {
        let detail = "the name resolves to no address".to_owned();
        return Err(TunnelError::Resolve {
            broker: broker.to_owned(),
            detail,
        });
    }
    let mut attempts = JoinSet::new();
    for (index, address) in addresses.iter().copied().enumerate() {
        let (endpoint, config, server_name) =
            (endpoint.clone(), config.clone(), server_name.to_owned());
        let delay = ATTEMPT_STAGGER * u32::try_from(index).unwrap_or(u32::MAX);
        attempts.spawn(async move {
            tokio::time::sleep(delay).await;
            let connecting = endpoint.connect_with(config, address, &server_name).map_err(|e| (address, e.to_string(), false))?;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
                Ok(result) => result.map_err(|e| (address, explain(&e), transient(&e))),
                Err(_) => Err((address, format!("no answer within {}s; check the address and that its UDP port is reachable from here", HANDSHAKE_TIMEOUT.as_secs()), true)),
            }
        });
    }
    let mut failures = Vec::new();
    let mut any_transient = false;
    while let Some(result) = attempts.join_next().await {
        match result {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err((address, detail, transient))) => {
                any_transient |= transient;
                failures.push(format!("{address}: {detail}"));
            }
            Err(join) => failures.push(join.to_string()),
        }
    }
    Err(TunnelError::Connect {
        broker: broker.to_owned(),
        detail: failures.join("; "),
        transient: any_transient,
    })
}

/// What to do when the broker turns this device's identity away.
pub const GET_A_NEW_IDENTITY: &str = "log in again with `postern login` (or, for an identity from your \
     administrator, import a new bundle with `postern login --bundle FILE`), then restart `postern up`";

/// What a connection error means for the person at the keyboard.
pub fn explain(error: &ConnectionError) -> String {
    let new = GET_A_NEW_IDENTITY;
    match error {
        ConnectionError::ConnectionClosed(close) => {
            let code = u64::from(close.error_code);
            match code.checked_sub(0x100).filter(|alert| *alert < 0x100) {
                Some(42) => format!("the broker found this device's certificate malformed; {new}"),
                Some(43) => format!("the broker says this device's certificate is not for client authentication; {new}"),
                Some(45) => format!("the broker says this device's certificate has expired or is not valid yet (check this computer's clock); {new}"),
                Some(48) => format!("this device's certificate was not issued by this broker; {new}"),
                Some(49) => format!("this device's certificate is valid for longer than the broker allows; {new}"),
                Some(51) => format!("the signature on this device's certificate does not match the broker's CA (issued elsewhere, or altered); {new}"),
                Some(116) => format!("the broker requires a client certificate; {new}"),
                Some(120) => "the broker does not speak this agent's protocol version; update postern".into(),
                Some(_) => format!("the broker refused this device's certificate ({close}); {new}"),
                None if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED => {
                    "the broker takes no new connections right now (it is shutting down or overloaded); the agent tries again".into()
                }
                None => format!("the broker closed the connection: {close}"),
            }
        }
        ConnectionError::ApplicationClosed(close) => {
            let code = CloseCode::from_u64(close.error_code.into_inner());
            let reason = String::from_utf8_lossy(&close.reason);
            match code {
                CloseCode::IdentityRequired => format!("the broker did not accept this device's certificate ({reason}); {new}"),
                CloseCode::ShuttingDown => "the broker is shutting down; the agent reconnects on the next connection".into(),
                other => format!("the broker closed the connection: {other} ({reason})"),
            }
        }
        ConnectionError::TransportError(err) if err.reason.contains("Expired") || err.reason.contains("NotValidYet") => format!(
            "the broker's own certificate is expired or not valid yet ({}); check this computer's clock, or tell your administrator",
            err.reason
        ),
        ConnectionError::TransportError(err) if err.reason.contains("certificate") => format!(
            "the broker's certificate is not the one this identity trusts ({}); check the broker address, or ask your administrator for a new bundle",
            err.reason
        ),
        ConnectionError::TimedOut => "the broker did not answer; check the address and that its UDP port is reachable from here".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnection_waits_double_with_jitter_up_to_a_ceiling() {
        assert_eq!(backoff(0), RECONNECT_FIRST);
        for failures in 1..40 {
            let ceiling = RECONNECT_FIRST
                .saturating_mul(1u32 << failures.min(16))
                .min(RECONNECT_MAX);
            for _ in 0..20 {
                let wait = backoff(failures);
                assert!(
                    wait >= ceiling / 2 && wait <= ceiling,
                    "{failures}: {wait:?} outside {:?}..={ceiling:?}",
                    ceiling / 2
                );
            }
        }
        assert!(backoff(39) <= RECONNECT_MAX);
        // Jitter: agents that failed together do not all come back together.
        let draws: std::collections::HashSet<Duration> = (0..20).map(|_| backoff(8)).collect();
        assert!(draws.len() > 10, "{draws:?}");
    }
}
