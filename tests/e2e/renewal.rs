//! A login renews without the person, keeping how and when they authenticated, until the
//! maximum session age; a renewal needs the key of the login it renews; logout revokes the
//! login at the IdP.

use std::path::Path;
use std::time::{Duration, SystemTime};

use postern_agent::Home;
use postern_agent::enroll::Session;
use postern_certs::{Bundle, KeyRequest, Sealed};
use postern_tests::{ALICE, AgentHandle, Approval, Gateway, Idp, IdpOptions, approve};

fn postern() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_postern-under-test"))
}

/// Logs Alice in through `gateway` into `home`.
async fn log_in(gateway: &Gateway, home: &Path) -> Bundle {
    let login = gateway.begin_login(postern(), home);
    let (url, code) = (login.url.clone().unwrap(), login.code.clone().unwrap());
    assert_eq!(
        approve(&url, &code, &ALICE, false).await,
        Approval::Approved
    );
    let (ok, output, errors) = login.finish();
    assert!(ok, "{output}\n{errors}");
    Home::at(home.to_owned()).identity().unwrap()
}

fn run(home: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(postern())
        .args(args)
        .env("POSTERN_HOME", home)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_the_login_and_stops_at_the_maximum_session_age() {
    let idp = Idp::start(&IdpOptions::default());
    let echo = postern_tests::echo_server().await;
    let gateway = Gateway::start_with_idp(
        &[("echo", echo)],
        &idp,
        "certificate_ttl = \"12s\"\nmax_session_age = \"30s\"",
    )
    .await;
    let home = tempfile::tempdir().unwrap();
    let first = log_in(&gateway, home.path()).await;
    let first_cert = first.inspect().unwrap();
    let session_ends = first.login.as_ref().unwrap().session_ends;
    assert_eq!(
        session_ends,
        first_cert.identity.auth.auth_time + Duration::from_secs(30)
    );

    let renewed = run(home.path(), &["renew"]);
    assert!(
        renewed.status.success(),
        "{}",
        String::from_utf8_lossy(&renewed.stderr)
    );
    let second = Home::at(home.path().to_owned()).identity().unwrap();
    let second_cert = second.inspect().unwrap();
    assert_ne!(second_cert.serial, first_cert.serial);
    assert_ne!(second.key, first.key, "a new key for every certificate");
    assert_ne!(
        second.login.as_ref().unwrap().sealed,
        first.login.as_ref().unwrap().sealed,
        "the IdP rotated the refresh token"
    );
    let (a, b) = (&first_cert.identity.auth, &second_cert.identity.auth);
    assert_eq!(
        (a.auth_time, &a.amr, a.lineage, a.device),
        (b.auth_time, &b.amr, b.lineage, b.device)
    );
    assert!(second_cert.not_after <= session_ends);
    let audited = gateway.wait_for_audit("renew.allow", |_| true).await;
    assert_eq!(audited["postern"]["lineage"], a.lineage.to_string());

    // The status says until when the login lasts.
    let status = run(home.path(), &["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("Login:        ends"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );

    // Close to the end of the session, renewal stops and asks for a login.
    let wait = session_ends
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .saturating_sub(Duration::from_secs(5));
    tokio::time::sleep(wait).await;
    let refused = run(home.path(), &["renew"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("maximum session age"), "{stderr}");
    assert!(stderr.contains("run `postern login`"), "{stderr}");
    gateway
        .wait_for_audit("renew.deny", |e| e["postern"]["code"] == "login_required")
        .await;
    gateway.stop().await;
    idp.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_renews_and_uses_the_new_certificate() {
    let idp = Idp::start(&IdpOptions::default());
    let echo = postern_tests::echo_server().await;
    let gateway =
        Gateway::start_with_idp(&[("echo", echo)], &idp, "certificate_ttl = \"15s\"").await;
    let home = tempfile::tempdir().unwrap();
    let first = log_in(&gateway, home.path()).await;
    let agent = AgentHandle::start_renewing(home.path()).await;

    // Renewal is due a third of the lifetime before the end; the agent stores what it gets.
    gateway
        .wait_for_audit_within("renew.allow", Duration::from_secs(20))
        .await;
    let first_serial = first.inspect().unwrap().serial;
    let mut serial = first_serial.clone();
    for _ in 0..100 {
        let stored = Home::at(home.path().to_owned()).identity().unwrap();
        serial = stored.inspect().unwrap().serial;
        if serial != first_serial {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(serial, first_serial);
    gateway
        .wait_for_audit("renew.allow", |e| e["x509"]["serial_number"] == serial)
        .await;

    // A new connection goes over a connection made with the renewed certificate.
    let mut stream = tokio::net::TcpStream::connect(agent.addr("echo"))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, b"ping")
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut buf)
        .await
        .unwrap();
    assert_eq!(&buf, b"ping");
    let renewed: Vec<_> = gateway
        .audit_events("renew.allow")
        .into_iter()
        .map(|e| e["x509"]["serial_number"].clone())
        .collect();
    let opened = gateway
        .wait_for_audit("connection.open", |e| {
            renewed.contains(&e["tls"]["client"]["x509"]["serial_number"])
        })
        .await;
    assert_ne!(
        opened["tls"]["client"]["x509"]["serial_number"],
        first_serial
    );
    agent.stop().await;
    gateway.stop().await;
    idp.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_token_without_its_key_renews_nothing() {
    let idp = Idp::start(&IdpOptions::default());
    let echo = postern_tests::echo_server().await;
    let gateway = Gateway::start_with_idp(&[("echo", echo)], &idp, "").await;
    let home = tempfile::tempdir().unwrap();
    let identity = log_in(&gateway, home.path()).await;

    // Another device holds a copy of the sealed token, but its own key.
    let stolen = Bundle {
        key: Some(KeyRequest::generate().unwrap().key_pem),
        ..identity.clone()
    };
    let session = Session::connect_for(&stolen).await.unwrap();
    let err = session.renew(&stolen).await.unwrap_err();
    session.close().await;
    assert!(err.to_string().contains("not signed by the key"), "{err}");
    gateway
        .wait_for_audit("renew.deny", |e| e["postern"]["code"] == "not_permitted")
        .await;

    // A sealed token changed by one bit does not open.
    let mut sealed = identity
        .login
        .as_ref()
        .unwrap()
        .sealed
        .clone()
        .unwrap()
        .expose()
        .to_vec();
    let last = sealed.len() - 1;
    sealed[last] ^= 1;
    let mut tampered = identity.clone();
    tampered.login.as_mut().unwrap().sealed = Some(Sealed::new(sealed));
    let session = Session::connect_for(&tampered).await.unwrap();
    let err = session.renew(&tampered).await.unwrap_err();
    session.close().await;
    assert!(err.login_required(), "{err}");

    // The rightful holder still renews.
    let session = Session::connect_for(&identity).await.unwrap();
    assert!(session.renew(&identity).await.is_ok());
    session.close().await;
    gateway.stop().await;
    idp.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_revokes_the_login_at_the_idp() {
    // A confidential client this time: the broker authenticates with its secret.
    let idp = Idp::start(&IdpOptions {
        client_secret: Some("broker-client-secret"),
        ..IdpOptions::default()
    });
    let echo = postern_tests::echo_server().await;
    let gateway = Gateway::start_with_idp(&[("echo", echo)], &idp, "").await;
    let home = tempfile::tempdir().unwrap();
    let identity = log_in(&gateway, home.path()).await;

    let out = run(home.path(), &["logout"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("The identity provider revoked the login"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!home.path().join("identity.toml").exists());
    gateway
        .wait_for_audit("logout", |e| e["postern"]["refresh_token_revoked"] == true)
        .await;

    // A copy kept from before the logout renews nothing any more.
    let session = Session::connect_for(&identity).await.unwrap();
    let err = session.renew(&identity).await.unwrap_err();
    session.close().await;
    assert!(err.login_required(), "{err}");
    gateway.stop().await;
    idp.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_logins_are_limited_and_ctrl_c_cancels_one() {
    let idp = Idp::start(&IdpOptions::default());
    let echo = postern_tests::echo_server().await;
    let gateway =
        Gateway::start_with_idp(&[("echo", echo)], &idp, "max_pending_per_source = 1").await;
    let (first_home, second_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    let first = gateway.begin_login(postern(), first_home.path());
    assert!(first.code.is_some());
    let second = gateway.begin_login(postern(), second_home.path());
    assert!(second.code.is_none());
    let (ok, _, errors) = second.finish();
    assert!(!ok);
    assert!(errors.contains("the broker is busy"), "{errors}");

    first.interrupt();
    let (ok, _, errors) = first.finish();
    assert!(!ok);
    assert!(errors.contains("login cancelled"), "{errors}");
    gateway
        .wait_for_audit("enroll.deny", |e| {
            e["event"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("cancelled"))
        })
        .await;

    // The slot is free again.
    let third = gateway.begin_login(postern(), second_home.path());
    assert!(third.code.is_some());
    third.interrupt();
    gateway.stop().await;
    idp.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_ended_during_sleep_is_renewed_when_the_agent_starts() {
    let idp = Idp::start(&IdpOptions::default());
    let echo = postern_tests::echo_server().await;
    let gateway =
        Gateway::start_with_idp(&[("echo", echo)], &idp, "certificate_ttl = \"12s\"").await;
    let home = tempfile::tempdir().unwrap();
    let first = log_in(&gateway, home.path()).await;
    let ended = first.inspect().unwrap().not_after;
    let asleep =
        ended.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(2);
    tokio::time::sleep(asleep).await;

    let status = run(home.path(), &["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout)
            .contains("`postern up` or `postern renew` renews it"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    let mut child = std::process::Command::new(postern())
        .args(["up", "--listen", "echo=127.0.0.1:0"])
        .env("POSTERN_HOME", home.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let up = postern_tests::Running(child);
    let renewing = postern_tests::wait_for_line(stderr, "renewing it");
    assert!(
        renewing.contains("ended while this device was away"),
        "{renewing}"
    );
    let line = postern_tests::wait_for_line(stdout, "postern: echo on");
    let addr: std::net::SocketAddr = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, b"awake")
        .await
        .unwrap();
    let mut back = [0u8; 5];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut back)
        .await
        .unwrap();
    assert_eq!(&back, b"awake");
    let renewed = Home::at(home.path().to_owned()).identity().unwrap();
    assert!(renewed.inspect().unwrap().not_after > SystemTime::now());
    assert!(up.terminate().success());
    gateway.stop().await;
    idp.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sleep_longer_than_the_certificate_the_first_program_is_served_with_a_renewed_one()
{
    let idp = Idp::start(&IdpOptions::default());
    let echo = postern_tests::echo_server().await;
    let table = idp.oidc_table();
    let gateway = Gateway::start_with(&[("echo", echo)], None, |text| {
        // No tolerance for clock skew: the broker ends the connection when the certificate
        // ends, as it does, a minute later, by default.
        *text = text
            .replace("[login]\n", "[login]\ncertificate_ttl = \"12s\"\n")
            .replace("# max_clock_skew = \"60s\"", "max_clock_skew = \"1s\"");
        text.push_str(&table);
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let first = log_in(&gateway, home.path()).await;
    let log = home.path().join("up.log");
    let mut child = std::process::Command::new(postern())
        .args(["up", "--listen", "echo=127.0.0.1:0"])
        .env("POSTERN_HOME", home.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let up = postern_tests::Running(child);
    let line = postern_tests::wait_for_line(stdout, "postern: echo on");
    let addr: std::net::SocketAddr = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    let echo_once = |text: &'static [u8]| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, text)
            .await
            .unwrap();
        let mut back = vec![0u8; text.len()];
        tokio::time::timeout(
            Duration::from_secs(20),
            tokio::io::AsyncReadExt::read_exact(&mut stream, &mut back),
        )
        .await
        .map(|read| read.map(|_| back))
    };
    assert_eq!(echo_once(b"before").await.unwrap().unwrap(), b"before");

    // The laptop sleeps (the agent runs no code) until well after its certificate ended; the
    // broker meanwhile closed the connection that certificate opened.
    let before = std::fs::read_to_string(&log).unwrap();
    assert!(
        !before.contains("certificate renewed"),
        "renewed before the sleep: the test would not show a wake\n{before}"
    );
    up.freeze();
    let ended = first.inspect().unwrap().not_after;
    let asleep =
        ended.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(3);
    tokio::time::sleep(asleep).await;
    up.thaw();
    // A program connects at once: it is served, over a renewed certificate.
    assert_eq!(
        echo_once(b"awake").await.expect("answered").expect("read"),
        b"awake"
    );
    let renewed = Home::at(home.path().to_owned()).identity().unwrap();
    assert!(renewed.inspect().unwrap().not_after > SystemTime::now());
    // The ended certificate was never offered to the broker, and nothing was refused.
    assert!(gateway.audit_events("connection.deny").is_empty());
    let refused: Vec<_> = gateway
        .audit_events("connect.deny")
        .into_iter()
        .filter(|e| e["postern"]["refuse_code"] == "certificate_expired")
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
    assert!(up.terminate().success());
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("asleep or stopped"), "{said}");
    assert!(said.contains("certificate renewed"), "{said}");
    gateway.stop().await;
    idp.stop();
}
