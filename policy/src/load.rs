//! Loading policy files into a validated [`Policies`] set, with errors that point at a line.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{PolicyId, PolicySet, Schema, ValidationMode, Validator};

use crate::{Directory, Policies, SCHEMA};

/// The file of a policy folder that holds entity data: users and groups beyond the token.
pub const ENTITIES_FILE: &str = "entities.json";

/// A policy file: its name, for messages and policy ids, and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The file name, such as `default.cedar`.
    pub name: String,
    /// The Cedar text.
    pub text: String,
}

/// A problem in a policy file, located for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file name.
    pub file: String,
    /// Line, from 1 (0 when unknown).
    pub line: usize,
    /// Column, from 1 (0 when unknown).
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// Why a policy set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file or the folder could not be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        /// What could not be read.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// There are no policies, so every request would be denied.
    #[error("no policies in `{}`: every request would be denied; add a `.cedar` file (see docs/policy.md)", .0.display())]
    Empty(PathBuf),
    /// The policies do not parse or do not validate against the schema.
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostic>),
    /// The built-in schema does not parse (a bug).
    #[error("the built-in Cedar schema is invalid: {0}")]
    Schema(String),
}

impl Policies {
    /// Loads every `*.cedar` file in `dir` (not its subfolders), in name order, and
    /// `entities.json` when it is there.
    pub fn load_dir(dir: &Path) -> Result<Self, LoadError> {
        let read_err = |path: &Path| {
            let path = path.to_owned();
            move |source| LoadError::Read { path, source }
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_err(dir))? {
            let path = entry.map_err(read_err(dir))?.path();
            if path.extension().is_some_and(|ext| ext == "cedar") && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        let sources = paths
            .iter()
            .map(|path| {
                let text = std::fs::read_to_string(path).map_err(read_err(path))?;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Ok(Source { name, text })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let entities_path = dir.join(ENTITIES_FILE);
        let entities = match std::fs::read_to_string(&entities_path) {
            Ok(text) => Some(Source {
                name: ENTITIES_FILE.to_owned(),
                text,
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(LoadError::Read {
                    path: entities_path,
                    source,
                });
            }
        };
        Self::from_sources(&sources, entities.as_ref()).map_err(|err| match err {
            LoadError::Empty(_) => LoadError::Empty(dir.to_owned()),
            other => other,
        })
    }

    /// Parses and validates policies, and the entity data of `entities`, from memory.
    ///
    /// A policy's id is its `@id("…")` annotation, or `<file>#<n>` for the n-th policy of a file
    /// without one. Ids must be unique across files.
    pub fn from_sources(sources: &[Source], entities: Option<&Source>) -> Result<Self, LoadError> {
        let schema = Schema::from_cedarschema_str(SCHEMA)
            .map_err(|e| LoadError::Schema(e.to_string()))?
            .0;
        let mut set = PolicySet::new();
        let mut origin: HashMap<String, usize> = HashMap::new();
        let mut problems = Vec::new();
        for (index, source) in sources.iter().enumerate() {
            let file_set = match PolicySet::from_str(&source.text) {
                Ok(file_set) => file_set,
                Err(errors) => {
                    problems.extend(errors.iter().map(|e| Diagnostic::new(source, e)));
                    continue;
                }
            };
            if file_set.templates().next().is_some() {
                problems.push(Diagnostic::unlocated(
                    source,
                    "policy templates are not supported",
                ));
            }
            let mut policies: Vec<_> = file_set.policies().collect();
            policies.sort_by_key(|p| {
                p.id()
                    .to_string()
                    .trim_start_matches("policy")
                    .parse::<usize>()
                    .unwrap_or(0)
            });
            for (n, policy) in policies.into_iter().enumerate() {
                let id = policy
                    .annotation("id")
                    .map_or_else(|| format!("{}#{}", source.name, n + 1), str::to_owned);
                if let Some(message) = non_canonical_user(policy) {
                    problems.push(Diagnostic::unlocated(
                        source,
                        &format!("policy `{id}`: {message}"),
                    ));
                }
                if let Some(&first) = origin.get(&id) {
                    let message = format!(
                        "policy id `{id}` is already used in `{}`",
                        sources[first].name
                    );
                    problems.push(Diagnostic::unlocated(source, &message));
                    continue;
                }
                if let Err(err) = set.add(policy.new_id(PolicyId::new(&id))) {
                    problems.push(Diagnostic::unlocated(source, &err.to_string()));
                    continue;
                }
                origin.insert(id, index);
            }
        }
        if problems.is_empty() {
            let validation = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
            for error in validation.validation_errors() {
                match origin.get(&error.policy_id().to_string()) {
                    Some(&index) => problems.push(Diagnostic::new(&sources[index], error)),
                    // Never expected; refused all the same, never passed over.
                    None => problems.push(Diagnostic {
                        file: String::new(),
                        line: 0,
                        column: 0,
                        message: error.to_string(),
                    }),
                }
            }
        }
        let directory = match entities.map(|source| (source, Directory::parse(&source.text))) {
            None => Directory::default(),
            Some((_, Ok(directory))) => directory,
            Some((source, Err(err))) => {
                problems.push(Diagnostic {
                    file: source.name.clone(),
                    line: err.line,
                    column: err.column,
                    message: err.message,
                });
                Directory::default()
            }
        };
        if !problems.is_empty() {
            return Err(LoadError::Invalid(problems));
        }
        if origin.is_empty() {
            return Err(LoadError::Empty(PathBuf::new()));
        }
        Ok(Policies {
            index: crate::index::Index::new(&set),
            count: origin.len(),
            directory,
        })
    }
}

impl Diagnostic {
    fn new(source: &Source, error: &dyn miette::Diagnostic) -> Self {
        let offset = error
            .labels()
            .and_then(|mut labels| labels.next())
            .map(|label| label.offset());
        let (line, column) = offset.map_or((0, 0), |offset| line_column(&source.text, offset));
        let mut message = error.to_string();
        if let Some(help) = error.help() {
            message.push_str(&format!(" (help: {help})"));
        }
        Self {
            file: source.name.clone(),
            line,
            column,
            message,
        }
    }

    fn unlocated(source: &Source, message: &str) -> Self {
        Self {
            file: source.name.clone(),
            line: 0,
            column: 0,
            message: message.to_owned(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

/// A `User` in a policy's principal scope that is not written as certificates carry user ids
/// would never match: a `forbid` naming it would silently not apply.
fn non_canonical_user(policy: &cedar_policy::Policy) -> Option<String> {
    let uid = match policy.principal_constraint() {
        cedar_policy::PrincipalConstraint::Eq(uid)
        | cedar_policy::PrincipalConstraint::In(uid)
        | cedar_policy::PrincipalConstraint::IsIn(_, uid) => uid,
        _ => return None,
    };
    if uid.type_name().to_string() != "User" {
        return None;
    }
    let id = uid.id().unescaped();
    match postern_certs::UserId::from_uri(id) {
        Ok(user) if user.uri() == id => None,
        Ok(user) => Some(format!(
            "`User::\"{id}\"` would never match: certificates write this user as `User::\"{}\"`",
            user.uri()
        )),
        Err(err) => Some(format!(
            "`User::\"{id}\"` would never match: a user id is `<issuer>#<subject>` as in the certificate ({err})"
        )),
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn render(problems: &[Diagnostic]) -> String {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    format!("invalid policies:\n  {}", lines.join("\n  "))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{Action, Authentication, Certificate, Effect, Principal, Request, Service};

    fn source(name: &str, text: &str) -> Source {
        Source {
            name: name.into(),
            text: text.into(),
        }
    }

    fn connect(policies: &Policies, groups: &[&str], service: &str) -> crate::Decision {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let principal = Principal {
            id: "https://idp.example.org#alice".into(),
            issuer: "https://idp.example.org".into(),
            subject: "alice".into(),
            email: Some("alice@example.org".into()),
            name: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        };
        let authentication = Authentication {
            issuance: "login",
            flow: Some("device_code"),
            amr: vec!["pwd".into(), "otp".into()],
            acr: None,
            auth_time: now - Duration::from_secs(600),
        };
        let service = Service {
            name: service.into(),
            protocol: "tcp".into(),
            tags: vec![],
        };
        let zoned = jiff::Timestamp::from_second(1_800_000_000)
            .unwrap()
            .to_zoned(jiff::tz::TimeZone::UTC);
        policies.authorize(&Request {
            principal: &principal,
            authentication: &authentication,
            device: "0011",
            source: "::ffff:192.0.2.1".parse::<IpAddr>().unwrap(),
            now: &zoned,
            action: Action::Connect {
                service: &service,
                certificate: Certificate {
                    not_before: now - Duration::from_secs(60),
                    not_after: now + Duration::from_secs(3600),
                },
            },
        })
    }

    #[test]
    fn decisions_name_their_policies() {
        let policies = Policies::from_sources(&[
            source("a.cedar", "@id(\"staff-mail\")\npermit (principal in Group::\"staff\", action == Action::\"connect\", resource == Service::\"imap\");"),
            source("b.cedar", "forbid (principal, action, resource) when { context.source_ip.isInRange(ip(\"192.0.2.0/24\")) && resource.name == \"ssh\" };\npermit (principal, action, resource == Service::\"ssh\");"),
        ], None)
        .unwrap();
        assert_eq!(policies.len(), 3);

        let allowed = connect(&policies, &["staff"], "imap");
        assert_eq!(
            (allowed.effect, allowed.policies),
            (Effect::Allow, vec!["staff-mail".to_owned()])
        );
        let not_staff = connect(&policies, &[], "imap");
        assert_eq!(
            (not_staff.effect, not_staff.policies),
            (Effect::Deny, vec![])
        );
        let forbidden = connect(&policies, &["staff"], "ssh");
        assert_eq!(
            (forbidden.effect, forbidden.policies),
            (Effect::Deny, vec!["b.cedar#1".to_owned()])
        );
    }

    #[test]
    fn context_carries_authentication() {
        let policies = Policies::from_sources(&[source(
            "mfa.cedar",
            "permit (principal, action == Action::\"connect\", resource) when { context.authentication.amr.contains(\"otp\") && context.authentication.age_seconds == 600 && context.certificate.expires_in_seconds == 3600 && context.certificate.age_seconds == 60 && context.time.hour == 8 && context.time.weekday == \"friday\" && context.time.datetime == datetime(\"2027-01-15T08:00:00Z\") && principal has email && principal.email == \"alice@example.org\" };",
        )], None)
        .unwrap();
        assert!(connect(&policies, &[], "imap").is_allowed());
    }

    #[test]
    fn user_ids_in_scopes_must_be_written_as_certificates_carry_them() {
        for (user, expected) in [
            ("alice", "`<issuer>#<subject>`"),
            ("https://idp.example.org#Alice Smith", "would never match"),
        ] {
            let err = Policies::from_sources(
                &[source(
                    "p.cedar",
                    &format!("forbid (principal == User::\"{user}\", action, resource);"),
                )],
                None,
            )
            .unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
        assert!(
            Policies::from_sources(
                &[source(
                    "p.cedar",
                    "forbid (principal == User::\"https://idp.example.org#alice\", action, resource);"
                )],
                None
            )
            .is_ok()
        );
    }

    #[test]
    fn a_forbid_that_cannot_be_evaluated_denies() {
        let policies = Policies::from_sources(
            &[source(
                "p.cedar",
                "@id(\"all\") permit (principal, action, resource);\n@id(\"overflow\") forbid (principal, action, resource) when { 9223372036854775807 + context.authentication.age_seconds + 1 > 0 };\n@id(\"bad-permit\") permit (principal, action, resource) when { 9223372036854775807 + context.authentication.age_seconds + 1 > 0 };",
            )],
            None,
        )
        .unwrap();
        let decision = connect(&policies, &[], "imap");
        assert_eq!(decision.effect, Effect::Deny);
        assert_eq!(decision.policies, ["overflow"]);
        assert_eq!(decision.errors.len(), 2, "{:?}", decision.errors);
    }

    #[test]
    fn errors_point_at_file_line_and_column() {
        let err = Policies::from_sources(
            &[source(
                "bad.cedar",
                "\n\npermit (principal, action, resource) when { principal.emial == \"x\" };",
            )],
            None,
        )
        .unwrap_err();
        let LoadError::Invalid(problems) = &err else {
            panic!("{err}")
        };
        assert_eq!(
            (problems[0].file.as_str(), problems[0].line),
            ("bad.cedar", 3),
            "{err}"
        );
        assert!(problems[0].column > 1, "{err}");
        assert!(err.to_string().contains("emial"), "{err}");

        let err = Policies::from_sources(
            &[source(
                "syntax.cedar",
                "permit (principal, action, resource",
            )],
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid policies:\n  syntax.cedar:1:"),
            "{err}"
        );

        let dup = "@id(\"x\") permit (principal, action, resource);";
        let err =
            Policies::from_sources(&[source("one.cedar", dup), source("two.cedar", dup)], None)
                .unwrap_err();
        assert!(
            err.to_string().contains("already used in `one.cedar`"),
            "{err}"
        );

        assert!(matches!(
            Policies::from_sources(&[source("empty.cedar", "// nothing")], None),
            Err(LoadError::Empty(_))
        ));
    }

    #[test]
    fn load_dir_reads_only_cedar_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("z.cedar"),
            "permit (principal, action, resource);",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not cedar").unwrap();
        assert_eq!(Policies::load_dir(dir.path()).unwrap().len(), 1);
        let empty = tempfile::tempdir().unwrap();
        let err = Policies::load_dir(empty.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains(&empty.path().display().to_string()),
            "{err}"
        );
    }
}
