//! The host registry from a vmhost's side: a heartbeat loop that keeps the
//! host registered with its capacity. A host whose heartbeats stop is dead
//! once its TTL passes: the refiller evicts its ready sandboxes, leases on
//! it fail to renew with `HostDead`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::store::{HostInfo, Store};

/// Sends a heartbeat every `interval` (alive for `ttl` after each) with
/// what `info` reports, until `shutdown` turns true. A failed heartbeat is
/// logged and retried at the next tick.
pub async fn heartbeat_loop<S, F, Fut>(
    store: Arc<S>,
    info: F,
    interval: Duration,
    ttl: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    S: Store,
    F: Fn() -> Fut + Send,
    Fut: Future<Output = HostInfo> + Send,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        let host = info().await;
        if let Err(e) = store.heartbeat(&host, ttl, crate::now_ms()).await {
            tracing::warn!(host_id = %host.host_id, error = %e, "heartbeat failed");
        }
    }
}
