//! `postern-broker revoke` ends a revoked user's live sessions within 2 s and refuses their
//! certificates from then on; `unrevoke` and `revocations list` do what they say.

use std::time::Duration;

use postern_tests::{AgentHandle, Dovecot, Gateway, ImapIdle, Message, imap_fetch};

const PASSWORD: &str = "correct horse";

fn broker(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_postern-broker-under-test"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_user_loses_a_live_idle_session_within_two_seconds() {
    let dovecot = Dovecot::start(&[
        ("alice", PASSWORD, Message::samples(1, 7)),
        ("bob", PASSWORD, Message::samples(1, 8)),
    ]);
    let gateway = Gateway::start(&[("imap", dovecot.addr())]).await;
    let alice = gateway.issue("alice@example.org", &[], Duration::from_secs(3600));
    let bob = gateway.issue("bob@example.org", &[], Duration::from_secs(3600));
    let alice_agent = AgentHandle::start(&alice).await;
    let bob_agent = AgentHandle::start(&bob).await;
    let mut alice_session =
        ImapIdle::start(alice_agent.addr("imap"), &dovecot.ca(), "alice", PASSWORD).await;
    let mut bob_session =
        ImapIdle::start(bob_agent.addr("imap"), &dovecot.ca(), "bob", PASSWORD).await;

    let user = postern_certs::inspect_unverified(&alice.certificate)
        .unwrap()
        .identity
        .user;
    let config = gateway.config.path.to_str().unwrap().to_owned();
    let target = format!("{},{}", user.issuer(), user.subject());

    // Without a terminal to ask, confirmation must be given.
    let unconfirmed = broker(&["revoke", "--config", &config, "--user", &target]);
    assert_eq!(
        unconfirmed.status.code(),
        Some(64),
        "{}",
        text(&unconfirmed)
    );
    assert!(
        text(&unconfirmed).contains("--yes"),
        "{}",
        text(&unconfirmed)
    );

    let revoked = broker(&[
        "revoke",
        "--config",
        &config,
        "--user",
        &target,
        "--reason",
        "laptop stolen",
        "--yes",
    ]);
    assert!(revoked.status.success(), "{}", text(&revoked));
    assert!(
        text(&revoked).contains(&format!("Revoked user {}", user.uri())),
        "{}",
        text(&revoked)
    );

    let ended = alice_session.ended_within(Duration::from_secs(2)).await;
    assert!(
        ended.is_some(),
        "alice's IDLE session ended within 2 s of the revocation"
    );
    let denied = gateway.wait_for_audit("session.deny", |_| true).await;
    assert_eq!(denied["postern"]["end"], "revoked");
    assert!(
        denied["event"]["reason"]
            .as_str()
            .unwrap()
            .contains("laptop stolen"),
        "{denied}"
    );
    gateway
        .wait_for_audit("session.close", |e| e["event"]["reason"] == "revoked")
        .await;
    gateway
        .wait_for_audit("revocation.add", |e| e["user"]["id"] == user.uri())
        .await;
    // Bob is untouched; alice's certificate no longer opens anything.
    assert!(bob_session.is_open());
    assert!(
        imap_fetch(alice_agent.addr("imap"), &dovecot.ca(), "alice", PASSWORD)
            .await
            .is_err()
    );
    assert!(
        imap_fetch(bob_agent.addr("imap"), &dovecot.ca(), "bob", PASSWORD)
            .await
            .is_ok()
    );

    let listed = broker(&["revocations", "list", "--config", &config]);
    assert!(text(&listed).contains(&user.uri()), "{}", text(&listed));
    assert!(text(&listed).contains("laptop stolen"), "{}", text(&listed));

    // A certificate issued after the revocation works again. Certificate times are whole
    // seconds, and the second of the revocation counts as before it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = gateway.issue("alice@example.org", &[], Duration::from_secs(3600));
    let again_agent = AgentHandle::start(&again).await;
    assert!(
        imap_fetch(again_agent.addr("imap"), &dovecot.ca(), "alice", PASSWORD)
            .await
            .is_ok()
    );

    // Unrevoked: the first certificate works again too (after the broker takes the file in).
    let unrevoked = broker(&[
        "unrevoke",
        "--config",
        &config,
        "--user",
        &user.uri(),
        "--yes",
    ]);
    assert!(unrevoked.status.success(), "{}", text(&unrevoked));
    gateway
        .wait_for_audit("policy.reload", |e| e["postern"]["revocations"] == 0)
        .await;
    assert!(
        imap_fetch(alice_agent.addr("imap"), &dovecot.ca(), "alice", PASSWORD)
            .await
            .is_ok()
    );

    again_agent.stop().await;
    alice_agent.stop().await;
    bob_agent.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_by_email_shows_the_match_and_devices_stay_revoked() {
    let echo = postern_tests::echo_server().await;
    let gateway = Gateway::start(&[("echo", echo)]).await;
    let alice = gateway.issue("alice@example.org", &[], Duration::from_secs(3600));
    let agent = AgentHandle::start(&alice).await;
    let identity = postern_certs::inspect_unverified(&alice.certificate)
        .unwrap()
        .identity;
    let config = gateway.config.path.to_str().unwrap().to_owned();

    // Known from the audit trail (the issue event).
    let by_email = broker(&[
        "revoke",
        "--config",
        &config,
        "--email",
        "ALICE@example.org",
        "--yes",
    ]);
    assert!(by_email.status.success(), "{}", text(&by_email));
    assert!(
        text(&by_email).contains(&identity.user.uri()),
        "{}",
        text(&by_email)
    );
    assert!(
        text(&by_email).contains("audit trail"),
        "{}",
        text(&by_email)
    );

    let nobody = broker(&[
        "revoke",
        "--config",
        &config,
        "--email",
        "nobody@example.org",
        "--yes",
    ]);
    assert_eq!(nobody.status.code(), Some(64), "{}", text(&nobody));
    assert!(
        text(&nobody).contains("no user with email"),
        "{}",
        text(&nobody)
    );

    let device = identity.auth.device.to_string();
    let by_device = broker(&["revoke", "--config", &config, "--device", &device, "--yes"]);
    assert!(by_device.status.success(), "{}", text(&by_device));
    let unrevoke_user = broker(&[
        "unrevoke",
        "--config",
        &config,
        "--email",
        "alice@example.org",
        "--yes",
    ]);
    assert!(unrevoke_user.status.success(), "{}", text(&unrevoke_user));
    gateway
        .wait_for_audit("policy.reload", |e| e["postern"]["revocations"] == 1)
        .await;
    // The device is still revoked: the stream is refused and says why.
    let mut stream = tokio::net::TcpStream::connect(agent.addr("echo"))
        .await
        .unwrap();
    let mut rest = Vec::new();
    use tokio::io::AsyncReadExt as _;
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    let refused = gateway
        .wait_for_audit("connect.deny", |e| {
            e["event"]["reason"]
                .as_str()
                .unwrap_or("")
                .contains("device was revoked")
        })
        .await;
    assert_eq!(refused["postern"]["device"], device);

    let bad = broker(&[
        "revoke",
        "--config",
        &config,
        "--lineage",
        "not-hex",
        "--yes",
    ]);
    assert_eq!(bad.status.code(), Some(64), "{}", text(&bad));
    agent.stop().await;
    gateway.stop().await;
}
