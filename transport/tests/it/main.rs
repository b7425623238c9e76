//! The relay and frame I/O over a real QUIC connection on loopback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use postern_certs::testdata;
use postern_proto::{Answer, Open, Refusal, RefuseCode, ResetCode, ServiceName};
use postern_transport::{FrameError, RelayEnd, Tuning, read_frame, relay, reset_code, write_frame};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const TUNING: Tuning = Tuning {
    idle_timeout: Duration::from_secs(30),
    keep_alive: None,
    max_concurrent_streams: 16,
    control_streams: 0,
};

/// A connected QUIC pair on loopback: (client side, server side).
async fn quic_pair() -> (quinn::Connection, quinn::Connection) {
    let (server_tls, client_tls) =
        testdata::tunnel_tls(SystemTime::now(), Duration::from_secs(600));
    let mut server_config =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls).unwrap()));
    server_config.transport_config(TUNING.transport_config());
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let server_addr = server.local_addr().unwrap();

    let mut client_config =
        quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls).unwrap()));
    client_config.transport_config(TUNING.transport_config());
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_config);

    let accept = tokio::spawn(async move { server.accept().await.unwrap().await.unwrap() });
    let client_conn = client
        .connect(server_addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    (client_conn, accept.await.unwrap())
}

async fn tcp_pair() -> (TcpStream, TcpStream, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (connected.unwrap(), accepted.unwrap().0, addr)
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

#[tokio::test]
async fn frames_cross_a_stream_and_leave_the_rest() {
    let (client, server) = quic_pair().await;
    let (mut send, mut recv) = client.open_bi().await.unwrap();
    let open = Open {
        service: ServiceName::new("imap").unwrap(),
    };
    write_frame(&mut send, &open).await.unwrap();
    send.write_all(b"payload").await.unwrap();
    send.finish().unwrap();

    let (mut server_send, mut server_recv) = server.accept_bi().await.unwrap();
    assert_eq!(read_frame::<Open>(&mut server_recv).await.unwrap(), open);
    assert_eq!(
        server_recv.read_to_end(100).await.unwrap(),
        b"payload",
        "no byte after the frame was consumed"
    );
    let refusal = Answer::Refused(Refusal::new(RefuseCode::UnknownService, "no such service"));
    write_frame(&mut server_send, &refusal).await.unwrap();
    server_send.finish().unwrap();
    assert_eq!(read_frame::<Answer>(&mut recv).await.unwrap(), refusal);
}

#[tokio::test]
async fn truncated_and_oversized_frames_are_errors() {
    let (client, server) = quic_pair().await;
    let (mut send, _recv) = client.open_bi().await.unwrap();
    send.write_all(&[1, 0, 4, b'i']).await.unwrap();
    send.finish().unwrap();
    let (_s, mut recv) = server.accept_bi().await.unwrap();
    assert!(matches!(
        read_frame::<Open>(&mut recv).await,
        Err(FrameError::Read(_))
    ));

    let (mut send, _recv) = client.open_bi().await.unwrap();
    send.write_all(&[1, 0xff, 0xff]).await.unwrap();
    let (_s, mut recv) = server.accept_bi().await.unwrap();
    assert!(matches!(
        read_frame::<Open>(&mut recv).await,
        Err(FrameError::Decode(_))
    ));
}

#[tokio::test]
async fn relays_both_ways_with_half_close() {
    let (client, server) = quic_pair().await;
    let (mut upstream, upstream_peer, _) = tcp_pair().await;

    // Upstream: read everything, then answer with its digest and a tail, then close.
    let upstream_task = tokio::spawn(async move {
        let mut received = Vec::new();
        upstream.read_to_end(&mut received).await.unwrap();
        upstream.write_all(&sha256(&received)).await.unwrap();
        upstream.write_all(&vec![7u8; 300_000]).await.unwrap();
        received.len()
    });
    let relay_task = tokio::spawn(async move {
        let (send, recv) = server.accept_bi().await.unwrap();
        let relayed = relay(send, recv, upstream_peer, &CancellationToken::new()).await;
        (relayed, server)
    });

    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (mut send, mut recv) = client.open_bi().await.unwrap();
    send.write_all(&data).await.unwrap();
    send.finish().unwrap();
    let answer = recv.read_to_end(1 << 20).await.unwrap();

    assert_eq!(upstream_task.await.unwrap(), data.len());
    assert_eq!(&answer[..32], &sha256(&data)[..]);
    assert_eq!(answer.len(), 32 + 300_000);
    let relayed = relay_task.await.unwrap().0;
    assert_eq!(
        relayed,
        postern_transport::Relayed {
            from_quic: 1_000_000,
            to_quic: 300_032,
            end: RelayEnd::Closed
        }
    );
}

#[tokio::test]
async fn a_failed_tcp_side_resets_the_stream() {
    let (client, server) = quic_pair().await;
    let (upstream, upstream_peer, _) = tcp_pair().await;
    let relay_task = tokio::spawn(async move {
        let (send, recv) = server.accept_bi().await.unwrap();
        let relayed = relay(send, recv, upstream_peer, &CancellationToken::new()).await;
        (relayed, server)
    });
    let (mut send, mut recv) = client.open_bi().await.unwrap();
    send.write_all(b"hello").await.unwrap();
    // Upstream aborts.
    socket2::SockRef::from(&upstream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(upstream);

    let read = recv.read_to_end(1024).await;
    assert!(
        matches!(read, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) if code == reset_code(ResetCode::PeerReset)),
        "{read:?}"
    );
    assert!(matches!(
        relay_task.await.unwrap().0.end,
        RelayEnd::TcpFailed(_)
    ));
}

#[tokio::test]
async fn a_reset_stream_aborts_the_tcp_side() {
    let (client, server) = quic_pair().await;
    let (mut upstream, upstream_peer, _) = tcp_pair().await;
    let relay_task = tokio::spawn(async move {
        let (send, recv) = server.accept_bi().await.unwrap();
        let relayed = relay(send, recv, upstream_peer, &CancellationToken::new()).await;
        (relayed, server)
    });
    let (mut send, _recv) = client.open_bi().await.unwrap();
    send.write_all(b"partial").await.unwrap();
    let mut got = [0u8; 7];
    upstream.read_exact(&mut got).await.unwrap();
    send.reset(reset_code(ResetCode::PeerReset)).unwrap();

    let mut rest = Vec::new();
    let err = upstream.read_to_end(&mut rest).await.unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "a cut stream is never a clean end"
    );
    assert_eq!(relay_task.await.unwrap().0.end, RelayEnd::QuicReset(1));
}

#[tokio::test]
async fn cancellation_ends_the_relay() {
    let (client, server) = quic_pair().await;
    let (_upstream, upstream_peer, _) = tcp_pair().await;
    let cancel = CancellationToken::new();
    let relay_cancel = cancel.clone();
    let relay_task = tokio::spawn(async move {
        let (send, recv) = server.accept_bi().await.unwrap();
        relay(send, recv, upstream_peer, &relay_cancel).await
    });
    let (mut send, mut recv) = client.open_bi().await.unwrap();
    send.write_all(b"x").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    cancel.cancel();
    assert_eq!(relay_task.await.unwrap().end, RelayEnd::Cancelled);
    assert!(recv.read_to_end(10).await.is_err());
}
