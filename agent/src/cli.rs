//! The `postern` command line.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use postern_certs::{Issuance, KeyRequest, check_key_matches};
use postern_proto::{Revocation, ServiceName};

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
    /// Log in at your organisation's identity provider through its broker (with your second
    /// factor), or import an identity bundle from your administrator.
    ///
    /// Your administrator gives you the exact command, such as
    /// `postern login --broker gw.example.org:4433 --pin sha256/…`.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["broker", "bundle"])))]
    Login {
        /// The broker, as HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        broker: Option<String>,
        /// The SHA-256 pin of the broker's CA key, as your administrator gave it (repeatable).
        #[arg(
            long = "pin",
            value_name = "sha256/…",
            requires = "broker",
            conflicts_with = "ca"
        )]
        pins: Vec<postern_certs::Pin>,
        /// A file with the broker's CA certificate(s), instead of a pin. Without either, the
        /// broker must have a publicly trusted certificate.
        #[arg(long, value_name = "FILE", requires = "broker")]
        ca: Option<PathBuf>,
        /// Do not try to open a browser; just show the address and code.
        #[arg(long, requires = "broker")]
        no_browser: bool,
        /// The bundle file (`postern-broker issue --out …`).
        #[arg(long, value_name = "FILE")]
        bundle: Option<PathBuf>,
    },
    /// Renew this device's certificate now, for the same login (`postern up` does this by itself).
    Renew,
    /// Log out: the broker revokes the login at the identity provider, and this device's key,
    /// certificate and saved login are deleted.
    Logout,
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
        /// Serve IMAP services as plain IMAP, without TLS, on 127.0.0.1:143 (or the --listen
        /// address), for mail programs that allow it on loopback. Other users' programs are
        /// still refused on Linux.
        #[arg(long)]
        plain_imap: bool,
        /// How often to send a keep-alive to the broker while no data flows, such as `15s` (the
        /// default) or `25s`: more often than the UDP timeout of the networks you use (NAT
        /// routers and firewalls forget quiet flows after 30 s or more), at most 30s.
        #[arg(long, value_name = "INTERVAL", value_parser = parse_interval)]
        keep_alive: Option<Duration>,
    },
    /// Show who this device is, until when, and through which broker.
    Status,
    /// Make mail programs trust this device's local CA, for IMAP over TLS on localhost:993:
    /// shows where it is and the exact commands for each system, or runs the ones that need no
    /// administrator with --install.
    Trust {
        /// Add the CA to this user's certificate stores: NSS databases on Linux (Thunderbird,
        /// Firefox, Chromium; needs `certutil` from libnss3-tools), the login keychain on macOS,
        /// the user's Root store on Windows.
        #[arg(long)]
        install: bool,
    },
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
        Command::Login {
            broker: Some(broker),
            pins,
            ca,
            no_browser,
            ..
        } => {
            let trust = if !pins.is_empty() {
                crate::enroll::Trust::Pins(pins)
            } else if let Some(ca) = ca {
                let cas = postern_certs::store::read_certificates(&ca)
                    .with_context(|| format!("cannot use `{}` as the broker's CA", ca.display()))?;
                crate::enroll::Trust::Cas(cas)
            } else {
                crate::enroll::Trust::PublicRoots
            };
            let options = crate::login::LoginOptions {
                broker,
                trust,
                open_browser: !no_browser,
            };
            runtime()?.block_on(crate::login::login(&home, &options))
        }
        Command::Login {
            bundle: Some(bundle),
            ..
        } => login(&home, &bundle),
        Command::Login { .. } => {
            bail!("name a broker (--broker HOST:PORT) or a bundle (--bundle FILE)")
        }
        Command::Renew => renew(&home),
        Command::Logout => logout(&home),
        Command::Csr { out } => csr(&home, out),
        Command::Up {
            listens,
            plain_imap,
            keep_alive,
        } => up(&home, &listens, plain_imap, keep_alive),
        Command::Status => status(&home),
        Command::Trust { install } => crate::trust::trust(&home, install),
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
    {
        let _lock = runtime()?.block_on(home.lock())?;
        home.store_identity(&bundle)?;
        if uses_pending_key {
            home.remove_pending_key()?;
        }
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn renew(home: &Home) -> anyhow::Result<()> {
    home.identity()?;
    let renewed = runtime()?
        .block_on(crate::renew::renew(home, None))
        .map_err(crate::login::explain_failure)?;
    let certificate = renewed.inspect()?;
    println!(
        "Certificate renewed for {}; valid until {} ({}).",
        certificate.identity.display_name(),
        postern_certs::rfc3339(certificate.not_after),
        remaining(SystemTime::now(), certificate.not_after)
    );
    println!("A running `postern up` picks it up at its next renewal; restart it to use it now.");
    Ok(())
}

fn logout(home: &Home) -> anyhow::Result<()> {
    let runtime = runtime()?;
    // Held from the read to the delete: a renewal by `postern up` meanwhile would otherwise
    // leave this logout revoking a refresh token already spent.
    let _lock = runtime.block_on(home.lock())?;
    let identity = match home.identity() {
        Ok(identity) => identity,
        Err(crate::home::HomeError::NotLoggedIn) => {
            println!("Not logged in; nothing to do.");
            return Ok(());
        }
        Err(err) => {
            home.remove_identity()?;
            println!("The stored identity was unusable ({err}); deleted it.");
            return Ok(());
        }
    };
    let renewable = identity
        .login
        .as_ref()
        .is_some_and(|login| login.sealed.is_some());
    let revocation = renewable.then(|| {
        runtime.block_on(async {
            let session = crate::enroll::Session::connect_for(&identity).await?;
            let revocation = session.logout(&identity).await;
            session.close().await;
            Ok::<_, anyhow::Error>(revocation?)
        })
    });
    let session_ends = identity.login.as_ref().map(|login| login.session_ends);
    home.remove_identity()?;
    println!(
        "Deleted this device's key, certificate and saved login ({}).",
        home.identity_path().display()
    );
    // What a copy of the identity file made before now could still do.
    let copies = match session_ends {
        Some(ends) => format!(
            "a copy of this device's identity file made before now could still renew until {}",
            postern_certs::rfc3339(ends)
        ),
        None => "a copy of this device's identity file works until its certificate ends".to_owned(),
    };
    match revocation {
        Some(Ok(Revocation::Revoked)) => println!("The identity provider revoked the login."),
        Some(Ok(Revocation::Unsupported)) => println!(
            "The identity provider offers no revocation, so the login stays valid there: {copies}."
        ),
        Some(Ok(Revocation::Failed)) => println!(
            "The identity provider did not confirm the revocation (the broker's audit trail says why): {copies}."
        ),
        Some(Err(err)) => println!(
            "Could not ask the broker to revoke the login ({err:#}): {copies}; if that matters, ask your admin \
             to end the login at the identity provider."
        ),
        None => {}
    }
    println!("Programs connected through a running `postern up` stay connected until it stops.");
    Ok(())
}

fn up(
    home: &Home,
    listens: &[(ServiceName, SocketAddr)],
    plain_imap: bool,
    keep_alive: Option<Duration>,
) -> anyhow::Result<()> {
    if let Some(every) = keep_alive {
        crate::tunnel::check_keep_alive(every).map_err(anyhow::Error::msg)?;
    }
    let mut identity = home.identity()?;
    let mut listens = listens.to_vec();
    if plain_imap {
        for (service, details) in &identity.services {
            if details.protocol == postern_proto::ServiceKind::Imap
                && !listens.iter().any(|(name, _)| name == service)
            {
                listens.push((service.clone(), SocketAddr::from(([127, 0, 0, 1], 143))));
            }
        }
    }
    let runtime = runtime()?;
    runtime.block_on(async {
        let mut signals = postern_transport::Signals::install();
        if crate::renew::renewable_after_expiry(&identity, SystemTime::now()) {
            eprintln!("postern: the certificate ended while this device was away; renewing it");
            identity = crate::renew::renew(home, None)
                .await
                .map_err(crate::login::explain_failure)?;
        }
        let mut agent = Agent::start(&identity, &listens, SystemTime::now())
            .await?
            .with_renewal(home.clone(), identity.clone());
        if let Some(every) = keep_alive {
            agent = agent.with_keep_alive(every)?;
        }
        let imap = identity
            .services
            .values()
            .any(|s| s.protocol == postern_proto::ServiceKind::Imap);
        if imap && !plain_imap {
            let (tls, made) = home.local_tls(SystemTime::now())?;
            if made {
                eprintln!(
                    "postern: made this device's local CA for mail programs ({}); \
                     run `postern trust` so that they accept localhost's certificate",
                    home.local_ca_path().display()
                );
            }
            agent = agent.with_local_tls(&tls)?;
        }
        for notice in agent.notices() {
            eprintln!("postern: {notice}");
        }
        let shutdown = agent.shutdown_token();
        tokio::spawn(async move {
            signals.recv().await;
            shutdown.cancel();
        });
        for (service, addr) in agent.addresses() {
            let how = if agent.serves_tls(&service) {
                " (IMAP over TLS)"
            } else {
                ""
            };
            println!(
                "postern: {service} on {addr}{how} -> broker {}",
                identity.broker
            );
        }
        agent.run().await;
        Ok(())
    })
}

/// What a running `postern up` says its tunnel is doing, or that none runs.
fn tunnel_state(home: &Home) -> String {
    let not_running = "not running (`postern up` starts it)".to_owned();
    let Ok(text) = std::fs::read_to_string(home.tunnel_state_path()) else {
        return not_running;
    };
    let mut lines = text.lines();
    let pid = lines.next().and_then(|p| p.trim().parse::<i32>().ok());
    let alive = pid.is_some_and(process_alive);
    match lines.next() {
        Some(state) if alive => state.to_owned(),
        _ => not_running,
    }
}

#[cfg(unix)]
fn process_alive(pid: i32) -> bool {
    rustix::process::Pid::from_raw(pid)
        .is_some_and(|pid| rustix::process::test_kill_process(pid).is_ok())
}

#[cfg(not(unix))]
fn process_alive(_pid: i32) -> bool {
    true
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
    let renewable = crate::renew::renewable_after_expiry(&identity, now);
    if certificate.not_after < now {
        println!(
            "Certificate:  EXPIRED at {}; {}",
            postern_certs::rfc3339(certificate.not_after),
            if renewable {
                "`postern up` or `postern renew` renews it"
            } else {
                "run `postern login`"
            }
        );
    } else {
        println!(
            "Certificate:  valid until {} ({})",
            postern_certs::rfc3339(certificate.not_after),
            remaining(now, certificate.not_after)
        );
    }
    if let Some(login) = &identity.login {
        let renews = if login.sealed.is_some() {
            "renewed automatically until then"
        } else {
            "no renewal (the identity provider gave no refresh token)"
        };
        if login.session_ends <= now {
            println!(
                "Login:        ENDED at {}; run `postern login`",
                postern_certs::rfc3339(login.session_ends)
            );
        } else {
            println!(
                "Login:        ends {} ({}); {renews}",
                postern_certs::rfc3339(login.session_ends),
                remaining(now, login.session_ends)
            );
        }
    }
    println!(
        "Broker:       {} (certificate name {})",
        identity.broker, identity.server_name
    );
    for (service, details) in &identity.services {
        let how = match details.protocol {
            postern_proto::ServiceKind::Imap => " (IMAP over TLS; `postern trust` for the CA)",
            postern_proto::ServiceKind::Tcp => "",
        };
        println!("Service:      {service} on 127.0.0.1:{}{how}", details.port);
    }
    println!("Tunnel:       {}", tunnel_state(home));
    Ok(())
}

/// Time left until `until`, as `8h05m left`.
pub fn remaining(now: SystemTime, until: SystemTime) -> String {
    let seconds = until.duration_since(now).map_or(0, |d| d.as_secs());
    format!("{}h{:02}m left", seconds / 3600, seconds % 3600 / 60)
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration such as 15s or 1m: {e}"))
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
