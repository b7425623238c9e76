//! `postern-broker issue`: an identity bundle made by an administrator.
//!
//! For a headless machine or break-glass use, where nobody logs in. The certificate says
//! `issuance=admin`, so policy can tell it from a login with a second factor.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use postern_certs::store::{self, WriteMode};
use postern_certs::{
    AuthContext, Bundle, BundleService, Identity, Issuance, KeyRequest, MAX_GROUP_LEN, MAX_GROUPS,
    PublicKey, RandomId, UserId,
};

use crate::audit::{Audit, Event};
use crate::config::Config;

/// What `issue` needs.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// The user's email address; also their subject.
    pub user: String,
    /// Groups to name in the certificate.
    pub groups: Vec<String>,
    /// How long the certificate is valid.
    pub ttl: Duration,
    /// A PEM signing request for a key made elsewhere; without it the broker makes the key.
    pub csr: Option<PathBuf>,
    /// Where to write the bundle; must not exist.
    pub out: PathBuf,
}

/// What was issued.
#[derive(Debug)]
pub struct Issued {
    /// The identity certified.
    pub identity: Identity,
    /// Serial number, hex.
    pub serial: String,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether the bundle holds a private key.
    pub with_key: bool,
}

/// Why `issue` refused.
#[derive(Debug, thiserror::Error)]
pub enum IssueFailure {
    /// An option is invalid (exit code 64).
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or written (exit code 64).
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The broker's certificates or keys are unusable (exit code 64).
    #[error(transparent)]
    Pki(crate::StartError),
    /// The CA refused (exit code 1).
    #[error("cannot issue: {0}")]
    Issue(String),
    /// The audit trail could not be written; nothing was issued (exit code 1).
    #[error("cannot write the audit trail, so nothing was issued: {0}")]
    Audit(std::io::Error),
}

/// The issuer of admin-made identities on the broker named `hostname`.
pub fn admin_issuer(hostname: &str) -> String {
    format!("postern-admin:{hostname}")
}

/// Issues a certificate, writes the bundle and records the issuance in `audit`.
pub fn issue(
    config: &Config,
    options: &IssueOptions,
    audit: &Audit,
    now: SystemTime,
) -> Result<Issued, IssueFailure> {
    let invalid = |m: String| IssueFailure::Invalid(m);
    if !plausible_email(&options.user) {
        return Err(invalid(format!(
            "--user `{}` is not an email address such as backup@example.org",
            options.user
        )));
    }
    if options.groups.len() > MAX_GROUPS {
        return Err(invalid(format!("at most {MAX_GROUPS} --group options")));
    }
    if let Some(group) = options
        .groups
        .iter()
        .find(|g| g.is_empty() || g.len() > MAX_GROUP_LEN || g.chars().any(char::is_control))
    {
        return Err(invalid(format!(
            "--group {group:?} must be 1 to {MAX_GROUP_LEN} printable characters"
        )));
    }
    let cap = config.pki.max_cert_lifetime;
    if options.ttl > cap {
        return Err(invalid(format!(
            "--ttl {} exceeds the cap of {} (`pki.max_cert_lifetime` in `{}`)",
            humantime::format_duration(options.ttl),
            humantime::format_duration(cap),
            config.path.display()
        )));
    }
    if options.ttl < Duration::from_secs(60) {
        return Err(invalid("--ttl must be at least 1m".into()));
    }
    if options.out.exists() {
        return Err(invalid(format!(
            "`{}` exists; choose another --out or remove it",
            options.out.display()
        )));
    }

    let (key, key_pem) = match &options.csr {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| store::StoreError::Read {
                path: path.clone(),
                source,
            })?;
            let key = PublicKey::from_csr_pem(&pem)
                .map_err(|e| invalid(format!("--csr `{}`: {e}", path.display())))?;
            (key, None)
        }
        None => {
            let request = KeyRequest::generate().map_err(|e| IssueFailure::Issue(e.to_string()))?;
            let key = PublicKey::from_csr_pem(request.csr_pem.as_bytes())
                .map_err(|e| IssueFailure::Issue(e.to_string()))?;
            (key, Some(request.key_pem))
        }
    };

    let user = UserId::new(&admin_issuer(&config.hostname), &options.user)
        .map_err(|e| invalid(e.to_string()))?;
    let random =
        || RandomId::generate().map_err(|_| IssueFailure::Issue("no secure randomness".into()));
    let identity = Identity {
        user,
        email: Some(options.user.clone()),
        name: None,
        groups: options.groups.clone(),
        auth: AuthContext {
            issuance: Issuance::Admin,
            amr: vec![],
            acr: None,
            auth_time: now,
            lineage: random()?,
            device: random()?,
        },
    };

    let ca = crate::serve::signing_ca(config).map_err(IssueFailure::Pki)?;
    let certificate = ca
        .issue(&identity, &key, now, options.ttl)
        .map_err(|e| IssueFailure::Issue(e.to_string()))?;
    let verified = postern_certs::inspect_unverified(&certificate)
        .map_err(|e| IssueFailure::Issue(e.to_string()))?;

    let bundle = Bundle {
        broker: config.public_address.clone(),
        server_name: config.hostname.clone(),
        server_cas: store::read_certificates(&config.pki.server_ca)?,
        certificate,
        key: key_pem.clone(),
        services: config
            .services
            .iter()
            .map(|(name, s)| {
                let service = BundleService {
                    port: s.local_port,
                    protocol: s.kind(),
                };
                (name.clone(), service)
            })
            .collect(),
        login: None,
    };
    audit
        .record_blocking(&Event::CertificateIssue {
            identity: &identity,
            serial: verified.serial.clone(),
            not_after: verified.not_after,
            key_generated: key_pem.is_some(),
        })
        .map_err(IssueFailure::Audit)?;
    store::write_secret(&options.out, &bundle.to_toml(), WriteMode::CreateNew)?;
    Ok(Issued {
        identity,
        serial: verified.serial,
        not_after: verified.not_after,
        with_key: key_pem.is_some(),
    })
}

fn plausible_email(text: &str) -> bool {
    let Some((local, domain)) = text.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && text.len() <= postern_certs::MAX_EMAIL_LEN
        && text.bytes().all(|b| b.is_ascii_graphic())
        && text.matches('@').count() == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        for ok in ["a@example.org", "backup+x@mail.example.org"] {
            assert!(plausible_email(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            "a@b",
            "@example.org",
            "a@.org",
            "a@example.",
            "a b@example.org",
            "a@b@example.org",
            "ä@example.org",
        ] {
            assert!(!plausible_email(bad), "{bad}");
        }
    }
}
