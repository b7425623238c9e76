//! A connection that moves to a new network path (QUIC connection migration) keeps its
//! sessions, and the broker judges it by its new source address.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use postern_tests::{AgentHandle, Dovecot, Gateway, ImapIdle, Message};

/// An address on loopback other than 127.0.0.1, as the agent's socket (dual-stack) writes it.
const MOVED: &str = "[::ffff:127.0.0.2]:0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_goes_on_after_the_agent_moves_to_a_new_address() {
    let gateway = Gateway::start(&[("echo", postern_tests::echo_server().await)]).await;
    let agent =
        AgentHandle::start(&gateway.issue("alice@example.org", &[], Duration::from_secs(600)))
            .await;
    let mut session = tokio::net::TcpStream::connect(agent.addr("echo"))
        .await
        .unwrap();
    let mut back = [0u8; 6];
    session.write_all(b"before").await.unwrap();
    session.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"before");

    agent.move_to(MOVED.parse().unwrap());
    let moved = gateway.wait_for_audit("connection.migrate", |_| true).await;
    assert_eq!(moved["source"]["ip"], "127.0.0.2");
    assert_eq!(moved["postern"]["previous_source"]["ip"], "127.0.0.1");

    session.write_all(b"after!").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), session.read_exact(&mut back))
        .await
        .expect("the session answers after the move")
        .unwrap();
    assert_eq!(&back, b"after!");
    assert!(gateway.audit_events("session.deny").is_empty());
    // New sessions work from the new address too.
    let mut second = tokio::net::TcpStream::connect(agent.addr("echo"))
        .await
        .unwrap();
    second.write_all(b"second").await.unwrap();
    second.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"second");
    agent.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_out_of_an_allowed_network_ends_the_session_within_two_seconds() {
    let policy = format!(
        "{}\n@id(\"office-network\")\nforbid (principal, action == Action::\"connect\", resource)\nunless {{ context.source_ip.isInRange(ip(\"127.0.0.1/32\")) }};\n",
        postern_broker::init::DEFAULT_POLICY
    );
    let dovecot = Dovecot::start(&[("alice", "correct horse", Message::samples(1, 10))]);
    let gateway = Gateway::start_with(&[("imap", dovecot.addr())], Some(&policy), |_| {}).await;
    let agent =
        AgentHandle::start(&gateway.issue("alice@example.org", &[], Duration::from_secs(600)))
            .await;
    let mut session =
        ImapIdle::start(agent.addr("imap"), &dovecot.ca(), "alice", "correct horse").await;

    agent.move_to(MOVED.parse().unwrap());
    assert!(
        session.ended_within(Duration::from_secs(2)).await.is_some(),
        "the IDLE session ended within 2 s of the move"
    );
    let denied = gateway.wait_for_audit("session.deny", |_| true).await;
    assert_eq!(denied["postern"]["recheck"], "path");
    assert_eq!(
        denied["postern"]["policies"],
        serde_json::json!(["office-network"])
    );
    gateway
        .wait_for_audit("connection.migrate", |e| e["source"]["ip"] == "127.0.0.2")
        .await;
    agent.stop().await;
    gateway.stop().await;
}
