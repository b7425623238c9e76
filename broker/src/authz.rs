//! Continuous authorization: the policy snapshot in force, its hot reload, and the registry of
//! live sessions that are asked again whenever the answer could change.
//!
//! Policies, entities and revocations form one immutable [`Snapshot`] with a generation number,
//! swapped atomically. A session registers itself before its first decision and reads the
//! snapshot after registering; the re-check reads the registry after a swap. So a session either
//! decided with the new snapshot or is in the registry when the re-check runs: none slips
//! through a reload.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use jiff::Zoned;
use jiff::tz::TimeZone;
use postern_policy::{Decision, Policies};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::audit::{Audit, Event};
use crate::revoke::{REVOCATIONS_FILE, Revocations};

/// Policies, entities and revocations, as one generation.
#[derive(Debug)]
pub struct Snapshot {
    /// Starts at 1 and grows by one with every change taken in.
    pub generation: u64,
    /// The policies and `entities.json`.
    pub policies: Arc<Policies>,
    /// `revocations.json`.
    pub revocations: Arc<Revocations>,
}

/// The snapshot in force and the sessions it governs.
#[derive(Debug)]
pub struct Authority {
    dir: PathBuf,
    zone: TimeZone,
    current: watch::Sender<Arc<Snapshot>>,
    sessions: Mutex<HashMap<u64, Arc<Live>>>,
    /// What the policy folder looked like when last read.
    seen: Mutex<Fingerprint>,
    /// The latest end of a certificate seen for each identity lineage (a login and its
    /// renewals): sessions live as long as their lineage has a valid certificate.
    lineages: Mutex<HashMap<postern_certs::LineageId, SystemTime>>,
    /// Held while reloading: one reload at a time, one generation each.
    reloading: Mutex<()>,
    /// When a reload last failed to read a file (not: found it invalid), to try again.
    unreadable_since: Mutex<Option<std::time::Instant>>,
    /// Reloads refused because a file was invalid.
    rejected: AtomicU64,
    /// Changes taken in.
    reloads: AtomicU64,
    /// Sessions ended by a re-check.
    ended: AtomicU64,
    /// Duration of the last re-check, in microseconds.
    last_recheck_micros: AtomicU64,
    /// SIGHUP, once installed: from then on it reloads instead of ending the process.
    #[cfg(unix)]
    hangup: Mutex<Option<tokio::signal::unix::Signal>>,
}

/// What the authority has done since the broker started, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Changes taken in.
    pub reloads: u64,
    /// Changes refused because a file was invalid.
    pub rejected: u64,
    /// Sessions ended by a re-check.
    pub ended: u64,
    /// How long the last re-check took.
    pub last_recheck: Duration,
}

/// A live session, as the re-check sees it.
pub struct Live {
    /// Broker-local session id.
    pub session: u64,
    /// What the session asks: its connection and service. Sessions asking the same question get
    /// one answer per re-check (a mail client opens several connections to one service).
    pub question: (u64, String),
    /// Asks the policies again; `None` means allowed.
    pub recheck: Recheck,
    /// Cancelled to end the session.
    pub cut: CancellationToken,
    /// Why it was ended, once it was.
    pub ended: OnceLock<Ended>,
}

/// A session's own question to the policies: `None` while it is allowed.
pub type Recheck = Box<dyn Fn(&Snapshot, &Zoned) -> Option<Denial> + Send + Sync>;

/// Why a request is not (or no longer) allowed.
#[derive(Debug, Clone)]
pub struct Denial {
    /// `policy`, `revoked` or `expired`.
    pub kind: &'static str,
    /// For people.
    pub reason: String,
    /// The decision, when Cedar made it.
    pub decision: Option<Decision>,
}

/// Why a re-check ended a session.
#[derive(Debug, Clone)]
pub struct Ended {
    /// Why.
    pub denial: Denial,
    /// The generation that ended it.
    pub generation: u64,
    /// What made the broker ask.
    pub trigger: Trigger,
}

/// Why the sessions were asked again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Policies, entities or revocations changed.
    Change,
    /// The periodic re-check, for rules about time.
    Timer,
    /// A connection moved to a new network path (a new source address).
    Path,
}

/// Removes a session from the registry when it ends.
#[must_use]
#[derive(Debug)]
pub struct Registration<'a> {
    authority: &'a Authority,
    session: u64,
}

/// The files of the policy folder that make a snapshot, with size, modification and change times
/// and inode: a change to any of them is a change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Fingerprint(Vec<FileState>);

/// One file of the fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FileState {
    name: String,
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    /// Change time (seconds, nanoseconds): moves on any write or rename.
    changed: (i64, i64),
}

/// How often the folder is looked at for changes.
const POLL: Duration = Duration::from_millis(250);

/// Lineages remembered before those whose certificates all ended are forgotten.
const LINEAGES_BEFORE_PRUNING: usize = 4096;

/// How soon a reload that could not read a file is tried again.
const UNREADABLE_RETRY: Duration = Duration::from_secs(5);

impl Trigger {
    /// `change` or `timer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Change => "change",
            Trigger::Timer => "timer",
            Trigger::Path => "path",
        }
    }
}

impl Authority {
    /// Starts with a snapshot loaded already.
    pub fn new(dir: &Path, zone: TimeZone, policies: Policies, revocations: Revocations) -> Self {
        let snapshot = Snapshot {
            generation: 1,
            policies: Arc::new(policies),
            revocations: Arc::new(revocations),
        };
        Self {
            dir: dir.to_owned(),
            zone,
            current: watch::Sender::new(Arc::new(snapshot)),
            sessions: Mutex::new(HashMap::new()),
            seen: Mutex::new(Fingerprint::read(dir)),
            lineages: Mutex::new(HashMap::new()),
            reloading: Mutex::new(()),
            unreadable_since: Mutex::new(None),
            rejected: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            last_recheck_micros: AtomicU64::new(0),
            #[cfg(unix)]
            hangup: Mutex::new(None),
        }
    }

    /// Installs the SIGHUP handler now, so that a reload asked for before serving begins does
    /// not end the process. Must run inside a Tokio runtime.
    pub fn listen_for_hangup(&self) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            *self
                .hangup
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(signal);
        }
        Ok(())
    }

    /// The snapshot in force.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.borrow().clone()
    }

    /// `now` in the configured time zone.
    pub fn zoned(&self, now: SystemTime) -> Zoned {
        let timestamp = jiff::Timestamp::try_from(now).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        timestamp.to_zoned(self.zone.clone())
    }

    /// Reloads refused so far.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// What happened since the start.
    pub fn counters(&self) -> Counters {
        Counters {
            reloads: self.reloads.load(Ordering::Relaxed),
            rejected: self.rejected(),
            ended: self.ended.load(Ordering::Relaxed),
            last_recheck: Duration::from_micros(self.last_recheck_micros.load(Ordering::Relaxed)),
        }
    }

    /// Live sessions.
    pub fn sessions(&self) -> usize {
        self.lock().len()
    }

    /// Records that `lineage` has a certificate valid until `not_after` (a tunnel connection
    /// presented it).
    pub fn lineage_seen(
        &self,
        lineage: postern_certs::LineageId,
        not_after: SystemTime,
        now: SystemTime,
    ) {
        let mut ends = self
            .lineages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ends.len() >= LINEAGES_BEFORE_PRUNING {
            ends.retain(|_, end| *end > now);
        }
        let end = ends.entry(lineage).or_insert(not_after);
        *end = (*end).max(not_after);
    }

    /// The latest end of a certificate of `lineage` seen so far.
    pub fn lineage_end(&self, lineage: &postern_certs::LineageId) -> Option<SystemTime> {
        self.lineages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(lineage)
            .copied()
    }

    /// Registers a session; do it before its first decision.
    pub fn register(&self, live: Arc<Live>) -> Registration<'_> {
        let session = live.session;
        self.lock().insert(session, live);
        Registration {
            authority: self,
            session,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Live>>> {
        // A panic while holding the lock cannot leave the map half-changed.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the folder again and swaps in what is valid. Policies with entities, and
    /// revocations, are taken in separately: a typo in a policy never holds back a revocation.
    /// Whatever is invalid is refused with a log line and an audit event, and the previous
    /// version stays in force.
    pub fn reload(&self, audit: &Audit, why: &str) -> bool {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fingerprint = Fingerprint::read(&self.dir);
        *self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fingerprint;
        let old = self.current();
        let mut problems = Vec::new();
        let mut unreadable = false;
        let policies = match Policies::load_dir(&self.dir) {
            Ok(policies) => Arc::new(policies),
            Err(err) => {
                unreadable |= matches!(err, postern_policy::LoadError::Read { .. });
                problems.push(err.to_string());
                old.policies.clone()
            }
        };
        let revocations = match Revocations::load(&self.dir) {
            Ok(revocations) if revocations == *old.revocations => old.revocations.clone(),
            Ok(revocations) => Arc::new(revocations),
            Err(err) => {
                unreadable |= matches!(err, crate::revoke::RevocationsError::Io { .. });
                problems.push(err.to_string());
                old.revocations.clone()
            }
        };
        // A file that could not be read (too many open files, a copy in progress) is tried
        // again shortly, not only at the next change.
        *self
            .unreadable_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            unreadable.then(std::time::Instant::now);
        if !problems.is_empty() {
            let count = self.rejected.fetch_add(1, Ordering::Relaxed) + 1;
            for problem in &problems {
                error!(
                    generation = old.generation,
                    reload.trigger = why,
                    "{problem}"
                );
            }
            warn!(
                generation = old.generation,
                rejected_total = count,
                "policy change refused: the previous version stays in force until the files are fixed (check them with `postern-policy validate`)"
            );
            audit.record_or_log(&Event::PolicyReject {
                generation: old.generation,
                problems: &problems,
                rejected_total: count,
            });
        }
        let changed =
            !Arc::ptr_eq(&policies, &old.policies) || !Arc::ptr_eq(&revocations, &old.revocations);
        if !changed {
            return false;
        }
        let snapshot = Snapshot {
            generation: old.generation + 1,
            policies,
            revocations,
        };
        info!(
            generation = snapshot.generation,
            policies = snapshot.policies.len(),
            entities = snapshot.policies.directory().len(),
            revocations = snapshot.revocations.len(),
            reload.trigger = why,
            "policies reloaded"
        );
        audit.record_or_log(&Event::PolicyReload {
            generation: snapshot.generation,
            policies: snapshot.policies.len(),
            entities: snapshot.policies.directory().len(),
            revocations: snapshot.revocations.len(),
            trigger: why,
        });
        self.current.send_replace(Arc::new(snapshot));
        self.reloads.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Watches the folder and SIGHUP, reloads on change, and asks every live session again
    /// after each change and every `interval`. Runs until `stop`.
    pub async fn run(
        self: Arc<Self>,
        audit: Arc<Audit>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let watcher = tokio::spawn(self.clone().watch(audit, stop.clone()));
        let mut changes = self.current.subscribe();
        let mut timer = tokio::time::interval(interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer.tick().await;
        loop {
            let trigger = tokio::select! {
                changed = changes.changed() => match changed {
                    Ok(()) => Trigger::Change,
                    Err(_) => break,
                },
                _ = timer.tick() => Trigger::Timer,
                () = stop.cancelled() => break,
            };
            changes.borrow_and_update();
            self.recheck(trigger, SystemTime::now()).await;
        }
        watcher.abort();
    }

    /// Asks every live session again with the snapshot in force, on a blocking thread; ends
    /// those no longer allowed (each session audits its own end) and returns how many.
    pub async fn recheck(&self, trigger: Trigger, now: SystemTime) -> usize {
        self.recheck_where(trigger, now, |_| true).await
    }

    /// Asks again for the live sessions of one connection (its path changed).
    pub async fn recheck_connection(&self, connection: u64, now: SystemTime) -> usize {
        self.recheck_where(Trigger::Path, now, |live| live.question.0 == connection)
            .await
    }

    async fn recheck_where(
        &self,
        trigger: Trigger,
        now: SystemTime,
        which: impl Fn(&Live) -> bool,
    ) -> usize {
        let snapshot = self.current();
        let zoned = self.zoned(now);
        let live: Vec<Arc<Live>> = self
            .lock()
            .values()
            .filter(|live| which(live))
            .cloned()
            .collect();
        let sessions = live.len();
        let started = std::time::Instant::now();
        let generation = snapshot.generation;
        // Off the async workers: new connections keep being served while this runs.
        let pass = move || {
            let mut answers: HashMap<&(u64, String), Option<Denial>> = HashMap::new();
            let mut ended = 0;
            for session in &live {
                if session.cut.is_cancelled() {
                    continue;
                }
                let answer = answers.entry(&session.question).or_insert_with(|| {
                    // A re-check that panics ends its session rather than keep it open unasked.
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        (session.recheck)(&snapshot, &zoned)
                    }))
                    .unwrap_or_else(|_| {
                        Some(Denial {
                            kind: "policy",
                            reason: "the broker could not re-check this session; connect again"
                                .into(),
                            decision: None,
                        })
                    })
                });
                if let Some(denial) = answer {
                    let end = Ended {
                        denial: denial.clone(),
                        generation,
                        trigger,
                    };
                    if session.ended.set(end).is_ok() {
                        session.cut.cancel();
                        ended += 1;
                    }
                }
            }
            ended
        };
        let ended = match tokio::task::spawn_blocking(pass).await {
            Ok(ended) => ended,
            Err(err) => {
                error!(error = %err, "the re-check of live sessions failed");
                0
            }
        };
        let elapsed = started.elapsed();
        self.ended.fetch_add(ended as u64, Ordering::Relaxed);
        self.last_recheck_micros.store(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if ended > 0 || elapsed > Duration::from_millis(100) {
            info!(
                generation,
                sessions,
                ended,
                elapsed_ms = elapsed.as_millis(),
                "live sessions re-checked"
            );
        }
        ended
    }

    async fn watch(self: Arc<Self>, audit: Arc<Audit>, stop: CancellationToken) {
        #[cfg(unix)]
        let mut hangup = self
            .hangup
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let mut poll = tokio::time::interval(POLL);
        let mut pending: Option<Fingerprint> = None;
        loop {
            #[cfg(unix)]
            let hangup_signal = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hangup_signal = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = poll.tick() => {}
                _ = hangup_signal => {
                    self.reload_blocking(&audit, "sighup").await;
                    continue;
                }
                () = stop.cancelled() => return,
            }
            let dir = self.dir.clone();
            let now = tokio::task::spawn_blocking(move || Fingerprint::read(&dir))
                .await
                .unwrap_or_default();
            let seen = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let retry = self
                .unreadable_since
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_some_and(|since| since.elapsed() >= UNREADABLE_RETRY);
            if retry {
                self.reload_blocking(&audit, "retry after a read error")
                    .await;
                continue;
            }
            if now == seen {
                pending = None;
                continue;
            }
            // Debounced: take the change in once the files stayed the same for one poll, so a
            // copy in progress is not read half-written.
            if pending.as_ref() == Some(&now) {
                pending = None;
                self.reload_blocking(&audit, "file change").await;
            } else {
                pending = Some(now);
            }
        }
    }

    async fn reload_blocking(self: &Arc<Self>, audit: &Arc<Audit>, why: &'static str) {
        let (this, audit) = (self.clone(), audit.clone());
        if let Err(err) = tokio::task::spawn_blocking(move || this.reload(&audit, why)).await {
            error!(error = %err, "policy reload failed");
        }
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("session", &self.session)
            .field("ended", &self.ended.get())
            .finish_non_exhaustive()
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.authority.lock().remove(&self.session);
    }
}

impl Fingerprint {
    fn read(dir: &Path) -> Self {
        let mut files = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let relevant = name.ends_with(".cedar")
                    || name == postern_policy::ENTITIES_FILE
                    || name == REVOCATIONS_FILE;
                if !relevant {
                    continue;
                }
                // Followed through symbolic links, as loading does: a folder mounted from a
                // Kubernetes ConfigMap changes by relinking, not by writing the files.
                if let Ok(meta) = std::fs::metadata(entry.path()) {
                    #[cfg(unix)]
                    let (inode, changed) = {
                        use std::os::unix::fs::MetadataExt as _;
                        (meta.ino(), (meta.ctime(), meta.ctime_nsec()))
                    };
                    #[cfg(not(unix))]
                    let (inode, changed) = (0, (0, 0));
                    files.push(FileState {
                        name,
                        len: meta.len(),
                        modified: meta.modified().ok(),
                        inode,
                        changed,
                    });
                }
            }
        }
        files.sort();
        Self(files)
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use postern_policy::{Action, Authentication, Certificate, Principal, Request, Service};

    use super::*;

    /// A session of alice (group support) on `imap`, asked through the snapshot like the
    /// broker's own sessions.
    fn session(id: u64) -> Arc<Live> {
        let principal = Principal {
            id: "https://idp.example.org#alice".into(),
            issuer: "https://idp.example.org".into(),
            subject: "alice".into(),
            email: None,
            name: None,
            groups: vec!["support".into()],
        };
        let service = Service {
            name: "imap".into(),
            protocol: "tcp".into(),
            tags: vec![],
        };
        Arc::new(Live {
            session: id,
            question: (id, "imap".into()),
            recheck: Box::new(move |snapshot: &Snapshot, zoned: &Zoned| {
                let now = SystemTime::from(zoned.timestamp());
                let authentication = Authentication {
                    issuance: "login",
                    flow: Some("device_code"),
                    amr: vec!["mfa".into()],
                    acr: None,
                    auth_time: now,
                };
                let decision = snapshot.policies.authorize(&Request {
                    principal: &principal,
                    authentication: &authentication,
                    device: "00",
                    source: "192.0.2.1".parse().ok()?,
                    now: zoned,
                    action: Action::Connect {
                        service: &service,
                        certificate: Certificate {
                            not_before: now,
                            not_after: now + Duration::from_secs(3600),
                        },
                    },
                });
                (!decision.is_allowed()).then(|| Denial {
                    kind: "policy",
                    reason: "no longer allowed".into(),
                    decision: Some(decision),
                })
            }),
            cut: CancellationToken::new(),
            ended: OnceLock::new(),
        })
    }

    fn folder(policy: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.cedar"), policy).unwrap();
        dir
    }

    fn authority(dir: &Path, zone: &str) -> Authority {
        Authority::new(
            dir,
            TimeZone::get(zone).unwrap(),
            Policies::load_dir(dir).unwrap(),
            Revocations::default(),
        )
    }

    /// An authority over `dir`, watching it (with a timer that never fires in a test).
    fn watching(
        dir: &Path,
    ) -> (
        Arc<Authority>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let authority = Arc::new(authority(dir, "UTC"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(authority.clone().run(
            Arc::new(audit()),
            Duration::from_secs(3600),
            stop.clone(),
        ));
        (authority, stop, task)
    }

    fn audit() -> Audit {
        Audit::with_sink(Box::new(std::io::sink())).unwrap()
    }

    const OFFICE_HOURS: &str = r#"
        @id("support") permit (principal in Group::"support", action, resource);
        @id("office-hours") forbid (principal, action, resource)
        unless { context.time.hour >= 8 && context.time.hour < 18 };
    "#;

    #[tokio::test]
    async fn the_timer_recheck_ends_a_session_when_office_hours_end() {
        let dir = folder(OFFICE_HOURS);
        let authority = authority(dir.path(), "Europe/Madrid");
        let live = session(1);
        let _registration = authority.register(live.clone());
        // 2026-11-26 17:59:59 and 18:00:00 in Madrid (UTC+1 in winter).
        let before = UNIX_EPOCH + Duration::from_secs(1_795_712_399);
        let after = before + Duration::from_secs(1);
        assert_eq!(authority.zoned(before).hour(), 17);
        assert_eq!(authority.recheck(Trigger::Timer, before).await, 0);
        assert!(!live.cut.is_cancelled());
        assert_eq!(authority.recheck(Trigger::Timer, after).await, 1);
        assert!(live.cut.is_cancelled());
        let ended = live.ended.get().unwrap();
        assert_eq!(ended.trigger, Trigger::Timer);
        assert_eq!(
            ended.denial.decision.as_ref().unwrap().policies,
            ["office-hours"]
        );
        // Ended once, audited once.
        assert_eq!(authority.recheck(Trigger::Timer, after).await, 0);
    }

    #[tokio::test]
    async fn a_reload_takes_valid_changes_and_refuses_invalid_ones() {
        let dir = folder(r#"@id("all") permit (principal, action, resource);"#);
        let authority = authority(dir.path(), "UTC");
        let live = session(7);
        let registration = authority.register(live.clone());
        assert_eq!(authority.sessions(), 1);
        let audit = audit();

        // A typo: refused, counted, the old set stays and the session lives.
        std::fs::write(
            dir.path().join("bad.cedar"),
            "permit (principal, action, resource",
        )
        .unwrap();
        assert!(!authority.reload(&audit, "test"));
        assert_eq!(
            (authority.current().generation, authority.rejected()),
            (1, 1)
        );
        assert_eq!(
            authority.recheck(Trigger::Change, SystemTime::now()).await,
            0
        );

        // A forbid: a new generation, and the session ends naming it.
        std::fs::write(
            dir.path().join("bad.cedar"),
            r#"@id("no-support") forbid (principal in Group::"support", action, resource);"#,
        )
        .unwrap();
        assert!(authority.reload(&audit, "test"));
        assert_eq!(authority.current().generation, 2);
        assert_eq!(
            authority.recheck(Trigger::Change, SystemTime::now()).await,
            1
        );
        let ended = live.ended.get().unwrap();
        assert_eq!(ended.generation, 2);
        assert_eq!(
            ended.denial.decision.as_ref().unwrap().policies,
            ["no-support"]
        );

        // A broken revocation list does not hold back a policy change, and vice versa.
        std::fs::write(dir.path().join(REVOCATIONS_FILE), "{").unwrap();
        std::fs::remove_file(dir.path().join("bad.cedar")).unwrap();
        assert!(authority.reload(&audit, "test"));
        assert_eq!(
            (authority.current().generation, authority.rejected()),
            (3, 2)
        );
        assert_eq!(authority.current().policies.len(), 1);

        drop(registration);
        assert_eq!(authority.sessions(), 0);
    }

    #[tokio::test]
    async fn the_watcher_takes_in_a_file_change_within_two_seconds() {
        let dir = folder(r#"@id("all") permit (principal, action, resource);"#);
        let (authority, stop, task) = watching(dir.path());
        let live = session(3);
        let _registration = authority.register(live.clone());
        std::fs::write(
            dir.path().join("deny.cedar"),
            r#"@id("stop") forbid (principal, action, resource);"#,
        )
        .unwrap();
        tokio::time::timeout(Duration::from_secs(2), live.cut.cancelled())
            .await
            .expect("the session ends within 2 s of the change");
        assert_eq!(authority.current().generation, 2);
        stop.cancel();
        task.await.unwrap();
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_watcher_follows_a_folder_that_changes_by_relinking() {
        // The shape of a Kubernetes ConfigMap mount: the files are links through `..data`, and
        // an update swaps `..data` to a new folder.
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("..2026_01");
        std::fs::create_dir(&first).unwrap();
        std::fs::write(
            first.join("p.cedar"),
            r#"@id("all") permit (principal, action, resource);"#,
        )
        .unwrap();
        std::os::unix::fs::symlink("..2026_01", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/p.cedar", dir.path().join("p.cedar")).unwrap();
        let (authority, stop, task) = watching(dir.path());
        let live = session(4);
        let _registration = authority.register(live.clone());

        let second = dir.path().join("..2026_02");
        std::fs::create_dir(&second).unwrap();
        std::fs::write(
            second.join("p.cedar"),
            r#"@id("stop") forbid (principal, action, resource);"#,
        )
        .unwrap();
        std::os::unix::fs::symlink("..2026_02", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        tokio::time::timeout(Duration::from_secs(2), live.cut.cancelled())
            .await
            .expect("the relinked policy is taken in");
        assert_eq!(authority.current().generation, 2);
        stop.cancel();
        task.await.unwrap();
    }
}
