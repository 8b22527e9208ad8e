//! The one seam between vmhost and a sandbox technology.
//!
//! The core (`host`, `api`, `templates`) sees only [`Driver`] and the
//! neutral types below; every runsc or Firecracker detail lives in a backend
//! module behind a cargo feature. Like Cloud Hypervisor's `hypervisor`
//! crate, nothing outside `driver/<backend>/` names a backend's tools.
//!
//! With native `async fn` in traits (not dyn-compatible) and few drivers,
//! [`AnyDriver`] is an enum that forwards to the chosen backend.

#[cfg(feature = "gvisor")]
pub mod gvisor;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory (everything the sandbox holds, its in-memory files included).
    pub memory_bytes: u64,
    /// CPU time, in thousandths of a CPU (1000 = one full CPU).
    pub cpu_millis: u64,
    /// Processes inside the sandbox.
    pub pids: u64,
    /// Size of the sandbox's scratch filesystem (`/tmp`).
    pub disk_bytes: u64,
    /// Wall time of the sandbox: it is destroyed (reason `timed_out`) this
    /// long after it started or was last resumed; 0 = no limit.
    pub timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 512 << 20,
            cpu_millis: 1000,
            pids: 256,
            disk_bytes: 256 << 20,
            timeout_ms: 300_000,
        }
    }
}

/// How a sandbox's root filesystem and first process come to be.
#[derive(Debug, Clone)]
pub enum Boot {
    /// A fresh boot of a template's root filesystem (template baking).
    Cold {
        /// The read-only root filesystem.
        rootfs: PathBuf,
    },
    /// A restore of a snapshot taken with [`Driver::snapshot`].
    Restore {
        /// The root filesystem the snapshot was taken on.
        rootfs: PathBuf,
        /// The snapshot (a directory the driver wrote).
        image: PathBuf,
    },
}

/// Everything a driver needs to start one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The sandbox id (`sb_…`).
    pub id: String,
    /// The sandbox's private directory on the host (the driver may put
    /// anything there; it is removed on destroy).
    pub dir: PathBuf,
    /// The host Unix socket envd dials; the driver makes it reachable from
    /// inside as [`ENVD_HOST_SOCKET`]. The core listens on it.
    pub host_socket: PathBuf,
    /// The directory holding the envd binary, shown read-only inside at
    /// [`ENVD_DIR`].
    pub envd_dir: PathBuf,
    /// Limits.
    pub limits: Limits,
    /// Boot or restore.
    pub boot: Boot,
}

/// Where envd finds the host socket inside every sandbox.
pub const ENVD_HOST_SOCKET: &str = "/thaw-host/host.sock";
/// Where the envd binary is inside every sandbox.
pub const ENVD_DIR: &str = "/opt/thaw/bin";

/// Why a sandbox stopped, as it is reported to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// Destroyed on request.
    Destroyed,
    /// It used more memory than its limit.
    OomKilled,
    /// It tried to run more processes than its limit.
    PidsLimit,
    /// Its wall-time limit passed.
    TimedOut,
    /// It stopped by itself (envd exited, the sandbox crashed).
    Exited,
    /// It was snapshotted (its state lives on in the snapshot).
    Snapshotted,
    /// vmhost found it left over from a previous run and removed it.
    Orphaned,
    /// Creating, restoring or resuming it failed.
    Failed,
}

impl ExitReason {
    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Destroyed => "destroyed",
            ExitReason::OomKilled => "oom_killed",
            ExitReason::PidsLimit => "pids_limit",
            ExitReason::TimedOut => "timed_out",
            ExitReason::Exited => "exited",
            ExitReason::Snapshotted => "snapshotted",
            ExitReason::Orphaned => "orphaned",
            ExitReason::Failed => "failed",
        }
    }
}

/// What a sandbox uses now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUsage {
    /// Memory charged to the sandbox.
    pub memory_bytes: u64,
    /// Highest memory charged so far.
    pub memory_peak_bytes: u64,
    /// CPU time used so far, in milliseconds.
    pub cpu_ms: u64,
    /// Host processes and threads of the sandbox.
    pub host_tasks: u64,
}

/// What a driver keeps about one running sandbox: opaque to the core,
/// serialisable so a restarted vmhost can find what it left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "driver", rename_all = "snake_case")]
pub enum DriverState {
    /// A gVisor sandbox.
    #[cfg(feature = "gvisor")]
    Gvisor(gvisor::GvisorState),
}

/// What a snapshot holds, as the driver reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Bytes on disk.
    pub size_bytes: u64,
    /// How long the snapshot itself took.
    pub duration_ms: u64,
}

/// Why a driver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The sandbox could not be started or restored.
    #[error("starting the sandbox: {0}")]
    Start(String),
    /// Pause or resume failed.
    #[error("pausing or resuming the sandbox: {0}")]
    Freeze(String),
    /// The snapshot failed.
    #[error("snapshotting the sandbox: {0}")]
    Snapshot(String),
    /// A file or process operation on the host failed.
    #[error("{op}")]
    Io {
        /// What was being done.
        op: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The driver cannot do this.
    #[error("the {driver} driver cannot {what}")]
    Unsupported {
        /// The driver.
        driver: &'static str,
        /// The operation.
        what: &'static str,
    },
}

/// Tags an I/O error with what was being done.
pub(crate) fn io_err(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
    let op = op.into();
    move |source| DriverError::Io { op, source }
}

/// A sandbox technology. Operations take the sandbox's [`DriverState`]
/// (what `create` returned); the core serialises calls per sandbox and
/// never calls anything but `resume`, `destroy` and `usage` on a paused
/// sandbox.
pub trait Driver: Send + Sync + 'static {
    /// The driver's name (`gvisor`, `firecracker`).
    fn name(&self) -> &'static str;

    /// A description of the driver for `GET /host` (versions, platform).
    fn describe(&self) -> BTreeMap<String, String>;

    /// Starts a sandbox (cold or from a snapshot). On error, nothing of it
    /// is left behind.
    fn create(
        &self,
        spec: &SandboxSpec,
    ) -> impl std::future::Future<Output = Result<DriverState, DriverError>> + Send;

    /// Stops every process of the sandbox where it is (memory kept).
    fn pause(
        &self,
        state: &DriverState,
    ) -> impl std::future::Future<Output = Result<(), DriverError>> + Send;

    /// Lets a paused sandbox run again.
    fn resume(
        &self,
        state: &DriverState,
    ) -> impl std::future::Future<Output = Result<(), DriverError>> + Send;

    /// Writes the sandbox's whole state into the directory `image` (which
    /// must not exist); the sandbox is gone afterwards. envd must have
    /// answered `/snapshot/prepare` and its host socket must be removed.
    fn snapshot(
        &self,
        state: &DriverState,
        image: &std::path::Path,
    ) -> impl std::future::Future<Output = Result<SnapshotInfo, DriverError>> + Send;

    /// Removes the sandbox: every process, file, mount and cgroup of it.
    /// Idempotent; works on a paused or dead sandbox.
    fn destroy(
        &self,
        state: &DriverState,
    ) -> impl std::future::Future<Output = Result<(), DriverError>> + Send;

    /// Resolves when the sandbox has stopped by itself, with the reason.
    fn wait_exit(
        &self,
        state: &DriverState,
    ) -> impl std::future::Future<Output = ExitReason> + Send;

    /// What the sandbox uses now.
    fn usage(&self, state: &DriverState) -> Result<ResourceUsage, DriverError>;

    /// Proportional memory (PSS) of the sandbox's host processes.
    fn pss_bytes(&self, state: &DriverState) -> Result<u64, DriverError>;

    /// Removes whatever a previous vmhost process left of its sandboxes
    /// under `sandboxes_dir`; returns how many sandboxes were removed.
    fn cleanup_orphans(
        &self,
        sandboxes_dir: &std::path::Path,
    ) -> impl std::future::Future<Output = Result<usize, DriverError>> + Send;
}

/// The driver a vmhost runs with.
#[derive(Debug)]
pub enum AnyDriver {
    /// gVisor (runsc).
    #[cfg(feature = "gvisor")]
    Gvisor(gvisor::GvisorDriver),
}

macro_rules! dispatch {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            #[cfg(feature = "gvisor")]
            AnyDriver::Gvisor($d) => $e,
        }
    };
}

impl Driver for AnyDriver {
    fn name(&self) -> &'static str {
        dispatch!(self, d => d.name())
    }
    fn describe(&self) -> BTreeMap<String, String> {
        dispatch!(self, d => d.describe())
    }
    async fn create(&self, spec: &SandboxSpec) -> Result<DriverState, DriverError> {
        dispatch!(self, d => d.create(spec).await)
    }
    async fn pause(&self, state: &DriverState) -> Result<(), DriverError> {
        dispatch!(self, d => d.pause(state).await)
    }
    async fn resume(&self, state: &DriverState) -> Result<(), DriverError> {
        dispatch!(self, d => d.resume(state).await)
    }
    async fn snapshot(
        &self,
        state: &DriverState,
        image: &std::path::Path,
    ) -> Result<SnapshotInfo, DriverError> {
        dispatch!(self, d => d.snapshot(state, image).await)
    }
    async fn destroy(&self, state: &DriverState) -> Result<(), DriverError> {
        dispatch!(self, d => d.destroy(state).await)
    }
    async fn wait_exit(&self, state: &DriverState) -> ExitReason {
        dispatch!(self, d => d.wait_exit(state).await)
    }
    fn usage(&self, state: &DriverState) -> Result<ResourceUsage, DriverError> {
        dispatch!(self, d => d.usage(state))
    }
    fn pss_bytes(&self, state: &DriverState) -> Result<u64, DriverError> {
        dispatch!(self, d => d.pss_bytes(state))
    }
    async fn cleanup_orphans(&self, sandboxes_dir: &std::path::Path) -> Result<usize, DriverError> {
        dispatch!(self, d => d.cleanup_orphans(sandboxes_dir).await)
    }
}
