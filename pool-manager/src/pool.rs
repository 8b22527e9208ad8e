//! The pool as callers use it (the daemon's API, or a gateway in embedded
//! mode): lease, renew, release (destroying or parking the sandbox), with
//! latency and counts recorded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hosts::Hosts;
use crate::metrics::Metrics;
use crate::now_ms;
use crate::store::{Lease, PoolSandbox, Store, StoreError};

/// Store, hosts and metrics together.
#[derive(Debug)]
pub struct Pool<S: Store, H: Hosts> {
    /// The shared state.
    pub store: Arc<S>,
    /// How sandboxes are destroyed.
    pub hosts: Arc<H>,
    /// Metrics.
    pub metrics: Metrics,
}

impl<S: Store, H: Hosts> Pool<S, H> {
    /// A pool over `store` and `hosts`.
    pub fn new(store: Arc<S>, hosts: Arc<H>, metrics: Metrics) -> Arc<Self> {
        Arc::new(Pool {
            store,
            hosts,
            metrics,
        })
    }

    /// Leases a warm sandbox of `template` (`None`: none ready now).
    pub async fn lease(
        &self,
        template: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let started = Instant::now();
        let r = self.store.lease(template, holder, ttl, now_ms()).await;
        let outcome = match &r {
            Ok(Some(_)) => "leased",
            Ok(None) => "empty",
            Err(_) => "error",
        };
        self.metrics
            .lease_duration
            .with_label_values(&[outcome])
            .observe(started.elapsed().as_secs_f64());
        r
    }

    /// Leases a warm sandbox, waiting up to `wait` for one to be ready
    /// (never an unbounded queue).
    pub async fn lease_wait(
        &self,
        template: &str,
        holder: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(l) = self.lease(template, holder, ttl).await? {
                return Ok(Some(l));
            }
            if Instant::now() + pause > deadline {
                return Ok(None);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Extends a lease.
    pub async fn renew(
        &self,
        lease_id: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, StoreError> {
        self.store.renew(lease_id, holder, ttl, now_ms()).await
    }

    /// Ends a lease and destroys its sandbox on its host (no state crosses
    /// leases). The destroy happens in the background.
    pub async fn release(
        self: &Arc<Self>,
        lease_id: &str,
        holder: &str,
    ) -> Result<PoolSandbox, StoreError> {
        let sb = self.store.release(lease_id, holder).await?;
        let hosts = self.store.hosts(now_ms()).await.unwrap_or_default();
        if let Some(host) = hosts.into_iter().find(|h| h.host_id == sb.host_id) {
            let this = self.clone();
            let id = sb.sandbox_id.clone();
            tokio::spawn(async move {
                if let Err(e) = this.hosts.destroy(&host, &id).await {
                    tracing::warn!(sandbox_id = %id, error = %e, "destroying a released sandbox failed");
                }
            });
        }
        Ok(sb)
    }

    /// Ends a lease and keeps its (paused) sandbox for `owner` alone.
    pub async fn park(
        &self,
        lease_id: &str,
        holder: &str,
        owner: &str,
    ) -> Result<PoolSandbox, StoreError> {
        let sb = self.store.release(lease_id, holder).await?;
        self.store.park(owner, &sb).await?;
        Ok(sb)
    }

    /// Leases `owner`'s parked sandbox again.
    pub async fn lease_parked(
        &self,
        owner: &str,
        sandbox_id: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.store
            .lease_parked(owner, sandbox_id, holder, ttl, now_ms())
            .await
    }

    /// Refreshes the gauges from the store (on every scrape).
    pub async fn refresh_gauges(&self) -> Result<(), StoreError> {
        let now = now_ms();
        let counts = self.store.counts().await?;
        self.metrics.ready.reset();
        self.metrics.leased.reset();
        for (t, c) in counts {
            self.metrics
                .ready
                .with_label_values(&[&t])
                .set(gauge(c.ready));
            self.metrics
                .leased
                .with_label_values(&[&t])
                .set(gauge(c.leased));
        }
        let hosts = self.store.hosts(now).await?;
        self.metrics.hosts.set(gauge(hosts.len() as u64));
        self.metrics.ready_on_host.reset();
        for h in hosts {
            let n = self.store.ready_on_host(&h.host_id).await?.len();
            self.metrics
                .ready_on_host
                .with_label_values(&[&h.host_id])
                .set(gauge(n as u64));
        }
        Ok(())
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
