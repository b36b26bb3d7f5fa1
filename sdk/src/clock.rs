//! The time, as a plugin should read it: the host's wall clock in a component, and the test
//! clock of [`crate::testing::advance`] in native tests (so that code depending on time, such
//! as a rate limit or a token's expiry, can be tested without waiting).

use std::time::{Duration, SystemTime};

/// Now.
pub fn now() -> SystemTime {
    #[cfg(target_arch = "wasm32")]
    return SystemTime::now();
    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::test_now();
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}
