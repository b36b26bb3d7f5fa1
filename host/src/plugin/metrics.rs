//! Metrics a plugin defines (the `metrics` import, with the `metrics` grant): counters,
//! gauges and histograms, created on first use, exposed on the connector's `/metrics` as
//! `sluice_connector_plugin_{plugin}_{name}` with the plugin's labels. The operator bounds the
//! series each plugin may create (`metrics-max-series`); past it, a new series is refused
//! (the plugin gets an error) and existing ones keep counting.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Labels of one series, in the plugin's order.
type Labels = Vec<(String, String)>;

fn new_histogram() -> Histogram {
    // 1 ms to about 33 s: what plugins usually time (calls, latencies).
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// One metric of one plugin.
#[derive(Debug, Clone)]
enum Metric {
    Counter(Family<Labels, Counter>),
    Gauge(Family<Labels, Gauge>),
    Histogram(Family<Labels, Histogram, fn() -> Histogram>),
}

impl Metric {
    fn kind(&self) -> &'static str {
        match self {
            Metric::Counter(_) => "counter",
            Metric::Gauge(_) => "gauge",
            Metric::Histogram(_) => "histogram",
        }
    }
}

/// Every plugin's metrics: registered once as a collector of the connector's registry.
#[derive(Debug, Default)]
pub struct PluginMetrics {
    /// By exposed name (`plugin_{plugin}_{name}`): the metric, and its series count.
    metrics: Mutex<BTreeMap<String, (Metric, std::collections::HashSet<Labels>)>>,
    /// Series created, by plugin.
    series: Mutex<BTreeMap<String, usize>>,
}

impl prometheus_client::collector::Collector for PluginMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metrics = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        for (name, (metric, _)) in metrics.iter() {
            match metric {
                Metric::Counter(f) => describe(&mut encoder, name, f)?,
                Metric::Gauge(f) => describe(&mut encoder, name, f)?,
                Metric::Histogram(f) => describe(&mut encoder, name, f)?,
            }
        }
        Ok(())
    }
}

/// Encodes one plugin metric under `name`.
fn describe(
    encoder: &mut DescriptorEncoder,
    name: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(
        name,
        "Defined by a plugin",
        None,
        metric.metric_type(),
    )?)
}

/// [`PluginMetrics`] as the registry holds it (the connector keeps the other handle).
#[derive(Debug)]
pub struct Shared(pub Arc<PluginMetrics>);

impl prometheus_client::collector::Collector for Shared {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        prometheus_client::collector::Collector::encode(&*self.0, encoder)
    }
}

/// A name a plugin gives a metric or a label: `[a-z_][a-z0-9_]*`, at most 64 bytes.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} {name:?}: lowercase letters, digits and '_', not starting with a digit, at most 64 bytes"
        ))
    }
}

/// Longest label value kept; longer ones are cut.
const MAX_LABEL_VALUE: usize = 128;

/// One plugin's view of [`PluginMetrics`].
#[derive(Debug, Clone)]
pub struct PluginMetricsAccess {
    store: Arc<PluginMetrics>,
    /// The plugin's name as it appears in metric names (`-` as `_`).
    plugin: String,
    max_series: usize,
}

impl PluginMetrics {
    /// Plugin `name`'s access, allowed `max_series` series in all.
    pub fn access(self: &Arc<Self>, name: &str, max_series: usize) -> PluginMetricsAccess {
        PluginMetricsAccess {
            store: self.clone(),
            plugin: name.replace('-', "_").to_ascii_lowercase(),
            max_series,
        }
    }
}

impl PluginMetricsAccess {
    /// The series `labels` of metric `name` of kind `make`'s, created if the bounds allow.
    fn with_series(
        &self,
        name: &str,
        labels: Vec<(String, String)>,
        (wanted, make): (&'static str, fn() -> Metric),
        apply: impl FnOnce(&Metric, &Labels),
    ) -> Result<(), String> {
        check_name("metric name", name)?;
        let mut labels: Labels = labels
            .into_iter()
            .map(|(k, mut v)| {
                if v.len() > MAX_LABEL_VALUE {
                    let mut end = MAX_LABEL_VALUE;
                    while !v.is_char_boundary(end) {
                        end -= 1;
                    }
                    v.truncate(end);
                }
                (k, v)
            })
            .collect();
        for (k, _) in &labels {
            check_name("label name", k)?;
        }
        labels.sort();
        let full = format!("plugin_{}_{name}", self.plugin);
        let mut metrics = self.store.metrics.lock().unwrap_or_else(|p| p.into_inner());
        let (metric, series) = metrics
            .entry(full)
            .or_insert_with(|| (make(), Default::default()));
        if metric.kind() != wanted {
            return Err(format!(
                "metric {name:?} is a {}, not a {wanted}",
                metric.kind()
            ));
        }
        if !series.contains(&labels) {
            let mut counts = self.store.series.lock().unwrap_or_else(|p| p.into_inner());
            let count = counts.entry(self.plugin.clone()).or_default();
            if *count >= self.max_series {
                return Err(format!(
                    "the plugin has its {} series (metrics-max-series); {name} {labels:?} is not created",
                    self.max_series
                ));
            }
            *count += 1;
            series.insert(labels.clone());
        }
        apply(metric, &labels);
        Ok(())
    }

    /// Adds `value` to counter `name`.
    pub fn counter_add(&self, name: &str, labels: Labels, value: u64) -> Result<(), String> {
        self.with_series(
            name,
            labels,
            ("counter", || Metric::Counter(Family::default())),
            |m, l| {
                if let Metric::Counter(f) = m {
                    f.get_or_create(l).inc_by(value);
                }
            },
        )
    }

    /// Sets gauge `name`.
    pub fn gauge_set(&self, name: &str, labels: Labels, value: i64) -> Result<(), String> {
        self.with_series(
            name,
            labels,
            ("gauge", || Metric::Gauge(Family::default())),
            |m, l| {
                if let Metric::Gauge(f) = m {
                    f.get_or_create(l).set(value);
                }
            },
        )
    }

    /// Records `value` in histogram `name`.
    pub fn histogram_observe(&self, name: &str, labels: Labels, value: f64) -> Result<(), String> {
        self.with_series(
            name,
            labels,
            ("histogram", || {
                Metric::Histogram(Family::new_with_constructor(new_histogram))
            }),
            |m, l| {
                if let Metric::Histogram(f) = m {
                    f.get_or_create(l).observe(value);
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(store: Arc<PluginMetrics>) -> String {
        let mut registry = prometheus_client::registry::Registry::with_prefix("t");
        registry.register_collector(Box::new(Shared(store)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn metrics_appear_under_the_plugin_name_within_their_bounds() {
        let store = Arc::new(PluginMetrics::default());
        let m = store.access("rate-limit", 2);
        let l = |v: &str| vec![("result".to_string(), v.to_string())];
        m.counter_add("decisions", l("pass"), 3).unwrap();
        m.counter_add("decisions", l("pass"), 1).unwrap();
        m.counter_add("decisions", l("refuse"), 1).unwrap();
        // A third series is past the bound; the existing ones still count.
        assert!(m
            .counter_add("decisions", l("other"), 1)
            .unwrap_err()
            .contains("metrics-max-series"));
        m.counter_add("decisions", l("pass"), 1).unwrap();
        assert!(m
            .gauge_set("decisions", l("pass"), 1)
            .unwrap_err()
            .contains("is a counter"));
        assert!(m.counter_add("Bad-Name", vec![], 1).is_err());
        assert!(m
            .counter_add("ok", vec![("1x".into(), "v".into())], 1)
            .is_err());
        let text = encoded(store.clone());
        assert!(
            text.contains(r#"t_plugin_rate_limit_decisions_total{result="pass"} 5"#),
            "{text}"
        );
        assert!(text.contains(r#"t_plugin_rate_limit_decisions_total{result="refuse"} 1"#));
        let other = store.access("timer", 10);
        other
            .histogram_observe("latency_seconds", vec![], 0.02)
            .unwrap();
        other.gauge_set("queue", vec![], -3).unwrap();
        let text = encoded(store);
        assert!(
            text.contains("t_plugin_timer_latency_seconds_count{} 1"),
            "{text}"
        );
        assert!(text.contains("t_plugin_timer_queue{} -3"), "{text}");
    }
}
