//! Policy cost: one Cedar decision with 10, 100 and 1,000 policies, through the same mapping the
//! broker uses, and the time to re-check 10,000 live sessions after a change (the broker's own
//! registry and re-check).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use postern_broker::authz::{Authority, Denial, Live, Snapshot, Trigger};
use postern_policy::{
    Action, Authentication, Certificate, Policies, Principal, Request, Service, Source,
};
use serde_json::{Value, json};

use crate::latency::percentile;
use tokio_util::sync::CancellationToken;

/// What was measured.
pub(crate) struct PolicyCost {
    decisions: usize,
    /// Policy count, and the sorted decision times.
    rows: Vec<(usize, Vec<Duration>)>,
    sessions: usize,
    /// Policy count, and the time each re-check of every session took.
    rechecks: Vec<(usize, Vec<Duration>)>,
}

/// `count` policies shaped like a real set: most name in their scope the group, user or service
/// they are about (per-group permits, per-user permits, per-service network rules, per-group
/// time rules); one in a hundred is a global rule that only a `when` condition narrows.
fn policies(count: usize) -> Policies {
    let mut text = String::from(
        "@id(\"login\") permit (principal, action in [Action::\"enroll\", Action::\"renew\"], resource) when { context.authentication.amr.contains(\"otp\") };\n",
    );
    for n in 1..count {
        let line = if n % 100 == 0 {
            format!(
                "@id(\"p{n}\") forbid (principal, action, resource) when {{ context.source_ip.isInRange(ip(\"198.51.{}.0/24\")) }};\n",
                n / 100
            )
        } else {
            match n % 4 {
                0 => format!(
                    "@id(\"p{n}\") permit (principal in Group::\"team-{n}\", action == Action::\"connect\", resource == Service::\"svc-{n}\");\n"
                ),
                1 => format!(
                    "@id(\"p{n}\") forbid (principal in Group::\"contractors-{n}\", action == Action::\"connect\", resource) unless {{ context.time.hour >= 8 && context.time.hour < 18 }};\n"
                ),
                2 => format!(
                    "@id(\"p{n}\") forbid (principal, action == Action::\"connect\", resource == Service::\"svc-{n}\") unless {{ context.source_ip.isInRange(ip(\"10.{}.0.0/16\")) }};\n",
                    n % 250
                ),
                _ => format!(
                    "@id(\"p{n}\") permit (principal == User::\"https://idp.example.org#user{n}\", action == Action::\"connect\", resource) when {{ context.authentication.amr.contains(\"otp\") }};\n"
                ),
            }
        };
        text.push_str(&line);
    }
    // The one that lets the measured request through.
    text.push_str(
        "@id(\"staff-imap\") permit (principal in Group::\"staff\", action == Action::\"connect\", resource == Service::\"imap\");\n",
    );
    Policies::from_sources(
        &[Source {
            name: "bench.cedar".into(),
            text,
        }],
        None,
    )
    .expect("the generated policies are valid")
}

struct Fixture {
    principal: Principal,
    authentication: Authentication,
    service: Service,
}

fn fixture(now: SystemTime) -> Fixture {
    Fixture {
        principal: Principal {
            id: "https://idp.example.org#alice".into(),
            issuer: "https://idp.example.org".into(),
            subject: "alice".into(),
            email: Some("alice@example.org".into()),
            name: None,
            groups: vec!["staff".into(), "team-4".into()],
        },
        authentication: Authentication {
            issuance: "login",
            flow: Some("device_code"),
            amr: vec!["pwd".into(), "otp".into()],
            acr: None,
            auth_time: now - Duration::from_secs(600),
        },
        service: Service {
            name: "imap".into(),
            protocol: "tcp".into(),
            tags: vec![],
        },
    }
}

fn decide(policies: &Policies, fixture: &Fixture, zoned: &jiff::Zoned, now: SystemTime) -> bool {
    policies
        .authorize(&Request {
            principal: &fixture.principal,
            authentication: &fixture.authentication,
            device: "0011",
            source: std::net::IpAddr::from([10, 4, 0, 9]),
            now: zoned,
            action: Action::Connect {
                service: &fixture.service,
                certificate: Certificate {
                    not_before: now - Duration::from_secs(60),
                    not_after: now + Duration::from_secs(3600),
                },
            },
        })
        .is_allowed()
}

pub(crate) async fn run(decisions: usize, sessions: usize) -> anyhow::Result<PolicyCost> {
    let now = SystemTime::now();
    let zoned = jiff::Timestamp::try_from(now)?.to_zoned(jiff::tz::TimeZone::UTC);
    let fixture = Arc::new(fixture(now));
    let mut rows = Vec::new();
    let mut rechecks = Vec::new();
    for count in [10, 100, 1000] {
        let set = policies(count);
        anyhow::ensure!(
            decide(&set, &fixture, &zoned, now),
            "the measured request is allowed"
        );
        for _ in 0..100 {
            decide(&set, &fixture, &zoned, now);
        }
        let mut samples = Vec::with_capacity(decisions);
        for _ in 0..decisions {
            let started = Instant::now();
            // Each decision at its own instant, as the broker's are: the instant is part of the
            // request.
            let now = SystemTime::now();
            let zoned = jiff::Timestamp::try_from(now)?.to_zoned(jiff::tz::TimeZone::UTC);
            std::hint::black_box(decide(&set, &fixture, &zoned, now));
            samples.push(started.elapsed());
        }
        samples.sort();
        rows.push((count, samples));
        rechecks.push((count, recheck(set, fixture.clone(), sessions).await?));
    }
    Ok(PolicyCost {
        decisions,
        rows,
        sessions,
        rechecks,
    })
}

/// Registers `sessions` live sessions with an authority over `set` and times three re-checks.
async fn recheck(
    set: Policies,
    fixture: Arc<Fixture>,
    sessions: usize,
) -> anyhow::Result<Vec<Duration>> {
    let dir = tempfile::tempdir()?;
    let authority = Authority::new(
        dir.path(),
        jiff::tz::TimeZone::UTC,
        set,
        postern_policy::revocations::Revocations::default(),
    );
    let lives: Vec<Arc<Live>> = (0..sessions as u64)
        .map(|session| {
            let fixture = fixture.clone();
            Arc::new(Live {
                session,
                // Each on its own connection: the worst case, no answer shared.
                question: (session, "imap".into()),
                recheck: Box::new(move |snapshot: &Snapshot, zoned: &jiff::Zoned| {
                    let now = SystemTime::from(zoned.timestamp());
                    (!decide(&snapshot.policies, &fixture, zoned, now)).then(|| Denial {
                        kind: "policy",
                        reason: String::new(),
                        decision: None,
                    })
                }),
                cut: CancellationToken::new(),
                ended: OnceLock::new(),
            })
        })
        .collect();
    let registrations: Vec<_> = lives
        .iter()
        .map(|l| authority.register(l.clone()))
        .collect();
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let ended = authority.recheck(Trigger::Change, SystemTime::now()).await;
        times.push(started.elapsed());
        anyhow::ensure!(ended == 0, "every session stays allowed");
    }
    drop(registrations);
    times.sort();
    Ok(times)
}

impl PolicyCost {
    /// The table.
    pub(crate) fn table(&self) -> String {
        let base = self.rows.first().map(|(_, s)| percentile(s, 50));
        let mut out = format!(
            "Cedar decision (connect, through the broker's mapping), µs, {} decisions\n\n{:<32} {:>8} {:>8} {:>8} {:>12}\n",
            self.decisions, "policies", "p50", "p90", "p99", "p50/10"
        );
        for (count, samples) in &self.rows {
            let p50 = percentile(samples, 50);
            out.push_str(&format!(
                "{:<32} {:>8.1} {:>8.1} {:>8.1} {:>11.2}×\n",
                count,
                micros(p50),
                micros(percentile(samples, 90)),
                micros(percentile(samples, 99)),
                base.map_or(f64::NAN, |b| p50.as_secs_f64() / b.as_secs_f64()),
            ));
        }
        out.push_str(&format!(
            "\nRe-check of {} live sessions after a change, ms (median of 3)\n\n{:<32} {:>8} {:>12}\n",
            self.sessions, "policies", "median", "per session"
        ));
        for (count, times) in &self.rechecks {
            let median = percentile(times, 50);
            out.push_str(&format!(
                "{:<32} {:>8.1} {:>10.1} µs\n",
                count,
                median.as_secs_f64() * 1e3,
                micros(median) / self.sessions.max(1) as f64,
            ));
        }
        out
    }

    /// The same as JSON.
    pub(crate) fn json(&self) -> Value {
        json!({
            "benchmark": "policy",
            "unit": "µs",
            "decisions": self.decisions,
            "rows": self.rows.iter().map(|(count, s)| json!({
                "policies": count,
                "p50": micros(percentile(s, 50)),
                "p90": micros(percentile(s, 90)),
                "p99": micros(percentile(s, 99)),
            })).collect::<Vec<_>>(),
            "recheck_sessions": self.sessions,
            "recheck_ms": self.rechecks.iter().map(|(count, t)| json!({
                "policies": count,
                "median": percentile(t, 50).as_secs_f64() * 1e3,
            })).collect::<Vec<_>>(),
        })
    }
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}
