//! The state every route shares: the session set by `/init`, the process
//! table, the quiesce switch and the port scanner.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::watch;

use crate::metrics::CpuTimes;
use crate::ports::PortScanner;
use crate::process::Processes;

/// What `/init` set: applied to every later process and file operation.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// Environment variables for every process.
    pub env: BTreeMap<String, String>,
    /// Default user.
    pub user: Option<String>,
    /// Default working directory.
    pub workdir: Option<PathBuf>,
    /// The sandbox's id.
    pub sandbox_id: Option<String>,
    /// The template's id.
    pub template_id: Option<String>,
    /// Free-form metadata.
    pub metadata: BTreeMap<String, String>,
}

/// Settings of the state that come from the command line.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// Where the sandbox's identity files live (`/run/thaw`).
    pub run_dir: PathBuf,
    /// Whether `/snapshot/prepare` drops the page cache.
    pub drop_caches: bool,
    /// Bytes of output each process keeps for replay.
    pub output_buffer_bytes: usize,
    /// Path whose filesystem `/metrics` reports as the disk.
    pub disk_path: PathBuf,
    /// The warm runner's socket, for `/run`.
    pub runner_socket: PathBuf,
}

/// The quiesce switch: `/snapshot/prepare` turns it on (every host
/// connection closes), `/init` turns it off. Connections watch `generation`.
#[derive(Debug)]
pub struct Quiesce {
    /// Bumped by every prepare; connection tasks close when it changes.
    pub generation: watch::Sender<u64>,
    /// Whether envd is quiesced now.
    pub quiesced: std::sync::atomic::AtomicBool,
}

impl Quiesce {
    /// Whether envd is quiesced now.
    pub fn is_quiesced(&self) -> bool {
        self.quiesced.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Shared state of every route (cheap to clone).
#[derive(Debug, Clone)]
pub struct AppState {
    /// Settings.
    pub config: Arc<StateConfig>,
    /// The session.
    pub session: Arc<RwLock<Session>>,
    /// Every process envd started.
    pub processes: Arc<Processes>,
    /// The quiesce switch.
    pub quiesce: Arc<Quiesce>,
    /// Background port scanning.
    pub scanner: Arc<PortScanner>,
    /// When envd started.
    pub started: Instant,
    /// CPU counters at the previous `/metrics`.
    pub last_cpu: Arc<Mutex<Option<CpuTimes>>>,
}

impl AppState {
    /// Fresh state.
    pub fn new(config: StateConfig) -> AppState {
        let (generation, _) = watch::channel(0);
        AppState {
            processes: Processes::new(config.output_buffer_bytes),
            config: Arc::new(config),
            session: Arc::new(RwLock::new(Session::default())),
            quiesce: Arc::new(Quiesce {
                generation,
                quiesced: std::sync::atomic::AtomicBool::new(false),
            }),
            scanner: PortScanner::new(),
            started: Instant::now(),
            last_cpu: Arc::new(Mutex::new(None)),
        }
    }

    /// A copy of the current session.
    pub fn session(&self) -> Session {
        self.session
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}
