//! The `autoembed` binary: parse the command line, resolve the configuration,
//! run, and turn the outcome into an exit code. The logic lives in the library.

use autoembed::{cli::Cli, config::Config, output, signals::Stop};
use clap::Parser;

fn main() {
    output::install_panic_hook();
    let cli = Cli::parse();
    let command = cli.command.name();
    let json = cli.command.output().json;
    let cfg = match Config::resolve(cli) {
        Ok(cfg) => cfg,
        Err(e) => {
            autoembed::report_error(command, json, &e);
            std::process::exit(e.exit_code());
        }
    };
    tune_allocator(cfg.provider.kind == autoembed::models::ProviderKind::Local);
    let stop = match Stop::install() {
        Ok(stop) => stop,
        Err(e) => {
            output::log(-2, &format!("error: cannot install signal handlers: {e}"));
            std::process::exit(2);
        }
    };
    std::process::exit(autoembed::run(&cfg, &stop));
}

/// Keep peak memory flat however many batches a backfill runs: glibc would
/// otherwise raise its mmap threshold after the first large reply is freed
/// and keep later ones in per-thread arenas, where they fragment.
///
/// The local model is the opposite case: every layer allocates and frees
/// the same few buffers of up to 25 MB, thousands of times a run. Mapping
/// and unmapping each one costs a third of the CPU in page faults, so they
/// stay in the heap (and are reused) there.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator(local_model: bool) {
    // SAFETY: mallopt only tunes the allocator; called before any thread starts.
    unsafe {
        if local_model {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        } else {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
            libc::mallopt(libc::M_ARENA_MAX, 4);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator(_local_model: bool) {}
