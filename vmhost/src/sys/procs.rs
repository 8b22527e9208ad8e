//! The host's process table: find processes by their command line, kill
//! them, wait for them to go, and add up their memory.

use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// Every process whose command line (arguments joined by spaces) contains
/// `needle`. Used to find runsc's processes of one sandbox, which all carry
/// its `--root=` directory.
pub fn find_by_cmdline(needle: &str) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut out: Vec<u32> = rd
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| {
                    let line: Vec<u8> =
                        raw.iter().map(|&b| if b == 0 { b' ' } else { b }).collect();
                    String::from_utf8_lossy(&line).contains(needle)
                })
                .unwrap_or(false)
        })
        .collect();
    out.sort_unstable();
    out
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Sends SIGKILL to `pid` (gone already is fine).
pub fn kill(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else { return };
    if let Some(pid) = Pid::from_raw(raw) {
        let _ = rustix::process::kill_process(pid, Signal::KILL);
    }
}

/// Waits until none of `pids` is alive; false if some still are after
/// `timeout`.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !pids.iter().any(|&p| alive(p)) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Proportional set size of `pid` (0 if it is gone).
pub fn pss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let rest = l.strip_prefix("Pss:")?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
        })
        .map_or(0, |kib| kib * 1024)
}

/// Resolves when `pid` exits (at once if it is gone). A pidfd tells the
/// exit of a process that is not our child; where pidfds are missing, the
/// process table is polled.
pub async fn wait_exit(pid: u32) {
    let fd = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    // `AsyncFd::new` is deprecated for fds the caller could close while
    // registered; this one is an `OwnedFd` moved into the `AsyncFd`, so
    // nothing else can close it (and `register` would need `unsafe`).
    #[allow(deprecated)]
    let registered = fd.and_then(|fd| tokio::io::unix::AsyncFd::new(fd).ok());
    match registered {
        Some(afd) => {
            // A pidfd turns readable when the process exits.
            let _ = afd.readable().await;
        }
        None => {
            while alive(pid) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_kills_and_waits_for_a_process() {
        let marker = format!("thaw-procs-test-{}", std::process::id());
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30", &marker])
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut found = Vec::new();
        for _ in 0..100 {
            found = find_by_cmdline(&marker);
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(found, vec![pid]);
        assert!(alive(pid));
        assert!(pss_bytes(pid) > 0);
        kill(pid);
        let _ = child.wait();
        assert!(wait_gone(&[pid], Duration::from_secs(5)));
        assert!(!alive(pid));
    }

    #[tokio::test]
    async fn wait_exit_resolves_when_the_process_ends() {
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let pid = child.id();
        let reaper = std::thread::spawn(move || child.wait());
        tokio::time::timeout(Duration::from_secs(5), wait_exit(pid))
            .await
            .unwrap();
        let _ = reaper.join();
    }
}
