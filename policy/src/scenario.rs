//! Requests written as data — the test cases of `postern-policy test` and the input of
//! `postern-policy explain` — turned into the same [`Request`] the broker builds.
//!
//! A scenario names a principal, an action, a resource and the context in Postern's terms
//! (amr, session age, source address, time), not in Cedar's: the mapping to Cedar stays the
//! broker's own, so a passing case means the broker decides the same way.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use jiff::Zoned;
use jiff::tz::TimeZone;
use postern_certs::{CertificateContents, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    Action, Authentication, Certificate, Decision, Effect, LoginFacts, Policies, Principal,
    Request, Service,
};

/// A request written as data. Every context field has a default, so a case names only what it
/// is about.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Who asks.
    pub principal: PrincipalSpec,
    /// `enroll`, `renew`, `connect` or `imap_login`.
    pub action: String,
    /// The broker's hostname (enroll, renew), the service name (connect) or the mailbox
    /// (imap_login).
    pub resource: String,
    /// The rest of the request.
    #[serde(default)]
    pub context: ContextSpec,
}

/// The principal of a scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSpec {
    /// The user id URI, `<issuer>#<subject>`.
    pub id: String,
    /// A trusted email address.
    #[serde(default)]
    pub email: Option<String>,
    /// A display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Groups the certificate names (entities.json can add more).
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The context of a scenario, with documented defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextSpec {
    /// Where the request comes from. Default `192.0.2.1`.
    pub source_ip: IpAddr,
    /// When: `2026-11-26T09:30:00[Europe/Madrid]`, or an instant such as
    /// `2026-11-26T08:30:00Z` read in the default zone. Default `2026-01-05T10:00:00Z`, a Monday.
    pub time: Option<String>,
    /// `login` or `admin`. Default `login`.
    pub issuance: String,
    /// The login flow. Default `device_code` for `login`, none for `admin`.
    pub flow: Option<String>,
    /// Authentication methods. Default none.
    pub amr: Vec<String>,
    /// Authentication context class. Default none.
    pub acr: Option<String>,
    /// Time since the person authenticated, such as `10m`. Default `0s`.
    pub session_age: String,
    /// The device id. Default `0000000000000000000000000000000a`.
    pub device: String,
    /// The lineage id (one login and its renewals), for revocations. Default none.
    pub lineage: Option<String>,
    /// Age of the certificate (connect, imap_login). Default `0s`.
    pub certificate_age: String,
    /// Time until the certificate ends (connect, imap_login). Default `8h`.
    pub certificate_expires_in: String,
    /// Whether the IdP said the email is verified (enroll, renew). Default `true`.
    pub email_verified: bool,
    /// Whether the IdP sent auth_time (enroll, renew). Default `true`.
    pub auth_time_reported: bool,
    /// The service (connect: its protocol and tags; imap_login: also its name).
    pub service: ServiceSpec,
}

/// The service of a scenario.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSpec {
    /// The service name for imap_login (for connect, the resource is the name). Default `imap`.
    pub name: String,
    /// `tcp` or `imap`. Default `tcp` for connect, `imap` for imap_login.
    pub protocol: Option<String>,
    /// Tags from broker.toml. Default none.
    pub tags: Vec<String>,
}

/// A test case: a scenario and what the policies must answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// What the case shows, for the table.
    pub name: String,
    /// The request.
    #[serde(flatten)]
    pub scenario: Scenario,
    /// `allow` or `deny`.
    pub decision: ExpectedEffect,
    /// When given, exactly the policy ids that must determine the decision (any order).
    #[serde(default)]
    pub reasons: Option<Vec<String>>,
    /// When given, how many evaluation errors there must be.
    #[serde(default)]
    pub errors: Option<usize>,
}

/// The decision a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpectedEffect {
    /// Allowed.
    Allow,
    /// Denied.
    Deny,
}

/// What running a case found.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The decision the policies gave.
    pub decision: Decision,
    /// Why the case failed; empty when it passed.
    pub failures: Vec<String>,
}

/// A scenario that cannot be made into a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScenarioError(String);

/// The time of a scenario without one: Monday 2026-01-05, 10:00 UTC.
const DEFAULT_TIME: i64 = 1_767_607_200;

impl Default for ContextSpec {
    fn default() -> Self {
        Self {
            source_ip: IpAddr::from([192, 0, 2, 1]),
            time: None,
            issuance: "login".into(),
            flow: None,
            amr: Vec::new(),
            acr: None,
            session_age: "0s".into(),
            device: "0000000000000000000000000000000a".into(),
            lineage: None,
            certificate_age: "0s".into(),
            certificate_expires_in: "8h".into(),
            email_verified: true,
            auth_time_reported: true,
            service: ServiceSpec::default(),
        }
    }
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            name: "imap".into(),
            protocol: None,
            tags: Vec::new(),
        }
    }
}

impl Scenario {
    /// The scenario of a certificate: its identity, authentication, device and validity, as
    /// the broker would see them at `now` (context overrides come after).
    pub fn from_certificate(
        contents: &CertificateContents,
        action: &str,
        resource: &str,
        now: SystemTime,
    ) -> Self {
        let identity = &contents.identity;
        let principal = Principal::from_identity(identity);
        let auth = Authentication::from_identity(identity);
        let context = ContextSpec {
            issuance: auth.issuance.into(),
            flow: auth.flow.map(Into::into),
            amr: auth.amr,
            acr: auth.acr,
            session_age: span(auth.auth_time, now),
            device: identity.auth.device.to_string(),
            lineage: Some(identity.auth.lineage.to_string()),
            certificate_age: span(contents.not_before, now),
            certificate_expires_in: span(now, contents.not_after),
            ..ContextSpec::default()
        };
        Self {
            principal: PrincipalSpec {
                id: principal.id,
                email: principal.email,
                name: principal.name,
                groups: principal.groups,
            },
            action: action.into(),
            resource: resource.into(),
            context,
        }
    }

    /// The scenario of a line of the broker's audit trail (a `connect.*`, `session.close`,
    /// `enroll.*` or `renew.*` event): who, from where, when, authenticated how. The action and
    /// resource default to the event's own.
    pub fn from_audit_line(line: &str) -> Result<Self, ScenarioError> {
        let event: Value = serde_json::from_str(line)
            .map_err(|e| ScenarioError(format!("the audit line is not JSON: {e}")))?;
        let text = |pointer: &str| event.pointer(pointer).and_then(Value::as_str);
        let strings = |pointer: &str| -> Vec<String> {
            event
                .pointer(pointer)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let id = text("/user/id").ok_or_else(|| {
            ScenarioError(
                "the audit line names no user (`user.id`); pick a connect, session or login event"
                    .into(),
            )
        })?;
        let action = text("/event/action").unwrap_or_default();
        let (action, resource) = match action.split('.').next() {
            Some("enroll") => ("enroll", String::new()),
            Some("renew") => ("renew", String::new()),
            _ => (
                "connect",
                text("/postern/service").unwrap_or_default().to_owned(),
            ),
        };
        let timestamp = text("/@timestamp").unwrap_or_default();
        let at = timestamp.parse::<jiff::Timestamp>().ok();
        let mut context = ContextSpec {
            time: at.map(|t| t.to_string()),
            amr: strings("/postern/amr"),
            acr: text("/postern/acr").map(Into::into),
            ..ContextSpec::default()
        };
        if let Some(ip) = text("/source/ip").and_then(|ip| ip.parse().ok()) {
            context.source_ip = ip;
        }
        if let Some(issuance) = text("/postern/issuance") {
            context.issuance = issuance.into();
        }
        if let Some(device) = text("/postern/device") {
            context.device = device.into();
        }
        context.lineage = text("/postern/lineage").map(Into::into);
        if let (Some(auth_time), Some(at)) = (
            text("/postern/auth_time").and_then(|t| t.parse::<jiff::Timestamp>().ok()),
            at,
        ) {
            let seconds = at.as_second().saturating_sub(auth_time.as_second());
            context.session_age = format!("{}s", seconds.max(0));
        }
        Ok(Self {
            principal: PrincipalSpec {
                id: id.into(),
                email: text("/user/email").map(Into::into),
                name: text("/user/full_name").map(Into::into),
                groups: strings("/user/roles"),
            },
            action: action.into(),
            resource,
            context,
        })
    }

    /// Applies `overrides`, a JSON object of context fields, on top of the scenario.
    pub fn override_context(&mut self, overrides: &Value) -> Result<(), ScenarioError> {
        let Value::Object(overrides) = overrides else {
            return Err(ScenarioError(
                "context overrides must be a JSON object, such as {\"amr\": [\"pwd\"]}".into(),
            ));
        };
        let mut current =
            serde_json::to_value(&self.context).map_err(|e| ScenarioError(e.to_string()))?;
        for (key, value) in overrides {
            current[key] = value.clone();
        }
        self.context = serde_json::from_value(current)
            .map_err(|e| ScenarioError(format!("bad context override: {e}")))?;
        Ok(())
    }

    /// Decides the scenario with `policies`. `zone` is the broker's time zone, for times
    /// written without one.
    pub fn decide(&self, policies: &Policies, zone: &TimeZone) -> Result<Decision, ScenarioError> {
        let bad =
            |field: &str, err: &dyn std::fmt::Display| ScenarioError(format!("`{field}`: {err}"));
        let user = UserId::from_uri(&self.principal.id).map_err(|e| bad("principal.id", &e))?;
        let principal = Principal {
            id: self.principal.id.clone(),
            issuer: user.issuer().to_owned(),
            subject: user.subject().to_owned(),
            email: self.principal.email.clone(),
            name: self.principal.name.clone(),
            groups: self.principal.groups.clone(),
        };
        let c = &self.context;
        let (now, at) = self.instant(zone)?;
        let (issuance, flow) = match (c.issuance.as_str(), c.flow.as_deref()) {
            ("login", None | Some("device_code")) => ("login", Some("device_code")),
            ("admin", None) => ("admin", None),
            (issuance, flow) => {
                return Err(ScenarioError(format!(
                    "issuance `{issuance}` with flow `{}`: use `login` (flow `device_code`) or `admin` (no flow)",
                    flow.unwrap_or("")
                )));
            }
        };
        let authentication = Authentication {
            issuance,
            flow,
            amr: c.amr.clone(),
            acr: c.acr.clone(),
            auth_time: shift(at, "context.session_age", &c.session_age, false)?,
        };
        let certificate = Certificate {
            not_before: shift(at, "context.certificate_age", &c.certificate_age, false)?,
            not_after: shift(
                at,
                "context.certificate_expires_in",
                &c.certificate_expires_in,
                true,
            )?,
        };
        let login = LoginFacts {
            email_verified: c.email_verified,
            auth_time_reported: c.auth_time_reported,
        };
        let service = |name: &str, default: &str| Service {
            name: name.to_owned(),
            protocol: c.service.protocol.clone().unwrap_or_else(|| default.into()),
            tags: c.service.tags.clone(),
        };
        let connect_service = service(&self.resource, "tcp");
        let imap_service = service(&c.service.name, "imap");
        let action = match self.action.as_str() {
            "enroll" => Action::Enroll {
                broker: &self.resource,
                login,
            },
            "renew" => Action::Renew {
                broker: &self.resource,
                login,
            },
            "connect" => Action::Connect {
                service: &connect_service,
                certificate,
            },
            "imap_login" => Action::ImapLogin {
                mailbox: &self.resource,
                address: &self.resource,
                service: &imap_service,
                certificate,
            },
            other => {
                return Err(ScenarioError(format!(
                    "unknown action `{other}`: use enroll, renew, connect or imap_login"
                )));
            }
        };
        if self.resource.is_empty() {
            return Err(ScenarioError(
                "no resource: name the broker (enroll, renew), the service (connect) or the mailbox (imap_login), with --resource or \"resource\"".into(),
            ));
        }
        Ok(policies.authorize(&Request {
            principal: &principal,
            authentication: &authentication,
            device: &c.device,
            source: c.source_ip,
            now: &now,
            action,
        }))
    }
}

impl Scenario {
    /// Why the broker would refuse this request before asking the policies: a revocation that
    /// matches its user (by the login and certificate times), lineage or device.
    pub fn revoked(
        &self,
        revocations: &crate::revocations::Revocations,
        zone: &TimeZone,
    ) -> Result<Option<String>, ScenarioError> {
        let c = &self.context;
        let bad =
            |field: &str, err: &dyn std::fmt::Display| ScenarioError(format!("`{field}`: {err}"));
        let (_, at) = self.instant(zone)?;
        let device = c
            .device
            .parse::<postern_certs::DeviceId>()
            .map_err(|e| bad("context.device", &e))?;
        let lineage = c
            .lineage
            .as_deref()
            .map(str::parse::<postern_certs::LineageId>)
            .transpose()
            .map_err(|e| bad("context.lineage", &e))?;
        Ok(revocations.check(&crate::revocations::Subject {
            user: &self.principal.id,
            auth_time: shift(at, "context.session_age", &c.session_age, false)?,
            issued: shift(at, "context.certificate_age", &c.certificate_age, false)?,
            lineage: lineage.as_ref(),
            device: &device,
        }))
    }
}

impl Case {
    /// Runs the case.
    pub fn run(&self, policies: &Policies, zone: &TimeZone) -> Result<Outcome, ScenarioError> {
        let decision = self.scenario.decide(policies, zone)?;
        let mut failures = Vec::new();
        let expected = match self.decision {
            ExpectedEffect::Allow => Effect::Allow,
            ExpectedEffect::Deny => Effect::Deny,
        };
        if decision.effect != expected {
            failures.push(format!(
                "expected {}, got {}",
                expected.as_str(),
                decision.effect.as_str()
            ));
        }
        if let Some(reasons) = &self.reasons {
            let mut want = reasons.clone();
            let mut got = decision.policies.clone();
            want.sort();
            got.sort();
            if want != got {
                failures.push(format!(
                    "expected policies [{}], got [{}]",
                    want.join(", "),
                    got.join(", ")
                ));
            }
        }
        if let Some(errors) = self.errors
            && errors != decision.errors.len()
        {
            failures.push(format!(
                "expected {errors} evaluation errors, got {}: {}",
                decision.errors.len(),
                decision.errors.join("; ")
            ));
        }
        Ok(Outcome { decision, failures })
    }
}

/// Parses the cases of a test file: a JSON array of cases.
pub fn parse_cases(text: &str) -> Result<Vec<Case>, ScenarioError> {
    serde_json::from_str(text)
        .map_err(|e| ScenarioError(format!("line {}, column {}: {e}", e.line(), e.column())))
}

/// An instant — `2026-11-26T09:30:00[Europe/Madrid]` (a local time where it names a zone), or
/// `…Z`, `…+01:00` — as the broker sees it: in `zone`, the broker's time zone. So a case
/// written for Madrid office hours fails, as it should, against a broker set to another zone.
pub fn parse_time(text: &str, zone: &TimeZone) -> Result<Zoned, String> {
    if text.contains('[') {
        return text
            .parse::<Zoned>()
            .map(|local| local.with_time_zone(zone.clone()))
            .map_err(|e| e.to_string());
    }
    text.parse::<jiff::Timestamp>()
        .map(|t| t.to_zoned(zone.clone()))
        .map_err(|e| {
            format!("{e}; write an instant such as 2026-11-26T08:30:00Z or a local time such as 2026-11-26T09:30:00[Europe/Madrid]")
        })
}

impl Scenario {
    /// When the scenario happens: in `zone`, and as whole seconds (as certificate times are).
    fn instant(&self, zone: &TimeZone) -> Result<(Zoned, SystemTime), ScenarioError> {
        let now = match &self.context.time {
            None => jiff::Timestamp::from_second(DEFAULT_TIME)
                .map_err(|e| ScenarioError(format!("`time`: {e}")))?
                .to_zoned(zone.clone()),
            Some(text) => {
                parse_time(text, zone).map_err(|e| ScenarioError(format!("`context.time`: {e}")))?
            }
        };
        let at = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(now.timestamp().as_second()).unwrap_or(0));
        Ok((now, at))
    }
}

/// `at` moved back (or `forward`) by the duration `text`, refusing one out of range.
fn shift(
    at: SystemTime,
    field: &str,
    text: &str,
    forward: bool,
) -> Result<SystemTime, ScenarioError> {
    let duration =
        humantime::parse_duration(text).map_err(|e| ScenarioError(format!("`{field}`: {e}")))?;
    let moved = if forward {
        at.checked_add(duration)
    } else {
        at.checked_sub(duration)
    };
    moved.ok_or_else(|| ScenarioError(format!("`{field}`: `{text}` is out of range")))
}

/// `from` to `to` as a duration string, 0 when `to` is earlier.
fn span(from: SystemTime, to: SystemTime) -> String {
    format!("{}s", to.duration_since(from).unwrap_or_default().as_secs())
}
