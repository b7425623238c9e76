//! The end-to-end harness of Postern: real parts, started on loopback for one test each.
//!
//! - [`Dovecot`]: a private Dovecot (`dovecot-imapd`) with its own configuration, users, TLS
//!   certificate, port and seeded mail.
//! - [`Cyrus`]: a private Cyrus IMAP (`cyrus-imapd`, unpacked beside Dovecot) with its own sasldb
//!   users, TLS certificate, port and mail seeded through IMAP.
//! - [`Courier`]: a private Courier IMAP (`courier-imap`, unpacked beside Dovecot) with its own
//!   userdb users, TLS certificate, port and mail seeded through IMAP, in a private mount
//!   namespace.
//! - [`Gateway`]: a broker folder made by `postern-broker init`, and the broker serving it
//!   in-process on a free UDP port.
//! - [`AgentHandle`]: the agent serving an identity on free loopback ports.
//! - [`Idp`]: a real OpenID provider (npm `oidc-provider`, `tests/idp/`) with the device flow,
//!   refresh tokens, a password and a TOTP step; [`approve`]: a person approving a device login
//!   in headless Chromium.
//! - [`imap_fetch`], [`curl`], [`mbsync`]: real IMAP clients (Python `imaplib`, `curl`, isync).
//! - [`ImapWire`]: raw IMAP over TLS, for the byte sequences no well-behaved client sends.
//! - [`bin`]: the built `postern` and `postern-broker` binaries, for the demo.
//! - [`TwoHosts`]: an edge and a laptop made of network namespaces, joined by a link whose
//!   addresses can change and which can lose packets; [`EdgeBroker`], [`LaptopAgent`] and
//!   [`MailSession`] run the real `postern-broker`, `postern` and an `imaplib` client on them.
//!
//! Nothing here listens on anything but 127.0.0.1, except in the namespaces of [`TwoHosts`],
//! which reach nothing else.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a harness failure is a test failure"
)]

mod audit;
mod courier;
mod cyrus;
mod daemon;
mod dovecot;
mod gateway;
mod idp;
mod imap_wire;
mod netns;
mod process;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Output;

pub use courier::Courier;
pub use cyrus::Cyrus;
pub use dovecot::{Dovecot, Message};
pub use gateway::{AgentHandle, Gateway, LoginRun};
pub use idp::{ALICE, Approval, BOB, CLIENT_ID, Idp, IdpOptions, Person, approve, totp_now};
pub use imap_wire::ImapWire;
pub use netns::{
    EDGE_ADDR, EdgeBroker, LAPTOP_ADDR, LaptopAgent, LossCounts, MailSession, Namespace, TwoHosts,
    digests,
};
pub use process::{Running, run_ok, wait_for_line};

/// The workspace folder.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

/// A built binary of the workspace (`postern`, `postern-broker`) beside the running program.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let path = exe.parent().expect("target folder").join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What `tests/clients/imap_fetch.py` saw: the mailboxes and each message's size and SHA-256.
pub async fn imap_fetch(
    addr: SocketAddr,
    ca: &Path,
    user: &str,
    password: &str,
) -> Result<serde_json::Value, String> {
    imap_fetch_with(addr, ca, user, password, "login").await
}

/// [`imap_fetch`] logging in with `mechanism`: `login` or `plain` (AUTHENTICATE PLAIN).
pub async fn imap_fetch_with(
    addr: SocketAddr,
    ca: &Path,
    user: &str,
    password: &str,
    mechanism: &str,
) -> Result<serde_json::Value, String> {
    let script = workspace().join("tests/clients/imap_fetch.py");
    let output = tokio::process::Command::new("python3")
        .arg(script)
        .args([
            "--host",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
        ])
        .arg("--cafile")
        .arg(ca)
        .args(["--user", user, "--password", password])
        .args(["--mechanism", mechanism])
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("imap_fetch printed no JSON: {e}"))
}

/// Runs `curl` with `args` and returns its output.
pub async fn curl(args: &[&str]) -> Output {
    tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "30"])
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("curl runs")
}

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `len` bytes from the system's secure random generator.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut data).unwrap();
    data
}

/// A TCP service on 127.0.0.1 that sends back everything it receives, then closes.
pub async fn echo_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut write).await;
                }
            });
        }
    });
    addr
}

/// Whether this process runs as root (tests that need a second user require it).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A mail client idling in INBOX (`tests/clients/imap_idle.py`): a session that lives for as
/// long as nobody ends it.
#[derive(Debug)]
pub struct ImapIdle {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl ImapIdle {
    /// Logs in at `addr` and returns once the server accepted IDLE.
    pub async fn start(addr: SocketAddr, ca: &Path, user: &str, password: &str) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = tokio::process::Command::new("python3")
            .arg(workspace().join("tests/clients/imap_idle.py"))
            .args(["--host", &addr.ip().to_string()])
            .args(["--port", &addr.port().to_string()])
            .arg("--cafile")
            .arg(ca)
            .args(["--user", user, "--password", password])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        let stdout = child.stdout.take().expect("piped");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .expect("the client logs in within 30 s")
            .unwrap();
        assert_eq!(first.as_deref(), Some("idling"), "the client is idling");
        Self { child, lines }
    }

    /// Waits up to `limit` for what the client says next: `exists: N` (new mail), or how the
    /// session ended; `None` if nothing came.
    pub async fn next_within(&mut self, limit: std::time::Duration) -> Option<String> {
        self.ended_within(limit).await
    }

    /// Waits up to `limit` for the session to end; how it ended, or `None` if it still lives.
    pub async fn ended_within(&mut self, limit: std::time::Duration) -> Option<String> {
        match tokio::time::timeout(limit, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => Some(line),
            Ok(_) => Some("closed: the client exited".into()),
            Err(_) => None,
        }
    }

    /// Whether the session is still open.
    pub fn is_open(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// `message` without the `X-TUID` header mbsync adds to each message it stores (a random id).
fn without_tuid(message: &[u8]) -> Vec<u8> {
    let header_end = message
        .windows(2)
        .position(|w| w == b"\n\n")
        .unwrap_or(message.len());
    let Some(start) = message[..header_end]
        .windows(8)
        .position(|w| w == b"X-TUID: ")
        .filter(|&at| at == 0 || message[at - 1] == b'\n')
    else {
        return message.to_vec();
    };
    let end = message[start..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(message.len(), |at| start + at + 1);
    [&message[..start], &message[end..]].concat()
}

/// Syncs the INBOX at `addr` (as `localhost`, verified against `ca`) into the maildir `dir`
/// with `mbsync` (isync), logging in with `mechanism` (`LOGIN` or `PLAIN`). Returns the SHA-256
/// of every message it wrote (without the header it adds), sorted, so that two syncs compare by
/// content.
pub async fn mbsync(
    addr: SocketAddr,
    ca: &Path,
    user: &str,
    password: &str,
    mechanism: &str,
    dir: &Path,
) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let config = dir.join("mbsyncrc");
    let maildir = dir.join("mail");
    std::fs::create_dir_all(&maildir).map_err(|e| e.to_string())?;
    std::fs::write(
        &config,
        format!(
            "IMAPAccount postern\nHost localhost\nPort {port}\nUser {user}\nPass \"{password}\"\n\
             SSLType IMAPS\nCertificateFile {ca}\nAuthMechs {mechanism}\nPipelineDepth 20\n\n\
             IMAPStore far\nAccount postern\n\n\
             MaildirStore near\nPath {maildir}/\nInbox {maildir}/INBOX\n\n\
             Channel inbox\nFar :far:\nNear :near:\nPatterns INBOX\nCreate Near\nSync Pull\n\
             SyncState *\n",
            port = addr.port(),
            ca = ca.display(),
            maildir = maildir.display(),
        ),
    )
    .map_err(|e| e.to_string())?;
    let output = tokio::process::Command::new("mbsync")
        .arg("--config")
        .arg(&config)
        .arg("--all")
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run mbsync (isync; scripts/install-test-deps): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "mbsync failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let mut sums = Vec::new();
    for sub in ["cur", "new"] {
        let Ok(entries) = std::fs::read_dir(maildir.join("INBOX").join(sub)) else {
            continue;
        };
        for entry in entries {
            let bytes = std::fs::read(entry.map_err(|e| e.to_string())?.path())
                .map_err(|e| e.to_string())?;
            sums.push(sha256_hex(&without_tuid(&bytes)));
        }
    }
    sums.sort();
    Ok(sums)
}
