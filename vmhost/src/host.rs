//! The core of vmhost: the table of sandboxes and every operation on them,
//! in terms of [`Driver`] only.
//!
//! Concurrency: each sandbox has an operation lock. A state-changing
//! operation takes it with `try_lock`: a sandbox that is busy (starting,
//! pausing, snapshotting…) gets a 409 at once, never a wait. Destroy is the
//! exception: it marks the sandbox `destroying` at once, answers, and does
//! the work in the background after any operation under way (a destroy
//! never sits on a request's path). Requests forwarded to envd do not take
//! the lock; they need the sandbox `running`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::driver::{
    AnyDriver, Boot, Driver, DriverState, ExitReason, Limits, ResourceUsage, SandboxSpec,
};
use crate::envd_link::{EnvdLink, LinkError};
use crate::error::HostError;
use crate::metrics::Metrics;
use crate::snapshots::{self, SnapshotMeta};

/// How long envd may take to dial in after a start or restore.
const ENVD_CONNECT: Duration = Duration::from_secs(20);
/// How many destroyed sandboxes are remembered (for `GET` and 409s).
const TOMBSTONES: usize = 1024;

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// State: templates, snapshots, envd copies.
    pub data_dir: PathBuf,
    /// Runtime state: one directory per sandbox, sockets.
    pub run_dir: PathBuf,
    /// The envd binary put into every sandbox.
    pub envd_binary: PathBuf,
    /// Limits of a sandbox when neither template nor request says.
    pub default_limits: Limits,
    /// Most sandboxes at once (any state but destroyed).
    pub max_sandboxes: usize,
    /// Largest disk limit a request may ask for.
    pub max_disk_bytes: u64,
    /// How template root filesystems are built.
    pub build: template::builder::BuildConfig,
}

/// A sandbox's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Being started or restored.
    Starting,
    /// Running.
    Running,
    /// Being frozen.
    Pausing,
    /// Frozen in memory.
    Paused,
    /// Being thawed.
    Resuming,
    /// Being written to a snapshot.
    Snapshotting,
    /// Being removed.
    Destroying,
    /// Gone (see the exit reason).
    Destroyed,
}

impl SandboxState {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Pausing => "pausing",
            SandboxState::Paused => "paused",
            SandboxState::Resuming => "resuming",
            SandboxState::Snapshotting => "snapshotting",
            SandboxState::Destroying => "destroying",
            SandboxState::Destroyed => "destroyed",
        }
    }
}

/// What a sandbox looks like on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxView {
    /// `sb_…`.
    pub sandbox_id: String,
    /// Its template.
    pub template: String,
    /// The snapshot it was restored from.
    pub snapshot_id: Option<String>,
    /// Lifecycle state.
    pub state: SandboxState,
    /// Why it stopped, once destroyed.
    pub exit_reason: Option<ExitReason>,
    /// Its limits.
    pub limits: Limits,
    /// User metadata.
    pub metadata: BTreeMap<String, String>,
    /// Whether its warm runner still waits for a job.
    pub runner_ready: bool,
    /// RFC 3339.
    pub created_at: String,
    /// What it uses now (running or paused only).
    pub usage: Option<ResourceUsage>,
    /// Timings of the last operation, in milliseconds.
    pub timings: BTreeMap<String, u64>,
}

/// `POST /sandboxes` and `POST /sandboxes/restore`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// Template name (for `POST /sandboxes`).
    #[serde(default)]
    pub template: Option<String>,
    /// Snapshot id (for `POST /sandboxes/restore`).
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// Limits over the template's.
    #[serde(default)]
    pub limits: Option<LimitsRequest>,
    /// Environment over the template's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// User metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Wall time (same as `limits.timeout_ms`).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Limits a request may set; absent ones come from the template.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// Memory.
    pub memory_bytes: Option<u64>,
    /// Thousandths of a CPU.
    pub cpu_millis: Option<u64>,
    /// Processes.
    pub pids: Option<u64>,
    /// Scratch disk.
    pub disk_bytes: Option<u64>,
    /// Wall time.
    pub timeout_ms: Option<u64>,
}

struct Status {
    state: SandboxState,
    exit_reason: Option<ExitReason>,
    runner_ready: bool,
    timings: BTreeMap<String, u64>,
}

/// One sandbox.
pub struct Sandbox {
    id: String,
    template: String,
    snapshot_id: Option<String>,
    limits: Limits,
    metadata: BTreeMap<String, String>,
    created_at: String,
    status: Mutex<Status>,
    /// The operation lock; holds the driver's state while the sandbox
    /// exists (None once it is gone).
    op: tokio::sync::Mutex<Option<DriverState>>,
    link: EnvdLink,
    timer: Mutex<Option<JoinHandle<()>>>,
    watcher: Mutex<Option<JoinHandle<()>>>,
    /// A copy of the driver state for reads that must not take `op`.
    driver_state: Mutex<Option<DriverState>>,
    /// What a snapshot of it records.
    origin: SnapshotOrigin,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("id", &self.id).finish()
    }
}

impl Sandbox {
    fn state(&self) -> SandboxState {
        lock(&self.status).state
    }

    fn set_state(&self, s: SandboxState) {
        lock(&self.status).state = s;
    }

    /// The sandbox's link to its envd.
    pub fn link(&self) -> &EnvdLink {
        &self.link
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Locks a std mutex, recovering from a panic elsewhere (the data are
/// plain fields that stay consistent).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Default)]
struct Table {
    live: HashMap<String, Arc<Sandbox>>,
    gone: VecDeque<(String, SandboxView)>,
}

/// vmhost's core.
#[derive(Debug)]
pub struct Host {
    cfg: HostConfig,
    driver: AnyDriver,
    envd_dir: PathBuf,
    envd_hash: String,
    table: Mutex<TableCell>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    builds: tokio::sync::Mutex<()>,
}

struct TableCell(Table);

impl std::fmt::Debug for TableCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} sandboxes", self.0.live.len())
    }
}

/// A new random id with `prefix` (`sb`, `snap`).
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 10];
    rand::thread_rng().fill_bytes(&mut b);
    format!("{prefix}_{}", hex::encode(b))
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn driver_failed(e: impl std::fmt::Display) -> HostError {
    HostError::SandboxFailed(e.to_string())
}

fn envd_failed(e: &LinkError) -> HostError {
    let mut msg = e.to_string();
    if let Some(src) = std::error::Error::source(e) {
        msg.push_str(&format!(": {src}"));
    }
    HostError::Envd(msg)
}

impl Host {
    /// Starts the core: installs envd under the data directory and removes
    /// whatever a previous run left of its sandboxes.
    pub async fn new(cfg: HostConfig, driver: AnyDriver) -> Result<Arc<Host>, HostError> {
        let (envd_dir, envd_hash) = install_envd(&cfg.envd_binary, &cfg.data_dir)?;
        let sandboxes = cfg.run_dir.join("sandboxes");
        std::fs::create_dir_all(&sandboxes)
            .map_err(|e| HostError::Internal(format!("create {}: {e}", sandboxes.display())))?;
        let removed = driver
            .cleanup_orphans(&sandboxes)
            .await
            .map_err(|e| HostError::Internal(format!("cleaning up a previous run: {e}")))?;
        if removed > 0 {
            tracing::info!(removed, "removed sandboxes a previous run left");
        }
        let metrics = Metrics::new();
        metrics.orphans_removed.inc_by(removed as u64);
        Ok(Arc::new(Host {
            cfg,
            driver,
            envd_dir,
            envd_hash,
            table: Mutex::new(TableCell(Table::default())),
            metrics,
            builds: tokio::sync::Mutex::new(()),
        }))
    }

    /// The core's settings.
    pub fn config(&self) -> &HostConfig {
        &self.cfg
    }

    /// The driver.
    pub fn driver(&self) -> &AnyDriver {
        &self.driver
    }

    /// Where a sandbox's private directory is.
    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.cfg.run_dir.join("sandboxes").join(id)
    }

    /// A live sandbox, or the right error for an unknown or gone one.
    pub fn get(&self, id: &str) -> Result<Arc<Sandbox>, HostError> {
        let t = lock(&self.table);
        if let Some(sb) = t.0.live.get(id) {
            return Ok(sb.clone());
        }
        if t.0.gone.iter().any(|(gid, _)| gid == id) {
            return Err(HostError::WrongState {
                id: id.to_string(),
                state: "destroyed",
                op: "use it",
            });
        }
        Err(HostError::SandboxNotFound(id.to_string()))
    }

    /// The view of a sandbox, live or remembered.
    pub fn view(&self, id: &str) -> Result<SandboxView, HostError> {
        let live = {
            let t = lock(&self.table);
            match t.0.live.get(id) {
                Some(sb) => sb.clone(),
                None => {
                    return t
                        .0
                        .gone
                        .iter()
                        .find(|(gid, _)| gid == id)
                        .map(|(_, v)| v.clone())
                        .ok_or_else(|| HostError::SandboxNotFound(id.to_string()))
                }
            }
        };
        Ok(self.view_of(&live))
    }

    fn view_of(&self, sb: &Sandbox) -> SandboxView {
        let (state, exit_reason, runner_ready, timings) = {
            let s = lock(&sb.status);
            (s.state, s.exit_reason, s.runner_ready, s.timings.clone())
        };
        let usage = match state {
            SandboxState::Running | SandboxState::Paused => lock(&sb.driver_state)
                .as_ref()
                .and_then(|d| self.driver.usage(d).ok()),
            _ => None,
        };
        SandboxView {
            sandbox_id: sb.id.clone(),
            template: sb.template.clone(),
            snapshot_id: sb.snapshot_id.clone(),
            state,
            exit_reason,
            limits: sb.limits,
            metadata: sb.metadata.clone(),
            runner_ready,
            created_at: sb.created_at.clone(),
            usage,
            timings,
        }
    }

    /// Every live sandbox.
    pub fn list(&self) -> Vec<SandboxView> {
        let live: Vec<Arc<Sandbox>> = lock(&self.table).0.live.values().cloned().collect();
        let mut v: Vec<SandboxView> = live.iter().map(|sb| self.view_of(sb)).collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        v
    }

    /// Counts of live sandboxes by state.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let live: Vec<Arc<Sandbox>> = lock(&self.table).0.live.values().cloned().collect();
        let mut m = BTreeMap::new();
        for sb in live {
            *m.entry(sb.state().as_str()).or_insert(0) += 1;
        }
        m
    }

    /// The limits of a new sandbox: the request's over the base's, checked
    /// against the host.
    fn limits(&self, base: Limits, req: &CreateRequest) -> Result<Limits, HostError> {
        let r = req.limits.unwrap_or_default();
        // The process limit (an rlimit of the processes inside) and the
        // scratch disk (a tmpfs mount) are part of the restored state:
        // only memory, CPU and wall time apply anew to a restore.
        for (field, asked, fixed) in [
            ("pids", r.pids, base.pids),
            ("disk_bytes", r.disk_bytes, base.disk_bytes),
        ] {
            if asked.is_some_and(|a| a != fixed) {
                return Err(HostError::LimitFixed(format!(
                    "limits.{field} is fixed by the snapshot at {fixed}; set it in the template's LIMIT and rebuild"
                )));
            }
        }
        let l = Limits {
            memory_bytes: r.memory_bytes.unwrap_or(base.memory_bytes),
            cpu_millis: r.cpu_millis.unwrap_or(base.cpu_millis),
            pids: r.pids.unwrap_or(base.pids),
            disk_bytes: r.disk_bytes.unwrap_or(base.disk_bytes),
            timeout_ms: req.timeout_ms.or(r.timeout_ms).unwrap_or(base.timeout_ms),
        };
        let cap = crate::hostinfo::capacity();
        if l.memory_bytes < 32 << 20 {
            return Err(HostError::BadRequest(
                "limits.memory_bytes: at least 33554432 (32 MiB)".into(),
            ));
        }
        if l.memory_bytes > cap.memory_bytes {
            return Err(HostError::LimitsExceedHost(format!(
                "limits.memory_bytes {} is more than this host's {} bytes",
                l.memory_bytes, cap.memory_bytes
            )));
        }
        if l.cpu_millis == 0 || l.cpu_millis > cap.cpus * 1000 {
            return Err(HostError::LimitsExceedHost(format!(
                "limits.cpu_millis must be between 1 and this host's {} ({} CPUs)",
                cap.cpus * 1000,
                cap.cpus
            )));
        }
        if l.pids == 0 || l.pids > 32_768 {
            return Err(HostError::BadRequest(
                "limits.pids: between 1 and 32768".into(),
            ));
        }
        if l.disk_bytes < 1 << 20 || l.disk_bytes > self.cfg.max_disk_bytes {
            return Err(HostError::LimitsExceedHost(format!(
                "limits.disk_bytes must be between 1048576 and this host's {}",
                self.cfg.max_disk_bytes
            )));
        }
        Ok(l)
    }

    /// `POST /sandboxes`: a restore of the template's snapshot.
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<SandboxView, HostError> {
        let name = req
            .template
            .clone()
            .ok_or_else(|| HostError::BadRequest("template: required".into()))?;
        if !crate::templates::valid_name(&name) {
            return Err(HostError::BadRequest(format!(
                "template: {name:?} is not a template name"
            )));
        }
        let dir = snapshots::template_dir(&self.cfg.data_dir, &name);
        if !dir.join(snapshots::META).is_file() {
            return Err(
                if self
                    .cfg
                    .build
                    .runtimes_dir
                    .join(&name)
                    .join("recipe")
                    .is_file()
                {
                    HostError::TemplateNotBuilt(name)
                } else {
                    HostError::TemplateNotFound(name)
                },
            );
        }
        let meta = snapshots::load(&dir)?;
        self.restore_from(&dir, meta, req, None).await
    }

    /// `POST /sandboxes/restore`: a restore of a user snapshot.
    pub async fn restore(self: &Arc<Self>, req: CreateRequest) -> Result<SandboxView, HostError> {
        let id = req
            .snapshot_id
            .clone()
            .ok_or_else(|| HostError::BadRequest("snapshot_id: required".into()))?;
        if !snapshots::valid_id(&id) {
            return Err(HostError::SnapshotNotFound(id));
        }
        let dir = snapshots::user_dir(&self.cfg.data_dir, &id);
        if !dir.join(snapshots::META).is_file() {
            return Err(HostError::SnapshotNotFound(id));
        }
        let meta = snapshots::load(&dir)?;
        self.restore_from(&dir, meta, req, Some(id)).await
    }

    async fn restore_from(
        self: &Arc<Self>,
        dir: &Path,
        meta: SnapshotMeta,
        req: CreateRequest,
        snapshot_id: Option<String>,
    ) -> Result<SandboxView, HostError> {
        let limits = self.limits(meta.limits, &req)?;
        let mut env = meta.env.clone();
        env.extend(req.env.clone());
        let started = Instant::now();
        let sb = self
            .start(StartArgs {
                template: meta.template.clone(),
                snapshot_id,
                limits,
                metadata: req.metadata.clone(),
                boot: Boot::Restore {
                    rootfs: meta.rootfs.clone(),
                    image: dir.join(snapshots::IMAGE),
                },
                envd_dir: meta.envd_dir.clone(),
                init: InitArgs {
                    env,
                    user: meta.user.clone(),
                    workdir: meta.workdir.clone(),
                },
                runner_ready: meta.runner_ready,
                origin: SnapshotOrigin {
                    template_hash: meta.template_hash.clone(),
                    key: meta.key.clone(),
                    rootfs: meta.rootfs.clone(),
                    envd_dir: meta.envd_dir.clone(),
                    user: meta.user.clone(),
                    workdir: meta.workdir.clone(),
                    env: meta.env.clone(),
                },
            })
            .await?;
        self.metrics
            .op_duration
            .with_label_values(&["restore"])
            .observe(started.elapsed().as_secs_f64());
        Ok(self.view_of(&sb))
    }

    /// Starts (cold or restored) a sandbox, connects to its envd and gives
    /// it its identity. On failure nothing of it is left.
    pub(crate) async fn start(self: &Arc<Self>, a: StartArgs) -> Result<Arc<Sandbox>, HostError> {
        {
            let t = lock(&self.table);
            if t.0.live.len() >= self.cfg.max_sandboxes {
                return Err(HostError::NoCapacity(format!(
                    "this host runs its maximum of {} sandboxes",
                    self.cfg.max_sandboxes
                )));
            }
        }
        let t0 = Instant::now();
        let id = new_id("sb");
        let dir = self.sandbox_dir(&id);
        let host_dir = dir.join("host");
        std::fs::create_dir_all(&host_dir)
            .map_err(|e| HostError::Internal(format!("create {}: {e}", host_dir.display())))?;
        let link = match EnvdLink::listen(&host_dir.join("host.sock")) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(HostError::Internal(format!("{e}")));
            }
        };
        let sb = Arc::new(Sandbox {
            id: id.clone(),
            template: a.template.clone(),
            snapshot_id: a.snapshot_id.clone(),
            limits: a.limits,
            metadata: a.metadata.clone(),
            created_at: now_rfc3339(),
            status: Mutex::new(Status {
                state: SandboxState::Starting,
                exit_reason: None,
                runner_ready: a.runner_ready,
                timings: BTreeMap::new(),
            }),
            op: tokio::sync::Mutex::new(None),
            link,
            timer: Mutex::new(None),
            watcher: Mutex::new(None),
            driver_state: Mutex::new(None),
            origin: a.origin.clone(),
        });
        let mut guard = sb.op.lock().await;
        lock(&self.table).0.live.insert(id.clone(), sb.clone());
        let spec = SandboxSpec {
            id: id.clone(),
            dir: dir.clone(),
            host_socket: sb.link.socket().to_path_buf(),
            envd_dir: a.envd_dir.clone(),
            limits: a.limits,
            boot: a.boot.clone(),
        };
        let state = match self.driver.create(&spec).await {
            Ok(s) => s,
            Err(e) => {
                drop(guard);
                sb.link.close();
                let _ = std::fs::remove_dir_all(&dir);
                self.bury(&sb, ExitReason::Failed);
                return Err(driver_failed(e));
            }
        };
        let t_driver = t0.elapsed();
        *guard = Some(state.clone());
        *lock(&sb.driver_state) = Some(state.clone());
        let initialised = async {
            sb.link
                .client(ENVD_CONNECT)
                .await
                .map_err(|e| envd_failed(&e))?;
            let t_envd = t0.elapsed();
            let mut entropy = [0u8; 64];
            rand::thread_rng().fill_bytes(&mut entropy);
            let clock_ms = u64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis(),
            )
            .unwrap_or(0);
            let body = json!({
                "env": a.init.env,
                "user": a.init.user,
                "workdir": a.init.workdir,
                "sandbox_id": id,
                "template_id": a.template,
                "metadata": a.metadata,
                "entropy": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, entropy),
                "clock_ms": clock_ms,
            });
            // `/init` is idempotent: a connection that does not answer (seen
            // rarely right after a restore, under load) is closed, envd
            // dials again, and `/init` goes on the new one.
            let mut attempt = 0;
            let (status, bytes) = loop {
                attempt += 1;
                match self
                    .envd_json(&sb, http::Method::POST, "/init", &body, Duration::from_secs(4))
                    .await
                {
                    Ok(answer) => break answer,
                    Err(e) if attempt < 3 => {
                        tracing::warn!(sandbox_id = %id, error = %e, "envd did not answer /init; redialing");
                        sb.link.reset();
                    }
                    Err(e) => return Err(e),
                }
            };
            if !status.is_success() {
                return Err(HostError::Envd(format!(
                    "/init answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                )));
            }
            Ok::<Duration, HostError>(t_envd)
        }
        .await;
        match initialised {
            Ok(t_envd) => {
                let total = t0.elapsed();
                {
                    let mut s = lock(&sb.status);
                    s.timings = BTreeMap::from([
                        ("driver_ms".to_string(), ms(t_driver)),
                        ("envd_connect_ms".to_string(), ms(t_envd - t_driver)),
                        ("init_ms".to_string(), ms(total - t_envd)),
                        ("total_ms".to_string(), ms(total)),
                    ]);
                    if s.state == SandboxState::Starting {
                        s.state = SandboxState::Running;
                    }
                }
                self.watch(&sb, state);
                self.arm_timer(&sb);
                drop(guard);
                if sb.state() == SandboxState::Destroying {
                    return Err(HostError::WrongState {
                        id,
                        state: "destroyed",
                        op: "start it (it was destroyed while starting)",
                    });
                }
                self.metrics.created.inc();
                Ok(sb)
            }
            Err(e) => {
                drop(guard);
                tracing::warn!(sandbox_id = %id, error = %e, "sandbox did not come up; removing it");
                self.destroy_now(&sb, ExitReason::Failed).await;
                Err(e)
            }
        }
    }

    /// One JSON request to a sandbox's envd; the whole answer. A request
    /// that fails on its connection before any answer is sent once more on
    /// the next connection envd makes (a connection can die at birth: a
    /// quiesced envd's probe of the host socket is one).
    pub async fn envd_json(
        &self,
        sb: &Sandbox,
        method: http::Method,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<(http::StatusCode, Bytes), HostError> {
        let call = async {
            let mut attempt = 0;
            let resp = loop {
                attempt += 1;
                let req = http::Request::builder()
                    .method(method.clone())
                    .uri(format!("http://envd{path}"))
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Body::from(body.to_string()))
                    .map_err(|e| HostError::Internal(e.to_string()))?;
                let connect = if attempt == 1 {
                    ENVD_CONNECT
                } else {
                    Duration::from_secs(2)
                };
                match sb.link.send(req, connect).await {
                    Ok(resp) => break resp,
                    Err(LinkError::Request(e)) if attempt == 1 => {
                        tracing::debug!(sandbox_id = %sb.id, error = %e, "envd connection failed; retrying on the next");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => return Err(envd_failed(&e)),
                }
            };
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| HostError::Envd(format!("reading {path}: {e}")))?
                .to_bytes();
            Ok::<_, HostError>((status, bytes))
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| HostError::Envd(format!("{path} took longer than {timeout:?}")))?
    }

    /// Watches for the sandbox stopping by itself.
    fn watch(self: &Arc<Self>, sb: &Arc<Sandbox>, state: DriverState) {
        let host = Arc::downgrade(self);
        let weak = Arc::downgrade(sb);
        let task = tokio::spawn(async move {
            let Some(h) = host.upgrade() else { return };
            let reason = h.driver.wait_exit(&state).await;
            let Some(sb) = weak.upgrade() else { return };
            let state_now = sb.state();
            match state_now {
                SandboxState::Snapshotting | SandboxState::Destroying | SandboxState::Destroyed => {
                }
                _ => {
                    tracing::info!(sandbox_id = %sb.id, reason = reason.as_str(), "sandbox stopped by itself");
                    h.destroy_in_background(&sb, reason);
                }
            }
        });
        if let Some(old) = lock(&sb.watcher).replace(task) {
            old.abort();
        }
    }

    /// Starts the wall-time clock (again).
    fn arm_timer(self: &Arc<Self>, sb: &Arc<Sandbox>) {
        let timeout = sb.limits.timeout_ms;
        let mut slot = lock(&sb.timer);
        if let Some(old) = slot.take() {
            old.abort();
        }
        if timeout == 0 {
            return;
        }
        let host = Arc::downgrade(self);
        let weak = Arc::downgrade(sb);
        *slot = Some(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(timeout)).await;
            if let (Some(h), Some(sb)) = (host.upgrade(), weak.upgrade()) {
                tracing::info!(sandbox_id = %sb.id, timeout_ms = timeout, "wall time passed; destroying");
                h.destroy_in_background(&sb, ExitReason::TimedOut);
            }
        }));
    }

    fn disarm_timer(sb: &Sandbox) {
        if let Some(t) = lock(&sb.timer).take() {
            t.abort();
        }
    }

    /// Takes the operation lock or answers 409 with what it is doing.
    fn try_op<'a>(
        &self,
        sb: &'a Sandbox,
    ) -> Result<tokio::sync::MutexGuard<'a, Option<DriverState>>, HostError> {
        sb.op.try_lock().map_err(|_| HostError::Busy {
            id: sb.id.clone(),
            state: sb.state().as_str(),
        })
    }

    fn require(sb: &Sandbox, allowed: &[SandboxState], op: &'static str) -> Result<(), HostError> {
        let s = sb.state();
        if allowed.contains(&s) {
            Ok(())
        } else {
            Err(HostError::WrongState {
                id: sb.id.clone(),
                state: s.as_str(),
                op,
            })
        }
    }

    /// `POST /sandboxes/{id}/pause`: freezes a running sandbox (its
    /// wall-time clock stops).
    pub async fn pause(self: &Arc<Self>, id: &str) -> Result<SandboxView, HostError> {
        self.freeze_transition(id, true).await
    }

    /// `POST /sandboxes/{id}/resume`: thaws a paused sandbox (its
    /// wall-time clock starts again).
    pub async fn resume(self: &Arc<Self>, id: &str) -> Result<SandboxView, HostError> {
        self.freeze_transition(id, false).await
    }

    /// Pause (`freeze`) or resume: the same checks, timing and failure
    /// handling (a half-frozen sandbox is worse than a gone one, so a
    /// failure destroys it).
    async fn freeze_transition(
        self: &Arc<Self>,
        id: &str,
        freeze: bool,
    ) -> Result<SandboxView, HostError> {
        let (from, during, to, op, timing) = if freeze {
            (
                SandboxState::Running,
                SandboxState::Pausing,
                SandboxState::Paused,
                "pause",
                "pause_ms",
            )
        } else {
            (
                SandboxState::Paused,
                SandboxState::Resuming,
                SandboxState::Running,
                "resume",
                "resume_ms",
            )
        };
        let sb = self.get(id)?;
        let guard = self.try_op(&sb)?;
        Self::require(&sb, &[from], if freeze { "pause it" } else { "resume it" })?;
        let Some(state) = guard.as_ref() else {
            return Err(HostError::Internal(format!(
                "sandbox {id} has no driver state"
            )));
        };
        sb.set_state(during);
        let t0 = Instant::now();
        let done = if freeze {
            self.driver.pause(state).await
        } else {
            self.driver.resume(state).await
        };
        if let Err(e) = done {
            drop(guard);
            self.destroy_in_background(&sb, ExitReason::Failed);
            return Err(driver_failed(e));
        }
        let took = t0.elapsed();
        {
            let mut s = lock(&sb.status);
            s.state = to;
            s.timings = BTreeMap::from([(timing.to_string(), ms(took))]);
        }
        drop(guard);
        if freeze {
            Self::disarm_timer(&sb);
        } else {
            self.arm_timer(&sb);
        }
        self.metrics
            .op_duration
            .with_label_values(&[op])
            .observe(took.as_secs_f64());
        Ok(self.view_of(&sb))
    }

    /// `POST /sandboxes/{id}/snapshot`: writes the sandbox to a new user
    /// snapshot; the sandbox is gone afterwards (memory freed).
    pub async fn snapshot(self: &Arc<Self>, id: &str) -> Result<SnapshotMeta, HostError> {
        let sb = self.get(id)?;
        let snap_id = new_id("snap");
        let dir = snapshots::user_dir(&self.cfg.data_dir, &snap_id);
        let meta = self.snapshot_into(&sb, &dir, &snap_id).await?;
        Ok(meta)
    }

    /// Snapshots `sb` into `dir` (created here) with id `snap_id`.
    pub(crate) async fn snapshot_into(
        self: &Arc<Self>,
        sb: &Arc<Sandbox>,
        dir: &Path,
        snap_id: &str,
    ) -> Result<SnapshotMeta, HostError> {
        let mut guard = self.try_op(sb)?;
        Self::require(
            sb,
            &[SandboxState::Running, SandboxState::Paused],
            "snapshot it",
        )?;
        let Some(state) = guard.clone() else {
            return Err(HostError::Internal(format!(
                "sandbox {} has no driver state",
                sb.id
            )));
        };
        let was_paused = sb.state() == SandboxState::Paused;
        sb.set_state(SandboxState::Snapshotting);
        Self::disarm_timer(sb);
        let t0 = Instant::now();
        if was_paused {
            if let Err(e) = self.driver.resume(&state).await {
                drop(guard);
                self.destroy_in_background(sb, ExitReason::Failed);
                return Err(driver_failed(e));
            }
        }
        let prepared = self
            .envd_json(
                sb,
                http::Method::POST,
                "/snapshot/prepare",
                &json!({}),
                Duration::from_secs(30),
            )
            .await;
        match prepared {
            Ok((status, _)) if status.is_success() => {}
            Ok((status, body)) => {
                sb.set_state(SandboxState::Running);
                self.arm_timer(sb);
                return Err(HostError::Envd(format!(
                    "/snapshot/prepare answered {status}: {}",
                    String::from_utf8_lossy(&body)
                )));
            }
            Err(e) => {
                sb.set_state(SandboxState::Running);
                self.arm_timer(sb);
                return Err(e);
            }
        }
        // envd has closed its connections; with the socket gone it cannot
        // dial back in, so no connected host socket exists at checkpoint.
        sb.link.close();
        let t_prepare = t0.elapsed();
        if let Some(w) = lock(&sb.watcher).take() {
            w.abort();
        }
        let _ = std::fs::remove_dir_all(dir);
        if let Err(e) = std::fs::create_dir_all(dir) {
            drop(guard);
            self.destroy_in_background(sb, ExitReason::Failed);
            return Err(HostError::Internal(format!(
                "create {}: {e}",
                dir.display()
            )));
        }
        let result = self
            .driver
            .snapshot(&state, &dir.join(snapshots::IMAGE))
            .await;
        *guard = None;
        *lock(&sb.driver_state) = None;
        drop(guard);
        let info = match result {
            Ok(info) => info,
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                self.bury(sb, ExitReason::Failed);
                return Err(driver_failed(e));
            }
        };
        let runner_ready = lock(&sb.status).runner_ready;
        let init = sb.origin.clone();
        let meta = SnapshotMeta {
            snapshot_id: snap_id.to_string(),
            template: sb.template.clone(),
            template_hash: init.template_hash,
            key: init.key,
            driver: self.driver.name().to_string(),
            rootfs: init.rootfs,
            envd_dir: init.envd_dir,
            user: init.user,
            workdir: init.workdir,
            env: init.env,
            limits: sb.limits,
            runner_ready,
            source_sandbox: Some(sb.id.clone()),
            metadata: sb.metadata.clone(),
            size_bytes: info.size_bytes,
            checkpoint_ms: info.duration_ms,
            created_at: now_rfc3339(),
        };
        if let Err(e) = snapshots::store(dir, &meta) {
            let _ = std::fs::remove_dir_all(dir);
            self.bury(sb, ExitReason::Failed);
            return Err(e);
        }
        {
            let mut s = lock(&sb.status);
            s.timings = BTreeMap::from([
                ("prepare_ms".to_string(), ms(t_prepare)),
                ("checkpoint_ms".to_string(), info.duration_ms),
                ("total_ms".to_string(), ms(t0.elapsed())),
            ]);
        }
        self.metrics
            .op_duration
            .with_label_values(&["snapshot"])
            .observe(t0.elapsed().as_secs_f64());
        self.bury(sb, ExitReason::Snapshotted);
        Ok(meta)
    }

    /// `DELETE /sandboxes/{id}`: marks the sandbox destroying and removes it
    /// in the background.
    pub fn destroy(self: &Arc<Self>, id: &str) -> Result<SandboxView, HostError> {
        let sb = self.get(id)?;
        self.destroy_in_background(&sb, ExitReason::Destroyed);
        Ok(self.view_of(&sb))
    }

    /// Marks `sb` destroying (first reason wins) and removes it in a
    /// background task.
    pub(crate) fn destroy_in_background(self: &Arc<Self>, sb: &Arc<Sandbox>, reason: ExitReason) {
        {
            let mut s = lock(&sb.status);
            if matches!(s.state, SandboxState::Destroying | SandboxState::Destroyed) {
                return;
            }
            s.state = SandboxState::Destroying;
            s.exit_reason = Some(reason);
        }
        Self::disarm_timer(sb);
        let host = self.clone();
        let sb = sb.clone();
        tokio::spawn(async move {
            host.destroy_now(&sb, reason).await;
        });
    }

    /// Removes `sb` now (waits for an operation under way).
    async fn destroy_now(&self, sb: &Arc<Sandbox>, reason: ExitReason) {
        {
            let mut s = lock(&sb.status);
            if s.state == SandboxState::Destroyed {
                return;
            }
            s.state = SandboxState::Destroying;
            s.exit_reason.get_or_insert(reason);
        }
        Self::disarm_timer(sb);
        let t0 = Instant::now();
        let mut guard = sb.op.lock().await;
        sb.link.close();
        if let Some(w) = lock(&sb.watcher).take() {
            w.abort();
        }
        if let Some(state) = guard.take() {
            if let Err(e) = self.driver.destroy(&state).await {
                tracing::error!(sandbox_id = %sb.id, error = %e, "destroy failed; the next start of vmhost retries it");
            }
        }
        *lock(&sb.driver_state) = None;
        let _ = std::fs::remove_dir_all(self.sandbox_dir(&sb.id));
        drop(guard);
        self.metrics
            .op_duration
            .with_label_values(&["destroy"])
            .observe(t0.elapsed().as_secs_f64());
        let reason = lock(&sb.status).exit_reason.unwrap_or(reason);
        self.bury(sb, reason);
    }

    /// Moves `sb` from the live table to the remembered ones.
    fn bury(&self, sb: &Sandbox, reason: ExitReason) {
        {
            let mut s = lock(&sb.status);
            s.state = SandboxState::Destroyed;
            s.exit_reason.get_or_insert(reason);
        }
        let reason = lock(&sb.status).exit_reason.unwrap_or(reason);
        self.metrics
            .exits
            .with_label_values(&[reason.as_str()])
            .inc();
        let view = self.view_of(sb);
        let mut t = lock(&self.table);
        t.0.live.remove(&sb.id);
        t.0.gone.push_back((sb.id.clone(), view));
        while t.0.gone.len() > TOMBSTONES {
            t.0.gone.pop_front();
        }
    }

    /// Waits until sandbox `id` is destroyed (for tests and shutdown).
    pub async fn wait_destroyed(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<SandboxView, HostError> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.view(id)?;
            if v.state == SandboxState::Destroyed {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(HostError::Internal(format!(
                    "sandbox {id} still {} after {timeout:?}",
                    v.state.as_str()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Destroys every sandbox and waits (graceful shutdown).
    pub async fn shutdown(self: &Arc<Self>) {
        let live: Vec<Arc<Sandbox>> = lock(&self.table).0.live.values().cloned().collect();
        let mut tasks = Vec::new();
        for sb in live {
            let host = self.clone();
            tasks.push(tokio::spawn(async move {
                host.destroy_now(&sb, ExitReason::Destroyed).await;
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// A running sandbox for a forwarded request.
    pub fn running(&self, id: &str) -> Result<Arc<Sandbox>, HostError> {
        let sb = self.get(id)?;
        Self::require(&sb, &[SandboxState::Running], "take requests")?;
        Ok(sb)
    }

    /// Marks the warm runner of `sb` as taken; 409 if it was.
    pub fn take_runner(&self, sb: &Sandbox) -> Result<(), HostError> {
        let mut s = lock(&sb.status);
        if !s.runner_ready {
            return Err(HostError::RunnerSpent(sb.id.clone()));
        }
        s.runner_ready = false;
        Ok(())
    }

    /// The exit reason of `id` if it stopped within `wait` (used to tell
    /// why a stream broke).
    pub async fn exit_reason_within(&self, id: &str, wait: Duration) -> Option<ExitReason> {
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(v) = self.view(id) {
                if matches!(v.state, SandboxState::Destroying | SandboxState::Destroyed) {
                    return v.exit_reason;
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// PSS of the sandbox's host processes.
    pub fn pss_bytes(&self, id: &str) -> Result<u64, HostError> {
        let sb = self.get(id)?;
        let st = lock(&sb.driver_state).clone();
        match st {
            Some(s) => self.driver.pss_bytes(&s).map_err(driver_failed),
            None => Err(HostError::WrongState {
                id: id.to_string(),
                state: sb.state().as_str(),
                op: "measure it",
            }),
        }
    }

    /// The envd copy and its hash.
    pub fn envd(&self) -> (&Path, &str) {
        (&self.envd_dir, &self.envd_hash)
    }
}

/// What a snapshot records of where its sandbox came from.
#[derive(Debug, Clone, Default)]
pub(crate) struct SnapshotOrigin {
    pub template_hash: String,
    pub key: String,
    pub rootfs: PathBuf,
    pub envd_dir: PathBuf,
    pub user: Option<String>,
    pub workdir: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
}

/// What `/init` gives a sandbox.
#[derive(Debug, Clone, Default)]
pub(crate) struct InitArgs {
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<PathBuf>,
}

/// How to start one sandbox.
#[derive(Debug, Clone)]
pub(crate) struct StartArgs {
    pub template: String,
    pub snapshot_id: Option<String>,
    pub limits: Limits,
    pub metadata: BTreeMap<String, String>,
    pub boot: Boot,
    pub envd_dir: PathBuf,
    pub init: InitArgs,
    pub runner_ready: bool,
    pub origin: SnapshotOrigin,
}

impl Host {
    /// Gives access to the build lock (one template build at a time).
    pub(crate) fn builds(&self) -> &tokio::sync::Mutex<()> {
        &self.builds
    }
}

/// Copies the envd binary to `<data>/bin/<hash>/envd` (once per content):
/// sandboxes bind-mount that directory, so a snapshot keeps finding the
/// envd it was taken with even after vmhost is upgraded.
fn install_envd(binary: &Path, data_dir: &Path) -> Result<(PathBuf, String), HostError> {
    use sha2::Digest as _;
    let bytes = std::fs::read(binary).map_err(|e| {
        HostError::Internal(format!(
            "read the envd binary {}: {e} (set --envd)",
            binary.display()
        ))
    })?;
    let hash = hex::encode(&sha2::Sha256::digest(&bytes)[..8]);
    let dir = data_dir.join("bin").join(&hash);
    let target = dir.join("envd");
    if !target.is_file() {
        std::fs::create_dir_all(&dir)
            .map_err(|e| HostError::Internal(format!("create {}: {e}", dir.display())))?;
        let tmp = dir.join(format!("envd.tmp{}", std::process::id()));
        std::fs::write(&tmp, &bytes)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            })
            .and_then(|()| std::fs::rename(&tmp, &target))
            .map_err(|e| HostError::Internal(format!("install envd in {}: {e}", dir.display())))?;
    }
    Ok((dir, hash))
}

impl Host {
    /// Records whether a warm runner waits in `sb`.
    pub(crate) fn set_runner_ready(&self, sb: &Sandbox, ready: bool) {
        lock(&sb.status).runner_ready = ready;
    }
}
