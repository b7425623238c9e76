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

mod imap;
mod latency;
mod policy;
mod setup;
mod throughput;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Measures Postern against direct TCP, `ssh -L`, stunnel and bare QUIC: bulk throughput, and
/// connect latency over a warm path; a whole IMAP mailbox fetched directly and through both
/// kinds of Postern service; and the cost of policy decisions and re-checks.
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
    /// Cedar decisions measured per policy-set size.
    #[arg(long, default_value_t = 20_000)]
    decisions: usize,
    /// Live sessions re-checked after a change.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Run only these parts (repeat): throughput, latency, imap, policy. Default: all.
    #[arg(long = "only", value_name = "PART")]
    only: Vec<String>,
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
    let wanted = |part: &str| cli.only.is_empty() || cli.only.iter().any(|p| p == part);
    let measured = runtime.block_on(async {
        let mut tables = Vec::new();
        let mut json = Vec::new();
        if wanted("throughput") {
            let throughput = throughput::run(cli.mib, cli.runs).await?;
            tables.push(throughput.table());
            json.push(throughput.json());
        }
        if wanted("latency") {
            let latency = latency::run(cli.tries).await?;
            tables.push(latency.table());
            json.push(latency.json());
        }
        if wanted("imap") {
            let fetches = imap::run(cli.runs).await?;
            tables.push(fetches.table());
            json.push(fetches.json());
        }
        if wanted("policy") {
            let policy = policy::run(cli.decisions, cli.sessions).await?;
            tables.push(policy.table());
            json.push(policy.json());
        }
        anyhow::Ok((tables, json))
    });
    match measured {
        Ok((tables, json)) => {
            println!("{}", tables.join("\n"));
            if let Some(path) = cli.json {
                let json = serde_json::Value::Array(json);
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
