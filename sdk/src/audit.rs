//! Audit events. The host stamps each with a timestamp, the plugin's name, the request id, the
//! tunnel and the hostname, and writes it to the operator's audit sinks. In a native build
//! (unit tests) events are recorded by the [`crate::testing`] host instead.

/// Emits an event of `kind` with `attributes` (key, value).
pub fn emit(kind: &str, attributes: &[(&str, &str)]) {
    #[cfg(target_arch = "wasm32")]
    {
        use crate::__bindings::sluice::plugin::audit as wit;
        let attrs: Vec<wit::Attribute> = attributes
            .iter()
            .map(|&(key, value)| wit::Attribute { key, value })
            .collect();
        wit::emit(kind, &attrs);
    }
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::record_event(kind, attributes);
}
