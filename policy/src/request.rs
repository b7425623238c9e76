//! The one mapping from a request to Cedar entities and context, used by the broker and by
//! `postern-policy` alike.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::SystemTime;

use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression, Schema,
};
use jiff::Zoned;
use postern_certs::{Identity, Issuance};

use crate::directory::Directory;

/// Who is asking, as the certificate (or the ID token) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user id URI, `<issuer>#<subject>`: the Cedar `User` id.
    pub id: String,
    /// The identity provider.
    pub issuer: String,
    /// The subject at the identity provider.
    pub subject: String,
    /// The email address, when trusted.
    pub email: Option<String>,
    /// A display name.
    pub name: Option<String>,
    /// Groups named in the certificate.
    pub groups: Vec<String>,
}

/// How the principal authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authentication {
    /// `login` or `admin`.
    pub issuance: &'static str,
    /// The login flow, such as `device_code`.
    pub flow: Option<&'static str>,
    /// Authentication methods.
    pub amr: Vec<String>,
    /// Authentication context class.
    pub acr: Option<String>,
    /// When the person authenticated.
    pub auth_time: SystemTime,
}

/// A configured service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Its name, the Cedar `Service` id.
    pub name: String,
    /// `tcp` or `imap`.
    pub protocol: String,
    /// Free-form tags from `broker.toml`.
    pub tags: Vec<String>,
}

/// The client certificate of a tunnel connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Certificate {
    /// When it was issued.
    pub not_before: SystemTime,
    /// When it ends.
    pub not_after: SystemTime,
}

/// What the IdP said about a login, beyond the identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginFacts {
    /// Whether the IdP said the email is verified.
    pub email_verified: bool,
    /// Whether the IdP sent `auth_time` (rather than the broker taking `iat`).
    pub auth_time_reported: bool,
}

/// The action asked for, with the resource and the facts only that action has.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// A person logged in at the IdP and the broker would certify a new device key.
    Enroll {
        /// The broker's hostname: the `Broker` resource.
        broker: &'a str,
        /// What the IdP said.
        login: LoginFacts,
    },
    /// An agent asks for a new certificate for an existing login.
    Renew {
        /// The broker's hostname: the `Broker` resource.
        broker: &'a str,
        /// What the IdP said at the refresh.
        login: LoginFacts,
    },
    /// A tunnel stream to a service.
    Connect {
        /// The service.
        service: &'a Service,
        /// The connection's certificate.
        certificate: Certificate,
    },
    /// A login to a mailbox on an IMAP service.
    ImapLogin {
        /// The canonical login name: the `Mailbox` id.
        mailbox: &'a str,
        /// The login name as a full address (`Mailbox.address`), where the server's default
        /// domain is known; else the name.
        address: &'a str,
        /// The IMAP service.
        service: &'a Service,
        /// The connection's certificate.
        certificate: Certificate,
    },
}

/// Everything a decision is asked about.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Who.
    pub principal: &'a Principal,
    /// How they authenticated.
    pub authentication: &'a Authentication,
    /// The broker-assigned device id.
    pub device: &'a str,
    /// The address the connection comes from.
    pub source: IpAddr,
    /// The time of the decision, in the broker's time zone.
    pub now: &'a Zoned,
    /// What is asked.
    pub action: Action<'a>,
}

impl Principal {
    /// The policy view of a certificate's identity.
    pub fn from_identity(identity: &Identity) -> Self {
        Self {
            id: identity.user.uri(),
            issuer: identity.user.issuer().to_owned(),
            subject: identity.user.subject().to_owned(),
            email: identity.email.clone(),
            name: identity.name.clone(),
            groups: identity.groups.clone(),
        }
    }
}

impl Authentication {
    /// The policy view of how a certificate's identity authenticated.
    pub fn from_identity(identity: &Identity) -> Self {
        let auth = &identity.auth;
        Self {
            issuance: auth.issuance.kind(),
            flow: match auth.issuance {
                Issuance::Login(flow) => Some(flow.as_str()),
                Issuance::Admin => None,
            },
            amr: auth.amr.clone(),
            acr: auth.acr.clone(),
            auth_time: auth.auth_time,
        }
    }
}

impl Action<'_> {
    /// The Cedar action id.
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Enroll { .. } => "enroll",
            Action::Renew { .. } => "renew",
            Action::Connect { .. } => "connect",
            Action::ImapLogin { .. } => "imap_login",
        }
    }
}

/// A request in Cedar's terms.
pub(crate) struct Built {
    pub(crate) request: cedar_policy::Request,
    pub(crate) entities: Entities,
    pub(crate) principal: EntityUid,
    pub(crate) action: EntityUid,
    pub(crate) resource: EntityUid,
}

impl Request<'_> {
    /// The request in Cedar's terms. With `schema`, Cedar checks the entities and the context
    /// against it; the broker passes none, since this mapping builds them to the schema by
    /// construction (tests check that it does), and checking costs more than deciding.
    pub(crate) fn to_cedar(
        &self,
        schema: Option<&Schema>,
        directory: &Directory,
    ) -> Result<Built, String> {
        let user = uid("User", &self.principal.id)?;
        let action = uid("Action", self.action.as_str())?;
        let now = self.now.timestamp().as_second();
        let now = SystemTime::UNIX_EPOCH
            .checked_add(std::time::Duration::from_secs(
                u64::try_from(now).unwrap_or(0),
            ))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut own: Vec<(&str, RestrictedExpression)> = Vec::new();
        let resource = match self.action {
            Action::Enroll { broker, login } | Action::Renew { broker, login } => {
                own.push((
                    "email_verified",
                    RestrictedExpression::new_bool(login.email_verified),
                ));
                own.push((
                    "auth_time_reported",
                    RestrictedExpression::new_bool(login.auth_time_reported),
                ));
                entity("Broker", broker, [("name", string(broker))])?
            }
            Action::Connect {
                service,
                certificate,
            } => {
                own.push(("certificate", certificate_record(certificate, now)?));
                service_entity(service)?
            }
            Action::ImapLogin {
                mailbox,
                address,
                service,
                certificate,
            } => {
                own.push(("certificate", certificate_record(certificate, now)?));
                entity(
                    "Mailbox",
                    mailbox,
                    [
                        ("name", string(mailbox)),
                        ("address", string(address)),
                        ("service", string(&service.name)),
                    ],
                )?
            }
        };
        let mut entities = directory.principal_entities(self.principal)?;
        let resource_uid = resource.uid();
        entities.push(resource);
        let entities = Entities::from_entities(entities, schema).map_err(|e| e.to_string())?;
        let shared = [
            ("source_ip", ip_expression(canonical_ip(self.source))),
            ("time", time_record(self.now)?),
            ("authentication", authentication(self.authentication, now)?),
            ("device", string(self.device)),
        ];
        let context = Context::from_pairs(
            shared
                .into_iter()
                .chain(own)
                .map(|(name, value)| (name.to_owned(), value)),
        )
        .map_err(|e| e.to_string())?;
        let request = cedar_policy::Request::new(
            user.clone(),
            action.clone(),
            resource_uid.clone(),
            context,
            schema,
        )
        .map_err(|e| e.to_string())?;
        Ok(Built {
            request,
            entities,
            principal: user,
            action,
            resource: resource_uid,
        })
    }
}

/// Attributes of a `User` beyond issuer and subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UserAttributes {
    pub(crate) email: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) disabled: Option<bool>,
    pub(crate) tags: Option<Vec<String>>,
    pub(crate) mailboxes: Option<Vec<String>>,
}

/// Builds a `User` entity.
pub(crate) fn user_entity(
    principal: &Principal,
    attributes: &UserAttributes,
    parents: HashSet<EntityUid>,
) -> Result<Entity, String> {
    let mut attrs = HashMap::from([
        ("issuer".to_owned(), string(&principal.issuer)),
        ("subject".to_owned(), string(&principal.subject)),
    ]);
    if let Some(email) = &attributes.email {
        // Lowercased, as mail servers compare addresses: `Mailbox.address` is too.
        attrs.insert("email".to_owned(), string(&email.to_ascii_lowercase()));
    }
    if let Some(name) = &attributes.name {
        attrs.insert("name".to_owned(), string(name));
    }
    if let Some(disabled) = attributes.disabled {
        attrs.insert(
            "disabled".to_owned(),
            RestrictedExpression::new_bool(disabled),
        );
    }
    if let Some(mailboxes) = &attributes.mailboxes {
        attrs.insert("mailboxes".to_owned(), set(mailboxes));
    }
    if let Some(tags) = &attributes.tags {
        attrs.insert("tags".to_owned(), set(tags));
    }
    Entity::new(uid("User", &principal.id)?, attrs, parents).map_err(|e| e.to_string())
}

fn service_entity(service: &Service) -> Result<Entity, String> {
    entity(
        "Service",
        &service.name,
        [
            ("name", string(&service.name)),
            ("protocol", string(&service.protocol)),
            ("tags", set(&service.tags)),
        ],
    )
}

fn entity<const N: usize>(
    kind: &str,
    id: &str,
    attrs: [(&str, RestrictedExpression); N],
) -> Result<Entity, String> {
    Entity::new(
        uid(kind, id)?,
        attrs
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect(),
        HashSet::new(),
    )
    .map_err(|e| e.to_string())
}

/// The `Authentication` record of the context.
fn authentication(auth: &Authentication, now: SystemTime) -> Result<RestrictedExpression, String> {
    let mut fields = vec![
        ("issuance".to_owned(), string(auth.issuance)),
        ("amr".to_owned(), set(&auth.amr)),
        (
            "age_seconds".to_owned(),
            RestrictedExpression::new_long(seconds_between(auth.auth_time, now)),
        ),
    ];
    if let Some(flow) = auth.flow {
        fields.push(("flow".to_owned(), string(flow)));
    }
    if let Some(acr) = &auth.acr {
        fields.push(("acr".to_owned(), string(acr)));
    }
    RestrictedExpression::new_record(fields).map_err(|e| e.to_string())
}

fn certificate_record(
    certificate: Certificate,
    now: SystemTime,
) -> Result<RestrictedExpression, String> {
    RestrictedExpression::new_record([
        (
            "age_seconds".to_owned(),
            RestrictedExpression::new_long(seconds_between(certificate.not_before, now)),
        ),
        (
            "expires_in_seconds".to_owned(),
            RestrictedExpression::new_long(seconds_between(now, certificate.not_after)),
        ),
    ])
    .map_err(|e| e.to_string())
}

/// The `Time` record: the instant (to the second, rounded down), and wall-clock fields in the
/// configured zone.
fn time_record(now: &Zoned) -> Result<RestrictedExpression, String> {
    // Whole seconds: the decisions of one second share one `datetime` value (see
    // `datetime_expression`), and no access rule needs a finer instant.
    let instant = now.timestamp().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let weekday = match now.weekday() {
        jiff::civil::Weekday::Monday => "monday",
        jiff::civil::Weekday::Tuesday => "tuesday",
        jiff::civil::Weekday::Wednesday => "wednesday",
        jiff::civil::Weekday::Thursday => "thursday",
        jiff::civil::Weekday::Friday => "friday",
        jiff::civil::Weekday::Saturday => "saturday",
        jiff::civil::Weekday::Sunday => "sunday",
    };
    RestrictedExpression::new_record([
        ("datetime".to_owned(), datetime_expression(instant)),
        (
            "hour".to_owned(),
            RestrictedExpression::new_long(now.hour().into()),
        ),
        (
            "minute".to_owned(),
            RestrictedExpression::new_long(now.minute().into()),
        ),
        ("weekday".to_owned(), string(weekday)),
        (
            "date".to_owned(),
            string(&now.date().strftime("%Y-%m-%d").to_string()),
        ),
        (
            "zone".to_owned(),
            string(now.time_zone().iana_name().unwrap_or("UTC")),
        ),
    ])
    .map_err(|e| e.to_string())
}

/// `ip("…")` for `ip`. Cedar parses the extension's name with its whole grammar each time one of
/// these is built (several µs, a good part of a decision), so the values of recent requests are
/// kept: a connection's source address repeats. Emptied when it reaches [`RECENT_IPS`].
fn ip_expression(ip: IpAddr) -> RestrictedExpression {
    static RECENT: LazyLock<Mutex<HashMap<IpAddr, RestrictedExpression>>> =
        LazyLock::new(Mutex::default);
    let mut recent = RECENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(value) = recent.get(&ip) {
        return value.clone();
    }
    if recent.len() >= RECENT_IPS {
        recent.clear();
    }
    let value = RestrictedExpression::new_ip(ip.to_string());
    recent.insert(ip, value.clone());
    value
}

/// Source addresses whose `ip` values are kept, at most.
const RECENT_IPS: usize = 4096;

/// `datetime("…")` for `instant`, the last one kept: the decisions of one second, and those of a
/// re-check, share one instant.
fn datetime_expression(instant: String) -> RestrictedExpression {
    static LAST: Mutex<Option<(String, RestrictedExpression)>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
    match &*last {
        Some((kept, value)) if *kept == instant => value.clone(),
        _ => {
            let value = RestrictedExpression::new_datetime(&instant);
            *last = Some((instant, value.clone()));
            value
        }
    }
}

pub(crate) fn uid(kind: &str, id: &str) -> Result<EntityUid, String> {
    Ok(EntityUid::from_type_name_and_id(
        type_name(kind)?,
        EntityId::new(id),
    ))
}

/// The entity types of the schema, parsed once: Cedar parses a type name with its full grammar
/// (a fresh lexer each time), and every request names several.
fn type_name(kind: &str) -> Result<EntityTypeName, String> {
    static KNOWN: LazyLock<Vec<(&str, EntityTypeName)>> = LazyLock::new(|| {
        ["User", "Group", "Action", "Service", "Broker", "Mailbox"]
            .into_iter()
            .filter_map(|kind| Some((kind, EntityTypeName::from_str(kind).ok()?)))
            .collect()
    });
    match KNOWN.iter().find(|(known, _)| *known == kind) {
        Some((_, name)) => Ok(name.clone()),
        None => EntityTypeName::from_str(kind).map_err(|e| e.to_string()),
    }
}

fn string(value: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(value.to_owned())
}

fn set(values: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(values.iter().map(|v| string(v)))
}

/// Seconds from `from` to `to`, negative when `to` is earlier.
pub(crate) fn seconds_between(from: SystemTime, to: SystemTime) -> i64 {
    match to.duration_since(from) {
        Ok(ahead) => i64::try_from(ahead.as_secs()).unwrap_or(i64::MAX),
        Err(behind) => i64::try_from(behind.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// IPv4 clients of a dual-stack socket appear as `::ffff:a.b.c.d`; policy sees `a.b.c.d`.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::{Duration, SystemTime};

    use crate::{
        Action, Authentication, Certificate, Policies, Principal, Request, Service, Source,
    };

    /// The source address and the instant are each request's own, although their Cedar values
    /// are kept between requests; the instant is rounded down to the second.
    #[test]
    fn kept_extension_values_follow_each_request() {
        let policies = Policies::from_sources(
            &[Source {
                name: "p.cedar".into(),
                text: r#"
                    @id("inside") permit (principal, action, resource)
                        when { context.source_ip.isInRange(ip("10.0.0.0/8")) };
                    @id("from-2027") forbid (principal, action, resource)
                        when { context.time.datetime >= datetime("2027-01-01T00:00:00Z") };
                    @id("half-past") forbid (principal, action, resource)
                        when {
                            context.time.datetime >= datetime("2026-06-01T00:00:00.500Z") &&
                            context.time.datetime < datetime("2026-06-01T00:00:02Z")
                        };
                "#
                .into(),
            }],
            None,
        )
        .unwrap();
        let principal = Principal {
            id: "https://idp.example.org#alice".into(),
            issuer: "https://idp.example.org".into(),
            subject: "alice".into(),
            email: None,
            name: None,
            groups: vec![],
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let authentication = Authentication {
            issuance: "login",
            flow: None,
            amr: vec![],
            acr: None,
            auth_time: now,
        };
        let service = Service {
            name: "imap".into(),
            protocol: "tcp".into(),
            tags: vec![],
        };
        let decide = |source: &str, at: &str| {
            let zoned = at
                .parse::<jiff::Timestamp>()
                .unwrap()
                .to_zoned(jiff::tz::TimeZone::UTC);
            policies
                .authorize(&Request {
                    principal: &principal,
                    authentication: &authentication,
                    device: "00",
                    source: source.parse::<IpAddr>().unwrap(),
                    now: &zoned,
                    action: Action::Connect {
                        service: &service,
                        certificate: Certificate {
                            not_before: now,
                            not_after: now,
                        },
                    },
                })
                .is_allowed()
        };
        for _ in 0..3 {
            assert!(decide("10.1.2.3", "2026-12-31T23:59:59.900Z"));
            assert!(!decide("192.0.2.1", "2026-12-31T23:59:59.900Z"));
            assert!(!decide("10.1.2.3", "2027-01-01T00:00:00.100Z"));
            assert!(decide("10.1.2.3", "2026-12-31T23:59:59.900Z"));
        }
        // 00:00:00.900 is taken as 00:00:00, before the half second.
        assert!(decide("10.1.2.3", "2026-06-01T00:00:00.900Z"));
        assert!(!decide("10.1.2.3", "2026-06-01T00:00:01Z"));
    }
}
