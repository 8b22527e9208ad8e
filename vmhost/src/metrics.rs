//! vmhost's Prometheus metrics, named `thaw_vmhost_<what>_<unit>`.

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric of one vmhost, in its own registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Duration of sandbox operations, by `op` (restore, pause, resume,
    /// snapshot, destroy, bake).
    pub op_duration: HistogramVec,
    /// Sandboxes that stopped, by `reason`.
    pub exits: IntCounterVec,
    /// Sandboxes started.
    pub created: IntCounter,
    /// Sandboxes left by a previous run and removed at start.
    pub orphans_removed: IntCounter,
    /// Live sandboxes by `state` (refreshed on every scrape).
    pub sandboxes: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let op_duration = HistogramVec::new(
            HistogramOpts::new(
                "thaw_vmhost_operation_duration_seconds",
                "Duration of sandbox operations.",
            )
            .buckets(vec![
                0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0, 30.0,
            ]),
            &["op"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let exits = IntCounterVec::new(
            Opts::new(
                "thaw_vmhost_sandbox_exits_total",
                "Sandboxes that stopped, by reason.",
            ),
            &["reason"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let created = IntCounter::new("thaw_vmhost_sandboxes_created_total", "Sandboxes started.")
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let orphans_removed = IntCounter::new(
            "thaw_vmhost_orphans_removed_total",
            "Sandboxes a previous run left, removed at start.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let sandboxes = IntGaugeVec::new(
            Opts::new("thaw_vmhost_sandboxes", "Live sandboxes by state."),
            &["state"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        for c in [
            Box::new(op_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(exits.clone()),
            Box::new(created.clone()),
            Box::new(orphans_removed.clone()),
            Box::new(sandboxes.clone()),
        ] {
            registry
                .register(c)
                .unwrap_or_else(|e| unreachable!("distinct metric names: {e}"));
        }
        Metrics {
            registry,
            op_duration,
            exits,
            created,
            orphans_removed,
            sandboxes,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_named_metrics() {
        let m = Metrics::new();
        m.op_duration.with_label_values(&["pause"]).observe(0.001);
        m.exits.with_label_values(&["oom_killed"]).inc();
        let text = m.render();
        assert!(text.contains("thaw_vmhost_operation_duration_seconds_bucket{op=\"pause\""));
        assert!(text.contains("thaw_vmhost_sandbox_exits_total{reason=\"oom_killed\"} 1"));
    }
}
