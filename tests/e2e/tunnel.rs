//! Mail read through the tunnel is the mail on the server, byte for byte.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use postern_tests::{AgentHandle, Dovecot, Gateway, Message, imap_fetch};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaplib_reads_the_same_bytes_through_the_tunnel() {
    let messages = Message::samples(12, 1);
    let dovecot = Dovecot::start(&[("alice", "correct horse", messages.clone())]);
    let gateway = Gateway::start(&[("imap", dovecot.addr())]).await;
    let identity = gateway.issue("alice@example.org", &["staff"], Duration::from_secs(3600));
    let agent = AgentHandle::start(&identity).await;

    let direct = imap_fetch(dovecot.addr(), &dovecot.ca(), "alice", "correct horse")
        .await
        .unwrap();
    let tunnelled = imap_fetch(agent.addr("imap"), &dovecot.ca(), "alice", "correct horse")
        .await
        .unwrap();

    assert_eq!(
        direct["messages"].as_array().unwrap().len(),
        messages.len(),
        "the fixture was seeded"
    );
    assert_eq!(tunnelled, direct);

    let closed = gateway
        .wait_for_audit("session.close", |e| e["event"]["reason"] == "closed")
        .await;
    assert_eq!(closed["user"]["email"], "alice@example.org");
    assert!(
        closed["destination"]["bytes"].as_u64().unwrap() > 1_000_000,
        "{closed}"
    );
    agent.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_lists_and_fetches_through_the_tunnel() {
    let dovecot = Dovecot::start(&[("alice", "s3cret", Message::samples(3, 2))]);
    let gateway = Gateway::start(&[("imap", dovecot.addr())]).await;
    let agent =
        AgentHandle::start(&gateway.issue("alice@example.org", &[], Duration::from_secs(600)))
            .await;
    let ca = dovecot.ca();
    let ca = ca.to_str().unwrap();
    let url = |addr: std::net::SocketAddr, path: &str| format!("imaps://{addr}/{path}");

    let listed = postern_tests::curl(&[
        "--cacert",
        ca,
        &url(agent.addr("imap"), "INBOX"),
        "--user",
        "alice:s3cret",
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

    let through = postern_tests::curl(&[
        "--cacert",
        ca,
        &url(agent.addr("imap"), "INBOX;UID=2"),
        "--user",
        "alice:s3cret",
    ])
    .await;
    let direct = postern_tests::curl(&[
        "--cacert",
        ca,
        &url(dovecot.addr(), "INBOX;UID=2"),
        "--user",
        "alice:s3cret",
    ])
    .await;
    assert!(
        direct.status.success() && direct.stdout.len() > 1000,
        "{direct:?}"
    );
    assert_eq!(through.stdout, direct.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_keep_their_bytes() {
    const CONNECTIONS: usize = 200;
    // One user with more sessions at once than the default limit allows.
    let gateway = Gateway::start_with(
        &[("echo", postern_tests::echo_server().await)],
        None,
        |config| {
            *config = config.replace(
                "# max_sessions_per_user = 64",
                "max_sessions_per_user = 256",
            );
        },
    )
    .await;
    let agent =
        AgentHandle::start(&gateway.issue("load@example.org", &[], Duration::from_secs(600))).await;
    let addr = agent.addr("echo");

    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..CONNECTIONS {
        tasks.spawn(async move {
            let sent = postern_tests::random_bytes(16 * 1024 + index * 7919 % (256 * 1024));
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut read, mut write) = stream.into_split();
            let data = sent.clone();
            let writer = tokio::spawn(async move {
                write.write_all(&data).await.unwrap();
                write.shutdown().await.unwrap();
            });
            let mut received = Vec::new();
            read.read_to_end(&mut received).await.unwrap();
            writer.await.unwrap();
            assert_eq!(
                postern_tests::sha256_hex(&received),
                postern_tests::sha256_hex(&sent),
                "connection {index}"
            );
            sent.len() as u64
        });
    }
    let mut total = 0;
    while let Some(result) = tasks.join_next().await {
        total += result.unwrap();
    }

    for _ in 0..200 {
        if gateway.audit_events("session.close").len() == CONNECTIONS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let closed = gateway.audit_events("session.close");
    assert_eq!(closed.len(), CONNECTIONS);
    assert!(closed.iter().all(|e| e["event"]["reason"] == "closed"));
    let audited: u64 = closed
        .iter()
        .map(|e| e["source"]["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(audited, total, "the audit trail counts every byte");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_at_the_service_is_reset_for_the_program_not_closed() {
    // A service that sends part of an answer and then aborts its connection (RST).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(b"part of an answer").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = stream.set_zero_linger();
        }
    });
    let gateway = Gateway::start(&[("cut", service)]).await;
    let agent =
        AgentHandle::start(&gateway.issue("alice@example.org", &[], Duration::from_secs(600)))
            .await;

    let mut program = tokio::net::TcpStream::connect(agent.addr("cut"))
        .await
        .unwrap();
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), program.read_to_end(&mut received))
        .await
        .expect("the program hears of the cut");
    // A clean end would pass the cut-off answer as a complete one.
    match read {
        Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}"),
        Ok(_) => panic!(
            "the program saw a clean end after {:?}",
            String::from_utf8_lossy(&received)
        ),
    }
    assert_eq!(
        received, b"part of an answer",
        "what came before the cut arrived"
    );
    gateway.stop().await;
}
