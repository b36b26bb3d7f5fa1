//! A test host for native unit tests: what a plugin logs and emits is recorded per thread, so
//! plugin logic can be tested with plain `cargo test`, no proxy needed.
//!
//! ```
//! use sluice_sdk::{testing, Plugin, Request, RequestDecision};
//!
//! struct Hello;
//! impl Plugin for Hello {
//!     type Config = serde_json::Value;
//!     fn new(_: serde_json::Value) -> Result<Self, String> { Ok(Hello) }
//!     fn on_request(&self, req: &Request) -> RequestDecision {
//!         sluice_sdk::audit::emit("seen", &[("path", &req.path)]);
//!         RequestDecision::new().set_header("x-hello", "1")
//!     }
//! }
//!
//! testing::reset();
//! let plugin: Hello = sluice_sdk::load(br#"{}"#).unwrap();
//! let d = plugin.on_request(&Request::new("GET", "https://app.test/x"));
//! assert_eq!(d, RequestDecision::new().set_header("x-hello", "1"));
//! assert_eq!(testing::events()[0].kind, "seen");
//! ```

use std::cell::RefCell;

use crate::log::Level;

/// An audit event recorded by the test host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Event kind.
    pub kind: String,
    /// Attributes, in order.
    pub attributes: Vec<(String, String)>,
}

impl Event {
    /// The value of attribute `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

thread_local! {
    static LOGS: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
    static EVENTS: RefCell<Vec<Event>> = const { RefCell::new(Vec::new()) };
}

/// Log lines recorded on this thread.
pub fn logs() -> Vec<(Level, String)> {
    LOGS.with(|l| l.borrow().clone())
}

/// Audit events recorded on this thread.
pub fn events() -> Vec<Event> {
    EVENTS.with(|e| e.borrow().clone())
}

/// Forgets everything recorded on this thread.
pub fn reset() {
    LOGS.with(|l| l.borrow_mut().clear());
    EVENTS.with(|e| e.borrow_mut().clear());
}

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn record_log(level: Level, message: &str) {
    LOGS.with(|l| l.borrow_mut().push((level, message.to_string())));
}

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn record_event(kind: &str, attributes: &[(&str, &str)]) {
    EVENTS.with(|e| {
        e.borrow_mut().push(Event {
            kind: kind.to_string(),
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    });
}
