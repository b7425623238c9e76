//! A private Cyrus IMAP for one test: its own configuration, sasldb users, TLS certificate and
//! mail, with its syslog caught in a private mount namespace.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::Message;

/// Where scripts/install-test-deps unpacks `cyrus-imapd`, inside the workspace.
const UNPACKED: &str = "target/test-servers/cyrus/usr/lib/cyrus/bin";
/// Cyrus's own tools, from `cyrus-common`.
const TOOLS: &str = "/usr/lib/cyrus/bin";
/// The administrator that creates the mailboxes; not one of the test's users.
const ADMIN: &str = "postern-admin";

/// A running Cyrus IMAP serving IMAPS on 127.0.0.1.
#[derive(Debug)]
pub struct Cyrus {
    dir: TempDir,
    child: Option<Child>,
    port: u16,
    syslog: Option<Syslog>,
}

/// The receiving end of `/dev/log` as Cyrus sees it: every datagram is appended to a file.
#[derive(Debug)]
struct Syslog {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Cyrus {
    /// Starts Cyrus with `users` (name, password, messages in INBOX). Needs root: Cyrus runs as
    /// the `cyrus` account, and its log socket is mounted in a private namespace.
    pub fn start(users: &[(&str, &str, Vec<Message>)]) -> Self {
        let imapd = crate::workspace().join(UNPACKED).join("imapd");
        assert!(
            imapd.exists() && Path::new(TOOLS).join("master").exists(),
            "Cyrus IMAP is not installed; run scripts/install-test-deps"
        );
        assert!(crate::is_root(), "the Cyrus tests run as root");
        let (uid, gid) = cyrus_account();
        let mut dir = tempfile::Builder::new()
            .prefix("postern-cyrus-")
            .tempdir()
            .unwrap();
        // Cyrus runs as `cyrus` and must reach its configuration and the mail.
        set_mode(dir.path(), 0o755);
        for sub in [
            "conf/db",
            "conf/socket",
            "conf/proc",
            "conf/log",
            "conf/lock",
            "part",
            "run",
            "dev-upper",
            "dev-work",
        ] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        crate::dovecot::write_tls(dir.path());
        let admin_password = hex(&crate::random_bytes(16));
        let sasldb = dir.path().join("sasldb2");
        for (name, password) in users
            .iter()
            .map(|(name, password, _)| (*name, *password))
            .chain([(ADMIN, admin_password.as_str())])
        {
            saslpasswd(&sasldb, name, password);
        }
        chown_tree(dir.path(), uid, gid);

        for _attempt in 0..3 {
            let port = crate::free_tcp_port();
            std::fs::write(dir.path().join("imapd.conf"), imapd_conf(dir.path())).unwrap();
            std::fs::write(
                dir.path().join("cyrus.conf"),
                cyrus_conf(dir.path(), &imapd, port),
            )
            .unwrap();
            let syslog = Syslog::start(dir.path());
            let child = spawn_master(dir.path());
            let mut cyrus = Cyrus {
                dir,
                child: Some(child),
                port,
                syslog: Some(syslog),
            };
            if cyrus.wait_ready() {
                cyrus.seed(users, &admin_password);
                return cyrus;
            }
            cyrus.stop();
            dir = cyrus.take_dir();
        }
        panic!(
            "Cyrus did not start; see its logs in {}",
            dir.path().display()
        );
    }

    /// Where IMAPS is served.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The CA certificate (PEM) that signed Cyrus's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// What Cyrus logged so far: its syslog lines, then what `master` wrote to stderr.
    pub fn logs(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("syslog.log"), read("stdio.log"))
    }

    /// Stops Cyrus: SIGTERM to `master`, which ends its services, then SIGKILL if it lingers.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = i32::try_from(child.id())
                .ok()
                .and_then(rustix::process::Pid::from_raw);
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut exited = false;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    exited = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !exited && let Some(group) = pid {
                // Its services too, which a killed `master` would leave behind.
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
                let _ = child.wait();
            }
        }
        if let Some(syslog) = self.syslog.take() {
            syslog.stop();
        }
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if TcpStream::connect(self.addr()).is_ok() {
                return true;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                eprintln!("cyrus master exited with {status}:\n{}", self.logs());
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("cyrus did not listen within 15 s:\n{}", self.logs());
        false
    }

    /// Creates each user's mailbox with their messages, through IMAP (Python's `imaplib`).
    fn seed(&self, users: &[(&str, &str, Vec<Message>)], admin_password: &str) {
        let seed = self.dir.path().join("seed");
        let mut spec = Vec::new();
        for (name, _, messages) in users {
            let mut files = Vec::new();
            for (index, message) in messages.iter().enumerate() {
                let file = seed.join(name).join(format!("{index}.eml"));
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, &message.0).unwrap();
                files.push(file.display().to_string());
            }
            spec.push(serde_json::json!({"name": name, "messages": files}));
        }
        let spec = serde_json::json!({
            "port": self.port,
            "ca": self.ca().display().to_string(),
            "admin": ADMIN,
            "admin_password": admin_password,
            "users": spec,
        });
        let spec_file = self.dir.path().join("seed.json");
        std::fs::write(&spec_file, spec.to_string()).unwrap();
        let output = Command::new("python3")
            .args(["-c", SEED_SCRIPT])
            .arg(&spec_file)
            .stdin(Stdio::null())
            .output()
            .expect("python3 runs");
        assert!(
            output.status.success(),
            "seeding Cyrus failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.logs()
        );
        let _ = std::fs::remove_dir_all(seed);
    }

    fn take_dir(mut self) -> TempDir {
        self.stop();
        let dir = tempfile::Builder::new()
            .prefix("unused-")
            .tempdir()
            .unwrap();
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for Cyrus {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Syslog {
    /// Binds `syslog.sock` in `dir`, writable by Cyrus, and copies what arrives to `syslog.log`.
    fn start(dir: &Path) -> Self {
        let path = dir.join("syslog.sock");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        set_mode(&path, 0o666);
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut log = std::fs::File::create(dir.join("syslog.log")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buffer = vec![0u8; 65536];
            while !stopped.load(Ordering::Relaxed) {
                let Ok(len) = socket.recv(&mut buffer) else {
                    continue;
                };
                let line = String::from_utf8_lossy(&buffer[..len]);
                let _ = writeln!(log, "{}", line.trim_end());
            }
        });
        Self { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Logs in as the administrator, creates each user's mailbox and appends their messages, with
/// the right to insert granted for that and taken back: no user logs in before the test does.
const SEED_SCRIPT: &str = r#"
import imaplib, json, ssl, sys
spec = json.load(open(sys.argv[1]))
context = ssl.create_default_context(cafile=spec["ca"])
imap = imaplib.IMAP4_SSL("localhost", spec["port"], ssl_context=context)
imap.login(spec["admin"], spec["admin_password"])
def ok(answer, what):
    if answer[0] != "OK":
        sys.exit(f"{what}: {answer}")
for user in spec["users"]:
    mailbox = "user/" + user["name"]
    ok(imap.create(mailbox), "CREATE " + mailbox)
    ok(imap.setacl(mailbox, spec["admin"], "lrswi"), "SETACL " + mailbox)
    for path in user["messages"]:
        with open(path, "rb") as message:
            ok(imap.append(mailbox, None, None, message.read()), "APPEND " + path)
    ok(imap.deleteacl(mailbox, spec["admin"]), "DELETEACL " + mailbox)
imap.logout()
"#;

/// `imapd.conf`: everything under `dir`, users from the sasldb there, plain-text logins
/// allowed (the connection is TLS), and `/` as the hierarchy separator, so that a dot in a login
/// name is not read as a folder.
fn imapd_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "# Written by the Postern test harness.
configdirectory: {d}/conf
defaultpartition: default
partition-default: {d}/part
servername: localhost
admins: {ADMIN}
virtdomains: off
unixhierarchysep: yes
allowplaintext: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {d}/sasldb2
sasl_mech_list: PLAIN LOGIN
tls_server_cert: {d}/server.pem
tls_server_key: {d}/server.key
idlesocket: {d}/run/idle
notifysocket: {d}/run/notify
lmtpsocket: {d}/run/lmtp
syslog_prefix: postern-cyrus
"
    )
}

/// `cyrus.conf`: database recovery at start, then one IMAPS service on 127.0.0.1.
fn cyrus_conf(dir: &Path, imapd: &Path, port: u16) -> String {
    let conf = dir.join("imapd.conf");
    let (conf, imapd) = (conf.display(), imapd.display());
    format!(
        "# Written by the Postern test harness.
START {{
  recover cmd=\"{TOOLS}/ctl_cyrusdb -r -C {conf}\"
}}
SERVICES {{
  imaps cmd=\"{imapd} -s -C {conf}\" listen=\"127.0.0.1:{port}\" prefork=0
}}
EVENTS {{
}}
"
    )
}

/// Runs Cyrus's `master` in the foreground, in a private mount namespace whose `/dev` is an
/// overlay with `/dev/log` bound to the harness's socket: Cyrus logs only to syslog, and the
/// machine's `/dev` stays untouched.
fn spawn_master(dir: &Path) -> Child {
    let d = dir.display();
    let script = format!(
        "mount -t overlay postern-cyrus-dev -o lowerdir=/dev,upperdir={d}/dev-upper,workdir={d}/dev-work /dev \
         && touch /dev/log && mount --bind {d}/syslog.sock /dev/log \
         && exec {TOOLS}/master -C {d}/imapd.conf -M {d}/cyrus.conf -p {d}/run/master.pid -D"
    );
    let log = std::fs::File::create(dir.join("stdio.log")).unwrap();
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        // `master` signals its whole process group when it shuts down: its own group keeps
        // that from reaching the tests and other tests' Cyrus.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("unshare starts Cyrus")
}

/// Adds `name` with `password` to the sasldb at `path`, in the realm `servername` names.
fn saslpasswd(path: &Path, name: &str, password: &str) {
    let mut child = Command::new("saslpasswd2")
        .args(["-p", "-c", "-u", "localhost", "-f"])
        .arg(path)
        .arg(name)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("saslpasswd2 runs (sasl2-bin; scripts/install-test-deps)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(password.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "saslpasswd2 failed for {name}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The uid and gid of the `cyrus` account that `cyrus-common` creates.
fn cyrus_account() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.len() > 3 && fields[0] == "cyrus")
        .map(|fields| (fields[2].parse().unwrap(), fields[3].parse().unwrap()))
        .expect("the `cyrus` account exists (cyrus-common; scripts/install-test-deps)")
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid, gid);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
