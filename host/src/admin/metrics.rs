//! Metrics of each role, encoded in the OpenMetrics text format. Each role registers only
//! its own families: [`EdgeMetrics`] for the edge, [`Metrics`] for the connector.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
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

/// Labels of the edge's request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EdgeRequestLabels {
    /// The tunnel the request was routed to; empty when none serves its host or it was
    /// refused before routing.
    pub tunnel: TunnelId,
    /// `1xx` … `5xx`.
    pub class: &'static str,
    /// Who answered: `origin`, `plugin` or `connector` (relayed from the connector); or why
    /// the edge answered itself: `offline` (no connector registered), `connector-failed`
    /// (the connector did not answer), `edge-refused` (a bad request, unknown host, limit).
    pub reason: &'static str,
}

/// Label of per-tunnel gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelLabels {
    /// Tunnel id.
    pub tunnel: TunnelId,
}

/// A tunnel's id as a label value, shared with the edge's routing table: counting a request
/// copies no string.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TunnelId(pub Arc<str>);

impl From<&str> for TunnelId {
    fn from(id: &str) -> Self {
        TunnelId(id.into())
    }
}

impl EncodeLabelValue for TunnelId {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

/// Labels of the edge's connection gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// Tunnel id.
    pub tunnel: String,
    /// Transport: `quic` or `http2`.
    pub protocol: &'static str,
}

/// Label of the connector's connection gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    /// Transport: `quic` or `http2`.
    pub protocol: &'static str,
}

/// Labels of the origin pools' metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolMemberLabels {
    /// Pool name.
    pub pool: String,
    /// Member (origin) name.
    pub member: String,
}

/// Labels of the connector's origin error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginErrorLabels {
    /// Origin name.
    pub origin: String,
    /// `refused`, `timeout`, `tls`, `protocol`…
    pub kind: &'static str,
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
    /// Time to the end of the response, in seconds.
    pub duration: Histogram,
    /// Streams (requests) in flight.
    pub in_flight: Gauge,
    /// Registered connector connections, by transport (see [`Metrics::registered_on`]).
    pub registered: Family<ProtocolLabels, Gauge>,
    /// Failed registrations, by kind.
    pub registration_failures: Family<KindLabels, Counter>,
    /// Origin failures, by origin and kind.
    pub origin_errors: Family<OriginErrorLabels, Counter>,
    /// Requests refused by admission control, by kind.
    pub rejected: Family<KindLabels, Counter>,
    /// Whether each member of each origin pool is taking requests (1) or not (0).
    pub pool_member_healthy: Family<PoolMemberLabels, Gauge>,
    /// Requests sent to each member of each origin pool (retries included).
    pub pool_member_requests: Family<PoolMemberLabels, Counter>,
    /// Plugin failures, by plugin and kind.
    pub plugin_errors: Family<PluginErrorLabels, Counter>,
    /// Plugin hook durations, by plugin and hook.
    pub plugin_hook_duration: Family<PluginHookLabels, Histogram, fn() -> Histogram>,
    /// Live plugin instances (in use or idle), by plugin.
    pub plugin_instances: Family<PluginLabels, Gauge>,
    /// Audit events written.
    pub audit_events: Counter,
    /// TCP sessions and UDP flows.
    pub sessions: std::sync::Arc<crate::services::SessionMetrics>,
    /// Metrics plugins define (`…_plugin_{plugin}_{name}`).
    pub plugin_metrics: std::sync::Arc<crate::plugin::metrics::PluginMetrics>,
    registry: Registry,
}

impl Metrics {
    /// The registered-connections gauge of `protocol`.
    pub fn registered_on(&self, protocol: crate::transport::Protocol) -> Gauge {
        self.registered
            .get_or_create(&ProtocolLabels {
                protocol: protocol.as_str(),
            })
            .clone()
    }

    /// The connector's metrics, named `<prefix>_…` (`sluice_connector`).
    pub fn new(prefix: &str) -> Self {
        let mut registry = Registry::with_prefix(prefix);
        let requests = Family::<StatusLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.0005, 2.0, 18));
        let in_flight = Gauge::default();
        let registered = Family::<ProtocolLabels, Gauge>::default();
        // Both series exist from the start, at 0.
        for protocol in [
            crate::transport::Protocol::Quic,
            crate::transport::Protocol::Http2,
        ] {
            let _ = registered.get_or_create(&ProtocolLabels {
                protocol: protocol.as_str(),
            });
        }
        let registration_failures = Family::<KindLabels, Counter>::default();
        let origin_errors = Family::<OriginErrorLabels, Counter>::default();
        let rejected = Family::<KindLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by status class",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request from the edge to the end of its response (plugins, origin and body included)",
            duration.clone(),
        );
        registry.register("streams_in_flight", "Requests in flight", in_flight.clone());
        registry.register(
            "registered_connections",
            "Connections registered with an edge, by transport",
            registered.clone(),
        );
        registry.register(
            "registration_failures",
            "Failed registrations, by kind",
            registration_failures.clone(),
        );
        registry.register(
            "origin_errors",
            "Origin failures, by origin and kind",
            origin_errors.clone(),
        );
        registry.register(
            "rejected_requests",
            "Requests refused by admission control",
            rejected.clone(),
        );
        let pool_member_healthy = Family::<PoolMemberLabels, Gauge>::default();
        let pool_member_requests = Family::<PoolMemberLabels, Counter>::default();
        registry.register(
            "pool_member_healthy",
            "Whether an origin pool's member takes requests (1) or is out (0): failed health checks or ejected after consecutive failures",
            pool_member_healthy.clone(),
        );
        registry.register(
            "pool_member_requests",
            "Requests sent to an origin pool's member, retries included",
            pool_member_requests.clone(),
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
        let sessions = std::sync::Arc::new(crate::services::SessionMetrics::default());
        sessions.register(&mut registry);
        let plugin_metrics = std::sync::Arc::new(crate::plugin::metrics::PluginMetrics::default());
        registry.register_collector(Box::new(crate::plugin::metrics::Shared(
            plugin_metrics.clone(),
        )));
        Metrics {
            sessions,
            plugin_metrics,
            requests,
            duration,
            in_flight,
            registered,
            registration_failures,
            origin_errors,
            rejected,
            pool_member_healthy,
            pool_member_requests,
            plugin_errors,
            plugin_hook_duration,
            plugin_instances,
            audit_events,
            registry,
        }
    }

    /// Counts one answered request.
    pub fn observe(&self, status: u16, elapsed: Duration) {
        let class = status_class(status);
        self.requests.get_or_create(&StatusLabels { class }).inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

impl Exposition for Metrics {
    fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// Something the admin listener serves on `/metrics`.
pub trait Exposition: Send + Sync {
    /// The OpenMetrics text exposition.
    fn encode(&self) -> String;
}

/// Content type of [`Exposition::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// `1xx` … `5xx`.
fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The edge's metrics (`sluice_edge_…`).
#[derive(Debug)]
pub struct EdgeMetrics {
    /// Requests answered, by tunnel, status class and reason.
    pub requests: Family<EdgeRequestLabels, Counter>,
    /// Time to the response head, by tunnel.
    pub duration: Family<TunnelLabels, Histogram, fn() -> Histogram>,
    /// Requests in flight, by tunnel.
    pub in_flight: Family<TunnelLabels, Gauge>,
    /// Registered connector connections, by tunnel and protocol.
    pub registered: Family<ConnectionLabels, Gauge>,
    /// Distinct ingress digests among a tunnel's connections: above 1, its replicas disagree.
    pub ingress_digests: Family<TunnelLabels, Gauge>,
    /// Failed registrations, by kind.
    pub registration_failures: Family<KindLabels, Counter>,
    /// Requests refused by admission control, by kind.
    pub rejected: Family<KindLabels, Counter>,
    /// TCP sessions and UDP flows on the tunnels' public ports.
    pub sessions: std::sync::Arc<crate::services::SessionMetrics>,
    registry: Registry,
}

fn request_histogram() -> Histogram {
    // 0.5 ms … ~65 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl EdgeMetrics {
    /// The edge's metrics, named `sluice_edge_…`.
    pub fn new() -> Self {
        let requests = Family::default();
        let duration = Family::new_with_constructor(request_histogram as fn() -> Histogram);
        let in_flight = Family::default();
        let registered = Family::default();
        let ingress_digests = Family::default();
        let registration_failures = Family::default();
        let rejected = Family::default();
        let mut registry = Registry::with_prefix("sluice_edge");
        registry.register(
            "requests",
            "Requests answered, by tunnel, status class and reason (who answered, or why the edge did)",
            Family::clone(&requests),
        );
        registry.register(
            "request_duration_seconds",
            "Time from receiving the request head to sending the response head, by tunnel",
            Family::clone(&duration),
        );
        registry.register(
            "streams_in_flight",
            "Requests in flight, by tunnel",
            Family::clone(&in_flight),
        );
        registry.register(
            "registered_connections",
            "Connector connections registered, by tunnel and protocol",
            Family::clone(&registered),
        );
        registry.register(
            "ingress_digests",
            "Distinct ingress digests among a tunnel's connectors (above 1: replicas disagree)",
            Family::clone(&ingress_digests),
        );
        registry.register(
            "registration_failures",
            "Failed registrations, by kind",
            Family::clone(&registration_failures),
        );
        registry.register(
            "rejected_requests",
            "Requests refused by admission control, by kind",
            Family::clone(&rejected),
        );
        let sessions = std::sync::Arc::new(crate::services::SessionMetrics::default());
        sessions.register(&mut registry);
        EdgeMetrics {
            sessions,
            requests,
            duration,
            in_flight,
            registered,
            ingress_digests,
            registration_failures,
            rejected,
            registry,
        }
    }

    /// Counts one answered request.
    pub fn observe(
        &self,
        tunnel: Option<&Arc<str>>,
        status: u16,
        reason: &'static str,
        elapsed: Duration,
    ) {
        static NONE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "".into());
        let labels = EdgeRequestLabels {
            tunnel: TunnelId(tunnel.unwrap_or(&NONE).clone()),
            class: status_class(status),
            reason,
        };
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&TunnelLabels {
                tunnel: labels.tunnel,
            })
            .observe(elapsed.as_secs_f64());
    }
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Exposition for EdgeMetrics {
    fn encode(&self) -> String {
        encode(&self.registry)
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
            .get_or_create(&OriginErrorLabels {
                origin: "api".into(),
                kind: "refused",
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains(r#"sluice_test_requests_total{class="2xx"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"sluice_test_requests_total{class="5xx"} 1"#));
        assert!(text.contains(r#"sluice_test_origin_errors_total{origin="api",kind="refused"} 1"#));
        assert!(text.contains("sluice_test_request_duration_seconds_count 2"));
        assert!(!text.contains("tunnel="), "{text}");
    }

    #[test]
    fn the_edge_exports_only_its_own_families_with_tunnel_labels() {
        let m = EdgeMetrics::new();
        m.observe(
            Some(&"app".into()),
            502,
            "offline",
            Duration::from_millis(3),
        );
        m.observe(None, 404, "edge-refused", Duration::from_millis(1));
        let text = m.encode();
        assert!(
            text.contains(
                r#"sluice_edge_requests_total{tunnel="app",class="5xx",reason="offline"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"sluice_edge_requests_total{tunnel="",class="4xx",reason="edge-refused"} 1"#
        ));
        assert!(text.contains(r#"sluice_edge_request_duration_seconds_count{tunnel="app"} 1"#));
        for family in ["plugin_", "audit_events", "origin_errors"] {
            assert!(!text.contains(family), "{family} in {text}");
        }
        assert!(text.ends_with("# EOF\n"), "not OpenMetrics: {text}");
    }
}
