//! The administrator's and the user's commands, as the README gives them, end to end:
//! `postern-broker init`, `serve`, `issue`, `postern login --bundle`, `up`, then `curl` lists
//! the inbox through the tunnel.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use postern_tests::{
    Dovecot, Message, Running, curl, free_tcp_port, free_udp_port, run_ok as run, wait_for_line,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_works_as_written() {
    let dovecot = Dovecot::start(&[("alice", "wonderland", Message::samples(4, 3))]);
    let work = tempfile::tempdir().unwrap();
    let broker = Path::new(env!("CARGO_BIN_EXE_postern-broker-under-test"));
    let postern = Path::new(env!("CARGO_BIN_EXE_postern-under-test"));
    let home = work.path().join("home");
    let dir = work.path().join("gw");
    let config = dir.join("broker.toml");
    let (config_s, dir_s) = (config.to_str().unwrap(), dir.to_str().unwrap());

    let listen = format!("127.0.0.1:{}", free_udp_port());
    let service = format!("imap={}", dovecot.addr());
    let printed = run(
        broker,
        &[
            "init",
            "--dir",
            dir_s,
            "--hostname",
            "localhost",
            "--listen",
            &listen,
            "--service",
            &service,
        ],
        &home,
    );
    assert!(
        printed.contains(&format!("postern-broker serve --config {config_s}")),
        "{printed}"
    );

    let mut serving = Command::new(broker)
        .args(["serve", "--config", config_s])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = serving.stderr.take().unwrap();
    let serving = Running(serving);
    let log = tokio::task::spawn_blocking(move || wait_for_line(log, "broker serving"));
    tokio::time::timeout(Duration::from_secs(30), log)
        .await
        .unwrap()
        .unwrap();

    let bundle = work.path().join("alice.bundle");
    let printed = run(
        broker,
        &[
            "issue",
            "--config",
            config_s,
            "--user",
            "alice@example.org",
            "--out",
            bundle.to_str().unwrap(),
        ],
        &home,
    );
    assert!(printed.contains("postern login --bundle"), "{printed}");
    let printed = run(
        postern,
        &["login", "--bundle", bundle.to_str().unwrap()],
        &home,
    );
    assert!(
        printed.contains("Logged in as alice@example.org"),
        "{printed}"
    );
    let printed = run(postern, &["status"], &home);
    assert!(
        printed.contains("alice@example.org")
            && printed.contains(&listen.replace("127.0.0.1", "localhost")),
        "{printed}"
    );

    // A keep-alive interval that would not keep the tunnel is refused, saying what works.
    let refused = Command::new(postern)
        .args(["up", "--keep-alive", "90s"])
        .env("POSTERN_HOME", &home)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("choose between 1s and 30s"), "{said}");

    let local = format!("127.0.0.1:{}", free_tcp_port());
    let mut up = Command::new(postern)
        .args([
            "up",
            "--keep-alive",
            "20s",
            "--listen",
            &format!("imap={local}"),
        ])
        .env("POSTERN_HOME", &home)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = up.stdout.take().unwrap();
    let up = Running(up);
    let announced = tokio::task::spawn_blocking(move || wait_for_line(stdout, "postern: imap on"))
        .await
        .unwrap();
    assert!(announced.contains(&local), "{announced}");

    let ca = dovecot.ca();
    let listed = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        &format!("imaps://{local}/INBOX"),
        "--user",
        "alice:wonderland",
    ])
    .await;
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("INBOX"),
        "{listed:?}"
    );
    let searched = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        &format!("imaps://{local}/INBOX"),
        "-X",
        "UID SEARCH ALL",
        "--user",
        "alice:wonderland",
    ])
    .await;
    assert_eq!(
        String::from_utf8_lossy(&searched.stdout).trim(),
        "* SEARCH 1 2 3 4"
    );
    // `status` shows what the running agent's tunnel is doing.
    let printed = run(postern, &["status"], &home);
    assert!(printed.contains("Tunnel:       connected to "), "{printed}");

    assert!(
        up.terminate().success(),
        "the agent stops cleanly on SIGTERM"
    );
    let printed = run(postern, &["status"], &home);
    assert!(printed.contains("Tunnel:       not running"), "{printed}");
    assert!(
        serving.terminate().success(),
        "the broker stops cleanly on SIGTERM"
    );
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    let actions: Vec<String> = audit
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]["action"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for expected in [
        "broker.start",
        "cert.issue",
        "connection.open",
        "connect.allow",
        "session.close",
        "broker.stop",
    ] {
        assert!(
            actions.iter().any(|a| a == expected),
            "{expected} in {actions:?}"
        );
    }
}
