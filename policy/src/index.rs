//! Which policies can apply to a request, from their scopes alone.
//!
//! Cedar evaluates every policy of a set for every request. A policy whose scope names an
//! action, a principal (`principal == …`, `principal in …`) or a resource the request does not
//! have can neither apply nor fail, so leaving it out changes nothing in the answer — not the
//! decision, not the determining policies, not the errors. The index keeps, per policy, what its
//! scope requires, and hands out the subset of policies a request can match, cached by what
//! decides the subset (the action and which scope entities the request's principal and resource
//! are, or are in).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use cedar_policy::{
    ActionConstraint, Entities, EntityUid, Policy, PolicySet, PrincipalConstraint,
    ResourceConstraint,
};

/// The scopes of a policy set, and the subsets handed out so far.
#[derive(Debug)]
pub(crate) struct Index {
    scopes: Vec<Scope>,
    /// Every entity a principal scope names, numbered.
    principal_keys: HashMap<EntityUid, u32>,
    /// Every entity a resource scope names, numbered.
    resource_keys: HashMap<EntityUid, u32>,
    subsets: Mutex<Subsets>,
}

/// The subsets handed out, and how many policies they hold together.
#[derive(Debug, Default)]
struct Subsets {
    sets: HashMap<SubsetKey, Arc<PolicySet>>,
    policies: usize,
}

/// What one policy's scope requires.
#[derive(Debug)]
struct Scope {
    policy: Policy,
    /// The actions it can apply to; `None` for any.
    actions: Option<Vec<EntityUid>>,
    /// The entity the principal must be or be in; `None` for any.
    principal: Option<u32>,
    /// The entity the resource must be or be in; `None` for any.
    resource: Option<u32>,
}

/// What decides the subset for a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SubsetKey {
    action: EntityUid,
    principal: Vec<u32>,
    resource: Vec<u32>,
}

/// Subsets kept before the cache starts over: enough for every combination of groups, services
/// and actions a broker sees, small enough that a flood of distinct ones costs little memory.
const MAX_SUBSETS: usize = 4096;

/// Policies kept in all subsets together (each a copy, with its text) before the cache starts
/// over: tens of megabytes at most.
const MAX_CACHED_POLICIES: usize = 32_768;

impl Index {
    pub(crate) fn new(set: &PolicySet) -> Self {
        let mut principal_keys = HashMap::new();
        let mut resource_keys = HashMap::new();
        let number = |keys: &mut HashMap<EntityUid, u32>, uid: EntityUid| {
            let next = u32::try_from(keys.len()).unwrap_or(u32::MAX);
            *keys.entry(uid).or_insert(next)
        };
        let scopes = set
            .policies()
            .map(|policy| {
                let actions = match policy.action_constraint() {
                    ActionConstraint::Any => None,
                    ActionConstraint::Eq(action) => Some(vec![action]),
                    ActionConstraint::In(actions) => Some(actions),
                };
                let principal = match policy.principal_constraint() {
                    PrincipalConstraint::Any | PrincipalConstraint::Is(_) => None,
                    PrincipalConstraint::Eq(uid)
                    | PrincipalConstraint::In(uid)
                    | PrincipalConstraint::IsIn(_, uid) => Some(number(&mut principal_keys, uid)),
                };
                let resource = match policy.resource_constraint() {
                    ResourceConstraint::Any | ResourceConstraint::Is(_) => None,
                    ResourceConstraint::Eq(uid)
                    | ResourceConstraint::In(uid)
                    | ResourceConstraint::IsIn(_, uid) => Some(number(&mut resource_keys, uid)),
                };
                Scope {
                    policy: policy.clone(),
                    actions,
                    principal,
                    resource,
                }
            })
            .collect();
        Self {
            scopes,
            principal_keys,
            resource_keys,
            subsets: Mutex::new(Subsets::default()),
        }
    }

    /// The policies that can apply to a request of `action` by `principal` on `resource`.
    ///
    /// Actions are matched by equality: Postern's actions have no groups.
    pub(crate) fn subset(
        &self,
        action: &EntityUid,
        principal: &EntityUid,
        resource: &EntityUid,
        entities: &Entities,
    ) -> Arc<PolicySet> {
        let key = SubsetKey {
            action: action.clone(),
            principal: matched(&self.principal_keys, principal, entities),
            resource: matched(&self.resource_keys, resource, entities),
        };
        let mut subsets = self
            .subsets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(subset) = subsets.sets.get(&key) {
            return subset.clone();
        }
        let principal: HashSet<u32> = key.principal.iter().copied().collect();
        let resource: HashSet<u32> = key.resource.iter().copied().collect();
        let policies = self.scopes.iter().filter(|scope| {
            scope
                .actions
                .as_ref()
                .is_none_or(|actions| actions.contains(action))
                && scope.principal.is_none_or(|p| principal.contains(&p))
                && scope.resource.is_none_or(|r| resource.contains(&r))
        });
        // Adding policies that were already one set's members cannot fail.
        let subset = Arc::new(
            PolicySet::from_policies(policies.map(|scope| scope.policy.clone()))
                .unwrap_or_default(),
        );
        let size = subset.policies().count();
        if subsets.sets.len() >= MAX_SUBSETS || subsets.policies + size > MAX_CACHED_POLICIES {
            subsets.sets.clear();
            subsets.policies = 0;
        }
        subsets.policies += size;
        subsets.sets.insert(key, subset.clone());
        subset
    }
}

impl Index {
    /// Every policy, for comparing the subsets with the whole in tests.
    #[cfg(test)]
    pub(crate) fn whole(&self) -> PolicySet {
        PolicySet::from_policies(self.scopes.iter().map(|s| s.policy.clone())).unwrap_or_default()
    }
}

/// The numbers of the scope entities that `uid` is, or is in.
fn matched(keys: &HashMap<EntityUid, u32>, uid: &EntityUid, entities: &Entities) -> Vec<u32> {
    if keys.is_empty() {
        return Vec::new();
    }
    let mut found: Vec<u32> = keys.get(uid).copied().into_iter().collect();
    if let Some(ancestors) = entities.ancestors(uid) {
        found.extend(ancestors.filter_map(|a| keys.get(a).copied()));
    }
    found.sort_unstable();
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::{Duration, SystemTime};

    use cedar_policy::Authorizer;

    use crate::request::Built;
    use crate::{
        Action, Authentication, Certificate, LoginFacts, Policies, Principal, Request, Service,
        Source,
    };

    /// Scoped and unscoped policies, permits and forbids, one that errors.
    const POLICIES: &str = r#"
        @id("login") permit (principal, action in [Action::"enroll", Action::"renew"], resource is Broker)
            when { context.authentication.amr.contains("otp") };
        @id("staff-imap") permit (principal in Group::"staff", action == Action::"connect", resource == Service::"imap");
        @id("finance-ssh") permit (principal in Group::"finance", action == Action::"connect", resource == Service::"ssh");
        @id("alice-any") permit (principal == User::"https://idp.example.org#alice", action, resource);
        @id("office") forbid (principal in Group::"support", action == Action::"connect", resource)
            unless { context.time.hour >= 8 && context.time.hour < 18 };
        @id("tagged-admin") forbid (principal, action == Action::"connect", resource)
            when { resource.tags.contains("admin") } unless { principal in Group::"admins" };
        @id("errors") permit (principal, action == Action::"connect", resource is Service)
            when { 9223372036854775807 + context.authentication.age_seconds + 1 > 0 };
        @id("broker-only") forbid (principal, action, resource == Broker::"other.example.org");
        @id("nets") forbid (principal is User, action, resource)
            unless { context.source_ip.isInRange(ip("10.0.0.0/8")) || principal in Group::"remote" };
    "#;

    #[test]
    fn the_subset_decides_exactly_as_the_whole_set() {
        let policies = Policies::from_sources(
            &[Source {
                name: "p.cedar".into(),
                text: POLICIES.into(),
            }],
            None,
        )
        .unwrap();
        // With the schema, Cedar checks that the mapping builds what the schema says.
        let schema = cedar_policy::Schema::from_cedarschema_str(crate::SCHEMA)
            .unwrap()
            .0;
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let groups: [&[&str]; 5] = [
            &[],
            &["staff"],
            &["finance", "remote"],
            &["support", "staff"],
            &["admins", "remote"],
        ];
        let services = [
            ("imap", vec![]),
            ("ssh", vec!["admin".to_owned()]),
            ("web", vec![]),
        ];
        let (mut compared, mut allowed, mut errored) = (0, 0, 0);
        for subject in ["alice", "bob"] {
            for groups in groups {
                for hour in [7, 12] {
                    for source in ["10.1.2.3", "192.0.2.1"] {
                        let principal = Principal {
                            id: format!("https://idp.example.org#{subject}"),
                            issuer: "https://idp.example.org".into(),
                            subject: subject.into(),
                            email: (subject == "alice").then(|| "alice@example.org".into()),
                            name: None,
                            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
                        };
                        let authentication = Authentication {
                            issuance: "login",
                            flow: Some("device_code"),
                            amr: vec!["pwd".into(), "otp".into()],
                            acr: None,
                            auth_time: now,
                        };
                        let zoned = jiff::Timestamp::from_second(1_800_000_000 + (hour - 8) * 3600)
                            .unwrap()
                            .to_zoned(jiff::tz::TimeZone::UTC);
                        let login = LoginFacts {
                            email_verified: true,
                            auth_time_reported: true,
                        };
                        let service_list: Vec<Service> = services
                            .iter()
                            .map(|(name, tags)| Service {
                                name: (*name).into(),
                                protocol: "tcp".into(),
                                tags: tags.clone(),
                            })
                            .collect();
                        let mut actions = vec![
                            Action::Enroll {
                                broker: "gw.example.org",
                                login,
                            },
                            Action::Renew {
                                broker: "other.example.org",
                                login,
                            },
                        ];
                        for service in &service_list {
                            actions.push(Action::Connect {
                                service,
                                certificate: Certificate {
                                    not_before: now,
                                    not_after: now,
                                },
                            });
                        }
                        actions.push(Action::ImapLogin {
                            mailbox: "alice@example.org",
                            address: "alice@example.org",
                            service: &service_list[0],
                            certificate: Certificate {
                                not_before: now,
                                not_after: now,
                            },
                        });
                        for action in actions {
                            let request = Request {
                                principal: &principal,
                                authentication: &authentication,
                                device: "00",
                                source: source.parse::<IpAddr>().unwrap(),
                                now: &zoned,
                                action,
                            };
                            let indexed = policies.authorize(&request);
                            let Built {
                                request, entities, ..
                            } = request
                                .to_cedar(Some(&schema), &policies.directory)
                                .unwrap();
                            let whole = Authorizer::new().is_authorized(
                                &request,
                                &policies.index.whole(),
                                &entities,
                            );
                            let mut reasons: Vec<String> = whole
                                .diagnostics()
                                .reason()
                                .map(ToString::to_string)
                                .collect();
                            let mut indexed_reasons = indexed.policies.clone();
                            reasons.sort();
                            indexed_reasons.sort();
                            assert_eq!(indexed_reasons, reasons, "{request}");
                            assert_eq!(
                                indexed.errors.len(),
                                whole.diagnostics().errors().count(),
                                "{request}"
                            );
                            assert_eq!(
                                indexed.is_allowed(),
                                whole.decision() == cedar_policy::Decision::Allow,
                                "{request}"
                            );
                            compared += 1;
                            allowed += usize::from(indexed.is_allowed());
                            errored += usize::from(!indexed.errors.is_empty());
                        }
                    }
                }
            }
        }
        assert_eq!(compared, 2 * 5 * 2 * 2 * 6);
        assert!(
            allowed > 0 && allowed < compared && errored > 0,
            "{allowed} allowed, {errored} with errors"
        );
    }
}
