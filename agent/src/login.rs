//! `postern login --broker`: the person's side of a login. The broker talks to the IdP; this
//! shows the code, a QR code and where it comes from, opens a browser where there is one,
//! shows that it is still waiting, and stores the identity the broker issues.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use postern_proto::{DeviceCode, FailCode};

use crate::enroll::{EnrollError, Progress, Session, Trust};
use crate::home::Home;

/// Options of `postern login --broker`.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    /// `HOST:PORT`.
    pub broker: String,
    /// How the broker is verified.
    pub trust: Trust,
    /// Whether to try to open a browser.
    pub open_browser: bool,
}

/// Runs a login and stores the identity. Ctrl-C cancels it.
pub async fn login(home: &Home, options: &LoginOptions) -> anyhow::Result<()> {
    let session = Session::connect(&options.broker, &options.trust)
        .await
        .context("cannot reach the broker")?;
    let welcome = session.hello().await.context("the broker did not answer")?;
    if welcome.idp.is_empty() {
        anyhow::bail!(
            "the broker {} has no identity provider set up, so nobody can log in there; ask your administrator for an identity bundle (`postern login --bundle FILE`)",
            welcome.broker
        );
    }
    println!(
        "Broker {} ({}), verified {}.",
        welcome.broker,
        options.broker,
        match &options.trust {
            Trust::Pins(_) => "by its pinned key",
            Trust::Cas(_) => "with the given CA",
            Trust::PublicRoots => "with the public certificate roots",
        }
    );
    println!("Identity provider: {}", welcome.idp);

    let started = Instant::now();
    let mut deadline = None;
    let mut shown_at = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let progress = |step: Progress<'_>| match step {
        Progress::Code(code) => {
            deadline = Some(Instant::now() + Duration::from_secs(code.expires_in.into()));
            show_code(code, &welcome.broker, &welcome.idp);
            if options.open_browser {
                open_browser(code);
            }
            shown_at = Instant::now();
        }
        Progress::Waiting => {
            let left = deadline
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or_default();
            if terminal {
                eprint!(
                    "\rWaiting for approval: {}:{:02} left (Ctrl-C cancels) ",
                    left.as_secs() / 60,
                    left.as_secs() % 60
                );
                let _ = std::io::stderr().flush();
            } else if shown_at.elapsed() >= Duration::from_secs(30) {
                eprintln!("Still waiting for approval ({}s left)", left.as_secs());
                shown_at = Instant::now();
            }
        }
    };
    let result = tokio::select! {
        result = session.login(&welcome, progress) => result,
        _ = tokio::signal::ctrl_c() => {
            if terminal {
                eprintln!();
            }
            session.close().await;
            anyhow::bail!("login cancelled; nothing was changed");
        }
    };
    if terminal {
        eprintln!();
    }
    let enrolled = match result {
        Ok(enrolled) => enrolled,
        Err(err) => {
            session.close().await;
            return Err(explain_failure(err));
        }
    };
    session.close().await;
    let bundle = enrolled.bundle;
    let certificate = bundle.inspect()?;
    {
        let _lock = home.lock().await?;
        home.store_identity(&bundle)?;
    }
    let who = &certificate.identity;
    println!(
        "Logged in as {} ({}) with {} after {}s.",
        who.display_name(),
        who.user,
        who.auth.amr.join(", "),
        started.elapsed().as_secs()
    );
    let now = SystemTime::now();
    println!(
        "Certificate valid until {} ({}); renewed automatically while `postern up` runs, until {}.",
        postern_certs::rfc3339(certificate.not_after),
        crate::cli::remaining(now, certificate.not_after),
        bundle.login.as_ref().map_or_else(
            || "it ends".to_owned(),
            |l| postern_certs::rfc3339(l.session_ends)
        )
    );
    println!("Identity stored in {}.", home.identity_path().display());
    println!("Next: postern up (restart it if it is running)");
    Ok(())
}

fn show_code(code: &DeviceCode, broker: &str, idp: &str) {
    println!();
    println!("To log in, open this page in a browser, on this or any other device:");
    println!();
    println!("  Open:  {}", code.verification_uri);
    println!("  Code:  {}", code.user_code);
    println!();
    let target = code
        .verification_uri_complete
        .as_deref()
        .unwrap_or(&code.verification_uri);
    if let Ok(qr) = qrcode::QrCode::new(target.as_bytes()) {
        let image = qr
            .render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build();
        println!("{image}");
        println!();
    }
    println!(
        "Approve only a code this terminal shows you. This login is for broker {broker}, through {idp};"
    );
    println!(
        "the code expires in {} minutes.",
        code.expires_in.div_ceil(60)
    );
    let _ = std::io::stdout().flush();
}

/// Opens the verification page where a desktop session exists; never required.
fn open_browser(code: &DeviceCode) {
    let url = code
        .verification_uri_complete
        .as_deref()
        .unwrap_or(&code.verification_uri);
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return;
    }
    let command = if cfg!(target_os = "macos") {
        Some(("open", vec![url]))
    } else if cfg!(windows) {
        Some(("explorer", vec![url]))
    } else if std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some()
    {
        Some(("xdg-open", vec![url]))
    } else {
        None
    };
    if let Some((program, args)) = command {
        let _ = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}

/// A login failure as a sentence with what to do next.
pub fn explain_failure(err: EnrollError) -> anyhow::Error {
    match err {
        EnrollError::Refused(failure) => {
            let lead = match failure.code() {
                FailCode::NotPermitted => "login refused",
                FailCode::AccessDenied => "login denied at the identity provider",
                FailCode::Expired => "the code expired",
                FailCode::IdpUnavailable => "the identity provider is unavailable",
                FailCode::LoginRequired => "log in again",
                FailCode::Busy => "the broker is busy",
                FailCode::NotConfigured => "this broker takes no logins",
                _ => "login failed",
            };
            anyhow::anyhow!("{lead}: {}", failure.reason())
        }
        other => anyhow::Error::new(other),
    }
}
