//! `postern up`: local listeners, one tunnel stream per accepted connection.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use postern_certs::{Bundle, LocalTls};
use postern_proto::{ServiceKind, ServiceName};
use postern_transport::{RelayEnd, Relayed, relay, relay_stream};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::local;
use crate::tunnel::{Tunnel, TunnelError};
use crate::wake::Guard;

/// A running agent: listeners bound, tunnel ready.
#[derive(Debug)]
pub struct Agent {
    tunnel: Arc<Tunnel>,
    listeners: Vec<(ServiceName, ServiceKind, TcpListener)>,
    shutdown: CancellationToken,
    /// The identity served, and where it is stored when it may be renewed.
    identity: Bundle,
    home: Option<crate::Home>,
    /// TLS for IMAP services; without it they are served as plain IMAP on loopback.
    local_tls: Option<Arc<rustls::ServerConfig>>,
    notices: Vec<String>,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// The identity cannot be used.
    #[error("{0}")]
    Identity(String),
    /// The certificate has expired.
    #[error("this device's certificate expired at {0}; {GET_A_NEW_IDENTITY}", GET_A_NEW_IDENTITY = crate::tunnel::GET_A_NEW_IDENTITY)]
    Expired(String),
    /// A `--listen` option is invalid.
    #[error("{0}")]
    Listen(String),
    /// The keep-alive interval is out of range.
    #[error("{0}")]
    KeepAlive(String),
    /// A local port could not be bound.
    #[error("cannot listen on {addr} for `{service}`: {source}{hint}")]
    Bind {
        /// The service.
        service: ServiceName,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
        /// What to do about it.
        hint: String,
    },
    /// QUIC could not be set up.
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    /// The local TLS certificate cannot be used.
    #[error("the local TLS certificate for mail clients is unusable: {0}")]
    LocalTls(String),
}

/// Added to a privileged port that cannot be bound, for the fallback: 993 becomes 10993.
pub const FALLBACK_OFFSET: u16 = 10_000;

/// Time a local mail client has to complete its TLS handshake.
const LOCAL_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Agent {
    /// Binds a listener for each service of `identity` (on 127.0.0.1 and its port, unless
    /// `overrides` names another loopback address) and prepares the tunnel.
    pub async fn start(
        identity: &Bundle,
        overrides: &[(ServiceName, SocketAddr)],
        now: SystemTime,
    ) -> Result<Self, UpError> {
        let certificate = identity
            .inspect()
            .map_err(|e| UpError::Identity(e.to_string()))?;
        if certificate.not_after < now {
            return Err(UpError::Expired(postern_certs::rfc3339(
                certificate.not_after,
            )));
        }
        let credential = identity
            .credential()
            .map_err(|e| UpError::Identity(e.to_string()))?;
        for (service, addr) in overrides {
            if !identity.services.contains_key(service) {
                let known: Vec<_> = identity.services.keys().map(ToString::to_string).collect();
                return Err(UpError::Listen(format!(
                    "--listen names `{service}`, which the broker does not offer (it offers: {})",
                    known.join(", ")
                )));
            }
            if !local::is_loopback(addr) {
                return Err(UpError::Listen(format!(
                    "--listen {service}={addr}: the agent listens on loopback addresses only (127.0.0.0/8, ::1), so that no other machine can use your tunnel"
                )));
            }
        }

        let mut listeners = Vec::new();
        let mut notices = Vec::new();
        for (service, details) in &identity.services {
            let chosen = overrides.iter().find(|(name, _)| name == service);
            let addr = chosen.map_or(
                SocketAddr::from((Ipv4Addr::LOCALHOST, details.port)),
                |(_, addr)| *addr,
            );
            let bound = match TcpListener::bind(addr).await {
                Ok(listener) => Ok(listener),
                // The usual port needs privileges: serve on a fallback port rather than not at
                // all, and say so.
                Err(err)
                    if err.kind() == std::io::ErrorKind::PermissionDenied
                        && chosen.is_none()
                        && addr.port() < 1024 =>
                {
                    let fallback =
                        SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port() + FALLBACK_OFFSET));
                    match TcpListener::bind(fallback).await {
                        Ok(listener) => {
                            notices.push(format!(
                                "cannot listen on {addr} for `{service}` ({err}); serving it on {fallback} instead: point your mail program there.{}",
                                bind_hint(&err, service, addr)
                            ));
                            Ok(listener)
                        }
                        Err(_) => Err(err),
                    }
                }
                Err(err) => Err(err),
            };
            let listener = bound.map_err(|source| UpError::Bind {
                hint: bind_hint(&source, service, addr),
                service: service.clone(),
                addr,
                source,
            })?;
            listeners.push((service.clone(), details.protocol, listener));
        }
        let tunnel = Arc::new(Tunnel::new(identity, credential)?);
        Ok(Self {
            tunnel,
            listeners,
            shutdown: CancellationToken::new(),
            identity: identity.clone(),
            home: None,
            local_tls: None,
            notices,
        })
    }

    /// What the agent did differently from what was asked, such as a fallback port.
    pub fn notices(&self) -> &[String] {
        &self.notices
    }

    /// Serves IMAP services with TLS, with `tls`'s certificate.
    pub fn with_local_tls(mut self, tls: &LocalTls) -> Result<Self, UpError> {
        let config = tls
            .server_config()
            .map_err(|e| UpError::LocalTls(e.to_string()))?;
        self.local_tls = Some(Arc::new(config));
        Ok(self)
    }

    /// Whether `service` is served with TLS.
    pub fn serves_tls(&self, service: &ServiceName) -> bool {
        self.local_tls.is_some()
            && self
                .listeners
                .iter()
                .any(|(name, kind, _)| name == service && *kind == ServiceKind::Imap)
    }

    /// Renews `identity` (stored in `home`) before its certificate ends, while the agent runs.
    pub fn with_renewal(mut self, home: crate::Home, identity: Bundle) -> Self {
        self.home = Some(home);
        self.identity = identity;
        self
    }

    /// Sends keep-alives every `every` instead of every [`KEEP_ALIVE`](crate::tunnel::KEEP_ALIVE).
    pub fn with_keep_alive(mut self, every: Duration) -> Result<Self, UpError> {
        crate::tunnel::check_keep_alive(every).map_err(UpError::KeepAlive)?;
        let credential = self
            .identity
            .credential()
            .map_err(|e| UpError::Identity(e.to_string()))?;
        self.tunnel = Arc::new(Tunnel::with_tuning(
            &self.identity,
            credential,
            crate::tunnel::tuning(every),
        )?);
        Ok(self)
    }

    /// Each service and the local address it is served on.
    pub fn addresses(&self) -> Vec<(ServiceName, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(service, _, listener)| {
                listener
                    .local_addr()
                    .ok()
                    .map(|addr| (service.clone(), addr))
            })
            .collect()
    }

    /// The tunnel to the broker (for moving it to another socket, as a network change does).
    pub fn tunnel(&self) -> Arc<Tunnel> {
        self.tunnel.clone()
    }

    /// Cancelling this token stops the agent: listeners close, open connections are cut.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves local connections until shut down.
    pub async fn run(self) {
        let Agent {
            tunnel,
            listeners,
            shutdown,
            identity,
            home,
            local_tls,
            notices: _,
        } = self;
        let tasks = TaskTracker::new();
        if let Some(home) = &home {
            tasks.spawn(report_state(
                home.tunnel_state_path(),
                tunnel.state(),
                shutdown.clone(),
            ));
        }
        let not_after = identity
            .inspect()
            .map_or(SystemTime::UNIX_EPOCH, |certificate| certificate.not_after);
        let guard = Arc::new(Guard::new(not_after));
        tasks.spawn(crate::renew::keep_fresh(
            home,
            identity,
            tunnel.clone(),
            guard.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(watch_clock(guard.clone(), tunnel.clone(), shutdown.clone()));
        tasks.spawn(follow_network(tunnel.clone(), shutdown.clone()));
        // Connected ahead of the first program, so that it does not wait for the handshake, and
        // again whenever the connection is lost.
        let keeper = tunnel.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move { keeper.keep_connected(stop).await });
        for (service, kind, listener) in listeners {
            let (tunnel, shutdown, sessions) = (tunnel.clone(), shutdown.clone(), tasks.clone());
            let local = Local {
                guard: guard.clone(),
                service,
                imap: kind == ServiceKind::Imap,
                tls: local_tls
                    .clone()
                    .filter(|_| kind == ServiceKind::Imap)
                    .map(tokio_rustls::TlsAcceptor::from),
            };
            tasks.spawn(accept_loop(local, listener, tunnel, shutdown, sessions));
        }
        shutdown.cancelled().await;
        tasks.close();
        // Relays end at once on the same token; an attempt to connect may take longer.
        let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
        tunnel.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    }
}

/// Writes what the tunnel is doing to `path` whenever it changes, for `postern status`, and
/// removes the file when the agent stops.
async fn report_state(
    path: std::path::PathBuf,
    mut state: tokio::sync::watch::Receiver<crate::tunnel::TunnelState>,
    shutdown: CancellationToken,
) {
    loop {
        let line = describe_state(&state.borrow_and_update());
        let text = format!("{}\n{line}\n", std::process::id());
        // Written beside and renamed, so `postern status` never reads half a file.
        let temporary = path.with_extension("state.new");
        let written = match tokio::fs::write(&temporary, text).await {
            Ok(()) => tokio::fs::rename(&temporary, &path).await,
            Err(err) => Err(err),
        };
        if let Err(err) = written {
            debug!(error = %err, "cannot write the tunnel state for `postern status`");
        }
        tokio::select! {
            changed = state.changed() => if changed.is_err() { break },
            () = shutdown.cancelled() => break,
        }
    }
    let _ = tokio::fs::remove_file(&path).await;
}

/// One line for people about what the tunnel is doing.
pub fn describe_state(state: &crate::tunnel::TunnelState) -> String {
    use crate::tunnel::TunnelState;
    match state {
        TunnelState::Idle => "starting".to_owned(),
        TunnelState::Connected(remote, since) => {
            format!(
                "connected to {remote} since {}",
                postern_certs::rfc3339(*since)
            )
        }
        TunnelState::CertificateEnded(at) => format!(
            "waiting: this device's certificate ended at {}; the agent renews it when the login allows; otherwise run `postern login`, then restart `postern up`",
            postern_certs::rfc3339(*at)
        ),
        TunnelState::Reconnecting {
            failures,
            next,
            reason,
        } => format!(
            "reconnecting: {reason} (next attempt in {}, {failures} failed in a row)",
            humantime::format_duration(Duration::from_millis(
                u64::try_from(next.as_millis()).unwrap_or(u64::MAX)
            ))
        ),
    }
}

/// Longest a program's connection waits for the certificate check after a wake (which renews
/// an ended certificate over the network) before it is told to try again.
const CHECK_WAIT: Duration = Duration::from_secs(30);

/// Looks at the clocks every [`TICK`](crate::wake::TICK), so that a wake is noticed, and the
/// certificate checked, even before a program connects.
async fn watch_clock(guard: Arc<Guard>, tunnel: Arc<Tunnel>, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(crate::wake::TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Some(gap) = guard.look() {
            woke(gap, tunnel.clone()).await;
        }
    }
}

/// After a wake: says so, and sets the connection aside for new streams. The broker may have
/// dropped it meanwhile (its idle timeout, a restart) while this side, whose timers did not
/// run, still takes it for alive; a fresh connection costs one handshake, and sessions on the
/// old one go on if it lives.
async fn woke(gap: Duration, tunnel: Arc<Tunnel>) {
    let slept = humantime::format_duration(Duration::from_secs(gap.as_secs()));
    info!(
        "this device was asleep or stopped for about {slept}: checking the certificate before serving programs"
    );
    tunnel.set_aside_current().await;
}

/// How often the agent looks at which local address reaches the broker.
const NETWORK_CHECK: Duration = Duration::from_secs(2);

/// Follows network changes: when the local address that reaches the broker changes (Wi-Fi to
/// LTE, a new DHCP lease, a VPN coming up), the tunnel moves to a fresh socket so that the
/// broker sees the new path at once and open sessions go on.
async fn follow_network(tunnel: Arc<Tunnel>, shutdown: CancellationToken) {
    let mut last: Option<std::net::IpAddr> = None;
    let mut ticks = tokio::time::interval(NETWORK_CHECK);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Some(remote) = tunnel.remote().await else {
            last = None;
            continue;
        };
        // Which source address the kernel picks for the broker now; nothing is sent.
        let route = tokio::task::spawn_blocking(move || route_to(remote)).await;
        let Ok(Some(source)) = route else { continue };
        match last {
            Some(previous) if previous != source => {
                info!(from = %previous, to = %source, "network changed: moving the tunnel to the new address");
                match fresh_socket(tunnel.local()) {
                    Ok(socket) => {
                        if let Err(err) = tunnel.rebind(socket) {
                            warn!(error = %err, "cannot move the tunnel to the new address; it reconnects when a program connects");
                        }
                    }
                    Err(err) => warn!(error = %err, "cannot open a socket on the new network"),
                }
            }
            _ => {}
        }
        last = Some(source);
    }
}

/// The local address the kernel would send from to reach `remote`.
fn route_to(remote: SocketAddr) -> Option<std::net::IpAddr> {
    let any: SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let probe = std::net::UdpSocket::bind(any).ok()?;
    probe.connect(remote).ok()?;
    probe.local_addr().ok().map(|a| a.ip())
}

/// A new socket like the endpoint's (same family, any address, a new port).
fn fresh_socket(current: Option<SocketAddr>) -> std::io::Result<std::net::UdpSocket> {
    match current {
        Some(SocketAddr::V4(_)) => {
            postern_transport::udp_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        }
        _ => postern_transport::udp_socket(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))),
    }
}

/// How one service is served locally.
#[derive(Clone)]
struct Local {
    /// Whether the certificate may be used now (after a wake, it is checked first).
    guard: Arc<Guard>,
    service: ServiceName,
    /// The broker speaks IMAP for it: refusals are told as `* BYE`.
    imap: bool,
    /// TLS for local programs.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

async fn accept_loop(
    local: Local,
    listener: TcpListener,
    tunnel: Arc<Tunnel>,
    shutdown: CancellationToken,
    sessions: TaskTracker,
) {
    let bound = listener.local_addr().ok();
    let service = local.service.clone();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    warn!(%service, error = %err, "cannot accept a local connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        // First thing, so that a check after a wake starts while the program does its TLS
        // handshake.
        if let Some(gap) = local.guard.look() {
            sessions.spawn(woke(gap, tunnel.clone()));
        }
        let span = info_span!("local", %service, client.addr = %peer);
        let (tunnel, shutdown, local) = (tunnel.clone(), shutdown.clone(), local.clone());
        sessions.spawn(
            async move { serve_local(stream, bound, peer, &local, &tunnel, &shutdown).await }
                .instrument(span),
        );
    }
}

async fn serve_local(
    stream: TcpStream,
    bound: Option<SocketAddr>,
    peer: SocketAddr,
    local: &Local,
    tunnel: &Tunnel,
    shutdown: &CancellationToken,
) {
    let Some(bound) = bound.or_else(|| stream.local_addr().ok()) else {
        warn!("cannot tell which address the connection came in on; refusing it");
        return;
    };
    match local::same_user(bound, peer) {
        Ok(Some(true) | None) => {}
        Ok(Some(false)) => {
            warn!(
                "refused a connection from a program of another user: only this user's programs may use this tunnel"
            );
            return;
        }
        Err(err) => {
            warn!(error = %err, "cannot tell which user connected; refusing the connection");
            return;
        }
    }
    // Without it an interactive protocol can stall on Nagle's algorithm and delayed ACKs.
    let _ = stream.set_nodelay(true);
    match &local.tls {
        Some(acceptor) => {
            let accepted =
                tokio::time::timeout(LOCAL_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            match accepted {
                Ok(Ok(mut tls)) => {
                    if let Some((send, recv)) = open_for(&mut tls, local, tunnel).await {
                        report(relay_stream(send, recv, tls, shutdown).await);
                    }
                }
                Ok(Err(err)) => info!(
                    error = %err,
                    "a local TLS handshake failed: does the mail program trust this device's local CA? (`postern trust`)"
                ),
                Err(_) => info!("a local program did not complete its TLS handshake in time"),
            }
        }
        None => {
            let mut stream = stream;
            if let Some((send, recv)) = open_for(&mut stream, local, tunnel).await {
                // Over plain TCP the relay holds no buffer while idle, and resets the program's
                // connection when the session ends abnormally instead of closing it cleanly.
                report(relay(send, recv, stream, shutdown).await);
            }
        }
    }
}

/// Opens a tunnel stream for a local connection. A refusal is told in IMAP terms to an IMAP
/// client, and the connection closed.
async fn open_for<S: AsyncWrite + Unpin>(
    stream: &mut S,
    local: &Local,
    tunnel: &Tunnel,
) -> Option<(SendStream, RecvStream)> {
    let service = &local.service;
    let opened = match local.guard.ready(CHECK_WAIT).await {
        Ok(()) => tunnel.open(service).await,
        Err(why) => Err(TunnelError::Unready(why)),
    };
    match opened {
        Ok(streams) => {
            debug!("tunnel open");
            Some(streams)
        }
        Err(err) => {
            let reason = match &err {
                TunnelError::Unready(why) => {
                    warn!("not forwarding a connection to `{service}`: {why}");
                    why.clone()
                }
                TunnelError::Refused(refusal) => {
                    warn!(code = %refusal.code(), "the broker refused `{service}`: {}", refusal.reason());
                    refusal.reason().to_owned()
                }
                other => {
                    error!("{other}");
                    format!("Postern cannot reach the gateway: {other}")
                }
            };
            if local.imap {
                let line: String = reason
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                let _ = stream
                    .write_all(format!("* BYE [UNAVAILABLE] {line}\r\n").as_bytes())
                    .await;
            }
            let _ = stream.shutdown().await;
            None
        }
    }
}

/// Logs how a relayed connection ended.
fn report(relayed: Relayed) {
    match relayed.end {
        RelayEnd::Closed | RelayEnd::Cancelled => {
            debug!(
                bytes.sent = relayed.to_quic,
                bytes.received = relayed.from_quic,
                "closed"
            )
        }
        other => info!(
            bytes.sent = relayed.to_quic,
            bytes.received = relayed.from_quic,
            end = other.as_str(),
            "connection ended abnormally"
        ),
    }
}

fn bind_hint(error: &std::io::Error, service: &ServiceName, addr: SocketAddr) -> String {
    let elsewhere = format!("use another port with `--listen {service}=127.0.0.1:PORT`");
    match error.kind() {
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
            "\nPorts below 1024 need privileges. To allow {port}, once: on Linux \
             `sudo setcap cap_net_bind_service=+ep $(command -v postern)` (again after each \
             upgrade), or `sudo sysctl net.ipv4.ip_unprivileged_port_start={port}` (kept across \
             reboots in /etc/sysctl.d/), or a systemd service with \
             `AmbientCapabilities=CAP_NET_BIND_SERVICE`; on macOS, run it as a launchd daemon. \
             Or {elsewhere}. docs/imap.md explains each.",
            port = addr.port()
        ),
        std::io::ErrorKind::AddrInUse => {
            format!("\nAnother program uses this port: stop it, or {elsewhere}.")
        }
        _ => String::new(),
    }
}
