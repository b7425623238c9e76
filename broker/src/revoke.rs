//! Changing `revocations.json` (`postern-broker revoke`), and finding whom an email names. The
//! revocations themselves, and how they are checked, are in `postern_policy::revocations`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use postern_certs::UserId;
pub use postern_policy::revocations::{
    Entry, REVOCATIONS_FILE, Revocations, RevocationsError, Subject, Target,
};

/// Changes `revocations.json` in `dir` under a lock, writing it atomically, and returns the
/// revocations as written.
pub fn update(
    dir: &Path,
    change: impl FnOnce(&mut Revocations),
) -> Result<Revocations, RevocationsError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| RevocationsError::Io { path, source }
    };
    let lock_path = dir.join(".revocations.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io(&lock_path)(e.into()))?;
    let mut revocations = Revocations::load(dir)?;
    change(&mut revocations);
    let path = dir.join(REVOCATIONS_FILE);
    let temporary = dir.join(".revocations.json.new");
    let mut file = std::fs::File::create(&temporary).map_err(io(&temporary))?;
    file.write_all(revocations.to_json().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(&temporary))?;
    std::fs::rename(&temporary, &path).map_err(io(&path))?;
    // The rename itself on disk too, before the command says it is done.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(revocations)
}

/// The users whose email is `email` (without case), from `entities.json` and the audit trail,
/// each with where it was seen.
pub fn users_with_email(config: &crate::config::Config, email: &str) -> Vec<(UserId, String)> {
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(config.policy_dir.join(postern_policy::ENTITIES_FILE))
        && let Ok(directory) = postern_policy::Directory::parse(&text)
    {
        for id in directory.users_with_email(email) {
            found.insert(id.to_owned(), "entities.json".into());
        }
    }
    if let crate::config::AuditTarget::File(path) = &config.audit
        && let Ok(file) = std::fs::File::open(path)
    {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let user = &event["user"];
            if user["email"]
                .as_str()
                .is_some_and(|e| e.eq_ignore_ascii_case(email))
                && let Some(id) = user["id"].as_str()
            {
                let when = event["@timestamp"].as_str().unwrap_or("?");
                found.insert(id.to_owned(), format!("audit trail, last seen {when}"));
            }
        }
    }
    found
        .into_iter()
        .filter_map(|(id, seen)| UserId::from_uri(&id).ok().map(|user| (user, seen)))
        .collect()
}
