//! `postern trust`: how mail programs come to accept the certificate of localhost:993.
//!
//! The CA is this device's own (see `postern_certs::LocalTls`): its key was destroyed after it
//! signed the local server certificate, and it is name-constrained to localhost and loopback
//! addresses. Trusting it lets nothing else be impersonated.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::Context as _;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::home::Home;

/// The name the CA is stored under in certificate databases.
pub const CA_NICKNAME: &str = "Postern local mail CA";

/// Prints where the CA is and how to trust it; with `install`, adds it to this user's stores.
pub fn trust(home: &Home, install: bool) -> anyhow::Result<()> {
    let (tls, made) = home.local_tls(SystemTime::now())?;
    let path = home.local_ca_path();
    let der = CertificateDer::from_pem_slice(tls.ca_pem.as_bytes())
        .context("the local CA certificate is unreadable")?;
    let fingerprint = ring::digest::digest(&ring::digest::SHA256, &der);
    let fingerprint: Vec<String> = fingerprint
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    if made {
        println!("Made a new local CA for this device.");
    }
    println!("Local CA:     {}", path.display());
    println!("SHA-256:      {}", fingerprint.join(":"));
    if let Some(end) = tls.not_after() {
        println!(
            "Valid until:  {} (a new one is made 30 days before; trust it again then)",
            postern_certs::rfc3339(end)
        );
    }
    println!(
        "It can vouch only for localhost, 127.0.0.0/8 and ::1, and its key was destroyed after \
         it signed this device's certificate for them."
    );
    println!();
    if install {
        return install_for_user(&path);
    }
    print_commands(&path);
    Ok(())
}

fn print_commands(path: &Path) {
    let p = path.display();
    println!(
        "Trust it once, in the store your mail program reads (`postern trust --install` runs the per-user ones):"
    );
    println!();
    println!("  Thunderbird (any system): Settings > Privacy & Security > Certificates > Manage");
    println!(
        "    Certificates > Authorities > Import, choose {p}, tick \"Trust this CA to identify"
    );
    println!(
        "    websites\". Or accept the exception Thunderbird offers on the first connection, after"
    );
    println!("    checking that the SHA-256 fingerprint above is the one it shows for the issuer.");
    println!("  Linux, per user (NSS: Thunderbird, Firefox, Chromium; package libnss3-tools):");
    println!("    certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n \"{CA_NICKNAME}\" -i {p}");
    println!("  Linux, system-wide (Debian, Ubuntu; curl, Python, mbsync, Evolution):");
    println!(
        "    sudo cp {p} /usr/local/share/ca-certificates/postern-local.crt && sudo update-ca-certificates"
    );
    println!("  Linux, system-wide (Fedora, RHEL):");
    println!(
        "    sudo cp {p} /etc/pki/ca-trust/source/anchors/postern-local.pem && sudo update-ca-trust"
    );
    println!("  macOS (login keychain: Apple Mail, Outlook):");
    println!(
        "    security add-trusted-cert -r trustRoot -k ~/Library/Keychains/login.keychain-db {p}"
    );
    println!("  Windows (current user: Outlook, Windows Mail):");
    println!("    certutil -user -addstore Root {p}");
    println!();
    println!(
        "Programs that take a CA file need no store: curl --cacert {p}, mbsync CertificateFile {p}."
    );
}

fn install_for_user(path: &Path) -> anyhow::Result<()> {
    if cfg!(target_os = "macos") {
        let keychain = dirs::home_dir()
            .context("cannot find the home folder")?
            .join("Library/Keychains/login.keychain-db");
        return run(Command::new("security")
            .args(["add-trusted-cert", "-r", "trustRoot", "-k"])
            .arg(&keychain)
            .arg(path));
    }
    if cfg!(windows) {
        return run(Command::new("certutil")
            .args(["-user", "-addstore", "Root"])
            .arg(path));
    }
    let databases = nss_databases();
    if Command::new("certutil").arg("--help").output().is_err() {
        anyhow::bail!(
            "`certutil` is not installed; install libnss3-tools (Debian, Ubuntu) or nss-tools \
             (Fedora), or run `postern trust` to see the commands for each system"
        );
    }
    let mut added = 0;
    for db in &databases {
        let db_arg = format!("sql:{}", db.display());
        // A CA of an earlier run goes first, so the store holds one.
        let _ = Command::new("certutil")
            .args(["-d", &db_arg, "-D", "-n", CA_NICKNAME])
            .output();
        let mut add = Command::new("certutil");
        add.args(["-d", &db_arg, "-A", "-t", "C,,", "-n", CA_NICKNAME, "-i"])
            .arg(path);
        match run(&mut add) {
            Ok(()) => {
                println!("Added to {}", db.display());
                added += 1;
            }
            Err(err) => eprintln!("postern: {err:#}"),
        }
    }
    if added == 0 {
        anyhow::bail!("the CA was added to no certificate database");
    }
    println!(
        "Restart your mail program. Programs that use the system store (curl, Python, mbsync) \
         need the system-wide command that `postern trust` shows."
    );
    Ok(())
}

/// This user's NSS databases: the shared one (made if missing), and each Thunderbird and
/// Firefox profile's.
fn nss_databases() -> Vec<PathBuf> {
    let Some(home) = dirs::home_dir() else {
        return Vec::new();
    };
    let shared = home.join(".pki/nssdb");
    if !shared.join("cert9.db").exists() {
        let _ = std::fs::create_dir_all(&shared);
        let _ = Command::new("certutil")
            .args([
                "-d",
                &format!("sql:{}", shared.display()),
                "-N",
                "--empty-password",
            ])
            .output();
    }
    let mut found = vec![shared];
    for profiles in [
        ".thunderbird",
        "snap/thunderbird/common/.thunderbird",
        ".mozilla/firefox",
        "snap/firefox/common/.mozilla/firefox",
    ] {
        let Ok(entries) = std::fs::read_dir(home.join(profiles)) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.path().join("cert9.db").exists() {
                found.push(entry.path());
            }
        }
    }
    found
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !output.status.success() {
        anyhow::bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
