//! Configuration of `vmhost serve`, from flags and `THAW_*` environment
//! variables, in one place.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::driver::{AnyDriver, Limits};
use crate::error::HostError;
use crate::host::HostConfig;

/// Flags of `vmhost serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the host API (loopback unless said otherwise).
    #[arg(long, env = "THAW_VMHOST_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// State: templates' snapshots, user snapshots, envd copies.
    #[arg(long, env = "THAW_DATA_DIR", default_value = "/var/lib/thaw")]
    pub data_dir: PathBuf,
    /// Runtime state: one directory per sandbox with its host socket and
    /// runsc state. Removed sandboxes leave nothing here.
    #[arg(long, env = "THAW_RUN_DIR", default_value = "/run/thaw")]
    pub run_dir: PathBuf,
    /// Cache of template bases and built layers.
    #[arg(long, env = "THAW_CACHE_DIR", default_value = "/var/cache/thaw")]
    pub cache_dir: PathBuf,
    /// The folder of runtime recipes (`runtimes/` of the repository).
    #[arg(long, env = "THAW_RUNTIMES_DIR", default_value = "runtimes")]
    pub runtimes_dir: PathBuf,
    /// The envd binary put into sandboxes [default: `envd` next to the
    /// vmhost binary].
    #[arg(long, env = "THAW_ENVD_BINARY")]
    pub envd: Option<PathBuf>,
    /// Sandbox technology: `gvisor` (the only one built here).
    #[arg(long, env = "THAW_DRIVER", default_value = "gvisor")]
    pub driver: String,
    /// The runsc binary (gvisor driver).
    #[arg(long, env = "THAW_RUNSC", default_value = "runsc")]
    pub runsc: PathBuf,
    /// runsc platform: `ptrace` (works everywhere, the default here) or
    /// `systrap`/`kvm` on releases and hosts that have them.
    #[arg(long, env = "THAW_RUNSC_PLATFORM", default_value = "ptrace")]
    pub platform: String,
    /// The cgroup (v1, under every controller) that holds this vmhost's
    /// sandboxes; one per vmhost on a machine.
    #[arg(long, env = "THAW_CGROUP_PARENT", default_value = "thaw")]
    pub cgroup_parent: String,
    /// Most sandboxes at once; more get 503 no_capacity.
    #[arg(long, env = "THAW_MAX_SANDBOXES", default_value_t = 64)]
    pub max_sandboxes: usize,
    /// Largest scratch disk (`/tmp`) a sandbox may ask for, in bytes.
    #[arg(long, env = "THAW_MAX_DISK_BYTES", default_value_t = 4 << 30)]
    pub max_disk_bytes: u64,
    /// Register with the pool (Redis at `--redis-url`) and send heartbeats,
    /// so pool-managers place warm sandboxes here (distributed mode).
    #[arg(long, env = "THAW_VMHOST_REGISTER", default_value_t = false)]
    pub register: bool,
    /// The shared Redis of distributed mode.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Prefix of every Redis key (one per thaw installation).
    #[arg(long, env = "THAW_REDIS_PREFIX", default_value = "thaw:")]
    pub redis_prefix: String,
    /// This host's id in the registry [default: `host_` + the listen port
    /// and machine name].
    #[arg(long, env = "THAW_HOST_ID")]
    pub host_id: Option<String>,
    /// The URL others reach this vmhost at [default: `http://` + --listen].
    #[arg(long, env = "THAW_VMHOST_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Time between heartbeats, in milliseconds; a host is dead after
    /// three missed ones.
    #[arg(long, env = "THAW_HEARTBEAT_MS", default_value_t = 500)]
    pub heartbeat_ms: u64,
    /// Debian mirror for template bases.
    #[arg(
        long,
        env = "THAW_DEBIAN_MIRROR",
        default_value = "http://deb.debian.org/debian"
    )]
    pub mirror: String,
}

impl ServeArgs {
    /// This host's registry id.
    pub fn host_id(&self) -> String {
        self.host_id.clone().unwrap_or_else(|| {
            let name = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            let name: String = name
                .trim()
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(32)
                .collect();
            format!("host_{name}{}", self.listen.port())
        })
    }

    /// The URL this vmhost is reached at.
    pub fn advertise_url(&self) -> String {
        self.advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }

    /// The envd binary: the flag, or `envd` beside this executable.
    pub fn envd_binary(&self) -> PathBuf {
        self.envd.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("envd")))
                .unwrap_or_else(|| PathBuf::from("envd"))
        })
    }

    /// The core's settings.
    pub fn host_config(&self) -> HostConfig {
        let mut build = template::builder::BuildConfig::new(
            &self.runtimes_dir,
            &self.cache_dir,
            &self.data_dir,
        );
        build.runsc.binary = self.runsc.clone();
        build.runsc.platform = self.platform.clone();
        build.mirror = self.mirror.clone();
        HostConfig {
            data_dir: self.data_dir.clone(),
            run_dir: self.run_dir.clone(),
            envd_binary: self.envd_binary(),
            default_limits: Limits::default(),
            max_sandboxes: self.max_sandboxes,
            max_disk_bytes: self.max_disk_bytes,
            build,
        }
    }

    /// The driver named by `--driver`.
    pub fn driver(&self) -> Result<AnyDriver, HostError> {
        match self.driver.as_str() {
            #[cfg(feature = "gvisor")]
            "gvisor" => {
                crate::driver::gvisor::GvisorDriver::new(crate::driver::gvisor::GvisorConfig {
                    runsc: self.runsc.clone(),
                    platform: self.platform.clone(),
                    cgroup_parent: self.cgroup_parent.clone(),
                    cgroup_root: crate::sys::cgroup::ROOT.into(),
                })
                .map(AnyDriver::Gvisor)
                .map_err(|e| HostError::Internal(format!("the gvisor driver cannot start: {e}")))
            }
            "firecracker" => Err(HostError::BadRequest(
                "driver: firecracker is not built yet (needs KVM; see issue 9); use gvisor".into(),
            )),
            other => Err(HostError::BadRequest(format!(
                "driver: unknown driver {other:?} (gvisor)"
            ))),
        }
    }
}
