//! The `ccat-wfm` command; all of it lives in the library's `cli` module so that the
//! Python package's `ccat-wfm` entry point runs the very same code.

fn main() -> std::process::ExitCode {
    // glibc gives each thread that allocates an arena of its own (up to eight per core)
    // and keeps what is freed in it: with the trigger-manager's pipelines evaluated on
    // both cores, a restart's peak memory grew by a third. Two arenas keep the speed.
    // SAFETY: called before any other thread exists; mallopt only sets a parameter.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    ccat_workflow_manager::cli::main(std::env::args_os())
}
