//! The audit trail: every decision and session end as one JSON line.
//!
//! Events use Elastic Common Schema field names where one exists and `postern.*` otherwise,
//! carry a sequence number per process (`event.sequence`, with `service.ephemeral_id` naming
//! the process) so that a gap is visible, and go to their own sink, which log levels do not
//! touch.
//!
//! One thread writes the sink, so that a slow disk or a stalled standard output never blocks
//! the tasks that serve connections, and numbers lines in the order they are written. Events
//! that must be on record before the broker acts on them are acknowledged; others are queued,
//! and if the queue overflows the loss itself is recorded (`audit.gap`).

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use postern_certs::{Identity, VerifiedClient};
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;

use crate::config::AuditTarget;

/// Events waiting for the writer before new ones are dropped (and the gap recorded).
const QUEUE: usize = 4096;

/// Time an acknowledged event may wait for the writer.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Where audit events are written.
pub struct Audit {
    queue: Option<SyncSender<Record>>,
    dropped: Arc<AtomicU64>,
    writer: Mutex<Option<JoinHandle<()>>>,
    ephemeral_id: String,
}

/// One rendered event on its way to the writer.
struct Record {
    event: Value,
    ack: Ack,
}

/// Who waits to learn that an event was written.
enum Ack {
    /// Nobody: a failure is logged.
    None,
    /// A task.
    Task(oneshot::Sender<io::Result<()>>),
    /// A thread outside any async runtime.
    Thread(SyncSender<io::Result<()>>),
}

/// Something the broker decided or observed, for the audit trail.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// The broker started serving.
    BrokerStart {
        /// The bound address.
        listen: SocketAddr,
        /// Policies in force.
        policies: usize,
        /// Configured services.
        services: Vec<String>,
    },
    /// The broker began to drain (SIGTERM): no new connections, open sessions may finish.
    BrokerDrain {
        /// Sessions open when the drain began.
        sessions: usize,
        /// Time they get to finish.
        grace: Duration,
    },
    /// The broker stopped.
    BrokerStop {
        /// Why.
        reason: &'a str,
        /// Sessions still open when the grace period ended, cut.
        sessions_cut: usize,
    },
    /// A connection was refused before it could carry anything.
    ConnectionDeny {
        /// Where it came from.
        source: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A tunnel connection was accepted for a verified identity.
    ConnectionOpen {
        /// Broker-local id.
        connection: u64,
        /// Where it came from.
        source: SocketAddr,
        /// The verified certificate.
        client: &'a VerifiedClient,
    },
    /// A tunnel connection moved to a new network path (QUIC connection migration): its sessions
    /// are asked again with the new source address.
    ConnectionMigrate {
        /// Broker-local id.
        connection: u64,
        /// The previous address.
        from: SocketAddr,
        /// The new address.
        to: SocketAddr,
        /// Who.
        identity: &'a Identity,
    },
    /// A tunnel connection ended.
    ConnectionClose {
        /// Broker-local id.
        connection: u64,
        /// Where it came from.
        source: SocketAddr,
        /// Who.
        identity: &'a Identity,
        /// How long it lasted.
        duration: Duration,
        /// Why it ended.
        reason: String,
    },
    /// A stream asked for a service and was allowed.
    ConnectAllow(Connect<'a>),
    /// A stream asked for a service and was refused.
    ConnectDeny {
        /// The request.
        connect: Connect<'a>,
        /// The refusal code sent to the agent.
        code: &'static str,
        /// Why.
        reason: String,
    },
    /// An allowed session ended.
    SessionClose {
        /// The request that opened it.
        connect: Connect<'a>,
        /// Bytes from the agent to the service.
        bytes_from_client: u64,
        /// Bytes from the service to the agent.
        bytes_to_client: u64,
        /// How long it lasted.
        duration: Duration,
        /// Why it ended.
        reason: &'a str,
    },
    /// A re-check found a live session no longer allowed and ended it.
    SessionDeny {
        /// The request that opened it.
        connect: Connect<'a>,
        /// `policy` or `revoked`.
        kind: &'static str,
        /// Why, for people.
        reason: &'a str,
        /// The policy generation that decided.
        generation: u64,
        /// What made the broker ask again: `change` or `timer`.
        trigger: &'static str,
    },
    /// A step of an IMAP session the broker checks: a login and its outcome, or a command it
    /// refused after login.
    Imap {
        /// The request that opened the session.
        connect: Connect<'a>,
        /// What happened.
        step: ImapStep,
        /// The canonical login name, when the step has one.
        mailbox: Option<&'a str>,
        /// Why, for people.
        reason: Option<&'a str>,
    },
    /// Policies, entities or revocations changed and the new version is in force.
    PolicyReload {
        /// The new generation.
        generation: u64,
        /// Policies in force.
        policies: usize,
        /// Users and groups in entities.json.
        entities: usize,
        /// Revocations in force.
        revocations: usize,
        /// `file change` or `sighup`.
        trigger: &'a str,
    },
    /// A changed policy folder was refused; the previous version stays in force.
    PolicyReject {
        /// The generation still in force.
        generation: u64,
        /// What is wrong, per file.
        problems: &'a [String],
        /// Refusals since the broker started.
        rejected_total: u64,
    },
    /// An administrator added or removed a revocation.
    Revocation {
        /// What.
        target: &'a crate::revoke::Target,
        /// Added (`true`) or removed.
        added: bool,
        /// Why, as written.
        reason: &'a str,
    },
    /// A login, renewal or logout: allowed or refused, and why.
    Login(Login<'a>),
    /// An administrator issued a certificate with `postern-broker issue`.
    CertificateIssue {
        /// The identity certified.
        identity: &'a Identity,
        /// Serial number, hex.
        serial: String,
        /// End of validity.
        not_after: SystemTime,
        /// Whether the key was made by the broker (`false`: from a signing request).
        key_generated: bool,
    },
}

/// What an [`Event::Imap`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImapStep {
    /// Policy allowed the login and the server accepted the password.
    LoginAllow,
    /// The broker refused the login before it reached the server: policy, a login name it
    /// cannot check, or an authorization identity.
    LoginDeny,
    /// The server refused the password.
    LoginFail,
    /// The person or address is locked out after failed logins.
    LoginLockout,
    /// A command that would undo the login binding ended the session.
    CommandRefuse,
}

/// A stream's request for a service, as audited.
#[derive(Debug, Clone, Copy)]
pub struct Connect<'a> {
    /// Broker-local connection id.
    pub connection: u64,
    /// Broker-local session (stream) id.
    pub session: u64,
    /// Where the connection comes from.
    pub source: SocketAddr,
    /// Who.
    pub identity: &'a Identity,
    /// The service named, as the agent sent it.
    pub service: &'a str,
    /// The policies that determined the decision.
    pub policies: &'a [String],
    /// Policy evaluation errors.
    pub errors: &'a [String],
}

/// What the audit trail records about a login, renewal or logout.
#[derive(Debug, Clone)]
pub struct Login<'a> {
    /// `enroll`, `renew` or `logout`.
    pub operation: &'static str,
    /// Whether it succeeded.
    pub allowed: bool,
    /// Where the enrollment connection came from.
    pub source: SocketAddr,
    /// The login flow, such as `device_code`.
    pub flow: &'static str,
    /// The identity, once known: certified on success, claimed by the ID token on refusal.
    pub identity: Option<&'a Identity>,
    /// The broker-assigned device id, once assigned (also before the identity is known).
    pub device: Option<postern_certs::DeviceId>,
    /// The failure code sent to the agent.
    pub code: Option<&'static str>,
    /// Why it failed, in full (the agent may get a shorter sentence).
    pub reason: Option<String>,
    /// Policies that decided.
    pub policies: &'a [String],
    /// Policy evaluation errors.
    pub policy_errors: &'a [String],
    /// The certificate issued: serial (hex) and end of validity.
    pub certificate: Option<(String, SystemTime)>,
    /// When the login ends.
    pub session_ends: Option<SystemTime>,
    /// Whether the IdP revoked the refresh token (logout).
    pub revoked: Option<bool>,
}

impl Audit {
    /// Opens the sink: a file is created if needed (mode 0600) and appended to.
    pub fn open(target: &AuditTarget) -> io::Result<Self> {
        let sink: Box<dyn Write + Send> = match target {
            AuditTarget::Stdout => Box::new(io::stdout()),
            AuditTarget::File(path) => {
                let mut options = OpenOptions::new();
                options.append(true).create(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                Box::new(options.open(path)?)
            }
        };
        Self::with_sink(sink)
    }

    /// An audit trail writing to `sink`.
    pub fn with_sink(sink: Box<dyn Write + Send>) -> io::Result<Self> {
        Self::with_queue(sink, QUEUE)
    }

    fn with_queue(sink: Box<dyn Write + Send>, capacity: usize) -> io::Result<Self> {
        let ephemeral_id = postern_certs::RandomId::generate()
            .map(|id| id.to_string())
            .unwrap_or_default();
        let (queue, records) = mpsc::sync_channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = {
            let (dropped, ephemeral_id) = (dropped.clone(), ephemeral_id.clone());
            std::thread::Builder::new()
                .name("audit".into())
                .spawn(move || write_records(sink, &records, &dropped, &ephemeral_id))?
        };
        Ok(Self {
            queue: Some(queue),
            dropped,
            writer: Mutex::new(Some(writer)),
            ephemeral_id,
        })
    }

    /// Writes one event and waits until it is written and flushed: for decisions the broker
    /// acts on only once they are on record.
    pub async fn record(&self, event: &Event<'_>) -> io::Result<()> {
        let (ack, written) = oneshot::channel();
        self.enqueue(event, Ack::Task(ack))?;
        match tokio::time::timeout(ACK_TIMEOUT, written).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(io::Error::other("the audit writer stopped")),
            Err(_) => Err(io::Error::other(
                "the audit trail did not accept the event in time",
            )),
        }
    }

    /// Like [`record`](Self::record), blocking the calling thread (command-line tools).
    pub fn record_blocking(&self, event: &Event<'_>) -> io::Result<()> {
        let (ack, written) = mpsc::sync_channel(1);
        self.enqueue(event, Ack::Thread(ack))?;
        written
            .recv_timeout(ACK_TIMEOUT)
            .map_err(|_| io::Error::other("the audit trail did not accept the event in time"))?
    }

    /// Queues one event that reports what already happened. If the queue is full the event is
    /// lost, counted, and the gap recorded once the writer catches up.
    pub fn record_or_log(&self, event: &Event<'_>) {
        if let Err(err) = self.enqueue(event, Ack::None) {
            tracing::error!(error = %err, event = event.action(), "cannot queue an audit event");
        }
    }

    fn enqueue(&self, event: &Event<'_>, ack: Ack) -> io::Result<()> {
        let queue = self
            .queue
            .as_ref()
            .ok_or_else(|| io::Error::other("the audit trail is closed"))?;
        match queue.try_send(Record {
            event: self.render(event),
            ack,
        }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Err(io::Error::other(
                    "the audit queue is full: the sink is too slow or stalled",
                ))
            }
            Err(TrySendError::Disconnected(_)) => Err(io::Error::other("the audit writer stopped")),
        }
    }

    /// The event as ECS JSON, without its sequence number (the writer adds it).
    fn render(&self, event: &Event<'_>) -> Value {
        let mut out = envelope(
            &self.ephemeral_id,
            event.action(),
            event.category(),
            event.outcome(),
        );
        let fields = match event {
            Event::BrokerStart {
                listen,
                policies,
                services,
            } => json!({
                "server": { "address": listen.to_string(), "port": listen.port() },
                "postern": { "policies_loaded": policies, "services": services },
            }),
            Event::BrokerDrain { sessions, grace } => json!({
                "postern": { "sessions": sessions, "grace_seconds": grace.as_secs() },
            }),
            Event::BrokerStop {
                reason,
                sessions_cut,
            } => json!({
                "event": { "reason": reason },
                "postern": { "sessions_cut": sessions_cut },
            }),
            Event::ConnectionDeny { source, reason } => json!({
                "source": address(*source),
                "event": { "reason": reason },
            }),
            Event::ConnectionOpen {
                connection,
                source,
                client,
            } => json!({
                "source": address(*source),
                "user": user(&client.identity),
                "tls": { "client": {
                    "x509": { "serial_number": client.serial },
                    "hash": { "sha256": client.fingerprint },
                    "not_before": postern_certs::rfc3339(client.not_before),
                    "not_after": postern_certs::rfc3339(client.not_after),
                }},
                "postern": authentication(&client.identity, Some(*connection)),
            }),
            Event::ConnectionMigrate {
                connection,
                from,
                to,
                identity,
            } => json!({
                "source": address(*to),
                "user": user(identity),
                "postern": { "connection_id": connection, "previous_source": address(*from) },
            }),
            Event::ConnectionClose {
                connection,
                source,
                identity,
                duration,
                reason,
            } => json!({
                "source": address(*source),
                "user": user(identity),
                "event": { "reason": reason, "duration": nanos(*duration) },
                "postern": { "connection_id": connection },
            }),
            Event::ConnectAllow(connect) => connect_fields(connect),
            Event::ConnectDeny {
                connect,
                code,
                reason,
            } => {
                let mut fields = connect_fields(connect);
                merge(
                    &mut fields,
                    json!({ "event": { "reason": reason }, "postern": { "refuse_code": code } }),
                );
                fields
            }
            Event::SessionClose {
                connect,
                bytes_from_client,
                bytes_to_client,
                duration,
                reason,
            } => {
                let mut fields = connect_fields(connect);
                merge(
                    &mut fields,
                    json!({
                        "source": { "bytes": bytes_from_client },
                        "destination": { "bytes": bytes_to_client },
                        "event": { "reason": reason, "duration": nanos(*duration) },
                    }),
                );
                fields
            }
            Event::SessionDeny {
                connect,
                kind,
                reason,
                generation,
                trigger,
            } => {
                let mut fields = connect_fields(connect);
                merge(
                    &mut fields,
                    json!({
                        "event": { "reason": reason },
                        "postern": { "end": kind, "policy_generation": generation, "recheck": trigger },
                    }),
                );
                fields
            }
            Event::Imap {
                connect,
                step: _,
                mailbox,
                reason,
            } => {
                let mut fields = connect_fields(connect);
                merge(&mut fields, json!({ "postern": { "mailbox": mailbox } }));
                if let Some(reason) = reason {
                    merge(&mut fields, json!({ "event": { "reason": reason } }));
                }
                fields
            }
            Event::PolicyReload {
                generation,
                policies,
                entities,
                revocations,
                trigger,
            } => json!({
                "event": { "reason": trigger },
                "postern": {
                    "policy_generation": generation,
                    "policies_loaded": policies,
                    "entities_loaded": entities,
                    "revocations": revocations,
                },
            }),
            Event::PolicyReject {
                generation,
                problems,
                rejected_total,
            } => json!({
                "event": { "reason": problems.join("\n") },
                "postern": {
                    "policy_generation": generation,
                    "problems": problems,
                    "rejected_total": rejected_total,
                },
            }),
            Event::Revocation {
                target,
                added: _,
                reason,
            } => {
                let (kind, id) = match target {
                    crate::revoke::Target::User(user) => ("user", user.uri()),
                    crate::revoke::Target::Lineage(lineage) => ("lineage", lineage.to_string()),
                    crate::revoke::Target::Device(device) => ("device", device.to_string()),
                };
                let mut fields = json!({
                    "event": { "reason": reason },
                    "postern": { "revoked": { "kind": kind, "id": id } },
                });
                if let crate::revoke::Target::User(user) = target {
                    fields["user"] = json!({ "id": user.uri() });
                }
                fields
            }
            Event::Login(login) => {
                let mut postern = json!({ "operation": login.operation, "flow": login.flow });
                if let Some(identity) = login.identity {
                    merge(&mut postern, authentication(identity, None));
                    if let Some(acr) = &identity.auth.acr {
                        postern["acr"] = json!(acr);
                    }
                }
                if let Some(device) = login.device {
                    postern["device"] = json!(device.to_string());
                }
                if let Some(code) = login.code {
                    postern["code"] = json!(code);
                }
                if !login.policies.is_empty() || !login.policy_errors.is_empty() {
                    postern["policies"] = json!(login.policies);
                    postern["policy_errors"] = json!(login.policy_errors);
                }
                if let Some(ends) = login.session_ends {
                    postern["session_ends"] = json!(postern_certs::rfc3339(ends));
                }
                if let Some(revoked) = login.revoked {
                    postern["refresh_token_revoked"] = json!(revoked);
                }
                let mut fields = json!({ "source": address(login.source), "postern": postern });
                if let Some(identity) = login.identity {
                    fields["user"] = user(identity);
                }
                if let Some(reason) = &login.reason {
                    fields["event"] = json!({ "reason": reason });
                }
                if let Some((serial, not_after)) = &login.certificate {
                    fields["x509"] = json!({ "serial_number": serial, "not_after": postern_certs::rfc3339(*not_after) });
                }
                fields
            }
            Event::CertificateIssue {
                identity,
                serial,
                not_after,
                key_generated,
            } => json!({
                "user": user(identity),
                "x509": { "serial_number": serial, "not_after": postern_certs::rfc3339(*not_after) },
                "postern": {
                    "issuance": identity.auth.issuance.kind(),
                    "lineage": identity.auth.lineage.to_string(),
                    "device": identity.auth.device.to_string(),
                    "key_generated": key_generated,
                },
            }),
        };
        merge(&mut out, fields);
        out
    }
}

impl Drop for Audit {
    /// Closes the queue and waits until everything queued is written.
    fn drop(&mut self) {
        self.queue = None;
        if let Some(writer) = self.writer.get_mut().ok().and_then(Option::take) {
            let _ = writer.join();
        }
    }
}

/// The writer thread: numbers and writes records until the queue closes.
fn write_records(
    mut sink: Box<dyn Write + Send>,
    records: &Receiver<Record>,
    dropped: &AtomicU64,
    ephemeral_id: &str,
) {
    let mut sequence = 0u64;
    // After a failed write the line may be cut short: start the next on a new line.
    let mut broken = false;
    let mut write = |mut event: Value, sink: &mut Box<dyn Write + Send>| -> io::Result<()> {
        sequence += 1;
        event["event"]["sequence"] = json!(sequence);
        let mut line = if broken { vec![b'\n'] } else { Vec::new() };
        serde_json::to_writer(&mut line, &event).map_err(io::Error::other)?;
        line.push(b'\n');
        let result = sink.write_all(&line).and_then(|()| sink.flush());
        broken = result.is_err();
        result
    };
    for record in records {
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let mut gap = envelope(ephemeral_id, "audit.gap", &["process"], "failure");
            merge(&mut gap, json!({ "postern": { "events_lost": lost } }));
            if let Err(err) = write(gap, &mut sink) {
                tracing::error!(error = %err, "cannot write the audit trail");
            }
        }
        let result = write(record.event, &mut sink);
        match record.ack {
            Ack::Task(ack) => {
                let _ = ack.send(result);
            }
            Ack::Thread(ack) => {
                let _ = ack.send(result);
            }
            Ack::None => {
                if let Err(err) = result {
                    tracing::error!(error = %err, "cannot write the audit trail");
                }
            }
        }
    }
}

/// The fields every event has.
fn envelope(ephemeral_id: &str, action: &str, category: &[&str], outcome: &str) -> Value {
    let timestamp = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    json!({
        "@timestamp": timestamp,
        "ecs": { "version": "8.11.0" },
        "service": { "type": "postern-broker", "ephemeral_id": ephemeral_id },
        "event": { "kind": "event", "action": action, "category": category, "outcome": outcome },
    })
}

impl fmt::Debug for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Audit")
            .field("ephemeral_id", &self.ephemeral_id)
            .finish_non_exhaustive()
    }
}

impl Event<'_> {
    /// The stable dotted name of the event.
    pub fn action(&self) -> &'static str {
        match self {
            Event::BrokerStart { .. } => "broker.start",
            Event::BrokerDrain { .. } => "broker.drain",
            Event::BrokerStop { .. } => "broker.stop",
            Event::ConnectionDeny { .. } => "connection.deny",
            Event::ConnectionOpen { .. } => "connection.open",
            Event::ConnectionMigrate { .. } => "connection.migrate",
            Event::ConnectionClose { .. } => "connection.close",
            Event::ConnectAllow(_) => "connect.allow",
            Event::ConnectDeny { .. } => "connect.deny",
            Event::SessionClose { .. } => "session.close",
            Event::SessionDeny { .. } => "session.deny",
            Event::Imap { step, .. } => match step {
                ImapStep::LoginAllow => "imap_login.allow",
                ImapStep::LoginDeny => "imap_login.deny",
                ImapStep::LoginFail => "imap_login.fail",
                ImapStep::LoginLockout => "imap_login.lockout",
                ImapStep::CommandRefuse => "imap.refuse",
            },
            Event::PolicyReload { .. } => "policy.reload",
            Event::PolicyReject { .. } => "policy.reject",
            Event::Revocation { added: true, .. } => "revocation.add",
            Event::Revocation { added: false, .. } => "revocation.remove",
            Event::CertificateIssue { .. } => "cert.issue",
            Event::Login(login) => match (login.operation, login.allowed) {
                ("enroll", true) => "enroll.allow",
                ("enroll", false) => "enroll.deny",
                ("renew", true) => "renew.allow",
                ("renew", false) => "renew.deny",
                (_, true) => "logout",
                (_, false) => "logout.deny",
            },
        }
    }

    fn category(&self) -> &'static [&'static str] {
        match self {
            Event::BrokerStart { .. } | Event::BrokerDrain { .. } | Event::BrokerStop { .. } => {
                &["process"]
            }
            Event::ConnectionDeny { .. } | Event::ConnectionOpen { .. } => {
                &["authentication", "network"]
            }
            Event::CertificateIssue { .. } => &["iam"],
            Event::PolicyReload { .. } | Event::PolicyReject { .. } => &["configuration"],
            Event::Revocation { .. } => &["iam"],
            Event::Login(_) => &["authentication", "iam"],
            Event::Imap { .. } => &["authentication", "network"],
            _ => &["network"],
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            Event::ConnectionDeny { .. }
            | Event::ConnectDeny { .. }
            | Event::SessionDeny { .. }
            | Event::PolicyReject { .. } => "failure",
            Event::Login(login) if !login.allowed => "failure",
            Event::Imap { step, .. } if *step != ImapStep::LoginAllow => "failure",
            _ => "success",
        }
    }
}

fn connect_fields(connect: &Connect<'_>) -> Value {
    let mut fields = json!({
        "source": address(connect.source),
        "user": user(connect.identity),
        "postern": authentication(connect.identity, Some(connect.connection)),
    });
    merge(
        &mut fields,
        json!({ "postern": {
            "session_id": connect.session,
            "service": connect.service,
            "policies": connect.policies,
            "policy_errors": connect.errors,
        }}),
    );
    fields
}

fn user(identity: &Identity) -> Value {
    let mut user = json!({ "id": identity.user.uri() });
    if let Some(email) = &identity.email {
        user["email"] = json!(email);
    }
    if let Some(name) = &identity.name {
        user["full_name"] = json!(name);
    }
    if !identity.groups.is_empty() {
        user["roles"] = json!(identity.groups);
    }
    user
}

fn authentication(identity: &Identity, connection: Option<u64>) -> Value {
    let auth = &identity.auth;
    let mut fields = json!({
        "issuance": auth.issuance.kind(),
        "amr": auth.amr,
        "auth_time": postern_certs::rfc3339(auth.auth_time),
        "lineage": auth.lineage.to_string(),
        "device": auth.device.to_string(),
    });
    if let Some(connection) = connection {
        fields["connection_id"] = json!(connection);
    }
    fields
}

fn address(addr: SocketAddr) -> Value {
    let ip = match addr.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr.ip(), std::net::IpAddr::V4),
        v4 => v4,
    };
    json!({ "ip": ip.to_string(), "port": addr.port() })
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Merges `extra` into `base`, recursing into objects present in both.
fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(base), Value::Object(extra)) => merge_maps(base, extra),
        (base, extra) => *base = extra,
    }
}

fn merge_maps(base: &mut Map<String, Value>, extra: Map<String, Value>) {
    for (key, value) in extra {
        match base.get_mut(&key) {
            Some(existing) => merge(existing, value),
            None => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn events_are_numbered_ecs_json_lines() {
        let buffer = Shared::default();
        let audit = Audit::with_sink(Box::new(buffer.clone())).unwrap();
        let identity = postern_certs::testdata::alice(SystemTime::now());
        let source: SocketAddr = "[::ffff:192.0.2.9]:5000".parse().unwrap();
        let policies = vec!["allow-staff".to_owned()];
        let connect = Connect {
            connection: 1,
            session: 7,
            source,
            identity: &identity,
            service: "imap",
            policies: &policies,
            errors: &[],
        };
        audit
            .record_blocking(&Event::ConnectAllow(connect))
            .unwrap();
        audit
            .record_blocking(&Event::SessionClose {
                connect,
                bytes_from_client: 10,
                bytes_to_client: 20,
                duration: Duration::from_millis(1500),
                reason: "closed",
            })
            .unwrap();

        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"]["action"], "connect.allow");
        assert_eq!(lines[0]["event"]["sequence"], 1);
        assert_eq!(lines[0]["source"]["ip"], "192.0.2.9");
        assert_eq!(lines[0]["user"]["id"], "https://idp.example.org#alice-0001");
        assert_eq!(lines[0]["postern"]["policies"][0], "allow-staff");
        assert_eq!(lines[0]["postern"]["issuance"], "login");
        assert_eq!(lines[1]["event"]["sequence"], 2);
        assert_eq!(lines[1]["event"]["duration"], 1_500_000_000u64);
        assert_eq!(lines[1]["source"]["bytes"], 10);
        assert_eq!(
            lines[1]["source"]["ip"], "192.0.2.9",
            "merging keeps both halves of `source`"
        );
        assert_eq!(lines[1]["destination"]["bytes"], 20);
        assert_eq!(
            lines[0]["service"]["ephemeral_id"],
            lines[1]["service"]["ephemeral_id"]
        );
    }

    /// A sink that holds every write until it is opened.
    struct Gate {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        inner: Shared,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, opened) = &*self.open;
            let _open = opened
                .wait_while(lock.lock().unwrap(), |open| !*open)
                .unwrap();
            self.inner.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_loses_events_visibly_and_never_blocks_the_caller() {
        let buffer = Shared::default();
        let open = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let gate = Gate {
            open: open.clone(),
            inner: buffer.clone(),
        };
        let audit = Audit::with_queue(Box::new(gate), 4).unwrap();
        let event = Event::BrokerStop {
            reason: "test",
            sessions_cut: 0,
        };
        for _ in 0..20 {
            audit.record_or_log(&event); // returns at once however stalled the sink is
        }
        assert!(
            audit.record_blocking(&event).is_err(),
            "an event that must be on record is refused, not delayed"
        );
        *open.0.lock().unwrap() = true;
        open.1.notify_all();
        drop(audit); // waits until everything queued is written

        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let sequences: Vec<u64> = lines
            .iter()
            .map(|l| l["event"]["sequence"].as_u64().unwrap())
            .collect();
        assert_eq!(
            sequences,
            (1..=sequences.len() as u64).collect::<Vec<_>>(),
            "numbered in write order"
        );
        // One gap event, or several when the writer caught up in between.
        let lost: u64 = lines
            .iter()
            .filter(|l| l["event"]["action"] == "audit.gap")
            .map(|gap| gap["postern"]["events_lost"].as_u64().unwrap())
            .sum();
        assert!(lost > 0, "the loss is recorded");
        let written = lines
            .iter()
            .filter(|l| l["event"]["action"] == "broker.stop")
            .count() as u64;
        assert_eq!(lost + written, 21, "every event is written or counted");
    }
}
