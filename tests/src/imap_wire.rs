//! Raw IMAP over TLS: exactly the bytes a test writes, read back line by line.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A TLS connection to an IMAP server (or to the agent), verified against a CA file.
#[derive(Debug)]
pub struct ImapWire {
    stream: BufReader<TlsStream<TcpStream>>,
}

impl ImapWire {
    /// Connects to `addr` as `localhost`, trusting only `ca`, and reads the greeting.
    pub async fn connect(addr: SocketAddr, ca: &Path) -> (Self, String) {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(postern_certs::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let mut wire = Self {
            stream: BufReader::new(tls),
        };
        let greeting = wire.line().await;
        (wire, greeting)
    }

    /// Writes `bytes` at once, and flushes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.get_mut().write_all(bytes).await.unwrap();
        self.stream.get_mut().flush().await.unwrap();
    }

    /// Writes `bytes` one at a time, each flushed: as many packets as bytes.
    pub async fn trickle(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.send(&[*byte]).await;
        }
    }

    /// The next line, without its line end; empty at the end of the stream.
    pub async fn line(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(15), self.stream.read_line(&mut line))
            .await
            .expect("a line within 15 s")
            .unwrap_or_default();
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    /// Lines up to and including the one tagged `tag`; stops early at the end of the stream.
    pub async fn until(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            let done = line.is_empty() || line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                return lines;
            }
        }
    }
}

impl ImapWire {
    /// Reads up to and including the line tagged `tag` as bytes, without decoding them; how
    /// many bytes that was. For bulk transfers such as a whole-mailbox `FETCH`.
    pub async fn drain_until(&mut self, tag: &str) -> std::io::Result<u64> {
        let prefix = format!("{tag} ");
        let mut line = Vec::with_capacity(1024);
        let mut total = 0u64;
        loop {
            line.clear();
            let read = self.stream.read_until(b'\n', &mut line).await?;
            if read == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            total += read as u64;
            if line.starts_with(prefix.as_bytes()) {
                return Ok(total);
            }
        }
    }
}
