//! The refiller: keeps every template's target of warm sandboxes, placing
//! new ones on the alive hosts with the most room, backing off from a host
//! that fails; takes back lapsed leases (destroying their sandboxes) and
//! evicts dead hosts. Several pool-managers may run: only the holder of
//! the `refiller` lock (with expiry) acts, and another takes over when it
//! stops renewing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::hosts::Hosts;
use crate::metrics::Metrics;
use crate::now_ms;
use crate::store::{HostInfo, PoolSandbox, Store};

/// How the refiller works.
#[derive(Debug, Clone)]
pub struct RefillConfig {
    /// This refiller's name (for the lock).
    pub owner: String,
    /// How long the refiller lock lasts unless renewed.
    pub lock_ttl: Duration,
    /// Time between two passes.
    pub interval: Duration,
    /// Most sandboxes being made at once on one host (restores cost CPU:
    /// ≈ 0.2 s of CPU each on the gVisor driver).
    pub per_host_parallel: u64,
    /// First back-off after a host fails; doubles up to `max_backoff`.
    pub backoff: Duration,
    /// Longest back-off.
    pub max_backoff: Duration,
}

impl Default for RefillConfig {
    fn default() -> Self {
        RefillConfig {
            owner: format!("refiller-{}", std::process::id()),
            lock_ttl: Duration::from_secs(3),
            interval: Duration::from_millis(100),
            per_host_parallel: 2,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// The lock only one refiller holds.
pub const LOCK: &str = "refiller";

#[derive(Debug, Default)]
struct State {
    /// Sandboxes being made, by template.
    pending: HashMap<String, u64>,
    /// Sandboxes being made, by host.
    pending_on: HashMap<String, u64>,
    /// (host, template) pairs backed off: until when, and how many failures
    /// in a row. Per template: a host that lacks one template still takes
    /// the others.
    backoff: HashMap<(String, String), (Instant, u32)>,
    /// Hosts seen alive at the last pass (to count deaths).
    alive: Vec<String>,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    /// Whether this refiller held the lock.
    pub leader: bool,
    /// Sandboxes started, by template.
    pub started: BTreeMap<String, u64>,
    /// Lapsed leases taken back.
    pub reaped: usize,
    /// Ready sandboxes removed with their dead hosts.
    pub evicted: usize,
}

/// The refiller.
#[derive(Debug)]
pub struct Refiller<S: Store, H: Hosts> {
    store: Arc<S>,
    hosts: Arc<H>,
    cfg: RefillConfig,
    metrics: Metrics,
    state: Mutex<State>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<S: Store, H: Hosts> Refiller<S, H> {
    /// A refiller over `store`, making sandboxes through `hosts`.
    pub fn new(store: Arc<S>, hosts: Arc<H>, cfg: RefillConfig, metrics: Metrics) -> Arc<Self> {
        Arc::new(Refiller {
            store,
            hosts,
            cfg,
            metrics,
            state: Mutex::new(State::default()),
        })
    }

    /// Runs passes until `shutdown` turns true, then gives the lock up.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                let _ = self.store.unlock(LOCK, &self.cfg.owner).await;
                return;
            }
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "refill pass failed");
            }
        }
    }

    /// One pass: lock, evict dead hosts, reap lapsed leases, start what is
    /// missing.
    pub async fn pass(self: &Arc<Self>) -> Result<Pass, crate::store::StoreError> {
        let mut pass = Pass::default();
        let now = now_ms();
        if !self
            .store
            .try_lock(LOCK, &self.cfg.owner, self.cfg.lock_ttl, now)
            .await?
        {
            return Ok(pass);
        }
        pass.leader = true;

        let hosts = self.store.hosts(now).await?;
        self.note_deaths(&hosts);
        let evicted = self.store.evict_dead_hosts(now).await?;
        pass.evicted = evicted.len();

        let reaped = self.store.reap_expired(now, 256).await?;
        pass.reaped = reaped.len();
        for lease in reaped {
            self.metrics
                .reaped
                .with_label_values(&[&lease.sandbox.template])
                .inc();
            self.destroy_later(&hosts, lease.sandbox);
        }

        let counts = self.store.counts().await?;
        for (template, c) in counts {
            let pending = lock(&self.state)
                .pending
                .get(&template)
                .copied()
                .unwrap_or(0);
            let missing = c.target.saturating_sub(c.ready + pending);
            for _ in 0..missing {
                let Some(host) = self.place(&hosts, &template) else {
                    break;
                };
                self.start(host, template.clone());
                *pass.started.entry(template.clone()).or_insert(0) += 1;
            }
        }
        Ok(pass)
    }

    fn note_deaths(&self, hosts: &[HostInfo]) {
        let ids: Vec<String> = hosts.iter().map(|h| h.host_id.clone()).collect();
        let mut st = lock(&self.state);
        for gone in st.alive.iter().filter(|h| !ids.contains(h)) {
            tracing::warn!(host_id = %gone, "host stopped sending heartbeats: its sandboxes leave the pool");
            self.metrics.host_deaths.with_label_values(&[gone]).inc();
        }
        st.alive = ids;
    }

    /// The host with the most room that is not backed off and not at its
    /// limits, counting what is being made there; reserves a slot on it.
    fn place(&self, hosts: &[HostInfo], template: &str) -> Option<HostInfo> {
        let mut st = lock(&self.state);
        let now = Instant::now();
        let best = hosts
            .iter()
            .filter(|h| {
                st.backoff
                    .get(&(h.host_id.clone(), template.to_string()))
                    .is_none_or(|(until, _)| *until <= now)
            })
            .filter_map(|h| {
                let pending = st.pending_on.get(&h.host_id).copied().unwrap_or(0);
                let room = h.max_sandboxes.saturating_sub(h.sandboxes + pending);
                (room > 0 && pending < self.cfg.per_host_parallel).then_some((room, h))
            })
            .max_by_key(|(room, _)| *room)
            .map(|(_, h)| h.clone())?;
        *st.pending_on.entry(best.host_id.clone()).or_insert(0) += 1;
        Some(best)
    }

    fn start(self: &Arc<Self>, host: HostInfo, template: String) {
        *lock(&self.state)
            .pending
            .entry(template.clone())
            .or_insert(0) += 1;
        let this = self.clone();
        tokio::spawn(async move {
            let made = this.hosts.create_paused(&host, &template).await;
            let outcome = match made {
                Ok(sandbox_id) => {
                    let sb = PoolSandbox {
                        sandbox_id,
                        host_id: host.host_id.clone(),
                        template: template.clone(),
                    };
                    match this.store.add_ready(&sb).await {
                        Ok(()) => {
                            lock(&this.state)
                                .backoff
                                .remove(&(host.host_id.clone(), template.clone()));
                            "ok"
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not pool a new sandbox; destroying it");
                            let _ = this.hosts.destroy(&host, &sb.sandbox_id).await;
                            "failed"
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(host_id = %host.host_id, template = %template, error = %e, "refill failed; backing off");
                    let mut st = lock(&this.state);
                    let key = (host.host_id.clone(), template.clone());
                    let failures = st.backoff.get(&key).map_or(0, |(_, n)| *n) + 1;
                    let wait = this
                        .cfg
                        .backoff
                        .saturating_mul(1 << failures.min(10))
                        .min(this.cfg.max_backoff);
                    st.backoff.insert(key, (Instant::now() + wait, failures));
                    "failed"
                }
            };
            this.metrics
                .refills
                .with_label_values(&[&template, outcome])
                .inc();
            let mut st = lock(&this.state);
            if let Some(n) = st.pending.get_mut(&template) {
                *n = n.saturating_sub(1);
            }
            if let Some(n) = st.pending_on.get_mut(&host.host_id) {
                *n = n.saturating_sub(1);
            }
        });
    }

    fn destroy_later(self: &Arc<Self>, hosts: &[HostInfo], sb: PoolSandbox) {
        let Some(host) = hosts.iter().find(|h| h.host_id == sb.host_id).cloned() else {
            // Its host is dead: the sandbox went with it.
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.hosts.destroy(&host, &sb.sandbox_id).await {
                tracing::warn!(sandbox_id = %sb.sandbox_id, error = %e, "destroying a reaped sandbox failed");
            }
        });
    }

    /// Sandboxes being made now, by template.
    pub fn pending(&self) -> BTreeMap<String, u64> {
        lock(&self.state)
            .pending
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}
