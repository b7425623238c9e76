//! On Linux, a program of another local user cannot ride this user's tunnel.

use std::os::unix::process::CommandExt as _;
use std::time::Duration;

use postern_tests::{AgentHandle, Gateway};

/// Connects to `addr` as `uid`, sends a line and prints how many bytes came back (`reset` if
/// the connection was reset).
fn probe_as(uid: u32, addr: std::net::SocketAddr) -> String {
    let script = format!(
        "import socket\ns = socket.create_connection(('{}', {}), timeout=10)\n\
         try:\n    s.sendall(b'hello\\n')\n    print(len(s.recv(100)))\nexcept ConnectionResetError:\n    print('reset')\n",
        addr.ip(),
        addr.port()
    );
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_cannot_use_the_listener() {
    if !postern_tests::is_root() {
        eprintln!("SKIPPED: needs root to run a client as a second user (CI runs as root)");
        return;
    }
    let gateway = Gateway::start(&[("echo", postern_tests::echo_server().await)]).await;
    let agent =
        AgentHandle::start(&gateway.issue("alice@example.org", &[], Duration::from_secs(600)))
            .await;
    let addr = agent.addr("echo");

    let ours = tokio::task::spawn_blocking(move || probe_as(0, addr))
        .await
        .unwrap();
    assert_eq!(ours, "6", "the agent's own user gets the echo");
    gateway.wait_for_audit("connect.allow", |_| true).await;

    let nobody = tokio::task::spawn_blocking(move || probe_as(65534, addr))
        .await
        .unwrap();
    assert!(
        nobody == "0" || nobody == "reset",
        "another user gets nothing: {nobody}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        gateway.audit_events("connect.allow").len(),
        1,
        "nothing reached the broker for the other user"
    );
}
