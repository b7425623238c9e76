//! `broker.toml`: parsed into valid types before anything binds a socket.
//!
//! Every setting and its default is documented in the template `postern-broker init` writes
//! (see [`template`]); the defaults here and there are the same constants.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use postern_proto::ServiceName;
use serde::Deserialize;

/// Default UDP address of the QUIC endpoint.
pub const DEFAULT_LISTEN: &str = "[::]:4433";
/// Default clock skew tolerated when checking certificate validity.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Default cap on certificate lifetime, for verification and for `postern-broker issue`.
pub const DEFAULT_MAX_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Default time allowed to connect to a service.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time an agent has to name the service on a new stream.
pub const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle timeout of a QUIC connection.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default number of streams an agent may have open on one connection: as many as one person's
/// sessions (quinn keeps state for every stream it allows, so no more than can be used).
pub const DEFAULT_MAX_STREAMS: u32 = 64;
/// Default `limits.max_sessions_per_user`.
pub const DEFAULT_MAX_SESSIONS_PER_USER: usize = 64;
/// Default `limits.max_pending_connects`.
pub const DEFAULT_MAX_PENDING_CONNECTS: usize = 256;
/// Default time sessions get to finish on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default lifetime of a certificate issued at login or renewal.
pub const DEFAULT_CERTIFICATE_TTL: Duration = Duration::from_secs(8 * 3600);
/// Default time from authentication at the IdP after which a login cannot be renewed.
pub const DEFAULT_MAX_SESSION_AGE: Duration = Duration::from_secs(10 * 3600);
/// Default logins waiting for approval at once, from all sources.
pub const DEFAULT_MAX_PENDING_LOGINS: usize = 256;
/// Default logins waiting for approval at once from one source address.
pub const DEFAULT_MAX_PENDING_PER_SOURCE: usize = 4;
/// Default scopes requested at the IdP: an ID token, email, name, and a refresh token.
pub const DEFAULT_SCOPES: &[&str] = &["openid", "email", "profile", "offline_access"];
/// Largest `login.max_session_age` accepted: a login must end, and with it its second factor.
pub const MAX_SESSION_AGE: Duration = Duration::from_secs(31 * 24 * 3600);
/// Longest device code lifetime honoured, whatever the IdP says.
pub const MAX_DEVICE_CODE_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// Default `policy.recheck_interval`.
pub const DEFAULT_RECHECK_INTERVAL: Duration = Duration::from_secs(60);
/// Largest `policy.recheck_interval` accepted: rules about time must be looked at daily at least.
pub const MAX_RECHECK_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Default `imap.login_timeout`: time from a mail client's connection to a successful login.
pub const DEFAULT_IMAP_LOGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `imap.lockout_failures`: failed logins of one person that lock them out.
pub const DEFAULT_LOCKOUT_FAILURES: u32 = 5;
/// Default `imap.lockout_source_failures`: failed logins from one address that lock it out.
pub const DEFAULT_LOCKOUT_SOURCE_FAILURES: u32 = 50;
/// Default `imap.lockout_window`: how far back failed logins count.
pub const DEFAULT_LOCKOUT_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Default `imap.lockout_duration`: the first lockout; each further one doubles.
pub const DEFAULT_LOCKOUT_DURATION: Duration = Duration::from_secs(60);
/// Default `imap.lockout_max_duration`: the longest lockout.
pub const DEFAULT_LOCKOUT_MAX_DURATION: Duration = Duration::from_secs(3600);
/// Longest `imap.lockout_max_duration` and `imap.lockout_window` accepted.
pub const MAX_LOCKOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Largest `pki.max_clock_skew` accepted: more would keep expired certificates working.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(10 * 60);
/// Largest `pki.max_cert_lifetime` accepted: certificates are meant to be short-lived.
pub const MAX_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// The broker's validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from; relative paths in it are resolved against its folder.
    pub path: PathBuf,
    /// Name agents use for the broker; its server certificate is issued for it.
    pub hostname: String,
    /// UDP address of the QUIC endpoint.
    pub listen: SocketAddr,
    /// `HOST:PORT` written into identity bundles for agents to dial.
    pub public_address: String,
    /// Certificates and keys.
    pub pki: Pki,
    /// Folder of Cedar policies, `entities.json` and `revocations.json`.
    pub policy_dir: PathBuf,
    /// How policies see time and how often live sessions are asked again.
    pub policy: PolicySettings,
    /// Where audit events go.
    pub audit: AuditTarget,
    /// The TCP address of the Prometheus metrics endpoint (`GET /metrics`). Default: none.
    pub metrics: Option<SocketAddr>,
    /// Timeouts and limits.
    pub limits: Limits,
    /// The services agents may reach, and nothing else.
    pub services: BTreeMap<ServiceName, ServiceConfig>,
    /// The identity provider people log in at; without it, only admin-issued bundles work.
    pub oidc: Option<Oidc>,
    /// Certificates from logins and renewals.
    pub login: LoginConfig,
    /// Login binding and lockout for `protocol = "imap"` services.
    pub imap: ImapSettings,
}

/// The `[imap]` settings: what applies to every IMAP service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImapSettings {
    /// Time from a mail client's connection to a successful login. Default: 60 s.
    pub login_timeout: Duration,
    /// Lockout of one person (all their devices): 5 failures in 15 min lock for 1 min, doubling
    /// up to 1 h.
    pub user_lockout: postern_imap::lockout::Rules,
    /// Lockout of one source address: the same with 50 failures, so that one office behind NAT
    /// is not locked out by one person.
    pub source_lockout: postern_imap::lockout::Rules,
}

/// The `[policy]` settings beside the folder.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    /// The zone of `context.time`'s hour, weekday and date. Default: UTC.
    pub time_zone: jiff::tz::TimeZone,
    /// Live sessions are asked again at this interval (time-of-day rules), besides after every
    /// change. Default: 60 s.
    pub recheck_interval: Duration,
}

/// The OpenID provider and how the broker is registered there.
#[derive(Debug, Clone)]
pub struct Oidc {
    /// The issuer URL, compared byte for byte with `iss` in tokens.
    pub issuer: String,
    /// The broker's client id.
    pub client_id: String,
    /// File holding the client secret, for a confidential client.
    pub client_secret_file: Option<PathBuf>,
    /// Scopes requested.
    pub scopes: Vec<String>,
    /// CA certificates for the IdP's HTTPS; the public roots when absent.
    pub ca_file: Option<PathBuf>,
}

/// Certificates from logins and renewals.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    /// Lifetime of a certificate from a login or renewal.
    pub certificate_ttl: Duration,
    /// Time after authentication at the IdP beyond which no renewal is made.
    pub max_session_age: Duration,
    /// Key that seals refresh tokens handed to agents.
    pub seal_key: PathBuf,
    /// Earlier seal keys: they still open what they sealed, and seal nothing new.
    pub retired_seal_keys: Vec<PathBuf>,
    /// Logins waiting for approval at once, from all sources.
    pub max_pending: usize,
    /// Logins waiting for approval at once from one source address.
    pub max_pending_per_source: usize,
}

/// Paths and limits of the broker's certificates.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The server certificate chain presented to agents.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// CA certificates agents trust for this broker (put into bundles).
    pub server_ca: PathBuf,
    /// CA certificates whose client certificates are accepted.
    pub client_ca: PathBuf,
    /// Key of the CA that signs new client certificates.
    pub client_ca_key: PathBuf,
    /// Clock skew tolerated.
    pub max_clock_skew: Duration,
    /// Longest certificate lifetime accepted and issued.
    pub max_cert_lifetime: Duration,
}

/// Where audit events are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    /// Appended to a file.
    File(PathBuf),
    /// Written to standard output.
    Stdout,
}

/// Timeouts and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time allowed to connect to a service.
    pub connect_timeout: Duration,
    /// Time an agent has to send `Open` on a new stream.
    pub open_timeout: Duration,
    /// Idle timeout of QUIC connections.
    pub idle_timeout: Duration,
    /// Streams an agent may have open on one connection.
    pub max_streams_per_connection: u32,
    /// Sessions one user may have open at once, across devices and connections.
    pub max_sessions_per_user: usize,
    /// Connections to services the broker makes at once; more wait up to `connect_timeout`.
    pub max_pending_connects: usize,
    /// Time sessions get to finish on shutdown before they are cut.
    pub shutdown_grace: Duration,
}

/// A service agents may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Host (name or address) the broker connects to.
    pub host: String,
    /// Port the broker connects to.
    pub port: u16,
    /// How the broker treats the bytes.
    pub protocol: Protocol,
    /// Port the agent listens on locally by default.
    pub local_port: u16,
    /// Free-form tags, visible to policy as `resource.tags`.
    pub tags: Vec<String>,
}

/// How a service's bytes are handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// Bytes are forwarded as they are.
    Tcp,
    /// IMAP: the broker checks the login, then forwards (docs/imap.md).
    Imap(ImapService),
}

/// How the broker reaches an IMAP server and reads its login names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImapService {
    /// TLS to the server. Default: implicit.
    pub tls: UpstreamTls,
    /// CA certificates that sign the server's certificate; the public roots when absent.
    pub ca_file: Option<PathBuf>,
    /// The name the server's certificate must carry. Default: the host of `address`.
    pub server_name: String,
    /// How the server reads login names.
    pub login: postern_imap::login::Rules,
    /// Tell the server the person's address with `ID` (for its logs and failed-login delays),
    /// when it offers `ID`. Default: true.
    pub forward_client_address: bool,
}

/// TLS between the broker and an IMAP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTls {
    /// TLS from the first byte (port 993).
    Implicit,
    /// Plain IMAP upgraded with `STARTTLS` before anything else (port 143).
    StartTls,
    /// No TLS: only when the configuration says `tls = "none"`.
    None,
}

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or missing keys.
    #[error("`{}`: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A setting has an invalid value.
    #[error("`{}`: `{key}` {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The setting, such as `services.imap.address`.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    broker: RawBroker,
    pki: RawPki,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    services: BTreeMap<String, RawService>,
    oidc: Option<RawOidc>,
    #[serde(default)]
    login: RawLogin,
    #[serde(default)]
    imap: RawImap,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawImap {
    login_timeout: Option<String>,
    lockout_failures: Option<u32>,
    lockout_source_failures: Option<u32>,
    lockout_window: Option<String>,
    lockout_duration: Option<String>,
    lockout_max_duration: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawImapLogin {
    lowercase: Option<bool>,
    domain: Option<String>,
    domain_form: Option<String>,
    allow_characters: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOidc {
    issuer: String,
    client_id: String,
    client_secret_file: Option<PathBuf>,
    scopes: Option<Vec<String>>,
    ca_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLogin {
    certificate_ttl: Option<String>,
    max_session_age: Option<String>,
    seal_key: Option<PathBuf>,
    #[serde(default)]
    retired_seal_keys: Vec<PathBuf>,
    max_pending: Option<usize>,
    max_pending_per_source: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    hostname: String,
    listen: Option<String>,
    public_address: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPki {
    server_cert: PathBuf,
    server_key: PathBuf,
    server_ca: PathBuf,
    client_ca: PathBuf,
    client_ca_key: PathBuf,
    max_clock_skew: Option<String>,
    max_cert_lifetime: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    dir: Option<PathBuf>,
    time_zone: Option<String>,
    recheck_interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    connect_timeout: Option<String>,
    open_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_streams_per_connection: Option<u32>,
    max_sessions_per_user: Option<usize>,
    max_pending_connects: Option<usize>,
    shutdown_grace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    address: String,
    protocol: Option<String>,
    local_port: Option<u16>,
    tls: Option<String>,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
    forward_client_address: Option<bool>,
    login: Option<RawImapLogin>,
    #[serde(default)]
    tags: Vec<String>,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates configuration text that was read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        let duration = |key: &str, value: Option<&str>, default: Duration| match value {
            None => Ok(default),
            Some(text) => match humantime::parse_duration(text) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err(invalid(key, "must be longer than zero".into())),
                Err(e) => Err(invalid(
                    key,
                    format!("is not a duration such as \"30s\" or \"8h\": {e}"),
                )),
            },
        };

        let hostname = raw.broker.hostname;
        if rustls_pki_types::ServerName::try_from(hostname.as_str()).is_err() {
            return Err(invalid(
                "broker.hostname",
                format!("`{hostname}` is not a DNS name or IP address"),
            ));
        }
        let listen_text = raw.broker.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            invalid(
                "broker.listen",
                format!("`{listen_text}` is not an address such as \"[::]:4433\""),
            )
        })?;
        let public_address = match raw.broker.public_address {
            Some(address) => {
                split_host_port(&address).map_err(|m| invalid("broker.public_address", m))?;
                address
            }
            None => join_host_port(&hostname, listen.port()),
        };

        let at_most = |key: &str, value: Duration, max: Duration| {
            if value > max {
                let message = format!("is at most {}", humantime::format_duration(max));
                return Err(invalid(key, message));
            }
            Ok(value)
        };
        let pki = Pki {
            server_cert: base.join(raw.pki.server_cert),
            server_key: base.join(raw.pki.server_key),
            server_ca: base.join(raw.pki.server_ca),
            client_ca: base.join(raw.pki.client_ca),
            client_ca_key: base.join(raw.pki.client_ca_key),
            max_clock_skew: at_most(
                "pki.max_clock_skew",
                duration(
                    "pki.max_clock_skew",
                    raw.pki.max_clock_skew.as_deref(),
                    DEFAULT_MAX_CLOCK_SKEW,
                )?,
                MAX_CLOCK_SKEW,
            )?,
            max_cert_lifetime: at_most(
                "pki.max_cert_lifetime",
                duration(
                    "pki.max_cert_lifetime",
                    raw.pki.max_cert_lifetime.as_deref(),
                    DEFAULT_MAX_CERT_LIFETIME,
                )?,
                MAX_CERT_LIFETIME,
            )?,
        };

        let time_zone = match raw.policy.time_zone.as_deref() {
            None | Some("UTC") => jiff::tz::TimeZone::UTC,
            Some(name) => jiff::tz::TimeZone::get(name).map_err(|e| {
                invalid(
                    "policy.time_zone",
                    format!("`{name}` is not a time zone this machine knows ({e}); use an IANA name such as \"Europe/Madrid\" (the tzdata package provides them), or \"UTC\""),
                )
            })?,
        };
        let policy = PolicySettings {
            time_zone,
            recheck_interval: at_most(
                "policy.recheck_interval",
                duration(
                    "policy.recheck_interval",
                    raw.policy.recheck_interval.as_deref(),
                    DEFAULT_RECHECK_INTERVAL,
                )?,
                MAX_RECHECK_INTERVAL,
            )?,
        };

        let metrics = raw
            .metrics
            .listen
            .map(|text| {
                text.parse::<SocketAddr>().map_err(|_| {
                    invalid(
                        "metrics.listen",
                        format!("`{text}` is not an address such as \"127.0.0.1:9464\""),
                    )
                })
            })
            .transpose()?;

        let audit = match raw.audit.path.as_deref() {
            None => AuditTarget::File(base.join("audit.jsonl")),
            Some("-") => AuditTarget::Stdout,
            Some("") => {
                return Err(invalid(
                    "audit.path",
                    "must name a file, or be \"-\" for standard output".into(),
                ));
            }
            Some(file) => AuditTarget::File(base.join(file)),
        };

        let at_least_one = |key: &str, value: Option<usize>, default: usize| match value {
            Some(0) => Err(invalid(key, "must be at least 1".into())),
            Some(value) => Ok(value),
            None => Ok(default),
        };
        let max_streams = raw
            .limits
            .max_streams_per_connection
            .unwrap_or(DEFAULT_MAX_STREAMS);
        if !(1..=4096).contains(&max_streams) {
            return Err(invalid(
                "limits.max_streams_per_connection",
                "must be between 1 and 4096".into(),
            ));
        }
        let limits = Limits {
            connect_timeout: duration(
                "limits.connect_timeout",
                raw.limits.connect_timeout.as_deref(),
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            open_timeout: duration(
                "limits.open_timeout",
                raw.limits.open_timeout.as_deref(),
                DEFAULT_OPEN_TIMEOUT,
            )?,
            idle_timeout: duration(
                "limits.idle_timeout",
                raw.limits.idle_timeout.as_deref(),
                DEFAULT_IDLE_TIMEOUT,
            )?,
            max_streams_per_connection: max_streams,
            max_sessions_per_user: at_least_one(
                "limits.max_sessions_per_user",
                raw.limits.max_sessions_per_user,
                DEFAULT_MAX_SESSIONS_PER_USER,
            )?,
            max_pending_connects: at_least_one(
                "limits.max_pending_connects",
                raw.limits.max_pending_connects,
                DEFAULT_MAX_PENDING_CONNECTS,
            )?,
            shutdown_grace: duration(
                "limits.shutdown_grace",
                raw.limits.shutdown_grace.as_deref(),
                DEFAULT_SHUTDOWN_GRACE,
            )?,
        };

        if raw.services.is_empty() {
            return Err(invalid(
                "services",
                "names no service: add at least one `[services.NAME]` table".into(),
            ));
        }
        let mut services = BTreeMap::new();
        for (name, service) in raw.services {
            let key = |field: &str| format!("services.{name}{field}");
            let service_name =
                ServiceName::new(&name).map_err(|e| invalid(&key(""), e.to_string()))?;
            let (host, port) =
                split_host_port(&service.address).map_err(|m| invalid(&key(".address"), m))?;
            let protocol = match service.protocol.as_deref().unwrap_or("tcp") {
                "tcp" => {
                    let imap_only = [
                        (service.tls.is_some(), ".tls"),
                        (service.ca_file.is_some(), ".ca_file"),
                        (service.server_name.is_some(), ".server_name"),
                        (service.login.is_some(), ".login"),
                        (
                            service.forward_client_address.is_some(),
                            ".forward_client_address",
                        ),
                    ];
                    if let Some((_, field)) = imap_only.iter().find(|(set, _)| *set) {
                        return Err(invalid(
                            &key(field),
                            "applies to `protocol = \"imap\"` only; a \"tcp\" service forwards bytes as they are".into(),
                        ));
                    }
                    Protocol::Tcp
                }
                "imap" => {
                    Protocol::Imap(imap_service(&service, &host, base, &|field, message| {
                        invalid(&key(field), message)
                    })?)
                }
                other => {
                    return Err(invalid(
                        &key(".protocol"),
                        format!("`{other}` is not a known protocol (known: \"tcp\", \"imap\")"),
                    ));
                }
            };
            let local_port = service.local_port.unwrap_or(port);
            if local_port == 0 {
                return Err(invalid(
                    &key(".local_port"),
                    "must be a port from 1 to 65535".into(),
                ));
            }
            if let Some(tag) = service
                .tags
                .iter()
                .find(|t| t.is_empty() || t.chars().any(char::is_control))
            {
                return Err(invalid(
                    &key(".tags"),
                    format!("holds an empty or unprintable tag {tag:?}"),
                ));
            }
            services.insert(
                service_name,
                ServiceConfig {
                    host,
                    port,
                    protocol,
                    local_port,
                    tags: service.tags,
                },
            );
        }

        let oidc = raw
            .oidc
            .map(|oidc| {
                check_issuer(&oidc.issuer).map_err(|m| invalid("oidc.issuer", m))?;
                if oidc.client_id.is_empty() || oidc.client_id.chars().any(char::is_control) {
                    return Err(invalid(
                        "oidc.client_id",
                        "must be the client id registered at the IdP".into(),
                    ));
                }
                let scopes = oidc
                    .scopes
                    .unwrap_or_else(|| DEFAULT_SCOPES.iter().map(|s| (*s).to_owned()).collect());
                if !scopes.iter().any(|s| s == "openid") {
                    return Err(invalid(
                        "oidc.scopes",
                        "must include \"openid\": the broker needs an ID token".into(),
                    ));
                }
                if let Some(bad) = scopes.iter().find(|s| {
                    s.is_empty()
                        || !s
                            .chars()
                            .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\')
                }) {
                    return Err(invalid(
                        "oidc.scopes",
                        format!("holds {bad:?}, which is not a scope token (RFC 6749, 3.3)"),
                    ));
                }
                Ok(Oidc {
                    issuer: oidc.issuer,
                    client_id: oidc.client_id,
                    client_secret_file: oidc.client_secret_file.map(|f| base.join(f)),
                    scopes,
                    ca_file: oidc.ca_file.map(|f| base.join(f)),
                })
            })
            .transpose()?;
        let certificate_ttl = at_most(
            "login.certificate_ttl",
            duration(
                "login.certificate_ttl",
                raw.login.certificate_ttl.as_deref(),
                DEFAULT_CERTIFICATE_TTL,
            )?,
            pki.max_cert_lifetime,
        )?;
        let max_session_age = at_most(
            "login.max_session_age",
            duration(
                "login.max_session_age",
                raw.login.max_session_age.as_deref(),
                DEFAULT_MAX_SESSION_AGE,
            )?,
            MAX_SESSION_AGE,
        )?;
        let max_pending = raw.login.max_pending.unwrap_or(DEFAULT_MAX_PENDING_LOGINS);
        let max_pending_per_source = raw
            .login
            .max_pending_per_source
            .unwrap_or(DEFAULT_MAX_PENDING_PER_SOURCE);
        if max_pending == 0 || max_pending_per_source == 0 || max_pending_per_source > max_pending {
            return Err(invalid(
                "login.max_pending_per_source",
                "and `login.max_pending` must be at least 1, the first no larger than the second"
                    .into(),
            ));
        }
        let login = LoginConfig {
            certificate_ttl,
            max_session_age,
            seal_key: base.join(
                raw.login
                    .seal_key
                    .unwrap_or_else(|| PathBuf::from("pki/seal.key")),
            ),
            retired_seal_keys: raw
                .login
                .retired_seal_keys
                .iter()
                .map(|path| base.join(path))
                .collect(),
            max_pending,
            max_pending_per_source,
        };

        let lockout = |failures_key: &str, failures: Option<u32>, default: u32| {
            let threshold = failures.unwrap_or(default);
            if threshold == 0 {
                return Err(invalid(failures_key, "must be at least 1".into()));
            }
            let rules = postern_imap::lockout::Rules {
                threshold,
                window: duration(
                    "imap.lockout_window",
                    raw.imap.lockout_window.as_deref(),
                    DEFAULT_LOCKOUT_WINDOW,
                )?,
                lock: duration(
                    "imap.lockout_duration",
                    raw.imap.lockout_duration.as_deref(),
                    DEFAULT_LOCKOUT_DURATION,
                )?,
                max_lock: duration(
                    "imap.lockout_max_duration",
                    raw.imap.lockout_max_duration.as_deref(),
                    DEFAULT_LOCKOUT_MAX_DURATION,
                )?,
            };
            if rules.max_lock > MAX_LOCKOUT || rules.window > MAX_LOCKOUT {
                return Err(invalid(
                    "imap.lockout_max_duration",
                    "and `imap.lockout_window` must be at most 7 days".into(),
                ));
            }
            if rules.max_lock < rules.lock {
                return Err(invalid(
                    "imap.lockout_max_duration",
                    "must be at least `imap.lockout_duration`".into(),
                ));
            }
            Ok(rules)
        };
        let imap = ImapSettings {
            login_timeout: duration(
                "imap.login_timeout",
                raw.imap.login_timeout.as_deref(),
                DEFAULT_IMAP_LOGIN_TIMEOUT,
            )?,
            user_lockout: lockout(
                "imap.lockout_failures",
                raw.imap.lockout_failures,
                DEFAULT_LOCKOUT_FAILURES,
            )?,
            source_lockout: lockout(
                "imap.lockout_source_failures",
                raw.imap.lockout_source_failures,
                DEFAULT_LOCKOUT_SOURCE_FAILURES,
            )?,
        };

        Ok(Config {
            path: path.to_owned(),
            hostname,
            listen,
            public_address,
            pki,
            policy_dir: base.join(raw.policy.dir.unwrap_or_else(|| PathBuf::from("policies"))),
            policy,
            audit,
            metrics,
            limits,
            services,
            oidc,
            login,
            imap,
        })
    }
}

/// The IMAP settings of one service; `invalid` names the field.
fn imap_service(
    service: &RawService,
    host: &str,
    base: &Path,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ImapService, ConfigError> {
    use postern_imap::login::{DomainForm, Rules};
    let tls = match service.tls.as_deref().unwrap_or("implicit") {
        "implicit" => UpstreamTls::Implicit,
        "starttls" => UpstreamTls::StartTls,
        "none" => UpstreamTls::None,
        other => {
            return Err(invalid(
                ".tls",
                format!(
                    "`{other}` is not one of \"implicit\" (port 993), \"starttls\" (port 143) or \"none\""
                ),
            ));
        }
    };
    let server_name = service
        .server_name
        .clone()
        .unwrap_or_else(|| host.to_owned());
    if rustls_pki_types::ServerName::try_from(server_name.as_str()).is_err() {
        return Err(invalid(
            ".server_name",
            format!("`{server_name}` is not a DNS name or IP address a certificate can carry"),
        ));
    }
    let raw = service.login.as_ref();
    let domain_form = match raw
        .and_then(|l| l.domain_form.as_deref())
        .unwrap_or("address")
    {
        "address" => DomainForm::Address,
        "local" => DomainForm::Local,
        other => {
            return Err(invalid(
                ".login.domain_form",
                format!(
                    "`{other}` is not \"address\" (the server logs in `name@domain`) or \"local\" (it logs in `name`)"
                ),
            ));
        }
    };
    let domain = match raw.and_then(|l| l.domain.clone()) {
        Some(domain) => {
            let valid = !domain.is_empty()
                && domain.len() <= 253
                && domain
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
            if !valid {
                return Err(invalid(
                    ".login.domain",
                    format!("`{domain}` is not a mail domain such as \"example.org\""),
                ));
            }
            Some((domain.to_ascii_lowercase(), domain_form))
        }
        None if raw.is_some_and(|l| l.domain_form.is_some()) => {
            return Err(invalid(
                ".login.domain_form",
                "needs `login.domain`, the server's default domain".into(),
            ));
        }
        None => None,
    };
    let extra = raw
        .and_then(|l| l.allow_characters.clone())
        .unwrap_or_default();
    if let Some(bad) = extra
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '"' | '\\' | '(' | ')' | '{' | '}'))
    {
        return Err(invalid(
            ".login.allow_characters",
            format!("cannot allow {bad:?}: it is not a character IMAP can carry in a login name"),
        ));
    }
    Ok(ImapService {
        tls,
        ca_file: service.ca_file.as_ref().map(|f| base.join(f)),
        server_name,
        forward_client_address: service.forward_client_address.unwrap_or(true),
        login: Rules {
            lowercase: raw.and_then(|l| l.lowercase).unwrap_or(true),
            domain,
            extra,
        },
    })
}

/// An issuer is an `https` URL without query, fragment or user info (plain `http` only on
/// loopback, where tokens never cross a network), and one a certificate can name.
fn check_issuer(issuer: &str) -> Result<(), String> {
    check_idp_url(issuer)?;
    if issuer.contains(['?', '#']) {
        return Err(format!(
            "`{issuer}` is not an issuer URL such as \"https://idp.example.org/realms/acme\" (no query or fragment)"
        ));
    }
    postern_certs::UserId::new(issuer, "subject")
        .map(|_| ())
        .map_err(|e| format!("cannot name people in certificates: {e}"))
}

/// Checks a URL the broker sends tokens or secrets to: `https`, or `http` to a loopback
/// address; no user name or password in it.
pub fn check_idp_url(text: &str) -> Result<(), String> {
    use openidconnect::url::{Host, Url};
    let url = Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("`{text}` must not carry a user name or password"));
    }
    let loopback = match url.host() {
        Some(Host::Domain(name)) => name == "localhost",
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err(format!("`{text}` names no host")),
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(format!(
            "`{text}` uses plain http: tokens would cross the network unencrypted; use https (plain http is accepted only on loopback)"
        )),
        other => Err(format!("`{text}`: `{other}` is not https")),
    }
}

impl ServiceConfig {
    /// How agents serve it locally.
    pub fn kind(&self) -> postern_proto::ServiceKind {
        match self.protocol {
            Protocol::Tcp => postern_proto::ServiceKind::Tcp,
            Protocol::Imap(_) => postern_proto::ServiceKind::Imap,
        }
    }
}

impl Protocol {
    /// The name used in configuration and policy.
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Imap(_) => "imap",
        }
    }
}

/// Splits `HOST:PORT` (IPv6 in brackets) into a host and a non-zero port.
pub fn split_host_port(address: &str) -> Result<(String, u16), String> {
    let expected = || {
        format!("`{address}` is not `HOST:PORT` (IPv6 addresses in brackets, such as `[::1]:993`)")
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(expected)?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .filter(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
            .ok_or_else(expected)?,
        None if host.contains(':') => return Err(expected()),
        None => host,
    };
    let port: u16 = port.parse().ok().filter(|&p| p != 0).ok_or_else(expected)?;
    if rustls_pki_types::ServerName::try_from(host).is_err() {
        return Err(format!(
            "`{address}`: `{host}` is not a DNS name or IP address"
        ));
    }
    Ok((host.to_owned(), port))
}

/// Joins a host and a port as `HOST:PORT`, bracketing IPv6 addresses.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The IdP settings `postern-broker init` writes into the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcTemplate {
    /// The issuer URL.
    pub issuer: String,
    /// The client id.
    pub client_id: String,
    /// The client secret file, relative to the configuration's folder.
    pub client_secret_file: Option<String>,
    /// Scopes; the default when empty.
    pub scopes: Vec<String>,
    /// CA file for the IdP's HTTPS, when it is not publicly trusted.
    pub ca_file: Option<String>,
}

/// The commented `broker.toml` that `postern-broker init` writes.
pub fn template(
    hostname: &str,
    listen: &str,
    services: &[ServiceTemplate],
    oidc: Option<&OidcTemplate>,
) -> String {
    let mut text = format!(
        r#"# postern-broker configuration, written by `postern-broker init`.
# Relative paths are resolved against the folder of this file.
# Every setting shows its default; commented-out settings are at their default.

[broker]
# Name agents use to reach this broker. The server certificate is issued for it.
hostname = "{hostname}"
# UDP address of the QUIC endpoint. Default: "{DEFAULT_LISTEN}".
listen = "{listen}"
# Address written into identity bundles for agents to dial.
# Default: the hostname and the port of `listen`.
# public_address = "{hostname}:4433"

[pki]
# Certificate chain and key this broker presents to agents.
server_cert = "pki/server.pem"
server_key = "pki/server.key"
# CA certificates agents trust for this broker; handed out in bundles. Several during a rotation.
server_ca = "pki/server-ca.pem"
# CA certificates whose client certificates are accepted. Several during a rotation.
client_ca = "pki/client-ca.pem"
# Key of the CA that signs new client certificates; it must belong to a certificate in `client_ca`.
client_ca_key = "pki/client-ca.key"
# Clock difference tolerated when checking validity. Default: "60s".
# max_clock_skew = "60s"
# Longest certificate lifetime accepted and issued (`postern-broker issue --ttl`). Default: "24h".
# max_cert_lifetime = "24h"

[policy]
# Folder of Cedar policies (*.cedar), entities.json and revocations.json, checked against the
# schema at start and taken in again whenever they change (or on SIGHUP); a change that does
# not validate is refused and the previous version stays. Default: "policies".
# dir = "policies"
# The time zone of context.time (hour, weekday, date) for office-hours rules: an IANA name such
# as "Europe/Madrid". Default: "UTC".
# time_zone = "UTC"
# Live sessions are asked again after every change of policies, entities.json or
# revocations.json, and at this interval (for time-of-day rules). Default: "60s".
# recheck_interval = "60s"

[audit]
# Where audit events go, one JSON object per line: a file, or "-" for standard output.
# Default: "audit.jsonl".
# path = "audit.jsonl"

[metrics]
# TCP address of a Prometheus endpoint (GET /metrics): policy generation, refused reloads,
# open sessions, sessions ended by a re-check. It needs no credentials, so keep it on loopback
# or a management network. Default: none (off).
# listen = "127.0.0.1:9464"

[limits]
# Time allowed to connect to a service. Default: "{connect}".
# connect_timeout = "{connect}"
# Time an agent has to name the service on a new stream. Default: "{open}".
# open_timeout = "{open}"
# A QUIC connection silent this long is closed (agents send keep-alives). Default: "{idle}".
# idle_timeout = "{idle}"
# Streams (forwarded connections) an agent may have open at once. Default: {DEFAULT_MAX_STREAMS}.
# max_streams_per_connection = {DEFAULT_MAX_STREAMS}
# Sessions one user may have open at once, across devices: mail clients open a few per
# account. Default: {DEFAULT_MAX_SESSIONS_PER_USER}.
# max_sessions_per_user = {DEFAULT_MAX_SESSIONS_PER_USER}
# Connections to services the broker makes at once; more wait up to connect_timeout.
# Default: {DEFAULT_MAX_PENDING_CONNECTS}.
# max_pending_connects = {DEFAULT_MAX_PENDING_CONNECTS}
# On shutdown, time open sessions get to finish before they are cut. Default: "{grace}".
# shutdown_grace = "{grace}"

[login]
# Lifetime of a certificate from `postern login` or a renewal; at most `pki.max_cert_lifetime`.
# Default: "{ttl}".
# certificate_ttl = "{ttl}"
# Time after the person authenticated at the IdP (auth_time) beyond which no renewal is made:
# then they log in again, with their second factor. Default: "{age}".
# max_session_age = "{age}"
# Key that seals the refresh tokens agents keep; all replicas of a broker share it. Default:
# "pki/seal.key".
# seal_key = "pki/seal.key"
# Earlier seal keys, kept after a rotation until every login sealed with them has ended
# (max_session_age): they open what they sealed and seal nothing new. Default: [].
# retired_seal_keys = ["pki/seal-2026.key"]
# Logins waiting for approval at once, in total and from one source address. Defaults: {pending}, {per_source}.
# max_pending = {pending}
# max_pending_per_source = {per_source}
"#,
        connect = humantime::format_duration(DEFAULT_CONNECT_TIMEOUT),
        open = humantime::format_duration(DEFAULT_OPEN_TIMEOUT),
        idle = humantime::format_duration(DEFAULT_IDLE_TIMEOUT),
        grace = humantime::format_duration(DEFAULT_SHUTDOWN_GRACE),
        ttl = humantime::format_duration(DEFAULT_CERTIFICATE_TTL),
        age = humantime::format_duration(DEFAULT_MAX_SESSION_AGE),
        pending = DEFAULT_MAX_PENDING_LOGINS,
        per_source = DEFAULT_MAX_PENDING_PER_SOURCE,
    );
    let default_scopes: Vec<String> = DEFAULT_SCOPES.iter().map(|s| (*s).to_owned()).collect();
    let quoted = |scopes: &[String]| {
        scopes
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let oidc_header = "
# The OpenID provider people log in at with `postern login`. The broker is its OAuth client
# (device authorization grant, RFC 8628); docs/identity-providers.md shows each IdP's settings.
";
    match oidc {
        Some(oidc) => {
            text.push_str(oidc_header);
            text.push_str(&format!(
                "[oidc]\n# Issuer URL, compared byte for byte with `iss` in tokens.\nissuer = {:?}\nclient_id = {:?}\n",
                oidc.issuer, oidc.client_id
            ));
            match &oidc.client_secret_file {
                Some(file) => text.push_str(&format!(
                    "# File with the client secret (confidential client). Keep it 0600.\nclient_secret_file = {file:?}\n"
                )),
                None => text.push_str(
                    "# File with the client secret, for a confidential client. Default: none (public client).\n# client_secret_file = \"pki/oidc-client-secret\"\n",
                ),
            }
            let scopes = if oidc.scopes.is_empty() {
                &default_scopes
            } else {
                &oidc.scopes
            };
            text.push_str(&format!(
                "# Scopes requested. Default: [{}].\nscopes = [{}]\n# CA certificates for the IdP's HTTPS; only these are trusted when set. Default: the publicly\n# trusted roots.\n",
                quoted(&default_scopes),
                quoted(scopes)
            ));
            match &oidc.ca_file {
                Some(file) => text.push_str(&format!("ca_file = {file:?}\n")),
                None => text.push_str("# ca_file = \"pki/idp-ca.pem\"\n"),
            }
        }
        None => {
            text.push_str(oidc_header);
            text.push_str(&format!(
                "# Without it, only certificates from `postern-broker issue` work.\n# [oidc]\n# issuer = \"https://idp.example.org/realms/acme\"\n# client_id = \"postern\"\n# scopes = [{}]\n",
                quoted(&default_scopes)
            ));
        }
    }
    let mut any_imap = false;
    for service in services {
        let ServiceTemplate {
            name,
            address,
            imap,
            ca_file,
        } = service;
        let port = split_host_port(address).map_or(0, |(_, port)| port);
        let protocol = match imap {
            Some(tls) => {
                any_imap = true;
                let tls = match tls {
                    UpstreamTls::Implicit => "implicit",
                    UpstreamTls::StartTls => "starttls",
                    UpstreamTls::None => "none",
                };
                let ca_file = match ca_file {
                    Some(file) => format!("ca_file = {file:?}"),
                    None => "# ca_file = \"pki/mail-ca.pem\"".to_owned(),
                };
                format!(
                    r#"# How bytes are handled: "imap" checks each login against policy before the password
# reaches the mail server (docs/imap.md); "tcp" forwards bytes unchanged.
protocol = "imap"
# TLS to the mail server: "implicit" (993), "starttls" (143), or "none". Default: "implicit".
tls = "{tls}"
# CA certificates that sign the mail server's certificate. Default: the public roots.
{ca_file}
# The name the mail server's certificate carries. Default: the host of `address`.
# server_name = "mail.internal"
# Tell the mail server each person's address with IMAP ID (put the broker in Dovecot's
# login_trusted_networks). Default: true.
# forward_client_address = true"#
                )
            }
            None => r#"# How bytes are handled: "tcp" forwards them unchanged; "imap" binds each mail login to
# the person (docs/imap.md). Default: "tcp".
# protocol = "tcp""#
                .to_owned(),
        };
        text.push_str(&format!(
            r#"
# The broker connects only to the services listed here, never to an address an agent names.
[services.{name}]
# HOST:PORT the broker connects to.
address = "{address}"
{protocol}
# Port the agent listens on, on the loopback address, by default. Default: the port of `address`.
# local_port = {port}
# Free-form tags that policies can test as `resource.tags`. Default: [].
# tags = []
"#
        ));
        if imap.is_some() {
            text.push_str(&format!(
                r#"
# How the mail server reads login names: the broker checks and sends this form.
[services.{name}.login]
# The server lowercases names (Dovecot's %Lu). Default: true.
# lowercase = true
# The server's default domain, and whether it logs in "address" (alice@example.org) or
# "local" (alice). Default: none; names are used as written.
# domain = "example.org"
# domain_form = "address"
# Characters allowed beyond a-z A-Z 0-9 . - _ @; separators such as * % + stay refused.
# Default: "".
# allow_characters = ""
"#
            ));
        }
    }
    if any_imap {
        text.push_str(&format!(
            r#"
# Login binding and lockout for every IMAP service.
[imap]
# Time from a mail client's connection to a successful login. Default: "{login}".
# login_timeout = "{login}"
# Failed logins of one person (all devices) within lockout_window that lock them out, and of one
# source address (higher: an office behind NAT). Defaults: {failures}, {source_failures}.
# lockout_failures = {failures}
# lockout_source_failures = {source_failures}
# How far back failures count. Default: "{window}".
# lockout_window = "{window}"
# The first lockout, doubled by each further one up to the maximum. Defaults: "{lock}", "{max}".
# lockout_duration = "{lock}"
# lockout_max_duration = "{max}"
"#,
            login = humantime::format_duration(DEFAULT_IMAP_LOGIN_TIMEOUT),
            failures = DEFAULT_LOCKOUT_FAILURES,
            source_failures = DEFAULT_LOCKOUT_SOURCE_FAILURES,
            window = humantime::format_duration(DEFAULT_LOCKOUT_WINDOW),
            lock = humantime::format_duration(DEFAULT_LOCKOUT_DURATION),
            max = humantime::format_duration(DEFAULT_LOCKOUT_MAX_DURATION),
        ));
    }
    text
}

/// A service as `init` writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTemplate {
    /// Its name.
    pub name: ServiceName,
    /// `HOST:PORT` of the server.
    pub address: String,
    /// For an IMAP service, the TLS to its server.
    pub imap: Option<UpstreamTls>,
    /// For an IMAP service, the CA file of its server, relative to the configuration.
    pub ca_file: Option<String>,
}

impl ServiceTemplate {
    /// Reads `NAME=HOST:PORT`, `NAME=imaps://HOST:PORT` (IMAP, implicit TLS) or
    /// `NAME=imap://HOST:PORT` (IMAP, STARTTLS). A bare address on port 993 or 143 is IMAP too.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (name, target) = spec
            .split_once('=')
            .ok_or_else(|| format!("`{spec}` is not NAME=HOST:PORT"))?;
        let name = ServiceName::new(name).map_err(|e| format!("`{spec}`: {e}"))?;
        let (address, imap) = if let Some(rest) = target.strip_prefix("imaps://") {
            (rest, Some(UpstreamTls::Implicit))
        } else if let Some(rest) = target.strip_prefix("imap://") {
            (rest, Some(UpstreamTls::StartTls))
        } else if target.contains("://") {
            return Err(format!(
                "`{spec}`: only imaps:// and imap:// are known; or give HOST:PORT"
            ));
        } else {
            (target, None)
        };
        let (_, port) = split_host_port(address).map_err(|e| format!("`{spec}`: {e}"))?;
        let imap = imap.or(match port {
            993 => Some(UpstreamTls::Implicit),
            143 => Some(UpstreamTls::StartTls),
            _ => None,
        });
        Ok(Self {
            name,
            address: address.to_owned(),
            imap,
            ca_file: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/postern/broker.toml"))
    }

    fn sample() -> String {
        template(
            "gw.example.org",
            "[::]:4433",
            &[ServiceTemplate::parse("imap=mail.internal:993").unwrap()],
            None,
        )
    }

    #[test]
    fn imap_services_are_read_with_their_login_rules() {
        let text = sample()
            .replace("# domain = \"example.org\"", "domain = \"Example.ORG\"")
            .replace("# domain_form = \"address\"", "domain_form = \"local\"")
            .replace("# lockout_failures = 5", "lockout_failures = 3");
        let config = parse(&text).unwrap();
        let service = &config.services[&ServiceName::new("imap").unwrap()];
        let Protocol::Imap(imap) = &service.protocol else {
            panic!("port 993 makes an IMAP service: {:?}", service.protocol);
        };
        assert_eq!(imap.tls, UpstreamTls::Implicit);
        assert_eq!(imap.server_name, "mail.internal");
        assert!(imap.forward_client_address);
        assert_eq!(
            imap.login.domain,
            Some(("example.org".into(), postern_imap::login::DomainForm::Local))
        );
        assert_eq!(config.imap.user_lockout.threshold, 3);
        assert_eq!(
            config.imap.source_lockout.threshold,
            DEFAULT_LOCKOUT_SOURCE_FAILURES
        );
        assert_eq!(service.kind(), postern_proto::ServiceKind::Imap);

        // IMAP settings on a TCP service are a mistake, not something to ignore.
        let tcp = text.replace("protocol = \"imap\"", "protocol = \"tcp\"");
        let err = parse(&tcp).unwrap_err().to_string();
        assert!(err.contains("`services.imap.tls`"), "{err}");
    }

    #[test]
    fn init_reads_imap_services_from_their_scheme_or_port() {
        let parsed = |spec: &str| ServiceTemplate::parse(spec).map(|s| (s.address, s.imap));
        assert_eq!(
            parsed("imap=mail:993"),
            Ok(("mail:993".into(), Some(UpstreamTls::Implicit)))
        );
        assert_eq!(
            parsed("imap=mail:143"),
            Ok(("mail:143".into(), Some(UpstreamTls::StartTls)))
        );
        assert_eq!(
            parsed("mail=imaps://mail:10993"),
            Ok(("mail:10993".into(), Some(UpstreamTls::Implicit)))
        );
        assert_eq!(
            parsed("mail=imap://mail:1143"),
            Ok(("mail:1143".into(), Some(UpstreamTls::StartTls)))
        );
        assert_eq!(parsed("git=git:22"), Ok(("git:22".into(), None)));
        assert!(parsed("x=smtp://mail:25").is_err());
        assert!(parsed("x").is_err());
    }

    #[test]
    fn idp_urls_must_keep_tokens_encrypted() {
        for good in [
            "https://idp.example.org/realms/acme",
            "http://127.0.0.1:8080",
            "http://[::1]:8080/x",
            "http://localhost/",
        ] {
            assert_eq!(check_idp_url(good), Ok(()), "{good}");
        }
        for bad in [
            "http://idp.example.org",
            "http://localhost:80@evil.example/",
            "https://user:pw@idp.example.org",
            "ftp://idp.example.org",
            "idp.example.org",
            "http://127.0.0.1.evil.example/",
        ] {
            assert!(check_idp_url(bad).is_err(), "{bad}");
        }
        assert!(check_issuer("https://idp.example.org/x?y=1").is_err());
        assert!(check_issuer("https://idp.example.org/x#y").is_err());
    }

    #[test]
    fn the_template_parses_to_the_defaults() {
        let config = parse(&sample()).unwrap();
        assert_eq!(config.listen, "[::]:4433".parse().unwrap());
        assert_eq!(config.public_address, "gw.example.org:4433");
        assert_eq!(
            config.pki.server_key,
            Path::new("/etc/postern/pki/server.key")
        );
        assert_eq!(config.policy_dir, Path::new("/etc/postern/policies"));
        assert_eq!(
            config.audit,
            AuditTarget::File("/etc/postern/audit.jsonl".into())
        );
        assert_eq!(config.pki.max_cert_lifetime, DEFAULT_MAX_CERT_LIFETIME);
        assert_eq!(config.limits.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        let imap = &config.services[&ServiceName::new("imap").unwrap()];
        assert_eq!(
            (imap.host.as_str(), imap.port, imap.local_port),
            ("mail.internal", 993, 993)
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "listen = \"[::]:4433\"",
                "listen = \"nowhere\"",
                "`broker.listen`",
            ),
            (
                "address = \"mail.internal:993\"",
                "address = \"mail.internal\"",
                "`services.imap.address`",
            ),
            (
                "address = \"mail.internal:993\"",
                "address = \"mail.internal:0\"",
                "`services.imap.address`",
            ),
            (
                "protocol = \"imap\"",
                "protocol = \"smtp\"",
                "`services.imap.protocol`",
            ),
            (
                "tls = \"implicit\"",
                "tls = \"sometimes\"",
                "`services.imap.tls`",
            ),
            (
                "# domain_form = \"address\"",
                "domain_form = \"local\"",
                "`services.imap.login.domain_form`",
            ),
            (
                "# allow_characters = \"\"",
                "allow_characters = \"\\\"\"",
                "`services.imap.login.allow_characters`",
            ),
            (
                "# lockout_failures = 5",
                "lockout_failures = 0",
                "`imap.lockout_failures`",
            ),
            (
                "# lockout_max_duration = \"1h\"",
                "lockout_max_duration = \"1s\"",
                "`imap.lockout_max_duration`",
            ),
            (
                "# shutdown_grace = \"30s\"",
                "shutdown_grace = \"soon\"",
                "`limits.shutdown_grace`",
            ),
            (
                "# max_clock_skew = \"60s\"",
                "max_clock_skew = \"0s\"",
                "`pki.max_clock_skew`",
            ),
            (
                "# max_clock_skew = \"60s\"",
                "max_clock_skew = \"60days\"",
                "`pki.max_clock_skew` is at most 10m",
            ),
            (
                "# max_cert_lifetime = \"24h\"",
                "max_cert_lifetime = \"365days\"",
                "`pki.max_cert_lifetime` is at most",
            ),
            (
                "address = \"mail.internal:993\"",
                "address = \"mail\\\"x:993\"",
                "is not a DNS name or IP address",
            ),
            ("[services.imap", "[services.IMAP", "`services.IMAP`"),
            (
                "hostname = \"gw.example.org\"",
                "hostname = \"gw example\"",
                "`broker.hostname`",
            ),
            (
                "# dir = \"policies\"",
                "directory = \"policies\"",
                "unknown field `directory`",
            ),
            (
                "# max_sessions_per_user = 64",
                "max_sessions_per_user = 0",
                "`limits.max_sessions_per_user` must be at least 1",
            ),
            (
                "# max_pending_connects = 256",
                "max_pending_connects = 0",
                "`limits.max_pending_connects`",
            ),
            (
                "# recheck_interval = \"60s\"",
                "recheck_interval = \"30days\"",
                "`policy.recheck_interval` is at most",
            ),
            (
                "# time_zone = \"UTC\"",
                "time_zone = \"Mars/Olympus\"",
                "`policy.time_zone`",
            ),
            (
                "# listen = \"127.0.0.1:9464\"",
                "listen = \"metrics\"",
                "`metrics.listen`",
            ),
        ];
        for (from, to, expected) in cases {
            let text = sample().replace(from, to);
            assert_ne!(text, sample(), "{from} is in the template");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{to}: {err}");
            assert!(err.starts_with("`/etc/postern/broker.toml`"), "{err}");
        }
    }

    #[test]
    fn at_least_one_service() {
        let text = sample();
        let without = &text[..text.find("\n# The broker connects only").unwrap()];
        assert!(
            parse(without)
                .unwrap_err()
                .to_string()
                .contains("`services`")
        );
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("[::1]:993"), Ok(("::1".into(), 993)));
        assert_eq!(
            split_host_port("127.0.0.1:143"),
            Ok(("127.0.0.1".into(), 143))
        );
        assert!(split_host_port("::1:993").is_err());
        assert!(split_host_port("[mail]:993").is_err());
        assert!(split_host_port(":993").is_err());
        assert_eq!(join_host_port("::1", 4433), "[::1]:4433");
    }
}
