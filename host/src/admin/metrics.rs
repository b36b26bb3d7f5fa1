//! Prometheus metrics of one role (edge or connector), encoded in the text format.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label of request counters: the status class (`2xx` … `5xx`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// `1xx`, `2xx`, `3xx`, `4xx` or `5xx`.
    pub class: &'static str,
}

/// Label of error counters: a stable kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// What went wrong (`refused`, `unauthorized`, `limit`…).
    pub kind: &'static str,
}

/// Labels of plugin failure counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginErrorLabels {
    /// Plugin name.
    pub plugin: String,
    /// `trap`, `timeout`, `memory`, `invalid-decision`, `instantiate`, `unavailable`,
    /// `audit-overflow`.
    pub kind: &'static str,
}

/// Labels of per-plugin gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// Plugin name.
    pub plugin: String,
}

/// Labels of the plugin hook-duration histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginHookLabels {
    /// Plugin name.
    pub plugin: String,
    /// `on-request`, `on-response` or `on-complete`.
    pub hook: &'static str,
}

fn hook_histogram() -> Histogram {
    // 1 µs … ~0.5 s.
    Histogram::new(exponential_buckets(0.000_001, 2.0, 20))
}

/// Every metric of a role. Cheap to share: each field is an `Arc` inside.
#[derive(Debug)]
pub struct Metrics {
    /// Requests answered, by status class.
    pub requests: Family<StatusLabels, Counter>,
    /// Time to the response head, in seconds.
    pub duration: Histogram,
    /// Streams (requests) in flight.
    pub in_flight: Gauge,
    /// Registered connector connections.
    pub registered: Gauge,
    /// Failed registrations, by kind.
    pub registration_failures: Family<KindLabels, Counter>,
    /// Origin failures, by kind (connector only).
    pub origin_errors: Family<KindLabels, Counter>,
    /// Requests refused by admission control, by kind.
    pub rejected: Family<KindLabels, Counter>,
    /// Plugin failures, by plugin and kind.
    pub plugin_errors: Family<PluginErrorLabels, Counter>,
    /// Plugin hook durations, by plugin and hook.
    pub plugin_hook_duration: Family<PluginHookLabels, Histogram, fn() -> Histogram>,
    /// Live plugin instances (in use or idle), by plugin.
    pub plugin_instances: Family<PluginLabels, Gauge>,
    /// Audit events written.
    pub audit_events: Counter,
    registry: Registry,
}

impl Metrics {
    /// Metrics named `<prefix>_…` (`sluice_edge`, `sluice_connector`).
    pub fn new(prefix: &str) -> Self {
        let mut registry = Registry::with_prefix(prefix);
        let requests = Family::<StatusLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.0005, 2.0, 18));
        let in_flight = Gauge::default();
        let registered = Gauge::default();
        let registration_failures = Family::<KindLabels, Counter>::default();
        let origin_errors = Family::<KindLabels, Counter>::default();
        let rejected = Family::<KindLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by status class",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response head",
            duration.clone(),
        );
        registry.register("streams_in_flight", "Requests in flight", in_flight.clone());
        registry.register(
            "registered_connections",
            "Connector connections registered",
            registered.clone(),
        );
        registry.register(
            "registration_failures",
            "Failed registrations, by kind",
            registration_failures.clone(),
        );
        registry.register(
            "origin_errors",
            "Origin failures, by kind",
            origin_errors.clone(),
        );
        registry.register(
            "rejected_requests",
            "Requests refused by admission control",
            rejected.clone(),
        );
        let plugin_errors = Family::<PluginErrorLabels, Counter>::default();
        let plugin_hook_duration =
            Family::<PluginHookLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                hook_histogram as fn() -> Histogram,
            );
        let audit_events = Counter::default();
        let plugin_instances = Family::<PluginLabels, Gauge>::default();
        registry.register(
            "plugin_instances",
            "Live plugin instances (in use or idle), by plugin",
            plugin_instances.clone(),
        );
        registry.register(
            "plugin_errors",
            "Plugin failures, by plugin and kind",
            plugin_errors.clone(),
        );
        registry.register(
            "plugin_hook_duration_seconds",
            "Plugin hook call duration",
            plugin_hook_duration.clone(),
        );
        registry.register(
            "audit_events",
            "Audit events written to the sinks",
            audit_events.clone(),
        );
        Metrics {
            requests,
            duration,
            in_flight,
            registered,
            registration_failures,
            origin_errors,
            rejected,
            plugin_errors,
            plugin_hook_duration,
            plugin_instances,
            audit_events,
            registry,
        }
    }

    /// Counts one answered request.
    pub fn observe(&self, status: u16, elapsed: Duration) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests.get_or_create(&StatusLabels { class }).inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Counts a request as in flight until dropped.
#[derive(Debug)]
pub struct InFlightGauge(Gauge);

impl InFlightGauge {
    /// Increments `gauge` now, decrements on drop.
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        InFlightGauge(gauge.clone())
    }
}

impl Drop for InFlightGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_by_class() {
        let m = Metrics::new("sluice_test");
        m.observe(204, Duration::from_millis(3));
        m.observe(502, Duration::from_millis(3));
        m.origin_errors
            .get_or_create(&KindLabels { kind: "refused" })
            .inc();
        let text = m.encode();
        assert!(
            text.contains(r#"sluice_test_requests_total{class="2xx"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"sluice_test_requests_total{class="5xx"} 1"#));
        assert!(text.contains(r#"sluice_test_origin_errors_total{kind="refused"} 1"#));
        assert!(text.contains("sluice_test_request_duration_seconds_count 2"));
    }
}
