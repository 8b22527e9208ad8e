//! `POST /snapshot/prepare`: quiesce before a snapshot.
//!
//! Stops the port scanner, syncs, drops the page cache where permitted,
//! answers with memory figures, and then closes every host connection (the
//! one carrying this answer included, once the answer is out). gVisor's
//! checkpoint fails while any process holds a connected host Unix socket;
//! the dialer reconnects only once the host socket has gone away and
//! answers again (see `transport`). Idempotent.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use crate::error::ApiError;
use crate::metrics::{memory, own_rss_bytes, Memory};
use crate::state::AppState;

/// What prepare did and the memory it leaves.
#[derive(Debug, Serialize)]
pub struct PrepareResponse {
    /// Memory after syncing and dropping caches.
    #[serde(flatten)]
    pub memory: Memory,
    /// envd's own resident memory.
    pub envd_rss_bytes: u64,
    /// Whether the page cache was dropped.
    pub caches_dropped: bool,
    /// Processes still running (they are kept in the snapshot).
    pub running_processes: usize,
}

/// `POST /snapshot/prepare`.
pub async fn prepare(State(state): State<AppState>) -> Result<Json<PrepareResponse>, ApiError> {
    state.scanner.stop();
    let drop = state.config.drop_caches;
    let caches_dropped = tokio::task::spawn_blocking(move || {
        nix::unistd::sync();
        drop && std::fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
    })
    .await
    .map_err(|e| ApiError::internal(format!("sync worker failed: {e}")))?;
    let response = PrepareResponse {
        memory: memory()?,
        envd_rss_bytes: own_rss_bytes(),
        caches_dropped,
        running_processes: state
            .processes
            .list()
            .iter()
            .filter(|p| p.running())
            .count(),
    };
    state.quiesce.quiesced.store(true, Ordering::SeqCst);
    // Every connection task watches this; each shuts down gracefully, which
    // lets this response finish before its connection closes.
    state.quiesce.generation.send_modify(|g| *g += 1);
    tracing::info!("quiesced for a snapshot; closing host connections");
    Ok(Json(response))
}
