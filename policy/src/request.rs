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

impl ConnectRequest<'_> {
    pub(crate) fn to_cedar(&self, schema: &Schema) -> Result<(Request, Entities), String> {
        let user = uid("User", &self.principal.id)?;
        let service = uid("Service", &self.service.name)?;
        let action = uid("Action", "connect")?;

        let mut user_attrs = HashMap::from([
            ("issuer".to_owned(), string(&self.principal.issuer)),
            ("subject".to_owned(), string(&self.principal.subject)),
        ]);
        if let Some(email) = &self.principal.email {
            user_attrs.insert("email".to_owned(), string(email));
        }
        if let Some(name) = &self.principal.name {
            user_attrs.insert("name".to_owned(), string(name));
        }
        let groups = self
            .principal
            .groups
            .iter()
            .map(|g| uid("Group", g))
            .collect::<Result<HashSet<_>, _>>()?;
        let service_attrs = HashMap::from([
            ("name".to_owned(), string(&self.service.name)),
            ("protocol".to_owned(), string(&self.service.protocol)),
            ("tags".to_owned(), set(&self.service.tags)),
        ]);
        let mut entities = vec![
            Entity::new(user.clone(), user_attrs, groups.clone()).map_err(|e| e.to_string())?,
            Entity::new(service.clone(), service_attrs, HashSet::new())
                .map_err(|e| e.to_string())?,
        ];
        entities.extend(
            groups
                .into_iter()
                .map(|g| Entity::new_no_attrs(g, HashSet::new())),
        );
        let entities =
            Entities::from_entities(entities, Some(schema)).map_err(|e| e.to_string())?;

        let auth = self.authentication;
        let mut authentication = vec![
            ("issuance".to_owned(), string(auth.issuance)),
            ("amr".to_owned(), set(&auth.amr)),
            (
                "age_seconds".to_owned(),
                RestrictedExpression::new_long(seconds_between(auth.auth_time, self.now)),
            ),
        ];
        if let Some(flow) = auth.flow {
            authentication.push(("flow".to_owned(), string(flow)));
        }
        if let Some(acr) = &auth.acr {
            authentication.push(("acr".to_owned(), string(acr)));
        }
        let context = Context::from_pairs([
            (
                "source_ip".to_owned(),
                RestrictedExpression::new_ip(canonical_ip(self.source).to_string()),
            ),
            (
                "authentication".to_owned(),
                RestrictedExpression::new_record(authentication).map_err(|e| e.to_string())?,
            ),
            ("device".to_owned(), string(self.device)),
            (
                "certificate_expires_in_seconds".to_owned(),
                RestrictedExpression::new_long(seconds_between(
                    self.now,
                    self.certificate_not_after,
                )),
            ),
        ])
        .map_err(|e| e.to_string())?;
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
