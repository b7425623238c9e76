//! `entities.json`: what the security team says about users and groups beyond the token —
//! group memberships, nested groups, a trusted email, tags, disabled users.
//!
//! The file uses Cedar's entity JSON format, limited to what the schema lets it say: `User`
//! entities with the attributes `email`, `name`, `disabled` and `tags`, `Group` entities without
//! attributes, and `Group` parents.

use std::collections::{HashMap, HashSet, VecDeque};

use cedar_policy::Entity;
use postern_certs::UserId;
use serde::Deserialize;
use serde_json::Value;

use crate::request::{Principal, UserAttributes, uid, user_entity};

/// The users and groups of `entities.json`, checked. Empty when there is no such file.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    users: HashMap<String, Member>,
    /// Group id → the groups it is a member of.
    groups: HashMap<String, Vec<String>>,
}

/// A user as `entities.json` describes them.
#[derive(Debug, Clone, Default)]
struct Member {
    attributes: UserAttributes,
    groups: Vec<String>,
}

/// A problem in `entities.json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DirectoryError {
    /// Line of the problem, from 1 (0 when it concerns a whole entity).
    pub line: usize,
    /// Column, from 1 (0 when unknown).
    pub column: usize,
    /// What is wrong and what to do.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntity {
    uid: RawUid,
    #[serde(default)]
    attrs: serde_json::Map<String, Value>,
    #[serde(default)]
    parents: Vec<RawUid>,
}

/// `{"type": …, "id": …}`, or Cedar's escaped form `{"__entity": {"type": …, "id": …}}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawUid {
    Plain {
        #[serde(rename = "type")]
        kind: String,
        id: String,
    },
    Escaped {
        __entity: Box<RawUid>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUserAttrs {
    issuer: Option<String>,
    subject: Option<String>,
    email: Option<String>,
    name: Option<String>,
    disabled: Option<bool>,
    tags: Option<Vec<String>>,
    mailboxes: Option<Vec<String>>,
}

impl Directory {
    /// Parses and checks `entities.json` text.
    pub fn parse(text: &str) -> Result<Self, DirectoryError> {
        let raw: Vec<RawEntity> = serde_json::from_str(text).map_err(|e| DirectoryError {
            line: e.line(),
            column: e.column(),
            message: format!(
                "{e}; the file is a JSON array of Cedar entities such as {{\"uid\": {{\"type\": \"User\", \"id\": \"https://idp.example.org#alice\"}}, \"attrs\": {{}}, \"parents\": [{{\"type\": \"Group\", \"id\": \"staff\"}}]}}"
            ),
        })?;
        let mut directory = Directory::default();
        for (index, entity) in raw.into_iter().enumerate() {
            let (kind, id) = entity.uid.parts();
            let at = |message: String| DirectoryError {
                line: 0,
                column: 0,
                message: format!("entity {} (`{kind}::\"{id}\"`): {message}", index + 1),
            };
            let mut groups = Vec::new();
            for parent in &entity.parents {
                match parent.parts() {
                    ("Group", group) => groups.push(group.to_owned()),
                    (other, parent) => {
                        return Err(at(format!(
                            "its parent `{other}::\"{parent}\"` is not a Group; only groups can contain users and groups"
                        )));
                    }
                }
            }
            match kind {
                "User" => {
                    let user = UserId::from_uri(id).map_err(|e| {
                        at(format!("the id must be the user id URI `<issuer>#<subject>` as in the certificate: {e}"))
                    })?;
                    let attrs: RawUserAttrs =
                        serde_json::from_value(Value::Object(entity.attrs)).map_err(|e| {
                            at(format!(
                                "{e}; a User may have email, name, disabled (Bool), tags and mailboxes (Sets of String)"
                            ))
                        })?;
                    if attrs.issuer.as_deref().is_some_and(|i| i != user.issuer())
                        || attrs
                            .subject
                            .as_deref()
                            .is_some_and(|s| s != user.subject())
                    {
                        return Err(at(
                            "its issuer or subject attribute differs from its id; leave them out"
                                .into(),
                        ));
                    }
                    let member = Member {
                        attributes: UserAttributes {
                            email: attrs.email,
                            name: attrs.name,
                            disabled: attrs.disabled,
                            tags: attrs.tags,
                            mailboxes: attrs.mailboxes,
                        },
                        groups,
                    };
                    if directory.users.insert(id.to_owned(), member).is_some() {
                        return Err(at("this user is listed twice; merge the entries".into()));
                    }
                }
                "Group" => {
                    if !entity.attrs.is_empty() {
                        return Err(at("a Group has no attributes".into()));
                    }
                    if directory.groups.insert(id.to_owned(), groups).is_some() {
                        return Err(at("this group is listed twice; merge the entries".into()));
                    }
                }
                other => {
                    return Err(at(format!(
                        "entities.json describes users and groups only, not `{other}` (services come from broker.toml)"
                    )));
                }
            }
        }
        directory.check_cycles()?;
        Ok(directory)
    }

    /// How many users and groups the file describes.
    pub fn len(&self) -> usize {
        self.users.len() + self.groups.len()
    }

    /// Whether the file describes nobody.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids of the users whose `email` attribute is `email` (compared without case).
    pub fn users_with_email(&self, email: &str) -> Vec<&str> {
        let mut ids: Vec<&str> = self
            .users
            .iter()
            .filter(|(_, m)| {
                m.attributes
                    .email
                    .as_deref()
                    .is_some_and(|e| e.eq_ignore_ascii_case(email))
            })
            .map(|(id, _)| id.as_str())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The `User` entity, merged from the token and this file, and every group it is in,
    /// directly or through other groups.
    ///
    /// The file's attributes win over the token's: the file is what the security team controls.
    /// Groups are the union of both.
    pub(crate) fn principal_entities(&self, principal: &Principal) -> Result<Vec<Entity>, String> {
        let member = self.users.get(&principal.id);
        let file = member.map(|m| &m.attributes);
        let attributes = UserAttributes {
            email: file
                .and_then(|a| a.email.clone())
                .or_else(|| principal.email.clone()),
            name: file
                .and_then(|a| a.name.clone())
                .or_else(|| principal.name.clone()),
            disabled: file.and_then(|a| a.disabled),
            tags: file.and_then(|a| a.tags.clone()),
            mailboxes: file.and_then(|a| a.mailboxes.clone()),
        };
        let mut direct: Vec<&str> = principal.groups.iter().map(String::as_str).collect();
        if let Some(member) = member {
            direct.extend(member.groups.iter().map(String::as_str));
        }
        let parents = direct
            .iter()
            .map(|g| uid("Group", g))
            .collect::<Result<HashSet<_>, _>>()?;
        let mut entities = vec![user_entity(principal, &attributes, parents)?];
        let mut seen: HashSet<&str> = HashSet::new();
        let mut queue: VecDeque<&str> = direct.into_iter().collect();
        while let Some(group) = queue.pop_front() {
            if !seen.insert(group) {
                continue;
            }
            let parents = self.groups.get(group).map_or(&[][..], Vec::as_slice);
            queue.extend(parents.iter().map(String::as_str));
            let parents = parents
                .iter()
                .map(|g| uid("Group", g))
                .collect::<Result<HashSet<_>, _>>()?;
            entities.push(Entity::new_no_attrs(uid("Group", group)?, parents));
        }
        Ok(entities)
    }

    /// Refuses a group that is, through others, a member of itself.
    fn check_cycles(&self) -> Result<(), DirectoryError> {
        for start in self.groups.keys() {
            let mut seen = HashSet::new();
            let mut queue: VecDeque<&str> = self.groups[start].iter().map(String::as_str).collect();
            while let Some(group) = queue.pop_front() {
                if group == start {
                    return Err(DirectoryError {
                        line: 0,
                        column: 0,
                        message: format!(
                            "group `{start}` is a member of itself through its parents; remove one link of the loop"
                        ),
                    });
                }
                if seen.insert(group) {
                    queue.extend(
                        self.groups
                            .get(group)
                            .into_iter()
                            .flatten()
                            .map(String::as_str),
                    );
                }
            }
        }
        Ok(())
    }
}

impl RawUid {
    fn parts(&self) -> (&str, &str) {
        match self {
            RawUid::Plain { kind, id } => (kind, id),
            RawUid::Escaped { __entity } => __entity.parts(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_nest_and_attributes_merge() {
        let directory = Directory::parse(
            r#"[
              {"uid": {"type": "User", "id": "https://idp.example.org#alice"},
               "attrs": {"disabled": true, "email": "alice@corp.example", "tags": ["contractor"]},
               "parents": [{"type": "Group", "id": "finance"}]},
              {"uid": {"__entity": {"type": "Group", "id": "finance"}}, "parents": [{"type": "Group", "id": "staff"}]}
            ]"#,
        )
        .unwrap();
        assert_eq!(directory.len(), 2);
        assert_eq!(
            directory.users_with_email("ALICE@corp.example"),
            ["https://idp.example.org#alice"]
        );
        let principal = Principal {
            id: "https://idp.example.org#alice".into(),
            issuer: "https://idp.example.org".into(),
            subject: "alice".into(),
            email: Some("alice@home.example".into()),
            name: None,
            groups: vec!["vpn".into()],
        };
        let entities = directory.principal_entities(&principal).unwrap();
        let ids: HashSet<String> = entities.iter().map(|e| e.uid().to_string()).collect();
        assert_eq!(
            ids,
            HashSet::from([
                r#"User::"https://idp.example.org#alice""#.to_owned(),
                r#"Group::"vpn""#.to_owned(),
                r#"Group::"finance""#.to_owned(),
                r#"Group::"staff""#.to_owned(),
            ])
        );
        let user = &entities[0];
        assert_eq!(
            user.attr("email").unwrap().unwrap().to_string(),
            r#""alice@corp.example""#
        );
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (
                "[{\"uid\": {\"type\": \"User\", \"id\": \"alice\"}}]",
                "user id URI",
            ),
            (
                "[{\"uid\": {\"type\": \"User\", \"id\": \"https://i.example#a\"}, \"attrs\": {\"department\": \"x\"}}]",
                "department",
            ),
            (
                "[{\"uid\": {\"type\": \"Service\", \"id\": \"imap\"}}]",
                "users and groups only",
            ),
            (
                "[{\"uid\": {\"type\": \"Group\", \"id\": \"a\"}, \"parents\": [{\"type\": \"Group\", \"id\": \"b\"}]}, {\"uid\": {\"type\": \"Group\", \"id\": \"b\"}, \"parents\": [{\"type\": \"Group\", \"id\": \"a\"}]}]",
                "member of itself",
            ),
            (
                "[{\"uid\": {\"type\": \"Group\", \"id\": \"a\"}}, {\"uid\": {\"type\": \"Group\", \"id\": \"a\"}}]",
                "listed twice",
            ),
            ("[{\"uid\": 3}", "line 1"),
        ];
        for (text, expected) in cases {
            let err = Directory::parse(text).unwrap_err();
            let shown = format!("line {}: {err}", err.line);
            assert!(shown.contains(expected), "{text}: {shown}");
        }
    }
}
