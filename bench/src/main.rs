//! `postern-bench`: Postern measured against what people use today, in one run on this machine.
//!
//! Everything is set up on loopback by the harness itself. Absolute numbers on a shared machine
//! move from run to run; the ratios against baselines measured in the same run are what to read.
//! This is not a test: nothing here asserts a time. Run it with `scripts/bench`, which installs
//! sshd and stunnel and builds the release binaries first.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark that fails stops with the reason"
)]

mod latency;
mod setup;
mod throughput;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Measures Postern against direct TCP, `ssh -L`, stunnel and bare QUIC: bulk throughput, and
/// connect latency over a warm path.
#[derive(Debug, Parser)]
#[command(name = "postern-bench")]
struct Cli {
    /// Mebibytes each run transfers, split across the streams.
    #[arg(long, default_value_t = 512)]
    mib: u64,
    /// Measured runs per path and stream count (after one warm-up run); the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Connects measured per path for connect latency.
    #[arg(long, default_value_t = 300)]
    tries: usize,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let measured = runtime.block_on(async {
        let throughput = throughput::run(cli.mib, cli.runs).await?;
        let latency = latency::run(cli.tries).await?;
        anyhow::Ok((throughput, latency))
    });
    match measured {
        Ok((throughput, latency)) => {
            println!("{}\n{}", throughput.table(), latency.table());
            if let Some(path) = cli.json {
                let json = serde_json::json!([throughput.json(), latency.json()]);
                std::fs::write(&path, json.to_string()).expect("the JSON file is writable");
                println!("JSON written to {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("postern-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}
