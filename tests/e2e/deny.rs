//! Certificates the broker did not issue, or not for now, get nothing; neither do names it
//! does not serve or people policy does not allow.

use std::time::{Duration, SystemTime};

use postern_agent::tunnel::{Tunnel, TunnelError};
use postern_certs::{Bundle, ClientCa, KeyRequest, PublicKey, inspect_unverified};
use postern_proto::{CloseCode, RefuseCode, ServiceName};
use postern_tests::Gateway;

const HOUR: Duration = Duration::from_secs(3600);

/// Tries to open `service` with `identity`, as the agent does.
async fn open(identity: &Bundle, service: &str) -> Result<(), TunnelError> {
    let tunnel = Tunnel::new(identity, identity.credential().unwrap()).unwrap();
    tunnel
        .open(&ServiceName::new(service).unwrap())
        .await
        .map(|_| ())
}

/// `bundle`'s identity certified by `ca` for a fresh key, valid from `not_before` for `lifetime`.
fn reissue(bundle: &Bundle, ca: &ClientCa, not_before: SystemTime, lifetime: Duration) -> Bundle {
    let identity = inspect_unverified(&bundle.certificate).unwrap().identity;
    let request = KeyRequest::generate().unwrap();
    let key = PublicKey::from_csr_pem(request.csr_pem.as_bytes()).unwrap();
    let certificate = ca.issue(&identity, &key, not_before, lifetime).unwrap();
    Gateway::rebundle(bundle, certificate, request.key_pem)
}

/// Asserts that `identity` is turned away during the handshake, with a reason in the audit
/// trail and a sentence for the user.
async fn refused_at_handshake(gateway: &Gateway, identity: &Bundle, reason: &str) {
    let err = open(identity, "echo").await.unwrap_err();
    assert!(
        err.to_string().contains("certificate"),
        "the user is told why: {err}"
    );
    let denied = gateway
        .wait_for_audit("connection.deny", |e| {
            e["event"]["reason"].as_str().unwrap().contains(reason)
        })
        .await;
    assert_eq!(denied["event"]["outcome"], "failure");
    assert!(
        gateway.audit_events("connection.open").is_empty(),
        "no connection was accepted"
    );
    assert!(
        gateway.audit_events("connect.allow").is_empty(),
        "no stream was allowed"
    );
}

async fn gateway() -> (Gateway, Bundle) {
    let gateway = Gateway::start(&[("echo", postern_tests::echo_server().await)]).await;
    let bundle = gateway.issue("alice@example.org", &["staff"], HOUR);
    (gateway, bundle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let (gateway, bundle) = gateway().await;
    let (stranger, _) =
        ClientCa::generate("elsewhere", SystemTime::now() - HOUR, 10 * HOUR).unwrap();
    let foreign = reissue(&bundle, &stranger, SystemTime::now(), HOUR);
    refused_at_handshake(&gateway, &foreign, "UnknownIssuer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_with_the_same_name_but_another_key_is_refused_at_the_handshake() {
    let (gateway, bundle) = gateway().await;
    let (impostor, _) =
        ClientCa::generate("localhost", SystemTime::now() - HOUR, 10 * HOUR).unwrap();
    let forged = reissue(&bundle, &impostor, SystemTime::now(), HOUR);
    refused_at_handshake(&gateway, &forged, "BadSignature").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_at_the_handshake() {
    let (gateway, bundle) = gateway().await;
    let expired = reissue(
        &bundle,
        &gateway.client_ca(),
        SystemTime::now() - 2 * HOUR,
        HOUR,
    );
    refused_at_handshake(&gateway, &expired, "certificate expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_identity_is_refused_at_the_handshake() {
    let (gateway, bundle) = gateway().await;
    let mut der = bundle.certificate.to_vec();
    let at = der
        .windows(5)
        .position(|w| w == b"alice")
        .expect("the user id is in the certificate");
    der[at] = b'm'; // mallce@example.org
    let tampered = Bundle {
        certificate: der.into(),
        ..bundle.clone()
    };
    refused_at_handshake(&gateway, &tampered, "BadSignature").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_certificate_no_stream() {
    let (gateway, _) = gateway().await;
    let connection = gateway
        .raw_connect(None)
        .await
        .expect("the handshake itself needs no certificate");
    let attempt = async {
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&postern_proto::Frame::encode(&postern_proto::Open {
            service: ServiceName::new("echo")?,
        }))
        .await?;
        Ok::<_, anyhow::Error>(recv.read_to_end(1024).await?)
    };
    assert!(
        attempt.await.is_err(),
        "no stream may open without a certificate"
    );
    match connection.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                CloseCode::from_u64(close.error_code.into_inner()),
                CloseCode::IdentityRequired
            );
        }
        other => panic!("closed for another reason: {other}"),
    }
    gateway
        .wait_for_audit("connection.deny", |e| {
            e["event"]["reason"]
                .as_str()
                .unwrap()
                .contains("requires a client certificate")
        })
        .await;
    assert!(gateway.audit_events("connect.allow").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_service_is_refused_with_a_reason() {
    let (gateway, bundle) = gateway().await;
    match open(&bundle, "pop3").await {
        Err(TunnelError::Refused(refusal)) => {
            assert_eq!(refusal.code(), RefuseCode::UnknownService);
            assert!(
                refusal.reason().contains("no service `pop3`") && refusal.reason().contains("echo"),
                "{refusal}"
            );
        }
        other => panic!("{other:?}"),
    }
    let denied = gateway.wait_for_audit("connect.deny", |_| true).await;
    assert_eq!(denied["postern"]["refuse_code"], "unknown_service");
    assert_eq!(denied["postern"]["service"], "pop3");
    assert_eq!(denied["user"]["email"], "alice@example.org");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_decides_and_is_named_in_the_audit() {
    let policy = r#"@id("staff-only") permit (principal in Group::"staff", action == Action::"connect", resource == Service::"echo");"#;
    let gateway = Gateway::start_with(
        &[("echo", postern_tests::echo_server().await)],
        Some(policy),
        |_| {},
    )
    .await;
    let staff = gateway.issue("alice@example.org", &["staff"], HOUR);
    let guest = gateway.issue("guest@example.org", &[], HOUR);

    open(&staff, "echo").await.unwrap();
    match open(&guest, "echo").await {
        Err(TunnelError::Refused(refusal)) => {
            assert_eq!(refusal.code(), RefuseCode::NotPermitted);
            assert!(refusal.reason().contains("guest@example.org"), "{refusal}");
        }
        other => panic!("{other:?}"),
    }
    let allowed = gateway.wait_for_audit("connect.allow", |_| true).await;
    assert_eq!(
        allowed["postern"]["policies"],
        serde_json::json!(["staff-only"])
    );
    assert_eq!(allowed["user"]["email"], "alice@example.org");
    let denied = gateway.wait_for_audit("connect.deny", |_| true).await;
    assert_eq!(denied["user"]["email"], "guest@example.org");
    assert_eq!(denied["postern"]["refuse_code"], "not_permitted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_is_down_gives_a_clean_refusal() {
    let mut dovecot = postern_tests::Dovecot::start(&[("alice", "pw", vec![])]);
    let gateway = Gateway::start(&[("imap", dovecot.addr())]).await;
    let bundle = gateway.issue("alice@example.org", &[], HOUR);
    let agent = postern_tests::AgentHandle::start(&bundle).await;
    assert!(
        postern_tests::imap_fetch(agent.addr("imap"), &dovecot.ca(), "alice", "pw")
            .await
            .is_ok(),
        "up first"
    );

    dovecot.stop();
    let tunnel = Tunnel::new(&bundle, bundle.credential().unwrap()).unwrap();
    match tunnel.open(&ServiceName::new("imap").unwrap()).await {
        Err(TunnelError::Refused(refusal)) => {
            assert_eq!(refusal.code(), RefuseCode::UpstreamUnavailable);
            assert!(
                refusal.reason().contains("cannot be reached")
                    && !refusal.reason().contains("127.0.0.1"),
                "no internal address leaks: {refusal}"
            );
        }
        other => panic!("{other:?}"),
    }
    // A mail client sees the connection closed, not hung.
    let client = tokio::time::timeout(
        Duration::from_secs(20),
        postern_tests::imap_fetch(agent.addr("imap"), &dovecot.ca(), "alice", "pw"),
    )
    .await;
    assert!(matches!(client, Ok(Err(_))), "{client:?}");
    let closed = gateway
        .wait_for_audit("session.close", |e| {
            e["event"]["reason"]
                .as_str()
                .unwrap()
                .starts_with("upstream_unavailable")
        })
        .await;
    assert_eq!(closed["source"]["bytes"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_gets_no_more_sessions_than_the_limit_across_devices() {
    let gateway = Gateway::start_with(
        &[("echo", postern_tests::echo_server().await)],
        None,
        |config| {
            *config = config.replace("# max_sessions_per_user = 64", "max_sessions_per_user = 2");
        },
    )
    .await;
    let laptop = gateway.issue("alice@example.org", &[], HOUR);
    let phone = gateway.issue("alice@example.org", &[], HOUR);
    let service = ServiceName::new("echo").unwrap();
    let on_laptop = Tunnel::new(&laptop, laptop.credential().unwrap()).unwrap();
    let on_phone = Tunnel::new(&phone, phone.credential().unwrap()).unwrap();
    let first = on_laptop.open(&service).await.unwrap();
    let second = on_phone.open(&service).await.unwrap();
    match on_laptop.open(&service).await {
        Err(TunnelError::Refused(refusal)) => {
            assert_eq!(refusal.code(), RefuseCode::Busy);
            assert!(
                refusal.reason().contains("max_sessions_per_user"),
                "{refusal}"
            );
        }
        other => panic!("{other:?}"),
    }
    let denied = gateway
        .wait_for_audit("connect.deny", |e| e["postern"]["refuse_code"] == "busy")
        .await;
    assert_eq!(denied["user"]["email"], "alice@example.org");
    // Another user is not counted against alice; a closed session frees its place.
    let bob = gateway.issue("bob@example.org", &[], HOUR);
    assert!(open(&bob, "echo").await.is_ok());
    drop(first);
    drop(second);
    let mut freed = false;
    for _ in 0..100 {
        if on_phone.open(&service).await.is_ok() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "a closed session frees its place");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_passes_while_the_audit_trail_cannot_be_written() {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    // A service that greets each connection and reports what the other side sent.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = listener.local_addr().unwrap();
    let (sent, mut received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(b"* OK greeting\r\n").await;
            let mut got = Vec::new();
            let _ = stream.read_to_end(&mut got).await;
            let _ = sent.send(got);
        }
    });
    // The trail is a pipe whose reader goes away once a certificate is on record, as when the
    // broker's standard output goes to a logger that died: writes fail from then on.
    let fifo = tempfile::tempdir().unwrap();
    let trail = fifo.path().join("audit.pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&trail)
        .status()
        .unwrap();
    assert!(made.success());
    // Opened before the broker, which then finds a reader and does not wait for one.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(&trail)
        .unwrap();
    let path = trail.display().to_string();
    let gateway = Gateway::start_with(&[("svc", service)], None, |config| {
        *config = config.replace("# path = \"audit.jsonl\"", &format!("path = \"{path}\""));
    })
    .await;
    let bundle = gateway.issue("alice@example.org", &[], HOUR);
    let mut written = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&written).contains("cert.issue")
        && std::time::Instant::now() < deadline
    {
        let mut chunk = [0u8; 4096];
        match reader.read(&mut chunk) {
            Ok(n) if n > 0 => written.extend_from_slice(&chunk[..n]),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let written = String::from_utf8_lossy(&written);
    assert!(
        written.contains("cert.issue"),
        "the trail worked until now: {written}"
    );
    drop(reader);

    match open(&bundle, "svc").await {
        Err(TunnelError::Refused(refusal)) => {
            assert_eq!(refusal.code(), RefuseCode::Internal, "{refusal}");
            assert!(refusal.reason().contains("audit trail"), "{refusal}");
        }
        other => panic!("a session without a record: {other:?}"),
    }
    // The service may have been reached meanwhile; if so, it was left without a byte.
    if let Ok(Some(got)) = tokio::time::timeout(Duration::from_secs(5), received.recv()).await {
        assert!(got.is_empty(), "bytes passed unaudited: {got:?}");
    }
    gateway.stop().await;
}
