//! pgprism entry point: parse the command line and dispatch. Everything else lives in the library.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    pgprism::cli::main()
}
