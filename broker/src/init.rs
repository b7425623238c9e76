//! `postern-broker init`: a complete, working broker folder.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use postern_certs::store::{WriteMode, write_public, write_secret};
use postern_certs::{ClientCa, ServerCa};

use crate::config::{self, Config, ServiceTemplate};

/// Where `--mail-ca` is copied, relative to the broker folder.
const MAIL_CA: &str = "pki/mail-ca.pem";

/// Lifetime of the CAs `init` creates.
pub const CA_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Lifetime of the server certificate `init` creates.
pub const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);

/// The starting policy, with its test cases.
pub use postern_policy::{DEFAULT_POLICY, DEFAULT_POLICY_TESTS};

/// What `init` needs.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The folder to create or fill; it must not hold a broker setup already.
    pub dir: PathBuf,
    /// Name agents use for the broker.
    pub hostname: String,
    /// UDP address to listen on.
    pub listen: String,
    /// Services as `NAME=HOST:PORT`, `NAME=imaps://HOST:PORT` or `NAME=imap://HOST:PORT`.
    pub services: Vec<String>,
    /// CA certificate(s) of the IMAP services' mail server, copied to `pki/mail-ca.pem`.
    pub mail_ca: Option<PathBuf>,
    /// The identity provider, when people will log in with `postern login`.
    pub oidc: Option<crate::config::OidcTemplate>,
}

/// Why `init` refused.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// An option is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The folder already holds a broker setup.
    #[error("`{}` already exists; init never overwrites a broker setup: choose a new folder", .0.display())]
    Exists(PathBuf),
    /// Writing failed.
    #[error("{0}")]
    Write(#[from] postern_certs::store::StoreError),
    /// A folder could not be created.
    #[error("cannot create `{}`: {source}", path.display())]
    CreateDir {
        /// The folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Key or certificate generation failed.
    #[error("cannot create the certificate authorities: {0}")]
    Generate(String),
    /// The written configuration does not load (a bug).
    #[error("the written configuration does not load: {0}")]
    Check(String),
}

/// Writes the broker folder and returns the path of its `broker.toml`.
pub fn init(options: &InitOptions, now: SystemTime) -> Result<PathBuf, InitError> {
    if rustls_pki_types::ServerName::try_from(options.hostname.as_str()).is_err() {
        return Err(InitError::Invalid(format!(
            "--hostname `{}` is not a DNS name or IP address",
            options.hostname
        )));
    }
    if options.listen.parse::<std::net::SocketAddr>().is_err() {
        return Err(InitError::Invalid(format!(
            "--listen `{}` is not an address such as `[::]:4433`",
            options.listen
        )));
    }
    if options.services.is_empty() {
        return Err(InitError::Invalid("name at least one --service NAME=HOST:PORT, such as `--service imap=mail.internal:993`".into()));
    }
    let mut services: Vec<ServiceTemplate> = Vec::new();
    for spec in &options.services {
        let mut service = ServiceTemplate::parse(spec)
            .map_err(|e| InitError::Invalid(format!("--service {e}")))?;
        if services.iter().any(|s| s.name == service.name) {
            return Err(InitError::Invalid(format!(
                "--service `{}` is given twice",
                service.name
            )));
        }
        if service.imap.is_some() && options.mail_ca.is_some() {
            service.ca_file = Some(MAIL_CA.to_owned());
        }
        services.push(service);
    }
    let mail_ca = match &options.mail_ca {
        Some(file) => {
            let text = fs::read_to_string(file)
                .map_err(|e| InitError::Invalid(format!("--mail-ca `{}`: {e}", file.display())))?;
            if postern_certs::store::read_certificates(file).is_err() {
                return Err(InitError::Invalid(format!(
                    "--mail-ca `{}` holds no PEM certificate",
                    file.display()
                )));
            }
            Some(text)
        }
        None => None,
    };

    let dir = &options.dir;
    let config_path = dir.join("broker.toml");
    for existing in [config_path.clone(), dir.join("pki"), dir.join("policies")] {
        if existing.exists() {
            return Err(InitError::Exists(existing));
        }
    }
    create_dir(dir, 0o755)?;
    let pki = dir.join("pki");
    create_dir(&pki, 0o700)?;
    if let Some(text) = &mail_ca {
        write_public(&dir.join(MAIL_CA), text, WriteMode::CreateNew)?;
    }
    create_dir(&dir.join("policies"), 0o755)?;

    let generate = |e: &dyn std::fmt::Display| InitError::Generate(e.to_string());
    let (server_ca, server_ca_files) =
        ServerCa::generate(&options.hostname, now, CA_LIFETIME).map_err(|e| generate(&e))?;
    let server = server_ca
        .issue_server(&options.hostname, now, SERVER_CERT_LIFETIME)
        .map_err(|e| generate(&e))?;
    let (_, client_ca_files) =
        ClientCa::generate(&options.hostname, now, CA_LIFETIME).map_err(|e| generate(&e))?;

    write_secret(
        &pki.join("server-ca.key"),
        server_ca_files.key_pem.expose(),
        WriteMode::CreateNew,
    )?;
    write_public(
        &pki.join("server-ca.pem"),
        &server_ca_files.cert_pem,
        WriteMode::CreateNew,
    )?;
    write_secret(
        &pki.join("server.key"),
        server.key_pem.expose(),
        WriteMode::CreateNew,
    )?;
    // The chain agents receive: the server certificate, then its CA, so that an agent holding
    // only the CA's pin can verify it (`postern login --pin`).
    write_public(
        &pki.join("server.pem"),
        &format!("{}{}", server.cert_pem, server_ca_files.cert_pem),
        WriteMode::CreateNew,
    )?;
    write_secret(
        &pki.join("seal.key"),
        &crate::seal::SealKey::generate_file_text().map_err(|e| generate(&e))?,
        WriteMode::CreateNew,
    )?;
    write_secret(
        &pki.join("client-ca.key"),
        client_ca_files.key_pem.expose(),
        WriteMode::CreateNew,
    )?;
    write_public(
        &pki.join("client-ca.pem"),
        &client_ca_files.cert_pem,
        WriteMode::CreateNew,
    )?;
    write_public(
        &dir.join("policies").join("default.cedar"),
        DEFAULT_POLICY,
        WriteMode::CreateNew,
    )?;
    create_dir(&dir.join("policies").join("tests"), 0o755)?;
    write_public(
        &dir.join("policies").join("tests").join("default.json"),
        DEFAULT_POLICY_TESTS,
        WriteMode::CreateNew,
    )?;
    let text = config::template(
        &options.hostname,
        &options.listen,
        &services,
        options.oidc.as_ref(),
    );
    write_public(&config_path, &text, WriteMode::CreateNew)?;

    let config = Config::load(&config_path).map_err(|e| InitError::Check(e.to_string()))?;
    postern_policy::Policies::load_dir(&config.policy_dir)
        .map_err(|e| InitError::Check(e.to_string()))?;
    Ok(config_path)
}

fn create_dir(path: &Path, mode: u32) -> Result<(), InitError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, mode);
    #[cfg(not(unix))]
    let _ = mode;
    builder.create(path).map_err(|source| InitError::CreateDir {
        path: path.to_owned(),
        source,
    })
}
