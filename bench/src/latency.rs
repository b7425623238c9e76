//! Connect latency over a warm path: from a local TCP connect to the service's first bytes (as a
//! mail client waits for the IMAP greeting), a few hundred times, as percentiles.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use crate::setup;

/// Bytes the service sends first, like a greeting.
const GREETING: u64 = 64;

/// One path's latencies.
pub(crate) struct Latencies {
    tries: usize,
    rows: Vec<(String, Vec<Duration>)>,
}

/// Sets up the TCP paths and measures `tries` connects through each.
pub(crate) async fn run(tries: usize) -> anyhow::Result<Latencies> {
    let work = tempfile::Builder::new()
        .prefix("postern-bench-latency-")
        .tempdir()?;
    let service = setup::source(GREETING).await?;
    let routes = [
        setup::direct(service),
        setup::postern(service, work.path()).context("setting up Postern")?,
        setup::ssh(service, work.path(), None).context("setting up ssh -L")?,
        setup::stunnel(service, work.path()).context("setting up stunnel")?,
    ];
    let mut rows = Vec::new();
    for route in &routes {
        eprintln!("measuring connect latency through {}", route.name);
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
        rows.push((route.name.clone(), samples));
    }
    Ok(Latencies { tries, rows })
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
    /// The table for people.
    pub(crate) fn table(&self) -> String {
        let direct = self.rows.first().map(|(_, s)| percentile(s, 50));
        let mut out = format!(
            "Connect to first bytes over a warm path, µs, {} tries (after 10 unmeasured)\n\n{:<32} {:>8} {:>8} {:>8} {:>12}\n",
            self.tries, "path", "p50", "p90", "p99", "p50/direct"
        );
        for (name, samples) in &self.rows {
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
        out
    }

    /// The same as JSON.
    pub(crate) fn json(&self) -> Value {
        json!({
            "benchmark": "connect_latency_warm",
            "unit": "µs",
            "tries": self.tries,
            "paths": self.rows.iter().map(|(name, s)| json!({
                "name": name,
                "p50": percentile(s, 50).as_micros(),
                "p90": percentile(s, 90).as_micros(),
                "p99": percentile(s, 99).as_micros(),
            })).collect::<Vec<_>>(),
        })
    }
}
