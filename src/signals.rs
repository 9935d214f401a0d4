//! SIGINT and SIGTERM (what cron, systemd and a terminal send) become a
//! request to stop: the batch loop takes no new batch, commits what is done,
//! prints its summary and exits 130 or 143. A second signal ends the process
//! at once with the same code.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
pub struct Stop {
    flag: Arc<AtomicBool>,
    signal: Arc<AtomicI32>,
}

impl Stop {
    /// A stop flag wired to SIGINT and SIGTERM.
    pub fn install() -> std::io::Result<Stop> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let stop = Stop::default();
        for sig in [SIGINT, SIGTERM] {
            // Order matters: the shutdown check runs before the flag is set,
            // so only a second signal exits immediately.
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, stop.flag.clone())?;
            signal_hook::flag::register(sig, stop.flag.clone())?;
            let which = stop.signal.clone();
            // SAFETY: the handler only stores into an atomic.
            unsafe {
                signal_hook::low_level::register(sig, move || which.store(sig, Ordering::SeqCst))?;
            }
        }
        Ok(stop)
    }

    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// 130 after SIGINT, 143 after SIGTERM; `None` when no signal came.
    pub fn exit_code(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            sig => Some(128 + sig),
        }
    }

    /// The signal's name, for the summary.
    pub fn name(&self) -> &'static str {
        match self.signal.load(Ordering::SeqCst) {
            2 => "SIGINT",
            15 => "SIGTERM",
            _ => "signal",
        }
    }
}

/// Sleep `total` in short steps; false if `stop` was set meanwhile.
pub fn sleep_unless_stopped(total: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + total;
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}
