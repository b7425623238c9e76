//! The paths a benchmark client can take to a local TCP service, each set up on loopback:
//! directly, through Postern (broker and agent as processes), `ssh -L`, stunnel, and a bare
//! quinn pair with Postern's transport settings.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use postern_tests::{Running, bin, free_tcp_port, free_udp_port, wait_for_line};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A way to the service: where a client connects, and what keeps it up.
pub(crate) struct Route {
    /// Name in the table.
    pub(crate) name: String,
    /// Where clients connect (TCP), or `None` for the bare QUIC path.
    pub(crate) addr: Option<SocketAddr>,
    /// The bare QUIC client, for the QUIC ceiling.
    pub(crate) quic: Option<QuicClient>,
    _processes: Vec<Running>,
}

/// A QUIC client connected to the bare quinn server.
pub(crate) struct QuicClient {
    /// The connection; each stream is one transfer.
    pub(crate) connection: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl Route {
    fn tcp(name: &str, addr: SocketAddr, processes: Vec<Running>) -> Self {
        Self {
            name: name.to_owned(),
            addr: Some(addr),
            quic: None,
            _processes: processes,
        }
    }
}

/// A TCP service on 127.0.0.1 that sends `len` bytes to each connection (as a server sends a
/// mailbox), then closes; and answers `len` bytes on each bare QUIC stream the same way.
pub(crate) async fn source(len: u64) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let chunk = vec![0x5au8; 64 * 1024];
                let mut left = len;
                while left > 0 {
                    let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
                    if stream.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = stream.shutdown().await;
                // Wait for the client to close, so that nothing is cut.
                let mut sink = [0u8; 1];
                let _ = stream.read(&mut sink).await;
            });
        }
    });
    Ok(addr)
}

/// The direct path: the client connects to the service itself.
pub(crate) fn direct(service: SocketAddr) -> Route {
    Route::tcp("direct TCP", service, vec![])
}

/// Postern: `postern-broker init/issue/serve` and `postern login --bundle`/`up`, as processes.
pub(crate) fn postern(service: SocketAddr, work: &Path) -> anyhow::Result<Route> {
    let (broker, agent) = (bin("postern-broker"), bin("postern"));
    let dir = work.join("broker");
    let home = work.join("agent");
    let config = dir.join("broker.toml");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    run(
        &broker,
        &[
            "init",
            "--dir",
            path(&dir),
            "--hostname",
            "localhost",
            "--listen",
            &listen,
            "--service",
            &format!("bulk={service}"),
        ],
        &home,
    )?;
    let mut child = Command::new(&broker)
        .args(["serve", "--config", path(&config)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let log = child.stderr.take().context("broker stderr")?;
    let serving = Running(child);
    wait_for_line(log, "broker serving");
    let bundle = work.join("bench.bundle");
    run(
        &broker,
        &[
            "issue",
            "--config",
            path(&config),
            "--user",
            "bench@example.org",
            "--ttl",
            "4h",
            "--out",
            path(&bundle),
        ],
        &home,
    )?;
    run(&agent, &["login", "--bundle", path(&bundle)], &home)?;
    let mut child = Command::new(&agent)
        .args(["up", "--listen", "bulk=127.0.0.1:0"])
        .env("POSTERN_HOME", &home)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("agent stdout")?;
    let up = Running(child);
    let line = wait_for_line(stdout, "postern: bulk on");
    let addr = line
        .split_whitespace()
        .nth(3)
        .context("the agent names its address")?
        .parse()?;
    Ok(Route::tcp("Postern", addr, vec![serving, up]))
}

/// `ssh -L` through a private sshd on a free port, with its own keys, with `cipher` or the
/// default.
pub(crate) fn ssh(service: SocketAddr, work: &Path, cipher: Option<&str>) -> anyhow::Result<Route> {
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.exists() {
        bail!("sshd is missing: run scripts/bench, which installs openssh-server");
    }
    let dir = work.join(format!("ssh-{}", cipher.unwrap_or("default")));
    std::fs::create_dir_all(&dir)?;
    for (key, kind) in [("host", "ed25519"), ("client", "ed25519")] {
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", "", "-f", path(&dir.join(key))])
            .status()?;
        if !status.success() {
            bail!("ssh-keygen failed");
        }
    }
    std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys"))?;
    std::fs::create_dir_all("/run/sshd")?;
    let port = free_tcp_port();
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
         StrictModes no\nUsePAM no\nAllowTcpForwarding yes\nPermitRootLogin yes\n",
        path(&dir.join("host")),
        path(&dir.join("sshd.pid")),
        path(&dir.join("authorized_keys")),
    );
    std::fs::write(dir.join("sshd_config"), config)?;
    let sshd = Running(
        Command::new(sshd)
            .args(["-D", "-e", "-f", path(&dir.join("sshd_config"))])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log"))?)
            .spawn()?,
    );
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)))?;
    let local = free_tcp_port();
    let mut args = vec![
        "-N".to_owned(),
        "-i".into(),
        path(&dir.join("client")).to_owned(),
        "-o".into(),
        "StrictHostKeyChecking=no".into(),
        "-o".into(),
        "UserKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "ExitOnForwardFailure=yes".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
        "-p".into(),
        port.to_string(),
        "-L".into(),
        format!("127.0.0.1:{local}:{service}"),
    ];
    if let Some(cipher) = cipher {
        args.extend(["-c".to_owned(), cipher.to_owned()]);
    }
    args.push(format!("{user}@127.0.0.1"));
    let client = Running(
        Command::new("ssh")
            .args(&args)
            .stdin(Stdio::null())
            .spawn()?,
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], local));
    wait_for_port(addr)?;
    let name = match cipher {
        Some(cipher) => format!("ssh -L ({cipher})"),
        None => "ssh -L (default)".to_owned(),
    };
    Ok(Route::tcp(&name, addr, vec![sshd, client]))
}

/// stunnel client and server (TLS 1.3), each a process.
pub(crate) fn stunnel(service: SocketAddr, work: &Path) -> anyhow::Result<Route> {
    let program = ["/usr/bin/stunnel4", "/usr/bin/stunnel"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("stunnel is missing: run scripts/bench, which installs stunnel4")?;
    let dir = work.join("stunnel");
    std::fs::create_dir_all(&dir)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&key)?;
    std::fs::write(
        dir.join("server.pem"),
        format!("{}{}", cert.pem(), key.serialize_pem()),
    )?;
    let (server_port, client_port) = (free_tcp_port(), free_tcp_port());
    let server = format!(
        "foreground = yes\npid =\n[server]\naccept = 127.0.0.1:{server_port}\nconnect = {service}\n\
         cert = {}\nsslVersionMin = TLSv1.3\n",
        path(&dir.join("server.pem"))
    );
    let client = format!(
        "foreground = yes\npid =\n[client]\nclient = yes\naccept = 127.0.0.1:{client_port}\n\
         connect = 127.0.0.1:{server_port}\nsslVersionMin = TLSv1.3\n"
    );
    std::fs::write(dir.join("server.conf"), server)?;
    std::fs::write(dir.join("client.conf"), client)?;
    let spawn = |conf: &str| -> anyhow::Result<Running> {
        Ok(Running(
            Command::new(program)
                .arg(path(&dir.join(conf)))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("{conf}.log")))?)
                .spawn()?,
        ))
    };
    let processes = vec![spawn("server.conf")?, spawn("client.conf")?];
    let addr = SocketAddr::from(([127, 0, 0, 1], client_port));
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], server_port)))?;
    wait_for_port(addr)?;
    Ok(Route::tcp("stunnel (TLS 1.3)", addr, processes))
}

/// A bare quinn server and client in this process, with Postern's transport settings and TLS
/// 1.3 on both ends: what QUIC itself can carry here.
pub(crate) async fn quic(len: u64) -> anyhow::Result<Route> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&key)?;
    let provider = postern_certs::provider();
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    server_tls.alpn_protocols = vec![b"bench".to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?,
    ));
    let tuning = postern_transport::Tuning {
        idle_timeout: Duration::from_secs(120),
        keep_alive: None,
        max_concurrent_streams: 256,
        control_streams: 0,
    };
    server.transport_config(tuning.transport_config());
    let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse()?)?;
    let server_addr = endpoint.local_addr()?;
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                while let Ok((mut send, _recv)) = connection.accept_bi().await {
                    tokio::spawn(async move {
                        let chunk = vec![0x5au8; 64 * 1024];
                        let mut left = len;
                        while left > 0 {
                            let n = usize::try_from(left.min(chunk.len() as u64))
                                .unwrap_or(chunk.len());
                            if send.write_all(&chunk[..n]).await.is_err() {
                                return;
                            }
                            left -= n as u64;
                        }
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    });
                }
            });
        }
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone())?;
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![b"bench".to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?,
    ));
    client.transport_config(
        postern_transport::Tuning {
            max_concurrent_streams: 0,
            ..tuning
        }
        .transport_config(),
    );
    let mut client_endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    client_endpoint.set_default_client_config(client);
    let connection = client_endpoint.connect(server_addr, "localhost")?.await?;
    Ok(Route {
        name: "bare quinn".to_owned(),
        addr: None,
        quic: Some(QuicClient {
            connection,
            _endpoint: client_endpoint,
        }),
        _processes: vec![],
    })
}

fn run(program: &Path, args: &[&str], home: &Path) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .env("POSTERN_HOME", home)
        .output()?;
    if !output.status.success() {
        bail!(
            "{} {}: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

/// Waits until something accepts TCP connections on `addr`.
fn wait_for_port(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {addr} after 15 s")
}
