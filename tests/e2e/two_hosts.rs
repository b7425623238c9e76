//! Across two hosts (network namespaces joined by a link), with the real `postern-broker` on
//! the edge and the real `postern` on the laptop: a mail session survives the laptop's address
//! changing and 10 % packet loss, and the agent comes back by itself after the broker restarts
//! or drains for an upgrade.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use postern_tests::{Dovecot, EdgeBroker, LaptopAgent, MailSession, Message, TwoHosts, digests};

const USER: &str = "alice";
const PASSWORD: &str = "correct horse";

/// The laptop's address after it moves.
const MOVED: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 3);

/// Time one fetch of the whole mailbox may take on a lossless link.
const FETCH: Duration = Duration::from_secs(60);

/// Dovecot and the broker on the edge, the agent on the laptop, one IMAP service (`mail`)
/// forwarded as opaque TCP: the mail client checks Dovecot's own certificate end to end.
struct Setup {
    // Dropped in this order: the laptop's agent, the edge's broker and Dovecot, then the hosts.
    agent: LaptopAgent,
    broker: EdgeBroker,
    dovecot: Dovecot,
    messages: Vec<Message>,
    hosts: TwoHosts,
}

impl Setup {
    /// Everything running, `messages` in alice's INBOX, `edit` applied to `broker.toml`.
    async fn start(messages: Vec<Message>, edit: impl FnOnce(&mut String)) -> Self {
        let hosts = TwoHosts::new();
        let dovecot = Dovecot::start_in(hosts.edge(), &[(USER, PASSWORD, messages.clone())]);
        let broker = EdgeBroker::start(
            &hosts,
            Path::new(env!("CARGO_BIN_EXE_postern-broker-under-test")),
            &[("mail", dovecot.addr())],
            edit,
        )
        .await;
        let service = &broker.config().services[&"mail".parse().unwrap()];
        assert_eq!(
            service.kind(),
            postern_proto::ServiceKind::Tcp,
            "the service is forwarded as opaque TCP"
        );
        let bundle = broker.issue("alice@example.org", &[], Duration::from_secs(3600));
        let identity =
            postern_certs::Bundle::from_toml(&std::fs::read_to_string(&bundle).unwrap()).unwrap();
        assert_eq!(
            identity.broker,
            broker.addr().to_string(),
            "the agent dials the edge's address"
        );
        let agent = LaptopAgent::start(
            hosts.laptop(),
            Path::new(env!("CARGO_BIN_EXE_postern-under-test")),
            &bundle,
            "mail",
        )
        .await;
        Setup {
            agent,
            broker,
            dovecot,
            messages,
            hosts,
        }
    }

    /// A new IMAP session from the laptop through the agent.
    async fn session(&self) -> MailSession {
        MailSession::open(
            self.hosts.laptop(),
            self.agent.addr(),
            &self.dovecot.ca(),
            USER,
            PASSWORD,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// The broker's and the agent's logs, for a failure message.
    fn logs(&self) -> String {
        format!(
            "broker log:\n{}\nagent log:\n{}",
            self.broker.logs(),
            self.agent.logs()
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_goes_on_after_the_laptop_changes_address() {
    let mut setup = Setup::start(Message::samples(8, 71), |_| {}).await;
    let expected = digests(&setup.messages);
    let mut session = setup.session().await;
    assert_eq!(
        session.fetch(FETCH).await.unwrap(),
        expected,
        "every message arrives intact before the move"
    );

    let before = setup.hosts.laptop_addr();
    setup.hosts.move_laptop(MOVED);
    let after = session
        .fetch(FETCH)
        .await
        .unwrap_or_else(|e| panic!("the session broke at the move: {e}\n{}", setup.logs()));
    assert_eq!(after, expected, "the same session fetches intact mail");

    let moved = setup
        .broker
        .wait_for_audit("connection.migrate", |e| {
            e["source"]["ip"] == MOVED.to_string()
        })
        .await;
    assert_eq!(
        moved["postern"]["previous_source"]["ip"],
        before.to_string()
    );
    assert_eq!(
        setup.broker.audit_events("connection.open").len(),
        1,
        "the connection moved; it was not made again"
    );
    assert!(setup.broker.audit_events("session.deny").is_empty());

    // A new mail client connection works from the new address too.
    let mut second = setup.session().await;
    assert_eq!(second.fetch(FETCH).await.unwrap(), expected);
    second.logout().await.unwrap();
    session.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_arrive_intact_through_ten_percent_loss() {
    // 50 messages of about 1 MB each.
    let setup = Setup::start(Message::sized(50, 72, 750_000), |_| {}).await;
    let expected = digests(&setup.messages);
    let total: usize = setup.messages.iter().map(|m| m.0.len()).sum();
    let mut session = setup.session().await;

    setup.hosts.loss(10);
    let started = Instant::now();
    let fetched = session.fetch(Duration::from_secs(120)).await;
    let took = started.elapsed();
    let counts = setup.hosts.loss_counts();
    setup.hosts.loss(0);
    let fetched = fetched.unwrap_or_else(|e| panic!("{e}\n{}", setup.logs()));
    eprintln!(
        "fetched {} messages, {:.1} MB, through 10 % loss in {took:.1?}: {} of {} packets \
         ({:.1} of {:.1} MB) dropped",
        fetched.len(),
        total as f64 / 1e6,
        counts.dropped_packets,
        counts.packets,
        counts.dropped_bytes as f64 / 1e6,
        counts.bytes as f64 / 1e6,
    );
    assert_eq!(fetched, expected, "every message arrives intact");
    assert!(
        counts.dropped_packets > 0,
        "the link lost packets during the fetch: {counts:?}"
    );
    session.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_the_agent_is_back_within_two_seconds() {
    let mut setup = Setup::start(Message::samples(4, 73), |_| {}).await;
    let expected = digests(&setup.messages);
    // The agent connects before any program asks.
    assert!(
        setup
            .broker
            .wait_for_count("connection.open", 1, Duration::from_secs(10))
            .await,
        "the agent connected by itself\n{}",
        setup.logs()
    );
    let mut session = setup.session().await;
    assert_eq!(session.fetch(FETCH).await.unwrap(), expected);
    session.logout().await.unwrap();

    let status = setup.broker.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "the broker stopped cleanly: {status}");
    setup.broker.start_again().await;
    let serving = Instant::now();
    assert!(
        setup
            .broker
            .wait_for_count("connection.open", 2, Duration::from_secs(2))
            .await,
        "reconnected within 2 s of the restart, with no program asking\n{}",
        setup.logs()
    );
    eprintln!(
        "the agent was back {:.1?} after the new broker served",
        serving.elapsed()
    );

    let mut session = setup.session().await;
    assert_eq!(session.fetch(FETCH).await.unwrap(), expected);
    session.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_broker_keeps_open_sessions_and_new_ones_wait_for_its_successor() {
    let mut setup = Setup::start(Message::samples(4, 74), |config| {
        let default = "# shutdown_grace = \"30s\"";
        assert!(config.contains(default), "broker.toml has `{default}`");
        *config = config.replace(default, "shutdown_grace = \"20s\"");
    })
    .await;
    let expected = digests(&setup.messages);
    let mut open = setup.session().await;
    assert_eq!(open.fetch(FETCH).await.unwrap(), expected);

    // An upgrade begins: the broker drains.
    setup.broker.begin_shutdown();
    setup
        .broker
        .wait_for_log("shutting down", Duration::from_secs(10))
        .await;
    // A mail client that connects during the drain: the draining broker must not take it, and
    // the agent holds it until a broker does.
    let waiting = tokio::spawn({
        let (laptop, addr, ca) = (
            setup.hosts.laptop().clone(),
            setup.agent.addr(),
            setup.dovecot.ca(),
        );
        async move {
            let mut session = MailSession::open(&laptop, addr, &ca, USER, PASSWORD).await?;
            let fetched = session.fetch(FETCH).await?;
            session.logout().await?;
            Ok::<_, String>(fetched)
        }
    });
    let agent_port = setup.agent.addr().port();
    let deadline = Instant::now() + Duration::from_secs(10);
    while setup.hosts.laptop().established_to(agent_port) < 2 {
        assert!(
            Instant::now() < deadline,
            "the second mail client did not connect to the agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The session open before the drain still works during the grace period.
    assert_eq!(
        open.fetch(FETCH)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", setup.logs())),
        expected,
        "the open session works while the broker drains"
    );
    assert!(setup.broker.is_running(), "the broker is still draining");
    // Two processes cannot share the UDP port: the new broker starts once the old one is
    // gone, which it is as soon as its last session ends.
    open.logout().await.unwrap();
    let status = setup.broker.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "the broker stopped cleanly: {status}");
    let stop = setup.broker.audit_events("broker.stop");
    assert_eq!(stop.len(), 1);
    assert_eq!(
        stop[0]["postern"]["sessions_cut"], 0,
        "no session was cut: the open one ended by itself"
    );
    setup.broker.start_again().await;

    let served = waiting.await.unwrap();
    assert_eq!(
        served.unwrap_or_else(|e| panic!(
            "the client that came during the drain was not served: {e}\n{}",
            setup.logs()
        )),
        expected,
        "the client that came during the drain was served"
    );
    // Each broker process has its own ephemeral id in the audit trail.
    let starts = setup.broker.audit_events("broker.start");
    let process = |event: &serde_json::Value| event["service"]["ephemeral_id"].clone();
    let (old, new) = (process(&starts[0]), process(&starts[1]));
    let allowed = setup.broker.audit_events("connect.allow");
    assert_eq!(
        allowed.iter().filter(|e| process(e) == old).count(),
        1,
        "the draining broker served only the session open before the drain: {allowed:#?}"
    );
    assert_eq!(
        allowed.iter().filter(|e| process(e) == new).count(),
        1,
        "the new broker served the client that came during the drain: {allowed:#?}"
    );
    // The agent either tried the draining broker and was refused, or moved on without trying.
    let denied = setup.broker.audit_events("connect.deny");
    assert!(
        denied
            .iter()
            .all(|e| e["postern"]["refuse_code"] == "shutting_down"),
        "{denied:#?}"
    );
    eprintln!(
        "the agent {} the draining broker",
        if denied.is_empty() {
            "moved on from"
        } else {
            "was refused a stream by"
        }
    );
    assert!(setup.agent.is_running());
}
