//! A person logs in with their second factor at a real OpenID provider, approving the device code
//! in a real browser; the broker — never the laptop — holds the tokens, and the certificate it
//! issues opens the tunnel to the real Dovecot. Without the second factor, or when the person
//! refuses or waits too long, the login ends with a sentence that says why.

use std::path::Path;
use std::time::Duration;

use postern_agent::Home;
use postern_tests::{
    ALICE, AgentHandle, Approval, BOB, Dovecot, Gateway, Idp, IdpOptions, Message, approve,
    imap_fetch,
};

/// Whether `text` holds something shaped like a JWT: `eyJ…` (base64url of `{"`), a dot, `eyJ…`.
/// Base64 and PEM never hold dots, so this does not match by chance.
fn holds_a_jwt(text: &str) -> bool {
    text.match_indices("eyJ").any(|(at, _)| {
        let rest = &text[at..];
        let header = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .unwrap_or(rest.len());
        rest[header..].starts_with(".eyJ")
    })
}

fn postern() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_postern-under-test"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_with_totp_opens_the_tunnel_to_the_mail() {
    let dovecot = Dovecot::start(&[("alice", "imap password", Message::samples(5, 3))]);
    let idp = Idp::start(&IdpOptions::default());
    let gateway = Gateway::start_with_idp(&[("imap", dovecot.addr())], &idp, "").await;
    let home = tempfile::tempdir().unwrap();

    let login = gateway.begin_login(postern(), home.path());
    let (url, code) = (login.url.clone().unwrap(), login.code.clone().unwrap());
    assert!(url.starts_with(&idp.issuer), "{url}");
    assert_eq!(
        approve(&url, &code, &ALICE, false).await,
        Approval::Approved
    );
    let (ok, output, errors) = login.finish();
    assert!(ok, "{output}\n{errors}");
    assert!(
        output.contains(
            "Approve only a code this terminal shows you. This login is for broker localhost"
        ),
        "{output}"
    );
    assert!(
        output.contains("Logged in as alice@example.org"),
        "{output}"
    );

    // The identity on disk: a certificate for the IdP's subject, with the MFA methods, and a
    // sealed refresh token, never the token itself.
    let identity = Home::at(home.path().to_owned()).identity().unwrap();
    let certificate = identity.inspect().unwrap();
    assert_eq!(certificate.identity.user.issuer(), idp.issuer);
    assert_eq!(certificate.identity.user.subject(), "alice");
    assert_eq!(certificate.identity.auth.amr, ["pwd", "otp"]);
    assert_eq!(
        certificate.identity.email.as_deref(),
        Some("alice@example.org")
    );
    let stored = std::fs::read_to_string(home.path().join("identity.toml")).unwrap();
    assert!(stored.contains("sealed_refresh_token"));
    assert!(
        !holds_a_jwt(&stored),
        "no JWT (ID or access token) reaches the laptop"
    );

    let enrolled = gateway.wait_for_audit("enroll.allow", |_| true).await;
    assert_eq!(enrolled["user"]["id"], format!("{}#alice", idp.issuer));
    assert_eq!(enrolled["postern"]["flow"], "device_code");
    assert_eq!(enrolled["source"]["ip"], "127.0.0.1");
    assert_eq!(enrolled["postern"]["policies"][0], "login-requires-mfa");
    assert!(enrolled["postern"]["device"].as_str().unwrap().len() == 32);

    let agent = AgentHandle::start(&identity).await;
    let direct = imap_fetch(dovecot.addr(), &dovecot.ca(), "alice", "imap password")
        .await
        .unwrap();
    let tunnelled = imap_fetch(agent.addr("imap"), &dovecot.ca(), "alice", "imap password")
        .await
        .unwrap();
    assert_eq!(direct["messages"].as_array().unwrap().len(), 5);
    assert_eq!(tunnelled, direct);
    agent.stop().await;
    gateway.stop().await;
    idp.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_without_a_second_factor_is_refused() {
    let idp = Idp::start(&IdpOptions::default());
    let echo = postern_tests::echo_server().await;
    let gateway = Gateway::start_with_idp(&[("echo", echo)], &idp, "").await;
    let home = tempfile::tempdir().unwrap();

    let login = gateway.begin_login(postern(), home.path());
    let (url, code) = (login.url.clone().unwrap(), login.code.clone().unwrap());
    assert_eq!(approve(&url, &code, &BOB, false).await, Approval::Approved);
    let (ok, output, errors) = login.finish();
    assert!(!ok, "{output}");
    assert!(errors.contains("a second factor is required"), "{errors}");
    assert!(!home.path().join("identity.toml").exists());
    let denied = gateway.wait_for_audit("enroll.deny", |_| true).await;
    assert_eq!(denied["postern"]["amr"][0], "pwd");
    assert_eq!(denied["postern"]["code"], "not_permitted");
    assert_eq!(denied["user"]["id"], format!("{}#bob", idp.issuer));
    gateway.stop().await;
    idp.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_at_the_idp_and_an_expired_code_are_reported() {
    let idp = Idp::start(&IdpOptions {
        device_code_ttl: Duration::from_secs(8),
        ..IdpOptions::default()
    });
    let echo = postern_tests::echo_server().await;
    let gateway = Gateway::start_with_idp(&[("echo", echo)], &idp, "").await;
    let home = tempfile::tempdir().unwrap();

    let login = gateway.begin_login(postern(), home.path());
    let (url, code) = (login.url.clone().unwrap(), login.code.clone().unwrap());
    assert_eq!(approve(&url, &code, &ALICE, true).await, Approval::Denied);
    let (ok, _, errors) = login.finish();
    assert!(!ok);
    assert!(
        errors.contains("login denied at the identity provider"),
        "{errors}"
    );
    let denied = gateway
        .wait_for_audit("enroll.deny", |e| e["postern"]["code"] == "access_denied")
        .await;
    assert_eq!(denied["postern"]["device"].as_str().unwrap().len(), 32);
    assert_eq!(denied["postern"]["flow"], "device_code");
    assert_eq!(denied["source"]["ip"], "127.0.0.1");

    let login = gateway.begin_login(postern(), home.path());
    assert!(login.code.is_some());
    let (ok, _, errors) = login.finish();
    assert!(!ok);
    assert!(errors.contains("the code expired"), "{errors}");
    gateway
        .wait_for_audit("enroll.deny", |e| e["postern"]["code"] == "expired")
        .await;
    gateway.stop().await;
    idp.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_client_secret_is_a_setup_problem_for_the_admin() {
    let idp = Idp::start(&IdpOptions {
        client_secret: Some("the right one"),
        ..IdpOptions::default()
    });
    std::fs::write(idp.client_secret_file.as_ref().unwrap(), "a wrong one\n").unwrap();
    let echo = postern_tests::echo_server().await;
    let gateway = Gateway::start_with_idp(&[("echo", echo)], &idp, "").await;
    let home = tempfile::tempdir().unwrap();
    let login = gateway.begin_login(postern(), home.path());
    assert!(login.code.is_none(), "no code without a working client");
    let (ok, _, errors) = login.finish();
    assert!(!ok);
    assert!(errors.contains("setup problem for your admin"), "{errors}");
    let denied = gateway
        .wait_for_audit("enroll.deny", |e| e["postern"]["code"] == "idp_error")
        .await;
    assert!(
        denied["event"]["reason"]
            .as_str()
            .unwrap()
            .contains("invalid_client"),
        "{denied}"
    );
    gateway.stop().await;
    idp.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_idp_is_reported_and_tunnels_keep_working() {
    let idp = Idp::start(&IdpOptions::default());
    let echo = postern_tests::echo_server().await;
    let gateway = Gateway::start_with_idp(&[("echo", echo)], &idp, "").await;
    idp.stop();
    let home = tempfile::tempdir().unwrap();
    let login = gateway.begin_login(postern(), home.path());
    assert!(login.code.is_none());
    let (ok, _, errors) = login.finish();
    assert!(!ok);
    assert!(
        errors.contains("the identity provider is unavailable: the broker cannot reach the identity provider right now"),
        "{errors}"
    );
    gateway
        .wait_for_audit("enroll.deny", |e| e["postern"]["code"] == "idp_unavailable")
        .await;
    // Identities already issued do not depend on the IdP.
    let identity = gateway.issue("machine@example.org", &[], Duration::from_secs(600));
    let agent = AgentHandle::start(&identity).await;
    let mut stream = tokio::net::TcpStream::connect(agent.addr("echo"))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, b"ping")
        .await
        .unwrap();
    let mut back = [0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut back)
        .await
        .unwrap();
    assert_eq!(&back, b"ping");
    agent.stop().await;
    gateway.stop().await;
}
