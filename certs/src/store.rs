//! Certificates and keys on disk: PEM files, private keys readable by their owner only.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::secret::SecretPem;

/// Largest PEM file read, in bytes.
pub const MAX_PEM_FILE_LEN: u64 = 1 << 20;

/// Whether a write may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Fail if the file exists: nothing is ever overwritten by accident.
    CreateNew,
    /// Replace the file atomically (write a temporary file, then rename it).
    Replace,
}

/// Why a certificate or key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be read.
    #[error("cannot read `{}`: {source}{}", path.display(), permission_hint(source))]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file could not be written.
    #[error("cannot write `{}`: {source}{}", path.display(), permission_hint(source))]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file is too large to be a certificate or key.
    #[error("`{}` is larger than {MAX_PEM_FILE_LEN} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no PEM block of the expected kind.
    #[error("`{}` holds no PEM {what}", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
        /// What was expected, such as `certificate`.
        what: &'static str,
    },
}

fn permission_hint(error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::PermissionDenied => {
            "; the user running this command needs access to it (check its owner and mode)"
        }
        _ => "",
    }
}

/// Reads every certificate in a PEM file; at least one must be there.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let text = read_limited(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<_, _>>()
        .map_err(|_| StoreError::Missing {
            path: path.to_owned(),
            what: "certificate",
        })?;
    if certs.is_empty() {
        return Err(StoreError::Missing {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Reads a PEM private key, returning its PEM text and its DER.
pub fn read_private_key(path: &Path) -> Result<(SecretPem, PrivateKeyDer<'static>), StoreError> {
    let text = read_limited(path)?;
    let missing = || StoreError::Missing {
        path: path.to_owned(),
        what: "private key",
    };
    let der = PrivateKeyDer::from_pem_slice(&text).map_err(|_| missing())?;
    let pem = String::from_utf8(text).map_err(|_| missing())?;
    Ok((SecretPem::new(pem), der))
}

/// Writes a file anyone may read, such as a certificate.
pub fn write_public(path: &Path, contents: &str, mode: WriteMode) -> Result<(), StoreError> {
    write(path, contents, mode, 0o644)
}

/// Writes a file only its owner may read or write (mode 0600 on Unix), such as a private key.
pub fn write_secret(path: &Path, contents: &str, mode: WriteMode) -> Result<(), StoreError> {
    write(path, contents, mode, 0o600)
}

/// Whether others than the owner may read or write `path` (always false off Unix).
pub fn readable_by_others(path: &Path) -> io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Ok(fs::metadata(path)?.permissions().mode() & 0o077 != 0)
    }
    #[cfg(not(unix))]
    {
        fs::metadata(path).map(|_| false)
    }
}

fn read_limited(path: &Path) -> Result<Vec<u8>, StoreError> {
    let read_err = |source| StoreError::Read {
        path: path.to_owned(),
        source,
    };
    let file = fs::File::open(path).map_err(read_err)?;
    let mut text = Vec::new();
    file.take(MAX_PEM_FILE_LEN + 1)
        .read_to_end(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_PEM_FILE_LEN {
        return Err(StoreError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(text)
}

fn write(path: &Path, contents: &str, mode: WriteMode, permissions: u32) -> Result<(), StoreError> {
    let write_err = |source| StoreError::Write {
        path: path.to_owned(),
        source,
    };
    match mode {
        WriteMode::CreateNew => write_new(path, contents, permissions).map_err(write_err),
        WriteMode::Replace => {
            let file_name = path
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            let temporary = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
            let _ = fs::remove_file(&temporary);
            let result = write_new(&temporary, contents, permissions)
                .and_then(|()| fs::rename(&temporary, path));
            if result.is_err() {
                let _ = fs::remove_file(&temporary);
            }
            result.map_err(write_err)
        }
    }
}

fn write_new(path: &Path, contents: &str, permissions: u32) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, permissions);
    #[cfg(not(unix))]
    let _ = permissions;
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_private_and_never_clobbered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_secret(&path, "one", WriteMode::CreateNew).unwrap();
        assert!(!readable_by_others(&path).unwrap());
        let err = write_secret(&path, "two", WriteMode::CreateNew).unwrap_err();
        assert!(matches!(err, StoreError::Write { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "one");
        write_secret(&path, "three", WriteMode::Replace).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "three");
        assert!(!readable_by_others(&path).unwrap());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file is left"
        );
    }

    #[test]
    fn reading_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        write_public(&path, "no pem here", WriteMode::CreateNew).unwrap();
        let err = read_certificates(&path).unwrap_err();
        assert!(err.to_string().contains("empty.pem"), "{err}");
        assert!(
            read_private_key(&dir.path().join("missing.pem"))
                .unwrap_err()
                .to_string()
                .contains("missing.pem")
        );
    }
}
