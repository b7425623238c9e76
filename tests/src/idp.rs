//! The test identity provider (`tests/idp/idp.mjs`, npm `oidc-provider`) and the test person who
//! approves device logins in headless Chromium (`tests/idp/approve.mjs`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use postern_certs::ServerCa;
use serde_json::json;
use tempfile::TempDir;

use crate::process::Running;
use crate::workspace;

/// A person at the IdP.
#[derive(Debug, Clone, Copy)]
pub struct Person {
    /// Login name (and subject).
    pub username: &'static str,
    /// Password.
    pub password: &'static str,
    /// TOTP secret (base32); `None` for someone without a second factor.
    pub totp_secret: Option<&'static str>,
    /// Email address (verified at the IdP).
    pub email: &'static str,
}

/// Alice signs in with a password and a TOTP code.
pub const ALICE: Person = Person {
    username: "alice",
    password: "correct horse battery",
    totp_secret: Some("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"),
    email: "alice@example.org",
};

/// Bob has no second factor enrolled: the IdP lets him in with his password alone.
pub const BOB: Person = Person {
    username: "bob",
    password: "staple paper clip",
    totp_secret: None,
    email: "bob@example.org",
};

/// The broker's client id at the test IdP.
pub const CLIENT_ID: &str = "postern-broker";

/// Settings of a test IdP.
#[derive(Debug, Clone)]
pub struct IdpOptions {
    /// How long a device code stays valid.
    pub device_code_ttl: Duration,
    /// The broker's client secret; `None` registers it as a public client.
    pub client_secret: Option<&'static str>,
}

impl Default for IdpOptions {
    fn default() -> Self {
        Self {
            device_code_ttl: Duration::from_secs(300),
            client_secret: None,
        }
    }
}

/// A running test IdP on 127.0.0.1 over HTTPS with its own CA.
#[derive(Debug)]
pub struct Idp {
    /// The issuer URL.
    pub issuer: String,
    /// The file holding the broker's client secret, for a confidential client.
    pub client_secret_file: Option<PathBuf>,
    /// The CA of its HTTPS certificate, PEM file.
    pub ca_file: PathBuf,
    dir: TempDir,
    process: Running,
}

impl Idp {
    /// Starts the IdP with Alice and Bob and the broker's public client.
    pub fn start(options: &IdpOptions) -> Self {
        let fixture = fixture_dir();
        assert!(
            fixture.join("node_modules/oidc-provider").exists(),
            "the test IdP's packages are missing; run scripts/install-test-deps (it runs `npm ci --prefix tests/idp`)"
        );
        let dir = tempfile::Builder::new()
            .prefix("postern-idp-")
            .tempdir()
            .unwrap();
        let now = SystemTime::now();
        let year = Duration::from_secs(365 * 24 * 3600);
        let (ca, ca_files) = ServerCa::generate("postern test idp", now, year).unwrap();
        let leaf = ca.issue_server("127.0.0.1", now, year).unwrap();
        let ca_file = dir.path().join("idp-ca.pem");
        std::fs::write(&ca_file, &ca_files.cert_pem).unwrap();
        std::fs::write(dir.path().join("idp.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.path().join("idp.key"), leaf.key_pem.expose()).unwrap();
        let person = |p: &Person, name: &str, groups: &[&str]| {
            json!({
                "username": p.username, "password": p.password, "totp_secret": p.totp_secret,
                "email": p.email, "email_verified": true, "name": name, "groups": groups,
            })
        };
        let config = json!({
            "host": "127.0.0.1", "port": 0,
            "tls": {
                "cert": dir.path().join("idp.pem"),
                "key": dir.path().join("idp.key"),
            },
            "clients": [{"client_id": CLIENT_ID, "client_secret": options.client_secret}],
            "users": [person(&ALICE, "Alice Example", &["staff"]), person(&BOB, "Bob Example", &[])],
            "device_code_ttl_seconds": options.device_code_ttl.as_secs(),
            "id_token_ttl_seconds": 3600,
            "refresh_token_ttl_seconds": 86400,
        });
        let config_file = dir.path().join("idp.json");
        std::fs::write(&config_file, config.to_string()).unwrap();
        let log = std::fs::File::create(dir.path().join("idp.log")).unwrap();
        let mut child = Command::new("node")
            .arg(fixture.join("idp.mjs"))
            .arg(&config_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("node runs (Node.js 20 or later)");
        let stdout = child.stdout.take().unwrap();
        let process = Running(child);
        let mut first = String::new();
        BufReader::new(stdout).read_line(&mut first).unwrap();
        let ready: serde_json::Value = serde_json::from_str(&first).unwrap_or_else(|_| {
            panic!(
                "the test IdP did not start: {}",
                std::fs::read_to_string(dir.path().join("idp.log")).unwrap_or_default()
            )
        });
        let client_secret_file = options.client_secret.map(|secret| {
            let path = dir.path().join("client-secret");
            std::fs::write(&path, format!("{secret}\n")).unwrap();
            path
        });
        Self {
            issuer: ready["issuer"].as_str().unwrap().to_owned(),
            client_secret_file,
            ca_file,
            dir,
            process,
        }
    }

    /// The `[oidc]` table of a broker that uses this IdP.
    pub fn oidc_table(&self) -> String {
        let mut table = format!(
            "\n[oidc]\nissuer = {:?}\nclient_id = {CLIENT_ID:?}\nca_file = {:?}\n",
            self.issuer,
            self.ca_file.display().to_string()
        );
        if let Some(file) = &self.client_secret_file {
            table.push_str(&format!(
                "client_secret_file = {:?}\n",
                file.display().to_string()
            ));
        }
        table
    }

    /// The IdP's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("idp.log")).unwrap_or_default()
    }

    /// Stops the IdP.
    pub fn stop(self) {
        let _ = self.process.terminate();
    }
}

/// What the test person did at the IdP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// Approved the login.
    Approved,
    /// Refused it ("Abort").
    Denied,
    /// Could not: the message says why.
    Failed(String),
}

/// The test person opens `url` in headless Chromium, types `code`, and approves as `person`
/// (password, then the current TOTP code if they have one) — or aborts when `deny`.
pub async fn approve(url: &str, code: &str, person: &Person, deny: bool) -> Approval {
    let mut command = tokio::process::Command::new("node");
    command
        .arg(fixture_dir().join("approve.mjs"))
        .args(["--url", url, "--code", code])
        .args(["--username", person.username, "--password", person.password])
        .kill_on_drop(true);
    if let Some(secret) = person.totp_secret {
        command.args(["--totp-secret", secret]);
    }
    if deny {
        command.arg("--deny");
    }
    let output = command.output().await.expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let result: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(
            || json!({"result": "error", "message": String::from_utf8_lossy(&output.stderr)}),
        );
    match result["result"].as_str() {
        Some("approved") => Approval::Approved,
        Some("denied") => Approval::Denied,
        _ => Approval::Failed(result["message"].as_str().unwrap_or_default().to_owned()),
    }
}

/// The current TOTP code for `secret` (RFC 6238: SHA-1, 6 digits, 30 s), as a person reads it
/// from an authenticator app.
pub fn totp_now(secret: &str) -> (String, Duration) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (totp_at(secret, now), Duration::from_secs(30 - now % 30))
}

fn totp_at(secret: &str, unix_seconds: u64) -> String {
    let key = base32_decode(secret);
    let counter = unix_seconds / 30;
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &key),
        &counter.to_be_bytes(),
    );
    let tag = tag.as_ref();
    let offset = usize::from(tag[19] & 0x0f);
    let value = u32::from_be_bytes([
        tag[offset],
        tag[offset + 1],
        tag[offset + 2],
        tag[offset + 3],
    ]) & 0x7fff_ffff;
    format!("{:06}", value % 1_000_000)
}

fn base32_decode(text: &str) -> Vec<u8> {
    let mut bits = 0u64;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.bytes().filter(|c| *c != b'=') {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => panic!("not base32: {text}"),
        };
        bits = (bits << 5) | u64::from(value);
        count += 5;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}

/// The folder of the IdP fixture.
fn fixture_dir() -> PathBuf {
    workspace().join("tests/idp")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totp_matches_rfc_6238() {
        // RFC 6238 appendix B uses the ASCII secret "12345678901234567890".
        assert_eq!(
            base32_decode("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"),
            b"12345678901234567890"
        );
        // Its SHA-1 vectors, last six of the eight digits.
        for (time, code) in [
            (59, "287082"),
            (1_111_111_109, "081804"),
            (2_000_000_000, "279037"),
        ] {
            assert_eq!(totp_at("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ", time), code);
        }
    }
}
