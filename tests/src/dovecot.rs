//! A private Dovecot for one test: its own configuration, users, TLS certificate and mail.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tempfile::TempDir;

use crate::Namespace;
use crate::daemon::{Daemon, chown_tree, set_mode};

/// A running Dovecot serving IMAPS on 127.0.0.1, and IMAP with STARTTLS on another port.
#[derive(Debug)]
pub struct Dovecot {
    // Dropped in this order: the server, then its folder.
    daemon: Daemon,
    dir: TempDir,
    port: u16,
    starttls_port: u16,
}

/// A message to seed, as the bytes of an RFC 5322 message.
#[derive(Debug, Clone)]
pub struct Message(pub Vec<u8>);

impl Dovecot {
    /// Starts Dovecot with `users` (name, password, messages in INBOX).
    pub fn start(users: &[(&str, &str, Vec<Message>)]) -> Self {
        Self::launch(users, None, "")
    }

    /// Like [`start`](Self::start), with `settings` added to the configuration (such as the
    /// limits that many connections need).
    pub fn start_with(users: &[(&str, &str, Vec<Message>)], settings: &str) -> Self {
        Self::launch(users, None, settings)
    }

    /// Starts Dovecot with `users` inside `namespace`, on that namespace's own 127.0.0.1: only
    /// programs in the namespace reach it.
    pub fn start_in(namespace: &Namespace, users: &[(&str, &str, Vec<Message>)]) -> Self {
        Self::launch(users, Some(namespace), "")
    }

    fn launch(
        users: &[(&str, &str, Vec<Message>)],
        namespace: Option<&Namespace>,
        settings: &str,
    ) -> Self {
        assert!(
            Path::new("/usr/sbin/dovecot").exists(),
            "Dovecot is not installed; run scripts/install-test-deps"
        );
        let dir = tempfile::Builder::new()
            .prefix("postern-dovecot-")
            .tempdir()
            .unwrap();
        // Dovecot's unprivileged processes must reach the configuration and the mail.
        set_mode(dir.path(), 0o755);
        let (mail_uid, mail_gid, internal, login) = accounts();

        write_tls(dir.path());
        let mut passwd = String::new();
        for (name, password, messages) in users {
            let hash = Command::new("doveadm")
                .args(["pw", "-s", "SHA512-CRYPT", "-p", password])
                .output()
                .unwrap();
            assert!(
                hash.status.success(),
                "doveadm pw failed: {}",
                String::from_utf8_lossy(&hash.stderr)
            );
            passwd.push_str(&format!(
                "{name}:{}::::::\n",
                String::from_utf8(hash.stdout).unwrap().trim()
            ));
            let maildir = dir.path().join("home").join(name).join("Maildir");
            for sub in ["cur", "new", "tmp"] {
                std::fs::create_dir_all(maildir.join(sub)).unwrap();
            }
            for (index, message) in messages.iter().enumerate() {
                std::fs::write(
                    maildir
                        .join("new")
                        .join(format!("{}.M{index}P1.postern", 1_700_000_000 + index)),
                    &message.0,
                )
                .unwrap();
            }
            chown_tree(&dir.path().join("home"), mail_uid, mail_gid);
        }
        std::fs::write(dir.path().join("passwd"), passwd).unwrap();

        for _attempt in 0..3 {
            let (port, starttls_port) = (crate::free_tcp_port(), crate::free_tcp_port());
            let config = config(
                dir.path(),
                (port, starttls_port),
                (mail_uid, mail_gid),
                &internal,
                &login,
            ) + settings;
            std::fs::write(dir.path().join("dovecot.conf"), config).unwrap();
            let log = std::fs::File::create(dir.path().join("stdio.log")).unwrap();
            let child = match namespace {
                Some(namespace) => namespace.command("/usr/sbin/dovecot"),
                None => Command::new("/usr/sbin/dovecot"),
            }
            .arg("-F")
            .arg("-c")
            .arg(dir.path().join("dovecot.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dovecot starts");
            // Dovecot stays in the tests' process group: stopped alone.
            let mut daemon = Daemon::new("dovecot", child, false);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let listening = || match namespace {
                Some(namespace) => namespace.can_connect(addr),
                None => TcpStream::connect(addr).is_ok(),
            };
            if daemon.wait_until(listening, || logs(dir.path())) {
                return Dovecot {
                    daemon,
                    dir,
                    port,
                    starttls_port,
                };
            }
            daemon.stop();
        }
        panic!(
            "Dovecot did not start; see its logs in {}",
            dir.path().display()
        );
    }

    /// Delivers `message` to `user`'s INBOX as a mail server's delivery agent does (written
    /// aside, then moved into `new/`): an IDLE client hears of it at once.
    pub fn deliver(&self, user: &str, message: &Message) {
        let maildir = self.dir.path().join("home").join(user).join("Maildir");
        let name = format!(
            "{}.M{}P1.delivered",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            crate::daemon::hex(&crate::random_bytes(4))
        );
        let aside = maildir.join("tmp").join(&name);
        std::fs::write(&aside, &message.0).unwrap();
        let (uid, gid, _, _) = accounts();
        chown_tree(&aside, uid, gid);
        std::fs::rename(&aside, maildir.join("new").join(&name)).unwrap();
    }

    /// Where IMAPS is served (inside the namespace, for [`start_in`](Self::start_in)).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Where IMAP is served, with STARTTLS required before a login (inside the namespace, for
    /// [`start_in`](Self::start_in)).
    pub fn starttls_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.starttls_port))
    }

    /// The CA certificate (PEM) that signed Dovecot's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Stops Dovecot: SIGTERM, then SIGKILL if it lingers.
    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    /// What Dovecot logged so far.
    pub fn logs(&self) -> String {
        logs(self.dir.path())
    }
}

/// What Dovecot in `dir` logged so far.
fn logs(dir: &Path) -> String {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    format!("{}{}", read("stdio.log"), read("dovecot.log"))
}

impl Message {
    /// `count` varied messages: plain text, UTF-8, long lines, base64 attachments of 1 to
    /// ~200 KB. The same `seed` gives the same messages.
    pub fn samples(count: usize, seed: u64) -> Vec<Message> {
        Self::generate(count, seed, |next| 1024 + (next() % 200_000) as usize)
    }

    /// `count` messages like [`samples`](Self::samples), each with an attachment of
    /// `attachment` random bytes (the message is about 4/3 of that, base64). The same `seed`
    /// gives the same messages.
    pub fn sized(count: usize, seed: u64, attachment: usize) -> Vec<Message> {
        Self::generate(count, seed, |_| attachment)
    }

    /// `count` messages whose attachment sizes `size` draws from the generator it is given.
    fn generate(
        count: usize,
        seed: u64,
        mut size: impl FnMut(&mut dyn FnMut() -> u64) -> usize,
    ) -> Vec<Message> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        (0..count)
            .map(|index| {
                let size = size(&mut next);
                let attachment: Vec<u8> = (0..size).map(|_| next() as u8).collect();
                let mut text = format!(
                    "From: Bob <bob@example.org>\r\nTo: Alice <alice@example.org>\r\n\
                     Subject: Message {index} =?UTF-8?Q?gr=C3=BC=C3=9Fe?=\r\n\
                     Date: Thu, 26 Nov 2026 10:{:02}:00 +0000\r\nMessage-ID: <{index}.{seed}@example.org>\r\n\
                     MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b{index}\"\r\n\r\n\
                     --b{index}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
                     Grüße aus dem Tunnel, Nachricht {index}.\r\n{}\r\n\
                     --b{index}\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\
                     Content-Disposition: attachment; filename=\"data-{index}.bin\"\r\n\r\n",
                    index % 60,
                    "long line ".repeat(50),
                );
                for line in base64(&attachment).as_bytes().chunks(76) {
                    text.push_str(std::str::from_utf8(line).unwrap());
                    text.push_str("\r\n");
                }
                text.push_str(&format!("--b{index}--\r\n"));
                Message(text.into_bytes())
            })
            .collect()
    }
}

fn config(
    dir: &Path,
    (port, starttls_port): (u16, u16),
    (uid, gid): (u32, u32),
    internal: &str,
    login: &str,
) -> String {
    let d = dir.display();
    format!(
        r#"# Written by the Postern test harness.
base_dir = {d}/run
state_dir = {d}/state
instance_name = postern-test-{port}
log_path = {d}/dovecot.log
listen = 127.0.0.1
protocols = imap
ssl = required
ssl_cert = <{d}/server.pem
ssl_key = <{d}/server.key
auth_mechanisms = plain login
# Dovecot says `* OK Still here` to an IDLE client every 2 minutes by default; here it stays
# silent for longer than any test, so that an IDLE through the tunnel lives on keep-alives.
imap_idle_notify_interval = 60 mins
# The broker logs in for everyone from one address: without this, Dovecot's per-address
# penalty after failed logins would slow every person down for one person's typos.
login_trusted_networks = 127.0.0.0/8
passdb {{
  driver = passwd-file
  args = scheme=SHA512-CRYPT {d}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/home/%u
}}
mail_location = maildir:~/Maildir
first_valid_uid = {uid}
first_valid_gid = {gid}
default_internal_user = {internal}
default_login_user = {login}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {starttls_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {port}
    ssl = yes
  }}
}}
"#
    )
}

/// The accounts Dovecot runs as: as root the Debian ones, otherwise the current user.
fn accounts() -> (u32, u32, String, String) {
    if crate::is_root() {
        (8, 8, "dovecot".into(), "dovenull".into())
    } else {
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let name = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "nobody".into());
        (uid, gid, name.clone(), name)
    }
}

pub(crate) fn write_tls(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Test mail CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(
        dir.join("server.pem"),
        format!("{}{}", cert.pem(), ca_cert.pem()),
    )
    .unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize])
            } else {
                '='
            });
        }
    }
    out
}
