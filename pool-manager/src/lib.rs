//! pool-manager: warm sandboxes, leased.
//!
//! Keeps a target number of warm, paused sandboxes per template across
//! every vmhost and hands each to exactly one caller. The state lives in a
//! [`store::Store`]: Redis for many gateways and hosts, memory for one
//! process. [`refill::Refiller`] keeps the targets (one refiller at a time,
//! by a lock with expiry), reaps lapsed leases and evicts dead hosts;
//! [`registry`] is the heartbeat a vmhost sends; [`hosts::Hosts`] is how
//! the pool reaches a vmhost (HTTP, or in-process in embedded mode).

pub mod api;
pub mod hosts;
pub mod metrics;
pub mod pool;
pub mod refill;
pub mod registry;
pub mod store;

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
