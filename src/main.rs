//! The `ccat-wfm` command; all of it lives in the library's `cli` module so that the
//! Python package's `ccat-wfm` entry point runs the very same code.

fn main() -> std::process::ExitCode {
    ccat_workflow_manager::cli::main(std::env::args_os())
}
