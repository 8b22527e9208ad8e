//! pool-manager: warm sandboxes, leased.
//!
//! It will own the target number of warm, paused sandboxes per template
//! across every vmhost, the host registry with heartbeats, and leases with a
//! TTL, in Redis (shared) or in memory (embedded). Nothing is built yet.
