//! Sandboxes end to end, through vmhost as a library and its real HTTP API
//! (served on loopback inside this process, one kept-alive client
//! connection), each figure beside its baseline from the same run:
//! - a restore of the `python` template to envd-ready (`Host::create`:
//!   runsc restore, envd dial-in, `/init`);
//! - a frozen warm sandbox to its first answered job: `POST /resume` then
//!   `POST /run {"code":"print(1)"}` until the `exit` event is read; the
//!   resume alone; the same job on a running (never frozen) sandbox;
//!   against a cold `runsc do /usr/bin/python3 -c 'print(1)'` per job, and
//!   against the 1.3 ms floor of design.md (thaw + `print(1)` measured
//!   directly on a warm runner);
//! - PSS per frozen warm sandbox (N at once), beside the same sandboxes
//!   running idle;
//! - destroy: the request (`Host::destroy` returns at once) and the
//!   background work until `Host::wait_destroyed` returns;
//! - `python-data`: restore + `import numpy, pandas, matplotlib; print(1)`
//!   through the warm runner (imports done before the snapshot), against a
//!   cold `runsc do` on the template's root filesystem running the same.
//!
//! `cargo build --release -p bench --bin sandboxes &&
//! ./target/release/sandboxes [--reps 30] [--frozen 10] [--data-reps N]
//! [--data-budget-s 180]` (root; runsc; it runs `cargo build -p envd` with
//! its own profile first; template layers come from `$THAW_CACHE_DIR` or
//! /var/cache/thaw-test, built there if missing).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use bench::{Report, Row, Summary};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use vmhost::driver::gvisor::{GvisorConfig, GvisorDriver};
use vmhost::driver::{AnyDriver, Driver as _, Limits};
use vmhost::host::{CreateRequest, Host, HostConfig};

/// thaw + `print(1)` on a warm gVisor runner, measured directly (freezer
/// write, then the job): design.md, "Facts about the build and test
/// machines".
const FLOOR_MS: f64 = 1.3;
/// Pause between a sandbox coming up and freezing it, and between freezing
/// and thawing it: a frozen sandbox waits a while for its job in real use.
const SETTLE: Duration = Duration::from_millis(50);
/// How long a background destroy may take before the bench gives up.
const DESTROY_WAIT: Duration = Duration::from_secs(60);
/// The job of the python figures.
const PRINT1: &str = "print(1)";
/// The job of the python-data figures.
const IMPORTS: &str = "import numpy, pandas, matplotlib; print(1)";

/// Failed repetitions tolerated in one run (each is recorded in the report
/// and repeated); one more aborts the run.
const MAX_FAILURES: usize = 5;

/// Repetitions that failed: what failed and why, for the report.
#[derive(Debug, Default)]
struct Failures(Vec<String>);

impl Failures {
    /// Passes a success through; records a failure, removes every sandbox
    /// the failed repetition may have left (so the next one starts from the
    /// same state) and answers `None`, or gives up past [`MAX_FAILURES`].
    async fn check<T>(&mut self, host: &Arc<Host>, what: &str, r: Result<T>) -> Result<Option<T>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                let msg = format!("{what}: {e:#}");
                eprintln!("[sandboxes] FAILED (recorded, repeated): {msg}");
                self.0.push(msg);
                if self.0.len() > MAX_FAILURES {
                    bail!("more than {MAX_FAILURES} failed repetitions: {:?}", self.0);
                }
                for v in host.list() {
                    if host.destroy(&v.sandbox_id).is_ok() {
                        let _ = host.wait_destroyed(&v.sandbox_id, DESTROY_WAIT).await;
                    }
                }
                Ok(None)
            }
        }
    }
}

/// Flags.
#[derive(Debug, Clone)]
struct Args {
    reps: usize,
    frozen: usize,
    data_reps: Option<usize>,
    data_budget: Duration,
}

fn usage() -> &'static str {
    "usage: sandboxes [--reps N (30)] [--frozen N (10)] [--data-reps N (= reps)] [--data-budget-s S (180)]\n\
     --data-reps: repetitions of the python-data pair (restore+import, cold import);\n\
     the cold side stops once its runs add up to --data-budget-s seconds and it has 10 samples."
}

/// The flags; `None` after `--help`.
fn parse_args() -> Result<Option<Args>> {
    let mut a = Args {
        reps: 30,
        frozen: 10,
        data_reps: None,
        data_budget: Duration::from_secs(180),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut num = |name: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a value\n{}", usage()))?
                .parse::<usize>()
                .with_context(|| format!("{name}: not a number\n{}", usage()))
        };
        match flag.as_str() {
            "--reps" => a.reps = num("--reps")?,
            "--frozen" => a.frozen = num("--frozen")?,
            "--data-reps" => a.data_reps = Some(num("--data-reps")?),
            "--data-budget-s" => {
                a.data_budget = Duration::from_secs(u64::try_from(num("--data-budget-s")?)?);
            }
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(None);
            }
            other => bail!("unknown flag {other}\n{}", usage()),
        }
    }
    if a.reps == 0 || a.frozen == 0 || a.data_reps == Some(0) {
        bail!("counts must be at least 1\n{}", usage());
    }
    Ok(Some(a))
}

/// `/proc/loadavg` (the machines are shared: the load says how noisy a
/// run was).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cache_dir() -> PathBuf {
    std::env::var_os("THAW_CACHE_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/thaw-test"), PathBuf::from)
}

/// envd beside this binary, brought up to date with the same profile
/// first (`--bin sandboxes` alone does not build it, and a stale envd
/// would be baked into the templates).
fn envd_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this benchmark")?;
    let dir = exe.parent().context("the benchmark has no directory")?;
    let envd = dir.join("envd");
    let mut cmd = std::process::Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet", "-p", "envd"]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    eprintln!("[sandboxes] cargo build -p envd (up to date is a no-op)");
    let status = cmd
        .current_dir(repo())
        .status()
        .context("running cargo build -p envd")?;
    if !status.success() || !envd.exists() {
        bail!(
            "building envd failed; run `cargo build --release -p envd` (looked for {})",
            envd.display()
        );
    }
    Ok(envd)
}

fn summary(samples: &[Duration]) -> Result<Summary> {
    Summary::of(samples).context("no samples")
}

fn summary_ms(samples: &[f64]) -> Result<Summary> {
    Summary::of_ms(samples).context("no samples")
}

/// `p50 X, p90 Y` of a summary, for notes.
fn p50_p90(s: &Summary) -> String {
    format!("p50 {:.3} ms, p90 {:.3} ms (n={})", s.p50_ms, s.p90_ms, s.n)
}

/// One kept-alive HTTP/1.1 connection to the host API, as a gateway keeps.
struct Api {
    conn: SendRequest<Full<Bytes>>,
}

/// What a job's NDJSON stream said.
struct Job {
    /// From the caller's start instant to the `exit` event read.
    to_exit: Duration,
    /// From the caller's start instant to the first stdout bytes read.
    to_stdout: Duration,
    stdout: String,
    code: Option<i64>,
}

impl Api {
    async fn connect(addr: SocketAddr) -> Result<Api> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the host API at {addr}"))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let (conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(driver);
        Ok(Api { conn })
    }

    fn request(method: Method, path: &str, body: Option<&Value>) -> Result<Request<Full<Bytes>>> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "vmhost");
        let bytes = match body {
            Some(v) => {
                b = b.header("content-type", "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        Ok(b.body(Full::new(bytes))?)
    }

    /// A request with a JSON answer.
    async fn json(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value)> {
        self.conn.ready().await?;
        let resp = self
            .conn
            .send_request(Self::request(method, path, body)?)
            .await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{path} answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                )
            })?
        };
        Ok((status, v))
    }

    /// `POST /sandboxes` of `template`; the sandbox id and its view.
    async fn create(&mut self, template: &str) -> Result<(String, Value)> {
        let (status, v) = self
            .json(
                Method::POST,
                "/sandboxes",
                Some(&json!({"template": template})),
            )
            .await?;
        if status != StatusCode::CREATED {
            bail!("POST /sandboxes {template}: {status} {v}");
        }
        let id = v["sandbox_id"]
            .as_str()
            .context("no sandbox_id in the answer")?
            .to_string();
        Ok((id, v))
    }

    async fn resume(&mut self, id: &str) -> Result<()> {
        let (status, v) = self
            .json(Method::POST, &format!("/sandboxes/{id}/resume"), None)
            .await?;
        if status != StatusCode::OK {
            bail!("resume {id}: {status} {v}");
        }
        Ok(())
    }

    /// `POST /sandboxes/{id}/run` with `code`, read until the `exit` event
    /// (timed from `t0`), then to the end of the stream.
    async fn run(&mut self, id: &str, code: &str, t0: Instant) -> Result<Job> {
        self.conn.ready().await?;
        let resp = self
            .conn
            .send_request(Self::request(
                Method::POST,
                &format!("/sandboxes/{id}/run"),
                Some(&json!({ "code": code })),
            )?)
            .await?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let b = resp.into_body().collect().await?.to_bytes();
            bail!("run in {id}: {status} {}", String::from_utf8_lossy(&b));
        }
        let mut body = resp.into_body();
        let mut pending: Vec<u8> = Vec::new();
        let mut stdout = Vec::new();
        let mut to_exit = None;
        let mut to_stdout = None;
        let mut exit_code = None;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let ev: Value = serde_json::from_slice(&line).with_context(|| {
                    format!(
                        "a line of the job stream: {}",
                        String::from_utf8_lossy(&line)
                    )
                })?;
                match ev["type"].as_str() {
                    Some("exit") => {
                        to_exit.get_or_insert_with(|| t0.elapsed());
                        exit_code = ev["code"].as_i64();
                    }
                    Some("stdout") => {
                        to_stdout.get_or_insert_with(|| t0.elapsed());
                        let b64 = ev["data"].as_str().unwrap_or("");
                        stdout.extend(
                            base64::engine::general_purpose::STANDARD
                                .decode(b64)
                                .context("stdout data is not base64")?,
                        );
                    }
                    Some("error") => bail!("the job in {id} failed: {ev}"),
                    _ => {}
                }
            }
        }
        Ok(Job {
            to_exit: to_exit.with_context(|| format!("the job stream of {id} had no exit"))?,
            to_stdout: to_stdout.with_context(|| format!("the job in {id} printed nothing"))?,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            code: exit_code,
        })
    }
}

/// Checks a job printed `1` and exited 0.
fn check_job(job: &Job, what: &str) -> Result<()> {
    if job.code != Some(0) || job.stdout.trim() != "1" {
        bail!(
            "{what}: exit {:?}, stdout {:?} (expected 0 and \"1\")",
            job.code,
            job.stdout
        );
    }
    Ok(())
}

/// A cold `runsc do` of `argv`, on the host's root or on `rootfs`; wall
/// time to exit.
async fn runsc_do(state: &Path, rootfs: Option<&Path>, argv: &[&str]) -> Result<Duration> {
    let mut cmd = tokio::process::Command::new("runsc");
    cmd.arg(format!("--root={}", state.display())).args([
        "--network=none",
        "--platform=ptrace",
        "do",
    ]);
    if let Some(r) = rootfs {
        cmd.arg("-root").arg(r).args(["-cwd", "/"]);
    }
    cmd.args(argv)
        // The same environment every time, nothing of the caller's shell
        // (a pyenv on PATH, PYTHON* variables).
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("MPLBACKEND", "Agg")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let t = Instant::now();
    let out = cmd.output().await.context("running runsc do")?;
    let elapsed = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || stdout.trim() != "1" {
        bail!(
            "runsc do {argv:?}: {}, stdout {stdout:?}, stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(elapsed)
}

/// Builds (or finds cached) and bakes `name`, printing progress.
async fn build_template(
    host: &Arc<Host>,
    name: &str,
) -> Result<(vmhost::snapshots::SnapshotMeta, Duration)> {
    eprintln!("[sandboxes] building and baking template {name} (a build without cached layers takes minutes)");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Value>(256);
    let printer = tokio::spawn(async move {
        let mut output_lines = 0usize;
        while let Some(ev) = rx.recv().await {
            if ev["type"] == "output" {
                output_lines += 1;
                if output_lines % 200 == 0 {
                    eprintln!("[sandboxes]   … {output_lines} lines of build output");
                }
            } else {
                eprintln!("[sandboxes]   {ev}");
            }
        }
    });
    let t = Instant::now();
    let meta = vmhost::templates::build(host, name, false, tx)
        .await
        .with_context(|| format!("building template {name}"))?;
    let took = t.elapsed();
    let _ = printer.await;
    eprintln!(
        "[sandboxes] {name} ready in {:.1} s (snapshot {:.1} MiB)",
        took.as_secs_f64(),
        mib(meta.size_bytes)
    );
    Ok((meta, took))
}

fn mib(bytes: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)] // sizes far below 2^52.
    let b = bytes as f64;
    b / f64::from(1u32 << 20)
}

/// Every sample of the python loop.
#[derive(Default)]
struct PythonSamples {
    create_wall: Vec<Duration>,
    create_total_ms: Vec<f64>,
    create_driver_ms: Vec<f64>,
    create_envd_ms: Vec<f64>,
    create_init_ms: Vec<f64>,
    thaw_job: Vec<Duration>,
    thaw_stdout: Vec<Duration>,
    warm_stdout: Vec<Duration>,
    resume: Vec<Duration>,
    job_after_resume: Vec<Duration>,
    warm_job: Vec<Duration>,
    destroy_call: Vec<Duration>,
    destroy_done: Vec<Duration>,
    cold_print: Vec<Duration>,
}

fn timing(v: &vmhost::host::SandboxView, key: &str) -> Result<f64> {
    let t = v
        .timings
        .get(key)
        .with_context(|| format!("no timings.{key} in {:?}", v.timings))?;
    #[allow(clippy::cast_precision_loss)] // milliseconds, far below 2^52.
    Ok(*t as f64)
}

/// Destroys `id` and waits until it is gone; returns (the call, until gone).
async fn destroy(host: &Arc<Host>, id: &str) -> Result<(Duration, Duration)> {
    let t = Instant::now();
    host.destroy(id).with_context(|| format!("destroy {id}"))?;
    let call = t.elapsed();
    host.wait_destroyed(id, DESTROY_WAIT)
        .await
        .with_context(|| format!("waiting for {id} to be destroyed"))?;
    Ok((call, t.elapsed()))
}

/// One repetition of the python figures; `record` false for the warm-up.
async fn python_rep(
    host: &Arc<Host>,
    api: &mut Api,
    runsc_state: &Path,
    s: &mut PythonSamples,
    record: bool,
) -> Result<()> {
    // The cold baseline: one runsc do per job.
    let cold = runsc_do(runsc_state, None, &["/usr/bin/python3", "-c", PRINT1]).await?;

    // Restore to envd-ready.
    let t = Instant::now();
    let view = host
        .create(CreateRequest {
            template: Some("python".into()),
            ..CreateRequest::default()
        })
        .await
        .context("Host::create python")?;
    let create_wall = t.elapsed();
    let id = view.sandbox_id.clone();

    // Frozen, then thawed for one job.
    tokio::time::sleep(SETTLE).await;
    host.pause(&id).await.context("Host::pause")?;
    tokio::time::sleep(SETTLE).await;
    let t0 = Instant::now();
    api.resume(&id).await?;
    let resume = t0.elapsed();
    let job = api.run(&id, PRINT1, t0).await?;
    check_job(&job, "print(1) after a thaw")?;
    let (destroy_call, destroy_done) = destroy(host, &id).await?;

    // The same job on a sandbox never frozen.
    let (warm_id, _) = api.create("python").await?;
    tokio::time::sleep(SETTLE).await;
    let t0 = Instant::now();
    let warm = api.run(&warm_id, PRINT1, t0).await?;
    check_job(&warm, "print(1) on a running sandbox")?;
    destroy(host, &warm_id).await?;

    if record {
        s.cold_print.push(cold);
        s.create_wall.push(create_wall);
        s.create_total_ms.push(timing(&view, "total_ms")?);
        s.create_driver_ms.push(timing(&view, "driver_ms")?);
        s.create_envd_ms.push(timing(&view, "envd_connect_ms")?);
        s.create_init_ms.push(timing(&view, "init_ms")?);
        s.resume.push(resume);
        s.thaw_job.push(job.to_exit);
        s.job_after_resume.push(job.to_exit.saturating_sub(resume));
        s.warm_job.push(warm.to_exit);
        s.thaw_stdout.push(job.to_stdout);
        s.warm_stdout.push(warm.to_stdout);
        s.destroy_call.push(destroy_call);
        s.destroy_done.push(destroy_done);
    }
    Ok(())
}

/// `n` python sandboxes alive at once: PSS of each frozen, PSS of each
/// running idle (before the freeze) and the memory cgroup's charge of each
/// frozen, all in MiB; they are destroyed afterwards.
async fn pss(host: &Arc<Host>, n: usize) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let mut ids = Vec::with_capacity(n);
    let result = async {
        for _ in 0..n {
            let v = host
                .create(CreateRequest {
                    template: Some("python".into()),
                    ..CreateRequest::default()
                })
                .await
                .context("Host::create python")?;
            ids.push(v.sandbox_id);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut running = Vec::with_capacity(n);
        for id in &ids {
            running.push(mib(host
                .pss_bytes(id)
                .context("pss of a running sandbox")?));
        }
        for id in &ids {
            host.pause(id).await.context("Host::pause")?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut frozen = Vec::with_capacity(n);
        let mut charged = Vec::with_capacity(n);
        for id in &ids {
            frozen.push(mib(host
                .pss_bytes(id)
                .context("pss of a frozen sandbox")?));
            let usage = host
                .view(id)?
                .usage
                .context("no usage of a paused sandbox")?;
            charged.push(mib(usage.memory_bytes));
        }
        Ok::<_, anyhow::Error>((frozen, running, charged))
    }
    .await;
    for id in &ids {
        destroy(host, id).await?;
    }
    result
}

/// Restores per second with `parallel` creates in flight (`total` in all):
/// the rate one host's refill can sustain. The sandboxes are destroyed
/// afterwards, outside the timing.
async fn restore_throughput(host: &Arc<Host>, parallel: usize, total: usize) -> Result<f64> {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let host = host.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < total {
                let v = host
                    .create(CreateRequest {
                        template: Some("python".into()),
                        ..CreateRequest::default()
                    })
                    .await
                    .context("Host::create python")?;
                ids.push(v.sandbox_id);
            }
            Ok::<_, anyhow::Error>(ids)
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.context("restore task")??);
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    for id in &ids {
        destroy(host, id).await?;
    }
    Ok(rate)
}

/// The python-data pair: restore + imports through the warm runner, and
/// (within the budget) the cold imports.
struct DataSamples {
    restore_job: Vec<Duration>,
    restore_stdout: Vec<Duration>,
    restore_create: Vec<Duration>,
    restore_run: Vec<Duration>,
    cold: Vec<Duration>,
    cold_stopped_by_budget: bool,
}

/// One restore + imports: (to the exit, to the output, the create alone).
async fn data_rep(api: &mut Api, host: &Arc<Host>) -> Result<(Duration, Duration, Duration)> {
    let t0 = Instant::now();
    let (id, _) = api.create("python-data").await?;
    let created = t0.elapsed();
    let job = api.run(&id, IMPORTS, t0).await?;
    check_job(&job, "imports in a python-data restore")?;
    destroy(host, &id).await?;
    Ok((job.to_exit, job.to_stdout, created))
}

async fn python_data(
    api: &mut Api,
    host: &Arc<Host>,
    runsc_state: &Path,
    rootfs: &Path,
    reps: usize,
    budget: Duration,
    failures: &mut Failures,
) -> Result<DataSamples> {
    let cold_job = ["/usr/bin/python3", "-c", IMPORTS];
    // Warm-up (page cache of the image and of the root filesystem).
    while failures
        .check(
            host,
            "python-data warm-up restore",
            data_rep(api, host).await,
        )
        .await?
        .is_none()
    {}
    runsc_do(runsc_state, Some(rootfs), &cold_job).await?;
    let mut s = DataSamples {
        restore_job: Vec::new(),
        restore_stdout: Vec::new(),
        restore_create: Vec::new(),
        restore_run: Vec::new(),
        cold: Vec::new(),
        cold_stopped_by_budget: false,
    };
    // Only the cold runs count against the budget.
    let mut cold_spent = Duration::ZERO;
    let mut i = 0;
    while i < reps {
        let Some((job, printed, created)) = failures
            .check(
                host,
                "python-data restore + imports",
                data_rep(api, host).await,
            )
            .await?
        else {
            continue;
        };
        i += 1;
        s.restore_job.push(job);
        s.restore_stdout.push(printed);
        s.restore_create.push(created);
        s.restore_run.push(job.saturating_sub(created));
        if s.cold.len() >= 10 && cold_spent > budget {
            s.cold_stopped_by_budget = true;
        } else {
            let cold = runsc_do(runsc_state, Some(rootfs), &cold_job).await?;
            cold_spent += cold;
            s.cold.push(cold);
        }
        if i % 5 == 0 {
            eprintln!(
                "[sandboxes] python-data {}/{reps} ({} cold)",
                i,
                s.cold.len()
            );
        }
    }
    Ok(s)
}

#[tokio::main]
async fn main() -> Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let data = tempfile::tempdir().context("a temporary data directory")?;
    let run = tempfile::tempdir().context("a temporary run directory")?;
    let runsc_state = tempfile::tempdir().context("a runsc state directory")?;
    let cache = cache_dir();
    let cgroup_parent = format!("thaw-bench-{}", std::process::id());
    let cfg = HostConfig {
        data_dir: data.path().to_path_buf(),
        run_dir: run.path().to_path_buf(),
        envd_binary: envd_binary()?,
        default_limits: Limits::default(),
        max_sandboxes: 64,
        max_disk_bytes: 4 << 30,
        build: template::builder::BuildConfig::new(&repo().join("runtimes"), &cache, data.path()),
    };
    let driver = GvisorDriver::new(GvisorConfig {
        runsc: "runsc".into(),
        platform: "ptrace".into(),
        cgroup_parent: cgroup_parent.clone(),
        cgroup_root: "/sys/fs/cgroup".into(),
    })
    .context("the gvisor driver (is runsc installed?)")?;
    let host = Host::new(cfg, AnyDriver::Gvisor(driver))
        .await
        .context("starting the vmhost core")?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the host API on loopback")?;
    let addr = listener.local_addr()?;
    // As `vmhost serve` does.
    let app = vmhost::api::router(host.clone());
    let server = if std::env::var_os("NODELAY_EXPERIMENT").is_some() {
        use axum::serve::ListenerExt as _;
        let l = listener.tap_io(|s| {
            let _ = s.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(l, app).await })
    } else {
        tokio::spawn(async move { axum::serve(listener, app).await })
    };

    // Interrupted, it still removes every sandbox it made.
    let result = tokio::select! {
        r = measure(&host, addr, &args, runsc_state.path()) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };

    host.shutdown().await;
    server.abort();
    let _ = vmhost::sys::cgroup::Cgroup::new("/sys/fs/cgroup", cgroup_parent).remove();
    let mut report = result?;
    report.finish()?;
    Ok(())
}

async fn measure(
    host: &Arc<Host>,
    addr: SocketAddr,
    args: &Args,
    runsc_state: &Path,
) -> Result<Report> {
    let load_before = loadavg();
    let (py_meta, py_build) = build_template(host, "python").await?;
    let (data_meta, data_build) = build_template(host, "python-data").await?;
    let mut api = Api::connect(addr).await?;

    eprintln!("[sandboxes] python: {} repetitions (+1 warm-up)", args.reps);
    let mut py = PythonSamples::default();
    let mut failures = Failures::default();
    let mut done = 0;
    // Repetition 0 is the warm-up.
    while done <= args.reps {
        let r = python_rep(host, &mut api, runsc_state, &mut py, done > 0).await;
        if failures
            .check(host, "python repetition", r)
            .await?
            .is_some()
        {
            if done > 0 && done % 10 == 0 {
                eprintln!("[sandboxes] python {done}/{}", args.reps);
            }
            done += 1;
        }
    }

    eprintln!("[sandboxes] PSS of {} frozen python sandboxes", args.frozen);
    let (pss_frozen, pss_running, charged) = pss(host, args.frozen).await?;

    eprintln!("[sandboxes] restores per second, 1, 2 and 4 at a time");
    let mut throughput = Vec::new();
    for parallel in [1usize, 2, 4] {
        throughput.push((parallel, restore_throughput(host, parallel, 12).await?));
    }

    let data_reps = args.data_reps.unwrap_or(args.reps);
    eprintln!(
        "[sandboxes] python-data: {data_reps} repetitions (+1 warm-up); cold side stops after {} s of cold runs once it has 10",
        args.data_budget.as_secs()
    );
    let pd = python_data(
        &mut api,
        host,
        runsc_state,
        &data_meta.rootfs,
        data_reps,
        args.data_budget,
        &mut failures,
    )
    .await?;

    let load_after = loadavg();

    // Summaries.
    let create_wall = summary(&py.create_wall)?;
    let create_total = summary_ms(&py.create_total_ms)?;
    let create_driver = summary_ms(&py.create_driver_ms)?;
    let create_envd = summary_ms(&py.create_envd_ms)?;
    let create_init = summary_ms(&py.create_init_ms)?;
    let thaw_job = summary(&py.thaw_job)?;
    let thaw_stdout = summary(&py.thaw_stdout)?;
    let resume = summary(&py.resume)?;
    let job_after_resume = summary(&py.job_after_resume)?;
    let warm_job = summary(&py.warm_job)?;
    let warm_stdout = summary(&py.warm_stdout)?;
    let destroy_call = summary(&py.destroy_call)?;
    let destroy_done = summary(&py.destroy_done)?;
    let cold_print = summary(&py.cold_print)?;
    let pss_f = summary_ms(&pss_frozen)?;
    let pss_r = summary_ms(&pss_running)?;
    let charged_s = summary_ms(&charged)?;
    let data_job = summary(&pd.restore_job)?;
    let data_stdout = summary(&pd.restore_stdout)?;
    let data_create = summary(&pd.restore_create)?;
    let data_run = summary(&pd.restore_run)?;
    let data_cold = summary(&pd.cold)?;

    let speedup_cold = cold_print.p50_ms / thaw_job.p50_ms;
    let vs_floor = thaw_job.p50_ms / FLOOR_MS;
    let stdout_vs_floor = thaw_stdout.p50_ms / FLOOR_MS;
    let speedup_data = data_cold.p50_ms / data_job.p50_ms;

    let mut report = Report::new(
        "sandboxes",
        "vmhost sandboxes through the real HTTP API (loopback, one kept-alive connection): template restore to envd-ready, freezer thaw to first job answered, PSS per frozen sandbox, destroy, python-data restore+imports; baselines cold runsc do in the same run",
    );
    report.parameters(json!({
        "reps": args.reps,
        "warmup_reps": 1,
        "frozen_sandboxes": args.frozen,
        "python_data_reps": pd.restore_job.len(),
        "python_data_cold_reps": pd.cold.len(),
        "python_data_cold_budget_s": args.data_budget.as_secs(),
        "python_data_cold_stopped_by_budget": pd.cold_stopped_by_budget,
        "settle_ms": u64::try_from(SETTLE.as_millis()).unwrap_or(u64::MAX),
        "floor_ms": FLOOR_MS,
        "floor_source": "design.md: thaw + print(1) on a warm gVisor runner, freezer written directly",
        "driver": host.driver().describe(),
        "platform": "ptrace",
        "transport": "HTTP/1.1 over loopback TCP to vmhost::api::router served by axum::serve (as vmhost serve), client TCP_NODELAY, keep-alive",
        "job_end": "a job is timed to its NDJSON exit event (the runner process exiting: python's finalisation, the exit in gVisor, envd's reap); 'output' figures stop at the first stdout event",
        "cold_print1": "runsc --root=<tmp> --network=none --platform=ptrace do /usr/bin/python3 -c 'print(1)' (host root filesystem)",
        "cold_imports": format!("runsc --root=<tmp> --network=none --platform=ptrace do -root <python-data rootfs> -cwd / /usr/bin/python3 -c '{IMPORTS}'"),
        "python_data_rootfs": data_meta.rootfs,
        "cache_dir": cache_dir(),
        "template_setup_s": {"python": py_build.as_secs_f64(), "python-data": data_build.as_secs_f64()},
        "snapshot_bytes": {"python": py_meta.size_bytes, "python-data": data_meta.size_bytes},
        "destroy_poll_ms": 5,
        "failed_repetitions": failures.0.clone(),
        "loadavg": {"before": load_before, "after": load_after},
        "pss_mib_each": {"running_idle": pss_running, "frozen": pss_frozen, "cgroup_charge_frozen": charged},
    }));
    report
        .row(
            Row::new(
                "python: restore to envd-ready (Host::create, wall)",
                "ms p50",
                create_wall.p50_ms,
            )
            .baseline("cold runsc do print(1)", cold_print.p50_ms)
            .summaries(Some(create_wall.clone()), Some(cold_print.clone())),
        )
        .row(
            Row::new(
                "python: restore, vmhost timings.total_ms",
                "ms p50",
                create_total.p50_ms,
            )
            .summaries(Some(create_total.clone()), None),
        )
        .row(
            Row::new(
                "thaw + print(1) to exit event (HTTP resume + run)",
                "ms p50",
                thaw_job.p50_ms,
            )
            .baseline("cold runsc do /usr/bin/python3 print(1)", cold_print.p50_ms)
            .goal(
                format!("cold >= 50x warm (measured {speedup_cold:.1}x)"),
                speedup_cold >= 50.0,
            )
            .summaries(Some(thaw_job.clone()), Some(cold_print.clone())),
        )
        .row(
            Row::new(
                "thaw + print(1) to exit event, against the floor",
                "ms p50",
                thaw_job.p50_ms,
            )
            .baseline("floor, design.md", FLOOR_MS)
            .goal(
                format!("<= 2x the 1.3 ms floor (measured {vs_floor:.1}x)"),
                vs_floor <= 2.0,
            )
            .summaries(Some(thaw_job.clone()), None),
        )
        .row(
            Row::new(
                "thaw + print(1) to its output read",
                "ms p50",
                thaw_stdout.p50_ms,
            )
            .baseline("floor, design.md", FLOOR_MS)
            .goal(
                format!("<= 2x the 1.3 ms floor (measured {stdout_vs_floor:.1}x)"),
                stdout_vs_floor <= 2.0,
            )
            .summaries(Some(thaw_stdout.clone()), None),
        )
        .row(
            Row::new("resume alone (HTTP POST /resume)", "ms p50", resume.p50_ms)
                .summaries(Some(resume.clone()), None),
        )
        .row(
            Row::new(
                "print(1) after the resume, to exit event",
                "ms p50",
                job_after_resume.p50_ms,
            )
            .baseline("same on a never-frozen sandbox", warm_job.p50_ms)
            .summaries(Some(job_after_resume.clone()), Some(warm_job.clone())),
        )
        .row(
            Row::new(
                "print(1) on a never-frozen sandbox, to its output",
                "ms p50",
                warm_stdout.p50_ms,
            )
            .summaries(Some(warm_stdout.clone()), None),
        )
        .row(
            Row::new(
                "PSS per frozen warm python sandbox",
                "MiB p50",
                pss_f.p50_ms,
            )
            .baseline("same sandboxes running idle", pss_r.p50_ms)
            .summaries(Some(pss_f.clone()), Some(pss_r.clone())),
        )
        .row(
            Row::new(
                "destroy: Host::destroy returns",
                "ms p50",
                destroy_call.p50_ms,
            )
            .summaries(Some(destroy_call.clone()), None),
        )
        .row(
            Row::new(
                "destroy: until wait_destroyed returns",
                "ms p50",
                destroy_done.p50_ms,
            )
            .summaries(Some(destroy_done.clone()), None),
        )
        .row(
            Row::new(
                "python-data: restore + imports + print(1), to exit event",
                "ms p50",
                data_job.p50_ms,
            )
            .baseline("cold runsc do on its rootfs, same code", data_cold.p50_ms)
            .goal(
                format!("cold >= 10x restore+import (measured {speedup_data:.1}x)"),
                speedup_data >= 10.0,
            )
            .summaries(Some(data_job.clone()), Some(data_cold.clone())),
        )
        .row(
            Row::new(
                "python-data: restore + imports + print(1), to its output",
                "ms p50",
                data_stdout.p50_ms,
            )
            .baseline("cold runsc do on its rootfs, same code", data_cold.p50_ms)
            .summaries(Some(data_stdout.clone()), Some(data_cold.clone())),
        )
        .row(
            Row::new(
                "python-data: restore alone (HTTP create)",
                "ms p50",
                data_create.p50_ms,
            )
            .summaries(Some(data_create.clone()), None),
        )
        .row(
            Row::new(
                "python-data: the job after the restore, to exit event",
                "ms p50",
                data_run.p50_ms,
            )
            .summaries(Some(data_run.clone()), None),
        );
    for (parallel, per_s) in &throughput {
        report.row(Row::new(
            format!("python restores per second, {parallel} at a time (12 restores; what one host's refill sustains)"),
            "restores/s",
            *per_s,
        ));
    }
    report
        .note(format!("restore wall {}; timings.total_ms {}; of which driver_ms {}, envd_connect_ms {}, init_ms {} (vmhost's own, whole ms)",
            p50_p90(&create_wall), p50_p90(&create_total), p50_p90(&create_driver), p50_p90(&create_envd), p50_p90(&create_init)))
        .note(format!("thaw + print(1): to exit {}, to output {}; resume {}; job after resume {}; never-frozen job: to exit {}, to output {}",
            p50_p90(&thaw_job), p50_p90(&thaw_stdout), p50_p90(&resume), p50_p90(&job_after_resume), p50_p90(&warm_job), p50_p90(&warm_stdout)))
        .note(format!("cold runsc do print(1) {}", p50_p90(&cold_print)))
        .note(format!(
            "PSS of {} sandboxes alive at once (shared pages split between them): frozen p50 {:.1} MiB, p90 {:.1} MiB; running idle p50 {:.1} MiB; memory cgroup charge while frozen p50 {:.1} MiB",
            args.frozen, pss_f.p50_ms, pss_f.p90_ms, pss_r.p50_ms, charged_s.p50_ms))
        .note(format!("destroy call {}; until gone {} (wait_destroyed polls every 5 ms)",
            p50_p90(&destroy_call), p50_p90(&destroy_done)))
        .note(format!("python-data restore+imports: to exit {}, to output {}; create {}; cold imports {}{}",
            p50_p90(&data_job), p50_p90(&data_stdout), p50_p90(&data_create), p50_p90(&data_cold),
            if pd.cold_stopped_by_budget { " (cold side stopped by the time budget)" } else { "" }))
        .note("a job's exit event comes when the runner process has exited (python's finalisation and the exit inside gVisor, then envd's reap); its output comes before")
        .note("summaries of MiB rows are in MiB although their fields are named *_ms");
    report.note(format!(
        "load average before {load_before}, after {load_after} (2 cores, shared machine)"
    ));
    if failures.0.is_empty() {
        report.note("no repetition failed");
    } else {
        report.note(format!(
            "{} repetition(s) failed and were repeated (parameters.failed_repetitions): {}",
            failures.0.len(),
            failures.0.join(" | ")
        ));
    }
    Ok(report)
}
