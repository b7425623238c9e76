//! A certificate's end is the end of everything it opened, not only of new streams.

use std::time::{Duration, SystemTime};

use postern_tests::{AgentHandle, Dovecot, Gateway, ImapWire, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_session_ends_with_its_certificate() {
    let gateway = Gateway::start_with(
        &[("echo", postern_tests::echo_server().await)],
        None,
        |config| {
            *config = config.replace("# max_clock_skew = \"60s\"", "max_clock_skew = \"1s\"");
        },
    )
    .await;
    let issued = gateway.issue("alice@example.org", &[], Duration::from_secs(600));
    let now = SystemTime::now();
    let bundle = gateway.recertify(&issued, Duration::from_secs(4));
    let agent = AgentHandle::start(&bundle).await;

    let mut session = tokio::net::TcpStream::connect(agent.addr("echo"))
        .await
        .unwrap();
    session.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    session.read_exact(&mut back).await.unwrap();
    assert_eq!(
        &back, b"ping",
        "the session works while the certificate is valid"
    );

    // Valid until now + 4 s, with 1 s of tolerated skew: the session must be gone soon after.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(15), session.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "the session was cut when the certificate ended"
    );
    assert!(
        SystemTime::now() >= now + Duration::from_secs(4),
        "and not before"
    );
    gateway
        .wait_for_audit("session.close", |e| {
            e["event"]["reason"] == "certificate_expired"
        })
        .await;
    gateway
        .wait_for_audit("connection.close", |e| {
            e["event"]["reason"] == "certificate expired"
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_certificate_that_cannot_be_renewed_is_not_offered_to_the_broker() {
    let dovecot = Dovecot::start(&[("alice", "correct horse", Message::samples(1, 3))]);
    let ca = dovecot.ca().display().to_string();
    let gateway = Gateway::start_with(&[("imap", dovecot.addr())], None, |config| {
        *config = config
            .replace("# max_clock_skew = \"60s\"", "max_clock_skew = \"1s\"")
            .replace(
                "[services.imap]\n",
                &format!(
                    "[services.imap]\nprotocol = \"imap\"\nserver_name = \"localhost\"\nca_file = {ca:?}\n"
                ),
            );
    })
    .await;
    let issued = gateway.issue("alice@example.org", &[], Duration::from_secs(600));
    // An administrator's bundle: nothing to renew it with.
    let bundle = gateway.recertify(&issued, Duration::from_secs(3));
    let ends = bundle.inspect().unwrap().not_after;
    let agent = AgentHandle::start(&bundle).await;
    tokio::time::sleep(
        ends.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(2),
    )
    .await;

    // The mail program is told what happened and what to do, in IMAP terms.
    let (_wire, said) = ImapWire::connect(agent.addr("imap"), agent.local_ca()).await;
    assert!(said.starts_with("* BYE [UNAVAILABLE] "), "{said}");
    assert!(said.contains("certificate ended"), "{said}");
    assert!(said.contains("postern login"), "{said}");
    // Nor does the agent try the broker with it (a refused handshake is audited): it waits
    // for a renewal or a new login, and says so.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(gateway.audit_events("connection.deny").is_empty());
    assert_eq!(
        agent.tunnel_state(),
        postern_agent::tunnel::TunnelState::CertificateEnded(ends)
    );
    agent.stop().await;
    gateway.stop().await;
}
