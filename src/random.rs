//! Numbers that differ between calls and between processes, for names no
//! two runs share (a run's claims, a batch job's intent, a multipart
//! boundary) and for retry jitter. Not for secrets: std's per-process random
//! hash keys over the process id and the time.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::Instant;

/// A number no earlier call of any process is likely to have given.
pub fn u64() -> u64 {
    RandomState::new().hash_one((std::process::id(), Instant::now()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_calls_differ() {
        assert_ne!(super::u64(), super::u64());
    }
}
