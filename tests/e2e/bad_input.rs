//! Malformed streams get a reset and an audit line; the broker and the connection carry on.

use std::time::Duration;

use postern_proto::{Answer, Frame, Open, ResetCode, ServiceName};
use postern_tests::Gateway;

/// Sends `bytes` on a new stream and returns how the broker answered.
async fn send_raw(
    connection: &quinn::Connection,
    bytes: &[u8],
) -> Result<Vec<u8>, quinn::ReadToEndError> {
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    recv.read_to_end(4096).await
}

fn reset_for_protocol_violation(result: &Result<Vec<u8>, quinn::ReadToEndError>) -> bool {
    matches!(result, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)))
        if ResetCode::from_u64(code.into_inner()) == ResetCode::ProtocolViolation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_reset_and_audited() {
    let gateway = Gateway::start_with(
        &[("echo", postern_tests::echo_server().await)],
        None,
        |config| {
            *config = config.replace("# open_timeout = \"10s\"", "open_timeout = \"1s\"");
        },
    )
    .await;
    assert_eq!(
        gateway.config.limits.open_timeout,
        Duration::from_secs(1),
        "the edit took"
    );
    let bundle = gateway.issue("alice@example.org", &[], Duration::from_secs(600));
    let connection = gateway
        .raw_connect(Some(bundle.credential().unwrap()))
        .await
        .unwrap();

    let cases: [(&str, &[u8]); 5] = [
        ("unknown frame type", &[0x7f, 0, 1, b'x']),
        ("length over the limit", &[0x01, 0xff, 0xff]),
        ("invalid service name", b"\x01\x00\x04IMAP"),
        ("an answer frame from the agent", &[0x02, 0, 0]),
        ("a header that never completes", &[0x01]),
    ];
    for (name, bytes) in cases {
        let result = tokio::time::timeout(Duration::from_secs(10), send_raw(&connection, bytes))
            .await
            .unwrap();
        assert!(reset_for_protocol_violation(&result), "{name}: {result:?}");
    }
    for _ in 0..200 {
        if gateway.audit_events("connect.deny").len() == cases.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let denied = gateway.audit_events("connect.deny");
    assert_eq!(denied.len(), cases.len());
    assert!(
        denied
            .iter()
            .all(|e| e["postern"]["refuse_code"] == "protocol_violation"),
        "{denied:#?}"
    );
    assert!(denied.iter().any(|e| {
        e["event"]["reason"]
            .as_str()
            .unwrap()
            .contains("no service named within 1s")
    }));

    // The same connection still works.
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(
        &Open {
            service: ServiceName::new("echo").unwrap(),
        }
        .encode(),
    )
    .await
    .unwrap();
    send.write_all(b"still here").await.unwrap();
    send.finish().unwrap();
    let reply = recv.read_to_end(4096).await.unwrap();
    let (answer, used) = Answer::decode(&reply).unwrap().unwrap();
    assert_eq!(answer, Answer::Opened);
    assert_eq!(&reply[used..], b"still here");
}
