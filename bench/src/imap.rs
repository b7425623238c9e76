//! A whole mailbox fetched from a real Dovecot: directly over IMAPS, through Postern forwarding
//! the mail client's TLS as it is (`tcp`), and through Postern in IMAP mode (local TLS, the
//! login checked by the broker, TLS from the broker to Dovecot).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use postern_tests::{Dovecot, ImapWire, Message};

use crate::setup::Postern;
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
    let postern = postern(&dovecot, work.path(), 1, "").context("setting up Postern")?;
    let paths = [
        ("direct IMAPS", dovecot.addr(), dovecot.ca()),
        (
            "Postern, tcp (TLS to Dovecot)",
            postern.addr(0, "mailtcp"),
            dovecot.ca(),
        ),
        (
            "Postern, imap (login checked)",
            postern.addr(0, "mail"),
            postern.local_ca(0),
        ),
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
/// (IMAP), with `limits` added to its `[limits]`, and `agents` agents serving both.
pub(crate) fn postern(
    dovecot: &Dovecot,
    work: &Path,
    agents: usize,
    limits: &str,
) -> anyhow::Result<Postern> {
    let ca = dovecot.ca();
    let ca = ca.to_str().context("a UTF-8 path")?;
    Postern::start(
        work,
        &[
            "--service".to_owned(),
            format!("mailtcp={}", dovecot.addr()),
            "--service".to_owned(),
            format!("mail=imaps://{}", dovecot.addr()),
            "--mail-ca".to_owned(),
            ca.to_owned(),
        ],
        &["mail", "mailtcp"],
        // Dovecot knows its people by the local part.
        |toml| {
            toml.replace(
                "# domain = \"example.org\"\n# domain_form = \"address\"",
                "domain = \"example.org\"\ndomain_form = \"local\"",
            )
            .replace("[limits]\n", &format!("[limits]\n{limits}"))
        },
        agents,
    )
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
