//! Reading a broker's audit trail (JSON lines) while the broker writes it.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The events written to `path` so far. A last line still being written (no newline yet) is
/// left for the next look.
pub(crate) fn read(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .map(|line| serde_json::from_str(line).expect("every audit line is JSON"))
        .collect()
}

/// The events in `path` with `event.action` equal to `action`.
pub(crate) fn events(path: &Path, action: &str) -> Vec<Value> {
    read(path)
        .into_iter()
        .filter(|e| e["event"]["action"] == action)
        .collect()
}

/// Waits up to `limit` for an event `action` satisfying `check` (events can trail what a
/// client sees by a moment); panics with the whole trail when none comes.
pub(crate) async fn wait_for(
    path: &Path,
    action: &str,
    limit: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(event) = events(path, action).into_iter().find(|e| check(e)) {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no `{action}` audit event as expected within {limit:?}; the trail:\n{:#?}",
            read(path)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits up to `limit` until `path` holds at least `count` events `action`; whether it does.
pub(crate) async fn wait_for_count(
    path: &Path,
    action: &str,
    count: usize,
    limit: Duration,
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if events(path, action).len() >= count {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
