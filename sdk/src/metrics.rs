//! Counters, gauges and histograms of the plugin's own, shown on the connector's `/metrics`
//! as `sluice_connector_plugin_{plugin}_{name}`. Needs the operator's `metrics` grant: a
//! plugin that uses this module is refused at load without it.
//!
//! ```no_run
//! use sluice_sdk::metrics;
//!
//! metrics::counter_add("decisions", &[("result", "refused")], 1)?;
//! metrics::histogram_observe("upstream_seconds", &[], 0.012)?;
//! # Ok::<(), String>(())
//! ```
//!
//! Names and label names are lowercase letters, digits and `_`. The operator bounds the series
//! (label combinations) a plugin may create (`metrics-max-series`, 100 by default): past it a
//! new series is refused with an error, and existing ones keep counting. Keep label values
//! few (a result, a route), never per-client. In a native build (unit tests) the values are
//! recorded by [`crate::testing`] (see [`crate::testing::metric`]).

#[cfg(not(target_arch = "wasm32"))]
fn owned(labels: &[(&str, &str)]) -> Vec<(String, String)> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Adds `value` to counter `name`.
pub fn counter_add(name: &str, labels: &[(&str, &str)], value: u64) -> Result<(), String> {
    #[cfg(target_arch = "wasm32")]
    return crate::__bindings::sluice::plugin::metrics::counter_add(name, labels, value);
    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::record_metric(name, owned(labels), |v| v + value as f64);
}

/// Sets gauge `name` to `value`.
pub fn gauge_set(name: &str, labels: &[(&str, &str)], value: i64) -> Result<(), String> {
    #[cfg(target_arch = "wasm32")]
    return crate::__bindings::sluice::plugin::metrics::gauge_set(name, labels, value);
    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::record_metric(name, owned(labels), |_| value as f64);
}

/// Records `value` (seconds, for a duration) in histogram `name`.
pub fn histogram_observe(name: &str, labels: &[(&str, &str)], value: f64) -> Result<(), String> {
    #[cfg(target_arch = "wasm32")]
    return crate::__bindings::sluice::plugin::metrics::histogram_observe(name, labels, value);
    // The test host keeps the sum of the observations.
    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::record_metric(name, owned(labels), |v| v + value);
}
