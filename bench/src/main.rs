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
mod memory;
mod policy;
mod procs;
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
    /// Idle sessions held for the memory part, in increasing order (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    held: Vec<usize>,
    /// Agents (laptops) the held sessions come from.
    #[arg(long, default_value_t = 10)]
    agents: usize,
    /// Run only these parts (repeat): throughput, latency, imap, memory, policy. Default: all.
    #[arg(long = "only", value_name = "PART")]
    only: Vec<String>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    if std::env::args().nth(1).as_deref() == Some(memory::HOLD_COMMAND) {
        let served = runtime.block_on(memory::serve_held());
        eprintln!("postern-bench: the held service stopped: {served:?}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    // Interrupted, the harness stops what it started before it goes.
    runtime.spawn(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut interrupt), Ok(mut terminate)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        eprintln!("postern-bench: interrupted; stopping the processes it started");
        procs::stop_descendants();
        std::process::exit(130);
    });
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
        if wanted("memory") {
            let memory = memory::run(&cli.held, cli.agents).await?;
            tables.push(memory.table());
            json.push(memory.json());
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
