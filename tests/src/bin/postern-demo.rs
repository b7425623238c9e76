//! A complete local demonstration: a private Dovecot, the organisation's identity provider (a
//! real OpenID provider with a password and a TOTP step), a broker, a login with the second
//! factor, the agent, and a mail client reading mail through the tunnel. Every command is
//! printed before it runs.
//!
//! Run it with `scripts/demo`, which installs what it needs and builds the binaries first.
//! `--auto` approves the login in a headless browser; without it, a person approves it (the
//! demo shows the TOTP code to type), unless nobody is at a terminal.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a demo that fails stops with the reason"
)]

use std::path::Path;
use std::process::{Command, Stdio};

use std::io::{BufRead, BufReader, IsTerminal};
use std::time::Duration;

use postern_tests::{
    ALICE, Approval, BOB, CLIENT_ID, Dovecot, Idp, IdpOptions, Message, Running, approve, bin,
    free_tcp_port, free_udp_port, totp_now, wait_for_line,
};

fn say(text: &str) {
    println!("\n== {text}");
}

fn show(program: &Path, args: &[&str]) {
    let name = program.file_name().unwrap().to_string_lossy();
    println!("$ {name} {}", args.join(" "));
}

fn run(program: &Path, args: &[&str], home: &Path) {
    run_capture(program, args, home);
}

fn main() {
    let auto = std::env::args().any(|a| a == "--auto") || !std::io::stdin().is_terminal();
    // Kept after the demo, so that the files and the audit trail can be looked at.
    let work = postern_tests::workspace().join("target/postern-demo");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let home = work.join("agent-home");
    let dir = work.join("broker");
    let config = dir.join("broker.toml");
    let (broker, postern) = (bin("postern-broker"), bin("postern"));
    let runtime = tokio::runtime::Runtime::new().unwrap();

    say("A private mail server: Dovecot on 127.0.0.1, reachable only from this machine");
    let dovecot = Dovecot::start(&[
        ("alice", "wonderland", Message::samples(5, 7)),
        ("bob", "builder", Message::samples(2, 8)),
    ]);
    println!(
        "Dovecot serves IMAPS on {} with 5 messages for alice and 2 for bob",
        dovecot.addr()
    );

    say("The organisation's identity provider: a real OpenID provider with a second factor");
    let idp = Idp::start(&IdpOptions::default());
    println!(
        "{} (npm oidc-provider; HTTPS with its own test CA)",
        idp.issuer
    );
    println!(
        "alice signs in with password {:?} and a TOTP code; bob has no second factor",
        ALICE.password
    );

    say("The administrator sets up a broker in front of the mail server, using that IdP");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let service = format!("imap=imaps://{}", dovecot.addr());
    let mail_ca = dovecot.ca();
    let init = run_capture(
        &broker,
        &[
            "init",
            "--dir",
            dir.to_str().unwrap(),
            "--hostname",
            "localhost",
            "--listen",
            &listen,
            "--service",
            &service,
            "--mail-ca",
            mail_ca.to_str().unwrap(),
            "--issuer",
            &idp.issuer,
            "--client-id",
            CLIENT_ID,
            "--idp-ca",
            idp.ca_file.to_str().unwrap(),
        ],
        &home,
    );
    let login_line = init
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("postern login --broker"))
        .expect("init prints the login line")
        .to_owned();

    say("... tells it how Dovecot reads login names (`alice` is alice@example.org) ...");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace(
        "# domain = \"example.org\"\n# domain_form = \"address\"",
        "domain = \"example.org\"\ndomain_form = \"local\"",
    );
    std::fs::write(&config, text).unwrap();
    println!("[services.imap.login]\ndomain = \"example.org\"\ndomain_form = \"local\"");

    say("... and starts it");
    let serve_args = ["serve", "--config", config.to_str().unwrap()];
    show(&broker, &serve_args);
    let mut child = Command::new(&broker)
        .args(serve_args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = child.stderr.take().unwrap();
    let serving = Running(child);
    println!("{}", wait_for_line(log, "broker serving"));

    say("On alice's laptop: the login line the administrator handed out");
    let args: Vec<&str> = login_line.split_whitespace().skip(1).collect();
    log_in(&postern, &args, &home, &ALICE, auto, &runtime);
    run(&postern, &["status"], &home);

    if auto {
        say("bob logs in without a second factor: the broker's policy refuses him");
        let bob_home = work.join("bob-home");
        let mut child = spawn_login(&postern, &args, &bob_home);
        let (url, code) = read_code(&mut child);
        let approval = runtime.block_on(approve(&url, &code, &BOB, false));
        assert_eq!(approval, Approval::Approved, "bob approved at the IdP");
        let output = child.0.wait_with_output_or_panic();
        print!("{}", String::from_utf8_lossy(&output));
    }

    say("alice brings the tunnel up");
    let local = format!("127.0.0.1:{}", free_tcp_port());
    let up_args = ["up", "--listen", &format!("imap={local}")];
    show(&postern, &up_args);
    let mut child = Command::new(&postern)
        .args(up_args)
        .env("POSTERN_HOME", &home)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let up = Running(child);
    println!("{}", wait_for_line(stdout, "postern: imap on"));

    say("alice's mail programs trust this laptop's local CA (only for localhost)");
    run(&postern, &["trust"], &home);

    say("A mail client reads mail through the tunnel: the broker checks the login against policy");
    let ca = home.join("local-ca.pem");
    let ca = ca.to_str().unwrap();
    for args in [
        vec![
            "--cacert",
            ca,
            &format!("imaps://{local}/INBOX"),
            "--user",
            "alice:wonderland",
        ],
        vec![
            "--cacert",
            ca,
            &format!("imaps://{local}/INBOX"),
            "-X",
            "UID SEARCH ALL",
            "--user",
            "alice:wonderland",
        ],
        vec![
            "--cacert",
            ca,
            &format!("imaps://{local}/INBOX;UID=1;SECTION=HEADER"),
            "--user",
            "alice:wonderland",
        ],
    ] {
        println!("$ curl {}", args.join(" "));
        let output = Command::new("curl")
            .arg("--silent")
            .arg("--show-error")
            .args(&args)
            .output()
            .unwrap();
        print!("{}", String::from_utf8_lossy(&output.stdout));
        assert!(
            output.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    say("bob's password does not open bob's mailbox through alice's login");
    let args = [
        "--cacert",
        ca,
        &format!("imaps://{local}/INBOX"),
        "--user",
        "bob:builder",
    ];
    println!("$ curl {}", args.join(" "));
    let output = Command::new("curl")
        .arg("--silent")
        .arg("--show-error")
        .arg("--verbose")
        .args(args)
        .output()
        .unwrap();
    let verbose = String::from_utf8_lossy(&output.stderr);
    for line in verbose
        .lines()
        .filter(|l| l.contains("AUTHORIZATIONFAILED"))
    {
        println!("{line}");
    }
    assert!(!output.status.success(), "bob's mailbox must stay closed");
    assert!(verbose.contains("AUTHORIZATIONFAILED"), "{verbose}");

    say("Shut down (SIGTERM), then read the audit trail");
    assert!(up.terminate().success());
    assert!(serving.terminate().success());
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    for line in audit.lines() {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        println!(
            "{:>3} {:<17} {:<8} {:<18} {:<10} {}",
            event["event"]["sequence"],
            event["event"]["action"].as_str().unwrap_or_default(),
            event["event"]["outcome"].as_str().unwrap_or_default(),
            event["user"]["email"]
                .as_str()
                .or(event["user"]["id"].as_str())
                .unwrap_or("-"),
            event["postern"]["amr"]
                .as_array()
                .map(|amr| amr
                    .iter()
                    .filter_map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join("+"))
                .unwrap_or_default(),
            event["postern"]["service"].as_str().unwrap_or(""),
        );
    }
    println!(
        "\nThe broker folder, the agent's home and the full trail ({}) are kept in {}.",
        dir.join("audit.jsonl").display(),
        work.display()
    );
    idp.stop();
    say("Demo complete: login with a second factor -> tunnel -> reading mail");
}

/// Runs and prints a command, returning its standard output.
fn run_capture(program: &Path, args: &[&str], home: &Path) -> String {
    show(program, args);
    let output = Command::new(program)
        .args(args)
        .env("POSTERN_HOME", home)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    print!("{stdout}");
    if !output.status.success() {
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        panic!("the command failed");
    }
    stdout
}

fn spawn_login(postern: &Path, args: &[&str], home: &Path) -> Running {
    let mut all = args.to_vec();
    all.push("--no-browser");
    show(postern, &all);
    Running(
        Command::new(postern)
            .args(&all)
            .env("POSTERN_HOME", home)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Reads the login's output up to the code, echoing it.
fn read_code(login: &mut Running) -> (String, String) {
    let mut lines = BufReader::new(login.0.stdout.as_mut().unwrap()).lines();
    let (mut url, mut code) = (None, None);
    while url.is_none() || code.is_none() {
        let line = lines.next().expect("the login shows a code").unwrap();
        println!("{line}");
        if let Some(rest) = line.trim().strip_prefix("Open:") {
            url = Some(rest.trim().to_owned());
        }
        if let Some(rest) = line.trim().strip_prefix("Code:") {
            code = Some(rest.trim().to_owned());
        }
    }
    (url.unwrap(), code.unwrap())
}

/// `postern login`, approved by the demo's headless browser (`auto`) or by the person at the
/// terminal, who is shown the TOTP code to type.
fn log_in(
    postern: &Path,
    args: &[&str],
    home: &Path,
    person: &postern_tests::Person,
    auto: bool,
    runtime: &tokio::runtime::Runtime,
) {
    if auto {
        let mut login = spawn_login(postern, args, home);
        let (url, code) = read_code(&mut login);
        println!(
            "(the demo approves in headless Chromium as {}: code, password, TOTP)",
            person.username
        );
        let approval = runtime.block_on(approve(&url, &code, person, false));
        assert_eq!(approval, Approval::Approved);
        let output = login.0.wait_with_output_or_panic();
        print!("{}", String::from_utf8_lossy(&output));
        return;
    }
    println!("Open the address below in a browser on this machine (its certificate comes from the");
    println!(
        "demo's test CA: accept the warning), type the code, then sign in as {}",
        person.username
    );
    println!(
        "with password {:?} and the TOTP code the demo prints every 30 seconds.",
        person.password
    );
    show(postern, args);
    let mut child = Command::new(postern)
        .args(args)
        .env("POSTERN_HOME", home)
        .spawn()
        .unwrap();
    let secret = person.totp_secret.expect("the person has a second factor");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the login failed");
            return;
        }
        let (code, left) = totp_now(secret);
        eprintln!(
            "   (demo) {}'s TOTP code now: {code} ({}s left)",
            person.username,
            left.as_secs()
        );
        let until = std::time::Instant::now() + left;
        while std::time::Instant::now() < until {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

trait WaitOutput {
    fn wait_with_output_or_panic(&mut self) -> Vec<u8>;
}

impl WaitOutput for std::process::Child {
    /// Waits, returning standard output then standard error.
    fn wait_with_output_or_panic(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(mut stdout) = self.stdout.take() {
            std::io::Read::read_to_end(&mut stdout, &mut out).unwrap();
        }
        if let Some(mut stderr) = self.stderr.take() {
            std::io::Read::read_to_end(&mut stderr, &mut out).unwrap();
        }
        self.wait().unwrap();
        out
    }
}
