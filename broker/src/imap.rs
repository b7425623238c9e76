//! IMAP services: TLS to the mail server, the login binding, lockout, and the watched relay
//! after login (docs/imap.md).
//!
//! Before login the broker speaks IMAP to the mail client itself: it answers what it can,
//! refuses what it must, and sends the server nothing but its own `AUTHENTICATE PLAIN` for a
//! login that policy allowed. After the server's `OK` it copies bytes, framing them with
//! [`postern_imap::watch`] so that it can stop a command that would undo the binding and end a
//! session with `* BYE` between two responses.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postern_imap::command::{self, Event, Kind, Tag};
use postern_imap::lockout::Lockout;
use postern_imap::login::{Canonical, Rules, decode_plain, encode_plain};
use postern_imap::response::{self, Response, ResponseKind, Status};
use postern_imap::{Secret, watch};
use postern_transport::{RelayEnd, Relayed};
use quinn::{ReadError, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::audit::ImapStep;
use crate::config::{ImapService, ImapSettings, UpstreamTls};

/// Bytes read at once from either side.
const CHUNK: usize = 64 * 1024;
/// Bytes read at once from a server that is not sending much, such as one holding an IDLE.
const SMALL_CHUNK: usize = 4 * 1024;
/// Time without anything from the server after which a session reads into a small buffer again.
const QUIET: Duration = Duration::from_secs(1);
/// Commands the broker answers before login before it gives up on a client.
const MAX_COMMANDS_BEFORE_LOGIN: u32 = 64;
/// Logins refused by the server on one connection before it is closed.
const MAX_FAILED_LOGINS_PER_SESSION: u32 = 3;
/// Time a session being ended gets to reach the end of the response in flight, for its `BYE`.
const BYE_GRACE: Duration = Duration::from_secs(2);

/// A byte stream to a mail server: TCP, or TLS over it.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What IMAP services share: lockout counters and settings.
#[derive(Debug)]
pub(crate) struct Gate {
    settings: ImapSettings,
    users: Mutex<Lockout<String>>,
    sources: Mutex<Lockout<IpAddr>>,
}

/// A mail server connection past its greeting, before any login.
pub(crate) type Mail = Conn<Box<dyn Io>>;

/// A connection to a mail server and the responses read from it.
pub(crate) struct Conn<S> {
    io: S,
    responses: response::Reader,
    /// What the server said it can do, upper case.
    capabilities: Vec<Vec<u8>>,
    /// The person's address was told to the server (`ID`).
    told_address: bool,
    next_tag: u32,
}

/// Everything one session's login phase needs from the broker.
pub(crate) struct Session<'a> {
    pub(crate) gate: &'a Gate,
    pub(crate) rules: &'a Rules,
    /// The user id: the lockout key.
    pub(crate) user: &'a str,
    /// The person, for messages.
    pub(crate) who: String,
    /// Where the person's connection comes from.
    pub(crate) source: SocketAddr,
    /// Tell the server where the person connects from, with `ID`, when it offers `ID`.
    pub(crate) forward_address: bool,
    /// The broker's session id, for the server's logs.
    pub(crate) session_id: u64,
    /// Asks policy whether this person may open a mailbox: the deciding policies, or why not.
    pub(crate) authorize: &'a (dyn Fn(&Canonical) -> Result<Vec<String>, Denied> + Sync),
    /// Writes an audit event about this session.
    pub(crate) audit: &'a AuditFn<'a>,
    /// Set to the mailbox once the server accepted the login: re-checks ask about it too.
    pub(crate) logged_in: &'a std::sync::OnceLock<Canonical>,
    /// Cancelled when the session must end (policy, revocation, certificate end, shutdown).
    pub(crate) cut: &'a CancellationToken,
    /// Why the session was cut, for the client's `BYE`.
    pub(crate) cut_reason: &'a (dyn Fn() -> String + Sync),
    /// Cancelled when the broker starts draining: the session ends with `* BYE` at its next
    /// boundary between responses, so that the mail client reconnects (and reaches the
    /// restarted broker) instead of holding the drain open until its grace period ends.
    pub(crate) drain: &'a CancellationToken,
}

/// What a mail client is told when the broker drains.
const DRAIN_REASON: &str = "The gateway is restarting; connect again in a moment";

/// Writes an audit event about a session: the step, the mailbox, why, and the deciding policies.
pub(crate) type AuditFn<'a> = dyn Fn(ImapStep, Option<&str>, Option<&str>, &[String]) + Sync + 'a;

/// Why policy refused a login.
#[derive(Debug)]
pub(crate) struct Denied {
    pub(crate) reason: String,
    pub(crate) policies: Vec<String>,
}

/// How a session ended, beyond what the byte relay tells.
#[derive(Debug)]
pub(crate) struct Ended {
    pub(crate) relayed: Relayed,
    /// A reason of the IMAP layer (`logout`, `login_timeout`, `refused_command` …), when it
    /// ended the session.
    pub(crate) reason: Option<String>,
}

impl Gate {
    pub(crate) fn new(settings: ImapSettings) -> Self {
        Self {
            settings,
            users: Mutex::new(Lockout::new(settings.user_lockout)),
            sources: Mutex::new(Lockout::new(settings.source_lockout)),
        }
    }

    /// How long `user` or `source` is still locked out, if either is.
    fn locked(&self, user: &str, source: IpAddr, now: Instant) -> Option<(Duration, &'static str)> {
        let user_lock = lock(&self.users)
            .locked(&user.to_owned(), now)
            .map(|d| (d, "this person"));
        user_lock.or_else(|| {
            lock(&self.sources)
                .locked(&source, now)
                .map(|d| (d, "this network address"))
        })
    }

    /// Counts a failed login; the lock it starts, if it starts one.
    fn failed(&self, user: &str, source: IpAddr, now: Instant) -> Option<Duration> {
        let by_user = lock(&self.users).fail(&user.to_owned(), now);
        let by_source = lock(&self.sources).fail(&source, now);
        by_user.or(by_source)
    }

    fn succeeded(&self, user: &str) {
        lock(&self.users).succeed(&user.to_owned());
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere cannot leave a counter half-updated in a way that matters.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The TLS settings for an IMAP service's server: its CA file, or the public roots.
pub(crate) fn client_config(
    service: &ImapService,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if service.tls == UpstreamTls::None {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    match &service.ca_file {
        Some(file) => {
            let cas = postern_certs::store::read_certificates(file).map_err(|e| e.to_string())?;
            let (added, _) = roots.add_parsable_certificates(cas);
            if added == 0 {
                return Err(format!(
                    "`{}` holds no usable CA certificate",
                    file.display()
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(postern_certs::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

/// Takes a mail server connection past its greeting, with TLS as configured. The error says
/// what went wrong, for the agent and the log.
pub(crate) async fn connect(
    tcp: TcpStream,
    service: &ImapService,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Mail, String> {
    let server_name = || {
        rustls_pki_types::ServerName::try_from(service.server_name.clone())
            .map_err(|_| format!("`{}` is not a server name", service.server_name))
    };
    let handshake = |tcp: TcpStream, config: &Arc<rustls::ClientConfig>| {
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let name = server_name();
        async move {
            connector
                .connect(name?, tcp)
                .await
                .map_err(|e| format!("TLS with the mail server failed: {e}"))
        }
    };
    let mut mail: Mail = match (service.tls, tls) {
        (UpstreamTls::Implicit, Some(config)) => {
            Conn::new(Box::new(handshake(tcp, config).await?) as Box<dyn Io>)
        }
        (UpstreamTls::StartTls, Some(config)) => {
            let mut plain = Conn::new(tcp);
            plain.greeting().await?;
            let tag = plain.tag();
            plain
                .write(format!("{tag} STARTTLS\r\n").as_bytes())
                .await?;
            loop {
                let response = plain.response().await?;
                match response.kind {
                    ResponseKind::Tagged { tag: t, status } if t == tag.as_bytes() => {
                        if status != Status::Ok {
                            return Err("the mail server refused STARTTLS".into());
                        }
                        break;
                    }
                    ResponseKind::Untagged(_) => {}
                    _ => return Err("the mail server answered STARTTLS with something else".into()),
                }
            }
            // Bytes sent before the handshake would be read as if they came over TLS.
            if !plain.responses.take_rest().is_empty() {
                return Err("the mail server sent data after accepting STARTTLS".into());
            }
            let Conn { io, next_tag, .. } = plain;
            let mut secure: Mail = Conn::new(Box::new(handshake(io, config).await?) as Box<dyn Io>);
            secure.next_tag = next_tag;
            // What the server offered before TLS no longer counts (RFC 9051, 6.2.1).
            secure.ask_capabilities().await?;
            return Ok(secure);
        }
        _ => Conn::new(Box::new(tcp) as Box<dyn Io>),
    };
    mail.greeting().await?;
    if mail.capabilities.is_empty() {
        mail.ask_capabilities().await?;
    }
    Ok(mail)
}

impl<S: Io> Conn<S> {
    fn new(io: S) -> Self {
        Self {
            io,
            responses: response::Reader::default(),
            capabilities: Vec::new(),
            told_address: false,
            next_tag: 0,
        }
    }

    fn tag(&mut self) -> String {
        self.next_tag += 1;
        format!("P{}", self.next_tag)
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let written = match self.io.write_all(bytes).await {
            // TLS keeps records it could not write until flushed.
            Ok(()) => self.io.flush().await,
            Err(err) => Err(err),
        };
        written.map_err(|e| format!("writing to the mail server failed: {e}"))
    }

    /// The next complete response from the server.
    async fn response(&mut self) -> Result<Response, String> {
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            if let Some(response) = self.responses.next_response().map_err(|e| e.to_string())? {
                return Ok(response);
            }
            buf.clear();
            let read = self
                .io
                .read_buf(&mut buf)
                .await
                .map_err(|e| format!("reading from the mail server failed: {e}"))?;
            if read == 0 {
                return Err("the mail server closed the connection".into());
            }
            self.responses.push(&buf);
        }
    }

    /// Whether the server offers `capability`.
    fn offers(&self, capability: &[u8]) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }

    /// Asks the server what it can do.
    async fn ask_capabilities(&mut self) -> Result<(), String> {
        let tag = self.tag();
        self.write(format!("{tag} CAPABILITY\r\n").as_bytes())
            .await?;
        loop {
            let response = self.response().await?;
            match response.kind {
                ResponseKind::Untagged(None) => {
                    let listed = response::capabilities(&response.raw);
                    if !listed.is_empty() {
                        self.capabilities = listed;
                    }
                }
                ResponseKind::Tagged { tag: t, status } if t == tag.as_bytes() => {
                    return if status == Status::Ok {
                        Ok(())
                    } else {
                        Err("the mail server refused CAPABILITY".into())
                    };
                }
                ResponseKind::Untagged(_) => {}
                _ => return Err("the mail server answered CAPABILITY with something else".into()),
            }
        }
    }

    /// Tells a server that offers `ID` where the person connects from, once: a server that
    /// trusts the broker (Dovecot's `login_trusted_networks`) then logs, and slows down failed
    /// logins, by the person's address instead of the broker's.
    async fn tell_address(&mut self, source: SocketAddr, session: u64) -> Result<(), String> {
        if self.told_address || !self.offers(b"ID") {
            return Ok(());
        }
        self.told_address = true;
        let tag = self.tag();
        let ip = match source.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let line = format!(
            "{tag} ID (\"x-originating-ip\" \"{ip}\" \"x-originating-port\" \"{}\" \"x-session-ext-id\" \"postern-{session}\")\r\n",
            source.port()
        );
        self.write(line.as_bytes()).await?;
        loop {
            let response = self.response().await?;
            match response.kind {
                // Refused or not: the login goes on either way.
                ResponseKind::Tagged { tag: t, .. } if t == tag.as_bytes() => return Ok(()),
                ResponseKind::Untagged(Some(Status::Bye)) => {
                    return Err("the mail server said BYE".into());
                }
                ResponseKind::Untagged(_) => {}
                _ => return Err("the mail server answered ID with something else".into()),
            }
        }
    }

    /// Reads the greeting: `OK`, nothing else.
    async fn greeting(&mut self) -> Result<(), String> {
        let greeting = self.response().await?;
        match greeting.kind {
            ResponseKind::Untagged(Some(Status::Ok)) => {
                self.capabilities = response::capabilities(&greeting.raw);
                Ok(())
            }
            ResponseKind::Untagged(Some(Status::Preauth)) => Err(
                "the mail server logged the session in before any login (PREAUTH greeting); Postern does not forward such sessions".into(),
            ),
            ResponseKind::Untagged(Some(Status::Bye)) => Err(format!(
                "the mail server refused the connection: {}",
                String::from_utf8_lossy(&greeting.raw).trim_end()
            )),
            _ => Err("the mail server's greeting is not an IMAP greeting".into()),
        }
    }
}

/// How the login phase ended.
enum Phase {
    /// The server accepted a login policy allowed: relay from here, with the bytes each side
    /// sent beyond it.
    LoggedIn {
        from_client: Vec<u8>,
        from_server: Vec<u8>,
    },
    /// The session is over.
    Over(RelayEnd, Option<String>),
}

/// Serves one IMAP session: the login phase, then the watched relay.
pub(crate) async fn serve(
    session: Session<'_>,
    mut send: SendStream,
    mut recv: RecvStream,
    mut mail: Mail,
) -> Ended {
    let mut counts = (0u64, 0u64);
    let deadline = tokio::time::Instant::now() + session.gate.settings.login_timeout;
    let phase = tokio::select! {
        phase = login_phase(&session, &mut send, &mut recv, &mut mail, &mut counts) => phase,
        () = tokio::time::sleep_until(deadline) => {
            let text = format!(
                "* BYE [UNAVAILABLE] No login within {}; connect again\r\n",
                humantime::format_duration(session.gate.settings.login_timeout)
            );
            let _ = send.write_all(text.as_bytes()).await;
            Phase::Over(RelayEnd::Closed, Some("login_timeout".into()))
        }
        () = session.cut.cancelled() => {
            let text = format!("* BYE [UNAVAILABLE] {}\r\n", one_line(&(session.cut_reason)()));
            let _ = send.write_all(text.as_bytes()).await;
            Phase::Over(RelayEnd::Cancelled, None)
        }
        () = session.drain.cancelled() => {
            let _ = send.write_all(format!("* BYE [UNAVAILABLE] {DRAIN_REASON}\r\n").as_bytes()).await;
            Phase::Over(RelayEnd::Cancelled, None)
        }
    };
    let (from_client, from_server) = match phase {
        Phase::LoggedIn {
            from_client,
            from_server,
        } => (from_client, from_server),
        Phase::Over(end, reason) => {
            if matches!(end, RelayEnd::Closed) {
                let _ = send.finish();
                // Let the client read the last words before the stream goes.
                let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            } else {
                let _ = send.reset(postern_transport::reset_code(
                    postern_proto::ResetCode::Cancelled,
                ));
            }
            let _ = recv.stop(postern_transport::reset_code(
                postern_proto::ResetCode::Cancelled,
            ));
            return Ended {
                relayed: Relayed {
                    from_quic: counts.0,
                    to_quic: counts.1,
                    end,
                },
                reason,
            };
        }
    };
    let mut ended = relay(&session, send, recv, mail, from_client, from_server).await;
    ended.relayed.from_quic += counts.0;
    ended.relayed.to_quic += counts.1;
    ended
}

/// What the broker offers before login: what it implements itself.
fn capabilities(rev2: bool) -> String {
    let rev2 = if rev2 { " IMAP4rev2" } else { "" };
    format!("IMAP4rev1{rev2} SASL-IR LITERAL+ ID AUTH=PLAIN")
}

async fn login_phase(
    session: &Session<'_>,
    send: &mut SendStream,
    recv: &mut RecvStream,
    mail: &mut Mail,
    counts: &mut (u64, u64),
) -> Phase {
    let mut reader = command::Reader::new(command::Limits::default());
    let mut out = Vec::new();
    let greeting = format!(
        "* OK [CAPABILITY {}] Postern: ready for the login of {}\r\n",
        capabilities(mail.offers(b"IMAP4REV2")),
        one_line(&session.who)
    );
    out.extend_from_slice(greeting.as_bytes());
    let (mut commands, mut failures) = (0u32, 0u32);
    loop {
        if let Err(phase) = answer_client(send, &mut out, counts).await {
            return phase;
        }
        let event = match reader.next_event() {
            Some(event) => event,
            None => match recv.read_chunk(CHUNK, true).await {
                Ok(Some(chunk)) => {
                    counts.0 += chunk.bytes.len() as u64;
                    reader.push(&chunk.bytes);
                    continue;
                }
                Ok(None) => {
                    return Phase::Over(RelayEnd::Closed, Some("closed before login".into()));
                }
                Err(ReadError::Reset(code)) => {
                    return Phase::Over(RelayEnd::QuicReset(code.into_inner()), None);
                }
                Err(err) => return Phase::Over(RelayEnd::ConnectionLost(err.to_string()), None),
            },
        };
        commands += 1;
        if commands > MAX_COMMANDS_BEFORE_LOGIN {
            out.extend_from_slice(b"* BYE Too many commands before login\r\n");
            return bye(send, &out, counts, "too_many_commands").await;
        }
        let command = match event {
            Event::Continue => {
                commands -= 1;
                out.extend_from_slice(b"+ Ready for literal\r\n");
                continue;
            }
            Event::Bad { tag, reason } => {
                let tag = tag.as_ref().map_or("*", Tag::as_str);
                out.extend_from_slice(format!("{tag} BAD {reason}\r\n").as_bytes());
                continue;
            }
            Event::Fatal(reason) => {
                out.extend_from_slice(format!("* BYE {reason}\r\n").as_bytes());
                return bye(send, &out, counts, "protocol_violation").await;
            }
            // Only after `expect_sasl_response`, which is awaited below.
            Event::SaslResponse(_) => continue,
            Event::Command(command) => command,
        };
        let tag = command.tag.as_str().to_owned();
        let (user, password) = match command.kind {
            Kind::Capability => {
                let caps = capabilities(mail.offers(b"IMAP4REV2"));
                out.extend_from_slice(
                    format!("* CAPABILITY {caps}\r\n{tag} OK CAPABILITY completed\r\n").as_bytes(),
                );
                continue;
            }
            Kind::Noop => {
                out.extend_from_slice(format!("{tag} OK NOOP completed\r\n").as_bytes());
                continue;
            }
            Kind::Id => {
                out.extend_from_slice(format!("* ID NIL\r\n{tag} OK ID completed\r\n").as_bytes());
                continue;
            }
            Kind::Logout => {
                out.extend_from_slice(
                    format!("* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n").as_bytes(),
                );
                return bye(send, &out, counts, "logout").await;
            }
            Kind::StartTls => {
                out.extend_from_slice(format!("{tag} BAD STARTTLS is not available: Postern encrypts this connection already\r\n").as_bytes());
                continue;
            }
            Kind::Other(name) => {
                out.extend_from_slice(
                    format!("{tag} BAD {name} is not available before login\r\n").as_bytes(),
                );
                continue;
            }
            Kind::Authenticate { mechanism, .. } if mechanism != "PLAIN" => {
                out.extend_from_slice(
                    format!(
                        "{tag} NO [CANNOT] Postern accepts AUTHENTICATE PLAIN and LOGIN only\r\n"
                    )
                    .as_bytes(),
                );
                continue;
            }
            Kind::Authenticate { initial, .. } => {
                let response = match initial {
                    Some(initial) => initial,
                    None => {
                        out.extend_from_slice(b"+ \r\n");
                        reader.expect_sasl_response();
                        match sasl_response(send, recv, &mut reader, &mut out, counts).await {
                            Ok(response) => response,
                            Err(phase) => return phase,
                        }
                    }
                };
                if response.expose() == b"*" {
                    out.extend_from_slice(
                        format!("{tag} BAD AUTHENTICATE cancelled\r\n").as_bytes(),
                    );
                    continue;
                }
                match decode_plain(response.expose()) {
                    Ok(plain) => (plain.authcid, plain.password),
                    Err(err @ postern_imap::login::PlainError::Authzid) => {
                        (session.audit)(ImapStep::LoginDeny, None, Some(&err.to_string()), &[]);
                        out.extend_from_slice(
                            format!("{tag} NO [AUTHORIZATIONFAILED] {err}\r\n").as_bytes(),
                        );
                        continue;
                    }
                    Err(err) => {
                        out.extend_from_slice(format!("{tag} BAD {err}\r\n").as_bytes());
                        continue;
                    }
                }
            }
            Kind::Login { user, password } => (user, password),
        };
        match attempt(session, mail, &tag, &user, &password, &mut out).await {
            Attempt::Allowed => {
                if let Err(phase) = answer_client(send, &mut out, counts).await {
                    return phase;
                }
                return Phase::LoggedIn {
                    from_client: reader.take_rest(),
                    from_server: mail.responses.take_rest(),
                };
            }
            Attempt::Refused => {}
            Attempt::Failed => {
                failures += 1;
                if failures >= MAX_FAILED_LOGINS_PER_SESSION {
                    out.extend_from_slice(b"* BYE Too many failed logins on this connection\r\n");
                    return bye(send, &out, counts, "failed_logins").await;
                }
            }
            Attempt::Over(reason) => return bye(send, &out, counts, &reason).await,
        }
    }
}

/// Writes the last words and ends the login phase.
async fn bye(send: &mut SendStream, out: &[u8], counts: &mut (u64, u64), reason: &str) -> Phase {
    counts.1 += out.len() as u64;
    let _ = send.write_all(out).await;
    Phase::Over(RelayEnd::Closed, Some(reason.to_owned()))
}

/// Sends the client what the broker has to say, and empties `out`.
async fn answer_client(
    send: &mut SendStream,
    out: &mut Vec<u8>,
    counts: &mut (u64, u64),
) -> Result<(), Phase> {
    if out.is_empty() {
        return Ok(());
    }
    counts.1 += out.len() as u64;
    if send.write_all(out).await.is_err() {
        return Err(Phase::Over(
            RelayEnd::ConnectionLost("client gone".into()),
            None,
        ));
    }
    out.clear();
    Ok(())
}

/// Reads the client's answer to the `+` of an `AUTHENTICATE`.
async fn sasl_response(
    send: &mut SendStream,
    recv: &mut RecvStream,
    reader: &mut command::Reader,
    out: &mut Vec<u8>,
    counts: &mut (u64, u64),
) -> Result<Secret, Phase> {
    answer_client(send, out, counts).await?;
    loop {
        match reader.next_event() {
            Some(Event::SaslResponse(response)) => return Ok(response),
            Some(Event::Fatal(reason)) => {
                out.extend_from_slice(format!("* BYE {reason}\r\n").as_bytes());
                return Err(bye(send, out, counts, "protocol_violation").await);
            }
            Some(_) => {}
            None => match recv.read_chunk(CHUNK, true).await {
                Ok(Some(chunk)) => {
                    counts.0 += chunk.bytes.len() as u64;
                    reader.push(&chunk.bytes);
                }
                Ok(None) => {
                    return Err(Phase::Over(
                        RelayEnd::Closed,
                        Some("closed before login".into()),
                    ));
                }
                Err(err) => {
                    return Err(Phase::Over(RelayEnd::ConnectionLost(err.to_string()), None));
                }
            },
        }
    }
}

enum Attempt {
    Allowed,
    /// Refused by the broker: the password never reached the server.
    Refused,
    /// Refused by the server.
    Failed,
    /// The server went away or said BYE.
    Over(String),
}

/// One login: canonical name, lockout, policy, then the server.
async fn attempt(
    session: &Session<'_>,
    mail: &mut Mail,
    tag: &str,
    user: &[u8],
    password: &Secret,
    out: &mut Vec<u8>,
) -> Attempt {
    let mut say =
        |text: String| out.extend_from_slice(format!("{tag} {}\r\n", one_line(&text)).as_bytes());
    let canonical = match session.rules.canonical(user) {
        Ok(canonical) => canonical,
        Err(err) => {
            (session.audit)(ImapStep::LoginDeny, None, Some(&err.to_string()), &[]);
            say(format!("NO [AUTHORIZATIONFAILED] {err}"));
            return Attempt::Refused;
        }
    };
    let mailbox = Some(canonical.name.as_str());
    if let Some((left, whom)) =
        session
            .gate
            .locked(session.user, session.source.ip(), Instant::now())
    {
        let wait = humantime::format_duration(Duration::from_secs(left.as_secs().max(1)));
        let reason = format!("too many failed logins from {whom}; locked for {wait} more");
        (session.audit)(ImapStep::LoginLockout, mailbox, Some(&reason), &[]);
        say(format!(
            "NO [UNAVAILABLE] Too many failed logins from {whom}: try again in {wait}"
        ));
        return Attempt::Refused;
    }
    let policies = match (session.authorize)(&canonical) {
        Ok(policies) => policies,
        Err(denied) => {
            (session.audit)(
                ImapStep::LoginDeny,
                mailbox,
                Some(&denied.reason),
                &denied.policies,
            );
            say(format!(
                "NO [AUTHORIZATIONFAILED] {}",
                one_line(&denied.reason)
            ));
            return Attempt::Refused;
        }
    };
    if session.forward_address
        && let Err(err) = mail.tell_address(session.source, session.session_id).await
    {
        out.extend_from_slice(
            format!("{tag} NO [UNAVAILABLE] The mail server failed; try again later\r\n")
                .as_bytes(),
        );
        return Attempt::Over(err);
    }
    let ours = mail.tag();
    let answer = |response: &Response, out: &mut Vec<u8>| {
        out.extend_from_slice(&response::rewrite_capabilities(&response.raw, |c| {
            !watch::hidden(c)
        }));
    };
    if let Err(err) = mail
        .write(format!("{ours} AUTHENTICATE PLAIN\r\n").as_bytes())
        .await
    {
        return Attempt::Over(err);
    }
    let mut sent = false;
    let outcome = loop {
        let response = match mail.response().await {
            Ok(response) => response,
            Err(err) => {
                warn!(error = %err, "mail server failed during a login");
                out.extend_from_slice(
                    format!("{tag} NO [UNAVAILABLE] The mail server failed; try again later\r\n")
                        .as_bytes(),
                );
                return Attempt::Over(err);
            }
        };
        match &response.kind {
            ResponseKind::Continue if !sent => {
                let mut line = encode_plain(&canonical.name, password).0;
                line.extend_from_slice(b"\r\n");
                if let Err(err) = mail.write(&line).await {
                    return Attempt::Over(err);
                }
                sent = true;
            }
            // A second challenge PLAIN does not have: cancel.
            ResponseKind::Continue => {
                if let Err(err) = mail.write(b"*\r\n").await {
                    return Attempt::Over(err);
                }
            }
            ResponseKind::Tagged { tag: t, status } if t == ours.as_bytes() => {
                break (*status, response);
            }
            ResponseKind::Tagged { .. } => {
                out.extend_from_slice(b"* BYE The mail server answered out of turn\r\n");
                return Attempt::Over("mail server answered out of turn".into());
            }
            ResponseKind::Untagged(Some(Status::Bye)) => {
                answer(&response, out);
                return Attempt::Over("the mail server said BYE".into());
            }
            ResponseKind::Untagged(_) => answer(&response, out),
        }
    };
    let (status, response) = outcome;
    // The server's answer under the client's tag.
    let rest = &response.raw[ours.len()..];
    let mut retagged = tag.as_bytes().to_vec();
    retagged.extend_from_slice(rest);
    let retagged = Response {
        raw: retagged,
        kind: response.kind.clone(),
    };
    match status {
        Status::Ok => {
            session.gate.succeeded(session.user);
            let _ = session.logged_in.set(canonical.clone());
            // A policy change between the decision and now was re-checked without the mailbox.
            if let Err(denied) = (session.authorize)(&canonical) {
                (session.audit)(
                    ImapStep::LoginDeny,
                    mailbox,
                    Some(&denied.reason),
                    &denied.policies,
                );
                let reason = one_line(&denied.reason);
                out.extend_from_slice(
                    format!("{tag} NO [AUTHORIZATIONFAILED] {reason}\r\n* BYE [UNAVAILABLE] {reason}\r\n")
                        .as_bytes(),
                );
                return Attempt::Over("policy_denied".into());
            }
            answer(&retagged, out);
            (session.audit)(ImapStep::LoginAllow, mailbox, None, &policies);
            info!(mailbox = %canonical.name, "imap login");
            Attempt::Allowed
        }
        _ => {
            answer(&retagged, out);
            let server_said = String::from_utf8_lossy(rest).trim().to_owned();
            (session.audit)(
                ImapStep::LoginFail,
                mailbox,
                Some(&format!("the mail server refused the login: {server_said}")),
                &policies,
            );
            if let Some(lock) =
                session
                    .gate
                    .failed(session.user, session.source.ip(), Instant::now())
            {
                let reason = format!(
                    "too many failed logins; locked for {}",
                    humantime::format_duration(lock)
                );
                (session.audit)(ImapStep::LoginLockout, mailbox, Some(&reason), &[]);
            }
            debug!(mailbox = %canonical.name, "imap login refused by the server");
            Attempt::Failed
        }
    }
}

/// `text` on one line, for an IMAP response.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// What both directions of the relay share.
struct Watch {
    client: watch::Client,
    server: watch::Server,
    /// Why the session is ending, once it is.
    ending: Option<String>,
    /// Whether it ends because the client sent what Postern does not pass on.
    refused: bool,
    /// Whether the closing `* BYE` has gone out: a client that resets the stream after reading
    /// it does not change why the session ended.
    said_bye: bool,
}

/// Copies bytes both ways after login, watching both directions.
async fn relay(
    session: &Session<'_>,
    mut send: SendStream,
    mut recv: RecvStream,
    mail: Mail,
    from_client: Vec<u8>,
    from_server: Vec<u8>,
) -> Ended {
    let state = Mutex::new(Watch {
        client: watch::Client::default(),
        server: watch::Server::default(),
        ending: None,
        refused: false,
        said_bye: false,
    });
    let decided = Notify::new();
    // Cancelled when the session ends: cut from outside, or a refused command.
    let stop = session.cut.child_token();
    let (mut up_read, mut up_write) = tokio::io::split(mail.io);
    let (uploaded, downloaded) = (AtomicU64::new(0), AtomicU64::new(0));

    let upload = async {
        let mut pending = bytes::Bytes::from(from_client);
        loop {
            let mut at = 0;
            let mut out = Vec::with_capacity(pending.len());
            while at < pending.len() {
                let notified = decided.notified();
                out.clear();
                let (taken, stop_at) = lock(&state).client.feed(&pending[at..], &mut out);
                at += taken;
                if !out.is_empty() {
                    up_write
                        .write_all(&out)
                        .await
                        .map_err(|e| RelayEnd::TcpFailed(e.kind()))?;
                    // TLS keeps records it could not write until flushed.
                    up_write
                        .flush()
                        .await
                        .map_err(|e| RelayEnd::TcpFailed(e.kind()))?;
                    uploaded.fetch_add(out.len() as u64, Ordering::Relaxed);
                }
                let reason = match stop_at {
                    None => continue,
                    Some(watch::Stop::Await) => {
                        tokio::select! {
                            () = notified => {}
                            () = stop.cancelled() => return Ok(()),
                        }
                        continue;
                    }
                    Some(watch::Stop::Forbidden(name, why)) => {
                        format!("{name} is not available through Postern: it {why}")
                    }
                    Some(watch::Stop::Malformed(what)) => {
                        format!("Postern ended the session: {what}")
                    }
                };
                (session.audit)(
                    ImapStep::CommandRefuse,
                    session.logged_in.get().map(|c| c.name.as_str()),
                    Some(&reason),
                    &[],
                );
                {
                    let mut state = lock(&state);
                    state.ending = Some(reason);
                    state.refused = true;
                }
                stop.cancel();
                return Ok(());
            }
            let chunk = tokio::select! {
                chunk = recv.read_chunk(CHUNK, true) => chunk,
                () = stop.cancelled() => return Ok(()),
            };
            match chunk {
                Ok(Some(chunk)) => pending = chunk.bytes,
                Ok(None) => {
                    let _ = up_write.shutdown().await;
                    return Ok(());
                }
                Err(ReadError::Reset(code)) => return Err(RelayEnd::QuicReset(code.into_inner())),
                Err(err) => return Err(RelayEnd::ConnectionLost(err.to_string())),
            }
        }
    };

    let download = async {
        let mut out = Vec::new();
        // What the server sent behind its login answer comes first.
        let mut buf = BytesMut::from(&from_server[..]);
        let mut unread = !buf.is_empty();
        // Reads start small and grow when the server sends more than fits: a fetch reads in
        // large pieces, and a session quiet for a moment goes back to a small buffer.
        let mut want = SMALL_CHUNK;
        let mut ending_since: Option<tokio::time::Instant> = None;
        let mut draining = false;
        loop {
            if !std::mem::take(&mut unread) {
                buf.clear();
                if buf.capacity() < want {
                    buf = BytesMut::with_capacity(want);
                }
                let grace = ending_since.map(|since| since + BYE_GRACE);
                tokio::select! {
                    read = up_read.read_buf(&mut buf) => match read {
                        Ok(0) => {
                            let _ = send.finish();
                            return Ok(());
                        }
                        Ok(read) if read >= want => want = CHUNK,
                        Ok(_) => {}
                        Err(e) => return Err(RelayEnd::TcpFailed(e.kind())),
                    },
                    // Nothing read: whether a BYE can go now is decided below.
                    () = stop.cancelled(), if ending_since.is_none() => {
                        if session.cut.is_cancelled() {
                            lock(&state).ending.get_or_insert_with(|| (session.cut_reason)());
                        }
                        ending_since = Some(tokio::time::Instant::now());
                    }
                    // Ends at the next boundary, whenever that is within the grace period:
                    // a response in flight is not cut short.
                    () = session.drain.cancelled(), if !draining && ending_since.is_none() => {
                        draining = true;
                        lock(&state).ending.get_or_insert_with(|| DRAIN_REASON.to_owned());
                    }
                    // Nothing read: an empty buffer goes through below.
                    () = tokio::time::sleep(QUIET), if want > SMALL_CHUNK => {
                        want = SMALL_CHUNK;
                        buf = BytesMut::new();
                        out = Vec::new();
                    }
                    () = async { match grace { Some(g) => tokio::time::sleep_until(g).await, None => std::future::pending().await } } => {
                        // The response in flight did not end in time: no BYE can be placed.
                        return Ok(());
                    }
                }
            }
            let bye = {
                let mut guard = lock(&state);
                let Watch {
                    client,
                    server,
                    ending,
                    refused: _,
                    said_bye,
                } = &mut *guard;
                out.clear();
                server.feed(&buf, &mut out, client);
                let bye = ending.clone().filter(|_| server.at_boundary());
                *said_bye = bye.is_some();
                bye
            };
            decided.notify_waiters();
            if let Some(reason) = &bye {
                out.extend_from_slice(
                    format!("* BYE [UNAVAILABLE] {}\r\n", one_line(reason)).as_bytes(),
                );
            }
            if !out.is_empty() {
                send.write_all(&out).await.map_err(|e| match e {
                    quinn::WriteError::Stopped(code) => RelayEnd::QuicStopped(code.into_inner()),
                    other => RelayEnd::ConnectionLost(other.to_string()),
                })?;
                downloaded.fetch_add(out.len() as u64, Ordering::Relaxed);
            }
            if bye.is_some() {
                let _ = send.finish();
                let _ = tokio::time::timeout(BYE_GRACE, send.stopped()).await;
                return Ok(());
            }
        }
    };

    let end = {
        tokio::pin!(upload, download);
        let (mut upload_done, mut download_done) = (false, false);
        // Once the server has closed, the client gets a moment to close its side too.
        let mut closed_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                result = &mut upload, if !upload_done => match result {
                    Ok(()) if download_done => break RelayEnd::Closed,
                    Ok(()) => upload_done = true,
                    // Writing to a server that has closed: the session is over anyway.
                    Err(_) if download_done => break RelayEnd::Closed,
                    // The client went after reading the BYE: the session ended as the BYE said.
                    Err(_) if lock(&state).said_bye => break RelayEnd::Cancelled,
                    Err(end) => break end,
                },
                result = &mut download, if !download_done => match result {
                    Ok(()) if lock(&state).ending.is_some() => break RelayEnd::Cancelled,
                    Ok(()) if upload_done => break RelayEnd::Closed,
                    Ok(()) => {
                        download_done = true;
                        closed_at = Some(tokio::time::Instant::now() + BYE_GRACE);
                    }
                    Err(end) => break end,
                },
                () = async {
                    match closed_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => break RelayEnd::Closed,
            }
        }
    };
    let reason = lock(&state).refused.then(|| "refused_command".to_owned());
    if !matches!(end, RelayEnd::Closed) {
        let _ = recv.stop(postern_transport::reset_code(
            postern_proto::ResetCode::Cancelled,
        ));
    }
    Ended {
        relayed: Relayed {
            from_quic: uploaded.into_inner(),
            to_quic: downloaded.into_inner(),
            end,
        },
        reason,
    }
}
