//! `GET /metrics`: the Prometheus exposition (OpenMetrics text, through prometheus-client),
//! made at scrape time from the atomics the data planes already keep, the kernel path's maps
//! and `/proc/self`. Nothing is counted for it per session: a scrape reads, it never takes a
//! lock a session takes. Names, types and labels are a public interface, listed in README.md
//! ("Metrics").
//!
//! `backends.rs`: per service and backend, from the running state and `ctl show`'s report (so
//! both say the same). `kernel.rs`: the kernel path's counters. `process.rs`: the process
//! (build, uptime, reloads, the balancer's own trouble, and the standard `process_*` set).
//! `announce.rs`: VIPs announced through BIRD.

mod announce;
mod backends;
mod kernel;
mod process;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::http::Context;
use crate::tallies::{HistogramReading, LATENCY_BOUNDS_US};
use crate::totals::KernelCounters;

/// The two text formats a scraper may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus' text format 0.0.4: what a scraper gets unless it asks for OpenMetrics, and
    /// what `promtool check metrics` lints.
    Prometheus,
    /// OpenMetrics 1.0 text, for a scraper whose `Accept` names `application/openmetrics-text`.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The exposition for one scrape.
pub fn render(context: &Context, format: Format) -> String {
    let kernel = context.kernel.as_deref().map(|k| k as &dyn KernelCounters);
    let snapshot = context.state.snapshot();
    let mut ours = backends::families(&snapshot, kernel);
    if let Some(kernel) = kernel {
        ours.extend(kernel::families(&snapshot, kernel));
    }
    ours.extend(process::balancer_families(context.started));
    ours.extend(announce::families(&context.announcer));
    let mut registry = Registry::default();
    registry
        .sub_registry_with_prefix("switchyard")
        .register_collector(Box::new(Families(ours)));
    registry.register_collector(Box::new(Families(process::standard_families())));
    let mut text = String::new();
    // Writing into a String cannot fail; a family that cannot be encoded is a bug in this
    // module, and the scrape then shows what was written up to it.
    let _ = encode(&mut text, &registry);
    match format {
        Format::OpenMetrics => text,
        Format::Prometheus => as_prometheus_text(&text),
    }
}

/// prometheus-client writes OpenMetrics only. The Prometheus text format differs, for what we
/// export, in two points: a counter's `# HELP`/`# TYPE` lines name it with its `_total` (as
/// its samples do), and there is no `# EOF`.
fn as_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(open_metrics.len() + 16 * counters.len());
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let described = ["# HELP ", "# TYPE "].into_iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let name = rest.split(' ').next()?;
            counters
                .contains(name)
                .then(|| format!("{tag}{name}_total{}", &rest[name.len()..]))
        });
        text.push_str(described.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

/// A series' labels, in order.
type Labels = Vec<(&'static str, String)>;

/// One value of one series.
#[derive(Debug)]
enum Value {
    Count(u64),
    Float(f64),
    Histogram(HistogramReading),
}

/// One metric family as read at this scrape: name (without the prefix and, for counters,
/// without `_total`), help, type and its series.
#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    series: Vec<(Labels, Value)>,
}

impl Family {
    fn new(name: &'static str, help: &'static str, kind: MetricType) -> Self {
        Self {
            name,
            help,
            kind,
            series: Vec::new(),
        }
    }

    fn counter(name: &'static str, help: &'static str) -> Self {
        Self::new(name, help, MetricType::Counter)
    }

    fn gauge(name: &'static str, help: &'static str) -> Self {
        Self::new(name, help, MetricType::Gauge)
    }

    fn histogram(name: &'static str, help: &'static str) -> Self {
        Self::new(name, help, MetricType::Histogram)
    }

    fn add(&mut self, labels: Labels, value: Value) {
        self.series.push((labels, value));
    }

    fn count(&mut self, labels: Labels, value: u64) {
        self.add(labels, Value::Count(value));
    }

    fn float(&mut self, labels: Labels, value: f64) {
        self.add(labels, Value::Float(value));
    }
}

/// The families of one scrape, handed to prometheus-client to encode.
#[derive(Debug)]
struct Families(Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.0 {
            let mut metric =
                encoder.encode_descriptor(family.name, family.help, None, family.kind)?;
            for (labels, value) in &family.series {
                let mut series = metric.encode_family(labels)?;
                match (value, &family.kind) {
                    (Value::Count(v), MetricType::Counter) => {
                        series.encode_counter::<NoLabelSet, _, u64>(v, None)?
                    }
                    (Value::Float(v), MetricType::Counter) => {
                        series.encode_counter::<NoLabelSet, _, u64>(v, None)?
                    }
                    (Value::Count(v), _) => series.encode_gauge(v)?,
                    (Value::Float(v), _) => series.encode_gauge(v)?,
                    (Value::Histogram(h), _) => series.encode_histogram::<NoLabelSet>(
                        h.sum_seconds,
                        h.count,
                        &buckets(h),
                        None,
                    )?,
                }
            }
        }
        Ok(())
    }
}

/// A reading's buckets as (upper bound in seconds, count), the last one `+Inf`.
fn buckets(reading: &HistogramReading) -> Vec<(f64, u64)> {
    LATENCY_BOUNDS_US
        .iter()
        .map(|&us| us as f64 / 1e6)
        .chain(std::iter::once(f64::INFINITY))
        .zip(reading.buckets.iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_with_their_total() {
        let open_metrics = "# HELP a_things Things.\n# TYPE a_things counter\na_things_total 3\n# HELP b Gauge.\n# TYPE b gauge\nb 1\n# EOF\n";
        assert_eq!(
            as_prometheus_text(open_metrics),
            "# HELP a_things_total Things.\n# TYPE a_things_total counter\na_things_total 3\n# HELP b Gauge.\n# TYPE b gauge\nb 1\n"
        );
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
    }

    #[test]
    fn families_encode_with_suffixes_and_cumulative_buckets() {
        let mut counter = Family::counter("things", "Things");
        counter.count(vec![("service", "mx".into())], 3);
        let mut histogram = Family::histogram("wait_seconds", "Waits");
        let mut reading = HistogramReading {
            buckets: vec![0; LATENCY_BOUNDS_US.len() + 1],
            sum_seconds: 0.0003,
            count: 2,
        };
        reading.buckets[0] = 1;
        reading.buckets[1] = 1;
        histogram.add(vec![], Value::Histogram(reading));
        let mut registry = Registry::default();
        registry
            .sub_registry_with_prefix("switchyard")
            .register_collector(Box::new(Families(vec![counter, histogram])));
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("switchyard_things_total{service=\"mx\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("switchyard_wait_seconds_bucket{le=\"0.0005\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("switchyard_wait_seconds_bucket{le=\"+Inf\"} 2"),
            "{text}"
        );
        assert!(text.contains("switchyard_wait_seconds_count 2"), "{text}");
    }
}
