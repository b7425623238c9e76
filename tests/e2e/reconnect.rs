//! When the broker restarts, the agent is back by itself within 2 s, and a program that connects
//! meanwhile waits for it instead of failing; a draining broker tells the agent to move.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use postern_tests::{AgentHandle, Gateway};

async fn echo_once(agent: &AgentHandle, text: &[u8]) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(agent.addr("echo"))
        .await
        .unwrap();
    stream.write_all(text).await.unwrap();
    let mut back = vec![0u8; text.len()];
    tokio::time::timeout(Duration::from_secs(20), stream.read_exact(&mut back))
        .await
        .expect("an answer")
        .unwrap();
    back
}

/// A program that connects to the agent's `echo` now, sends `text` and waits up to `limit` for
/// it to come back: the echoed bytes, or the timeout.
fn program(
    agent: &AgentHandle,
    text: &'static [u8],
    limit: Duration,
) -> tokio::task::JoinHandle<Result<std::io::Result<Vec<u8>>, tokio::time::error::Elapsed>> {
    let addr = agent.addr("echo");
    tokio::spawn(async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(text).await.unwrap();
        let mut back = vec![0u8; text.len()];
        tokio::time::timeout(limit, stream.read_exact(&mut back))
            .await
            .map(|read| read.map(|_| back))
    })
}

/// Sends `text` on `session` and reads it back.
async fn echo_on(session: &mut tokio::net::TcpStream, text: &[u8]) -> Vec<u8> {
    session.write_all(text).await.unwrap();
    let mut back = vec![0u8; text.len()];
    session.read_exact(&mut back).await.unwrap();
    back
}

/// A broker draining for `grace` on shutdown, an agent, and a session open through them.
async fn draining(grace: &str) -> (Gateway, AgentHandle, tokio::net::TcpStream) {
    let line = format!("shutdown_grace = \"{grace}\"");
    let gateway = Gateway::start_with(
        &[("echo", postern_tests::echo_server().await)],
        None,
        |config| *config = config.replace("# shutdown_grace = \"30s\"", &line),
    )
    .await;
    let agent =
        AgentHandle::start(&gateway.issue("alice@example.org", &[], Duration::from_secs(600)))
            .await;
    let mut open = tokio::net::TcpStream::connect(agent.addr("echo"))
        .await
        .unwrap();
    assert_eq!(echo_on(&mut open, b"first").await, b"first");
    (gateway, agent, open)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_the_agent_is_back_within_two_seconds() {
    let mut gateway = Gateway::start(&[("echo", postern_tests::echo_server().await)]).await;
    let agent =
        AgentHandle::start(&gateway.issue("alice@example.org", &[], Duration::from_secs(600)))
            .await;
    // The agent connects before any program asks.
    assert!(
        gateway
            .wait_for_count("connection.open", 1, Duration::from_secs(10))
            .await
    );
    assert_eq!(echo_once(&agent, b"one").await, b"one");

    gateway.pause().await;
    gateway.resume();
    assert!(
        gateway
            .wait_for_count("connection.open", 2, Duration::from_secs(2))
            .await,
        "reconnected within 2 s of the restart, with no program asking"
    );
    assert_eq!(echo_once(&agent, b"two").await, b"two");
    agent.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_connects_while_the_broker_is_down_waits_for_it() {
    let mut gateway = Gateway::start(&[("echo", postern_tests::echo_server().await)]).await;
    let agent =
        AgentHandle::start(&gateway.issue("alice@example.org", &[], Duration::from_secs(600)))
            .await;
    assert!(
        gateway
            .wait_for_count("connection.open", 1, Duration::from_secs(10))
            .await
    );

    gateway.pause().await;
    let waiting = program(&agent, b"patient", Duration::from_secs(20));
    tokio::time::sleep(Duration::from_secs(2)).await;
    gateway.resume();
    let answered = waiting.await.unwrap();
    assert_eq!(
        answered.expect("answered in time").expect("read"),
        b"patient",
        "the program waited for the broker and was served"
    );
    agent.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_broker_finishes_open_sessions_and_new_ones_wait_for_its_return() {
    let (mut gateway, agent, mut open) = draining("20s").await;

    // An upgrade begins: the broker drains and tells the agent to move.
    gateway.begin_shutdown();
    assert!(
        agent.left_its_connection(Duration::from_secs(10)).await,
        "the agent moved off the draining broker's connection"
    );
    let waiting = program(&agent, b"later", Duration::from_secs(20));
    // The session open before the drain still works.
    assert_eq!(echo_on(&mut open, b"again").await, b"again");
    drop(open);
    gateway.join().await;
    gateway.resume();
    let answered = waiting.await.unwrap();
    assert_eq!(
        answered.expect("answered in time").expect("read"),
        b"later",
        "the program that came during the drain was served by the restarted broker"
    );
    // Told to move when the drain began, the agent never asked the draining broker for the
    // new session.
    let refused: Vec<_> = gateway
        .audit_events("connect.deny")
        .into_iter()
        .filter(|e| e["postern"]["refuse_code"] == "shutting_down")
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
    agent.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_waits_through_a_drain_longer_than_the_usual_wait() {
    let (mut gateway, agent, mut open) = draining("25s").await;

    gateway.begin_shutdown();
    assert!(agent.left_its_connection(Duration::from_secs(10)).await);
    let waiting = program(&agent, b"later", Duration::from_secs(60));
    // The open session holds the drain for longer than a program usually waits (15 s).
    tokio::time::sleep(Duration::from_secs(18)).await;
    assert_eq!(echo_on(&mut open, b"still").await, b"still");
    drop(open);
    gateway.join().await;
    gateway.resume();
    assert_eq!(
        waiting
            .await
            .unwrap()
            .expect("answered in time")
            .expect("read"),
        b"later",
        "the program waited for the drain to end and was served by the restarted broker"
    );
    agent.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_certificate_is_refused_does_not_hammer_the_broker() {
    let gateway = Gateway::start(&[("echo", postern_tests::echo_server().await)]).await;
    let issued = gateway.issue("alice@example.org", &[], Duration::from_secs(600));
    // The same identity, signed by a CA this broker does not trust.
    let identity = postern_certs::inspect_unverified(&issued.certificate)
        .unwrap()
        .identity;
    let request = postern_certs::KeyRequest::generate().unwrap();
    let key = postern_certs::PublicKey::from_csr_pem(request.csr_pem.as_bytes()).unwrap();
    let foreign = postern_certs::testdata::other_ca()
        .issue(
            &identity,
            &key,
            std::time::SystemTime::now(),
            Duration::from_secs(600),
        )
        .unwrap();
    let agent = AgentHandle::start(&Gateway::rebundle(&issued, foreign, request.key_pem)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // TLS 1.3 tells the client of the refusal only after its side of the handshake: the agent
    // must not take that for a working connection and try again five times a second.
    let refused = gateway.audit_events("connection.deny").len();
    assert!(
        (1..=3).contains(&refused),
        "{refused} refused handshakes in 4 s"
    );
    agent.stop().await;
    gateway.stop().await;
}
