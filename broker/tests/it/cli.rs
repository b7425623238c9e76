//! Each subcommand, and every way it refuses bad input: exit code 64 and a message naming what
//! to fix.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use postern_certs::Bundle;

fn broker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_postern-broker"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs the broker with `args` and asserts that it refuses with code 64 and says `expected`.
fn refused(args: &[&str], expected: &str) -> Output {
    let out = broker(args);
    assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
    assert!(
        stderr(&out).contains(expected),
        "{args:?}: expected `{expected}` in {}",
        stderr(&out)
    );
    out
}

/// `init` into `dir/broker` with one service; returns the configuration file.
fn init(dir: &Path) -> PathBuf {
    let out = broker(&[
        "init",
        "--dir",
        dir.join("broker").to_str().unwrap(),
        "--hostname",
        "localhost",
        "--listen",
        "127.0.0.1:0",
        "--service",
        "imap=127.0.0.1:993",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    dir.join("broker/broker.toml")
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "`{from}` is in {}", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

#[test]
fn help_and_usage_errors() {
    let help = broker(&["--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("issue"));
    let usage = broker(&["serve"]);
    assert_eq!(usage.status.code(), Some(64), "a usage error is EX_USAGE");
    assert!(stderr(&usage).contains("--config"));
}

#[test]
fn init_writes_a_working_setup_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let out = broker(&[
        "init",
        "--dir",
        dir.path().join("b").to_str().unwrap(),
        "--hostname",
        "gw.example.org",
        "--service",
        "imap=mail.internal:993",
        "--service",
        "sieve=mail.internal:4190",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("postern-broker serve --config") && stdout.contains("postern-broker issue"),
        "{stdout}"
    );
    assert!(
        stdout.contains("No identity provider is configured"),
        "{stdout}"
    );
    for key in ["client-ca.key", "server-ca.key", "server.key", "seal.key"] {
        let mode = std::fs::metadata(dir.path().join("b/pki").join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let config = std::fs::read_to_string(dir.path().join("b/broker.toml")).unwrap();
    assert!(
        config.contains("[services.sieve]") && config.contains("hostname = \"gw.example.org\"")
    );
    let before = std::fs::read(dir.path().join("b/pki/client-ca.key")).unwrap();

    refused(
        &[
            "init",
            "--dir",
            dir.path().join("b").to_str().unwrap(),
            "--hostname",
            "x.example.org",
            "--service",
            "imap=a:1",
        ],
        "never overwrites",
    );
    assert_eq!(
        std::fs::read(dir.path().join("b/pki/client-ca.key")).unwrap(),
        before,
        "nothing was lost"
    );
}

#[test]
fn init_with_an_identity_provider_prints_the_login_line() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let out = broker(&[
        "init",
        "--dir",
        dir.path().join("b").to_str().unwrap(),
        "--hostname",
        "gw.example.org",
        "--service",
        "imap=mail.internal:993",
        "--issuer",
        "https://idp.example.org/realms/acme",
        "--client-id",
        "postern",
        "--client-secret-file",
        secret.to_str().unwrap(),
        "--scope",
        "openid",
        "--scope",
        "email",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with("postern login --broker gw.example.org:4433 --pin sha256/")
        })
        .unwrap_or_else(|| panic!("{stdout}"));
    let pin: postern_certs::Pin = line.split_whitespace().last().unwrap().parse().unwrap();
    let server_ca =
        postern_certs::store::read_certificates(&dir.path().join("b/pki/server-ca.pem")).unwrap();
    assert_eq!(pin, postern_certs::Pin::of(&server_ca[0]).unwrap());
    // The chain agents receive ends with the pinned CA, so a pin alone verifies it.
    let chain =
        postern_certs::store::read_certificates(&dir.path().join("b/pki/server.pem")).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], server_ca[0]);

    let config = std::fs::read_to_string(dir.path().join("b/broker.toml")).unwrap();
    assert!(
        config.contains("issuer = \"https://idp.example.org/realms/acme\""),
        "{config}"
    );
    assert!(
        config.contains("scopes = [\"openid\", \"email\"]"),
        "{config}"
    );
    let check = broker(&[
        "check",
        "--config",
        dir.path().join("b/broker.toml").to_str().unwrap(),
    ]);
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(
        String::from_utf8_lossy(&check.stdout).contains(line.trim()),
        "check repeats the login line: {}",
        String::from_utf8_lossy(&check.stdout)
    );

    // The scopes must ask for an ID token; an issuer in plain http is refused off loopback.
    let config_path = dir.path().join("b/broker.toml");
    edit(
        &config_path,
        "scopes = [\"openid\", \"email\"]",
        "scopes = [\"email\"]",
    );
    refused(
        &["check", "--config", config_path.to_str().unwrap()],
        "`oidc.scopes` must include \"openid\"",
    );
    edit(
        &config_path,
        "scopes = [\"email\"]",
        "scopes = [\"openid\"]",
    );
    edit(
        &config_path,
        "https://idp.example.org",
        "http://idp.example.org",
    );
    refused(
        &["check", "--config", config_path.to_str().unwrap()],
        "uses plain http",
    );
    edit(
        &config_path,
        "http://idp.example.org",
        "http://127.0.0.1:8080",
    );
    let check = broker(&["check", "--config", config_path.to_str().unwrap()]);
    assert!(check.status.success(), "{}", stderr(&check));
    // A retired seal key must be readable too; with it in place the setup checks out.
    edit(
        &config_path,
        "[login]\n",
        "[login]\nretired_seal_keys = [\"pki/seal-old.key\"]\n",
    );
    refused(
        &["check", "--config", config_path.to_str().unwrap()],
        "seal-old.key",
    );
    std::fs::copy(
        dir.path().join("b/pki/seal.key"),
        dir.path().join("b/pki/seal-old.key"),
    )
    .unwrap();
    let check = broker(&["check", "--config", config_path.to_str().unwrap()]);
    assert!(check.status.success(), "{}", stderr(&check));
    // Without the seal key, login cannot work: the broker says how to make one.
    std::fs::remove_file(dir.path().join("b/pki/seal.key")).unwrap();
    refused(
        &["check", "--config", config_path.to_str().unwrap()],
        "postern-seal-key-v1",
    );
}

#[test]
fn init_refuses_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("b");
    for (args, expected) in [
        (
            vec!["--hostname", "gw.example.org", "--service", "imap"],
            "NAME=HOST:PORT",
        ),
        (
            vec!["--hostname", "gw.example.org", "--service", "IMAP=mail:993"],
            "lowercase",
        ),
        (
            vec!["--hostname", "gw.example.org", "--service", "imap=mail"],
            "HOST:PORT",
        ),
        (
            vec!["--hostname", "not a host", "--service", "imap=mail:993"],
            "--hostname",
        ),
        (
            vec![
                "--hostname",
                "gw.example.org",
                "--listen",
                "4433",
                "--service",
                "imap=mail:993",
            ],
            "--listen",
        ),
    ] {
        let mut all = vec!["init", "--dir", d.to_str().unwrap()];
        all.extend(args);
        let out = broker(&all);
        assert_eq!(out.status.code(), Some(64), "{all:?}");
        assert!(stderr(&out).contains(expected), "{all:?}: {}", stderr(&out));
        assert!(!d.exists(), "nothing is written for bad options");
    }
}

#[test]
fn serve_names_the_bad_setting() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    edit(
        &config,
        "listen = \"127.0.0.1:0\"",
        "listen = \"everywhere\"",
    );
    refused(
        &["serve", "--config", config.to_str().unwrap()],
        "`broker.listen`",
    );

    edit(
        &config,
        "listen = \"everywhere\"",
        "listen = \"127.0.0.1:0\"\nlisten_backlog = 5",
    );
    refused(
        &["serve", "--config", config.to_str().unwrap()],
        "listen_backlog",
    );
}

#[test]
fn check_reports_a_ready_setup_and_a_wrong_hostname() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    let out = broker(&["check", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("is ready to serve")
            && text.contains("for localhost")
            && text.contains("service imap"),
        "{text}"
    );
    assert!(
        !dir.path().join("broker/audit.jsonl").exists(),
        "check writes nothing"
    );

    edit(
        &config,
        "hostname = \"localhost\"",
        "hostname = \"gw.example.org\"",
    );
    refused(
        &["check", "--config", config.to_str().unwrap()],
        "would refuse it for `gw.example.org`",
    );
}

#[test]
fn the_client_and_server_cas_must_be_different_keys() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    let pki = dir.path().join("broker/pki");
    let server_ca = std::fs::read_to_string(pki.join("server-ca.pem")).unwrap();
    let mut client_cas = std::fs::OpenOptions::new()
        .append(true)
        .open(pki.join("client-ca.pem"))
        .unwrap();
    std::io::Write::write_all(&mut client_cas, server_ca.as_bytes()).unwrap();
    refused(
        &["check", "--config", config.to_str().unwrap()],
        "use separate CAs",
    );
}

#[test]
fn the_signing_key_must_belong_to_a_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    let pki = dir.path().join("broker/pki");
    std::fs::copy(pki.join("server.key"), pki.join("client-ca.key")).unwrap();
    let out = broker(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("client-ca.key")
            && stderr(&out).contains("is the key of no certificate"),
        "{}",
        stderr(&out)
    );
    let issued = broker(&[
        "issue",
        "--config",
        config.to_str().unwrap(),
        "--user",
        "a@example.org",
        "--out",
        dir.path().join("a").to_str().unwrap(),
    ]);
    assert_eq!(issued.status.code(), Some(64), "{}", stderr(&issued));
}

#[test]
fn serve_names_an_unreadable_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    std::fs::remove_file(dir.path().join("broker/pki/server.key")).unwrap();
    refused(
        &["serve", "--config", config.to_str().unwrap()],
        "server.key",
    );
}

#[test]
fn serve_explains_a_port_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    edit(
        &config,
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    refused(
        &["serve", "--config", config.to_str().unwrap()],
        "another process uses this port",
    );
}

#[test]
fn serve_locates_policy_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    std::fs::write(
        dir.path().join("broker/policies/default.cedar"),
        "// typo below\npermit (principal, action == Action::\"conect\", resource);\n",
    )
    .unwrap();
    refused(
        &["serve", "--config", config.to_str().unwrap()],
        "default.cedar:2:",
    );
}

#[test]
fn serve_runs_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_postern-broker"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = lines
            .next()
            .expect("the broker says it is serving")
            .unwrap();
        if line.contains("broker serving") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the broker"
        );
    }
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let audit = std::fs::read_to_string(dir.path().join("broker/audit.jsonl")).unwrap();
    let actions: Vec<String> = audit
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]["action"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(actions, ["broker.start", "broker.drain", "broker.stop"]);
}

#[test]
fn issue_writes_a_private_admin_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    let out_path = dir.path().join("backup.bundle");
    let out = broker(&[
        "issue",
        "--config",
        config.to_str().unwrap(),
        "--user",
        "backup@example.org",
        "--group",
        "machines",
        "--ttl",
        "8h",
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("postern login --bundle"));
    assert_eq!(
        std::fs::metadata(&out_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let bundle = Bundle::from_toml(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    let certificate = bundle.inspect().unwrap();
    assert_eq!(
        certificate.identity.auth.issuance,
        postern_certs::Issuance::Admin
    );
    assert_eq!(certificate.identity.groups, ["machines"]);
    assert_eq!(
        certificate
            .not_after
            .duration_since(certificate.not_before)
            .unwrap(),
        Duration::from_secs(8 * 3600)
    );
    assert!(
        bundle.credential().is_ok(),
        "the key belongs to the certificate"
    );
    assert_eq!(
        bundle.broker, "localhost:0",
        "the public address defaults to the hostname and listen port"
    );

    let audit = std::fs::read_to_string(dir.path().join("broker/audit.jsonl")).unwrap();
    let event: serde_json::Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
    assert_eq!(event["event"]["action"], "cert.issue");
    assert_eq!(event["x509"]["serial_number"], certificate.serial);

    refused(
        &[
            "issue",
            "--config",
            config.to_str().unwrap(),
            "--user",
            "backup@example.org",
            "--out",
            out_path.to_str().unwrap(),
        ],
        "exists",
    );
}

#[test]
fn issue_refuses_what_it_must_not_sign() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    let out = dir.path().join("x.bundle");
    for (extra, expected) in [
        (
            vec!["--user", "backup@example.org", "--ttl", "25h"],
            "exceeds the cap",
        ),
        (vec!["--user", "not-an-email"], "not an email address"),
        (
            vec!["--user", "backup@example.org", "--group", ""],
            "--group",
        ),
    ] {
        let mut args = vec![
            "issue",
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let result = broker(&args);
        assert_eq!(result.status.code(), Some(64), "{args:?}");
        assert!(
            stderr(&result).contains(expected),
            "{args:?}: {}",
            stderr(&result)
        );
        assert!(!out.exists());
    }
}

#[test]
fn issue_signs_a_request_made_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    let request = postern_certs::KeyRequest::generate().unwrap();
    let csr = dir.path().join("host.csr");
    std::fs::write(&csr, &request.csr_pem).unwrap();
    let out_path = dir.path().join("host.bundle");
    let out = broker(&[
        "issue",
        "--config",
        config.to_str().unwrap(),
        "--user",
        "host@example.org",
        "--csr",
        csr.to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bundle = Bundle::from_toml(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    assert!(bundle.key.is_none(), "the key never left the device");
    postern_certs::check_key_matches(&bundle.certificate, &request.key_pem).unwrap();

    std::fs::write(
        &csr,
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    )
    .unwrap();
    refused(
        &[
            "issue",
            "--config",
            config.to_str().unwrap(),
            "--user",
            "host@example.org",
            "--csr",
            csr.to_str().unwrap(),
            "--out",
            dir.path().join("y").to_str().unwrap(),
        ],
        "--csr",
    );
}
