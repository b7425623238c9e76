//! Renewal: a new key and certificate for the same login, before the certificate ends — or
//! after it ended during sleep — for as long as the login's maximum age allows.

use std::time::{Duration, SystemTime};

use postern_certs::{Bundle, LineageId};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::enroll::{EnrollError, Session};
use crate::home::Home;
use crate::tunnel::Tunnel;
use crate::wake::{Guard, Readiness};

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

/// A certificate this close to its end is renewed when a check is asked for (after a wake),
/// rather than at its usual time.
const ENDING_SOON: Duration = Duration::from_secs(60);

/// Keeps the certificate of `identity` valid while `postern up` runs: renews it (when `home`
/// is given and its login allows) before it ends, at once when a wake finds it ended or ending,
/// hands each new certificate to `tunnel`, and answers every check `guard` asks for, so that
/// local connections never wait for nothing.
pub async fn keep_fresh(
    home: Option<Home>,
    mut identity: Bundle,
    tunnel: std::sync::Arc<Tunnel>,
    guard: std::sync::Arc<Guard>,
    shutdown: CancellationToken,
) {
    let mut renewable = home.is_some();
    if renewable
        && renew_at(&identity).is_none()
        && let Some(login) = &identity.login
    {
        info!(
            "the certificate lasts until the login ends at {}; then run `postern login`",
            postern_certs::rfc3339(login.session_ends)
        );
    }
    let mut retry = FIRST_RETRY;
    // Set after a failed renewal, and after a success: renewals never follow each other faster
    // than [`FIRST_RETRY`], even when the clocks disagree so much that one looks due at once.
    let mut not_before: Option<SystemTime> = None;
    loop {
        let due = renewable
            .then(|| renew_at(&identity))
            .flatten()
            .map(|at| not_before.map_or(at, |later| at.max(later)));
        let asked = tokio::select! {
            reached = wait_for(due, &shutdown) => if reached { false } else { return },
            () = guard.check_asked() => true,
        };
        let now = SystemTime::now();
        let Ok(certificate) = identity.inspect() else {
            renewable = false;
            guard.settle(Readiness::Unusable(format!(
                "this device's identity is unusable; {}",
                crate::tunnel::GET_A_NEW_IDENTITY
            )));
            continue;
        };
        let ended = certificate.not_after <= now;
        if asked && !ended {
            // Still valid: programs need not wait for a renewal, however slow the network.
            guard.settle(Readiness::Ready);
        }
        if renewable && ended && !renewable_after_expiry(&identity, now) {
            info!("the login can no longer be renewed; run `postern login`");
            renewable = false;
        }
        // A check (after a wake) renews a certificate that ended or is about to, unless a
        // renewal just failed and is not due again; an ended one is tried at once anyway, as
        // the wake may have brought the network back.
        let may_retry = ended || not_before.is_none_or(|at| at <= now);
        let renew_now = renewable
            && (due.is_some_and(|at| at <= now)
                || (asked && may_retry && certificate.not_after <= now + ENDING_SOON));
        if !renew_now {
            if asked {
                guard.settle(verdict(&identity, certificate.not_after, now, None));
            }
            continue;
        }
        if ended {
            info!(
                "the certificate ended at {} while this device was asleep or offline; renewing it before serving programs",
                postern_certs::rfc3339(certificate.not_after)
            );
        }
        let Some(home) = home.as_ref() else { continue };
        match renew(home, lineage_of(&identity)).await {
            Ok(renewed) => {
                let used = match renewed.credential() {
                    Ok(credential) => tunnel.renewed(&renewed, credential).await,
                    Err(err) => Err(crate::tunnel::TunnelError::Setup(err.to_string())),
                };
                if let Err(err) = used {
                    error!("cannot use the renewed certificate: {err}");
                    renewable = false;
                    guard.settle(verdict(&identity, certificate.not_after, now, None));
                    continue;
                }
                if let Ok(fresh) = renewed.inspect() {
                    info!(
                        "certificate renewed; valid until {}",
                        postern_certs::rfc3339(fresh.not_after)
                    );
                    guard.renewed(fresh.not_after);
                }
                identity = renewed;
                retry = FIRST_RETRY;
                not_before = Some(SystemTime::now() + FIRST_RETRY);
                guard.settle(Readiness::Ready);
            }
            Err(err) => {
                let permanent = match &err {
                    EnrollError::NoIdentity(why) => {
                        warn!(
                            "no identity to renew any more ({why}); `postern up` goes on until its certificate ends"
                        );
                        true
                    }
                    EnrollError::Replaced => {
                        warn!(
                            "the stored identity was replaced by a new login; restart `postern up` to use it"
                        );
                        true
                    }
                    err if err.login_required() => {
                        error!("{err}; run `postern login` to log in again");
                        true
                    }
                    err => {
                        warn!(
                            "cannot renew the certificate: {err}; trying again in {}s",
                            retry.as_secs()
                        );
                        false
                    }
                };
                if permanent {
                    renewable = false;
                    let replaced = matches!(err, EnrollError::Replaced);
                    guard.settle(if replaced && ended {
                        Readiness::Unusable(
                            "a new login was stored on this device; restart `postern up` to use it"
                                .to_owned(),
                        )
                    } else {
                        verdict(&identity, certificate.not_after, now, None)
                    });
                } else {
                    guard.settle(verdict(
                        &identity,
                        certificate.not_after,
                        now,
                        Some((&err, retry)),
                    ));
                    // A program that connects may ask again sooner (the network may be back).
                    guard.retry_after(FIRST_RETRY);
                    not_before = Some(SystemTime::now() + retry);
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }
}

/// Whether connections may use a certificate that ends at `not_after`, and if not, what the
/// person should know: after `failed` (a renewal that failed and is retried after a while) or
/// with no renewal left.
fn verdict(
    identity: &Bundle,
    not_after: SystemTime,
    now: SystemTime,
    failed: Option<(&EnrollError, Duration)>,
) -> Readiness {
    if not_after > now {
        return Readiness::Ready;
    }
    let ended = postern_certs::rfc3339(not_after);
    match failed {
        Some((err, retry)) => Readiness::Unusable(format!(
            "this device's certificate ended at {ended} and could not be renewed yet ({err}); Postern tries again in {}s, or when a mail program connects after {}s",
            retry.as_secs(),
            FIRST_RETRY.as_secs()
        )),
        None if identity.login.is_some() => Readiness::Unusable(format!(
            "this device's certificate ended at {ended} and its login cannot be renewed; run `postern login`, then restart `postern up`"
        )),
        None => Readiness::Unusable(format!(
            "this device's certificate ended at {ended}; {}",
            crate::tunnel::GET_A_NEW_IDENTITY
        )),
    }
}

fn lineage_of(identity: &Bundle) -> Option<LineageId> {
    identity
        .inspect()
        .ok()
        .map(|certificate| certificate.identity.auth.lineage)
}

/// Waits until the wall clock reaches `at` (forever for `None`); `false` when shut down first.
async fn wait_for(at: Option<SystemTime>, shutdown: &CancellationToken) -> bool {
    let Some(at) = at else {
        shutdown.cancelled().await;
        return false;
    };
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
