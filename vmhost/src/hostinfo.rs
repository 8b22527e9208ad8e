//! What this machine has: CPUs and memory, read from /proc.

use serde::Serialize;

/// The host's capacity and what is free now.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Capacity {
    /// Online CPUs.
    pub cpus: u64,
    /// MemTotal.
    pub memory_bytes: u64,
    /// MemAvailable.
    pub memory_available_bytes: u64,
    /// 1-minute load average, in thousandths.
    pub load_millis: u64,
}

fn meminfo(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    })
}

/// Reads the capacity now.
pub fn capacity() -> Capacity {
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        // A load average is small and positive: the cast cannot lose
        // anything that matters.
        .map_or(0, |l| {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let millis = (l * 1000.0).max(0.0) as u64;
            millis
        });
    Capacity {
        cpus,
        memory_bytes: meminfo(&mem, "MemTotal").unwrap_or(0),
        memory_available_bytes: meminfo(&mem, "MemAvailable").unwrap_or(0),
        load_millis: load,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let c = capacity();
        assert!(c.cpus >= 1);
        assert!(c.memory_bytes > c.memory_available_bytes / 2);
        assert_eq!(
            meminfo("MemTotal:  2048 kB\n", "MemTotal"),
            Some(2048 * 1024)
        );
        assert_eq!(meminfo("MemTotalX: 1 kB\n", "MemTotal"), None);
    }
}
