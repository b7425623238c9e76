//! Connect latency: from a local TCP connect to the service's first bytes (as a mail client
//! waits for the IMAP greeting), a few hundred times, as percentiles. Warm: over a tunnel that
//! is up. Cold: with a fresh handshake each time, as after a laptop wakes or moves.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use crate::setup::{self, Postern, Route};

/// Bytes the service sends first, like a greeting.
const GREETING: u64 = 64;

/// Each path's latencies, warm and cold.
pub(crate) struct Latencies {
    tries: usize,
    warm: Vec<(String, Vec<Duration>)>,
    cold: Vec<(String, Vec<Duration>)>,
}

/// Sets up the TCP paths and measures `tries` connects through each, warm and cold.
pub(crate) async fn run(tries: usize) -> anyhow::Result<Latencies> {
    let work = tempfile::Builder::new()
        .prefix("postern-bench-latency-")
        .tempdir()?;
    let service = setup::source(GREETING).await?;
    let postern = Postern::start(
        work.path(),
        &["--service".to_owned(), format!("bulk={service}")],
        &["bulk"],
        |toml| toml,
        1,
    )
    .context("setting up Postern")?;
    let routes = [
        setup::direct(service),
        Route::tcp("Postern", postern.addr(0, "bulk"), vec![]),
        setup::ssh(service, work.path(), None).context("setting up ssh -L")?,
        setup::ssh_nodelay(service, work.path()).context("setting up ssh -L -tt")?,
        setup::stunnel(service, work.path()).context("setting up stunnel")?,
    ];
    let mut warm = Vec::new();
    for route in &routes {
        eprintln!("measuring warm connect latency through {}", route.name);
        let addr = route.addr.context("a TCP path")?;
        // Warm: the tunnel and the processes are up; the first connects are not counted.
        for _ in 0..10 {
            greet(addr).await?;
        }
        let mut samples = Vec::with_capacity(tries);
        for _ in 0..tries {
            samples.push(greet(addr).await?);
        }
        samples.sort();
        warm.push((route.name.clone(), samples));
    }

    let mut cold = vec![warm[0].clone()];
    eprintln!("measuring cold connect latency through Postern");
    cold.push((
        "Postern (new QUIC handshake)".to_owned(),
        postern_cold(&postern.agents[0].home, tries).await?,
    ));
    eprintln!("measuring cold connect latency through ssh -W");
    cold.push((
        "ssh -W (new ssh process)".to_owned(),
        ssh_cold(service, work.path(), tries).await?,
    ));
    Ok(Latencies { tries, warm, cold })
}

/// A fresh agent for each try, with the identity in `home`: the first program's connect waits
/// for the agent's QUIC handshake with the broker, as after a wake or a move.
async fn postern_cold(home: &Path, tries: usize) -> anyhow::Result<Vec<Duration>> {
    let identity = postern_agent::Home::at(home.to_owned()).identity()?;
    let service = identity
        .services
        .keys()
        .next()
        .context("the identity names a service")?
        .clone();
    let local = [(service, SocketAddr::from(([127, 0, 0, 1], 0)))];
    let mut samples = Vec::with_capacity(tries);
    for n in 0..tries + 10 {
        let agent = postern_agent::Agent::start(&identity, &local, SystemTime::now()).await?;
        let (_, addr) = agent.addresses()[0].clone();
        let shutdown = agent.shutdown_token();
        let serving = tokio::spawn(agent.run());
        let took = greet(addr).await?;
        shutdown.cancel();
        serving.await?;
        if n >= 10 {
            samples.push(took);
        }
    }
    samples.sort();
    Ok(samples)
}

/// `ssh -W` to the service, a new process each try: key exchange and authentication each
/// time, from the spawn to the first bytes on its standard output.
async fn ssh_cold(service: SocketAddr, work: &Path, tries: usize) -> anyhow::Result<Vec<Duration>> {
    let cold = work.join("cold");
    std::fs::create_dir_all(&cold)?;
    let (_sshd, args) = setup::sshd(&cold, None)?;
    let mut samples = Vec::with_capacity(tries);
    for n in 0..tries + 10 {
        let started = Instant::now();
        let mut child = tokio::process::Command::new("ssh")
            .args(&args)
            .args(["-W", &service.to_string(), "127.0.0.1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdout = child.stdout.take().context("ssh stdout")?;
        let mut greeting = [0u8; GREETING as usize];
        stdout.read_exact(&mut greeting).await?;
        let took = started.elapsed();
        drop(child.stdin.take());
        child.wait().await?;
        if n >= 10 {
            samples.push(took);
        }
    }
    samples.sort();
    Ok(samples)
}

/// Connects, reads the greeting, closes; returns how long the greeting took.
async fn greet(addr: std::net::SocketAddr) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut greeting = [0u8; GREETING as usize];
    stream.read_exact(&mut greeting).await?;
    Ok(started.elapsed())
}

pub(crate) fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

impl Latencies {
    /// The tables for people.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        for (title, rows) in [
            ("over a warm path", &self.warm),
            ("with a fresh handshake (cold)", &self.cold),
        ] {
            let direct = rows.first().map(|(_, s)| percentile(s, 50));
            out.push_str(&format!(
                "Connect to first bytes {title}, µs, {} tries (after 10 unmeasured)\n\n{:<32} {:>8} {:>8} {:>8} {:>12}\n",
                self.tries, "path", "p50", "p90", "p99", "p50/direct"
            ));
            for (name, samples) in rows {
                let p50 = percentile(samples, 50);
                out.push_str(&format!(
                    "{:<32} {:>8} {:>8} {:>8} {:>11.2}×\n",
                    name,
                    p50.as_micros(),
                    percentile(samples, 90).as_micros(),
                    percentile(samples, 99).as_micros(),
                    direct.map_or(f64::NAN, |d| p50.as_secs_f64() / d.as_secs_f64()),
                ));
            }
            out.push('\n');
        }
        out
    }

    /// The same as JSON.
    pub(crate) fn json(&self) -> Value {
        let rows = |rows: &[(String, Vec<Duration>)]| {
            rows.iter()
                .map(|(name, s)| {
                    json!({
                        "name": name,
                        "p50": percentile(s, 50).as_micros(),
                        "p90": percentile(s, 90).as_micros(),
                        "p99": percentile(s, 99).as_micros(),
                    })
                })
                .collect::<Vec<_>>()
        };
        json!({
            "benchmark": "connect_latency",
            "unit": "µs",
            "tries": self.tries,
            "warm": rows(&self.warm),
            "cold": rows(&self.cold),
        })
    }
}
