//! The plugin's own key-value store, kept across requests, instances and reloads (and shared
//! by the connector's plugin instances). Needs the operator's `kv` grant: a plugin that uses
//! this module is refused at load without it.
//!
//! ```no_run
//! use std::time::Duration;
//! use sluice_sdk::kv;
//!
//! // Count a client's requests in a one-minute window.
//! let hits = kv::increment("hits:203.0.113.7", 1, Some(Duration::from_secs(60)))?;
//! # Ok::<(), kv::Error>(())
//! ```
//!
//! The operator bounds the namespace (10,000 keys and 16 MiB by default): a write past a
//! quota fails with [`Error::Quota`] and changes nothing. Keys are at most 512 bytes.
//!
//! In a native build (unit tests) the store lives on the test thread, with the clock of
//! [`crate::testing::advance`] for expiry; [`crate::testing::clear_kv`] empties it.

// In a native build the fake already returns `Error`; in a component, `?` converts the host's
// error type: one body for both.
#![allow(clippy::needless_question_mark)]

use std::time::Duration;

/// Longest key, in bytes.
pub const MAX_KEY: usize = 512;

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A write would pass one of the operator's quotas; nothing changed.
    Quota(String),
    /// The store could not do it (a remote backend is unreachable, a value is not an
    /// integer for [`increment`]).
    Backend(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Quota(m) => write!(f, "kv quota: {m}"),
            Error::Backend(m) => write!(f, "kv: {m}"),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(target_arch = "wasm32")]
mod imp {
    use crate::__bindings::sluice::plugin::kv as wit;

    pub(super) use wit::{compare_and_swap, delete, get, increment, set};

    impl From<wit::KvError> for super::Error {
        fn from(e: wit::KvError) -> Self {
            match e {
                wit::KvError::Quota(m) => super::Error::Quota(m),
                wit::KvError::Backend(m) => super::Error::Backend(m),
            }
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
use crate::testing::kv_fake as imp;

fn ms(ttl: Option<Duration>) -> Option<u64> {
    ttl.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The value of `key`, if present and not expired.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, Error> {
    Ok(imp::get(key)?)
}

/// Sets `key` to `value`; with `ttl`, it expires that long from now.
pub fn set(key: &str, value: impl AsRef<[u8]>, ttl: Option<Duration>) -> Result<(), Error> {
    Ok(imp::set(key, value.as_ref(), ms(ttl))?)
}

/// Removes `key`; true when it was there.
pub fn delete(key: &str) -> Result<bool, Error> {
    Ok(imp::delete(key)?)
}

/// Sets `key` to `new` only if its value is `expected` (`None`: only if absent); true when
/// it did. Two instances racing for one key: exactly one wins.
pub fn compare_and_swap(
    key: &str,
    expected: Option<&[u8]>,
    new: impl AsRef<[u8]>,
    ttl: Option<Duration>,
) -> Result<bool, Error> {
    Ok(imp::compare_and_swap(key, expected, new.as_ref(), ms(ttl))?)
}

/// Adds `delta` to the integer at `key` (absent counts as 0) and returns the sum. `ttl`
/// applies when the key is created; an existing key keeps its expiry.
pub fn increment(key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64, Error> {
    Ok(imp::increment(key, delta, ms(ttl))?)
}
