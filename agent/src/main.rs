//! `postern`: see the library documentation.

fn main() -> std::process::ExitCode {
    postern_agent::cli::main(std::env::args_os())
}
