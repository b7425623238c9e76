//! A quiet IMAP IDLE keeps its tunnel: 35 minutes of silence, behind a NAT that forgets quiet
//! flows after 30 s, with the agent's and the broker's shipped transport settings.
//!
//! Thirty-five minutes are simulated: both QUIC endpoints and the NAT run on a clock that goes
//! [`SCALE`] times faster than the real one (quinn takes its time and timers from its runtime),
//! while packets travel over real loopback sockets. The real-time counterpart,
//! [`a_real_idle_outlives_the_idle_timeout`], runs an IMAP IDLE with real Dovecot through the
//! agent and the broker.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use postern_certs::testdata;
use postern_transport::Tuning;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::net::UdpSocket;

/// Simulated seconds per real second.
const SCALE: u32 = 24;

/// How long a NAT keeps a quiet flow's mapping: 30 s is common on home routers and mobile
/// networks (RFC 4787 asks for 2 minutes; many do not).
const NAT_TIMEOUT: Duration = Duration::from_secs(30);

/// A clock that runs [`SCALE`] times faster than the real one from `origin` on.
#[derive(Debug, Clone, Copy)]
struct Clock {
    origin: Instant,
}

impl Clock {
    fn start() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    /// The simulated time now.
    fn now(self) -> Instant {
        self.origin + (Instant::now() - self.origin) * SCALE
    }

    /// The real instant at which the simulated clock shows `at`.
    fn real(self, at: Instant) -> Instant {
        self.origin + at.saturating_duration_since(self.origin) / SCALE
    }

    /// Sleeps for `simulated` time.
    async fn sleep(self, simulated: Duration) {
        tokio::time::sleep(simulated / SCALE).await;
    }
}

/// Tokio's runtime for quinn, on the simulated clock.
#[derive(Debug)]
struct Simulated(Clock);

impl quinn::Runtime for Simulated {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        Box::pin(Timer {
            clock: self.0,
            sleep: Box::pin(tokio::time::sleep_until(self.0.real(at).into())),
        })
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        quinn::TokioRuntime.wrap_udp_socket(socket)
    }

    fn now(&self) -> Instant {
        self.0.now()
    }
}

#[derive(Debug)]
struct Timer {
    clock: Clock,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl quinn::AsyncTimer for Timer {
    fn reset(self: Pin<&mut Self>, at: Instant) {
        let this = self.get_mut();
        let real = this.clock.real(at);
        this.sleep.as_mut().reset(real.into());
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context) -> Poll<()> {
        Future::poll(self.get_mut().sleep.as_mut(), cx)
    }
}

/// A NAT between the agent and the broker: the agent's flow gets a mapping (an outside port),
/// refreshed by the agent's packets only; after [`NAT_TIMEOUT`] without one, packets from the
/// broker are dropped and the agent's next packet gets a new mapping, so that the broker sees a
/// new source port. Returns the address the agent sends to, and the count of mappings made.
async fn nat(broker: SocketAddr, clock: Clock) -> (SocketAddr, Arc<AtomicUsize>) {
    let inside = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = inside.local_addr().unwrap();
    let mappings = Arc::new(AtomicUsize::new(0));
    let made = mappings.clone();
    tokio::spawn(async move {
        let mut flow: Option<(UdpSocket, SocketAddr)> = None;
        let mut last_out = clock.now();
        let (mut out_buf, mut in_buf) = (vec![0u8; 65_536], vec![0u8; 65_536]);
        loop {
            let outside = flow.as_ref().map(|(socket, _)| socket);
            tokio::select! {
                received = inside.recv_from(&mut out_buf) => {
                    let Ok((len, agent)) = received else { return };
                    let expired = clock.now().duration_since(last_out) > NAT_TIMEOUT;
                    if flow.is_none() || expired {
                        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                        made.fetch_add(1, Ordering::Relaxed);
                        flow = Some((socket, agent));
                    }
                    last_out = clock.now();
                    if let Some((socket, _)) = &flow {
                        let _ = socket.send_to(&out_buf[..len], broker).await;
                    }
                }
                received = async { outside.unwrap().recv_from(&mut in_buf).await }, if outside.is_some() => {
                    let Ok((len, _)) = received else { return };
                    if clock.now().duration_since(last_out) > NAT_TIMEOUT {
                        // Forgotten: dropped, as are the flow's later packets.
                        flow = None;
                        continue;
                    }
                    if let Some((_, agent)) = &flow {
                        let _ = inside.send_to(&in_buf[..len], *agent).await;
                    }
                }
            }
        }
    });
    (address, mappings)
}

/// A broker-side and an agent-side QUIC endpoint on the simulated clock, the agent's packets
/// going through a NAT: (agent's connection, broker's connection, mappings the NAT made).
async fn pair(
    agent: Tuning,
    clock: Clock,
) -> (quinn::Connection, quinn::Connection, Arc<AtomicUsize>) {
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(Simulated(clock));
    let (server_tls, client_tls) =
        testdata::tunnel_tls(SystemTime::now(), Duration::from_secs(3600));
    let mut server_config =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls).unwrap()));
    server_config.transport_config(broker_tuning().transport_config());
    let server = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        runtime.clone(),
    )
    .unwrap();
    let (through, mappings) = nat(server.local_addr().unwrap(), clock).await;

    let mut client_config =
        quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls).unwrap()));
    client_config.transport_config(agent.transport_config());
    let mut client = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        runtime,
    )
    .unwrap();
    client.set_default_client_config(client_config);
    let accept = tokio::spawn(async move { server.accept().await.unwrap().await.unwrap() });
    let connection = client.connect(through, "localhost").unwrap().await.unwrap();
    (connection, accept.await.unwrap(), mappings)
}

/// The broker's transport settings with its default configuration.
fn broker_tuning() -> Tuning {
    let dir = tempfile::tempdir().unwrap();
    let options = postern_broker::init::InitOptions {
        dir: dir.path().join("broker"),
        hostname: "localhost".into(),
        listen: "127.0.0.1:0".into(),
        services: vec!["imap=127.0.0.1:993".into()],
        mail_ca: None,
        oidc: None,
    };
    let path = postern_broker::init::init(&options, SystemTime::now()).unwrap();
    let config = postern_broker::config::Config::load(&path).unwrap();
    postern_broker::serve::tuning(&config.limits)
}

/// Reads exactly `expected` from `recv` within `limit` of simulated time.
async fn expect(recv: &mut quinn::RecvStream, expected: &[u8], limit: Duration) {
    let mut got = vec![0u8; expected.len()];
    tokio::time::timeout(limit / SCALE, recv.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{:?} did not arrive in time",
                String::from_utf8_lossy(expected)
            )
        })
        .unwrap();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_survives_35_quiet_minutes_behind_a_nat() {
    let clock = Clock::start();
    let (agent, broker, mappings) = pair(postern_agent::tunnel::TUNING, clock).await;
    let first_path = broker.remote_address();
    let (mut agent_send, mut agent_recv) = agent.open_bi().await.unwrap();
    agent_send.write_all(b"a1 IDLE\r\n").await.unwrap();
    let (mut broker_send, mut broker_recv) = broker.accept_bi().await.unwrap();
    let second = Duration::from_secs(10);
    expect(&mut broker_recv, b"a1 IDLE\r\n", second).await;
    broker_send.write_all(b"+ idling\r\n").await.unwrap();
    expect(&mut agent_recv, b"+ idling\r\n", second).await;

    clock.sleep(Duration::from_secs(35 * 60)).await;

    // New mail: the server speaks first, through the NAT, after 35 minutes of silence.
    broker_send.write_all(b"* 5 EXISTS\r\n").await.unwrap();
    expect(&mut agent_recv, b"* 5 EXISTS\r\n", second).await;
    agent_send.write_all(b"DONE\r\n").await.unwrap();
    expect(&mut broker_recv, b"DONE\r\n", second).await;
    broker_send
        .write_all(b"a1 OK Idle completed\r\n")
        .await
        .unwrap();
    expect(&mut agent_recv, b"a1 OK Idle completed\r\n", second).await;
    assert!(agent.close_reason().is_none() && broker.close_reason().is_none());
    // Keep-alives kept the NAT's mapping: the broker never saw the agent change address.
    assert_eq!(mappings.load(Ordering::Relaxed), 1);
    assert_eq!(broker.remote_address(), first_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keep_alives_the_same_silence_loses_the_connection() {
    let clock = Clock::start();
    let quiet = Tuning {
        keep_alive: None,
        ..postern_agent::tunnel::TUNING
    };
    let (agent, _broker, _) = pair(quiet, clock).await;
    let (mut send, _recv) = agent.open_bi().await.unwrap();
    send.write_all(b"a1 IDLE\r\n").await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5 * 60) / SCALE, agent.closed())
        .await
        .expect("the connection ended within five quiet minutes");
    assert_eq!(closed, quinn::ConnectionError::TimedOut);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_idle_outlives_the_idle_timeout() {
    use postern_tests::{AgentHandle, Dovecot, Gateway, ImapIdle, Message};
    // Dovecot stays silent during IDLE (no `* OK Still here`); the broker gives up on a silent
    // connection after 20 s; the agent's keep-alives (every 15 s) are all that carries it.
    let dovecot = Dovecot::start(&[("alice", "correct horse", Message::samples(1, 51))]);
    let gateway = Gateway::start_with(&[("imap", dovecot.addr())], None, |config| {
        *config = config
            .lines()
            .map(|line| {
                if line.starts_with("# idle_timeout = ") {
                    "idle_timeout = \"20s\""
                } else {
                    line
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
    })
    .await;
    assert_eq!(gateway.config.limits.idle_timeout, Duration::from_secs(20));
    let agent =
        AgentHandle::start(&gateway.issue("alice@example.org", &[], Duration::from_secs(3600)))
            .await;
    let mut idle =
        ImapIdle::start(agent.addr("imap"), &dovecot.ca(), "alice", "correct horse").await;

    // Three times the idle timeout, in real time, with nothing said.
    assert_eq!(idle.next_within(Duration::from_secs(65)).await, None);

    // New mail reaches the idling client at once.
    dovecot.deliver("alice", &Message::samples(1, 52)[0]);
    assert_eq!(
        idle.next_within(Duration::from_secs(10)).await.as_deref(),
        Some("exists: 2")
    );
    assert_eq!(gateway.audit_events("connection.open").len(), 1);
    assert!(gateway.audit_events("session.close").is_empty());
    agent.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_slower_than_the_nat_cost_a_new_address_each_time() {
    // The NAT of these tests does forget: with keep-alives every 45 s the flow gets a new
    // mapping after each, and the broker sees the agent move every time (QUIC migration
    // rescues the connection, at the cost of a re-check of its sessions each time).
    let clock = Clock::start();
    let slow = postern_agent::tunnel::tuning(Duration::from_secs(45));
    let (agent, broker, mappings) = pair(slow, clock).await;
    let (mut send, _recv) = agent.open_bi().await.unwrap();
    send.write_all(b"a1 IDLE\r\n").await.unwrap();
    let first_path = broker.remote_address();
    clock.sleep(Duration::from_secs(5 * 60)).await;
    assert!(
        mappings.load(Ordering::Relaxed) >= 4,
        "{} mappings",
        mappings.load(Ordering::Relaxed)
    );
    assert_ne!(broker.remote_address(), first_path);
}
