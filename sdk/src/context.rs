//! Values kept for the rest of one request: set in one hook, read in a later hook of the same
//! request (say, a user id found in `on_request` and put in a response header by
//! `on_response`). Each plugin has its own; they are gone when the request ends. No grant is
//! needed.
//!
//! Limits: keys of at most [`MAX_KEY`] bytes, and [`MAX_BYTES`] of keys and values together
//! per plugin and request; a [`set`] past them fails and stores nothing.
//!
//! In a native build (unit tests) the values live on the test thread until
//! [`crate::testing::reset`], which stands for the end of the request.

/// Longest key, in bytes.
pub const MAX_KEY: usize = 128;
/// What one plugin may keep for one request: keys and values together, in bytes.
pub const MAX_BYTES: usize = 16 * 1024;

/// The value stored under `key` in this request.
pub fn get(key: &str) -> Option<Vec<u8>> {
    #[cfg(target_arch = "wasm32")]
    return crate::__bindings::sluice::plugin::context::get(key);
    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::context_get(key);
}

/// The value under `key`, if it is there and is UTF-8.
pub fn get_str(key: &str) -> Option<String> {
    get(key).and_then(|v| String::from_utf8(v).ok())
}

/// Stores `value` under `key` for the rest of this request, replacing any earlier value.
pub fn set(key: &str, value: impl AsRef<[u8]>) -> Result<(), String> {
    #[cfg(target_arch = "wasm32")]
    return crate::__bindings::sluice::plugin::context::set(key, value.as_ref());
    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::context_set(key, value.as_ref());
}

/// Forgets `key`.
pub fn remove(key: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::__bindings::sluice::plugin::context::remove(key);
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::context_remove(key);
}
