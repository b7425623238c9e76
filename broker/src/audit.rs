//! The audit trail: every decision and session end as one JSON line.
//!
//! Events use Elastic Common Schema field names where one exists and `postern.*` otherwise,
//! carry a sequence number per process (`event.sequence`, with `service.ephemeral_id` naming
//! the process) so that a gap is visible, and go to their own sink, which log levels do not
//! touch.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use postern_certs::{Identity, VerifiedClient};
use serde_json::{Map, Value, json};

use crate::config::AuditTarget;

/// Where audit events are written.
pub struct Audit {
    sink: Mutex<Box<dyn Write + Send>>,
    sequence: AtomicU64,
    ephemeral_id: String,
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
        Ok(Self::with_sink(sink))
    }

    /// An audit trail writing to `sink`.
    pub fn with_sink(sink: Box<dyn Write + Send>) -> Self {
        let ephemeral_id = postern_certs::RandomId::generate()
            .map(|id| id.to_string())
            .unwrap_or_default();
        Self {
            sink: Mutex::new(sink),
            sequence: AtomicU64::new(0),
            ephemeral_id,
        }
    }

    /// Writes one event and flushes it.
    pub fn record(&self, event: &Event<'_>) -> io::Result<()> {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed) + 1;
        let mut line =
            serde_json::to_vec(&self.render(event, sequence)).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut sink = self
            .sink
            .lock()
            .map_err(|_| io::Error::other("audit sink poisoned"))?;
        sink.write_all(&line)?;
        sink.flush()
    }

    /// Writes one event; a failure is logged, for events that report what already happened.
    pub fn record_or_log(&self, event: &Event<'_>) {
        if let Err(err) = self.record(event) {
            tracing::error!(error = %err, event = event.action(), "cannot write the audit trail");
        }
    }

    fn render(&self, event: &Event<'_>, sequence: u64) -> Value {
        let timestamp = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut out = json!({
            "@timestamp": timestamp,
            "ecs": { "version": "8.11.0" },
            "service": { "type": "postern-broker", "ephemeral_id": self.ephemeral_id },
            "event": {
                "kind": "event",
                "action": event.action(),
                "category": event.category(),
                "outcome": event.outcome(),
                "sequence": sequence,
            },
        });
        let fields = match event {
            Event::BrokerStart {
                listen,
                policies,
                services,
            } => json!({
                "server": { "address": listen.to_string(), "port": listen.port() },
                "postern": { "policies_loaded": policies, "services": services },
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
            Event::BrokerStop { .. } => "broker.stop",
            Event::ConnectionDeny { .. } => "connection.deny",
            Event::ConnectionOpen { .. } => "connection.open",
            Event::ConnectionClose { .. } => "connection.close",
            Event::ConnectAllow(_) => "connect.allow",
            Event::ConnectDeny { .. } => "connect.deny",
            Event::SessionClose { .. } => "session.close",
            Event::CertificateIssue { .. } => "cert.issue",
        }
    }

    fn category(&self) -> &'static [&'static str] {
        match self {
            Event::BrokerStart { .. } | Event::BrokerStop { .. } => &["process"],
            Event::ConnectionDeny { .. } | Event::ConnectionOpen { .. } => {
                &["authentication", "network"]
            }
            Event::CertificateIssue { .. } => &["iam"],
            _ => &["network"],
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            Event::ConnectionDeny { .. } | Event::ConnectDeny { .. } => "failure",
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
        let audit = Audit::with_sink(Box::new(buffer.clone()));
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
        audit.record(&Event::ConnectAllow(connect)).unwrap();
        audit
            .record(&Event::SessionClose {
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
}
