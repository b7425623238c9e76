//! The `postern-broker` command line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::audit::Audit;
use crate::config::{self, Config};
use crate::init::{InitOptions, init};
use crate::issue::{IssueFailure, IssueOptions, issue};
use crate::serve::{Broker, StartError};

/// Exit code for bad configuration or usage (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// The Postern broker: the one UDP port between devices and private mail servers.
///
/// It accepts QUIC connections from `postern` agents that hold a certificate it issued, asks
/// its Cedar policies about every connection, forwards to the services in its configuration,
/// and writes an audit trail.
#[derive(Debug, Parser)]
#[command(name = "postern-broker", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a broker folder: CAs, server certificate, a documented broker.toml and a starting
    /// policy. Never overwrites an existing setup.
    Init {
        /// Folder to create.
        #[arg(long)]
        dir: PathBuf,
        /// Name agents will use to reach the broker (DNS name or IP address).
        #[arg(long)]
        hostname: String,
        /// UDP address to listen on.
        #[arg(long, default_value = config::DEFAULT_LISTEN)]
        listen: String,
        /// A service agents may reach, as NAME=HOST:PORT (repeat for several), such as
        /// `imap=mail.internal:993`. Port 993 (or `imaps://HOST:PORT`) makes an IMAP service
        /// with implicit TLS, port 143 (or `imap://HOST:PORT`) one with STARTTLS: the broker then
        /// checks each mail login against policy (docs/imap.md). Other ports are forwarded as
        /// they are.
        #[arg(long = "service", value_name = "NAME=HOST:PORT", required = true)]
        services: Vec<String>,
        /// CA certificate(s) of the mail server's TLS, when it is not publicly trusted; copied
        /// to pki/mail-ca.pem for the IMAP services.
        #[arg(long, value_name = "FILE")]
        mail_ca: Option<PathBuf>,
        /// Issuer URL of the OpenID provider people log in at, such as
        /// `https://idp.example.org/realms/acme`. Without it, only `issue` makes certificates.
        #[arg(long, requires = "client_id")]
        issuer: Option<String>,
        /// The broker's client id at the IdP (a client with the device authorization grant and
        /// refresh tokens; docs/identity-providers.md).
        #[arg(long, requires = "issuer")]
        client_id: Option<String>,
        /// File holding the client secret, for a confidential client.
        #[arg(long, requires = "issuer")]
        client_secret_file: Option<PathBuf>,
        /// A scope to request (repeat for several). Default: openid, email, profile,
        /// offline_access.
        #[arg(long = "scope", requires = "issuer")]
        scopes: Vec<String>,
        /// CA certificate(s) for the IdP's HTTPS, when it is not publicly trusted.
        #[arg(long, value_name = "FILE", requires = "issuer")]
        idp_ca: Option<PathBuf>,
    },
    /// Check the configuration, certificates and policies as `serve` would, without serving.
    Check {
        /// The broker's configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the broker until SIGTERM or Ctrl-C (a second one cuts open sessions at once).
    Serve {
        /// The broker's configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Issue an identity bundle for a headless machine or break-glass use. Nobody logs in: the
    /// certificate is marked `issuance=admin` so that policy can tell it apart.
    Issue {
        /// The broker's configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The user's email address.
        #[arg(long, value_name = "EMAIL")]
        user: String,
        /// A group to name in the certificate (repeat for several).
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
        /// How long the certificate is valid, such as `8h`; at most `pki.max_cert_lifetime`.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Sign the key of this PEM signing request (made with `postern csr`) instead of making
        /// a key here; the bundle then holds no key.
        #[arg(long, value_name = "FILE")]
        csr: Option<PathBuf>,
        /// Where to write the bundle. It must not exist.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Revoke a user, a login or a device, in `revocations.json` of the policy folder.
    ///
    /// A revoked user's certificates and logins from before now are dead, renewals included: live
    /// sessions end within seconds, and they must log in again with MFA. A revoked login
    /// (lineage) or device stays dead. Brokers reading the folder take it in within 2 seconds.
    Revoke {
        /// The broker's configuration file.
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        /// Why, for the record.
        #[arg(long, default_value = "")]
        reason: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Remove a revocation.
    Unrevoke {
        /// The broker's configuration file.
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// The revocations in force.
    Revocations {
        #[command(subcommand)]
        command: RevocationsCommand,
    },
}

/// What `revoke` and `unrevoke` act on: exactly one of these.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct TargetArgs {
    /// A user, as `ISSUER,SUBJECT` or the user id URI `ISSUER#SUBJECT`.
    #[arg(long, value_name = "ISSUER,SUBJECT")]
    user: Option<String>,
    /// The users with this email address, found in entities.json and in the audit trail.
    #[arg(long, value_name = "ADDR")]
    email: Option<String>,
    /// One login and its renewals (the `postern.lineage` of the audit trail).
    #[arg(long, value_name = "ID")]
    lineage: Option<String>,
    /// Every certificate of one device (the `postern.device` of the audit trail).
    #[arg(long, value_name = "ID")]
    device: Option<String>,
}

#[derive(Debug, Subcommand)]
enum RevocationsCommand {
    /// Show the revocations in force.
    List {
        /// The broker's configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
struct Failure {
    code: u8,
    error: anyhow::Error,
}

/// Runs the command line given by `args` and returns the process exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_tracing();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("postern-broker: error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Init {
            dir,
            hostname,
            listen,
            services,
            issuer,
            client_id,
            client_secret_file,
            scopes,
            idp_ca,
            mail_ca,
        } => {
            let absolute = |file: Option<PathBuf>| {
                file.map(|file| {
                    std::path::absolute(&file)
                        .map(|path| path.display().to_string())
                        .with_context(|| format!("cannot resolve `{}`", file.display()))
                })
                .transpose()
                .map_err(config_failure)
            };
            let client_secret_file = absolute(client_secret_file)?;
            let ca_file = absolute(idp_ca)?;
            let oidc = issuer
                .zip(client_id)
                .map(|(issuer, client_id)| config::OidcTemplate {
                    issuer,
                    client_id,
                    client_secret_file,
                    scopes,
                    ca_file,
                });
            let options = InitOptions {
                dir,
                hostname,
                listen,
                services,
                mail_ca,
                oidc,
            };
            let config_path = init(&options, SystemTime::now()).map_err(config_failure)?;
            print_init_summary(&options, &config_path);
            Ok(())
        }
        Command::Check { config } => {
            let config = Config::load(&config).map_err(config_failure)?;
            let checked = crate::serve::check(&config).map_err(config_failure)?;
            println!("{} is ready to serve:", config.path.display());
            println!("  listen            udp {}", config.listen);
            println!(
                "  server cert       for {}, valid until {}",
                config.hostname,
                postern_certs::rfc3339(checked.server_not_after)
            );
            println!("  client CAs        {} trusted", checked.client_cas);
            println!(
                "  policies          {} from {}",
                checked.policies,
                config.policy_dir.display()
            );
            for (name, service) in &config.services {
                println!(
                    "  service {name:<9} -> {}",
                    config::join_host_port(&service.host, service.port)
                );
            }
            match &config.oidc {
                Some(oidc) => {
                    println!(
                        "  login             at {} as client {} (certificates for {}, logins renewed up to {})",
                        oidc.issuer,
                        oidc.client_id,
                        humantime::format_duration(config.login.certificate_ttl),
                        humantime::format_duration(config.login.max_session_age)
                    );
                    if let Ok(pin) = server_pin(&config) {
                        println!(
                            "  login line        postern login --broker {} --pin {pin}",
                            config.public_address
                        );
                    }
                }
                None => println!(
                    "  login             not set up (no [oidc]); only `postern-broker issue` makes identities"
                ),
            }
            Ok(())
        }
        Command::Serve { config } => serve(&config),
        Command::Revoke {
            config,
            target,
            reason,
            yes,
        } => revoke(&config, &target, Some(reason), yes),
        Command::Unrevoke {
            config,
            target,
            yes,
        } => revoke(&config, &target, None, yes),
        Command::Revocations {
            command: RevocationsCommand::List { config },
        } => {
            let config = Config::load(&config).map_err(config_failure)?;
            let revocations =
                crate::revoke::Revocations::load(&config.policy_dir).map_err(config_failure)?;
            if revocations.is_empty() {
                println!("No revocations in {}.", config.policy_dir.display());
            }
            for (kind, id, entry) in revocations.iter() {
                let reason = if entry.reason.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", entry.reason)
                };
                println!(
                    "{kind:<8} {id}  since {}{reason}",
                    postern_certs::rfc3339(entry.at)
                );
            }
            Ok(())
        }
        Command::Issue {
            config,
            user,
            groups,
            ttl,
            csr,
            out,
        } => {
            let config = Config::load(&config).map_err(config_failure)?;
            let audit = Audit::open(&config.audit)
                .with_context(|| {
                    format!("cannot open the audit trail of `{}`", config.path.display())
                })
                .map_err(|error| Failure {
                    code: EXIT_CONFIG,
                    error,
                })?;
            let options = IssueOptions {
                user,
                groups,
                ttl,
                csr,
                out,
            };
            let issued =
                issue(&config, &options, &audit, SystemTime::now()).map_err(|err| match err {
                    IssueFailure::Invalid(_) | IssueFailure::Store(_) | IssueFailure::Pki(_) => {
                        config_failure(err)
                    }
                    other => Failure {
                        code: 1,
                        error: other.into(),
                    },
                })?;
            println!(
                "Issued a certificate for {} (admin issuance), valid until {}, serial {}.",
                issued.identity.display_name(),
                postern_certs::rfc3339(issued.not_after),
                issued.serial
            );
            if issued.with_key {
                println!(
                    "Wrote {} (mode 0600). It holds a private key: hand it over securely.",
                    options.out.display()
                );
            } else {
                println!(
                    "Wrote {} for the key of {}.",
                    options.out.display(),
                    options
                        .csr
                        .as_deref()
                        .unwrap_or(std::path::Path::new(""))
                        .display()
                );
            }
            println!(
                "On the device:  postern login --bundle {}  &&  postern up",
                options.out.display()
            );
            Ok(())
        }
    }
}

/// `revoke` (with a reason) and `unrevoke` (without).
fn revoke(
    config_path: &std::path::Path,
    target: &TargetArgs,
    reason: Option<String>,
    yes: bool,
) -> Result<(), Failure> {
    use crate::revoke::{Entry, Target};
    let config = Config::load(config_path).map_err(config_failure)?;
    let usage = |message: String| Failure {
        code: EXIT_CONFIG,
        error: anyhow::anyhow!(message),
    };
    let targets: Vec<Target> = if let Some(user) = &target.user {
        let parsed = match user.split_once(',') {
            Some((issuer, subject)) => postern_certs::UserId::new(issuer, subject),
            None => postern_certs::UserId::from_uri(user),
        };
        vec![Target::User(parsed.map_err(|e| {
            usage(format!("`--user {user}`: {e}; write ISSUER,SUBJECT"))
        })?)]
    } else if let Some(email) = &target.email {
        let found = crate::revoke::users_with_email(&config, email);
        if found.is_empty() {
            return Err(usage(format!(
                "no user with email `{email}` in entities.json or the audit trail; name them with --user ISSUER,SUBJECT"
            )));
        }
        println!("Users with email {email}:");
        for (user, seen) in &found {
            println!("  {}  ({seen})", user.uri());
        }
        found
            .into_iter()
            .map(|(user, _)| Target::User(user))
            .collect()
    } else if let Some(lineage) = &target.lineage {
        vec![Target::Lineage(
            lineage
                .parse()
                .map_err(|e| usage(format!("`--lineage {lineage}`: {e}")))?,
        )]
    } else if let Some(device) = &target.device {
        vec![Target::Device(
            device
                .parse()
                .map_err(|e| usage(format!("`--device {device}`: {e}")))?,
        )]
    } else {
        return Err(usage(
            "name what to revoke: --user, --email, --lineage or --device".into(),
        ));
    };
    let verb = if reason.is_some() {
        "revoke"
    } else {
        "unrevoke"
    };
    if !yes {
        use std::io::IsTerminal as _;
        if !std::io::stdin().is_terminal() {
            return Err(usage(format!(
                "confirm with --yes (there is no terminal to ask whether to {verb} {} target(s))",
                targets.len()
            )));
        }
        eprint!("{verb} {} target(s)? [y/N] ", targets.len());
        let mut answer = String::new();
        let _ = std::io::stdin().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("Nothing changed.");
            return Ok(());
        }
    }
    let audit = Audit::open(&config.audit)
        .with_context(|| format!("cannot open the audit trail of `{}`", config.path.display()))
        .map_err(|error| Failure {
            code: EXIT_CONFIG,
            error,
        })?;
    let now = SystemTime::now();
    let mut missing = Vec::new();
    crate::revoke::update(&config.policy_dir, |revocations| {
        for target in &targets {
            match &reason {
                Some(reason) => revocations.insert(
                    target.clone(),
                    Entry {
                        at: now,
                        reason: reason.clone(),
                    },
                ),
                None => {
                    if !revocations.remove(target) {
                        missing.push(target.to_string());
                    }
                }
            }
        }
    })
    .map_err(|error| Failure {
        code: 1,
        error: error.into(),
    })?;
    for target in &targets {
        if missing.contains(&target.to_string()) {
            println!("{target} was not revoked; nothing to remove.");
            continue;
        }
        audit
            .record_blocking(&crate::audit::Event::Revocation {
                target,
                added: reason.is_some(),
                reason: reason.as_deref().unwrap_or(""),
            })
            .with_context(|| {
                format!(
                    "{target} is {} in revocations.json, but the audit trail could not record it; fix the audit trail and note the change by hand",
                    if reason.is_some() { "revoked" } else { "no longer revoked" }
                )
            })
            .map_err(|error| Failure { code: 1, error })?;
        match &reason {
            Some(_) => println!(
                "Revoked {target} at {}. Certificates and logins from before then no longer work.",
                postern_certs::rfc3339(now)
            ),
            None => println!("Removed the revocation of {target}."),
        }
    }
    println!(
        "Written to {}. A broker using this folder takes it in within 2 seconds and ends live sessions it no longer allows; copy the file to other replicas like the policies.",
        config
            .policy_dir
            .join(crate::revoke::REVOCATIONS_FILE)
            .display()
    );
    Ok(())
}

fn serve(config_path: &std::path::Path) -> Result<(), Failure> {
    let config = Config::load(config_path).map_err(config_failure)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(|error| Failure { code: 1, error })?;
    runtime.block_on(async {
        let mut signals = postern_transport::Signals::install();
        let broker = Broker::start(config).map_err(|err: StartError| config_failure(err))?;
        let shutdown = broker.shutdown_token();
        let abort = broker.abort_token();
        tokio::spawn(async move {
            signals.recv().await;
            tracing::info!("shutdown requested; a second signal cuts open sessions");
            shutdown.cancel();
            signals.recv().await;
            abort.cancel();
        });
        broker.run().await;
        Ok(())
    })
}

fn print_init_summary(options: &InitOptions, config_path: &std::path::Path) {
    let dir = options.dir.display();
    let config = config_path.display();
    let port = options
        .listen
        .parse::<std::net::SocketAddr>()
        .map(|a| a.port())
        .unwrap_or(4433);
    println!("Created a Postern broker in {dir}:");
    println!("  {config}   settings, each documented with its default");
    println!(
        "  {dir}/pki/           CAs, the server certificate and the seal key (keys are mode 0600)"
    );
    println!(
        "  {dir}/policies/      Cedar policies; default.cedar asks for a second factor at login and lets"
    );
    println!("                        any valid certificate reach any service");
    println!();
    println!("Next:");
    println!("  1. Start the broker:   postern-broker serve --config {config}");
    println!(
        "  2. Let agents reach UDP port {port} on {}.",
        options.hostname
    );
    let address = config::join_host_port(&options.hostname, port);
    match (&options.oidc, login_pin(&options.dir)) {
        (Some(_), Ok(pin)) => {
            println!("  3. Hand this command to the people who will log in:");
            println!();
            println!("       postern login --broker {address} --pin {pin}");
            println!();
        }
        (Some(_), Err(err)) => println!("  3. (cannot compute the pin: {err:#})"),
        (None, _) => {
            println!(
                "  3. No identity provider is configured (--issuer, --client-id): people cannot log in"
            );
            println!(
                "     until an [oidc] table is added to {config}. Meanwhile, issue identities:"
            );
        }
    }
    println!("  For a machine or for break-glass use, issue an identity directly:");
    println!(
        "       postern-broker issue --config {config} --user someone@example.org --out someone.bundle"
    );
    println!("     and on that device:  postern login --bundle someone.bundle && postern up");
    println!(
        "  Keep {dir}/pki/server-ca.key offline once you no longer need it to renew the server certificate."
    );
}

/// The pin of the server CA in a broker folder made by `init`, as agents check it.
fn login_pin(dir: &std::path::Path) -> anyhow::Result<postern_certs::Pin> {
    pin_of_file(&dir.join("pki").join("server-ca.pem"))
}

/// The pin of a configuration's server CA.
fn server_pin(config: &Config) -> anyhow::Result<postern_certs::Pin> {
    pin_of_file(&config.pki.server_ca)
}

fn pin_of_file(path: &std::path::Path) -> anyhow::Result<postern_certs::Pin> {
    let cas = postern_certs::store::read_certificates(path)?;
    let first = cas.first().context("the server CA file is empty")?;
    Ok(postern_certs::Pin::of(first)?)
}

fn config_failure(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: EXIT_CONFIG,
        error: error.into(),
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
