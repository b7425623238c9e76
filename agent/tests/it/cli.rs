//! Each subcommand, and the sentences that tell a person what to do next.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use postern_certs::testdata::{alice, client_ca, server_cas};
use postern_certs::{Bundle, BundleService, KeyRequest, PublicKey};

const HOUR: Duration = Duration::from_secs(3600);

fn postern(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(args)
        .env("POSTERN_HOME", home)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A bundle for Alice from the test PKI, valid from `not_before` for `lifetime`; the broker
/// address leads nowhere.
fn bundle(
    not_before: SystemTime,
    lifetime: Duration,
    request: &KeyRequest,
    with_key: bool,
) -> Bundle {
    let key = PublicKey::from_csr_pem(request.csr_pem.as_bytes()).unwrap();
    Bundle {
        broker: "127.0.0.1:9".into(),
        server_name: "localhost".into(),
        server_cas: server_cas(),
        certificate: client_ca()
            .issue(&alice(not_before), &key, not_before, lifetime)
            .unwrap(),
        key: with_key.then(|| request.key_pem.clone()),
        services: [(
            "imap".parse().unwrap(),
            BundleService {
                port: 993,
                protocol: Default::default(),
            },
        )]
        .into(),
        login: None,
    }
}

fn write_bundle(dir: &Path, bundle: &Bundle) -> String {
    let path = dir.join("alice.bundle");
    std::fs::write(&path, bundle.to_toml()).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn status_before_login_says_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let out = postern(home.path(), &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not logged in: run `postern login --broker HOST:PORT --pin …`"),
        "{}",
        stderr(&out)
    );
    let usage = postern(home.path(), &["login"]);
    assert_eq!(usage.status.code(), Some(64));
    // A pin that is not one is refused before anything is sent.
    let bad_pin = postern(
        home.path(),
        &["login", "--broker", "127.0.0.1:9", "--pin", "sha1/abc"],
    );
    assert_eq!(bad_pin.status.code(), Some(64));
    assert!(
        stderr(&bad_pin).contains("is not a pin"),
        "{}",
        stderr(&bad_pin)
    );
    let both = postern(
        home.path(),
        &["login", "--broker", "127.0.0.1:9", "--bundle", "x.bundle"],
    );
    assert_eq!(both.status.code(), Some(64));
    // Logging out with nothing stored is not an error.
    let logout = postern(home.path(), &["logout"]);
    assert!(logout.status.success());
}

#[test]
fn login_imports_privately_and_status_shows_it() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = write_bundle(
        dir.path(),
        &bundle(
            SystemTime::now(),
            HOUR,
            &KeyRequest::generate().unwrap(),
            true,
        ),
    );
    let out = postern(&home.path().join("p"), &["login", "--bundle", &file]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("Logged in as alice@example.org"),
        "{}",
        stdout(&out)
    );
    let identity = home.path().join("p/identity.toml");
    assert_eq!(
        std::fs::metadata(&identity).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(home.path().join("p"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    let status = postern(&home.path().join("p"), &["status"]);
    assert!(status.status.success(), "{}", stderr(&status));
    let text = stdout(&status);
    for expected in [
        "alice@example.org (https://idp.example.org#alice-0001)",
        "pwd, otp",
        "valid until",
        "127.0.0.1:9",
        "imap on 127.0.0.1:993",
    ] {
        assert!(text.contains(expected), "{expected}: {text}");
    }
}

#[test]
fn login_refuses_unusable_bundles() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let expired = write_bundle(
        dir.path(),
        &bundle(
            SystemTime::now() - 3 * HOUR,
            HOUR,
            &KeyRequest::generate().unwrap(),
            true,
        ),
    );
    let out = postern(home.path(), &["login", "--bundle", &expired]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("expired at"), "{}", stderr(&out));

    std::fs::write(dir.path().join("garbage"), "hello").unwrap();
    let out = postern(
        home.path(),
        &[
            "login",
            "--bundle",
            dir.path().join("garbage").to_str().unwrap(),
        ],
    );
    assert!(
        stderr(&out).contains("garbage") && stderr(&out).contains("not a Postern identity bundle"),
        "{}",
        stderr(&out)
    );

    let keyless = write_bundle(
        dir.path(),
        &bundle(
            SystemTime::now(),
            HOUR,
            &KeyRequest::generate().unwrap(),
            false,
        ),
    );
    let out = postern(home.path(), &["login", "--bundle", &keyless]);
    assert!(
        stderr(&out).contains("holds no private key"),
        "{}",
        stderr(&out)
    );
    assert!(
        !home.path().join("identity.toml").exists(),
        "nothing was stored"
    );
}

#[test]
fn a_key_made_here_meets_its_certificate() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let csr_path = dir.path().join("host.csr");
    let out = postern(home.path(), &["csr", "--out", csr_path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::metadata(home.path().join("pending.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let again = postern(home.path(), &["csr"]);
    assert!(
        stderr(&again).contains("still waiting"),
        "a waiting key is never replaced: {}",
        stderr(&again)
    );

    // The administrator signs the request (as `postern-broker issue --csr` does).
    let csr = std::fs::read_to_string(&csr_path).unwrap();
    let key = PublicKey::from_csr_pem(csr.as_bytes()).unwrap();
    let now = SystemTime::now();
    let keyless = Bundle {
        certificate: client_ca().issue(&alice(now), &key, now, HOUR).unwrap(),
        key: None,
        ..bundle(now, HOUR, &KeyRequest::generate().unwrap(), false)
    };
    let file = write_bundle(dir.path(), &keyless);
    let out = postern(home.path(), &["login", "--bundle", &file]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !home.path().join("pending.key").exists(),
        "the key moved into the identity"
    );
    assert!(postern(home.path(), &["status"]).status.success());
}

fn logged_in(bundle: &Bundle) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    postern_agent::Home::at(home.path().to_owned())
        .store_identity(bundle)
        .unwrap();
    home
}

#[test]
fn up_refuses_what_would_expose_or_fail() {
    let home = logged_in(&bundle(
        SystemTime::now(),
        HOUR,
        &KeyRequest::generate().unwrap(),
        true,
    ));
    for (args, expected) in [
        (
            ["up", "--listen", "imap=0.0.0.0:1993"],
            "loopback addresses only",
        ),
        (["up", "--listen", "pop3=127.0.0.1:1110"], "does not offer"),
        (
            ["up", "--listen", "imap=localhost:1993"],
            "is not an address",
        ),
    ] {
        let out = postern(home.path(), &args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = format!("imap={}", taken.local_addr().unwrap());
    let out = postern(home.path(), &["up", "--listen", &listen]);
    assert!(
        stderr(&out).contains("Another program uses this port"),
        "{}",
        stderr(&out)
    );

    let expired = logged_in(&bundle(
        SystemTime::now() - 3 * HOUR,
        HOUR,
        &KeyRequest::generate().unwrap(),
        true,
    ));
    let out = postern(expired.path(), &["up"]);
    assert!(
        stderr(&out).contains("expired at") && stderr(&out).contains("postern login"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn up_serves_until_sigterm_even_before_the_broker_answers() {
    let home = logged_in(&bundle(
        SystemTime::now(),
        HOUR,
        &KeyRequest::generate().unwrap(),
        true,
    ));
    let mut command = Command::new(env!("CARGO_BIN_EXE_postern"));
    command.args(["up", "--listen", "imap=127.0.0.1:0"]);
    let (line, output) = up_until_serving(command, home.path());
    assert!(
        line.starts_with("postern: imap on 127.0.0.1:") && line.contains("-> broker 127.0.0.1:9"),
        "{line}"
    );
    assert!(output.status.success());
}

/// Runs `command` (a `postern up`) until it says where it serves, then stops it with SIGTERM:
/// that first line, and what it printed.
fn up_until_serving(mut command: Command, home: &Path) -> (String, Output) {
    let mut child = command
        .env("POSTERN_HOME", home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    (line, child.wait_with_output().unwrap())
}

#[test]
fn trust_shows_the_local_ca_and_keeps_it() {
    let home = tempfile::tempdir().unwrap();
    let first = postern(home.path(), &["trust"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let text = stdout(&first);
    assert!(text.contains("Made a new local CA"), "{text}");
    let ca = home.path().join("local-ca.pem");
    assert!(text.contains(&ca.display().to_string()), "{text}");
    assert!(text.contains("SHA-256:"), "{text}");
    for command in [
        "certutil -d sql:$HOME/.pki/nssdb -A",
        "update-ca-certificates",
        "security add-trusted-cert",
        "certutil -user -addstore Root",
        "Manage",
    ] {
        assert!(text.contains(command), "{command}: {text}");
    }
    let key = home.path().join("local-server.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let pem = std::fs::read_to_string(&ca).unwrap();
    assert!(
        !pem.contains("PRIVATE KEY"),
        "the CA's key is never written"
    );

    // The same CA next time: trusting it once is enough.
    let again = postern(home.path(), &["trust"]);
    assert!(again.status.success());
    assert!(!stdout(&again).contains("Made a new"));
    assert_eq!(std::fs::read_to_string(&ca).unwrap(), pem);
}

#[test]
fn up_serves_on_a_fallback_port_when_993_needs_privileges_and_says_why() {
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(1024);
    if start <= 993 {
        eprintln!("skipped: this machine lets every user listen on port 993");
        return;
    }
    let request = KeyRequest::generate().unwrap();
    let mut identity = bundle(SystemTime::now(), HOUR, &request, true);
    for service in identity.services.values_mut() {
        service.protocol = postern_proto::ServiceKind::Imap;
    }
    let home = logged_in(&identity);
    let root = rustix::process::geteuid().is_root();
    let mut command = if root {
        // As root 993 would bind: run as nobody, who owns the home.
        for entry in [home.path().to_owned()].into_iter().chain(
            std::fs::read_dir(home.path())
                .unwrap()
                .map(|e| e.unwrap().path()),
        ) {
            std::os::unix::fs::chown(&entry, Some(65534), Some(65534)).unwrap();
        }
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_postern"));
        command
    } else {
        Command::new(env!("CARGO_BIN_EXE_postern"))
    };
    command.arg("up");
    let (line, output) = up_until_serving(command, home.path());
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(
        line.starts_with("postern: imap on 127.0.0.1:10993 (IMAP over TLS)"),
        "{line}{errors}"
    );
    assert!(
        errors.contains("cannot listen on 127.0.0.1:993")
            && errors.contains("serving it on 127.0.0.1:10993 instead")
            && errors.contains("setcap cap_net_bind_service"),
        "{errors}"
    );
    assert!(errors.contains("postern trust"), "{errors}");
}

#[test]
fn up_serves_plain_imap_on_loopback_when_asked() {
    let request = KeyRequest::generate().unwrap();
    let mut identity = bundle(SystemTime::now(), HOUR, &request, true);
    for service in identity.services.values_mut() {
        service.protocol = postern_proto::ServiceKind::Imap;
    }
    let home = logged_in(&identity);
    let mut command = Command::new(env!("CARGO_BIN_EXE_postern"));
    command.args(["up", "--plain-imap", "--listen", "imap=127.0.0.1:0"]);
    let (line, output) = up_until_serving(command, home.path());
    assert!(line.starts_with("postern: imap on 127.0.0.1:"), "{line}");
    assert!(!line.contains("TLS"), "{line}");
    assert!(output.status.success());
    assert!(
        !home.path().join("local-ca.pem").exists(),
        "no CA is made for plain IMAP"
    );
}

#[test]
fn trust_install_adds_the_ca_to_this_users_nss_database_once() {
    let home = tempfile::tempdir().unwrap();
    let user = tempfile::tempdir().unwrap();
    let install = || {
        Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["trust", "--install"])
            .env("POSTERN_HOME", home.path())
            .env("HOME", user.path())
            .output()
            .unwrap()
    };
    let nssdb = user.path().join(".pki/nssdb");
    for _ in 0..2 {
        let out = install();
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
        assert!(
            stdout(&out).contains(&format!("Added to {}", nssdb.display())),
            "{}",
            stdout(&out)
        );
    }
    let listed = Command::new("certutil")
        .args(["-L", "-d", &format!("sql:{}", nssdb.display())])
        .output()
        .expect("certutil (libnss3-tools; scripts/install-test-deps) runs");
    let listed = stdout(&listed);
    let entries: Vec<_> = listed
        .lines()
        .filter(|line| line.starts_with(postern_agent::trust::CA_NICKNAME))
        .collect();
    assert_eq!(entries.len(), 1, "{listed}");
    assert!(entries[0].trim_end().ends_with("C,,"), "{listed}");
}
