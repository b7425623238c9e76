//! A private Courier IMAP for one test: its own configuration, userdb users, TLS certificate
//! and maildirs, with `/etc/courier` and `/run/courier` bound from its folder in a private
//! mount namespace.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use crate::Message;
use crate::daemon::{self, Daemon, Step, chown_tree, hex, set_mode};

/// Where scripts/install-test-deps unpacks `courier-imap`, inside the workspace.
const UNPACKED: &str = "target/test-servers/courier";
/// Courier's login front end and IMAP server, inside [`UNPACKED`].
const IMAPLOGIN: &str = "usr/lib/courier/courier/imaplogin";
const IMAPD: &str = "usr/bin/imapd";
/// From `courier-base`, `courier-authlib` and `courier-authlib-userdb`.
const COURIERTCPD: &str = "/usr/sbin/couriertcpd";
const COURIERTLS: &str = "/usr/bin/couriertls";
const AUTHDAEMOND: &str = "/usr/lib/courier/courier-authlib/authdaemond";
const MAKEUSERDB: &str = "/usr/sbin/makeuserdb";
/// The account that owns the mail (`mail`, as in Debian's base system).
const MAIL_UID: u32 = 8;
const MAIL_GID: u32 = 8;
/// What a user's seeding account is called: it opens the same maildir under another name, and
/// is gone before the test starts.
const SEEDER_PREFIX: &str = "postern-seed-";

/// A running Courier IMAP serving IMAPS on 127.0.0.1.
#[derive(Debug)]
pub struct Courier {
    // Dropped in this order: the server, then its folder.
    daemon: Daemon,
    dir: TempDir,
    port: u16,
}

impl Courier {
    /// Starts Courier with `users` (name, password, messages in INBOX). Needs root: its paths
    /// are bound in a private mount namespace, and it changes to the mail owner at login.
    pub fn start(users: &[(&str, &str, Vec<Message>)]) -> Self {
        let unpacked = crate::workspace().join(UNPACKED);
        assert!(
            unpacked.join(IMAPD).exists()
                && unpacked.join(IMAPLOGIN).exists()
                && [COURIERTCPD, COURIERTLS, AUTHDAEMOND, MAKEUSERDB]
                    .iter()
                    .all(|path| Path::new(path).exists()),
            "Courier IMAP is not installed; run scripts/install-test-deps"
        );
        assert!(crate::is_root(), "the Courier tests run as root");
        let dir = tempfile::Builder::new()
            .prefix("postern-courier-")
            .tempdir()
            .unwrap();
        // imapd runs as the mail owner and must reach the maildirs.
        set_mode(dir.path(), 0o755);
        for sub in ["etc", "run/authdaemon", "home"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        crate::dovecot::write_tls(dir.path());
        // couriertls reads the key and the certificate chain from one file.
        let key = std::fs::read_to_string(dir.path().join("server.key")).unwrap();
        let chain = std::fs::read_to_string(dir.path().join("server.pem")).unwrap();
        let pem = dir.path().join("etc/imapd.pem");
        std::fs::write(&pem, format!("{key}{chain}")).unwrap();
        set_mode(&pem, 0o600);
        std::fs::write(dir.path().join("etc/authdaemonrc"), AUTHDAEMONRC).unwrap();
        std::fs::write(dir.path().join("etc/imapd"), IMAPD_ENV).unwrap();
        for (name, _, _) in users {
            let home = dir.path().join("home").join(name);
            for sub in ["cur", "new", "tmp"] {
                std::fs::create_dir_all(home.join("Maildir").join(sub)).unwrap();
            }
            chown_tree(&home, MAIL_UID, MAIL_GID);
        }
        let seed_password = hex(&crate::random_bytes(16));
        write_userdb(dir.path(), users, Some(&seed_password));

        for _attempt in 0..3 {
            let port = crate::free_tcp_port();
            let mut daemon = Daemon::new("couriertcpd", spawn(dir.path(), &unpacked, port), true);
            let (addr, socket) = (
                SocketAddr::from(([127, 0, 0, 1], port)),
                dir.path().join("run/authdaemon/socket"),
            );
            let ready = || socket.exists() && TcpStream::connect(addr).is_ok();
            if daemon.wait_until(ready, || logs(dir.path())) {
                let courier = Courier { daemon, dir, port };
                courier.seed(users, &seed_password);
                write_userdb(courier.dir.path(), users, None);
                return courier;
            }
            daemon.stop();
        }
        panic!(
            "Courier did not start; see its logs in {}",
            dir.path().display()
        );
    }

    /// Where IMAPS is served.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The CA certificate (PEM) that signed Courier's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// What Courier logged so far: `authdaemond`, then `couriertcpd` and the IMAP processes it
    /// started (`LOGIN, user=alice, …`, `LOGIN FAILED, user=bob, …`), then anything else.
    pub fn logs(&self) -> String {
        logs(self.dir.path())
    }

    /// Stops Courier: `couriertcpd`, `authdaemond` and the sessions.
    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    /// Appends each user's messages to their INBOX through IMAP, logged in as their seeding
    /// account: no user logs in before the test does.
    fn seed(&self, users: &[(&str, &str, Vec<Message>)], seed_password: &str) {
        let sessions: Vec<_> = users
            .iter()
            .map(|(name, _, messages)| {
                let steps = messages
                    .iter()
                    .map(|m| Step::Append("INBOX".into(), m))
                    .collect();
                (
                    format!("{SEEDER_PREFIX}{name}"),
                    seed_password.to_owned(),
                    steps,
                )
            })
            .collect();
        daemon::seed(self.addr(), &self.ca(), self.dir.path(), &sessions, || {
            self.logs()
        });
    }
}

/// What Courier in `dir` logged so far.
fn logs(dir: &Path) -> String {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    format!(
        "{}{}{}",
        read("authdaemond.log"),
        read("imapd.log"),
        read("stdio.log")
    )
}

/// `/etc/courier/authdaemonrc`: users from the userdb only (no PAM, no system accounts).
const AUTHDAEMONRC: &str = "# Written by the Postern test harness.
authmodulelist=\"authuserdb\"
daemons=2
authdaemonvar=/run/courier/authdaemon
DEBUG_LOGIN=0
DEFAULTOPTIONS=\"\"
LOGGEROPTS=\"\"
";

/// The environment of `couriertcpd` and what it starts (Courier's init scripts source
/// `/etc/courier/imapd` the same way): implicit TLS with the harness's certificate, and
/// AUTH=PLAIN advertised, which the broker logs in with.
const IMAPD_ENV: &str = "# Written by the Postern test harness.
IMAP_CAPABILITY=\"IMAP4rev1 UIDPLUS CHILDREN NAMESPACE IDLE AUTH=PLAIN\"
IMAP_CAPABILITY_TLS=\"IMAP4rev1 UIDPLUS CHILDREN NAMESPACE IDLE AUTH=PLAIN\"
IMAP_TLS=1
TLS_CERTFILE=/etc/courier/imapd.pem
TLS_PROTOCOL=TLS1_2+
IMAP_IDLE_TIMEOUT=60
IMAP_ENHANCEDIDLE=0
IMAP_USELOCKS=1
IMAP_UMASK=022
IMAP_SHAREDINDEXFILE=/etc/courier/shared/index
MAILDIRPATH=Maildir
";

/// Writes `/etc/courier/userdb` with each user's SHA-512 crypt hash and maildir (owned by the
/// mail account), and with `seed_password` a seeding account for each, and builds
/// `userdb.dat` from it (authdaemond reads the new one at its next lookup).
fn write_userdb(dir: &Path, users: &[(&str, &str, Vec<Message>)], seed_password: Option<&str>) {
    let seeders = users.iter().filter_map(|(name, _, _)| {
        seed_password.map(|password| (format!("{SEEDER_PREFIX}{name}"), *name, password))
    });
    let mut userdb = String::new();
    for (login, name, password) in users
        .iter()
        .map(|(name, password, _)| ((*name).to_owned(), *name, *password))
        .chain(seeders)
    {
        let home = dir.join("home").join(name);
        userdb.push_str(&format!(
            "{login}\tuid={MAIL_UID}|gid={MAIL_GID}|home={home}|mail={home}/Maildir|systempw={hash}\n",
            home = home.display(),
            hash = crypt_sha512(password),
        ));
    }
    let path = dir.join("etc/userdb");
    std::fs::write(&path, userdb).unwrap();
    // makeuserdb refuses a userdb others can read.
    set_mode(&path, 0o600);
    let output = Command::new(MAKEUSERDB)
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("makeuserdb runs (courier-authlib-userdb; scripts/install-test-deps)");
    assert!(
        output.status.success(),
        "makeuserdb failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `password` hashed with SHA-512 crypt (`$6$…`), which authlib checks with the C library.
fn crypt_sha512(password: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["passwd", "-6", "-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(password.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "openssl passwd failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// Runs `authdaemond` and `couriertcpd` (IMAPS through `couriertls`, then `imaplogin` and
/// `imapd`) in a private mount namespace where `/etc/courier` and `/run/courier`, compiled into
/// Courier, are folders of `dir`: the machine's own stay untouched.
fn spawn(dir: &Path, unpacked: &Path, port: u16) -> Child {
    let d = dir.display();
    let (imaplogin, imapd) = (
        unpacked.join(IMAPLOGIN).display().to_string(),
        unpacked.join(IMAPD).display().to_string(),
    );
    let script = format!(
        "mount --bind {d}/etc /etc/courier && mount --bind {d}/run /run/courier \
         && {{ {AUTHDAEMOND} >>{d}/authdaemond.log 2>&1 & }} \
         && set -a && . /etc/courier/imapd && set +a \
         && exec {COURIERTCPD} -address=127.0.0.1 -maxprocs=40 -maxperip=40 \
         -nodnslookup -noidentlookup -stderr={d}/imapd.log {port} \
         {COURIERTLS} -server -tcpd {imaplogin} {imapd} Maildir"
    );
    let log = std::fs::File::create(dir.join("stdio.log")).unwrap();
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        // Its own process group: stopping it reaches authdaemond and every session, and
        // nothing else.
        .process_group(0)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("unshare starts Courier")
}
