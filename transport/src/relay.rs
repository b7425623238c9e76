//! Copying bytes both ways between a QUIC stream and a TCP connection.
//!
//! Each direction ends on its own: a QUIC FIN becomes a TCP FIN (shutdown of the write half)
//! and a TCP FIN becomes a QUIC FIN, so half-closed protocols work. A failure on one side is
//! never passed on as a clean end: a reset QUIC stream resets the TCP connection (RST), and a
//! failed TCP connection resets the QUIC stream, so nobody mistakes a cut-off stream for a
//! complete one.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postern_proto::ResetCode;
use quinn::{ReadError, RecvStream, SendStream, WriteError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::reset_code;

/// Bytes read from TCP per QUIC write.
const CHUNK: usize = 64 * 1024;

/// Reads shorter than this are copied out of their buffer before they are queued.
const SMALL_READ: usize = 4 * 1024;

/// Chunks of a QUIC stream written to TCP at once, at most (about 38 KB of full packets).
const GATHER: usize = 32;

/// What a relay moved and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes that came in on the QUIC stream and went out on TCP.
    pub from_quic: u64,
    /// Bytes that came in on TCP and went out on the QUIC stream.
    pub to_quic: u64,
    /// How it ended.
    pub end: RelayEnd,
}

/// How a relay ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions finished cleanly.
    Closed,
    /// The QUIC peer reset its side of the stream.
    QuicReset(u64),
    /// The QUIC peer stopped reading.
    QuicStopped(u64),
    /// The QUIC connection was lost.
    ConnectionLost(String),
    /// The TCP connection failed.
    TcpFailed(io::ErrorKind),
    /// The relay was cancelled (shutdown).
    Cancelled,
}

impl RelayEnd {
    /// A stable lowercase name for logs and audit events.
    pub fn as_str(&self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::QuicReset(_) => "quic_reset",
            RelayEnd::QuicStopped(_) => "quic_stopped",
            RelayEnd::ConnectionLost(_) => "connection_lost",
            RelayEnd::TcpFailed(_) => "tcp_failed",
            RelayEnd::Cancelled => "cancelled",
        }
    }
}

/// Relays between a QUIC stream and a TCP connection until both directions end, one side
/// fails, or `cancel` fires.
pub async fn relay(
    send: SendStream,
    recv: RecvStream,
    mut tcp: TcpStream,
    cancel: &CancellationToken,
) -> Relayed {
    let relayed = {
        let (tcp_read, tcp_write) = tcp.split();
        relay_halves(send, recv, tcp_read, tcp_write, cancel).await
    };
    if !matches!(relayed.end, RelayEnd::Closed | RelayEnd::TcpFailed(_)) {
        // Linger 0: closing sends RST instead of FIN, so the TCP peer sees an abort.
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    }
    relayed
}

/// [`relay`] for any byte stream, such as TLS over TCP. An abnormal end closes the stream
/// without a clean shutdown.
pub async fn relay_stream<S: AsyncRead + AsyncWrite + Unpin>(
    send: SendStream,
    recv: RecvStream,
    stream: S,
    cancel: &CancellationToken,
) -> Relayed {
    let (read, write) = tokio::io::split(stream);
    relay_halves(send, recv, read, write, cancel).await
}

/// The reading side of a relay.
trait ReadSide: AsyncRead + Unpin {
    /// Resolves once a read would not wait, where that can be known without reading; at once
    /// where it cannot.
    fn ready(&self) -> impl Future<Output = io::Result<()>> + Send;
}

impl ReadSide for tokio::net::tcp::ReadHalf<'_> {
    fn ready(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.readable()
    }
}

/// A stream such as TLS may hold decrypted bytes already: only a read can tell.
impl<S: AsyncRead> ReadSide for tokio::io::ReadHalf<S> {
    fn ready(&self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

async fn relay_halves<R: ReadSide, W: AsyncWrite + Unpin>(
    mut send: SendStream,
    mut recv: RecvStream,
    mut tcp_read: R,
    mut tcp_write: W,
    cancel: &CancellationToken,
) -> Relayed {
    let mut from_quic = 0;
    let mut to_quic = 0;
    let end = {
        let inbound = quic_to_tcp(&mut recv, &mut tcp_write, &mut from_quic);
        let outbound = tcp_to_quic(&mut tcp_read, &mut send, &mut to_quic);
        tokio::pin!(inbound, outbound);
        let (mut inbound_done, mut outbound_done) = (false, false);
        loop {
            tokio::select! {
                result = &mut inbound, if !inbound_done => match result {
                    Ok(()) => inbound_done = true,
                    Err(end) => break end,
                },
                result = &mut outbound, if !outbound_done => match result {
                    Ok(()) => outbound_done = true,
                    Err(end) => break end,
                },
                () = cancel.cancelled() => break RelayEnd::Cancelled,
            }
            if inbound_done && outbound_done {
                break RelayEnd::Closed;
            }
        }
    };
    let code = match end {
        RelayEnd::Closed => {
            return Relayed {
                from_quic,
                to_quic,
                end,
            };
        }
        RelayEnd::Cancelled => ResetCode::Cancelled,
        _ => ResetCode::PeerReset,
    };
    // Errors here mean the stream is already gone, which is what we want.
    let _ = send.reset(reset_code(code));
    let _ = recv.stop(reset_code(code));
    Relayed {
        from_quic,
        to_quic,
        end,
    }
}

async fn quic_to_tcp<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    tcp: &mut W,
    count: &mut u64,
) -> Result<(), RelayEnd> {
    loop {
        // Data arrives in chunks as the packets carried it, about 1.2 KB each: what has arrived
        // goes to TCP in one write instead of one per packet. Nothing is held while idle.
        let mut chunks: [Bytes; GATHER] = Default::default();
        match recv.read_chunks(&mut chunks).await {
            Ok(Some(n)) => {
                let written = match &chunks[..n] {
                    [one] => tcp.write_all(one).await,
                    several => tcp.write_all(&several.concat()).await,
                };
                written.map_err(|e| RelayEnd::TcpFailed(e.kind()))?;
                // A TLS stream keeps records it could not write until flushed; for TCP a no-op.
                tcp.flush()
                    .await
                    .map_err(|e| RelayEnd::TcpFailed(e.kind()))?;
                *count += chunks[..n].iter().map(|c| c.len() as u64).sum::<u64>();
            }
            Ok(None) => {
                return tcp
                    .shutdown()
                    .await
                    .map_err(|e| RelayEnd::TcpFailed(e.kind()));
            }
            Err(ReadError::Reset(code)) => return Err(RelayEnd::QuicReset(code.into_inner())),
            Err(ReadError::ConnectionLost(err)) => {
                return Err(RelayEnd::ConnectionLost(err.to_string()));
            }
            Err(other) => return Err(RelayEnd::ConnectionLost(other.to_string())),
        }
    }
}

async fn tcp_to_quic<R: ReadSide>(
    tcp: &mut R,
    send: &mut SendStream,
    count: &mut u64,
) -> Result<(), RelayEnd> {
    loop {
        // An idle session holds no buffer: it is taken once there is something to read.
        tcp.ready()
            .await
            .map_err(|e| RelayEnd::TcpFailed(e.kind()))?;
        let mut buf = BytesMut::with_capacity(CHUNK);
        let read = tcp
            .read_buf(&mut buf)
            .await
            .map_err(|e| RelayEnd::TcpFailed(e.kind()))?;
        if read == 0 {
            // Finishing fails only if the stream was already reset or stopped: then the peer
            // learns of the end that way.
            let _ = send.finish();
            // This direction is done once the peer has acknowledged every byte: a connection
            // closed after the relay ends then loses nothing.
            return match send.stopped().await {
                Ok(None) => Ok(()),
                Ok(Some(code)) => Err(RelayEnd::QuicStopped(code.into_inner())),
                Err(err) => Err(RelayEnd::ConnectionLost(err.to_string())),
            };
        }
        // A few bytes do not pin a whole buffer until the peer acknowledges them.
        let chunk = if read < SMALL_READ {
            Bytes::copy_from_slice(&buf)
        } else {
            buf.freeze()
        };
        send.write_chunk(chunk).await.map_err(|err| match err {
            WriteError::Stopped(code) => RelayEnd::QuicStopped(code.into_inner()),
            other => RelayEnd::ConnectionLost(other.to_string()),
        })?;
        *count += read as u64;
    }
}
