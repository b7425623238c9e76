//! Revocations: `revocations.json` in the policy folder, distributed like policies. The
//! broker checks them before asking the policies; `postern-policy explain` shows them.
//!
//! A revoked user gets a "not before" watermark: every certificate of theirs issued earlier (or
//! in the same second), and every login that authenticated earlier, is dead — across renewals, since a renewal keeps
//! the login's `auth_time`. A fresh login with MFA after the watermark works again (to keep
//! someone out, disable them in `entities.json` or at the IdP). A revoked lineage (one login
//! and its renewals) or device stays dead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use postern_certs::{DeviceId, LineageId, UserId};
use serde::{Deserialize, Serialize};

/// The file in the policy folder.
pub const REVOCATIONS_FILE: &str = "revocations.json";

/// The format tag of the file.
const FORMAT: &str = "postern-revocations/1";

/// The revocations in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    users: BTreeMap<String, Entry>,
    lineages: BTreeMap<String, Entry>,
    devices: BTreeMap<String, Entry>,
}

/// What is recorded about one revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// When it was made; for a user, also the watermark.
    pub at: SystemTime,
    /// Why, as the administrator wrote it.
    pub reason: String,
}

/// What is revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every certificate and login of a user from before the revocation.
    User(UserId),
    /// One login and its renewals.
    Lineage(LineageId),
    /// Every certificate of one device key.
    Device(DeviceId),
}

/// Why `revocations.json` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RevocationsError {
    /// The file could not be read or written.
    #[error("`{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a revocation list.
    #[error("`{}`: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The facts of an identity a revocation can match.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The user id URI.
    pub user: &'a str,
    /// When the person authenticated.
    pub auth_time: SystemTime,
    /// When the certificate was issued (for a login not certified yet: `auth_time`).
    pub issued: SystemTime,
    /// The lineage, once there is one.
    pub lineage: Option<&'a LineageId>,
    /// The device.
    pub device: &'a DeviceId,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    format: String,
    #[serde(default)]
    revocations: Vec<RawEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lineage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// RFC 3339.
    at: String,
    #[serde(default)]
    reason: String,
}

impl Revocations {
    /// Reads `revocations.json` from the policy folder; no file means no revocations.
    pub fn load(dir: &Path) -> Result<Self, RevocationsError> {
        let path = dir.join(REVOCATIONS_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text).map_err(|message| RevocationsError::Invalid {
                path: path.clone(),
                message,
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(RevocationsError::Io { path, source }),
        }
    }

    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if raw.format != FORMAT {
            return Err(format!(
                "format `{}` is not `{FORMAT}`; this broker cannot read it",
                raw.format
            ));
        }
        let mut revocations = Self::default();
        for (index, entry) in raw.revocations.into_iter().enumerate() {
            let bad = |message: String| format!("revocation {}: {message}", index + 1);
            let at = postern_certs::parse_rfc3339(&entry.at)
                .ok_or_else(|| bad(format!("`at` is not an RFC 3339 time: `{}`", entry.at)))?;
            let record = Entry {
                at,
                reason: entry.reason,
            };
            let target = match (entry.user, entry.lineage, entry.device) {
                (Some(user), None, None) => Target::User(
                    UserId::from_uri(&user).map_err(|e| bad(format!("user `{user}`: {e}")))?,
                ),
                (None, Some(lineage), None) => Target::Lineage(
                    lineage
                        .parse()
                        .map_err(|e| bad(format!("lineage `{lineage}`: {e}")))?,
                ),
                (None, None, Some(device)) => Target::Device(
                    device
                        .parse()
                        .map_err(|e| bad(format!("device `{device}`: {e}")))?,
                ),
                _ => return Err(bad("name exactly one of user, lineage or device".into())),
            };
            // Listed twice: the later revocation wins, so a merge never moves a watermark back.
            let (map, id) = revocations.slot(&target);
            match map.get(&id) {
                Some(existing) if existing.at >= record.at => {}
                _ => {
                    map.insert(id, record);
                }
            }
        }
        Ok(revocations)
    }

    /// The file's text.
    pub fn to_json(&self) -> String {
        let mut revocations = Vec::new();
        for (kind, map) in [
            ("user", &self.users),
            ("lineage", &self.lineages),
            ("device", &self.devices),
        ] {
            for (id, entry) in map {
                let id = Some(id.clone());
                revocations.push(RawEntry {
                    user: id.clone().filter(|_| kind == "user"),
                    lineage: id.clone().filter(|_| kind == "lineage"),
                    device: id.filter(|_| kind == "device"),
                    at: postern_certs::rfc3339(entry.at),
                    reason: entry.reason.clone(),
                });
            }
        }
        let file = RawFile {
            format: FORMAT.into(),
            revocations,
        };
        let mut text = serde_json::to_string_pretty(&file).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Adds or replaces a revocation. A user revoked again gets the later watermark.
    pub fn insert(&mut self, target: Target, entry: Entry) {
        let (map, id) = self.slot(&target);
        map.insert(id, entry);
    }

    /// Removes a revocation; whether there was one.
    pub fn remove(&mut self, target: &Target) -> bool {
        let (map, id) = self.slot(target);
        map.remove(&id).is_some()
    }

    /// How many revocations there are.
    pub fn len(&self) -> usize {
        self.users.len() + self.lineages.len() + self.devices.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every revocation, users first, as `(kind, id, entry)`.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str, &Entry)> {
        let users = self.users.iter().map(|(id, e)| ("user", id.as_str(), e));
        let lineages = self
            .lineages
            .iter()
            .map(|(id, e)| ("lineage", id.as_str(), e));
        let devices = self
            .devices
            .iter()
            .map(|(id, e)| ("device", id.as_str(), e));
        users.chain(lineages).chain(devices)
    }

    /// The revocation of a user (by user id URI), if there is one.
    pub fn user(&self, user: &str) -> Option<&Entry> {
        self.users.get(user)
    }

    /// Why `subject` is revoked, or `None` when it is not.
    pub fn check(&self, subject: &Subject<'_>) -> Option<String> {
        // Times are whole seconds in certificates and in the file: the second of the revocation
        // counts as before it.
        if let Some(entry) = self.users.get(subject.user)
            && (subject.issued <= entry.at || subject.auth_time <= entry.at)
        {
            return Some(format!(
                "the user's access was revoked at {}{}: log in again",
                postern_certs::rfc3339(entry.at),
                because(&entry.reason)
            ));
        }
        if let Some(lineage) = subject.lineage
            && let Some(entry) = self.lineages.get(&lineage.to_string())
        {
            return Some(format!(
                "this login was revoked at {}{}",
                postern_certs::rfc3339(entry.at),
                because(&entry.reason)
            ));
        }
        if let Some(entry) = self.devices.get(&subject.device.to_string()) {
            return Some(format!(
                "this device was revoked at {}{}",
                postern_certs::rfc3339(entry.at),
                because(&entry.reason)
            ));
        }
        None
    }

    fn slot(&mut self, target: &Target) -> (&mut BTreeMap<String, Entry>, String) {
        match target {
            Target::User(user) => (&mut self.users, user.uri()),
            Target::Lineage(lineage) => (&mut self.lineages, lineage.to_string()),
            Target::Device(device) => (&mut self.devices, device.to_string()),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::User(user) => write!(f, "user {}", user.uri()),
            Target::Lineage(lineage) => write!(f, "login {lineage}"),
            Target::Device(device) => write!(f, "device {device}"),
        }
    }
}

fn because(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_user_watermark_kills_earlier_certificates_and_logins() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let user = UserId::new("https://idp.example.org", "alice").unwrap();
        let mut revocations = Revocations::default();
        revocations.insert(
            Target::User(user.clone()),
            Entry {
                at,
                reason: "laptop stolen".into(),
            },
        );
        let device = DeviceId::from_bytes([7; 16]);
        let uri = user.uri();
        let subject = |auth: u64, issued: u64| Subject {
            user: &uri,
            auth_time: at - Duration::from_secs(3600) + Duration::from_secs(auth),
            issued: at - Duration::from_secs(3600) + Duration::from_secs(issued),
            lineage: None,
            device: &device,
        };
        // Issued before: dead.
        assert!(revocations.check(&subject(0, 60)).is_some());
        // Renewed after the watermark but from a login before it: dead.
        let renewed = revocations.check(&subject(0, 7200)).unwrap();
        assert!(renewed.contains("laptop stolen"), "{renewed}");
        // A fresh login after the watermark: alive.
        assert!(revocations.check(&subject(3601, 3602)).is_none());

        let text = revocations.to_json();
        assert_eq!(Revocations::parse(&text).unwrap(), revocations);
        assert!(revocations.remove(&Target::User(user)));
        assert!(revocations.is_empty());
    }

    #[test]
    fn lineages_and_devices_stay_dead() {
        let lineage = LineageId::from_bytes([1; 16]);
        let device = DeviceId::from_bytes([2; 16]);
        let mut revocations = Revocations::default();
        let entry = Entry {
            at: SystemTime::UNIX_EPOCH,
            reason: String::new(),
        };
        revocations.insert(Target::Lineage(lineage), entry.clone());
        let later = SystemTime::now();
        let subject = Subject {
            user: "https://idp.example.org#bob",
            auth_time: later,
            issued: later,
            lineage: Some(&lineage),
            device: &device,
        };
        assert!(revocations.check(&subject).unwrap().contains("login"));
        let other = LineageId::from_bytes([3; 16]);
        let fresh = Subject {
            lineage: Some(&other),
            ..subject
        };
        assert!(revocations.check(&fresh).is_none());
        revocations.insert(Target::Device(device), entry);
        assert!(revocations.check(&fresh).unwrap().contains("device"));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, expected) in [
            ("{}", "missing field"),
            (r#"{"format": "other/9"}"#, "other/9"),
            (
                r#"{"format": "postern-revocations/1", "revocations": [{"at": "2026-01-01T00:00:00Z"}]}"#,
                "exactly one",
            ),
            (
                r#"{"format": "postern-revocations/1", "revocations": [{"user": "x", "at": "2026-01-01T00:00:00Z"}]}"#,
                "user `x`",
            ),
            (
                r#"{"format": "postern-revocations/1", "revocations": [{"device": "zz", "at": "yesterday"}]}"#,
                "RFC 3339",
            ),
        ] {
            let err = Revocations::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
