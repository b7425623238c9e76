//! A complete local demonstration: a private Dovecot, a broker, an identity, the agent, and a
//! mail client reading mail through the tunnel. Every command is printed before it runs.
//!
//! Run it with `scripts/demo`, which installs what it needs and builds the binaries first.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a demo that fails stops with the reason"
)]

use std::path::Path;
use std::process::{Command, Stdio};

use postern_tests::{Dovecot, Message, Running, bin, free_tcp_port, free_udp_port, wait_for_line};

fn say(text: &str) {
    println!("\n== {text}");
}

fn show(program: &Path, args: &[&str]) {
    let name = program.file_name().unwrap().to_string_lossy();
    println!("$ {name} {}", args.join(" "));
}

fn run(program: &Path, args: &[&str], home: &Path) {
    show(program, args);
    let output = Command::new(program)
        .args(args)
        .env("POSTERN_HOME", home)
        .output()
        .unwrap();
    print!("{}", String::from_utf8_lossy(&output.stdout));
    if !output.status.success() {
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        panic!("the command failed");
    }
}

fn main() {
    // Kept after the demo, so that the files and the audit trail can be looked at.
    let work = postern_tests::workspace().join("target/postern-demo");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let home = work.join("agent-home");
    let dir = work.join("broker");
    let config = dir.join("broker.toml");
    let (broker, postern) = (bin("postern-broker"), bin("postern"));

    say("A private mail server: Dovecot on 127.0.0.1, reachable only from this machine");
    let dovecot = Dovecot::start(&[("alice", "wonderland", Message::samples(5, 7))]);
    println!(
        "Dovecot serves IMAPS on {} with 5 messages for alice",
        dovecot.addr()
    );

    say("The administrator sets up a broker in front of it");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let service = format!("imap={}", dovecot.addr());
    run(
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
        ],
        &home,
    );

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

    say("The administrator issues an identity for alice's device");
    let bundle = work.join("alice.bundle");
    run(
        &broker,
        &[
            "issue",
            "--config",
            config.to_str().unwrap(),
            "--user",
            "alice@example.org",
            "--group",
            "staff",
            "--ttl",
            "8h",
            "--out",
            bundle.to_str().unwrap(),
        ],
        &home,
    );

    say("On alice's laptop: log in with the bundle, look, and bring the tunnel up");
    run(
        &postern,
        &["login", "--bundle", bundle.to_str().unwrap()],
        &home,
    );
    run(&postern, &["status"], &home);
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

    say("A mail client reads mail through the tunnel (TLS end to end with Dovecot)");
    let ca = dovecot.ca();
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

    say("Shut down (SIGTERM), then read the audit trail");
    assert!(up.terminate().success());
    assert!(serving.terminate().success());
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    for line in audit.lines() {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        println!(
            "{:>3} {:<17} {:<8} {} {}",
            event["event"]["sequence"],
            event["event"]["action"].as_str().unwrap_or_default(),
            event["event"]["outcome"].as_str().unwrap_or_default(),
            event["user"]["email"].as_str().unwrap_or("-"),
            event["postern"]["service"].as_str().unwrap_or(""),
        );
    }
    println!("(`postern-broker issue` is a process of its own and numbers its events itself.)");
    println!(
        "\nThe broker folder, the agent's home and the full trail ({}) are kept in {}.",
        dir.join("audit.jsonl").display(),
        work.display()
    );
    say("Demo complete: login -> tunnel -> reading mail");
}
