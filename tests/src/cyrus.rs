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
use std::time::Duration;

use tempfile::TempDir;

use crate::Message;
use crate::daemon::{self, Daemon, Step, chown_tree, hex, set_mode};

/// Where scripts/install-test-deps unpacks `cyrus-imapd`, inside the workspace.
const UNPACKED: &str = "target/test-servers/cyrus/usr/lib/cyrus/bin";
/// Cyrus's own tools, from `cyrus-common`.
const TOOLS: &str = "/usr/lib/cyrus/bin";
/// The administrator that creates the mailboxes; not one of the test's users.
const ADMIN: &str = "postern-admin";

/// A running Cyrus IMAP serving IMAPS on 127.0.0.1.
#[derive(Debug)]
pub struct Cyrus {
    // Dropped in this order: the server, its log, then its folder.
    daemon: Daemon,
    _syslog: Syslog,
    dir: TempDir,
    port: u16,
}

/// The receiving end of `/dev/log` as Cyrus sees it: every datagram is appended to a file.
#[derive(Debug)]
struct Syslog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
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
        let dir = tempfile::Builder::new()
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
            let mut daemon = Daemon::new("cyrus master", spawn_master(dir.path()), true);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if daemon.wait_until(|| TcpStream::connect(addr).is_ok(), || logs(dir.path())) {
                let cyrus = Cyrus {
                    daemon,
                    _syslog: syslog,
                    dir,
                    port,
                };
                cyrus.seed(users, &admin_password);
                return cyrus;
            }
            daemon.stop();
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
        logs(self.dir.path())
    }

    /// Stops Cyrus: `master` and its services.
    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    /// Creates each user's mailbox with their messages, through IMAP, logged in as the
    /// administrator, who may write there only meanwhile: no user logs in before the test does.
    fn seed(&self, users: &[(&str, &str, Vec<Message>)], admin_password: &str) {
        let mut steps = Vec::new();
        for (name, _, messages) in users {
            let mailbox = format!("user/{name}");
            steps.push(Step::Create(mailbox.clone()));
            steps.push(Step::SetAcl(mailbox.clone(), ADMIN.into(), "lrswi"));
            steps.extend(messages.iter().map(|m| Step::Append(mailbox.clone(), m)));
            steps.push(Step::DeleteAcl(mailbox, ADMIN.into()));
        }
        let sessions = [(ADMIN.to_owned(), admin_password.to_owned(), steps)];
        daemon::seed(self.addr(), &self.ca(), self.dir.path(), &sessions, || {
            self.logs()
        });
    }
}

/// What Cyrus in `dir` logged so far.
fn logs(dir: &Path) -> String {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    format!("{}{}", read("syslog.log"), read("stdio.log"))
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
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Syslog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

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
