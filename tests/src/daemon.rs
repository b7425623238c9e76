//! What the mail-server harnesses share: the server process, waited for until it listens and
//! stopped for good; seeding mailboxes over IMAP; files the servers' accounts can use.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Message;

/// A server process the harness started; stopped when dropped.
#[derive(Debug)]
pub(crate) struct Daemon {
    name: &'static str,
    child: Option<Child>,
    /// The process leads its own process group, which is stopped as a whole.
    group: bool,
}

impl Daemon {
    /// `child`, named `name` in messages; `group` when it leads its own process group.
    pub(crate) fn new(name: &'static str, child: Child, group: bool) -> Self {
        Self {
            name,
            child: Some(child),
            group,
        }
    }

    /// Waits up to 15 s until `ready` holds. On failure (the process exited, or time ran out)
    /// prints `logs` and returns false.
    pub(crate) fn wait_until(
        &mut self,
        ready: impl Fn() -> bool,
        logs: impl Fn() -> String,
    ) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if ready() {
                return true;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                eprintln!("{} exited with {status}:\n{}", self.name, logs());
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not get ready within 15 s:\n{}", self.name, logs());
        false
    }

    /// SIGTERM (to the group, or the process), up to 5 s to exit, then SIGKILL to whatever is
    /// left: a group's workers may outlive its leader.
    pub(crate) fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = i32::try_from(child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        let signal = |signal| {
            if let Some(pid) = pid {
                let _ = if self.group {
                    rustix::process::kill_process_group(pid, signal)
                } else {
                    rustix::process::kill_process(pid, signal)
                };
            }
        };
        signal(rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.group || !exited {
            signal(rustix::process::Signal::KILL);
        }
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What one seeding login does, in order.
#[derive(Debug)]
pub(crate) enum Step<'a> {
    /// `CREATE mailbox`.
    Create(String),
    /// `SETACL mailbox identifier rights`.
    SetAcl(String, String, &'static str),
    /// `APPEND mailbox message`.
    Append(String, &'a Message),
    /// `DELETEACL mailbox identifier`.
    DeleteAcl(String, String),
}

/// Logs in at `addr` (as `localhost`, trusting `ca`) once per `(login, password, steps)` and
/// runs the steps with Python's `imaplib` (`tests/clients/imap_seed.py`); panics with `logs` if
/// the server refuses any. `work` holds the messages meanwhile.
pub(crate) fn seed(
    addr: SocketAddr,
    ca: &Path,
    work: &Path,
    sessions: &[(String, String, Vec<Step<'_>>)],
    logs: impl Fn() -> String,
) {
    let files = work.join("seed");
    let mut count = 0;
    let sessions: Vec<_> = sessions
        .iter()
        .map(|(login, password, steps)| {
            let steps: Vec<_> = steps
                .iter()
                .map(|step| match step {
                    Step::Create(mailbox) => serde_json::json!(["create", mailbox]),
                    Step::SetAcl(mailbox, who, rights) => {
                        serde_json::json!(["setacl", mailbox, who, rights])
                    }
                    Step::Append(mailbox, message) => {
                        count += 1;
                        let file = files.join(format!("{count}.eml"));
                        std::fs::create_dir_all(&files).unwrap();
                        std::fs::write(&file, &message.0).unwrap();
                        serde_json::json!(["append", mailbox, file.display().to_string()])
                    }
                    Step::DeleteAcl(mailbox, who) => serde_json::json!(["deleteacl", mailbox, who]),
                })
                .collect();
            serde_json::json!({"login": login, "password": password, "steps": steps})
        })
        .collect();
    let spec = serde_json::json!({
        "port": addr.port(),
        "ca": ca.display().to_string(),
        "sessions": sessions,
    });
    let spec_file = work.join("seed.json");
    std::fs::write(&spec_file, spec.to_string()).unwrap();
    let output = Command::new("python3")
        .arg(crate::workspace().join("tests/clients/imap_seed.py"))
        .arg(&spec_file)
        .stdin(Stdio::null())
        .output()
        .expect("python3 runs");
    let _ = std::fs::remove_dir_all(&files);
    let _ = std::fs::remove_file(&spec_file);
    assert!(
        output.status.success(),
        "seeding the mailboxes failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        logs()
    );
}

pub(crate) fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `path` and everything under it, owned by `uid`:`gid`.
pub(crate) fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid, gid);
        }
    }
}

/// `bytes` as lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
