//! The one mapping from a request to Cedar entities and context.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::str::FromStr;
use std::time::SystemTime;

use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, Request, RestrictedExpression,
    Schema,
};

/// Who is asking, as the certificate says.
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
    /// `tcp` or, later, `imap`.
    pub protocol: String,
    /// Free-form tags from `broker.toml`.
    pub tags: Vec<String>,
}

/// A request to open a stream to a service.
#[derive(Debug, Clone)]
pub struct ConnectRequest<'a> {
    /// Who.
    pub principal: &'a Principal,
    /// How they authenticated.
    pub authentication: &'a Authentication,
    /// The device id from the certificate.
    pub device: &'a str,
    /// When the certificate expires.
    pub certificate_not_after: SystemTime,
    /// Which service.
    pub service: &'a Service,
    /// The address the connection comes from.
    pub source: IpAddr,
    /// The time of the decision.
    pub now: SystemTime,
}

/// Which login decision is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginAction {
    /// A person logged in at the IdP and the broker would certify a new device key.
    Enroll,
    /// An agent asks for a new certificate for an existing login.
    Renew,
}

/// A request to certify a key for a login (`enroll`) or to renew one (`renew`).
#[derive(Debug, Clone)]
pub struct LoginRequest<'a> {
    /// Enroll or renew.
    pub action: LoginAction,
    /// Who, from the ID token (or the sealed login, for a renewal).
    pub principal: &'a Principal,
    /// How they authenticated.
    pub authentication: &'a Authentication,
    /// Whether the IdP said the email is verified.
    pub email_verified: bool,
    /// Whether the IdP sent `auth_time` (rather than the broker taking `iat`).
    pub auth_time_reported: bool,
    /// The broker-assigned device id.
    pub device: &'a str,
    /// The broker's hostname.
    pub broker: &'a str,
    /// The address the enrollment connection comes from.
    pub source: IpAddr,
    /// The time of the decision.
    pub now: SystemTime,
}

impl LoginAction {
    /// The Cedar action id.
    pub fn as_str(self) -> &'static str {
        match self {
            LoginAction::Enroll => "enroll",
            LoginAction::Renew => "renew",
        }
    }
}

impl LoginRequest<'_> {
    pub(crate) fn to_cedar(&self, schema: &Schema) -> Result<(Request, Entities), String> {
        let user = uid("User", &self.principal.id)?;
        let broker = uid("Broker", self.broker)?;
        let action = uid("Action", self.action.as_str())?;
        let broker_entity = Entity::new(
            broker.clone(),
            HashMap::from([("name".to_owned(), string(self.broker))]),
            HashSet::new(),
        )
        .map_err(|e| e.to_string())?;
        let entities = entities(self.principal, broker_entity, schema)?;
        let context = context(
            self.source,
            self.authentication,
            self.device,
            self.now,
            [
                (
                    "email_verified",
                    RestrictedExpression::new_bool(self.email_verified),
                ),
                (
                    "auth_time_reported",
                    RestrictedExpression::new_bool(self.auth_time_reported),
                ),
            ],
        )?;
        let request =
            Request::new(user, action, broker, context, Some(schema)).map_err(|e| e.to_string())?;
        Ok((request, entities))
    }
}

/// The principal with its groups, and the resource, checked against the schema.
fn entities(principal: &Principal, resource: Entity, schema: &Schema) -> Result<Entities, String> {
    let mut entities = principal_entities(principal)?;
    entities.push(resource);
    Entities::from_entities(entities, Some(schema)).map_err(|e| e.to_string())
}

/// The context every action shares — where from, how authenticated, which device — and the
/// action's own fields.
fn context<const N: usize>(
    source: IpAddr,
    auth: &Authentication,
    device: &str,
    now: SystemTime,
    own: [(&str, RestrictedExpression); N],
) -> Result<Context, String> {
    let shared = [
        (
            "source_ip".to_owned(),
            RestrictedExpression::new_ip(canonical_ip(source).to_string()),
        ),
        ("authentication".to_owned(), authentication(auth, now)?),
        ("device".to_owned(), string(device)),
    ];
    Context::from_pairs(
        shared.into_iter().chain(
            own.into_iter()
                .map(|(name, value)| (name.to_owned(), value)),
        ),
    )
    .map_err(|e| e.to_string())
}

/// The `User` entity and its `Group` parents.
fn principal_entities(principal: &Principal) -> Result<Vec<Entity>, String> {
    let user = uid("User", &principal.id)?;
    let mut user_attrs = HashMap::from([
        ("issuer".to_owned(), string(&principal.issuer)),
        ("subject".to_owned(), string(&principal.subject)),
    ]);
    if let Some(email) = &principal.email {
        user_attrs.insert("email".to_owned(), string(email));
    }
    if let Some(name) = &principal.name {
        user_attrs.insert("name".to_owned(), string(name));
    }
    let groups = principal
        .groups
        .iter()
        .map(|g| uid("Group", g))
        .collect::<Result<HashSet<_>, _>>()?;
    let mut entities =
        vec![Entity::new(user, user_attrs, groups.clone()).map_err(|e| e.to_string())?];
    entities.extend(
        groups
            .into_iter()
            .map(|g| Entity::new_no_attrs(g, HashSet::new())),
    );
    Ok(entities)
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

impl ConnectRequest<'_> {
    pub(crate) fn to_cedar(&self, schema: &Schema) -> Result<(Request, Entities), String> {
        let user = uid("User", &self.principal.id)?;
        let service = uid("Service", &self.service.name)?;
        let action = uid("Action", "connect")?;
        let service_attrs = HashMap::from([
            ("name".to_owned(), string(&self.service.name)),
            ("protocol".to_owned(), string(&self.service.protocol)),
            ("tags".to_owned(), set(&self.service.tags)),
        ]);
        let service_entity = Entity::new(service.clone(), service_attrs, HashSet::new())
            .map_err(|e| e.to_string())?;
        let entities = entities(self.principal, service_entity, schema)?;
        let context = context(
            self.source,
            self.authentication,
            self.device,
            self.now,
            [(
                "certificate_expires_in_seconds",
                RestrictedExpression::new_long(seconds_between(
                    self.now,
                    self.certificate_not_after,
                )),
            )],
        )?;
        let request = Request::new(user, action, service, context, Some(schema))
            .map_err(|e| e.to_string())?;
        Ok((request, entities))
    }
}

fn uid(kind: &str, id: &str) -> Result<EntityUid, String> {
    let kind = EntityTypeName::from_str(kind).map_err(|e| e.to_string())?;
    Ok(EntityUid::from_type_name_and_id(kind, EntityId::new(id)))
}

fn string(value: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(value.to_owned())
}

fn set(values: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(values.iter().map(|v| string(v)))
}

/// Seconds from `from` to `to`, negative when `to` is earlier.
fn seconds_between(from: SystemTime, to: SystemTime) -> i64 {
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
