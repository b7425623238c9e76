//! Postern's access decisions, in Cedar.
//!
//! This crate holds the Cedar schema (`schema/postern.cedarschema`), the one mapping from what
//! the broker knows about a request — who, which service, from where, how they authenticated —
//! to Cedar entities and context, and [`Policies`]: a validated policy set that answers
//! requests with a [`Decision`] naming the policies that determined it.
//!
//! It has no network code and reads files only in [`Policies::load_dir`]. Time is passed in.

mod directory;
mod index;
mod load;
mod request;
pub mod revocations;
mod scenario;

use std::fmt;

use cedar_policy::{AuthorizationError, Authorizer};

pub use directory::{Directory, DirectoryError};
pub use load::{Diagnostic, ENTITIES_FILE, LoadError, Source};
pub use request::{Action, Authentication, Certificate, LoginFacts, Principal, Request, Service};
pub use scenario::{
    Case, ContextSpec, ExpectedEffect, Outcome, PrincipalSpec, Scenario, ScenarioError,
    ServiceSpec, parse_cases, parse_time,
};

/// The starting policy `postern-broker init` writes: MFA for login, any certificate to any
/// service, nothing for disabled users.
pub const DEFAULT_POLICY: &str = include_str!("../examples/default/default.cedar");

/// The test cases of [`DEFAULT_POLICY`], written beside it by `init`.
pub const DEFAULT_POLICY_TESTS: &str = include_str!("../examples/default/tests/default.json");

/// The schema every policy is validated against, as Cedar source.
pub const SCHEMA: &str = include_str!("../schema/postern.cedarschema");

/// A validated set of policies with the entity data loaded beside them, ready to answer
/// requests. Immutable: reloading builds a new one.
pub struct Policies {
    count: usize,
    directory: Directory,
    index: index::Index,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub effect: Effect,
    /// Ids of the policies that determined the decision: the `permit` policies that allowed it,
    /// or the `forbid` policies that denied it. Empty for a denial because nothing permits.
    pub policies: Vec<String>,
    /// Errors met while evaluating policies. A `permit` that errors is skipped, as Cedar does;
    /// a `forbid` that errors denies (where Cedar would skip it), so that an error never turns
    /// a deny into an allow.
    pub errors: Vec<String>,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    /// At least one `permit` applies and no `forbid` does.
    Allow,
    /// A `forbid` applies, or no `permit` does, or the request could not be built.
    Deny,
}

impl Policies {
    /// How many policies the set holds.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the set holds no policy (it never does: loading refuses an empty set).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The users and groups of `entities.json`.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Decides a request. A request that cannot be put in Cedar's terms is denied, with the
    /// reason among the errors.
    pub fn authorize(&self, request: &Request<'_>) -> Decision {
        match request.to_cedar(None, &self.directory) {
            Ok(request::Built {
                request,
                entities,
                principal,
                action,
                resource,
            }) => {
                let subset = self.index.subset(&action, &principal, &resource, &entities);
                let response = Authorizer::new().is_authorized(&request, &subset, &entities);
                let effect = match response.decision() {
                    cedar_policy::Decision::Allow => Effect::Allow,
                    cedar_policy::Decision::Deny => Effect::Deny,
                };
                let diagnostics = response.diagnostics();
                let errors = diagnostics.errors().map(ToString::to_string).collect();
                // Fail closed: a forbid that could not be evaluated might have applied.
                let failed_forbids: Vec<String> = diagnostics
                    .errors()
                    .filter_map(|error| match error {
                        AuthorizationError::PolicyEvaluationError(error) => {
                            let id = error.policy_id();
                            subset
                                .policy(id)
                                .filter(|p| p.effect() == cedar_policy::Effect::Forbid)
                                .map(|_| id.to_string())
                        }
                        #[allow(unreachable_patterns, reason = "the enum may grow")]
                        _ => None,
                    })
                    .collect();
                if failed_forbids.is_empty() {
                    Decision {
                        effect,
                        policies: diagnostics.reason().map(ToString::to_string).collect(),
                        errors,
                    }
                } else {
                    Decision {
                        effect: Effect::Deny,
                        policies: failed_forbids,
                        errors,
                    }
                }
            }
            Err(err) => Decision {
                effect: Effect::Deny,
                policies: vec![],
                errors: vec![err],
            },
        }
    }
}

impl fmt::Debug for Policies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policies")
            .field("count", &self.count)
            .field("entities", &self.directory.len())
            .finish_non_exhaustive()
    }
}

impl Decision {
    /// Whether the request is allowed.
    pub fn is_allowed(&self) -> bool {
        self.effect == Effect::Allow
    }
}

/// Formats Cedar policy text the way `postern-policy fmt` does. Comments are kept.
pub fn format(text: &str) -> Result<String, String> {
    let config = cedar_policy_formatter::Config {
        line_width: 100,
        indent_width: 2,
    };
    cedar_policy_formatter::policies_str_to_pretty(text, &config).map_err(|e| e.to_string())
}

impl Effect {
    /// `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        }
    }
}
