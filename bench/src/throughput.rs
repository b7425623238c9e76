//! Bulk throughput: a service sends a fixed amount of data to each connection, as a mail server
//! sends a mailbox; the client reads it through each path, over 1 and 8 concurrent streams.

use std::time::Instant;

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use crate::procs;
use crate::setup::{self, Route};

/// Concurrent streams measured.
const STREAMS: [usize; 2] = [1, 8];

/// The measurements of one run of the harness.
pub(crate) struct Report {
    mib: u64,
    runs: usize,
    rows: Vec<Row>,
}

/// One path's results: for each stream count, MiB/s of every measured run, and the CPU
/// seconds per GiB its server and client ends spent over the measured runs.
struct Row {
    name: String,
    samples: Vec<(usize, Vec<f64>)>,
    cpu: Vec<(usize, Option<(f64, f64)>)>,
}

/// Sets up every path and measures it.
pub(crate) async fn run(mib: u64, runs: usize) -> anyhow::Result<Report> {
    let total = mib * 1024 * 1024;
    let work = tempfile::Builder::new()
        .prefix("postern-bench-")
        .tempdir()?;
    let mut rows = Vec::new();
    for (streams_index, streams) in STREAMS.iter().enumerate() {
        let per_stream = total / *streams as u64;
        let service = setup::source(per_stream).await?;
        let scratch = work.path().join(format!("s{streams}"));
        std::fs::create_dir_all(&scratch)?;
        let routes = [
            setup::direct(service),
            setup::postern(service, &scratch).context("setting up Postern")?,
            setup::ssh(service, &scratch, None).context("setting up ssh -L")?,
            setup::ssh(service, &scratch, Some("aes128-gcm@openssh.com"))
                .context("setting up ssh -L with aes128-gcm")?,
            setup::stunnel(service, &scratch).context("setting up stunnel")?,
            setup::quic(per_stream)
                .await
                .context("setting up bare quinn")?,
        ];
        for (index, route) in routes.iter().enumerate() {
            eprintln!("measuring {} with {streams} stream(s)", route.name);
            // One run to warm up connections, caches and congestion windows.
            transfer(route, *streams).await?;
            let spent = || {
                route
                    .server
                    .zip(route.client)
                    .map(|(s, c)| (procs::cpu_seconds(s), procs::cpu_seconds(c)))
            };
            let before = spent();
            let mut samples = Vec::with_capacity(runs);
            for _ in 0..runs {
                let (bytes, seconds) = transfer(route, *streams).await?;
                anyhow::ensure!(
                    bytes == per_stream * *streams as u64,
                    "{} delivered {bytes} bytes instead of {}",
                    route.name,
                    per_stream * *streams as u64
                );
                samples.push(bytes as f64 / (1024.0 * 1024.0) / seconds);
            }
            let gib = (runs as u64 * per_stream * *streams as u64) as f64 / f64::from(1u32 << 30);
            let cpu =
                before
                    .zip(spent())
                    .map(|((server, client), (server_after, client_after))| {
                        ((server_after - server) / gib, (client_after - client) / gib)
                    });
            if streams_index == 0 {
                rows.push(Row {
                    name: route.name.clone(),
                    samples: vec![],
                    cpu: vec![],
                });
            }
            rows[index].samples.push((*streams, samples));
            rows[index].cpu.push((*streams, cpu));
        }
    }
    Ok(Report { mib, runs, rows })
}

/// Runs `streams` concurrent transfers over `route`; returns the bytes read and the seconds.
async fn transfer(route: &Route, streams: usize) -> anyhow::Result<(u64, f64)> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        match (&route.addr, &route.quic) {
            (Some(addr), _) => {
                let addr = *addr;
                tasks.spawn(async move {
                    let mut stream = tokio::net::TcpStream::connect(addr).await?;
                    stream.set_nodelay(true)?;
                    read_all(&mut stream).await
                });
            }
            (None, Some(quic)) => {
                let connection = quic.connection.clone();
                tasks.spawn(async move {
                    let (mut send, mut recv) = connection.open_bi().await?;
                    // The server answers a stream once it exists for it: a byte makes it exist.
                    send.write_all(b"g").await?;
                    send.finish()?;
                    let mut total = 0u64;
                    let mut buf = vec![0u8; 256 * 1024];
                    while let Some(n) = recv.read(&mut buf).await? {
                        total += n as u64;
                    }
                    Ok(total)
                });
            }
            (None, None) => anyhow::bail!("{} has no way in", route.name),
        }
    }
    let mut bytes = 0;
    while let Some(result) = tasks.join_next().await {
        bytes += result??;
    }
    Ok((bytes, started.elapsed().as_secs_f64()))
}

async fn read_all(stream: &mut tokio::net::TcpStream) -> anyhow::Result<u64> {
    let mut total = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

impl Report {
    /// The table for people: medians, spread, ratios to direct TCP and to `ssh -L`.
    pub(crate) fn table(&self) -> String {
        let find = |name: &str, streams: usize| {
            self.rows
                .iter()
                .find(|r| r.name.starts_with(name))
                .and_then(|r| r.samples.iter().find(|(s, _)| *s == streams))
                .map(|(_, samples)| median(samples))
        };
        let mut out = format!(
            "Bulk throughput, MiB/s: median of {} runs (min–max), {} MiB per run, loopback\n\n",
            self.runs, self.mib
        );
        out.push_str(&format!(
            "{:<32} {:>27} {:>27}\n",
            "path", "1 stream", "8 streams"
        ));
        for row in &self.rows {
            out.push_str(&format!("{:<32}", row.name));
            for (streams, samples) in &row.samples {
                let m = median(samples);
                let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
                let max = samples.iter().copied().fold(0.0, f64::max);
                let direct = find("direct", *streams).unwrap_or(f64::NAN);
                out.push_str(&format!(
                    " {:>8.0} ({:>5.0}–{:<5.0}) {:>4.2}×",
                    m,
                    min,
                    max,
                    m / direct
                ));
            }
            out.push('\n');
        }
        out.push_str("\n(× is the ratio to direct TCP in the same run)\n\nPostern against the others, median against median:\n");
        for streams in STREAMS {
            let Some(postern) = find("Postern", streams) else {
                continue;
            };
            for row in self.rows.iter().filter(|r| r.name != "Postern") {
                if let Some(value) = find(&row.name, streams) {
                    out.push_str(&format!(
                        "  {streams} stream(s): Postern / {:<32} = {:.2}\n",
                        row.name,
                        postern / value
                    ));
                }
            }
        }
        out.push_str(
            "\nCPU seconds per GiB over the measured runs (server end: broker, sshd, stunnel server; client end: agent, ssh, stunnel client)\n\n",
        );
        out.push_str(&format!(
            "{:<32} {:>22} {:>22}\n{:<32} {:>10} {:>11} {:>10} {:>11}\n",
            "path", "1 stream", "8 streams", "", "server", "client", "server", "client"
        ));
        for row in self
            .rows
            .iter()
            .filter(|r| r.cpu.iter().any(|(_, c)| c.is_some()))
        {
            out.push_str(&format!("{:<32}", row.name));
            for (_, cpu) in &row.cpu {
                match cpu {
                    Some((server, client)) => {
                        out.push_str(&format!(" {server:>10.2} {client:>11.2}"));
                    }
                    None => out.push_str(&format!(" {:>10} {:>11}", "-", "-")),
                }
            }
            out.push('\n');
        }
        out
    }

    /// The same as JSON.
    pub(crate) fn json(&self) -> Value {
        json!({
            "benchmark": "bulk_throughput",
            "unit": "MiB/s",
            "mib_per_run": self.mib,
            "runs": self.runs,
            "paths": self.rows.iter().map(|row| json!({
                "name": row.name,
                "results": row.samples.iter().zip(&row.cpu).map(|((streams, samples), (_, cpu))| json!({
                    "streams": streams,
                    "median": median(samples),
                    "samples": samples,
                    "cpu_seconds_per_gib": cpu.map(|(server, client)| json!({
                        "server": server,
                        "client": client,
                    })),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}
