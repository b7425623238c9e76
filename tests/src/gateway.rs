//! A broker made by `postern-broker init` and served in-process, and an agent in front of it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use postern_broker::Broker;
use postern_broker::audit::Audit;
use postern_broker::config::Config;
use postern_broker::init::{InitOptions, init};
use postern_broker::issue::{IssueOptions, issue};
use postern_certs::{Bundle, ClientCa, ClientCredential, SecretPem};
use postern_proto::ServiceName;
use serde_json::Value;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A broker folder and the broker serving it on 127.0.0.1.
#[derive(Debug)]
pub struct Gateway {
    /// The broker folder.
    pub dir: TempDir,
    /// Its configuration, with `public_address` set to the bound port.
    pub config: Config,
    /// Where the broker listens.
    pub addr: SocketAddr,
    /// The metrics endpoint, when `metrics.listen` is set.
    pub metrics: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// An agent serving an identity on free loopback ports.
#[derive(Debug)]
pub struct AgentHandle {
    /// Each service and where it is served.
    pub addresses: Vec<(ServiceName, SocketAddr)>,
    tunnel: std::sync::Arc<postern_agent::tunnel::Tunnel>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    /// The local CA IMAP services are served with, as `postern trust` would show it.
    local_ca: Option<tempfile::NamedTempFile>,
}

impl Gateway {
    /// `postern-broker init` with `services` (name, upstream), then serve.
    pub async fn start(services: &[(&str, SocketAddr)]) -> Self {
        Self::start_with(services, None, |_| {}).await
    }

    /// Like [`start`](Self::start), with `policy` replacing the starting policy and `edit`
    /// changing `broker.toml` before the broker reads it.
    pub async fn start_with(
        services: &[(&str, SocketAddr)],
        policy: Option<&str>,
        edit: impl FnOnce(&mut String),
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("postern-broker-")
            .tempdir()
            .unwrap();
        let options = InitOptions {
            dir: dir.path().join("broker"),
            hostname: "localhost".into(),
            listen: "127.0.0.1:0".into(),
            services: services
                .iter()
                .map(|(name, addr)| format!("{name}={addr}"))
                .collect(),
            mail_ca: None,
            oidc: None,
        };
        let config_path = init(&options, SystemTime::now()).unwrap();
        if let Some(policy) = policy {
            std::fs::write(dir.path().join("broker/policies/default.cedar"), policy).unwrap();
        }
        let mut text = std::fs::read_to_string(&config_path).unwrap();
        edit(&mut text);
        std::fs::write(&config_path, &text).unwrap();

        let mut config = Config::load(&config_path).unwrap();
        let broker = Broker::start(config.clone()).unwrap();
        let addr = broker.local_addr();
        let metrics = broker.metrics_addr();
        config.public_address = format!("localhost:{}", addr.port());
        let shutdown = broker.shutdown_token();
        let task = tokio::spawn(broker.run());
        Gateway {
            dir,
            config,
            addr,
            metrics,
            shutdown,
            task: Some(task),
        }
    }

    /// `init`, an `[oidc]` table for `idp` (with `login` settings from `login_settings`, TOML
    /// lines), then serve.
    pub async fn start_with_idp(
        services: &[(&str, SocketAddr)],
        idp: &crate::Idp,
        login_settings: &str,
    ) -> Self {
        let table = idp.oidc_table();
        Self::start_with(services, None, |text| {
            if !login_settings.is_empty() {
                *text = text.replace("[login]\n", &format!("[login]\n{login_settings}\n"));
            }
            text.push_str(&table);
        })
        .await
    }

    /// The pin of the broker's server CA, as `init` prints it.
    pub fn pin(&self) -> String {
        let cas = postern_certs::store::read_certificates(&self.config.pki.server_ca).unwrap();
        postern_certs::Pin::of(&cas[0]).unwrap().to_string()
    }

    /// Starts `postern login --broker … --pin …` (the binary `postern`) for the agent home
    /// `home`, as a person would, and waits until it shows the code.
    pub fn begin_login(&self, postern: &std::path::Path, home: &std::path::Path) -> LoginRun {
        let mut child = std::process::Command::new(postern)
            .args(["login", "--no-browser", "--broker"])
            .arg(format!("localhost:{}", self.addr.port()))
            .args(["--pin", &self.pin()])
            .env("POSTERN_HOME", home)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let running = crate::Running(child);
        let (lines, received) = std::sync::mpsc::channel::<String>();
        let out_lines = lines;
        std::thread::spawn(move || {
            for line in
                std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok)
            {
                let _ = out_lines.send(line);
            }
        });
        let errors = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = errors.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut text);
            sink.lock().unwrap().push_str(&text);
        });
        let mut output = String::new();
        let (mut url, mut code) = (None, None);
        while url.is_none() || code.is_none() {
            let Ok(line) = received.recv_timeout(Duration::from_secs(30)) else {
                break;
            };
            if let Some(rest) = line.trim().strip_prefix("Open:") {
                url = Some(rest.trim().to_owned());
            }
            if let Some(rest) = line.trim().strip_prefix("Code:") {
                code = Some(rest.trim().to_owned());
            }
            output.push_str(&line);
            output.push('\n');
        }
        LoginRun {
            url,
            code,
            output,
            lines: received,
            errors,
            process: running,
        }
    }

    /// The folder holding `broker.toml`.
    pub fn broker_dir(&self) -> PathBuf {
        self.dir.path().join("broker")
    }

    /// An admin-issued bundle for `user`, made by `postern-broker issue`'s code.
    pub fn issue(&self, user: &str, groups: &[&str], ttl: Duration) -> Bundle {
        let out = self.dir.path().join(format!(
            "{user}-{}.bundle",
            crate::random_bytes(4)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ));
        let options = IssueOptions {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ttl,
            csr: None,
            out: out.clone(),
        };
        let audit = Audit::open(&self.config.audit).unwrap();
        issue(&self.config, &options, &audit, SystemTime::now()).unwrap();
        Bundle::from_toml(&std::fs::read_to_string(out).unwrap()).unwrap()
    }

    /// The broker's client CA, to sign certificates the issue command would not.
    pub fn client_ca(&self) -> ClientCa {
        let pki = self.broker_dir().join("pki");
        ClientCa::from_pem(
            &std::fs::read_to_string(pki.join("client-ca.pem")).unwrap(),
            &std::fs::read_to_string(pki.join("client-ca.key")).unwrap(),
        )
        .unwrap()
    }

    /// `bundle`'s identity (the same login: user, lineage, device) certified for a new key for
    /// `ttl` from now, as a renewal would; for lifetimes `issue` would not make.
    pub fn recertify(&self, bundle: &Bundle, ttl: Duration) -> Bundle {
        let identity = postern_certs::inspect_unverified(&bundle.certificate)
            .unwrap()
            .identity;
        let request = postern_certs::KeyRequest::generate().unwrap();
        let key = postern_certs::PublicKey::from_csr_pem(request.csr_pem.as_bytes()).unwrap();
        let certificate = self
            .client_ca()
            .issue(&identity, &key, SystemTime::now(), ttl)
            .unwrap();
        Self::rebundle(bundle, certificate, request.key_pem)
    }

    /// `bundle` with another certificate and key.
    pub fn rebundle(
        bundle: &Bundle,
        certificate: rustls_pki_types::CertificateDer<'static>,
        key: SecretPem,
    ) -> Bundle {
        Bundle {
            certificate,
            key: Some(key),
            ..bundle.clone()
        }
    }

    /// A bare QUIC connection to the broker with ALPN `postern/1`, presenting `credential` if
    /// given; for tests that must do what the agent never would.
    pub async fn raw_connect(
        &self,
        credential: Option<ClientCredential>,
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        let server_cas =
            postern_certs::store::read_certificates(&self.config.pki.server_ca).unwrap();
        let tls = postern_certs::client_config(&server_cas, credential, postern_proto::ALPN_TUNNEL)
            .unwrap();
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
        endpoint.connect(self.addr, "localhost").unwrap().await
    }

    /// The metrics endpoint's answer to `GET /metrics`, in Prometheus text format.
    pub async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics.expect("metrics.listen is set");
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        response
    }

    /// The audit events written so far. A last line still being written (no newline yet) is
    /// left for the next look.
    pub fn audit(&self) -> Vec<Value> {
        crate::audit::read(self.audit_path())
    }

    /// The audit events with `event.action` equal to `action`.
    pub fn audit_events(&self, action: &str) -> Vec<Value> {
        crate::audit::events(self.audit_path(), action)
    }

    /// Waits up to 15 s until an audit event satisfying `check` is written (events can trail
    /// the answer an agent sees by a moment).
    pub async fn wait_for_audit(&self, action: &str, check: impl Fn(&Value) -> bool) -> Value {
        crate::audit::wait_for(self.audit_path(), action, Duration::from_secs(15), check).await
    }

    /// Waits up to `limit` until there are at least `count` audit events `action`; whether
    /// there are.
    pub async fn wait_for_count(&self, action: &str, count: usize, limit: Duration) -> bool {
        crate::audit::wait_for_count(self.audit_path(), action, count, limit).await
    }

    /// Waits up to `limit` for a first audit event `action`.
    pub async fn wait_for_audit_within(&self, action: &str, limit: Duration) -> Value {
        crate::audit::wait_for(self.audit_path(), action, limit, |_| true).await
    }

    pub fn audit_path(&self) -> &std::path::Path {
        let postern_broker::config::AuditTarget::File(path) = &self.config.audit else {
            panic!("audit goes to a file")
        };
        path
    }

    /// Starts a graceful shutdown and waits for the broker to stop.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        self.join().await;
    }

    /// Stops the broker (gracefully), as for an upgrade; [`resume`](Self::resume) starts it
    /// again on the same address.
    pub async fn pause(&mut self) {
        self.shutdown.cancel();
        self.join().await;
    }

    /// Starts the broker again on the address it had, with the same folder.
    pub fn resume(&mut self) {
        let mut config = self.config.clone();
        config.listen = self.addr;
        let broker = Broker::start(config).unwrap();
        self.shutdown = broker.shutdown_token();
        self.task = Some(tokio::spawn(broker.run()));
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the broker has stopped.
    pub async fn join(&mut self) {
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl AgentHandle {
    /// Serves every service of `identity` on 127.0.0.1 with a free port.
    pub async fn start(identity: &Bundle) -> Self {
        Self::start_in(identity, None).await
    }

    /// Like [`start`](Self::start), renewing the identity stored in `home` as `postern up` does.
    pub async fn start_renewing(home: &std::path::Path) -> Self {
        let home = postern_agent::Home::at(home.to_owned());
        let identity = home.identity().unwrap();
        Self::start_in(&identity, Some(home)).await
    }

    async fn start_in(identity: &Bundle, home: Option<postern_agent::Home>) -> Self {
        let overrides: Vec<_> = identity
            .services
            .keys()
            .map(|name| (name.clone(), SocketAddr::from(([127, 0, 0, 1], 0))))
            .collect();
        let mut agent = postern_agent::Agent::start(identity, &overrides, SystemTime::now())
            .await
            .unwrap();
        if let Some(home) = home {
            agent = agent.with_renewal(home, identity.clone());
        }
        let imap = identity
            .services
            .values()
            .any(|s| s.protocol == postern_proto::ServiceKind::Imap);
        let mut local_ca = None;
        if imap {
            let tls = postern_certs::LocalTls::generate(SystemTime::now()).unwrap();
            agent = agent.with_local_tls(&tls).unwrap();
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), &tls.ca_pem).unwrap();
            local_ca = Some(file);
        }
        let addresses = agent.addresses();
        let tunnel = agent.tunnel();
        let shutdown = agent.shutdown_token();
        let task = tokio::spawn(agent.run());
        AgentHandle {
            addresses,
            tunnel,
            shutdown,
            task: Some(task),
            local_ca,
        }
    }

    /// The file of the local CA that IMAP services are served with.
    pub fn local_ca(&self) -> &std::path::Path {
        self.local_ca
            .as_ref()
            .expect("the identity has an IMAP service")
            .path()
    }

    /// Moves the agent's tunnel to a socket bound to `local`, as a network change does.
    pub fn move_to(&self, local: SocketAddr) {
        let socket = std::net::UdpSocket::bind(local).unwrap();
        self.tunnel.rebind(socket).unwrap();
    }

    /// What the agent's tunnel is doing, as `postern status` shows it.
    pub fn tunnel_state(&self) -> postern_agent::tunnel::TunnelState {
        self.tunnel.state().borrow().clone()
    }

    /// Waits up to `limit` until the agent no longer uses the connection it had (a draining
    /// broker told it to move, or it was lost); whether it did.
    pub async fn left_its_connection(&self, limit: Duration) -> bool {
        let mut state = self.tunnel.state();
        let moved = |s: &postern_agent::tunnel::TunnelState| {
            !matches!(s, postern_agent::tunnel::TunnelState::Connected(..))
        };
        tokio::time::timeout(limit, state.wait_for(moved))
            .await
            .is_ok()
    }

    /// Where `service` is served.
    pub fn addr(&self, service: &str) -> SocketAddr {
        self.addresses
            .iter()
            .find(|(name, _)| name.as_str() == service)
            .map(|(_, addr)| *addr)
            .expect("service is served")
    }

    /// Stops the agent.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A `postern login` in progress.
#[derive(Debug)]
pub struct LoginRun {
    /// The verification URL it showed.
    pub url: Option<String>,
    /// The user code it showed.
    pub code: Option<String>,
    /// Its standard output so far.
    pub output: String,
    lines: std::sync::mpsc::Receiver<String>,
    errors: std::sync::Arc<std::sync::Mutex<String>>,
    process: crate::Running,
}

impl LoginRun {
    /// Waits for the login to end; returns whether it succeeded, its standard output and its
    /// standard error.
    pub fn finish(mut self) -> (bool, String, String) {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = self.process.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "postern login did not end"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // The reader threads end with the process.
        std::thread::sleep(Duration::from_millis(100));
        while let Ok(line) = self.lines.try_recv() {
            self.output.push_str(&line);
            self.output.push('\n');
        }
        let errors = self.errors.lock().unwrap().clone();
        (status.success(), self.output, errors)
    }

    /// Sends SIGINT, as Ctrl-C does.
    pub fn interrupt(&self) {
        let pid =
            rustix::process::Pid::from_raw(i32::try_from(self.process.0.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    }
}
