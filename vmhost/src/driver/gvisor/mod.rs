//! The gVisor driver: one runsc sandbox per thaw sandbox.
//!
//! - Start: an OCI bundle (see [`bundle`]) run with `runsc run --detach`,
//!   or `runsc restore --detach` from a checkpoint image; every sandbox has
//!   its own runsc `--root` (under its private directory) and its own
//!   cgroup (sandboxes sharing one make `runsc delete` time out).
//! - Pause/resume: the freezer cgroup, written directly (≈ 0.3 ms against
//!   ≈ 20 ms through `runsc pause`). runsc's CLI blocks on a sandbox frozen
//!   this way, so nothing here calls runsc on a frozen sandbox.
//! - Snapshot: `runsc checkpoint` (the sandbox exits), then the remains are
//!   removed as by destroy.
//! - Destroy: thaw, SIGKILL every process of the sandbox (found by cgroup
//!   and by its `--root=` on the command line), remove the cgroups and the
//!   directory. No `runsc delete` (≈ 1.8 s here): the runsc state lives in
//!   the directory that is removed.

pub mod bundle;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::driver::{
    io_err, Boot, Driver, DriverError, DriverState, ExitReason, ResourceUsage, SandboxSpec,
    SnapshotInfo,
};
use crate::sys::cgroup::Cgroup;
use crate::sys::procs;

/// How the gVisor driver runs runsc.
#[derive(Debug, Clone)]
pub struct GvisorConfig {
    /// The runsc binary.
    pub runsc: PathBuf,
    /// runsc's platform: `ptrace` here, `systrap` on newer releases.
    pub platform: String,
    /// The cgroup every sandbox's cgroup is created under (one per vmhost).
    pub cgroup_parent: String,
    /// Root of the cgroup v1 hierarchy.
    pub cgroup_root: PathBuf,
}

/// What the driver keeps about one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GvisorState {
    /// runsc's container id (the sandbox id).
    pub id: String,
    /// The sandbox's private directory.
    pub dir: PathBuf,
    /// The cgroup path under every controller.
    pub cgroup: String,
    /// Host pid of the sandbox process (gVisor's kernel).
    pub pid: u32,
}

/// The gVisor driver.
#[derive(Debug)]
pub struct GvisorDriver {
    cfg: GvisorConfig,
    version: String,
}

impl GvisorDriver {
    /// A driver; asks runsc for its version (which also checks it runs).
    pub fn new(cfg: GvisorConfig) -> Result<GvisorDriver, DriverError> {
        let out = std::process::Command::new(&cfg.runsc)
            .arg("--version")
            .output()
            .map_err(io_err(format!("run {} --version", cfg.runsc.display())))?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        Ok(GvisorDriver { cfg, version })
    }

    /// runsc's version line.
    pub fn version(&self) -> &str {
        &self.version
    }

    fn cgroup(&self, id: &str) -> Cgroup {
        Cgroup::new(
            &self.cfg.cgroup_root,
            format!("{}/{id}", self.cfg.cgroup_parent.trim_matches('/')),
        )
    }

    fn runsc_root(dir: &Path) -> PathBuf {
        dir.join("runsc")
    }

    /// A runsc command for the sandbox in `dir`. Its output goes to
    /// `<dir>/runsc.log`, not to pipes: a detached sandbox inherits them
    /// and would hold them open for its whole life.
    fn runsc(&self, dir: &Path) -> Result<Command, DriverError> {
        let log_path = dir.join("runsc.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("open {}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io_err(format!("open {}", log_path.display())))?;
        let mut c = Command::new(&self.cfg.runsc);
        c.arg(format!("--root={}", Self::runsc_root(dir).display()))
            .arg(format!("--platform={}", self.cfg.platform))
            .args([
                "--network=none",
                "--host-uds=open",
                "--overlay2=root:memory",
                "--cpu-num-from-quota",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true);
        Ok(c)
    }

    async fn start(&self, spec: &SandboxSpec) -> Result<GvisorState, DriverError> {
        let (rootfs, image) = match &spec.boot {
            Boot::Cold { rootfs } => (rootfs, None),
            Boot::Restore { rootfs, image } => (rootfs, Some(image)),
        };
        let cgroup = self.cgroup(&spec.id);
        let bundle_dir = spec.dir.join("bundle");
        std::fs::create_dir_all(&bundle_dir)
            .map_err(io_err(format!("create {}", bundle_dir.display())))?;
        std::fs::create_dir_all(Self::runsc_root(&spec.dir))
            .map_err(io_err("create the runsc state directory"))?;
        let config = bundle::config(spec, rootfs, &format!("/{}", cgroup.path()));
        std::fs::write(bundle_dir.join("config.json"), config.to_string())
            .map_err(io_err("write config.json"))?;
        let pid_file = spec.dir.join("pid");
        let mut cmd = self.runsc(&spec.dir)?;
        match image {
            None => {
                cmd.arg("run");
            }
            Some(image) => {
                cmd.arg("restore")
                    .arg(format!("--image-path={}", image.display()));
            }
        }
        cmd.arg("--detach")
            .arg(format!("--bundle={}", bundle_dir.display()))
            .arg(format!("--pid-file={}", pid_file.display()))
            .arg(&spec.id);
        let status = cmd
            .status()
            .await
            .map_err(io_err(format!("start {}", self.cfg.runsc.display())))?;
        if !status.success() {
            return Err(DriverError::Start(runsc_failure(status, &spec.dir)));
        }
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .ok_or_else(|| DriverError::Start("runsc wrote no sandbox pid".into()))?;
        Ok(GvisorState {
            id: spec.id.clone(),
            dir: spec.dir.clone(),
            cgroup: cgroup.path().to_string(),
            pid,
        })
    }

    /// Kills every process of the sandbox in `dir` with cgroup `cgroup`
    /// and removes the cgroup and the directory.
    fn remove(&self, dir: &Path, cgroup: &Cgroup) -> Result<(), DriverError> {
        // A frozen task does not die of SIGKILL until thawed.
        if cgroup.exists() {
            let _ = cgroup.thaw();
        }
        let needle = format!("--root={}", Self::runsc_root(dir).display());
        // Two rounds: a runsc parent may be forking while we look.
        for _ in 0..2 {
            let mut pids = cgroup.procs();
            pids.extend(procs::find_by_cmdline(&needle));
            pids.sort_unstable();
            pids.dedup();
            for &p in &pids {
                procs::kill(p);
            }
            if !procs::wait_gone(&pids, Duration::from_secs(5)) {
                return Err(DriverError::Io {
                    op: format!("kill the processes of {}", dir.display()),
                    source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                });
            }
        }
        cgroup.remove().map_err(|e| DriverError::Io {
            op: format!("remove cgroup {}", cgroup.path()),
            source: std::io::Error::other(e),
        })?;
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("remove {}", dir.display()))(e)),
        }
    }
}

/// The last lines runsc printed, for an error message.
fn runsc_failure(status: std::process::ExitStatus, dir: &Path) -> String {
    let raw = std::fs::read(dir.join("runsc.log")).unwrap_or_default();
    let text = String::from_utf8_lossy(&raw);
    let tail: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .rev()
        .take(3)
        .collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    format!("runsc exited with {status}: {}", tail.join(" | "))
}

fn state(s: &DriverState) -> &GvisorState {
    match s {
        DriverState::Gvisor(g) => g,
    }
}

/// Bytes under `dir`.
fn dir_size(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

impl Driver for GvisorDriver {
    fn name(&self) -> &'static str {
        "gvisor"
    }

    fn describe(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("driver".to_string(), "gvisor".to_string()),
            ("runsc".to_string(), self.version.clone()),
            ("platform".to_string(), self.cfg.platform.clone()),
        ])
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<DriverState, DriverError> {
        match self.start(spec).await {
            Ok(s) => Ok(DriverState::Gvisor(s)),
            Err(e) => {
                // Leave nothing of a half-made sandbox.
                let cgroup = self.cgroup(&spec.id);
                if let Err(cleanup) = self.remove(&spec.dir, &cgroup) {
                    tracing::warn!(sandbox_id = %spec.id, error = %cleanup, "cleanup after a failed start");
                }
                Err(e)
            }
        }
    }

    async fn pause(&self, s: &DriverState) -> Result<(), DriverError> {
        let cg = Cgroup::new(&self.cfg.cgroup_root, &state(s).cgroup);
        // Freezing polls (and may retry): keep it off the async workers.
        tokio::task::spawn_blocking(move || cg.freeze())
            .await
            .map_err(|e| DriverError::Freeze(format!("freeze task: {e}")))?
            .map_err(|e| DriverError::Freeze(format!("{e}: {}", error_source(&e))))
    }

    async fn resume(&self, s: &DriverState) -> Result<(), DriverError> {
        let cg = Cgroup::new(&self.cfg.cgroup_root, &state(s).cgroup);
        cg.thaw()
            .map_err(|e| DriverError::Freeze(format!("{e}: {}", error_source(&e))))
    }

    async fn snapshot(&self, s: &DriverState, image: &Path) -> Result<SnapshotInfo, DriverError> {
        let g = state(s);
        let cg = Cgroup::new(&self.cfg.cgroup_root, &g.cgroup);
        if cg.is_frozen() {
            let _ = cg.thaw();
        }
        std::fs::create_dir_all(image).map_err(io_err(format!("create {}", image.display())))?;
        let started = Instant::now();
        let status = self
            .runsc(&g.dir)?
            .arg("checkpoint")
            .arg(format!("--image-path={}", image.display()))
            .arg(&g.id)
            .status()
            .await
            .map_err(io_err("run runsc checkpoint"))?;
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let result = if status.success() {
            Ok(SnapshotInfo {
                size_bytes: dir_size(image),
                duration_ms,
            })
        } else {
            Err(DriverError::Snapshot(runsc_failure(status, &g.dir)))
        };
        // The checkpointed sandbox has exited (or, on failure, is of no
        // further use: its envd closed every connection); remove it.
        self.remove(&g.dir, &cg)?;
        result
    }

    async fn destroy(&self, s: &DriverState) -> Result<(), DriverError> {
        let g = state(s).clone();
        let cg = Cgroup::new(&self.cfg.cgroup_root, &g.cgroup);
        // Killing and waiting blocks: keep it off the async workers.
        let this_cfg = self.cfg.clone();
        let version = self.version.clone();
        tokio::task::spawn_blocking(move || {
            GvisorDriver {
                cfg: this_cfg,
                version,
            }
            .remove(&g.dir, &cg)
        })
        .await
        .map_err(|e| DriverError::Io {
            op: "destroy task".into(),
            source: std::io::Error::other(e),
        })?
    }

    async fn wait_exit(&self, s: &DriverState) -> ExitReason {
        let g = state(s);
        procs::wait_exit(g.pid).await;
        let c = Cgroup::new(&self.cfg.cgroup_root, &g.cgroup).counters();
        if c.oom_kills > 0 {
            ExitReason::OomKilled
        } else if c.pids_refused > 0 {
            ExitReason::PidsLimit
        } else {
            ExitReason::Exited
        }
    }

    fn usage(&self, s: &DriverState) -> Result<ResourceUsage, DriverError> {
        let c = Cgroup::new(&self.cfg.cgroup_root, &state(s).cgroup).counters();
        Ok(ResourceUsage {
            memory_bytes: c.memory_bytes,
            memory_peak_bytes: c.memory_peak_bytes,
            cpu_ms: c.cpu_ns / 1_000_000,
            host_tasks: c.tasks,
        })
    }

    fn pss_bytes(&self, s: &DriverState) -> Result<u64, DriverError> {
        let g = state(s);
        let mut pids = Cgroup::new(&self.cfg.cgroup_root, &g.cgroup).procs();
        pids.extend(procs::find_by_cmdline(&format!(
            "--root={}",
            Self::runsc_root(&g.dir).display()
        )));
        pids.sort_unstable();
        pids.dedup();
        Ok(pids.into_iter().map(procs::pss_bytes).sum())
    }

    async fn cleanup_orphans(&self, sandboxes_dir: &Path) -> Result<usize, DriverError> {
        let mut removed = 0;
        let mut names: Vec<String> = match std::fs::read_dir(sandboxes_dir) {
            Ok(rd) => rd
                .filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(format!("read {}", sandboxes_dir.display()))(e)),
        };
        // Cgroups of this vmhost whose directory is already gone.
        let parent = Cgroup::new(&self.cfg.cgroup_root, self.cfg.cgroup_parent.clone());
        for child in parent.children() {
            if !names.contains(&child) {
                names.push(child);
            }
        }
        for name in names {
            let dir = sandboxes_dir.join(&name);
            let cg = self.cgroup(&name);
            let cfg = self.cfg.clone();
            let version = self.version.clone();
            tokio::task::spawn_blocking(move || GvisorDriver { cfg, version }.remove(&dir, &cg))
                .await
                .map_err(|e| DriverError::Io {
                    op: "cleanup task".into(),
                    source: std::io::Error::other(e),
                })??;
            removed += 1;
        }
        Ok(removed)
    }
}

fn error_source(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}
