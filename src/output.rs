//! Everything autoembed prints goes through here: log lines on stderr, the
//! summary or `--json` object on stdout, and the panic message.
//!
//! The one rule this module exists for: secrets never reach a terminal, a cron
//! mail or a CI log. Once configuration is resolved, the API key and the
//! database password are registered with [`set_secrets`], and every line is
//! passed through [`redact`] on its way out.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicI8, Ordering};
use std::sync::{OnceLock, RwLock};

static LEVEL: AtomicI8 = AtomicI8::new(0);
static SECRETS: OnceLock<RwLock<Vec<String>>> = OnceLock::new();

/// Log levels: -1 errors only (`-q`), 0 the default, 1 `-v`, 2 `-vv` and more.
pub fn set_level(level: i8) {
    LEVEL.store(level, Ordering::Relaxed);
}

pub fn level() -> i8 {
    LEVEL.load(Ordering::Relaxed)
}

fn secrets() -> &'static RwLock<Vec<String>> {
    SECRETS.get_or_init(|| RwLock::new(Vec::new()))
}

/// Secrets shorter than this are not masked.
pub const MIN_SECRET_LEN: usize = 4;

/// Register strings that must never be printed (of at least [`MIN_SECRET_LEN`] characters).
pub fn set_secrets<I: IntoIterator<Item = String>>(values: I) {
    let mut list = secrets().write().unwrap_or_else(|e| e.into_inner());
    for v in values {
        // Shorter strings are no real secret, and masking them would garble
        // every line that happens to contain them.
        if v.chars().count() >= MIN_SECRET_LEN && !list.contains(&v) {
            list.push(v);
        }
    }
    // Longest first, so that a secret containing another is masked whole.
    list.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `text` with every registered secret replaced by `***`.
pub fn redact(text: &str) -> String {
    let list = secrets().read().unwrap_or_else(|e| e.into_inner());
    let mut out = text.to_string();
    for s in list.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "***");
        }
    }
    out
}

/// Write one line to stderr (redacted), if `level` is enabled.
pub fn log(level: i8, line: &str) {
    if level <= self::level() {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "autoembed: {}", redact(line));
    }
}

/// Write `text` to stdout (redacted).
/// A JSON object on stderr, one line, without the `autoembed:` prefix (for
/// log collectors), redacted like every other line.
pub fn log_json(line: &str) {
    if level() >= 0 {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{}", redact(line));
    }
}

pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", redact(text));
    let _ = out.flush();
}

pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// Replace the default panic message (which could quote a value) with a
/// redacted one. A panic is a bug in autoembed; say so.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "autoembed: internal error{place}: {} (this is a bug; please report it)",
            redact(&payload)
        );
    }));
}

/// `info!`-style helpers. Level 0 is printed unless `-q`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::output::log(0, &format!($($arg)*)) };
}

#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { if $crate::output::level() >= 1 { $crate::output::log(1, &format!($($arg)*)) } };
}

#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => { if $crate::output::level() >= 2 { $crate::output::log(2, &format!($($arg)*)) } };
}

#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::output::log(-1, &format!("warning: {}", format!($($arg)*))) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_every_registered_secret_longest_first() {
        set_secrets([
            "sk-test-abc".to_string(),
            "sk-test".to_string(),
            String::new(),
        ]);
        assert_eq!(redact("key sk-test-abc and sk-test."), "key *** and ***.");
        assert_eq!(redact("nothing here"), "nothing here");
        // Too short to be a secret: masking "x" would garble every line.
        set_secrets(["x".to_string()]);
        assert_eq!(redact("max"), "max");
    }
}
