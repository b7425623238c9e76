//! Memory the server end holds for idle sessions: the broker, sshd (all its processes) and the
//! stunnel server, each with 1,000 and then 10,000 sessions open and quiet; and what Postern's
//! agents hold for the same sessions. A session is a TCP connection from a client here, through
//! the path, to a service here that greets it and then holds it open.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use postern_tests::Running;

use crate::procs;
use crate::setup::{self, Postern, Route};

/// What the held service says first; a session counts as open once the client has read it.
const GREETING: &[u8] = b"* OK held\r\n";
/// Connects in flight at once.
const CONCURRENT: usize = 64;

/// Each path's resident memory at each session count.
pub(crate) struct Memory {
    counts: Vec<usize>,
    agents: usize,
    rows: Vec<Row>,
}

struct Row {
    name: String,
    /// The server end of the path; otherwise Postern's agents, the client end.
    server: bool,
    /// KiB before any session.
    base: u64,
    /// Sessions open and KiB held, for each count (fewer sessions where the path's processes
    /// cannot open enough files).
    held: Vec<(usize, u64)>,
}

/// Sets up each path and fills it with `counts` idle sessions, in increasing order; Postern's
/// sessions come from `agents` agents, as from that many laptops.
pub(crate) async fn run(counts: &[usize], agents: usize) -> anyhow::Result<Memory> {
    let most = counts.iter().copied().max().unwrap_or(0);
    // Each session is a socket in this process, and one or two in each process it crosses.
    let limit = procs::raise_open_files(2 * most as u64 + 4096);
    let room = |per_session: usize| {
        usize::try_from(limit.saturating_sub(256)).unwrap_or(usize::MAX) / per_session
    };
    let work = tempfile::Builder::new()
        .prefix("postern-bench-memory-")
        .tempdir()?;
    let (service, _held) = hold().context("starting the held service")?;
    let postern = Postern::start(
        work.path(),
        &["--service".to_owned(), format!("held={service}")],
        &["held"],
        // All these sessions are one person's: the per-person and per-connection limits are
        // raised to hold them.
        |toml| toml.replace("[limits]\n", &format!("[limits]\n{}", limits(most, agents))),
        agents,
    )
    .context("setting up Postern")?;
    let postern_addrs: Vec<SocketAddr> = (0..agents).map(|n| postern.addr(n, "held")).collect();
    let mut rows = fill(
        &[
            ("Postern broker, tcp", vec![postern.broker.0.id()]),
            ("Postern agents, tcp", postern.agent_pids()),
        ],
        &postern_addrs,
        counts,
        room(1),
        open,
    )
    .await?;
    drop(postern);
    rows.extend(imap(work.path(), counts, agents, room(1)).await?);
    for route in [
        setup::ssh(service, work.path(), None).context("setting up ssh -L")?,
        setup::stunnel(service, work.path()).context("setting up stunnel")?,
    ] {
        let Route {
            addr: Some(addr),
            server: Some(server),
            ..
        } = &route
        else {
            anyhow::bail!("{} has no TCP address or server process", route.name);
        };
        // sshd and ssh hold one socket per session. stunnel holds two, and takes at most
        // 125/256 of its open-file limit in clients.
        let (name, room) = match route.name.as_str() {
            n if n.starts_with("ssh") => ("sshd (all processes)", room(1)),
            _ => (
                "stunnel server",
                usize::try_from(limit * 125 / 256).unwrap_or(usize::MAX) - 64,
            ),
        };
        rows.extend(fill(&[(name, vec![*server])], &[*addr], counts, room, open).await?);
    }
    Ok(Memory {
        counts: counts.to_vec(),
        agents,
        rows,
    })
}

/// Opens sessions with `open` through `addrs` (round robin) up to each count but at most
/// `room`, reading the memory of each of `measured` (a name, and processes taken together; the
/// first is the path's server end) once they are all open; closes them all at the end.
async fn fill<S, F>(
    measured: &[(&str, Vec<u32>)],
    addrs: &[SocketAddr],
    counts: &[usize],
    room: usize,
    open: impl Fn(SocketAddr) -> F,
) -> anyhow::Result<Vec<Row>>
where
    S: Send + 'static,
    F: Future<Output = anyhow::Result<S>> + Send + 'static,
{
    // Each path first carries one session per address and lets it go, so that connections,
    // tasks and caches that exist for any traffic at all are in the base.
    for addr in addrs {
        drop(open(*addr).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = || -> Vec<u64> {
        measured
            .iter()
            .map(|(_, pids)| pids.iter().map(|&pid| procs::rss_kib(pid)).sum())
            .collect()
    };
    let name = measured.first().map_or("", |(name, _)| *name);
    let base = rss();
    let mut sessions: Vec<S> = Vec::with_capacity(counts.last().copied().unwrap_or(0));
    let mut held = Vec::new();
    for &wanted in counts {
        let count = wanted.min(room);
        if count < wanted {
            eprintln!(
                "{name}: {count} sessions instead of {wanted}: more need more open files than `ulimit -n` allows"
            );
        }
        eprintln!("holding {count} idle sessions through {name}");
        while sessions.len() < count {
            let batch = (count - sessions.len()).min(CONCURRENT);
            let mut opening = tokio::task::JoinSet::new();
            for n in 0..batch {
                let addr = addrs[(sessions.len() + n) % addrs.len()];
                opening.spawn(open(addr));
            }
            while let Some(opened) = opening.join_next().await {
                let opened = opened?
                    .with_context(|| format!("{name}, after {} sessions", sessions.len()))?;
                sessions.push(opened);
            }
        }
        // Let whatever follows an open (acknowledgements, timers) settle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        held.push((count, rss()));
    }
    drop(sessions);
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(measured
        .iter()
        .enumerate()
        .map(|(at, (name, _))| Row {
            name: (*name).to_owned(),
            server: at == 0,
            base: base[at],
            held: held.iter().map(|(count, kib)| (*count, kib[at])).collect(),
        })
        .collect())
}

/// Dovecot settings for many sessions of one person from one address: login processes that
/// each serve thousands of connections, `imap` processes that serve a thousand each, and no
/// per-person connection limit.
const DOVECOT_MANY: &str = "
mail_max_userip_connections = 0
default_client_limit = 20000
default_process_limit = 1000
service imap-login {
  service_count = 0
  process_min_avail = 4
  client_limit = 4000
  vsz_limit = 1G
}
service imap {
  service_count = 0
  client_limit = 1000
  process_limit = 100
  vsz_limit = 1G
}
";
const PASSWORD: &str = "bench-pw";

/// The same idle sessions in IMAP mode: each logged in at Dovecot through the broker.
async fn imap(
    work: &std::path::Path,
    counts: &[usize],
    agents: usize,
    room: usize,
) -> anyhow::Result<Vec<Row>> {
    let dovecot = postern_tests::Dovecot::start_with(&[("bench", PASSWORD, vec![])], DOVECOT_MANY);
    let work = work.join("imap");
    let most = counts.iter().copied().max().unwrap_or(0);
    let postern = crate::imap::postern(&dovecot, &work, agents, &limits(most, agents))
        .context("setting up Postern in IMAP mode")?;
    let addrs: Vec<SocketAddr> = (0..agents).map(|n| postern.addr(n, "mail")).collect();
    // All agents are one person's and share the local CA only by name: each has its own.
    let cas: Vec<(SocketAddr, std::sync::Arc<std::path::PathBuf>)> = (0..agents)
        .map(|n| (addrs[n], std::sync::Arc::new(postern.local_ca(n))))
        .collect();
    fill(
        &[
            ("Postern broker, imap", vec![postern.broker.0.id()]),
            ("Postern agents, imap", postern.agent_pids()),
        ],
        &addrs,
        counts,
        room,
        move |addr| {
            let ca = cas
                .iter()
                .find(|(a, _)| *a == addr)
                .map(|(_, ca)| ca.clone())
                .expect("an agent's address");
            async move {
                let (mut wire, _) = postern_tests::ImapWire::connect(addr, &ca).await;
                wire.send(format!("a LOGIN bench {PASSWORD}\r\n").as_bytes())
                    .await;
                let answer = wire.until("a").await;
                anyhow::ensure!(
                    answer.last().is_some_and(|l| l.starts_with("a OK")),
                    "the login through Postern failed: {answer:?}"
                );
                Ok(wire)
            }
        },
    )
    .await
    .with_context(|| {
        let logs = dovecot.logs();
        let tail: Vec<&str> = logs
            .lines()
            .rev()
            .filter(|l| {
                ["Error", "Warning", "Fatal", "Panic"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .take(12)
            .collect();
        format!(
            "Dovecot's last complaints:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })
}

/// The `[limits]` that let one person hold `most` sessions from `agents` agents.
fn limits(most: usize, agents: usize) -> String {
    format!(
        "max_sessions_per_user = {}\nmax_streams_per_connection = {}\n",
        most + 64,
        (most.div_ceil(agents.max(1)) + 16).min(4096)
    )
}

/// Connects through `addr` and reads the greeting: a session, open end to end.
async fn open(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = tokio::time::timeout(Duration::from_secs(30), async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut greeting = [0u8; GREETING.len()];
        stream.read_exact(&mut greeting).await?;
        anyhow::Ok(stream)
    })
    .await
    .with_context(|| format!("no greeting through {addr} within 30 s"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A service on 127.0.0.1 that greets each connection and holds it until the client goes: this
/// program again, as its own process, so that its sockets do not count against this one's
/// open-file limit.
fn hold() -> anyhow::Result<(SocketAddr, Running)> {
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg(HOLD_COMMAND)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("the held service's stdout")?;
    let running = Running(child);
    let line = postern_tests::wait_for_line(stdout, "holding on");
    let addr = line
        .rsplit(' ')
        .next()
        .context("the held service names its address")?
        .parse()?;
    Ok((addr, running))
}

/// The argument that makes this program [`hold`]'s service.
pub(crate) const HOLD_COMMAND: &str = "hold-service";

/// The service [`hold`] starts; serves until killed.
pub(crate) async fn serve_held() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("holding on {}", listener.local_addr()?);
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            if stream.write_all(GREETING).await.is_ok() {
                let mut byte = [0u8; 1];
                let _ = stream.read(&mut byte).await;
            }
        });
    }
}

impl Memory {
    /// The table: resident memory added by the sessions, per session, and against Postern.
    pub(crate) fn table(&self) -> String {
        let per_session = |row: &Row, at: usize| {
            let (count, kib) = row.held[at];
            kib.saturating_sub(row.base) as f64 / count as f64
        };
        let mut out = format!(
            "Resident memory of the server end holding idle sessions (Postern's from {} agents)\n\n{:<22} {:>9}",
            self.agents, "server", "base MiB"
        );
        let (servers, agents): (Vec<&Row>, Vec<&Row>) = self.rows.iter().partition(|r| r.server);
        for _ in &self.counts {
            out.push_str(&format!(
                " {:>9} {:>9} {:>12} {:>9}",
                "sessions", "MiB", "KiB/session", "/Postern"
            ));
        }
        out.push('\n');
        for row in &servers {
            out.push_str(&format!(
                "{:<22} {:>9.1}",
                row.name,
                row.base as f64 / 1024.0
            ));
            for at in 0..self.counts.len() {
                let postern = servers.first().map_or(f64::NAN, |p| per_session(p, at));
                let (count, kib) = row.held[at];
                out.push_str(&format!(
                    " {:>9} {:>9.1} {:>12.1} {:>8.2}×",
                    count,
                    kib as f64 / 1024.0,
                    per_session(row, at),
                    per_session(row, at) / postern
                ));
            }
            out.push('\n');
        }
        if !agents.is_empty() {
            out.push_str(&format!(
                "\nThe client end: Postern's {} agents together, for the same sessions\n\n",
                self.agents
            ));
            for row in &agents {
                out.push_str(&format!(
                    "{:<22} {:>9.1}",
                    row.name,
                    row.base as f64 / 1024.0
                ));
                for (at, (count, kib)) in row.held.iter().enumerate() {
                    out.push_str(&format!(
                        " {:>9} {:>9.1} {:>12.1} {:>9}",
                        count,
                        *kib as f64 / 1024.0,
                        per_session(row, at),
                        ""
                    ));
                }
                out.push('\n');
            }
        }
        out
    }

    /// The same as JSON.
    pub(crate) fn json(&self) -> Value {
        json!({
            "benchmark": "idle_session_memory",
            "unit": "KiB",
            "agents": self.agents,
            "paths": self.rows.iter().map(|row| json!({
                "name": row.name,
                "end": if row.server { "server" } else { "client" },
                "base": row.base,
                "held": row.held.iter().map(|(count, kib)| json!({
                    "sessions": count,
                    "rss": kib,
                    "per_session": kib.saturating_sub(row.base) as f64 / *count as f64,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}
