//! A real vmhost for tests: the gVisor driver on runsc, a private data and
//! run directory and cgroup parent, the API served on a loopback port and
//! an HTTP client that speaks to it. Whatever a failed test leaves is
//! removed when the harness is dropped.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use vmhost::driver::gvisor::{GvisorConfig, GvisorDriver};
use vmhost::driver::{AnyDriver, Driver, Limits};
use vmhost::host::{Host, HostConfig};

/// Test timeout of one HTTP call (template builds can take minutes cold).
pub const T: Duration = Duration::from_secs(900);

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shared build cache (the test command sets THAW_TEST_CACHE_DIR).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("THAW_TEST_CACHE_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/thaw-test"), PathBuf::from)
}

/// This workspace's envd binary.
pub fn envd() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let envd = dir.join("envd");
    if !envd.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", "envd"])
            .status()
            .unwrap();
        assert!(status.success(), "building envd failed");
    }
    envd
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Settings of a test vmhost.
pub fn gvisor_config(cgroup_parent: &str) -> GvisorConfig {
    GvisorConfig {
        runsc: "runsc".into(),
        platform: "ptrace".into(),
        cgroup_parent: cgroup_parent.to_string(),
        cgroup_root: "/sys/fs/cgroup".into(),
    }
}

pub fn host_config(data: &Path, run: &Path) -> HostConfig {
    let mut build =
        template::builder::BuildConfig::new(&repo().join("runtimes"), &cache_dir(), data);
    if let Ok(m) = std::env::var("THAW_DEBIAN_MIRROR") {
        build.mirror = m;
    }
    HostConfig {
        data_dir: data.to_path_buf(),
        run_dir: run.to_path_buf(),
        envd_binary: envd(),
        default_limits: Limits::default(),
        max_sandboxes: 16,
        max_disk_bytes: 1 << 30,
        build,
    }
}

/// A vmhost serving on loopback.
pub struct TestHost {
    pub host: Arc<Host>,
    pub addr: SocketAddr,
    pub data: tempfile::TempDir,
    pub run: tempfile::TempDir,
    pub cgroup_parent: String,
    server: tokio::task::JoinHandle<()>,
}

impl TestHost {
    pub async fn start() -> TestHost {
        let data = tempfile::tempdir().unwrap();
        let run = tempfile::Builder::new()
            .prefix("vr")
            .tempdir_in("/tmp")
            .unwrap();
        let cgroup_parent = format!(
            "thaw-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let driver = AnyDriver::Gvisor(GvisorDriver::new(gvisor_config(&cgroup_parent)).unwrap());
        let host = Host::new(host_config(data.path(), run.path()), driver)
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = vmhost::api::router(host.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TestHost {
            host,
            addr,
            data,
            run,
            cgroup_parent,
            server,
        }
    }

    /// One request; the status and the whole body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> (StatusCode, Bytes) {
        raw(self.addr, method, path, body.into()).await
    }

    /// One JSON request; the status and the body as JSON (NDJSON bodies
    /// become an array of their lines).
    pub async fn call(&self, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
        let text = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let (status, bytes) = self.raw(method, path, text).await;
        (status, parse(&bytes))
    }

    /// Builds (and bakes) a template; returns the progress events.
    pub async fn build(&self, name: &str) -> Vec<Value> {
        let (status, events) = self
            .call(
                Method::POST,
                &format!("/templates/{name}/build"),
                Value::Null,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{events}");
        let events = events.as_array().cloned().unwrap_or_default();
        let last = events.last().cloned().unwrap_or(Value::Null);
        assert_eq!(last["type"], "result", "build of {name} ended with {last}");
        events
    }

    /// Creates a sandbox; its view.
    pub async fn create(&self, body: Value) -> Value {
        let (status, v) = self.call(Method::POST, "/sandboxes", body).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v
    }

    /// Hands `code` to the sandbox's warm runner.
    pub async fn run(&self, id: &str, body: Value) -> Job {
        let (status, v) = self
            .call(Method::POST, &format!("/sandboxes/{id}/run"), body)
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        Job::from_events(v.as_array().cloned().unwrap_or_default())
    }

    /// Runs a command to completion through envd's process API.
    pub async fn exec(&self, id: &str, cmd: &str, args: &[&str]) -> Job {
        let (status, v) = self
            .call(
                Method::POST,
                &format!("/sandboxes/{id}/processes"),
                json!({"cmd": cmd, "args": args}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        Job::from_events(v.as_array().cloned().unwrap_or_default())
    }

    /// Sandbox `id`'s view.
    pub async fn get(&self, id: &str) -> Value {
        let (status, v) = self
            .call(Method::GET, &format!("/sandboxes/{id}"), Value::Null)
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }

    /// Waits until sandbox `id` is destroyed; its view.
    pub async fn wait_destroyed(&self, id: &str) -> Value {
        let v = self
            .host
            .wait_destroyed(id, Duration::from_secs(60))
            .await
            .unwrap();
        serde_json::to_value(v).unwrap()
    }

    /// Destroys every sandbox and stops serving.
    pub async fn stop(self) {
        self.host.shutdown().await;
        self.server.abort();
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // A test that failed halfway leaves sandboxes: remove them as a
        // restarted vmhost would.
        remove_leftovers(&self.run.path().join("sandboxes"), &self.cgroup_parent);
    }
}

/// Removes every sandbox under `sandboxes` (processes, cgroups, files) as
/// a restarted vmhost does, then the cgroup parent.
pub fn remove_leftovers(sandboxes: &Path, cgroup_parent: &str) {
    let sandboxes = sandboxes.to_path_buf();
    let parent = cgroup_parent.to_string();
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        if let Ok(d) = GvisorDriver::new(gvisor_config(&parent)) {
            let _ = rt.block_on(d.cleanup_orphans(&sandboxes));
        }
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for c in rd.flatten() {
                let _ = std::fs::remove_dir(c.path().join(&parent));
            }
        }
    })
    .join();
}

pub async fn raw(addr: SocketAddr, method: Method, path: &str, body: Bytes) -> (StatusCode, Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "vmhost")
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap();
    let resp = tokio::time::timeout(T, sender.send_request(req))
        .await
        .expect("no answer in time")
        .unwrap();
    let status = resp.status();
    let bytes = tokio::time::timeout(T, resp.into_body().collect())
        .await
        .expect("body not finished in time")
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (status, bytes)
}

/// JSON, or NDJSON as an array of lines, or the text as a string.
pub fn parse(bytes: &[u8]) -> Value {
    if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
        return v;
    }
    let lines: Option<Vec<Value>> = bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).ok())
        .collect();
    lines.map_or_else(
        || Value::String(String::from_utf8_lossy(bytes).into_owned()),
        Value::Array,
    )
}

/// A finished job or process.
#[derive(Debug, Default)]
pub struct Job {
    pub out: String,
    pub err: String,
    pub code: Option<i64>,
    /// The code of a terminal `error` event.
    pub error: Option<String>,
    pub outputs: Vec<Value>,
}

impl Job {
    pub fn from_events(events: Vec<Value>) -> Job {
        let mut j = Job::default();
        let b64 = |v: &Value| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap_or(""))
                .unwrap_or_default()
        };
        let mut terminal = 0;
        for ev in &events {
            match ev["type"].as_str() {
                Some("stdout") => j.out.push_str(&String::from_utf8_lossy(&b64(&ev["data"]))),
                Some("stderr") => j.err.push_str(&String::from_utf8_lossy(&b64(&ev["data"]))),
                Some("output") => j.outputs.push(ev.clone()),
                Some("exit") => {
                    terminal += 1;
                    j.code = ev["code"].as_i64();
                }
                Some("error") => {
                    terminal += 1;
                    j.error = ev["error"]["code"].as_str().map(str::to_string);
                }
                _ => {}
            }
        }
        assert_eq!(terminal, 1, "exactly one terminal event: {events:?}");
        j
    }
}

/// runsc processes of the sandboxes under run directory `run`.
pub fn sandbox_processes(run: &Path) -> usize {
    vmhost::sys::procs::find_by_cmdline(&format!("--root={}/sandboxes/", run.display())).len()
}

/// Lines of this process's mount table.
pub fn mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count()
}

/// Distinct cgroups under `parent`, in any controller.
pub fn cgroups_under(parent: &str) -> usize {
    let mut names = std::collections::BTreeSet::new();
    for c in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        if let Ok(rd) = std::fs::read_dir(c.path().join(parent)) {
            names.extend(
                rd.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name()),
            );
        }
    }
    names.len()
}

/// Entries under `dir`, recursively.
pub fn files_under(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.path().is_dir() && !e.path().is_symlink() {
                1 + files_under(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (≤ 60 s) until the service at `addr` answers `GET /healthz`; a
/// connection that is refused or dropped while it starts is retried.
pub async fn wait_healthy(addr: SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if healthz(addr).await == Some(StatusCode::OK) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{addr} never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn healthz(addr: SocketAddr) -> Option<StatusCode> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/healthz")
        .header("host", "vmhost")
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .ok()?
        .ok()?;
    Some(resp.status())
}
