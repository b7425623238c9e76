//! For a `protocol = "imap"` service the person who passed MFA is the person whose mailbox is
//! opened: the broker checks every login against policy before the password reaches the
//! server, locks out password guessing per identity, and speaks IMAP when it says no.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use postern_tests::{
    AgentHandle, Courier, Cyrus, Dovecot, Gateway, ImapIdle, ImapWire, Message, imap_fetch,
    imap_fetch_with,
};

const ALICE_PW: &str = "alice-pw";
const BOB_PW: &str = "bob-pw";
const SALES_PW: &str = "sales-pw";

/// Makes each named `async fn<S: MailServer>()` three tests, `NAME::dovecot`, `NAME::cyrus` and
/// `NAME::courier`.
macro_rules! on_each_server {
    ($($test:ident),+ $(,)?) => {
        $(
            mod $test {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn dovecot() {
                    super::$test::<postern_tests::Dovecot>().await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn cyrus() {
                    super::$test::<postern_tests::Cyrus>().await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn courier() {
                    super::$test::<postern_tests::Courier>().await;
                }
            }
        )+
    };
}

on_each_server!(
    ones_own_mailbox_reads_the_same_bytes_with_login_and_authenticate_plain,
    curl_reads_a_message_through_the_imap_mode,
    another_persons_mailbox_is_refused_even_with_the_right_password,
    a_shared_mailbox_opens_for_whom_policy_allows,
    a_revoked_person_gets_bye_in_the_middle_of_idle,
    pipelined_logins_are_each_checked_on_their_own,
    literals_split_across_packets_and_counted_both_ways_are_read_as_the_server_would,
    authorization_identities_and_other_mechanisms_are_refused,
    login_names_the_server_could_read_as_someone_else_are_refused,
    commands_that_would_undo_the_binding_end_the_session_instead_of_reaching_the_server,
);

/// An IMAP server the binding is tested against, started for one test.
trait MailServer {
    /// Starts it with `users` (name, password, messages in INBOX).
    fn start(users: &[(&str, &str, Vec<Message>)]) -> Self;
    /// Where it serves IMAPS.
    fn addr(&self) -> SocketAddr;
    /// The CA that signed its certificate.
    fn ca(&self) -> PathBuf;
    /// What it logged so far.
    fn logs(&self) -> String;
    /// Whether its logs show a login attempt as `name`, successful or not.
    fn saw_login(&self, name: &str) -> bool;
}

impl MailServer for Dovecot {
    fn start(users: &[(&str, &str, Vec<Message>)]) -> Self {
        Dovecot::start(users)
    }

    fn addr(&self) -> SocketAddr {
        Dovecot::addr(self)
    }

    fn ca(&self) -> PathBuf {
        Dovecot::ca(self)
    }

    fn logs(&self) -> String {
        Dovecot::logs(self)
    }

    fn saw_login(&self, name: &str) -> bool {
        self.logs().contains(&format!("user=<{name}>"))
    }
}

impl MailServer for Cyrus {
    fn start(users: &[(&str, &str, Vec<Message>)]) -> Self {
        Cyrus::start(users)
    }

    fn addr(&self) -> SocketAddr {
        Cyrus::addr(self)
    }

    fn ca(&self) -> PathBuf {
        Cyrus::ca(self)
    }

    fn logs(&self) -> String {
        Cyrus::logs(self)
    }

    fn saw_login(&self, name: &str) -> bool {
        // `login: localhost [127.0.0.1] bob plaintext+TLS …` and
        // `badlogin: localhost [127.0.0.1] plaintext+TLS bob …`.
        self.logs().lines().any(|line| {
            line.contains("login: ") && line.split_whitespace().any(|word| word == name)
        })
    }
}

impl MailServer for Courier {
    fn start(users: &[(&str, &str, Vec<Message>)]) -> Self {
        Courier::start(users)
    }

    fn addr(&self) -> SocketAddr {
        Courier::addr(self)
    }

    fn ca(&self) -> PathBuf {
        Courier::ca(self)
    }

    fn logs(&self) -> String {
        Courier::logs(self)
    }

    fn saw_login(&self, name: &str) -> bool {
        // `LOGIN, user=bob, ip=[…]` and `LOGIN FAILED, user=bob, ip=[…]`.
        self.logs()
            .lines()
            .any(|line| line.contains("LOGIN") && line.contains(&format!(" user={name},")))
    }
}

/// alice, bob and a shared `sales` mailbox, each with some mail.
fn mail_server<S: MailServer>() -> S {
    S::start(&[
        ("alice", ALICE_PW, Message::samples(4, 31)),
        ("bob", BOB_PW, Message::samples(2, 32)),
        ("sales", SALES_PW, Message::samples(2, 33)),
    ])
}

/// A broker with `server` as the IMAP service `mail`: TLS verified against its CA, login names
/// of example.org read as local parts (as its users are), lockout after 2 failures for 2 s.
async fn imap_gateway(server: &impl MailServer, policy: Option<&str>) -> Gateway {
    imap_gateway_with(server, policy, "").await
}

/// [`imap_gateway`] with more lines for the `[imap]` table.
async fn imap_gateway_with(server: &impl MailServer, policy: Option<&str>, imap: &str) -> Gateway {
    let ca = server.ca().display().to_string();
    gateway_to(server.addr(), &format!("ca_file = {ca:?}\n"), policy, imap).await
}

/// A broker whose IMAP service `mail` is `addr`, with `service` lines added to its table.
async fn gateway_to(addr: SocketAddr, service: &str, policy: Option<&str>, imap: &str) -> Gateway {
    Gateway::start_with(&[("mail", addr)], policy, |text| {
        *text = text.replace(
            "[services.mail]\n",
            &format!(
                "[services.mail]\nprotocol = \"imap\"\nserver_name = \"localhost\"\n{service}"
            ),
        );
        text.push_str(
            "\n[services.mail.login]\ndomain = \"example.org\"\ndomain_form = \"local\"\n\n\
             [imap]\nlockout_failures = 2\nlockout_duration = \"2s\"\nlockout_max_duration = \"4s\"\n",
        );
        text.push_str(imap);
    })
    .await
}

async fn person(gateway: &Gateway, email: &str, groups: &[&str]) -> AgentHandle {
    AgentHandle::start(&gateway.issue(email, groups, Duration::from_secs(3600))).await
}

/// Stops the agents (which ends their sessions), then the broker.
async fn finish(gateway: Gateway, agents: impl IntoIterator<Item = AgentHandle>) {
    for agent in agents {
        agent.stop().await;
    }
    gateway.stop().await;
}

fn plain(authzid: &str, authcid: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{authzid}\0{authcid}\0{password}"))
}

fn last(lines: &[String]) -> &str {
    lines.last().map_or("", String::as_str)
}

async fn ones_own_mailbox_reads_the_same_bytes_with_login_and_authenticate_plain<S: MailServer>() {
    let server = mail_server::<S>();
    let gateway = imap_gateway(&server, None).await;
    let alice = person(&gateway, "alice@example.org", &[]).await;

    let direct = imap_fetch(server.addr(), &server.ca(), "alice", ALICE_PW)
        .await
        .unwrap();
    assert_eq!(direct["messages"].as_array().unwrap().len(), 4);
    let with_login = imap_fetch(alice.addr("mail"), alice.local_ca(), "alice", ALICE_PW)
        .await
        .unwrap();
    assert_eq!(with_login, direct);
    // Another spelling of the same mailbox, and the other way to log in.
    let with_plain = imap_fetch_with(
        alice.addr("mail"),
        alice.local_ca(),
        "ALICE@example.org",
        ALICE_PW,
        "plain",
    )
    .await
    .unwrap();
    assert_eq!(with_plain, direct);

    let allowed = gateway.audit_events("imap_login.allow");
    assert_eq!(allowed.len(), 2, "{allowed:?}");
    for event in &allowed {
        assert_eq!(event["postern"]["mailbox"], "alice", "{event}");
        assert_eq!(event["postern"]["policies"][0], "own-mailbox", "{event}");
    }
    finish(gateway, [alice]).await;
}

async fn curl_reads_a_message_through_the_imap_mode<S: MailServer>() {
    let server = mail_server::<S>();
    let gateway = imap_gateway(&server, None).await;
    let alice = person(&gateway, "alice@example.org", &[]).await;
    let fetch = |addr: std::net::SocketAddr, ca: std::path::PathBuf| async move {
        postern_tests::curl(&[
            "--cacert",
            ca.to_str().unwrap(),
            &format!("imaps://{addr}/INBOX;UID=2"),
            "--user",
            &format!("alice:{ALICE_PW}"),
        ])
        .await
    };
    let direct = fetch(server.addr(), server.ca()).await;
    let through = fetch(alice.addr("mail"), alice.local_ca().to_owned()).await;
    assert!(
        through.status.success(),
        "{}",
        String::from_utf8_lossy(&through.stderr)
    );
    assert!(direct.stdout.len() > 1000);
    assert_eq!(through.stdout, direct.stdout);
    finish(gateway, [alice]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mbsync_syncs_a_whole_mailbox_as_a_direct_sync_does() {
    let dovecot = Dovecot::start(&[("alice", ALICE_PW, Message::samples(300, 41))]);
    let gateway = imap_gateway(&dovecot, None).await;
    let alice = person(&gateway, "alice@example.org", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();

    let direct = postern_tests::mbsync(
        dovecot.addr(),
        &dovecot.ca(),
        "alice",
        ALICE_PW,
        "LOGIN",
        &dir.join("direct"),
    )
    .await
    .unwrap();
    assert_eq!(direct.len(), 300);
    let through = postern_tests::mbsync(
        alice.addr("mail"),
        alice.local_ca(),
        "alice@example.org",
        ALICE_PW,
        "PLAIN",
        &dir.join("through"),
    )
    .await
    .unwrap();
    let differing = through.iter().filter(|sum| !direct.contains(sum)).count();
    assert_eq!(
        (through.len(), differing),
        (300, 0),
        "messages synced through Postern, and how many differ from a direct sync"
    );
    finish(gateway, [alice]).await;
}

async fn another_persons_mailbox_is_refused_even_with_the_right_password<S: MailServer>() {
    let server = mail_server::<S>();
    let gateway = imap_gateway(&server, None).await;
    let alice = person(&gateway, "alice@example.org", &[]).await;

    let refused = imap_fetch(alice.addr("mail"), alice.local_ca(), "bob", BOB_PW)
        .await
        .unwrap_err();
    assert!(refused.contains("AUTHORIZATIONFAILED"), "{refused}");
    assert!(refused.contains("open the mailbox `bob`"), "{refused}");
    let denied = gateway
        .wait_for_audit("imap_login.deny", |e| e["postern"]["mailbox"] == "bob")
        .await;
    assert_eq!(denied["user"]["email"], "alice@example.org");
    // The password never reached the server.
    assert!(!server.saw_login("bob"), "{}", server.logs());
    finish(gateway, [alice]).await;
}

async fn a_shared_mailbox_opens_for_whom_policy_allows<S: MailServer>() {
    let policy = format!(
        "{}\n@id(\"sales-shared\")\npermit (principal in Group::\"sales-team\", action == Action::\"imap_login\", resource == Mailbox::\"sales\");\n",
        postern_policy::DEFAULT_POLICY
    );
    let server = mail_server::<S>();
    let gateway = imap_gateway(&server, Some(&policy)).await;
    let alice = person(&gateway, "alice@example.org", &["sales-team"]).await;
    let bob = person(&gateway, "bob@example.org", &[]).await;

    let shared = imap_fetch(alice.addr("mail"), alice.local_ca(), "sales", SALES_PW)
        .await
        .unwrap();
    assert_eq!(shared["messages"].as_array().unwrap().len(), 2);
    let refused = imap_fetch(bob.addr("mail"), bob.local_ca(), "sales", SALES_PW)
        .await
        .unwrap_err();
    assert!(refused.contains("AUTHORIZATIONFAILED"), "{refused}");
    let allowed = gateway
        .wait_for_audit("imap_login.allow", |e| e["postern"]["mailbox"] == "sales")
        .await;
    assert_eq!(allowed["postern"]["policies"][0], "sales-shared");
    finish(gateway, [alice, bob]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_lock_the_person_out_until_the_lock_ends() {
    let dovecot = mail_server::<Dovecot>();
    let gateway = imap_gateway(&dovecot, None).await;
    let alice = person(&gateway, "alice@example.org", &[]).await;
    let bob = person(&gateway, "bob@example.org", &[]).await;

    let (mut wire, _) = ImapWire::connect(alice.addr("mail"), alice.local_ca()).await;
    for tag in ["a", "b"] {
        wire.send(format!("{tag} LOGIN alice wrong-{tag}\r\n").as_bytes())
            .await;
        let lines = wire.until(tag).await;
        assert!(last(&lines).starts_with(&format!("{tag} NO")), "{lines:?}");
    }
    // The right password, now: refused without asking the server.
    wire.send(format!("d LOGIN alice {ALICE_PW}\r\n").as_bytes())
        .await;
    let locked = wire.until("d").await;
    assert!(
        last(&locked).starts_with("d NO [UNAVAILABLE]"),
        "{locked:?}"
    );
    gateway
        .wait_for_audit("imap_login.lockout", |e| e["postern"]["mailbox"] == "alice")
        .await;

    // Someone else is not locked out. (From another address: Dovecot itself slows down
    // logins from an address with failures, and the broker tells it the person's address.)
    // (The agent's socket is dual-stack: addresses are written as IPv6.)
    bob.move_to("[::ffff:127.0.0.2]:0".parse().unwrap());
    let (mut other, _) = ImapWire::connect(bob.addr("mail"), bob.local_ca()).await;
    other
        .send(format!("e LOGIN bob {BOB_PW}\r\n").as_bytes())
        .await;
    assert!(last(&other.until("e").await).starts_with("e OK"));
    drop((wire, other));
    let logs = dovecot.logs();
    let bob_login = logs
        .lines()
        .find(|line| line.contains("Login: user=<bob>"))
        .unwrap_or_default();
    assert!(bob_login.contains("rip=127.0.0.2"), "{logs}");

    tokio::time::sleep(Duration::from_millis(2500)).await;
    alice.move_to("[::ffff:127.0.0.3]:0".parse().unwrap());
    let (mut wire, _) = ImapWire::connect(alice.addr("mail"), alice.local_ca()).await;
    wire.send(format!("f LOGIN alice {ALICE_PW}\r\n").as_bytes())
        .await;
    let released = wire.until("f").await;
    assert!(last(&released).starts_with("f OK"), "{released:?}");
    finish(gateway, [alice, bob]).await;
}

async fn a_revoked_person_gets_bye_in_the_middle_of_idle<S: MailServer>() {
    let server = mail_server::<S>();
    let gateway = imap_gateway(&server, None).await;
    let identity = gateway.issue("alice@example.org", &[], Duration::from_secs(3600));
    let alice = AgentHandle::start(&identity).await;
    let mut idle = ImapIdle::start(alice.addr("mail"), alice.local_ca(), "alice", ALICE_PW).await;

    let user = postern_certs::inspect_unverified(&identity.certificate)
        .unwrap()
        .identity
        .user;
    let revoked = std::process::Command::new(env!("CARGO_BIN_EXE_postern-broker-under-test"))
        .args(["revoke", "--config", gateway.config.path.to_str().unwrap()])
        .args(["--user", &format!("{},{}", user.issuer(), user.subject())])
        .args(["--reason", "laptop stolen", "--yes"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(revoked.status.success(), "{revoked:?}");
    let ended = idle
        .ended_within(Duration::from_secs(5))
        .await
        .expect("the session ends");
    assert!(ended.contains("* BYE [UNAVAILABLE]"), "{ended}");
    assert!(ended.contains("revoked"), "{ended}");
    // A new connection is refused by the broker; the agent says so in IMAP.
    let (_, greeting) = ImapWire::connect(alice.addr("mail"), alice.local_ca()).await;
    assert!(greeting.starts_with("* BYE [UNAVAILABLE]"), "{greeting}");
    assert!(greeting.contains("revoked"), "{greeting}");
    finish(gateway, [alice]).await;
}

async fn pipelined_logins_are_each_checked_on_their_own<S: MailServer>() {
    let server = mail_server::<S>();
    let gateway = imap_gateway(&server, None).await;
    let alice = person(&gateway, "alice@example.org", &[]).await;
    let (mut wire, greeting) = ImapWire::connect(alice.addr("mail"), alice.local_ca()).await;
    assert!(
        greeting.starts_with("* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN]"),
        "{greeting}"
    );

    // A wrong password for oneself, then the right one for someone else, in one packet.
    wire.send(format!("a LOGIN alice wrong\r\nb LOGIN bob {BOB_PW}\r\n").as_bytes())
        .await;
    assert!(last(&wire.until("a").await).starts_with("a NO"));
    assert!(last(&wire.until("b").await).starts_with("b NO [AUTHORIZATIONFAILED]"));
    // Someone else first, then oneself: only the second is let through.
    wire.send(
        format!("c LOGIN bob {BOB_PW}\r\nd LOGIN alice {ALICE_PW}\r\ne SELECT INBOX\r\n")
            .as_bytes(),
    )
    .await;
    assert!(last(&wire.until("c").await).starts_with("c NO [AUTHORIZATIONFAILED]"));
    let lines = wire.until("d").await;
    assert!(last(&lines).starts_with("d OK"), "{lines:?}");
    // The command sent behind the login reaches the server once logged in.
    assert!(last(&wire.until("e").await).starts_with("e OK"));
    finish(gateway, [alice]).await;
}

async fn literals_split_across_packets_and_counted_both_ways_are_read_as_the_server_would<
    S: MailServer,
>() {
    let server = mail_server::<S>();
    let gateway = imap_gateway(&server, None).await;
    let alice = person(&gateway, "alice@example.org", &[]).await;
    let (mut wire, _) = ImapWire::connect(alice.addr("mail"), alice.local_ca()).await;

    // A synchronising literal, one byte per packet, naming bob; then his password as a
    // non-synchronising literal.
    wire.trickle(b"a LOGIN {3}\r\n").await;
    assert!(wire.line().await.starts_with('+'));
    wire.trickle(format!("bob {{{}+}}\r\n{BOB_PW}\r\n", BOB_PW.len()).as_bytes())
        .await;
    assert!(last(&wire.until("a").await).starts_with("a NO [AUTHORIZATIONFAILED]"));

    // A literal announced as 100 bytes but followed by a short line: the broker waits for the
    // 100 bytes, as the server would, and does not read a login out of them.
    let inside = format!("x\r\nc LOGIN bob {BOB_PW}\r\n");
    wire.send(format!("b LOGIN alice {{100+}}\r\n{inside}").as_bytes())
        .await;
    wire.send(&vec![b'y'; 100 - inside.len()]).await;
    wire.send(b"\r\n").await;
    let lines = wire.until("b").await;
    assert!(last(&lines).starts_with("b NO"), "{lines:?}");

    // The other way round, for oneself: it logs in.
    wire.send(format!("d LOGIN {{5+}}\r\nalice {{{}}}\r\n", ALICE_PW.len()).as_bytes())
        .await;
    assert!(wire.line().await.starts_with('+'));
    wire.send(format!("{ALICE_PW}\r\n").as_bytes()).await;
    let lines = wire.until("d").await;
    assert!(last(&lines).starts_with("d OK"), "{lines:?}");
    finish(gateway, [alice]).await;
}

async fn authorization_identities_and_other_mechanisms_are_refused<S: MailServer>() {
    let server = mail_server::<S>();
    let gateway = imap_gateway(&server, None).await;
    let alice = person(&gateway, "alice@example.org", &[]).await;
    let (mut wire, _) = ImapWire::connect(alice.addr("mail"), alice.local_ca()).await;

    // alice's password, acting as bob.
    wire.send(
        format!(
            "a AUTHENTICATE PLAIN {}\r\n",
            plain("bob", "alice", ALICE_PW)
        )
        .as_bytes(),
    )
    .await;
    assert!(last(&wire.until("a").await).starts_with("a NO [AUTHORIZATIONFAILED]"));
    wire.send(b"b AUTHENTICATE LOGIN\r\n").await;
    assert!(last(&wire.until("b").await).starts_with("b NO"));
    wire.send(b"c AUTHENTICATE XOAUTH2 dXNlcj1ib2IBYXV0aD1CZWFyZXIgeAEB\r\n")
        .await;
    assert!(last(&wire.until("c").await).starts_with("c NO"));
    wire.send(b"d STARTTLS\r\n").await;
    assert!(last(&wire.until("d").await).starts_with("d BAD"));
    wire.send(b"e SELECT INBOX\r\n").await;
    assert!(last(&wire.until("e").await).starts_with("e BAD"));
    // A cancelled exchange, then a correct one with an initial response.
    wire.send(b"f AUTHENTICATE PLAIN\r\n").await;
    assert!(wire.line().await.starts_with('+'));
    wire.send(b"*\r\n").await;
    assert!(last(&wire.until("f").await).starts_with("f BAD"));
    wire.send(
        format!(
            "g AUTHENTICATE PLAIN {}\r\n",
            plain("alice", "alice", ALICE_PW)
        )
        .as_bytes(),
    )
    .await;
    let lines = wire.until("g").await;
    assert!(last(&lines).starts_with("g OK"), "{lines:?}");
    finish(gateway, [alice]).await;
}

async fn login_names_the_server_could_read_as_someone_else_are_refused<S: MailServer>() {
    let server = mail_server::<S>();
    let gateway = imap_gateway(&server, None).await;
    let alice = person(&gateway, "alice@example.org", &[]).await;
    let (mut wire, _) = ImapWire::connect(alice.addr("mail"), alice.local_ca()).await;
    for (index, name) in [
        "alice*master",
        "alice%other",
        "alice+x",
        "alice@other.example",
        "bob!alice",
        "alice bob",
    ]
    .iter()
    .enumerate()
    {
        let tag = format!("n{index}");
        wire.send(format!("{tag} LOGIN \"{name}\" {ALICE_PW}\r\n").as_bytes())
            .await;
        let lines = wire.until(&tag).await;
        assert!(
            last(&lines).starts_with(&format!("{tag} NO [AUTHORIZATIONFAILED]")),
            "{name}: {lines:?}"
        );
    }
    wire.send(format!("ok LOGIN ALICE {ALICE_PW}\r\n").as_bytes())
        .await;
    assert!(last(&wire.until("ok").await).starts_with("ok OK"));
    assert_eq!(gateway.audit_events("imap_login.deny").len(), 6);
    finish(gateway, [alice]).await;
}

async fn commands_that_would_undo_the_binding_end_the_session_instead_of_reaching_the_server<
    S: MailServer,
>() {
    let server = mail_server::<S>();
    let gateway = imap_gateway(&server, None).await;
    let alice = person(&gateway, "alice@example.org", &[]).await;
    for (command, name) in [
        (
            format!("u UNAUTHENTICATE\r\nv LOGIN bob {BOB_PW}\r\n"),
            "UNAUTHENTICATE",
        ),
        ("z COMPRESS DEFLATE\r\n".to_owned(), "COMPRESS"),
        // What a rejecting server would read as commands, and the watch as a literal.
        (
            "x XYZZY {20+}\r\nb COMPRESS DEFLATE\r\n".to_owned(),
            "LITERAL+",
        ),
        // A tag too long to see the name behind it.
        (
            format!("{} UNAUTHENTICATE\r\n", "t".repeat(100)),
            "longer than clients send",
        ),
    ] {
        let (mut wire, _) = ImapWire::connect(alice.addr("mail"), alice.local_ca()).await;
        wire.send(format!("a LOGIN alice {ALICE_PW}\r\n").as_bytes())
            .await;
        let login = wire.until("a").await;
        assert!(last(&login).starts_with("a OK"), "{login:?}");
        assert!(!login.join(" ").contains("UNAUTHENTICATE"));
        assert!(!login.join(" ").contains("COMPRESS="));
        wire.send(command.as_bytes()).await;
        // A line already on its way may be answered first (the server refuses `XYZZY`: BAD,
        // or NO from Courier); nothing behind it reaches the server.
        let mut bye = wire.line().await;
        while bye.starts_with("x BAD") || bye.starts_with("x NO") {
            bye = wire.line().await;
        }
        assert!(bye.starts_with("* BYE [UNAVAILABLE]"), "{bye}");
        assert!(bye.contains(name), "{bye}");
        assert_eq!(wire.line().await, "", "the session ends");
        gateway
            .wait_for_audit("imap.refuse", |e| {
                e["event"]["reason"].as_str().unwrap_or("").contains(name)
            })
            .await;
    }
    finish(gateway, [alice]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_log_in_in_time_is_told_so() {
    let dovecot = mail_server::<Dovecot>();
    let gateway = imap_gateway_with(&dovecot, None, "login_timeout = \"1s\"\n").await;
    let alice = person(&gateway, "alice@example.org", &[]).await;
    let (mut wire, _) = ImapWire::connect(alice.addr("mail"), alice.local_ca()).await;
    wire.send(b"a NOOP\r\n").await;
    assert!(last(&wire.until("a").await).starts_with("a OK"));
    let bye = wire.line().await;
    assert!(
        bye.starts_with("* BYE [UNAVAILABLE] No login within 1s"),
        "{bye}"
    );
    assert_eq!(wire.line().await, "");
    gateway
        .wait_for_audit("session.close", |e| e["event"]["reason"] == "login_timeout")
        .await;
    finish(gateway, [alice]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_broker_tells_idle_mail_clients_to_reconnect_and_stops_early() {
    let dovecot = mail_server::<Dovecot>();
    // The default grace period: 30 s.
    let mut gateway = imap_gateway(&dovecot, None).await;
    let alice = person(&gateway, "alice@example.org", &[]).await;
    let mut idle = ImapIdle::start(alice.addr("mail"), alice.local_ca(), "alice", ALICE_PW).await;
    // Logged in and between commands.
    let (mut wire, _) = ImapWire::connect(alice.addr("mail"), alice.local_ca()).await;
    wire.send(format!("a LOGIN alice \"{ALICE_PW}\"\r\n").as_bytes())
        .await;
    assert!(last(&wire.until("a").await).starts_with("a OK"));

    gateway.begin_shutdown();
    let ended = idle
        .ended_within(Duration::from_secs(5))
        .await
        .expect("the IDLE client was told");
    assert!(
        ended.contains("* BYE [UNAVAILABLE] The gateway is restarting"),
        "{ended}"
    );
    let bye = wire.line().await;
    assert!(
        bye.starts_with("* BYE [UNAVAILABLE] The gateway is restarting"),
        "{bye}"
    );
    // With its mail clients gone, the broker stops long before the grace period ends.
    tokio::time::timeout(Duration::from_secs(15), gateway.join())
        .await
        .expect("the broker stopped once its sessions ended");
    let drain = gateway.audit_events("broker.drain");
    let trail = std::fs::read_to_string(gateway.audit_path()).unwrap();
    assert_eq!(drain.len(), 1, "{trail}");
    assert_eq!(drain[0]["postern"]["sessions"], 2, "{trail}");
    assert_eq!(drain[0]["postern"]["grace_seconds"], 30);
    assert_eq!(
        gateway.audit_events("broker.stop")[0]["postern"]["sessions_cut"],
        0
    );
    let closed = gateway.audit_events("session.close");
    assert_eq!(closed.len(), 2);
    assert!(
        closed.iter().all(|e| e["event"]["reason"] == "shutdown"),
        "{closed:#?}"
    );
    finish(gateway, [alice]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_upgrades_a_plain_port_with_starttls() {
    let dovecot = mail_server::<Dovecot>();
    let ca = dovecot.ca().display().to_string();
    let service = format!("tls = \"starttls\"\nca_file = {ca:?}\n");
    let gateway = gateway_to(dovecot.starttls_addr(), &service, None, "").await;
    let alice = person(&gateway, "alice@example.org", &[]).await;
    let direct = imap_fetch(dovecot.addr(), &dovecot.ca(), "alice", ALICE_PW)
        .await
        .unwrap();
    let through = imap_fetch(alice.addr("mail"), alice.local_ca(), "alice", ALICE_PW)
        .await
        .unwrap();
    assert_eq!(through, direct);
    finish(gateway, [alice]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_server_whose_certificate_is_not_trusted_is_not_used() {
    let dovecot = mail_server::<Dovecot>();
    // The broker's own CA, which did not sign Dovecot's certificate.
    let gateway = gateway_to(
        dovecot.addr(),
        "ca_file = \"pki/server-ca.pem\"\n",
        None,
        "",
    )
    .await;
    let alice = person(&gateway, "alice@example.org", &[]).await;
    let (_, greeting) = ImapWire::connect(alice.addr("mail"), alice.local_ca()).await;
    assert!(greeting.starts_with("* BYE [UNAVAILABLE]"), "{greeting}");
    assert!(
        greeting.contains("TLS with the mail server failed"),
        "{greeting}"
    );
    // The broker refused the certificate; nothing, not even a login name, went to the server.
    assert!(
        !dovecot.logs().contains("user=<alice"),
        "{}",
        dovecot.logs()
    );
    finish(gateway, [alice]).await;
}
