//! The paths a benchmark client can take to a local TCP service, each set up on loopback:
//! directly, through Postern (broker and agent as processes), `ssh -L`, stunnel, and a bare
//! quinn pair with Postern's transport settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
    /// The process at the server's end (broker, sshd, stunnel server), whose memory and CPU
    /// time count; with its children.
    pub(crate) server: Option<u32>,
    /// The process at the client's end (agent, ssh, stunnel client).
    pub(crate) client: Option<u32>,
    _processes: Vec<Running>,
}

/// A QUIC client connected to the bare quinn server.
pub(crate) struct QuicClient {
    /// The connection; each stream is one transfer.
    pub(crate) connection: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl Route {
    pub(crate) fn tcp(name: &str, addr: SocketAddr, processes: Vec<Running>) -> Self {
        Self {
            name: name.to_owned(),
            addr: Some(addr),
            quic: None,
            server: None,
            client: None,
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

/// Postern: `postern-broker init/issue/serve` and `postern login --bundle`/`up`, as processes,
/// with one opaque service `bulk`.
pub(crate) fn postern(service: SocketAddr, work: &Path) -> anyhow::Result<Route> {
    let postern = Postern::start(
        work,
        &["--service".to_owned(), format!("bulk={service}")],
        &["bulk"],
        |toml| toml,
        1,
    )?;
    let addr = postern.addr(0, "bulk");
    let (server, client) = (postern.broker.0.id(), postern.agents[0].running.0.id());
    Ok(Route {
        server: Some(server),
        client: Some(client),
        ..Route::tcp("Postern", addr, postern.into_processes())
    })
}

/// A broker and its agents, each a process: what `postern-broker init`, `issue` and `serve`,
/// and `postern login --bundle` and `up` set up.
pub(crate) struct Postern {
    pub(crate) broker: Running,
    pub(crate) agents: Vec<Agent>,
}

/// One `postern up` with its own home, serving every service on 127.0.0.1 with a free port.
pub(crate) struct Agent {
    pub(crate) running: Running,
    addrs: Vec<(String, SocketAddr)>,
    pub(crate) home: PathBuf,
}

impl Postern {
    /// A broker made by `init` with the arguments `init` (its services), its `broker.toml`
    /// passed through `edit`, and `agents` agents of one person, each serving the services
    /// `names`.
    pub(crate) fn start(
        work: &Path,
        init: &[String],
        names: &[&str],
        edit: impl FnOnce(String) -> String,
        agents: usize,
    ) -> anyhow::Result<Self> {
        let (broker, agent) = (bin("postern-broker"), bin("postern"));
        let dir = work.join("broker");
        let config = dir.join("broker.toml");
        let listen = format!("127.0.0.1:{}", free_udp_port());
        let mut args = vec![
            "init".to_owned(),
            "--dir".into(),
            path(&dir).into(),
            "--hostname".into(),
            "localhost".into(),
            "--listen".into(),
            listen,
        ];
        args.extend(init.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&broker, &args, work)?;
        std::fs::write(&config, edit(std::fs::read_to_string(&config)?))?;
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
            work,
        )?;
        let mut started = Vec::with_capacity(agents);
        for n in 0..agents {
            let home = work.join(format!("agent-{n}"));
            run(&agent, &["login", "--bundle", path(&bundle)], &home)?;
            let mut child = Command::new(&agent);
            child.arg("up");
            for name in names {
                child.args(["--listen", &format!("{name}=127.0.0.1:0")]);
            }
            let mut child = child
                .env("POSTERN_HOME", &home)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            let stdout = child.stdout.take().context("agent stdout")?;
            let running = Running(child);
            // `postern: <name> on <address> …`, one line per service.
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
            let mut addrs = Vec::new();
            while addrs.len() < names.len() {
                let line = lines.next().context("the agent names its addresses")??;
                let words: Vec<&str> = line.split_whitespace().collect();
                if let (Some(&"postern:"), Some(name), Some(Ok(addr))) =
                    (words.first(), words.get(1), words.get(3).map(|a| a.parse()))
                {
                    addrs.push(((*name).to_owned(), addr));
                }
            }
            std::thread::spawn(move || lines.for_each(drop));
            started.push(Agent {
                running,
                addrs,
                home,
            });
        }
        Ok(Self {
            broker: serving,
            agents: started,
        })
    }

    /// The process ids of the agents.
    pub(crate) fn agent_pids(&self) -> Vec<u32> {
        self.agents.iter().map(|a| a.running.0.id()).collect()
    }

    /// Where agent `n` serves `name`.
    pub(crate) fn addr(&self, n: usize, name: &str) -> SocketAddr {
        let agent = &self.agents[n];
        agent
            .addrs
            .iter()
            .find(|(service, _)| service == name)
            .map(|&(_, addr)| addr)
            .unwrap_or_else(|| panic!("the agent serves {name}"))
    }

    /// The CA agent `n` serves IMAP services with.
    pub(crate) fn local_ca(&self, n: usize) -> PathBuf {
        self.agents[n].home.join("local-ca.pem")
    }

    /// Every process, broker first.
    pub(crate) fn into_processes(self) -> Vec<Running> {
        std::iter::once(self.broker)
            .chain(self.agents.into_iter().map(|a| a.running))
            .collect()
    }
}

/// `ssh -L` through a private sshd on a free port, with its own keys, with `cipher` or the
/// default.
pub(crate) fn ssh(service: SocketAddr, work: &Path, cipher: Option<&str>) -> anyhow::Result<Route> {
    ssh_forward(service, work, cipher, false)
}

/// `ssh -L` with a terminal session beside the forwarding (`-tt`, a remote `sleep`): OpenSSH
/// then takes the connection for interactive and sets `TCP_NODELAY` at both ends, which a bare
/// `ssh -N -L` does not, so small replies are not held back by Nagle's algorithm.
pub(crate) fn ssh_nodelay(service: SocketAddr, work: &Path) -> anyhow::Result<Route> {
    ssh_forward(service, &work.join("nodelay"), None, true)
}

fn ssh_forward(
    service: SocketAddr,
    work: &Path,
    cipher: Option<&str>,
    interactive: bool,
) -> anyhow::Result<Route> {
    let (sshd, mut args) = sshd(work, cipher)?;
    let local = free_tcp_port();
    args.extend(["-L".to_owned(), format!("127.0.0.1:{local}:{service}")]);
    if interactive {
        args.extend(["-tt".to_owned(), "127.0.0.1".into(), "sleep 100000".into()]);
    } else {
        args.extend(["-N".to_owned(), "127.0.0.1".into()]);
    }
    let client = Running(
        Command::new("ssh")
            .args(&args)
            .stdin(Stdio::null())
            .spawn()?,
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], local));
    wait_for_port(addr)?;
    let name = match (cipher, interactive) {
        (_, true) => "ssh -L -tt (TCP_NODELAY)".to_owned(),
        (Some(cipher), false) => format!("ssh -L ({cipher})"),
        (None, false) => "ssh -L (default)".to_owned(),
    };
    Ok(Route {
        server: Some(sshd.0.id()),
        client: Some(client.0.id()),
        ..Route::tcp(&name, addr, vec![sshd, client])
    })
}

/// A private sshd on a free port with its own keys, and the options that make `ssh` log in to
/// it (with `cipher`, or the default); its host, `127.0.0.1`, goes after them.
pub(crate) fn sshd(work: &Path, cipher: Option<&str>) -> anyhow::Result<(Running, Vec<String>)> {
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
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let mut args = vec![
        "-i".to_owned(),
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
        "-l".into(),
        user,
    ];
    if let Some(cipher) = cipher {
        args.extend(["-c".to_owned(), cipher.to_owned()]);
    }
    Ok((sshd, args))
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
    Ok(Route {
        server: Some(processes[0].0.id()),
        client: Some(processes[1].0.id()),
        ..Route::tcp("stunnel (TLS 1.3)", addr, processes)
    })
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
    let endpoint = postern_transport::endpoint("127.0.0.1:0".parse()?, Some(server))?;
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
    let mut client_endpoint = postern_transport::endpoint("127.0.0.1:0".parse()?, None)?;
    client_endpoint.set_default_client_config(client);
    let connection = client_endpoint.connect(server_addr, "localhost")?.await?;
    Ok(Route {
        name: "bare quinn".to_owned(),
        addr: None,
        quic: Some(QuicClient {
            connection,
            _endpoint: client_endpoint,
        }),
        server: None,
        client: None,
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
