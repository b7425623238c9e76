//! A certificate's end is the end of everything it opened, not only of new streams.

use std::time::{Duration, SystemTime};

use postern_tests::{AgentHandle, Gateway};
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
