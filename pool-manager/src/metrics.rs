//! The pool's Prometheus metrics, named `thaw_pool_<what>_<unit>`.

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric of one pool-manager (or one embedded pool).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Ready sandboxes by `template` (refreshed on scrape).
    pub ready: IntGaugeVec,
    /// Leased sandboxes by `template` (refreshed on scrape).
    pub leased: IntGaugeVec,
    /// Ready sandboxes by `host` (refreshed on scrape).
    pub ready_on_host: IntGaugeVec,
    /// Alive hosts (refreshed on scrape).
    pub hosts: IntGauge,
    /// Lease latency by `outcome` (leased, empty, error).
    pub lease_duration: HistogramVec,
    /// Refills by `template` and `outcome` (ok, failed).
    pub refills: IntCounterVec,
    /// Lapsed leases taken back, by `template`.
    pub reaped: IntCounterVec,
    /// Hosts found dead, by `host`.
    pub host_deaths: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    r.unwrap_or_else(|e| unreachable!("static metric definition: {e}"))
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let ready = must(IntGaugeVec::new(
            Opts::new("thaw_pool_ready", "Warm sandboxes waiting, by template."),
            &["template"],
        ));
        let leased = must(IntGaugeVec::new(
            Opts::new("thaw_pool_leased", "Sandboxes leased, by template."),
            &["template"],
        ));
        let ready_on_host = must(IntGaugeVec::new(
            Opts::new(
                "thaw_pool_ready_on_host",
                "Warm sandboxes waiting, by host.",
            ),
            &["host"],
        ));
        let hosts = must(IntGauge::new("thaw_pool_hosts", "Hosts alive."));
        let lease_duration = must(HistogramVec::new(
            HistogramOpts::new("thaw_pool_lease_duration_seconds", "Lease latency.").buckets(vec![
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0,
            ]),
            &["outcome"],
        ));
        let refills = must(IntCounterVec::new(
            Opts::new(
                "thaw_pool_refills_total",
                "Warm sandboxes made, by outcome.",
            ),
            &["template", "outcome"],
        ));
        let reaped = must(IntCounterVec::new(
            Opts::new("thaw_pool_reaped_total", "Lapsed leases taken back."),
            &["template"],
        ));
        let host_deaths = must(IntCounterVec::new(
            Opts::new("thaw_pool_host_deaths_total", "Hosts found dead."),
            &["host"],
        ));
        for c in [
            Box::new(ready.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(leased.clone()),
            Box::new(ready_on_host.clone()),
            Box::new(hosts.clone()),
            Box::new(lease_duration.clone()),
            Box::new(refills.clone()),
            Box::new(reaped.clone()),
            Box::new(host_deaths.clone()),
        ] {
            must(registry.register(c));
        }
        Metrics {
            registry,
            ready,
            leased,
            ready_on_host,
            hosts,
            lease_duration,
            refills,
            reaped,
            host_deaths,
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}
