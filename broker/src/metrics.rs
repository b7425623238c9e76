//! A Prometheus text endpoint (`GET /metrics`) on the address `metrics.listen` names: what an
//! operator alerts on — a refused policy change, sessions ended by a re-check, load.
//!
//! It is a few lines of HTTP/1.1, not a web server: one request per connection, a bounded
//! request head, nothing but `GET /metrics` answered.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::serve::Shared;

/// Longest request head read.
const MAX_HEAD: usize = 8 * 1024;

/// Time a scraper has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Scrapes answered at once; more connections are closed at once, so that nobody who can reach
/// the port can hold the broker's file descriptors.
const MAX_CONNECTIONS: usize = 8;

/// Serves until `stop`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    answer(stream, shared).await;
                    drop(slot);
                });
            }
            Err(err) => {
                debug!(error = %err, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buffer[..n]),
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    if !complete {
        return;
    }
    let (status, body) = if head.starts_with(b"GET /metrics ") {
        ("200 OK", render(&shared))
    } else {
        (
            "404 Not Found",
            "only GET /metrics is served here\n".to_owned(),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The metrics, in Prometheus text format.
pub(crate) fn render(shared: &Shared) -> String {
    let authority = &shared.authority;
    let snapshot = authority.current();
    let counters = authority.counters();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "postern_policy_generation",
        "gauge",
        "Generation of the policies, entities and revocations in force (1 at start).",
        snapshot.generation.to_string(),
    );
    metric(
        "postern_policies_loaded",
        "gauge",
        "Policies in force.",
        snapshot.policies.len().to_string(),
    );
    metric(
        "postern_revocations",
        "gauge",
        "Revocations in force.",
        snapshot.revocations.len().to_string(),
    );
    metric(
        "postern_policy_reloads_total",
        "counter",
        "Changes to the policy folder taken in.",
        counters.reloads.to_string(),
    );
    metric(
        "postern_policy_reload_rejected_total",
        "counter",
        "Changes to the policy folder refused because a file was invalid; the previous version stayed in force.",
        counters.rejected.to_string(),
    );
    metric(
        "postern_sessions_open",
        "gauge",
        "Tunnel sessions open now.",
        shared.open_sessions.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "postern_sessions_ended_by_recheck_total",
        "counter",
        "Live sessions ended because a re-check no longer allowed them.",
        counters.ended.to_string(),
    );
    metric(
        "postern_recheck_last_duration_seconds",
        "gauge",
        "How long the last re-check of every live session took.",
        format!("{:.6}", counters.last_recheck.as_secs_f64()),
    );
    out
}
