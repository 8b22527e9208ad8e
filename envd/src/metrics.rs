//! `GET /metrics`: cpu, memory and disk of the sandbox, from /proc and
//! statvfs.

use std::path::Path;

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use crate::error::ApiError;
use crate::state::AppState;

/// Cumulative CPU jiffies from the `cpu` line of /proc/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Jiffies spent doing anything.
    pub busy: u64,
    /// All jiffies.
    pub total: u64,
}

/// Parses the aggregate `cpu` line of /proc/stat.
pub fn parse_cpu(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait are not busy.
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

/// Memory figures from /proc/meminfo, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Memory {
    /// MemTotal.
    pub mem_total_bytes: u64,
    /// MemAvailable.
    pub mem_available_bytes: u64,
    /// total − available.
    pub mem_used_bytes: u64,
}

/// Parses /proc/meminfo.
pub fn parse_meminfo(meminfo: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    let total = field("MemTotal:")?;
    let available = field("MemAvailable:").or_else(|| field("MemFree:"))?;
    Some(Memory {
        mem_total_bytes: total,
        mem_available_bytes: available,
        mem_used_bytes: total.saturating_sub(available),
    })
}

/// Reads the memory figures now.
pub fn memory() -> Result<Memory, ApiError> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| ApiError::internal(format!("reading /proc/meminfo: {e}")))?;
    parse_meminfo(&text).ok_or_else(|| ApiError::internal("unreadable /proc/meminfo"))
}

/// Resident set size of envd itself, from /proc/self/status.
pub fn own_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// `GET /metrics`.
#[derive(Debug, Serialize)]
pub struct MetricsResponse {
    /// CPUs the sandbox may use.
    pub cpu_count: usize,
    /// Percent of all CPUs busy since the previous `/metrics` (or boot).
    pub cpu_used_pct: f64,
    /// Memory.
    #[serde(flatten)]
    pub memory: Memory,
    /// Size of the filesystem holding the disk path.
    pub disk_total_bytes: u64,
    /// Used on it.
    pub disk_used_bytes: u64,
    /// Available to unprivileged users.
    pub disk_available_bytes: u64,
    /// envd's own resident memory.
    pub envd_rss_bytes: u64,
}

fn disk(path: &Path) -> Result<(u64, u64, u64), ApiError> {
    let s = nix::sys::statvfs::statvfs(path)
        .map_err(|e| ApiError::internal(format!("statvfs {}: {e}", path.display())))?;
    let frag = s.fragment_size();
    let total = s.blocks() * frag;
    let free = s.blocks_free() * frag;
    let avail = s.blocks_available() * frag;
    Ok((total, total.saturating_sub(free), avail))
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> Result<Json<MetricsResponse>, ApiError> {
    let stat = std::fs::read_to_string("/proc/stat")
        .map_err(|e| ApiError::internal(format!("reading /proc/stat: {e}")))?;
    let now = parse_cpu(&stat).ok_or_else(|| ApiError::internal("unreadable /proc/stat"))?;
    let prev = state
        .last_cpu
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .replace(now)
        .unwrap_or(CpuTimes { busy: 0, total: 0 });
    let dt = now.total.saturating_sub(prev.total);
    #[allow(clippy::cast_precision_loss)] // jiffy counts are far below 2^52.
    let cpu_used_pct = if dt == 0 {
        0.0
    } else {
        (now.busy.saturating_sub(prev.busy) as f64 / dt as f64 * 1000.0).round() / 10.0
    };
    let (disk_total_bytes, disk_used_bytes, disk_available_bytes) = disk(&state.config.disk_path)?;
    Ok(Json(MetricsResponse {
        cpu_count: std::thread::available_parallelism().map_or(1, usize::from),
        cpu_used_pct,
        memory: memory()?,
        disk_total_bytes,
        disk_used_bytes,
        disk_available_bytes,
        envd_rss_bytes: own_rss_bytes(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_and_meminfo() {
        let cpu = parse_cpu("cpu  10 0 10 70 10 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(
            cpu,
            CpuTimes {
                busy: 20,
                total: 100
            }
        );
        let mem =
            parse_meminfo("MemTotal:  1000 kB\nMemFree: 100 kB\nMemAvailable:   600 kB\n").unwrap();
        assert_eq!(mem.mem_total_bytes, 1_024_000);
        assert_eq!(mem.mem_available_bytes, 614_400);
        assert_eq!(mem.mem_used_bytes, 409_600);
    }
}
