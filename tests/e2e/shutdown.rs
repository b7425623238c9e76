//! On shutdown the broker takes nothing new, lets open sessions finish within the grace
//! period, and cuts what is left after it.

use std::time::{Duration, Instant};

use postern_tests::{AgentHandle, Gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn echo_round(stream: &mut TcpStream, text: &[u8]) {
    stream.write_all(text).await.unwrap();
    let mut back = vec![0; text.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, text);
}

async fn gateway(grace: &str) -> Gateway {
    let grace = grace.to_owned();
    Gateway::start_with(
        &[("echo", postern_tests::echo_server().await)],
        None,
        move |config| {
            *config = config.replace(
                "# shutdown_grace = \"30s\"",
                &format!("shutdown_grace = \"{grace}\""),
            );
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_sessions_finish_and_new_ones_are_refused() {
    let mut gateway = gateway("20s").await;
    let agent =
        AgentHandle::start(&gateway.issue("alice@example.org", &[], Duration::from_secs(600)))
            .await;
    let mut session = TcpStream::connect(agent.addr("echo")).await.unwrap();
    echo_round(&mut session, b"before").await;

    gateway.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    echo_round(&mut session, b"during the grace period").await;
    // A new session is not served by the draining broker: the agent, told to move, waits for
    // a fresh connection, which the draining broker refuses (tests/e2e/reconnect.rs).
    assert!(
        agent.left_its_connection(Duration::from_secs(10)).await,
        "the agent was told to move"
    );
    let mut late = TcpStream::connect(agent.addr("echo")).await.unwrap();
    late.write_all(b"late").await.unwrap();
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_secs(1), late.read(&mut byte))
            .await
            .is_err(),
        "a program that came during the drain was answered by the draining broker"
    );
    assert_eq!(gateway.audit_events("connect.allow").len(), 1);
    drop(late);

    let started = Instant::now();
    session.shutdown().await.unwrap();
    let mut rest = Vec::new();
    session.read_to_end(&mut rest).await.unwrap();
    gateway.join().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the broker stopped once the session ended, not at the end of the grace period"
    );
    let stop = gateway.audit_events("broker.stop");
    assert_eq!(stop.len(), 1);
    assert_eq!(stop[0]["postern"]["sessions_cut"], 0);
    let closed = gateway.audit_events("session.close");
    assert!(
        closed.iter().any(|e| e["event"]["reason"] == "closed"),
        "{closed:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_left_after_the_grace_period_are_cut() {
    let mut gateway = gateway("1s").await;
    let agent =
        AgentHandle::start(&gateway.issue("alice@example.org", &[], Duration::from_secs(600)))
            .await;
    let mut session = TcpStream::connect(agent.addr("echo")).await.unwrap();
    echo_round(&mut session, b"idle from here on").await;

    let started = Instant::now();
    gateway.begin_shutdown();
    gateway.join().await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the grace period was given"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let mut rest = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(5), session.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(
        outcome.is_err() || rest.is_empty(),
        "the cut session ends: {outcome:?}"
    );
    let stop = gateway.audit_events("broker.stop");
    assert_eq!(stop[0]["postern"]["sessions_cut"], 1);
    assert!(
        gateway
            .audit_events("session.close")
            .iter()
            .any(|e| e["event"]["reason"] == "shutdown")
    );
}
