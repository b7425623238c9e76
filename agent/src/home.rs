//! The agent's home: its identity, any key waiting for a certificate, and the local TLS that
//! mail clients trust.
//!
//! `$POSTERN_HOME`, or `postern` in the platform's configuration folder (`~/.config/postern`
//! on Linux). The folder is 0700 and every file in it 0600 on Unix.

use std::path::{Path, PathBuf};

use postern_certs::store::{self, StoreError, WriteMode};
use postern_certs::{Bundle, BundleError, LocalTls, MAX_BUNDLE_LEN, SecretPem};

/// The local TLS certificate is made again this long before it ends.
pub const LOCAL_TLS_RENEW_BEFORE: std::time::Duration =
    std::time::Duration::from_secs(30 * 24 * 3600);

/// Longest wait for the identity lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Environment variable naming the agent's home folder.
pub const HOME_ENV: &str = "POSTERN_HOME";

/// The agent's home folder.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

/// Held while the stored identity is read, renewed and written, so that `postern up`,
/// `postern renew` and `postern login` never use the same refresh token twice or overwrite a
/// newer login. Released when dropped. (An advisory lock on Unix; elsewhere it excludes nothing.)
#[derive(Debug)]
pub struct IdentityLock {
    _file: std::fs::File,
}

/// Why the home folder could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// No folder could be determined.
    #[error("cannot find a configuration folder for postern; set {HOME_ENV}")]
    NoHome,
    /// Nobody logged in on this device yet.
    #[error(
        "not logged in: run `postern login --broker HOST:PORT --pin …` (your administrator gives you the line) first"
    )]
    NotLoggedIn,
    /// The stored identity is unreadable.
    #[error("the identity in `{}` is unusable ({source}); run `postern login` again", path.display())]
    BadIdentity {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: BundleError,
    },
    /// A file operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another `postern` process holds the identity for too long.
    #[error("cannot lock `{}` ({source}); is another `postern login` or `postern renew` stuck?", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The local TLS certificate could not be made.
    #[error("cannot make the local TLS certificate for mail clients: {0}")]
    LocalTls(String),
    /// The folder could not be created.
    #[error("cannot create `{}`: {source}", path.display())]
    CreateDir {
        /// The folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl Home {
    /// The home named by `$POSTERN_HOME`, or the platform default.
    pub fn locate() -> Result<Self, HomeError> {
        match std::env::var_os(HOME_ENV) {
            Some(dir) if !dir.is_empty() => Ok(Self::at(PathBuf::from(dir))),
            _ => dirs::config_dir()
                .map(|dir| Self::at(dir.join("postern")))
                .ok_or(HomeError::NoHome),
        }
    }

    /// A home at `dir`.
    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Where the identity (a bundle with its key) is kept.
    pub fn identity_path(&self) -> PathBuf {
        self.dir.join("identity.toml")
    }

    /// Where `postern up` says what its tunnel is doing, for `postern status`.
    pub fn tunnel_state_path(&self) -> PathBuf {
        self.dir.join("tunnel.state")
    }

    /// Where a key made by `postern csr` waits for its certificate.
    pub fn pending_key_path(&self) -> PathBuf {
        self.dir.join("pending.key")
    }

    /// The stored identity.
    pub fn identity(&self) -> Result<Bundle, HomeError> {
        let path = self.identity_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(HomeError::NotLoggedIn);
            }
            Err(source) => return Err(StoreError::Read { path, source }.into()),
        };
        if store::readable_by_others(&path).unwrap_or(false) {
            tracing::warn!(path = %path.display(), "the identity holds a private key and others can read it; run `chmod 600` on it");
        }
        let bundle = Bundle::from_toml(&text).map_err(|source| HomeError::BadIdentity {
            path: path.clone(),
            source,
        })?;
        if bundle.key.is_none() {
            return Err(HomeError::BadIdentity {
                path,
                source: BundleError::NoKey,
            });
        }
        Ok(bundle)
    }

    /// Replaces the stored identity.
    pub fn store_identity(&self, bundle: &Bundle) -> Result<(), HomeError> {
        self.create()?;
        store::write_secret(&self.identity_path(), &bundle.to_toml(), WriteMode::Replace)?;
        Ok(())
    }

    /// Takes the identity lock, waiting up to [`LOCK_WAIT`] for another process to release it
    /// (a renewal holds it for at most [`crate::renew::RENEW_TIMEOUT`]).
    pub async fn lock(&self) -> Result<IdentityLock, HomeError> {
        self.create()?;
        let path = self.dir.join("identity.lock");
        let mut options = std::fs::OpenOptions::new();
        options.create(true).truncate(false).write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path).map_err(|source| StoreError::Write {
            path: path.clone(),
            source,
        })?;
        #[cfg(unix)]
        {
            use rustix::fs::{FlockOperation, flock};
            let deadline = std::time::Instant::now() + LOCK_WAIT;
            loop {
                match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                    Ok(()) => break,
                    Err(err)
                        if err == rustix::io::Errno::WOULDBLOCK
                            && std::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    Err(err) => {
                        return Err(HomeError::Locked {
                            path,
                            source: err.into(),
                        });
                    }
                }
            }
        }
        Ok(IdentityLock { _file: file })
    }

    /// Deletes the stored identity (key, certificate and sealed login).
    pub fn remove_identity(&self) -> Result<(), HomeError> {
        let path = self.identity_path();
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Write { path, source }.into()),
        }
    }

    /// The local CA certificate that mail clients trust (`postern trust`).
    pub fn local_ca_path(&self) -> PathBuf {
        self.dir.join("local-ca.pem")
    }

    /// The local TLS for IMAP services: read, or made when there is none or it ends within
    /// [`LOCAL_TLS_RENEW_BEFORE`]. The flag says it was made now, and must be trusted (again).
    pub fn local_tls(&self, now: std::time::SystemTime) -> Result<(LocalTls, bool), HomeError> {
        let (chain, key) = (
            self.dir.join("local-server.pem"),
            self.dir.join("local-server.key"),
        );
        let stored = match (
            std::fs::read_to_string(self.local_ca_path()),
            std::fs::read_to_string(&chain),
            key.exists(),
        ) {
            (Ok(ca_pem), Ok(chain_pem), true) => Some(LocalTls {
                ca_pem,
                chain_pem,
                key: store::read_private_key(&key)?.0,
            }),
            _ => None,
        };
        let fresh = |tls: &LocalTls| {
            tls.not_after()
                .is_some_and(|end| end > now + LOCAL_TLS_RENEW_BEFORE)
                && tls.server_config().is_ok()
        };
        if let Some(tls) = stored.filter(fresh) {
            return Ok((tls, false));
        }
        self.create()?;
        let tls = LocalTls::generate(now).map_err(|e| HomeError::LocalTls(e.to_string()))?;
        store::write_secret(&key, tls.key.expose(), WriteMode::Replace)?;
        store::write_public(&chain, &tls.chain_pem, WriteMode::Replace)?;
        store::write_public(&self.local_ca_path(), &tls.ca_pem, WriteMode::Replace)?;
        Ok((tls, true))
    }

    /// The key made by `postern csr`, if one is waiting.
    pub fn pending_key(&self) -> Result<Option<SecretPem>, HomeError> {
        let path = self.pending_key_path();
        if !path.exists() {
            return Ok(None);
        }
        Ok(Some(store::read_private_key(&path)?.0))
    }

    /// Keeps a new key until its certificate arrives. Refuses to replace a waiting key.
    pub fn store_pending_key(&self, key: &SecretPem) -> Result<(), HomeError> {
        self.create()?;
        store::write_secret(&self.pending_key_path(), key.expose(), WriteMode::CreateNew)?;
        Ok(())
    }

    /// Forgets the waiting key, once its certificate is stored with it.
    pub fn remove_pending_key(&self) -> Result<(), HomeError> {
        let path = self.pending_key_path();
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Write { path, source }.into()),
        }
    }

    fn create(&self) -> Result<(), HomeError> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        let failed = |source| HomeError::CreateDir {
            path: self.dir.clone(),
            source,
        };
        builder.create(&self.dir).map_err(failed)?;
        // A folder that existed before keeps its mode otherwise.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                .map_err(failed)?;
        }
        Ok(())
    }
}

/// Reads a bundle file handed over by an administrator.
pub fn read_bundle(path: &Path) -> Result<Bundle, anyhow::Error> {
    use anyhow::Context as _;
    let metadata =
        std::fs::metadata(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    if metadata.len() > MAX_BUNDLE_LEN as u64 {
        anyhow::bail!("`{}` is too large to be an identity bundle", path.display());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    Bundle::from_toml(&text).with_context(|| format!("`{}` cannot be used", path.display()))
}
