//! Renewal: a new key and certificate for the same login, before the certificate ends — or
//! after it ended during sleep — for as long as the login's maximum age allows.

use std::time::{Duration, SystemTime};

use postern_certs::{Bundle, LineageId};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::enroll::{EnrollError, Session};
use crate::home::Home;
use crate::tunnel::Tunnel;

/// Longest single wait: the wall clock is checked at least this often, so that a laptop waking
/// from sleep renews at once instead of when a monotonic timer fires.
const CLOCK_CHECK: Duration = Duration::from_secs(30);

/// First retry after a failed renewal; doubled up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(15);
const MAX_RETRY: Duration = Duration::from_secs(600);

/// Longest a renewal may take over the network, while it holds the identity lock.
pub const RENEW_TIMEOUT: Duration = Duration::from_secs(60);

/// A certificate is not worth renewing when the login ends less than this after it.
const WORTHWHILE: Duration = Duration::from_secs(10);

/// Renews the identity stored in `home` and stores the result, holding the identity lock
/// throughout. With `lineage`, only a renewal of that login: a newer login stored meanwhile is
/// left alone.
pub async fn renew(home: &Home, lineage: Option<LineageId>) -> Result<Bundle, EnrollError> {
    let local = |e: &dyn std::fmt::Display| EnrollError::Local(e.to_string());
    let _lock = home.lock().await.map_err(|e| local(&e))?;
    // Logged out, or the file spoiled: nothing to renew, now or later.
    let identity = home
        .identity()
        .map_err(|e| EnrollError::NoIdentity(e.to_string()))?;
    if lineage.is_some() && lineage_of(&identity) != lineage {
        return Err(EnrollError::Replaced);
    }
    // The lock is held meanwhile: the network part is bounded, so that a login waiting for the
    // lock is never left with a certificate it cannot store.
    let renewed = tokio::time::timeout(RENEW_TIMEOUT, async {
        let session = Session::connect_for(&identity).await?;
        let result = session.renew(&identity).await;
        session.close().await;
        result
    })
    .await
    .map_err(|_| {
        EnrollError::Lost(format!(
            "the renewal took longer than {}s",
            RENEW_TIMEOUT.as_secs()
        ))
    })??;
    home.store_identity(&renewed.bundle)
        .map_err(|e| local(&e))?;
    Ok(renewed.bundle)
}

/// When `identity` should be renewed, or `None` when renewal cannot extend it.
pub fn renew_at(identity: &Bundle) -> Option<SystemTime> {
    let login = identity.login.as_ref()?;
    login.sealed.as_ref()?;
    let certificate = identity.inspect().ok()?;
    if login.session_ends < certificate.not_after + WORTHWHILE {
        return None;
    }
    let lifetime = certificate
        .not_after
        .duration_since(certificate.not_before)
        .unwrap_or_default();
    Some(certificate.not_after - lifetime / 3)
}

/// Whether `identity`'s certificate has ended but its login may still be renewed.
pub fn renewable_after_expiry(identity: &Bundle, now: SystemTime) -> bool {
    let (Some(login), Ok(certificate)) = (identity.login.as_ref(), identity.inspect()) else {
        return false;
    };
    login.sealed.is_some() && certificate.not_after <= now && now + WORTHWHILE < login.session_ends
}

/// Keeps `identity` renewed while `postern up` runs, handing each new certificate to `tunnel`.
pub async fn keep_renewed(
    home: Home,
    mut identity: Bundle,
    tunnel: std::sync::Arc<Tunnel>,
    shutdown: CancellationToken,
) {
    let mut retry = FIRST_RETRY;
    loop {
        let Some(at) = renew_at(&identity) else {
            if let Some(login) = &identity.login {
                info!(
                    "the certificate lasts until the login ends at {}; then run `postern login`",
                    postern_certs::rfc3339(login.session_ends)
                );
            }
            return;
        };
        if !wait_until(at, &shutdown).await {
            return;
        }
        match renew(&home, lineage_of(&identity)).await {
            Ok(renewed) => {
                let credential = match renewed.credential() {
                    Ok(credential) => credential,
                    Err(err) => {
                        error!("the renewed identity is unusable: {err}");
                        return;
                    }
                };
                if let Err(err) = tunnel.renewed(&renewed, credential).await {
                    error!("cannot use the renewed certificate: {err}");
                    return;
                }
                if let Ok(certificate) = renewed.inspect() {
                    info!(
                        "certificate renewed; valid until {}",
                        postern_certs::rfc3339(certificate.not_after)
                    );
                }
                identity = renewed;
                retry = FIRST_RETRY;
                // Even when the clocks disagree so much that the next renewal looks due at
                // once, renewals never follow each other faster than this.
                if !wait_until(SystemTime::now() + FIRST_RETRY, &shutdown).await {
                    return;
                }
            }
            Err(EnrollError::NoIdentity(why)) => {
                warn!(
                    "no identity to renew any more ({why}); `postern up` goes on until its certificate ends"
                );
                return;
            }
            Err(EnrollError::Replaced) => {
                warn!(
                    "the stored identity was replaced by a new login; restart `postern up` to use it"
                );
                return;
            }
            Err(err) if err.login_required() => {
                error!("{err}; run `postern login` to log in again");
                return;
            }
            Err(err) => {
                warn!(
                    "cannot renew the certificate: {err}; trying again in {}s",
                    retry.as_secs()
                );
                if !wait_until(SystemTime::now() + retry, &shutdown).await {
                    return;
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

fn lineage_of(identity: &Bundle) -> Option<LineageId> {
    identity
        .inspect()
        .ok()
        .map(|certificate| certificate.identity.auth.lineage)
}

/// Waits until the wall clock reaches `at`; `false` when shut down first.
async fn wait_until(at: SystemTime, shutdown: &CancellationToken) -> bool {
    loop {
        let Ok(left) = at.duration_since(SystemTime::now()) else {
            return true;
        };
        if left.is_zero() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(left.min(CLOCK_CHECK)) => {}
            () = shutdown.cancelled() => return false,
        }
    }
}
