//! A live session is asked again whenever the answer could change: a policy change ends an IDLE
//! session within 2 s, a broken policy file changes nothing, a time rule ends it when its time
//! is up, and a certificate's end ends it.

use std::time::{Duration, SystemTime};

use postern_agent::tunnel::{Tunnel, TunnelError};
use postern_proto::{RefuseCode, ServiceName};
use postern_tests::{AgentHandle, Dovecot, Gateway, ImapIdle, Message, imap_fetch};

const PASSWORD: &str = "correct horse";

/// Dovecot with alice, a broker for it (with `edit` applied to broker.toml), and an agent
/// holding alice's identity.
async fn setup(edit: impl FnOnce(&mut String)) -> (Dovecot, Gateway, AgentHandle) {
    let dovecot = Dovecot::start(&[("alice", PASSWORD, Message::samples(2, 4))]);
    let gateway = Gateway::start_with(&[("imap", dovecot.addr())], None, edit).await;
    let identity = gateway.issue("alice@example.org", &["staff"], Duration::from_secs(3600));
    let agent = AgentHandle::start(&identity).await;
    (dovecot, gateway, agent)
}

async fn idle(dovecot: &Dovecot, agent: &AgentHandle) -> ImapIdle {
    ImapIdle::start(agent.addr("imap"), &dovecot.ca(), "alice", PASSWORD).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbid_added_ends_a_live_idle_session_within_two_seconds() {
    let (dovecot, gateway, agent) = setup(|_| {}).await;
    let mut session = idle(&dovecot, &agent).await;

    std::fs::write(
        gateway.config.policy_dir.join("incident.cedar"),
        "@id(\"incident-42\")\nforbid (principal, action == Action::\"connect\", resource)\nwhen { principal has email && principal.email == \"alice@example.org\" };\n",
    )
    .unwrap();
    let ended = session.ended_within(Duration::from_secs(2)).await;
    assert!(
        ended.is_some(),
        "the IDLE session ended within 2 s of the change"
    );

    let denied = gateway.wait_for_audit("session.deny", |_| true).await;
    assert_eq!(
        denied["postern"]["policies"],
        serde_json::json!(["incident-42"])
    );
    assert_eq!(denied["postern"]["recheck"], "change");
    assert_eq!(denied["postern"]["policy_generation"], 2);
    gateway
        .wait_for_audit("session.close", |e| e["event"]["reason"] == "policy_denied")
        .await;
    let reload = gateway.wait_for_audit("policy.reload", |_| true).await;
    assert_eq!(reload["postern"]["policies_loaded"], 5);
    // New connections are refused too.
    assert!(
        imap_fetch(agent.addr("imap"), &dovecot.ca(), "alice", PASSWORD)
            .await
            .is_err()
    );
    gateway
        .wait_for_audit("connect.deny", |e| {
            e["postern"]["policies"] == serde_json::json!(["incident-42"])
        })
        .await;
    agent.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_file_changes_nothing() {
    let (dovecot, gateway, agent) = setup(|text| {
        *text = text.replace("# listen = \"127.0.0.1:9464\"", "listen = \"127.0.0.1:0\"");
    })
    .await;
    let mut session = idle(&dovecot, &agent).await;

    let typo = gateway.config.policy_dir.join("typo.cedar");
    std::fs::write(
        &typo,
        "forbid (principal, action, resource) when { principal.emial == \"x\" };\n",
    )
    .unwrap();
    let rejected = gateway.wait_for_audit("policy.reject", |_| true).await;
    assert!(
        rejected["event"]["reason"]
            .as_str()
            .unwrap()
            .contains("typo.cedar:1:"),
        "{rejected}"
    );
    assert_eq!(rejected["postern"]["policy_generation"], 1);
    assert_eq!(rejected["postern"]["rejected_total"], 1);

    assert_eq!(
        session.ended_within(Duration::from_secs(2)).await,
        None,
        "the session lives on"
    );
    assert!(session.is_open());
    let fetched = imap_fetch(agent.addr("imap"), &dovecot.ca(), "alice", PASSWORD).await;
    assert!(fetched.is_ok(), "new connections work: {fetched:?}");
    assert!(gateway.audit_events("policy.reload").is_empty());
    let metrics = gateway.scrape().await;
    assert!(
        metrics.contains("\npostern_policy_reload_rejected_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\npostern_policy_generation 1\n"),
        "{metrics}"
    );
    // The IDLE session; the fetch's own session may take a moment to be counted out.
    let mut open = metrics;
    for _ in 0..50 {
        if open.contains("\npostern_sessions_open 1\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        open = gateway.scrape().await;
    }
    assert!(open.contains("\npostern_sessions_open 1\n"), "{open}");

    // Fixed: taken in as the next generation.
    std::fs::remove_file(&typo).unwrap();
    let reload = gateway.wait_for_audit("policy.reload", |_| true).await;
    assert_eq!(reload["postern"]["policy_generation"], 2);
    assert!(session.is_open());
    agent.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timer_recheck_ends_a_session_when_a_time_rule_stops_matching() {
    // Access until a moment a few seconds from now, re-checked every second.
    // A whole second, as the policy writes it.
    let until = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + 6).unwrap();
    let policy = format!(
        "{}\n@id(\"until-the-change-window\")\nforbid (principal, action == Action::\"connect\", resource)\nunless {{ context.time.datetime < datetime(\"{}\") }};\n",
        postern_broker::init::DEFAULT_POLICY,
        until.strftime("%Y-%m-%dT%H:%M:%SZ"),
    );
    let dovecot = Dovecot::start(&[("alice", PASSWORD, Message::samples(1, 5))]);
    let gateway = Gateway::start_with(&[("imap", dovecot.addr())], Some(&policy), |text| {
        *text = text.replace("# recheck_interval = \"60s\"", "recheck_interval = \"1s\"");
    })
    .await;
    let agent =
        AgentHandle::start(&gateway.issue("alice@example.org", &[], Duration::from_secs(3600)))
            .await;
    let mut session = idle(&dovecot, &agent).await;

    let left = SystemTime::from(until)
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    let ended = session.ended_within(left + Duration::from_secs(3)).await;
    assert!(
        ended.is_some(),
        "the session ended when the time rule stopped matching"
    );
    assert!(
        SystemTime::now() >= SystemTime::from(until),
        "and not before"
    );
    let denied = gateway.wait_for_audit("session.deny", |_| true).await;
    assert_eq!(denied["postern"]["recheck"], "timer");
    assert_eq!(
        denied["postern"]["policies"],
        serde_json::json!(["until-the-change-window"])
    );
    agent.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_ends_within_two_seconds_of_its_certificate() {
    let dovecot = Dovecot::start(&[("alice", PASSWORD, Message::samples(1, 6))]);
    let gateway = Gateway::start_with(&[("imap", dovecot.addr())], None, |config| {
        *config = config.replace("# max_clock_skew = \"60s\"", "max_clock_skew = \"1s\"");
    })
    .await;
    let issued = gateway.issue("alice@example.org", &[], Duration::from_secs(600));
    let short = gateway.recertify(&issued, Duration::from_secs(8));
    let not_after = postern_certs::inspect_unverified(&short.certificate)
        .unwrap()
        .not_after;
    let agent = AgentHandle::start(&short).await;
    let mut session = idle(&dovecot, &agent).await;

    // The end is not_after plus the tolerated skew of 1 s.
    let end = not_after + Duration::from_secs(1);
    let left = end.duration_since(SystemTime::now()).unwrap_or_default();
    assert_eq!(
        session
            .ended_within(left.saturating_sub(Duration::from_millis(500)))
            .await,
        None,
        "alive while valid"
    );
    let ended = session
        .ended_within(Duration::from_millis(500) + Duration::from_secs(2))
        .await;
    assert!(ended.is_some(), "ended within 2 s of the certificate's end");
    gateway
        .wait_for_audit("session.close", |e| {
            e["event"]["reason"] == "certificate_expired"
        })
        .await;
    agent.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_login_keeps_its_idle_session_past_the_old_certificate() {
    let dovecot = Dovecot::start(&[("alice", PASSWORD, Message::samples(1, 9))]);
    let gateway = Gateway::start_with(&[("imap", dovecot.addr())], None, |config| {
        *config = config.replace("# max_clock_skew = \"60s\"", "max_clock_skew = \"1s\"");
    })
    .await;
    let issued = gateway.issue("alice@example.org", &[], Duration::from_secs(600));
    // The first certificate of the login, short; the session opens on it.
    let first = gateway.recertify(&issued, Duration::from_secs(6));
    let lineage = postern_certs::inspect_unverified(&first.certificate)
        .unwrap()
        .identity
        .auth
        .lineage
        .to_string();
    let not_after = postern_certs::inspect_unverified(&first.certificate)
        .unwrap()
        .not_after;
    let old = AgentHandle::start(&first).await;
    let mut session = idle(&dovecot, &old).await;
    // Another connection on the first certificate, made while it is valid, for new streams
    // after its end (the agent itself no longer offers an ended certificate).
    let raw = Tunnel::new(&first, first.credential().unwrap()).unwrap();
    raw.connection().await.unwrap();

    // The same login, renewed: the broker sees its new certificate on a new connection.
    let renewed = AgentHandle::start(&gateway.recertify(&issued, Duration::from_secs(3600))).await;
    imap_fetch(renewed.addr("imap"), &dovecot.ca(), "alice", PASSWORD)
        .await
        .unwrap();

    // Past the first certificate's end (plus 1 s of skew) and a re-check, the session lives.
    let past = not_after + Duration::from_secs(3);
    let wait = past.duration_since(SystemTime::now()).unwrap_or_default();
    assert_eq!(
        session.ended_within(wait).await,
        None,
        "the IDLE session lives on"
    );
    assert!(session.is_open());
    // New streams on the old certificate are refused: the agent says so itself, and the
    // broker refuses them on a connection made before the end; the renewed one serves them.
    assert!(
        imap_fetch(old.addr("imap"), &dovecot.ca(), "alice", PASSWORD)
            .await
            .is_err()
    );
    let refused = raw.open(&ServiceName::new("imap").unwrap()).await;
    assert!(
        matches!(&refused, Err(TunnelError::Refused(r)) if r.code() == RefuseCode::CertificateExpired),
        "{refused:?}"
    );
    gateway
        .wait_for_audit("connect.deny", |e| {
            e["postern"]["refuse_code"] == "certificate_expired"
        })
        .await;

    // The login is revoked: the session carried over ends like any other.
    let revoked = std::process::Command::new(env!("CARGO_BIN_EXE_postern-broker-under-test"))
        .args(["revoke", "--config", gateway.config.path.to_str().unwrap()])
        .args(["--lineage", &lineage, "--yes"])
        .output()
        .unwrap();
    assert!(revoked.status.success(), "{revoked:?}");
    assert!(
        session.ended_within(Duration::from_secs(2)).await.is_some(),
        "ended within 2 s of the revocation"
    );
    old.stop().await;
    renewed.stop().await;
    gateway.stop().await;
}
