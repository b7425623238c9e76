//! A whole mailbox fetched from a real Dovecot: directly over IMAPS, through Postern forwarding
//! the mail client's TLS as it is (`tcp`), and through Postern in IMAP mode (local TLS, the
//! login checked by the broker, TLS from the broker to Dovecot).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use postern_tests::{Dovecot, ImapWire, Message, Running, bin, free_udp_port, wait_for_line};
use serde_json::{Value, json};

/// Messages in the mailbox (the samples average about 100 KB).
const MESSAGES: usize = 300;
const PASSWORD: &str = "bench-pw";

/// Each path's fetch times.
pub(crate) struct Fetches {
    bytes: u64,
    rows: Vec<(String, Vec<Duration>)>,
}

/// Sets up Dovecot and Postern with both kinds of service, and fetches the mailbox `runs`
/// times through each path (after one warm-up fetch).
pub(crate) async fn run(runs: usize) -> anyhow::Result<Fetches> {
    let work = tempfile::Builder::new()
        .prefix("postern-bench-imap-")
        .tempdir()?;
    eprintln!("seeding Dovecot with {MESSAGES} messages");
    let dovecot = Dovecot::start(&[("bench", PASSWORD, Message::samples(MESSAGES, 9))]);
    let (agent, _processes) = postern(&dovecot, work.path()).context("setting up Postern")?;
    let local_ca = work.path().join("agent/local-ca.pem");
    let paths = [
        ("direct IMAPS", dovecot.addr(), dovecot.ca()),
        ("Postern, tcp (TLS to Dovecot)", agent.0, dovecot.ca()),
        ("Postern, imap (login checked)", agent.1, local_ca),
    ];
    let mut rows = Vec::new();
    let mut bytes = 0;
    for (name, addr, ca) in &paths {
        eprintln!("fetching the mailbox through {name}");
        bytes = fetch(*addr, ca).await?.1;
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            let (took, fetched) = fetch(*addr, ca).await?;
            // The server's status lines carry timings of varying length; the mail is the same.
            anyhow::ensure!(
                fetched.abs_diff(bytes) < 256,
                "{name} fetched {fetched} bytes, not {bytes}"
            );
            samples.push(took);
        }
        samples.sort();
        rows.push(((*name).to_owned(), samples));
    }
    Ok(Fetches { bytes, rows })
}

/// Connects, logs in, fetches every message, logs out: how long, and how many bytes came.
async fn fetch(addr: std::net::SocketAddr, ca: &Path) -> anyhow::Result<(Duration, u64)> {
    let started = Instant::now();
    let (mut wire, _) = ImapWire::connect(addr, ca).await;
    wire.send(
        format!(
            "L1 LOGIN bench {PASSWORD}\r\nS1 SELECT INBOX\r\nF1 UID FETCH 1:* (BODY.PEEK[])\r\n"
        )
        .as_bytes(),
    )
    .await;
    wire.drain_until("L1").await?;
    wire.drain_until("S1").await?;
    let bytes = wire.drain_until("F1").await?;
    wire.send(b"Z1 LOGOUT\r\n").await;
    wire.drain_until("Z1").await?;
    Ok((started.elapsed(), bytes))
}

/// A broker with the mailbox as two services, `mailtcp` (forwarded as it is) and `mail`
/// (IMAP), and an agent serving both: their local addresses.
fn postern(
    dovecot: &Dovecot,
    work: &Path,
) -> anyhow::Result<((std::net::SocketAddr, std::net::SocketAddr), Vec<Running>)> {
    let (broker, agent) = (bin("postern-broker"), bin("postern"));
    let dir = work.join("broker");
    let home = work.join("agent");
    let config = dir.join("broker.toml");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let run = |program: &Path, args: &[&str]| -> anyhow::Result<()> {
        let output = std::process::Command::new(program)
            .args(args)
            .env("POSTERN_HOME", &home)
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "{} {args:?}: {}",
            program.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    };
    let text = |p: &Path| p.to_str().map(str::to_owned).context("a UTF-8 path");
    run(
        &broker,
        &[
            "init",
            "--dir",
            &text(&dir)?,
            "--hostname",
            "localhost",
            "--listen",
            &listen,
            "--service",
            &format!("mailtcp={}", dovecot.addr()),
            "--service",
            &format!("mail=imaps://{}", dovecot.addr()),
            "--mail-ca",
            &text(&dovecot.ca())?,
        ],
    )?;
    let toml = std::fs::read_to_string(&config)?.replace(
        "# domain = \"example.org\"\n# domain_form = \"address\"",
        "domain = \"example.org\"\ndomain_form = \"local\"",
    );
    std::fs::write(&config, toml)?;
    let mut child = std::process::Command::new(&broker)
        .args(["serve", "--config", &text(&config)?])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let log = child.stderr.take().context("broker stderr")?;
    let serving = Running(child);
    wait_for_line(log, "broker serving");
    let bundle = work.join("bench.bundle");
    run(
        &broker,
        &[
            "issue",
            "--config",
            &text(&config)?,
            "--user",
            "bench@example.org",
            "--ttl",
            "4h",
            "--out",
            &text(&bundle)?,
        ],
    )?;
    run(&agent, &["login", "--bundle", &text(&bundle)?])?;
    let mut child = std::process::Command::new(&agent)
        .args([
            "up",
            "--listen",
            "mail=127.0.0.1:0",
            "--listen",
            "mailtcp=127.0.0.1:0",
        ])
        .env("POSTERN_HOME", &home)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("agent stdout")?;
    let up = Running(child);
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let (mut imap, mut tcp) = (None, None);
    while imap.is_none() || tcp.is_none() {
        let line = lines.next().context("the agent names its addresses")??;
        let addr = line.split_whitespace().nth(3).map(str::parse);
        match (line.split_whitespace().nth(1), addr) {
            (Some("mail"), Some(Ok(addr))) => imap = Some(addr),
            (Some("mailtcp"), Some(Ok(addr))) => tcp = Some(addr),
            _ => {}
        }
    }
    let (Some(tcp), Some(imap)) = (tcp, imap) else {
        anyhow::bail!("the agent named no addresses");
    };
    Ok(((tcp, imap), vec![serving, up]))
}

impl Fetches {
    /// The table: median time, spread, throughput, and the ratio to the direct path.
    pub(crate) fn table(&self) -> String {
        let median = |samples: &[Duration]| samples[samples.len() / 2];
        let direct = self.rows.first().map_or(Duration::ZERO, |(_, s)| median(s));
        let mut out = format!(
            "IMAP fetch of a whole mailbox ({MESSAGES} messages, {:.1} MiB), from connect to the last byte\n{:<32} {:>10} {:>18} {:>10} {:>14}\n",
            self.bytes as f64 / (1024.0 * 1024.0),
            "path",
            "median",
            "min .. max",
            "MiB/s",
            "time / direct"
        );
        for (name, samples) in &self.rows {
            let m = median(samples);
            out.push_str(&format!(
                "{:<32} {:>8.0}ms {:>8.0}..{:<7.0}ms {:>10.1} {:>13.2}x\n",
                name,
                m.as_secs_f64() * 1000.0,
                samples[0].as_secs_f64() * 1000.0,
                samples[samples.len() - 1].as_secs_f64() * 1000.0,
                self.bytes as f64 / (1024.0 * 1024.0) / m.as_secs_f64(),
                m.as_secs_f64() / direct.as_secs_f64().max(f64::EPSILON)
            ));
        }
        out
    }

    /// The results as JSON.
    pub(crate) fn json(&self) -> Value {
        json!({
            "part": "imap_fetch",
            "messages": MESSAGES,
            "bytes": self.bytes,
            "paths": self.rows.iter().map(|(name, samples)| json!({
                "path": name,
                "seconds": samples.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}
