//! `postern` as the end-to-end tests run it: the same entry point, built with the tests so that
//! they never run a stale binary.

fn main() -> std::process::ExitCode {
    postern_agent::cli::main(std::env::args_os())
}
