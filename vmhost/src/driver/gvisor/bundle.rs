//! The OCI bundle of one gVisor sandbox: envd as the first process, the
//! template's root filesystem under an in-memory overlay (so writes live in
//! the sandbox's memory and a checkpoint carries them), a size-limited
//! `/tmp`, envd's binary and the host-socket directory bind-mounted in, no
//! network namespace but its own (`--network=none`), and the limits as
//! cgroup resources and rlimits.

use serde_json::{json, Value};

use crate::driver::{SandboxSpec, ENVD_DIR, ENVD_HOST_SOCKET};

/// Capabilities envd (root inside) needs to run processes as the
/// template's user and manage their files and signals. Deliberately not
/// CAP_SYS_ADMIN or CAP_SYS_RESOURCE: the process limit (RLIMIT_NPROC)
/// must hold for the user's processes.
const ENVD_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
];

/// Host tasks (threads and processes) gVisor's ptrace platform needs per
/// process inside: measured ≈ 7, so the host pids cgroup allows
/// `pids × 8 + 256` and is only a backstop behind RLIMIT_NPROC.
const HOST_TASKS_PER_PROCESS: u64 = 8;
const HOST_TASKS_BASE: u64 = 256;

/// The CFS period the CPU quota is expressed in.
const CPU_PERIOD_US: u64 = 100_000;

/// `config.json` for `spec`, in cgroup `cgroup_path` (absolute, e.g.
/// `/thaw/sb_1`).
pub fn config(spec: &SandboxSpec, rootfs: &std::path::Path, cgroup_path: &str) -> Value {
    let l = &spec.limits;
    let host_dir = spec
        .host_socket
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let inside_host_dir = std::path::Path::new(ENVD_HOST_SOCKET)
        .parent()
        .map_or_else(|| "/".to_string(), |p| p.display().to_string());
    json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": [
                format!("{ENVD_DIR}/envd"), "--dial", ENVD_HOST_SOCKET, "--connections", "1",
                "--run-dir", "/run/thaw", "--drop-caches", "false", "--disk-path", "/tmp",
            ],
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/root",
                "RUST_LOG=envd=warn",
            ],
            "cwd": "/",
            "capabilities": {
                "bounding": ENVD_CAPS, "effective": ENVD_CAPS, "permitted": ENVD_CAPS,
            },
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": 65536, "soft": 65536},
                {"type": "RLIMIT_NPROC", "hard": l.pids, "soft": l.pids},
            ],
            "noNewPrivileges": false,
        },
        // Writable through runsc's in-memory overlay (--overlay2=root:memory):
        // the template's tree is never changed and a checkpoint carries
        // every write.
        "root": {"path": rootfs, "readonly": false},
        "hostname": "thaw",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", format!("size={}", l.disk_bytes)]},
            {"destination": ENVD_DIR, "type": "bind", "source": spec.envd_dir, "options": ["rbind", "ro"]},
            {"destination": inside_host_dir, "type": "bind", "source": host_dir, "options": ["rbind", "rw"]},
        ],
        "linux": {
            "cgroupsPath": cgroup_path,
            "resources": {
                "memory": {"limit": l.memory_bytes},
                "cpu": {"quota": l.cpu_millis * CPU_PERIOD_US / 1000, "period": CPU_PERIOD_US},
                "pids": {"limit": l.pids * HOST_TASKS_PER_PROCESS + HOST_TASKS_BASE},
            },
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"},
            ],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{Boot, Limits};

    #[test]
    fn limits_become_cgroup_resources_rlimits_and_a_tmp_size() {
        let spec = SandboxSpec {
            id: "sb_x".into(),
            dir: "/run/thaw/sandboxes/sb_x".into(),
            host_socket: "/run/thaw/sandboxes/sb_x/host/host.sock".into(),
            envd_dir: "/var/lib/thaw/bin/abc".into(),
            limits: Limits {
                memory_bytes: 256 << 20,
                cpu_millis: 500,
                pids: 64,
                disk_bytes: 16 << 20,
                timeout_ms: 0,
            },
            boot: Boot::Cold {
                rootfs: "/r".into(),
            },
        };
        let c = config(&spec, std::path::Path::new("/r"), "/thaw/sb_x");
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 256 << 20);
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(c["linux"]["resources"]["pids"]["limit"], 64 * 8 + 256);
        assert_eq!(c["process"]["rlimits"][1]["soft"], 64);
        assert_eq!(c["linux"]["cgroupsPath"], "/thaw/sb_x");
        let mounts = c["mounts"].as_array().unwrap();
        assert!(mounts
            .iter()
            .any(|m| m["destination"] == "/tmp" && m["options"][3] == "size=16777216"));
        assert!(mounts
            .iter()
            .any(|m| m["destination"] == "/thaw-host"
                && m["source"] == "/run/thaw/sandboxes/sb_x/host"));
        assert_eq!(c["root"]["path"], "/r");
    }
}
