//! Child processes for tests and the demo: run to completion, or keep running until dropped.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// A child process that is killed when dropped, however the test ends.
#[derive(Debug)]
pub struct Running(pub Child);

impl Running {
    /// Sends SIGTERM and waits up to 20 s for the process to exit.
    pub fn terminate(mut self) -> ExitStatus {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.0.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Running {
    /// Stops the process (SIGSTOP), as a laptop's sleep does: it runs no code until resumed.
    pub fn freeze(&self) {
        self.signal(rustix::process::Signal::STOP);
    }

    /// Resumes a frozen process (SIGCONT).
    pub fn thaw(&self) {
        self.signal(rustix::process::Signal::CONT);
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.0.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `program` with `args` and `POSTERN_HOME=home`, asserts success, returns its stdout.
pub fn run_ok(program: &Path, args: &[&str], home: &Path) -> String {
    let output = Command::new(program)
        .args(args)
        .env("POSTERN_HOME", home)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{} {args:?}: {}",
        program.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Reads lines until one contains `needle`, returns it, and keeps draining the rest in the
/// background so that the writer never blocks on a full pipe.
pub fn wait_for_line(reader: impl Read + Send + 'static, needle: &str) -> String {
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        if line.contains(needle) {
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            return line.trim_end().to_owned();
        }
        line.clear();
    }
    panic!("the process ended without printing `{needle}`");
}
