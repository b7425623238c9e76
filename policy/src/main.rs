//! `postern-policy`: validate, test, explain and format Postern's Cedar policies. No network.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand};
use jiff::tz::TimeZone;
use postern_policy::{Case, ENTITIES_FILE, LoadError, Policies, Scenario, parse_cases};

/// Validate, test and explain the Cedar policies of a Postern broker.
///
/// A policy folder holds `*.cedar` files, an optional `entities.json` (users and groups beyond
/// the token) and a `tests/` folder of test cases. docs/policy.md is the guide.
#[derive(Debug, Parser)]
#[command(name = "postern-policy", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks every policy against the schema (strict mode) and entities.json.
    ///
    /// Exit code 0 when valid, 3 when invalid (each problem as file:line:column), 1 when the
    /// folder cannot be read.
    Validate {
        /// The policy folder.
        dir: PathBuf,
    },
    /// Runs the test cases in `DIR/tests/*.json` and prints a pass/fail table.
    ///
    /// Exit code 0 when every case passes, 2 when a case fails, 3 when the policies are
    /// invalid, 1 for any other error (unreadable file, a case that cannot be built).
    Test {
        /// The policy folder.
        dir: PathBuf,
        /// A test file or folder to run instead of `DIR/tests`.
        #[arg(long)]
        tests: Option<PathBuf>,
        /// The broker's time zone (its `policy.time_zone`), for case times written without one.
        #[arg(long, default_value = "UTC")]
        time_zone: String,
    },
    /// Decides one request and shows why: decision, determining policies, evaluation errors.
    ///
    /// The request starts from a principal id, a certificate file or a line of the audit trail;
    /// `--context` changes any field of it. Exit code 0 when explained (allow or deny).
    Explain {
        /// The policy folder.
        dir: PathBuf,
        /// The user id URI, `<issuer>#<subject>`.
        #[arg(long, conflicts_with_all = ["certificate", "audit_line"], required_unless_present_any = ["certificate", "audit_line"])]
        principal: Option<String>,
        /// A client certificate (PEM), as the broker would see it now.
        #[arg(long, conflicts_with = "audit_line")]
        certificate: Option<PathBuf>,
        /// One JSON line of the audit trail, or `@FILE` for the last line of a file.
        #[arg(long)]
        audit_line: Option<String>,
        /// enroll, renew, connect or imap_login. Default: connect, or the audit event's.
        #[arg(long)]
        action: Option<String>,
        /// The broker (enroll, renew), service (connect) or mailbox (imap_login).
        #[arg(long)]
        resource: Option<String>,
        /// Groups, with --principal (repeat for more).
        #[arg(long = "group", requires = "principal")]
        groups: Vec<String>,
        /// Context fields to set, as JSON: '{"amr": ["pwd"], "source_ip": "10.1.2.3"}'.
        #[arg(long)]
        context: Option<String>,
        /// The broker's time zone.
        #[arg(long, default_value = "UTC")]
        time_zone: String,
    },
    /// Formats `.cedar` files in place (a folder: every `.cedar` file in it).
    ///
    /// With --check nothing is written: exit code 2 when a file would change.
    Fmt {
        /// Files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Only report files that are not formatted.
        #[arg(long)]
        check: bool,
    },
}

/// Exit codes, as the help says.
const ERROR: u8 = 1;
const FAILED: u8 = 2;
const INVALID: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate { dir } => validate(&dir),
        Command::Test {
            dir,
            tests,
            time_zone,
        } => test(&dir, tests.as_deref(), &time_zone),
        Command::Explain {
            dir,
            principal,
            certificate,
            audit_line,
            action,
            resource,
            groups,
            context,
            time_zone,
        } => explain(
            &dir,
            Start {
                principal,
                certificate,
                audit_line,
                groups,
            },
            action,
            resource,
            context.as_deref(),
            &time_zone,
        ),
        Command::Fmt { paths, check } => fmt(&paths, check),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("postern-policy: {err:#}");
            ExitCode::from(ERROR)
        }
    }
}

/// Loads a policy folder; invalid policies are printed and become exit code 3.
fn load(dir: &Path) -> anyhow::Result<Result<Policies, u8>> {
    match Policies::load_dir(dir) {
        Ok(policies) => Ok(Ok(policies)),
        Err(LoadError::Invalid(problems)) => {
            for problem in &problems {
                eprintln!("{}", located(dir, problem));
            }
            eprintln!(
                "{} problem{} in `{}`",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                dir.display()
            );
            Ok(Err(INVALID))
        }
        Err(LoadError::Empty(path)) => {
            eprintln!(
                "no policies in `{}`: every request would be denied",
                path.display()
            );
            Ok(Err(INVALID))
        }
        Err(err) => Err(err.into()),
    }
}

/// A problem with the folder in its path, so editors can jump to it.
fn located(dir: &Path, problem: &postern_policy::Diagnostic) -> String {
    let path = dir.join(&problem.file);
    if problem.line == 0 {
        format!("{}: {}", path.display(), problem.message)
    } else {
        format!(
            "{}:{}:{}: {}",
            path.display(),
            problem.line,
            problem.column,
            problem.message
        )
    }
}

fn validate(dir: &Path) -> anyhow::Result<u8> {
    let policies = match load(dir)? {
        Ok(policies) => policies,
        Err(code) => return Ok(code),
    };
    let entities = if dir.join(ENTITIES_FILE).exists() {
        format!(
            ", {} users and groups in {ENTITIES_FILE}",
            policies.directory().len()
        )
    } else {
        String::new()
    };
    println!(
        "valid: {} policies{entities} in `{}`",
        policies.len(),
        dir.display()
    );
    Ok(0)
}

fn zone(name: &str) -> anyhow::Result<TimeZone> {
    TimeZone::get(name).with_context(|| {
        format!("unknown time zone `{name}`: use an IANA name such as Europe/Madrid, or UTC")
    })
}

fn test(dir: &Path, tests: Option<&Path>, time_zone: &str) -> anyhow::Result<u8> {
    let zone = zone(time_zone)?;
    let policies = match load(dir)? {
        Ok(policies) => policies,
        Err(code) => return Ok(code),
    };
    let location = tests.map_or_else(|| dir.join("tests"), Path::to_owned);
    let files = json_files(&location)?;
    if files.is_empty() {
        bail!(
            "no test files (`*.json`) in `{}`; docs/policy.md shows how to write them",
            location.display()
        );
    }
    let mut rows = Vec::new();
    let mut errors = 0;
    for file in &files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read `{}`", file.display()))?;
        let cases = match parse_cases(&text) {
            Ok(cases) => cases,
            Err(err) => {
                eprintln!("{}: {err}", file.display());
                errors += 1;
                continue;
            }
        };
        let short = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for case in cases {
            rows.push((short.clone(), run(&case, &policies, &zone)));
            if let Some(Err(_)) = rows.last().map(|(_, r)| r) {
                errors += 1;
            }
        }
    }
    let width = rows
        .iter()
        .map(|(file, row)| file.len() + row_name(row).len() + 2)
        .max()
        .unwrap_or(0);
    let mut failed = 0;
    for (file, row) in &rows {
        let label = format!("{file}: {}", row_name(row));
        match row {
            Ok((_, failures)) if failures.is_empty() => println!("PASS   {label}"),
            Ok((_, failures)) => {
                failed += 1;
                println!("FAIL   {label:width$}  {}", failures.join("; "));
            }
            Err((_, err)) => println!("ERROR  {label:width$}  {err}"),
        }
    }
    let passed = rows
        .iter()
        .filter(|(_, r)| matches!(r, Ok((_, f)) if f.is_empty()))
        .count();
    println!(
        "\n{passed} passed, {failed} failed, {errors} errors ({} cases in {} files)",
        rows.len(),
        files.len()
    );
    Ok(if errors > 0 {
        ERROR
    } else if failed > 0 {
        FAILED
    } else {
        0
    })
}

type Row = Result<(String, Vec<String>), (String, String)>;

fn run(case: &Case, policies: &Policies, zone: &TimeZone) -> Row {
    match case.run(policies, zone) {
        Ok(outcome) => Ok((case.name.clone(), outcome.failures)),
        Err(err) => Err((case.name.clone(), err.to_string())),
    }
}

fn row_name(row: &Row) -> &str {
    match row {
        Ok((name, _)) | Err((name, _)) => name,
    }
}

/// `path` itself when it is a file, else the `*.json` files in it, sorted.
fn json_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(anyhow!(err).context(format!("cannot read `{}`", path.display()))),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Where an explained request starts.
struct Start {
    principal: Option<String>,
    certificate: Option<PathBuf>,
    audit_line: Option<String>,
    groups: Vec<String>,
}

fn explain(
    dir: &Path,
    start: Start,
    action: Option<String>,
    resource: Option<String>,
    context: Option<&str>,
    time_zone: &str,
) -> anyhow::Result<u8> {
    let zone = zone(time_zone)?;
    let policies = match load(dir)? {
        Ok(policies) => policies,
        Err(code) => return Ok(code),
    };
    let now = SystemTime::now();
    let default_action = action.clone().unwrap_or_else(|| "connect".into());
    let mut scenario = if let Some(path) = &start.certificate {
        let contents = certificate(path)?;
        Scenario::from_certificate(
            &contents,
            &default_action,
            resource.as_deref().unwrap_or_default(),
            now,
        )
    } else if let Some(line) = &start.audit_line {
        let line = match line.strip_prefix('@') {
            Some(file) => std::fs::read_to_string(file)
                .with_context(|| format!("cannot read `{file}`"))?
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("`{file}` is empty"))?,
            None => line.clone(),
        };
        eprintln!(
            "note: an audit line does not carry the service's protocol and tags, the certificate's validity or acr; set them with --context if a policy looks at them"
        );
        Scenario::from_audit_line(&line)?
    } else {
        let id = start.principal.unwrap_or_default();
        serde_json::from_value(serde_json::json!({
            "principal": { "id": id, "groups": start.groups },
            "action": default_action,
            "resource": resource.clone().unwrap_or_default(),
        }))
        .context("cannot build the request")?
    };
    if let Some(action) = action {
        scenario.action = action;
    }
    if let Some(resource) = resource {
        scenario.resource = resource;
    }
    if scenario.context.time.is_none() {
        scenario.context.time = Some(jiff::Timestamp::now().to_string());
    }
    if let Some(context) = context {
        let overrides: serde_json::Value = serde_json::from_str(context)
            .context("--context is not JSON; write it like '{\"amr\": [\"pwd\"]}'")?;
        scenario.override_context(&overrides)?;
    }
    let decision = scenario.decide(&policies, &zone)?;
    let revoked = match postern_policy::revocations::Revocations::load(dir) {
        Ok(revocations) => scenario.revoked(&revocations, &zone)?,
        Err(err) => {
            eprintln!("warning: revocations not checked: {err}");
            None
        }
    };
    if let Some(time) = &scenario.context.time {
        let local = postern_policy::parse_time(time, &zone).map_err(|e| anyhow!(e))?;
        println!(
            "time:      {} (context.time: hour {}, minute {}, {}, zone {})",
            local.strftime("%Y-%m-%d %H:%M:%S %Z"),
            local.hour(),
            local.minute(),
            local.strftime("%A").to_string().to_lowercase(),
            local.time_zone().iana_name().unwrap_or("UTC")
        );
    }
    println!(
        "request:   {} {} on `{}`",
        scenario.principal.id, scenario.action, scenario.resource
    );
    println!(
        "input:     {}",
        serde_json::to_string(&scenario.context).unwrap_or_default()
    );
    if let Some(reason) = &revoked {
        println!("revoked:   {reason}");
        println!(
            "decision:  deny (revoked: the broker refuses before asking the policies, which would say {})",
            decision.effect.as_str()
        );
    } else {
        println!("decision:  {}", decision.effect.as_str());
    }
    if decision.policies.is_empty() {
        let why = if decision.is_allowed() {
            ""
        } else {
            "none: no permit policy applies, so the request is denied by default"
        };
        println!("policies:  {why}");
    } else {
        println!("policies:  {}", decision.policies.join(", "));
    }
    for error in &decision.errors {
        println!("error:     {error}");
    }
    Ok(0)
}

/// The client certificate of an identity bundle (`identity.toml`, `*.bundle`) or of a PEM file.
fn certificate(path: &Path) -> anyhow::Result<postern_certs::CertificateContents> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    let certificates = match postern_certs::Bundle::from_toml(&text) {
        Ok(bundle) => vec![bundle.certificate],
        Err(_) => postern_certs::store::read_certificates(path)?,
    };
    certificates
        .iter()
        .find_map(|der| postern_certs::inspect_unverified(der).ok())
        .ok_or_else(|| {
            anyhow!(
                "`{}` holds no Postern client certificate; give an identity bundle or the PEM certificate of a device",
                path.display()
            )
        })
}

fn fmt(paths: &[PathBuf], check: bool) -> anyhow::Result<u8> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read `{}`", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "cedar") && p.is_file())
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    let mut unformatted = 0;
    for file in &files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read `{}`", file.display()))?;
        let formatted = postern_policy::format(&text)
            .map_err(|e| anyhow!("`{}` does not parse: {e}", file.display()))?;
        if formatted == text {
            continue;
        }
        unformatted += 1;
        if check {
            println!("would reformat {}", file.display());
        } else {
            // Written beside and renamed, so an interrupted run never leaves half a file.
            let temporary = file.with_extension("cedar.fmt");
            std::fs::write(&temporary, &formatted)
                .and_then(|()| std::fs::rename(&temporary, file))
                .with_context(|| format!("cannot write `{}`", file.display()))?;
            println!("formatted {}", file.display());
        }
    }
    Ok(if check && unformatted > 0 { FAILED } else { 0 })
}
