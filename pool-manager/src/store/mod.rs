//! The pool's shared state behind one trait, with two implementations that
//! pass one conformance suite (`tests/conformance.rs`): Redis (many
//! gateways, many hosts) and memory (one process, the embedded default).
//!
//! The invariant every implementation keeps, whatever fails: a pooled
//! sandbox is handed to at most one holder. Every operation that moves a
//! sandbox (lease, release, reap, eviction) is one atomic step of the
//! store: a Lua script in Redis, one lock in memory. Never read-then-write.
//!
//! Rules both implementations keep (the conformance suite checks them):
//! - adding a sandbox that is already in the pool (ready, parked or leased)
//!   does nothing, so a retried add cannot put it in twice;
//! - a lease or a host is over at exactly its end time: `renew` at
//!   `expires_at_ms` fails and `reap_expired` at that moment takes it;
//! - `release` ignores the clock: a lapsed lease not yet reaped can still be
//!   released by its holder; exactly one of holder and reaper gets the
//!   sandbox;
//! - `renew` checks holder and expiry before the host, so only the holder
//!   learns that its host died; `lease_parked` leaves a dead host's parked
//!   sandbox in place and `evict_dead_hosts` removes and returns it (also
//!   for hosts that never sent a heartbeat);
//! - a target of 0 is no target.
//!
//! Inside this module `redis` is the submodule: the crate is `::redis`.

pub mod memory;
pub mod redis;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A warm, paused sandbox in the pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PoolSandbox {
    /// `sb_…`, unique across hosts.
    pub sandbox_id: String,
    /// The vmhost that holds it (`host_…`).
    pub host_id: String,
    /// Its template.
    pub template: String,
}

/// A lease: one sandbox handed to one holder until `expires_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// `lease_…`.
    pub lease_id: String,
    /// The sandbox.
    pub sandbox: PoolSandbox,
    /// Who holds it (a gateway instance, a session).
    pub holder: String,
    /// Unix milliseconds when it lapses unless renewed.
    pub expires_at_ms: u64,
}

/// A vmhost as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// `host_…`.
    pub host_id: String,
    /// Its API base URL (`http://127.0.0.1:7070`).
    pub url: String,
    /// Most sandboxes it may hold.
    pub max_sandboxes: u64,
    /// Sandboxes it holds now (any state), as of its last heartbeat.
    pub sandboxes: u64,
    /// Memory it has, bytes.
    pub memory_bytes: u64,
    /// Memory available now, bytes.
    pub memory_available_bytes: u64,
}

/// Counts of one template's pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateCounts {
    /// Warm sandboxes waiting.
    pub ready: u64,
    /// Sandboxes leased now.
    pub leased: u64,
    /// How many should be waiting.
    pub target: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such lease, or it expired, or another holder has it.
    #[error("lease {0} is not held (expired, released or someone else's)")]
    LeaseNotHeld(String),
    /// The leased sandbox's host stopped sending heartbeats.
    #[error("the host {host_id} of lease {lease_id} is dead")]
    HostDead {
        /// The lease.
        lease_id: String,
        /// Its host.
        host_id: String,
    },
    /// The store cannot be reached or answered wrongly; nothing changed
    /// that the caller must undo (a lease either happened or did not).
    #[error("the pool store is unavailable: {0}")]
    Unavailable(String),
}

/// The pool's state. All times are Unix milliseconds given by the caller
/// where they matter, so tests control the clock.
pub trait Store: Send + Sync + 'static {
    /// Puts a warm sandbox into its template's ready queue (oldest leased
    /// first).
    fn add_ready(&self, sb: &PoolSandbox) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Takes the oldest ready sandbox of `template` whose host is alive and
    /// leases it to `holder` for `ttl`; `None` if there is none. Ready
    /// sandboxes of dead hosts met on the way are dropped from the pool.
    fn lease(
        &self,
        template: &str,
        holder: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> impl Future<Output = Result<Option<Lease>, StoreError>> + Send;

    /// Extends a lease `holder` holds; `LeaseNotHeld` if it lapsed or is
    /// someone else's, `HostDead` if its host died.
    fn renew(
        &self,
        lease_id: &str,
        holder: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> impl Future<Output = Result<Lease, StoreError>> + Send;

    /// Ends a lease; returns its sandbox (the caller destroys or parks it).
    fn release(
        &self,
        lease_id: &str,
        holder: &str,
    ) -> impl Future<Output = Result<PoolSandbox, StoreError>> + Send;

    /// Returns a used sandbox to the pool for `owner` alone (a stateful
    /// session's paused sandbox).
    fn park(
        &self,
        owner: &str,
        sb: &PoolSandbox,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Leases `owner`'s parked sandbox `sandbox_id` to `holder`; `None` if
    /// it is not parked for that owner (or its host died).
    fn lease_parked(
        &self,
        owner: &str,
        sandbox_id: &str,
        holder: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> impl Future<Output = Result<Option<Lease>, StoreError>> + Send;

    /// Removes up to `max` leases that lapsed before `now_ms` and returns
    /// them (the caller destroys their sandboxes).
    fn reap_expired(
        &self,
        now_ms: u64,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Lease>, StoreError>> + Send;

    /// Registers or refreshes a host; it is alive for `ttl` from `now_ms`.
    fn heartbeat(
        &self,
        host: &HostInfo,
        ttl: Duration,
        now_ms: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The hosts alive at `now_ms`.
    fn hosts(&self, now_ms: u64) -> impl Future<Output = Result<Vec<HostInfo>, StoreError>> + Send;

    /// Forgets every host dead at `now_ms` and removes their ready and
    /// parked sandboxes from the pool; returns the removed sandboxes.
    fn evict_dead_hosts(
        &self,
        now_ms: u64,
    ) -> impl Future<Output = Result<Vec<PoolSandbox>, StoreError>> + Send;

    /// Ready sandboxes on `host_id` (any template).
    fn ready_on_host(
        &self,
        host_id: &str,
    ) -> impl Future<Output = Result<Vec<PoolSandbox>, StoreError>> + Send;

    /// Sets how many warm sandboxes of `template` should wait.
    fn set_target(
        &self,
        template: &str,
        target: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Counts per template (every template with a target, a ready or a
    /// leased sandbox).
    fn counts(
        &self,
    ) -> impl Future<Output = Result<BTreeMap<String, TemplateCounts>, StoreError>> + Send;

    /// Takes or keeps the named lock for `owner` until `now_ms + ttl`; true
    /// if `owner` holds it afterwards. (One refiller at a time.)
    fn try_lock(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Gives the named lock up if `owner` holds it.
    fn unlock(
        &self,
        name: &str,
        owner: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
