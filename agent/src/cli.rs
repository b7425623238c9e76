//! The `postern` command line.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use postern_certs::{Issuance, KeyRequest, check_key_matches};
use postern_proto::ServiceName;

use crate::home::{Home, read_bundle};
use crate::up::Agent;

/// Exit code for bad usage or input (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// Postern: reach your organisation's private mail server through its broker.
///
/// `postern login` gets this device an identity; `postern up` then serves the broker's
/// services on this machine's loopback addresses for your mail programs.
#[derive(Debug, Parser)]
#[command(name = "postern", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Import an identity bundle from your administrator.
    Login {
        /// The bundle file (`postern-broker issue --out …`).
        #[arg(long, value_name = "FILE")]
        bundle: PathBuf,
    },
    /// Make a key on this device and print a signing request for `postern-broker issue --csr`.
    /// The key stays here until `postern login --bundle` brings its certificate.
    Csr {
        /// Write the request here instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Serve the broker's services on loopback until Ctrl-C or SIGTERM.
    Up {
        /// Serve SERVICE on ADDR instead of 127.0.0.1 and its usual port, such as
        /// `imap=127.0.0.1:1993` (repeat for several). Loopback addresses only.
        #[arg(long = "listen", value_name = "SERVICE=ADDR", value_parser = parse_listen)]
        listens: Vec<(ServiceName, SocketAddr)>,
    },
    /// Show who this device is, until when, and through which broker.
    Status,
}

/// Runs the command line given by `args` and returns the process exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_tracing();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("postern: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    let home = Home::locate()?;
    match command {
        Command::Login { bundle } => login(&home, &bundle),
        Command::Csr { out } => csr(&home, out),
        Command::Up { listens } => up(&home, &listens),
        Command::Status => status(&home),
    }
}

fn login(home: &Home, path: &std::path::Path) -> anyhow::Result<()> {
    let mut bundle = read_bundle(path)?;
    let uses_pending_key = bundle.key.is_none();
    if uses_pending_key {
        let Some(key) = home.pending_key()? else {
            bail!(
                "`{}` holds no private key, and no key made by `postern csr` is waiting on this device, \
                 so it was issued for a key elsewhere; ask your administrator for a bundle with a key, \
                 or run `postern csr` here and have them issue one for that request",
                path.display()
            );
        };
        check_key_matches(&bundle.certificate, &key).context(
            "the bundle's certificate is not for the key `postern csr` made on this device",
        )?;
        bundle.key = Some(key);
    }
    let certificate = bundle.inspect()?;
    let now = SystemTime::now();
    if certificate.not_after < now {
        bail!(
            "the certificate in `{}` expired at {}; ask your administrator for a new bundle",
            path.display(),
            postern_certs::rfc3339(certificate.not_after)
        );
    }
    home.store_identity(&bundle)?;
    if uses_pending_key {
        home.remove_pending_key()?;
    }
    println!(
        "Logged in as {} through {}; the certificate is valid until {} ({}).",
        certificate.identity.display_name(),
        bundle.broker,
        postern_certs::rfc3339(certificate.not_after),
        remaining(now, certificate.not_after)
    );
    println!(
        "Identity stored in {}. You can delete {} now.",
        home.identity_path().display(),
        path.display()
    );
    println!("Next: postern up (restart it if it is running)");
    Ok(())
}

fn csr(home: &Home, out: Option<PathBuf>) -> anyhow::Result<()> {
    if home.pending_key_path().exists() {
        bail!(
            "a key made earlier is still waiting for its certificate in `{}`; import its bundle with \
             `postern login --bundle FILE`, or delete that file to start over",
            home.pending_key_path().display()
        );
    }
    let request = KeyRequest::generate().context("cannot make a key")?;
    home.store_pending_key(&request.key_pem)?;
    match out {
        Some(path) => {
            postern_certs::store::write_public(
                &path,
                &request.csr_pem,
                postern_certs::store::WriteMode::CreateNew,
            )?;
            eprintln!(
                "Wrote the signing request to {}. Give it to your administrator.",
                path.display()
            );
        }
        None => print!("{}", request.csr_pem),
    }
    Ok(())
}

fn up(home: &Home, listens: &[(ServiceName, SocketAddr)]) -> anyhow::Result<()> {
    let identity = home.identity()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut signals = postern_transport::Signals::install();
        let agent = Agent::start(&identity, listens, SystemTime::now()).await?;
        let shutdown = agent.shutdown_token();
        tokio::spawn(async move {
            signals.recv().await;
            shutdown.cancel();
        });
        for (service, addr) in agent.addresses() {
            println!("postern: {service} on {addr} -> broker {}", identity.broker);
        }
        agent.run().await;
        Ok(())
    })
}

fn status(home: &Home) -> anyhow::Result<()> {
    let identity = home.identity()?;
    let certificate = identity.inspect()?;
    let now = SystemTime::now();
    let who = &certificate.identity;
    println!("Identity:     {} ({})", who.display_name(), who.user);
    match who.auth.issuance {
        Issuance::Admin => println!("Issued by:    an administrator (no login)"),
        Issuance::Login(flow) => println!(
            "Logged in:    {} with {} ({})",
            postern_certs::rfc3339(who.auth.auth_time),
            if who.auth.amr.is_empty() {
                "unknown methods".to_owned()
            } else {
                who.auth.amr.join(", ")
            },
            flow.as_str()
        ),
    }
    if !who.groups.is_empty() {
        println!("Groups:       {}", who.groups.join(", "));
    }
    if certificate.not_after < now {
        println!(
            "Certificate:  EXPIRED at {}; run `postern login`",
            postern_certs::rfc3339(certificate.not_after)
        );
    } else {
        println!(
            "Certificate:  valid until {} ({})",
            postern_certs::rfc3339(certificate.not_after),
            remaining(now, certificate.not_after)
        );
    }
    println!(
        "Broker:       {} (certificate name {})",
        identity.broker, identity.server_name
    );
    for (service, details) in &identity.services {
        println!("Service:      {service} on 127.0.0.1:{}", details.port);
    }
    Ok(())
}

fn remaining(now: SystemTime, until: SystemTime) -> String {
    let seconds = until.duration_since(now).map_or(0, |d| d.as_secs());
    format!("{}h{:02}m left", seconds / 3600, seconds % 3600 / 60)
}

fn parse_listen(text: &str) -> Result<(ServiceName, SocketAddr), String> {
    let (service, addr) = text
        .split_once('=')
        .ok_or("expected SERVICE=ADDR, such as imap=127.0.0.1:1993")?;
    let service = ServiceName::new(service).map_err(|e| e.to_string())?;
    let addr = addr
        .parse()
        .map_err(|_| format!("`{addr}` is not an address such as 127.0.0.1:1993 or [::1]:1993"))?;
    Ok((service, addr))
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
