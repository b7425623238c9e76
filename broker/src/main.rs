//! `postern-broker`: see the library documentation.

fn main() -> std::process::ExitCode {
    postern_broker::cli::main(std::env::args_os())
}
