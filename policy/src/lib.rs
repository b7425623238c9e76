//! Postern's access decisions, in Cedar.
//!
//! This crate holds the Cedar schema (`schema/postern.cedarschema`), the one mapping from what
//! the broker knows about a request — who, which service, from where, how they authenticated —
//! to Cedar entities and context, and [`Policies`]: a validated policy set that answers
//! requests with a [`Decision`] naming the policies that determined it.
//!
//! It has no network code and reads files only in [`Policies::load_dir`]. Time is passed in.

mod load;
mod request;

use std::fmt;

use cedar_policy::{Authorizer, PolicySet, Schema};

pub use load::{Diagnostic, LoadError, Source};
pub use request::{Authentication, ConnectRequest, LoginAction, LoginRequest, Principal, Service};

/// The schema every policy is validated against, as Cedar source.
pub const SCHEMA: &str = include_str!("../schema/postern.cedarschema");

/// A validated set of policies, ready to answer requests. Immutable: reloading builds a new one.
pub struct Policies {
    set: PolicySet,
    schema: Schema,
    count: usize,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub effect: Effect,
    /// Ids of the policies that determined the decision: the `permit` policies that allowed it,
    /// or the `forbid` policies that denied it. Empty for a denial because nothing permits.
    pub policies: Vec<String>,
    /// Errors met while evaluating policies. A policy that errors is skipped, which can only
    /// turn an allow into a deny, never the reverse.
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

    /// Decides whether `request.principal` may open a stream to `request.service`.
    pub fn authorize_connect(&self, request: &ConnectRequest<'_>) -> Decision {
        self.decide(request.to_cedar(&self.schema))
    }

    /// Decides whether a login may be certified (`enroll`) or renewed (`renew`).
    pub fn authorize_login(&self, request: &LoginRequest<'_>) -> Decision {
        self.decide(request.to_cedar(&self.schema))
    }

    fn decide(
        &self,
        built: Result<(cedar_policy::Request, cedar_policy::Entities), String>,
    ) -> Decision {
        match built {
            Ok((request, entities)) => {
                let response = Authorizer::new().is_authorized(&request, &self.set, &entities);
                let effect = match response.decision() {
                    cedar_policy::Decision::Allow => Effect::Allow,
                    cedar_policy::Decision::Deny => Effect::Deny,
                };
                let diagnostics = response.diagnostics();
                Decision {
                    effect,
                    policies: diagnostics.reason().map(ToString::to_string).collect(),
                    errors: diagnostics.errors().map(ToString::to_string).collect(),
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
            .finish_non_exhaustive()
    }
}

impl Decision {
    /// Whether the request is allowed.
    pub fn is_allowed(&self) -> bool {
        self.effect == Effect::Allow
    }
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
