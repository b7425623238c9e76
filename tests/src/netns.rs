//! Two hosts made of network namespaces, and the real binaries and mail clients run on them.
//!
//! [`TwoHosts`] is an "edge" (broker and mail server) and a "laptop" (agent and mail clients)
//! joined by a veth pair: packets between them cross a real link whose addresses can change and
//! which can lose packets (nftables). Nothing else reaches these namespaces, and they reach
//! nothing else. Making them needs root, as CI runs the tests.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use postern_broker::audit::Audit;
use postern_broker::config::{AuditTarget, Config};
use postern_broker::init::{InitOptions, init};
use postern_broker::issue::{IssueOptions, issue};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// The edge's address on the link between the two hosts.
pub const EDGE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);

/// The laptop's first address on the link between the two hosts.
pub const LAPTOP_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);

/// Prefix length of the link's subnet, 10.201.0.0/24.
const PREFIX: u8 = 24;

/// The name the broker's server certificate is issued for. Nothing resolves it: agents dial
/// the address in their bundle and present this name in TLS.
const BROKER_NAME: &str = "broker.postern.test";

/// The nftables table [`TwoHosts::loss`] writes in the edge namespace.
const LOSS_TABLE: &str = "postern_loss";

/// Namespaces made by this process so far, for unique names.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One of the two hosts: a network namespace, by name.
#[derive(Debug, Clone)]
pub struct Namespace {
    name: String,
}

/// Two network namespaces joined by a veth pair: the edge at [`EDGE_ADDR`], the laptop at
/// [`LAPTOP_ADDR`]. Both are deleted, with their link, when this is dropped: stop what runs in
/// them first.
#[derive(Debug)]
pub struct TwoHosts {
    edge: Namespace,
    laptop: Namespace,
    /// The edge's end of the veth pair.
    edge_link: String,
    /// The laptop's end of the veth pair.
    laptop_link: String,
    /// The laptop's current address.
    laptop_addr: Ipv4Addr,
}

/// Packets and bytes that met the loss of [`TwoHosts::loss`], and those it dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossCounts {
    /// Packets that reached the loss rule (a GSO batch counts once).
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Packets dropped.
    pub dropped_packets: u64,
    /// Their bytes.
    pub dropped_bytes: u64,
}

/// `postern-broker serve` (the real binary) in the edge namespace, with a broker folder made by
/// `postern-broker init`'s code; stopped and started again with the same configuration and port.
#[derive(Debug)]
pub struct EdgeBroker {
    // Dropped in this order: the process, then its folder.
    process: Option<Child>,
    /// The `postern-broker` binary.
    program: PathBuf,
    edge: Namespace,
    dir: TempDir,
    /// The configuration the process serves.
    config: Config,
    /// Where the broker listens, on the edge.
    addr: SocketAddr,
    /// `broker.start` audit events seen so far: one per start.
    starts: usize,
}

/// `postern up` (the real binary) in the laptop namespace, for an identity imported with
/// `postern login --bundle` into a home of its own.
#[derive(Debug)]
pub struct LaptopAgent {
    // Dropped in this order: the process, then its home.
    process: Child,
    home: TempDir,
    addr: SocketAddr,
}

/// An IMAP session held open by `tests/clients/imap_session.py` in a namespace: it logs in once
/// and fetches the whole mailbox whenever asked, on the same connection.
#[derive(Debug)]
pub struct MailSession {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    errors: tempfile::NamedTempFile,
}

impl Namespace {
    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside this namespace (`ip netns exec NAME program`).
    /// `ip` replaces itself with the program: the child's process id is the program's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(tool("ip"));
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs `program` with `args` inside this namespace; panics with its standard error if it
    /// fails. Returns its standard output.
    pub fn run(&self, program: impl AsRef<OsStr>, args: &[&str]) -> String {
        let mut command = self.command(program);
        command.args(args);
        run(&mut command)
    }

    /// How many TCP connections inside this namespace are established towards `port`
    /// (`ss`), counting those a listener has not accepted yet.
    pub fn established_to(&self, port: u16) -> usize {
        let port = format!(":{port}");
        self.run(
            tool("ss"),
            &["-Htn", "state", "established", "dport", "=", &port],
        )
        .lines()
        .filter(|line| !line.trim().is_empty())
        .count()
    }

    /// Whether a TCP connection to `addr` from inside this namespace succeeds now.
    pub fn can_connect(&self, addr: SocketAddr) -> bool {
        self.command("python3")
            .args([
                "-c",
                "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2).close()",
            ])
            .args([addr.ip().to_string(), addr.port().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

impl TwoHosts {
    /// Makes the two namespaces and the link between them.
    pub fn new() -> Self {
        assert!(
            crate::is_root(),
            "the two-host tests make network namespaces, which needs root (CI runs them as root)"
        );
        remove_stale_namespaces();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let hosts = TwoHosts {
            edge: Namespace {
                name: format!("postern-{pid}-{n}-edge"),
            },
            laptop: Namespace {
                name: format!("postern-{pid}-{n}-laptop"),
            },
            edge_link: format!("pe{pid}x{n}"),
            laptop_link: format!("pl{pid}x{n}"),
            laptop_addr: LAPTOP_ADDR,
        };
        // Interface names have at most 15 bytes (IFNAMSIZ - 1).
        assert!(
            hosts.laptop_link.len() <= 15,
            "`{}` is too long for an interface name",
            hosts.laptop_link
        );
        // From here on, dropping `hosts` removes whatever was made.
        for namespace in [&hosts.edge, &hosts.laptop] {
            run(Command::new(tool("ip")).args(["netns", "add", &namespace.name]));
        }
        run(Command::new(tool("ip")).args([
            "link",
            "add",
            &hosts.edge_link,
            "netns",
            &hosts.edge.name,
            "type",
            "veth",
            "peer",
            "name",
            &hosts.laptop_link,
            "netns",
            &hosts.laptop.name,
        ]));
        // A new namespace starts with promote_secondaries=0: deleting the laptop's old address
        // would then delete the new one in the same subnet too.
        hosts.laptop.run(
            "sh",
            &[
                "-c",
                &format!(
                    "echo 1 > /proc/sys/net/ipv4/conf/{}/promote_secondaries",
                    hosts.laptop_link
                ),
            ],
        );
        for (namespace, link, addr) in [
            (&hosts.edge, &hosts.edge_link, EDGE_ADDR),
            (&hosts.laptop, &hosts.laptop_link, LAPTOP_ADDR),
        ] {
            let ip = |args: &[&str]| {
                run(Command::new(tool("ip"))
                    .args(["-n", &namespace.name])
                    .args(args))
            };
            ip(&["link", "set", "lo", "up"]);
            ip(&["addr", "add", &format!("{addr}/{PREFIX}"), "dev", link]);
            ip(&["link", "set", link, "up"]);
        }
        hosts
    }

    /// The edge: broker and mail server.
    pub fn edge(&self) -> &Namespace {
        &self.edge
    }

    /// The laptop: agent and mail clients.
    pub fn laptop(&self) -> &Namespace {
        &self.laptop
    }

    /// The laptop's current address.
    pub fn laptop_addr(&self) -> Ipv4Addr {
        self.laptop_addr
    }

    /// Moves the laptop to `new` (in 10.201.0.0/24), as a network change does: adds the new
    /// address, then deletes the old one. Sockets bound to the old address lose it; sockets on
    /// the unspecified address send from the new one.
    pub fn move_laptop(&mut self, new: Ipv4Addr) {
        let old = self.laptop_addr;
        let ip = |args: &[&str]| {
            run(Command::new(tool("ip"))
                .args(["-n", &self.laptop.name])
                .args(args))
        };
        ip(&[
            "addr",
            "add",
            &format!("{new}/{PREFIX}"),
            "dev",
            &self.laptop_link,
        ]);
        ip(&[
            "addr",
            "del",
            &format!("{old}/{PREFIX}"),
            "dev",
            &self.laptop_link,
        ]);
        let shown = ip(&["-4", "-o", "addr", "show", "dev", &self.laptop_link]);
        assert!(
            shown.contains(&format!("inet {new}/")) && !shown.contains(&format!("inet {old}/")),
            "after moving the laptop from {old} to {new} it has: {shown}"
        );
        self.laptop_addr = new;
    }

    /// Drops `percent` % of the packets that cross the link, in both directions, at random
    /// (nftables `numgen random` in the edge namespace, on its end of the link only: the
    /// edge's loopback, between broker and mail server, stays lossless). 0 removes the loss.
    /// A batch of datagrams sent at once (UDP GSO) is one packet to nftables: the loss is
    /// about `percent` % of the bytes, in bursts of a batch.
    pub fn loss(&self, percent: u8) {
        assert!(percent <= 100, "a loss of {percent} % is not a percentage");
        // Declaring the table first makes deleting it work whether it exists or not.
        let mut rules = format!("table inet {LOSS_TABLE}\ndelete table inet {LOSS_TABLE}\n");
        if percent > 0 {
            let link = &self.edge_link;
            // Every packet on the link is counted, then some dropped (and counted).
            let chain = |hook: &str, side: &str| {
                [
                    format!("  chain {hook} {{"),
                    format!("    type filter hook {hook} priority 0; policy accept;"),
                    format!("    {side} \"{link}\" counter comment \"all\""),
                    format!(
                        "    {side} \"{link}\" numgen random mod 100 < {percent} counter drop \
                         comment \"dropped\""
                    ),
                    "  }".to_owned(),
                ]
                .join("\n")
            };
            rules.push_str(&format!(
                "table inet {LOSS_TABLE} {{\n{}\n{}\n}}\n",
                chain("input", "iifname"),
                chain("output", "oifname"),
            ));
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), rules).unwrap();
        let mut command = self.edge.command(tool("nft"));
        command.arg("-f").arg(file.path());
        run(&mut command);
    }

    /// What crossed the link and what the loss dropped since [`loss`](Self::loss) set it, both
    /// directions together. The kernel hands nftables a batch of datagrams sent at once (UDP
    /// GSO) as one packet: a drop then loses the whole batch.
    pub fn loss_counts(&self) -> LossCounts {
        let listed = self
            .edge
            .run(tool("nft"), &["-j", "list", "table", "inet", LOSS_TABLE]);
        let json: Value = serde_json::from_str(&listed)
            .unwrap_or_else(|e| panic!("`nft -j` printed no JSON ({e}): {listed}"));
        let mut counts = LossCounts::default();
        for item in json["nftables"].as_array().into_iter().flatten() {
            let rule = &item["rule"];
            let Some(counter) = rule["expr"]
                .as_array()
                .and_then(|exprs| exprs.iter().find_map(|e| e.get("counter")))
            else {
                continue;
            };
            let (packets, bytes) = (
                counter["packets"].as_u64().unwrap_or_default(),
                counter["bytes"].as_u64().unwrap_or_default(),
            );
            match rule["comment"].as_str() {
                Some("all") => {
                    counts.packets += packets;
                    counts.bytes += bytes;
                }
                Some("dropped") => {
                    counts.dropped_packets += packets;
                    counts.dropped_bytes += bytes;
                }
                _ => {}
            }
        }
        counts
    }
}

impl Default for TwoHosts {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        // The veth pair goes with the namespaces.
        for namespace in [&self.edge, &self.laptop] {
            let deleted = Command::new(tool("ip"))
                .args(["netns", "del", &namespace.name])
                .output();
            if let Ok(output) = deleted
                && !output.status.success()
            {
                eprintln!(
                    "cannot delete the network namespace `{}`: {}",
                    namespace.name,
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        }
    }
}

impl EdgeBroker {
    /// `postern-broker init` for the edge ([`EDGE_ADDR`] and a free port, `services` as
    /// `NAME=HOST:PORT` seen from the edge), `edit` applied to `broker.toml`, then `program`
    /// (a `postern-broker` binary) `serve` in the edge namespace. Returns once the broker serves.
    pub async fn start(
        hosts: &TwoHosts,
        program: &Path,
        services: &[(&str, SocketAddr)],
        edit: impl FnOnce(&mut String),
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("postern-edge-")
            .tempdir()
            .unwrap();
        // The edge namespace is new: a port free here is free there too.
        let addr = SocketAddr::from((EDGE_ADDR, crate::free_udp_port()));
        let options = InitOptions {
            dir: dir.path().join("broker"),
            hostname: BROKER_NAME.into(),
            listen: addr.to_string(),
            services: services
                .iter()
                .map(|(name, service)| format!("{name}={service}"))
                .collect(),
            mail_ca: None,
            oidc: None,
        };
        let config_path = init(&options, SystemTime::now()).unwrap();
        let mut text = std::fs::read_to_string(&config_path).unwrap();
        let default_address = format!("# public_address = \"{BROKER_NAME}:4433\"");
        assert!(
            text.contains(&default_address),
            "broker.toml from init has no line `{default_address}` to replace:\n{text}"
        );
        // Agents dial the edge's address: nothing resolves the certificate's name.
        text = text.replace(&default_address, &format!("public_address = \"{addr}\""));
        edit(&mut text);
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::load(&config_path).unwrap();
        let mut broker = EdgeBroker {
            process: None,
            program: program.to_owned(),
            edge: hosts.edge.clone(),
            dir,
            config,
            addr,
            starts: 0,
        };
        broker.start_again().await;
        broker
    }

    /// Where the broker listens, on the edge.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The configuration the broker serves.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// An admin-issued bundle for `user` (made by `postern-broker issue`'s code), written to a
    /// file in the broker's folder; returns the file.
    pub fn issue(&self, user: &str, groups: &[&str], ttl: Duration) -> PathBuf {
        let out = self.dir.path().join(format!(
            "{user}-{}.bundle",
            crate::daemon::hex(&crate::random_bytes(4))
        ));
        let options = IssueOptions {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ttl,
            csr: None,
            out: out.clone(),
        };
        let audit = Audit::open(&self.config.audit).unwrap();
        issue(&self.config, &options, &audit, SystemTime::now()).unwrap();
        out
    }

    /// Sends SIGTERM: the broker takes no new connections and drains its open sessions for
    /// `limits.shutdown_grace`.
    pub fn begin_shutdown(&self) {
        let child = self.process.as_ref().expect("the broker runs");
        signal(child, rustix::process::Signal::TERM);
    }

    /// Waits up to `limit` for the broker to exit; its exit status.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = self.process.as_mut().expect("the broker was started");
        let Ok(status) = tokio::time::timeout(limit, child.wait()).await else {
            panic!(
                "the broker did not exit within {limit:?}; its log:\n{}",
                self.logs()
            );
        };
        let status = status.unwrap();
        self.process = None;
        status
    }

    /// SIGTERM, then waits up to `limit` for the broker to drain and exit.
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.begin_shutdown();
        self.wait_exit(limit).await
    }

    /// Whether the broker process is still running (draining counts).
    pub fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Starts `postern-broker serve` (again) with the same configuration and port, and returns
    /// once it serves: when it has written its `broker.start` audit event. The previous process
    /// must have exited.
    pub async fn start_again(&mut self) {
        assert!(
            self.process.is_none(),
            "the previous broker process has not exited"
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut command = self.edge.command(&self.program);
        command
            .arg("serve")
            .arg("--config")
            .arg(&self.config.path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut command = tokio::process::Command::from(command);
        command.kill_on_drop(true);
        let mut child = command
            .spawn()
            .expect("ip netns exec postern-broker starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.audit_events("broker.start").len() > self.starts {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "postern-broker exited with {status}; its log:\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "postern-broker did not start serving within 30 s; its log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.starts += 1;
        self.process = Some(child);
    }

    /// What the broker processes wrote to standard output and error, all starts together.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits up to `limit` until the broker's log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.logs().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the broker did not log `{needle}` within {limit:?}; its log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The audit events written so far. A last line still being written (no newline yet) is
    /// left for the next look.
    pub fn audit(&self) -> Vec<Value> {
        crate::audit::read(self.audit_path())
    }

    /// The audit events with `event.action` equal to `action`.
    pub fn audit_events(&self, action: &str) -> Vec<Value> {
        crate::audit::events(self.audit_path(), action)
    }

    /// Waits up to 15 s until an audit event `action` satisfying `check` is written.
    pub async fn wait_for_audit(&self, action: &str, check: impl Fn(&Value) -> bool) -> Value {
        crate::audit::wait_for(self.audit_path(), action, Duration::from_secs(15), check).await
    }

    /// Waits up to `limit` until there are at least `count` audit events `action`; whether
    /// there are.
    pub async fn wait_for_count(&self, action: &str, count: usize, limit: Duration) -> bool {
        crate::audit::wait_for_count(self.audit_path(), action, count, limit).await
    }

    fn audit_path(&self) -> &Path {
        let AuditTarget::File(path) = &self.config.audit else {
            panic!("the broker's audit trail goes to a file")
        };
        path
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }
}

impl LaptopAgent {
    /// Imports `bundle` with `postern login --bundle` into a new home, then runs `postern up`
    /// in `laptop`, serving `service` on that namespace's 127.0.0.1 and a free port; `postern`
    /// is the binary. Returns once the agent says where it serves.
    pub async fn start(laptop: &Namespace, postern: &Path, bundle: &Path, service: &str) -> Self {
        let home = tempfile::Builder::new()
            .prefix("postern-laptop-")
            .tempdir()
            .unwrap();
        let mut login = laptop.command(postern);
        login
            .args(["login", "--bundle"])
            .arg(bundle)
            .env("POSTERN_HOME", home.path())
            .stdin(Stdio::null());
        run(&mut login);

        let addr = SocketAddr::from(([127, 0, 0, 1], crate::free_tcp_port()));
        let log = std::fs::File::create(home.path().join("agent.log")).unwrap();
        let mut up = laptop.command(postern);
        up.args(["up", "--listen", &format!("{service}={addr}")])
            .env("POSTERN_HOME", home.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut up = tokio::process::Command::from(up);
        up.kill_on_drop(true);
        let mut process = up.spawn().expect("ip netns exec postern up starts");
        let mut lines = BufReader::new(process.stdout.take().unwrap()).lines();
        let needle = format!("postern: {service} on {addr}");
        let logs = || std::fs::read_to_string(home.path().join("agent.log")).unwrap_or_default();
        loop {
            match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
                Ok(Ok(Some(line))) if line.contains(&needle) => break,
                Ok(Ok(Some(_))) => {}
                Ok(_) => panic!("postern up ended without serving; its log:\n{}", logs()),
                Err(_) => panic!("postern up did not serve within 30 s; its log:\n{}", logs()),
            }
        }
        // Whatever it prints later must not fill the pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        LaptopAgent {
            process,
            home,
            addr,
        }
    }

    /// Where the service is served, on the laptop's 127.0.0.1.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the agent logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.home.path().join("agent.log")).unwrap_or_default()
    }

    /// Whether `postern up` is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.process.try_wait(), Ok(None))
    }
}

impl MailSession {
    /// Logs in at `addr` from inside `namespace` (as `user`, verifying the server against
    /// `ca`), selects INBOX, and returns once the session is ready.
    pub async fn open(
        namespace: &Namespace,
        addr: SocketAddr,
        ca: &Path,
        user: &str,
        password: &str,
    ) -> Result<Self, String> {
        let errors = tempfile::NamedTempFile::new().unwrap();
        let mut command = namespace.command("python3");
        command
            .arg(crate::workspace().join("tests/clients/imap_session.py"))
            .args(["--host", &addr.ip().to_string()])
            .args(["--port", &addr.port().to_string()])
            .arg("--cafile")
            .arg(ca)
            .args(["--user", user, "--password", password])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(errors.reopen().unwrap());
        let mut command = tokio::process::Command::from(command);
        command.kill_on_drop(true);
        let mut child = command.spawn().expect("ip netns exec python3 starts");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut session = MailSession {
            child,
            stdin,
            lines,
            errors,
        };
        match session.answer(Duration::from_secs(30)).await?.as_str() {
            "ready" => Ok(session),
            other => Err(format!("the mail client said `{other}` instead of `ready`")),
        }
    }

    /// Fetches every message of the mailbox on this session, waiting up to `limit`. Returns the
    /// SHA-256 of each message, sorted.
    pub async fn fetch(&mut self, limit: Duration) -> Result<Vec<String>, String> {
        self.ask("fetch").await?;
        let line = self.answer(limit).await?;
        let fetched: Value = serde_json::from_str(&line)
            .map_err(|e| format!("the mail client printed `{line}`, not JSON: {e}"))?;
        let mut digests: Vec<String> = fetched["messages"]
            .as_array()
            .ok_or_else(|| format!("no messages in `{line}`"))?
            .iter()
            .map(|m| m["sha256"].as_str().unwrap_or_default().to_owned())
            .collect();
        digests.sort();
        Ok(digests)
    }

    /// Logs out and waits for the client to exit.
    pub async fn logout(mut self) -> Result<(), String> {
        self.ask("logout").await?;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .map_err(|_| "the mail client did not exit within 30 s of LOGOUT".to_owned())?
            .map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "the mail client exited with {status}: {}",
                self.errors()
            ))
        }
    }

    async fn ask(&mut self, command: &str) -> Result<(), String> {
        let written = self
            .stdin
            .write_all(format!("{command}\n").as_bytes())
            .await;
        written.map_err(|e| {
            format!(
                "cannot ask the mail client to {command}: {e}; {}",
                self.errors()
            )
        })
    }

    /// The next line the client prints, within `limit`.
    async fn answer(&mut self, limit: Duration) -> Result<String, String> {
        match tokio::time::timeout(limit, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => {
                let status = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
                Err(format!(
                    "the mail client ended ({status:?}): {}",
                    self.errors()
                ))
            }
            Ok(Err(e)) => Err(format!("cannot read the mail client's output: {e}")),
            Err(_) => Err(format!(
                "the mail client did not answer within {limit:?}: {}",
                self.errors()
            )),
        }
    }

    fn errors(&self) -> String {
        std::fs::read_to_string(self.errors.path()).unwrap_or_default()
    }
}

/// SHA-256 of each message, sorted: what [`MailSession::fetch`] returns for them.
pub fn digests(messages: &[crate::Message]) -> Vec<String> {
    let mut digests: Vec<String> = messages.iter().map(|m| crate::sha256_hex(&m.0)).collect();
    digests.sort();
    digests
}

/// Runs `command`; panics with its standard error if it cannot start or fails. Its standard
/// output.
fn run(command: &mut Command) -> String {
    let output: Output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The path of a system tool (`ip`, `nft`), which may live in an `sbin` folder not on `PATH`.
fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed (iproute2, nftables); run scripts/install-test-deps")
        })
}

/// Sends `signal` to `child`, if it still runs.
fn signal(child: &Child, signal: rustix::process::Signal) {
    if let Some(pid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// Deletes namespaces this harness made in processes that no longer run (killed before they
/// could clean up), so that they do not pile up.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("postern-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = rustix::process::Pid::from_raw(pid)
            .is_some_and(|pid| rustix::process::test_kill_process(pid).is_ok());
        if !alive {
            let _ = Command::new(tool("ip"))
                .args(["netns", "del", &name])
                .output();
        }
    }
}
