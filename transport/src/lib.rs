//! Plumbing shared by the `postern` agent and `postern-broker`.
//!
//! Both ends of a tunnel do the same things with QUIC: configure the transport, read and write
//! the frames of `postern-proto` on a stream, and relay bytes between a stream and a TCP
//! connection with half-close; and both stop on the same signals. Keeping that here means the
//! two ends cannot drift apart.
//!
//! It decides nothing: who may connect and where to is the broker's business.

mod frame_io;
mod relay;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Endpoint, EndpointConfig, IdleTimeout, ServerConfig, TransportConfig, VarInt};

pub use frame_io::{FrameError, read_frame, write_frame};
pub use relay::{RelayEnd, Relayed, relay, relay_stream};

/// Transport settings of a tunnel connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// A connection silent for this long is closed. The smaller of the two ends' values is used.
    pub idle_timeout: Duration,
    /// Interval of keep-alive packets, which keep the connection (and NAT bindings) alive while
    /// no data flows. `None` sends none; the agent sends them, the broker need not.
    pub keep_alive: Option<Duration>,
    /// Streams the peer may have open at once. quinn allocates state for each up front, so keep
    /// it small; a peer that needs more waits for a stream to close.
    pub max_concurrent_streams: u32,
    /// Unidirectional streams the peer may open: the agent allows the broker its one control
    /// stream (`postern_proto::Notice`); the broker allows none.
    pub control_streams: u32,
}

/// Bytes a peer may send on one stream ahead of what the application has read. With the
/// connection-wide window below it bounds what a peer can make us buffer, whatever it does.
pub const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// Bytes a peer may send on all streams of a connection ahead of what has been read.
pub const RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;

impl Tuning {
    /// The quinn transport configuration for these settings.
    pub fn transport_config(&self) -> Arc<TransportConfig> {
        let mut config = TransportConfig::default();
        // Durations beyond QUIC's range are capped rather than refused.
        let idle =
            IdleTimeout::try_from(self.idle_timeout).unwrap_or(IdleTimeout::from(VarInt::MAX));
        config
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(self.keep_alive)
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(self.control_streams))
            .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
            .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
            .send_window(u64::from(RECEIVE_WINDOW))
            .datagram_receive_buffer_size(None);
        Arc::new(config)
    }
}

/// Bytes a tunnel's UDP socket may queue each way. Linux's default, about 208 KiB, overflows
/// when a sender's burst meets a receiver that is not running at that moment: at full speed on
/// loopback about one packet in 200 was dropped at the receiving socket, and each loss makes
/// the sender slow down. The kernel caps the size at `net.core.rmem_max` and `wmem_max`, and
/// charges only what is queued.
pub const UDP_BUFFER: usize = 4 * 1024 * 1024;

/// A UDP socket for a tunnel endpoint, bound to `addr` (an unspecified IPv6 address takes IPv4
/// too), with buffers of [`UDP_BUFFER`] as far as the system allows.
pub fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Where the system refuses, the socket is IPv6 only; that is all that is lost.
        let _ = socket.set_only_v6(false);
    }
    // Larger buffers are an optimisation: a system that refuses them still works.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A quinn endpoint on a socket from [`udp_socket`]; a server with `server`. Must run inside a
/// Tokio runtime.
pub fn endpoint(addr: SocketAddr, server: Option<ServerConfig>) -> io::Result<Endpoint> {
    let runtime = quinn::default_runtime()
        .ok_or_else(|| io::Error::other("no async runtime to run the endpoint on"))?;
    Endpoint::new(
        EndpointConfig::default(),
        server,
        udp_socket(addr)?,
        runtime,
    )
}

/// SIGTERM and SIGINT (Ctrl-C), caught from the moment [`Signals::install`] returns.
///
/// Installing before announcing readiness matters: a signal that arrives before its handler is
/// registered kills the process instead of stopping it gracefully.
#[derive(Debug)]
pub struct Signals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Registers the handlers. Must run inside a Tokio runtime.
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                terminate: signal(SignalKind::terminate()).ok(),
                interrupt: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// Waits for the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        if let (Some(terminate), Some(interrupt)) =
            (self.terminate.as_mut(), self.interrupt.as_mut())
        {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A QUIC application error code for a stream reset or stop.
pub fn reset_code(code: postern_proto::ResetCode) -> VarInt {
    VarInt::from_u64(code.to_u64()).unwrap_or(VarInt::MAX)
}

/// A QUIC application error code for a connection close.
pub fn close_code(code: postern_proto::CloseCode) -> VarInt {
    VarInt::from_u64(code.to_u64()).unwrap_or(VarInt::MAX)
}
