//! The four runtimes, built from their recipes for real (debootstrap, steps
//! in runsc) and then run: each image boots in a runsc sandbox with envd
//! dialing the test over a host Unix socket, its START process (the warm
//! runner) is started as the template says, and jobs go through `POST /run`.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use template::builder::{build, BuildConfig, BuildEvent, Template};
use template::recipe::Command as RecipeCommand;

const T: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The shared build cache: the test command sets THAW_TEST_CACHE_DIR so
/// bases and layers survive between runs.
fn cache_dir() -> PathBuf {
    std::env::var_os("THAW_TEST_CACHE_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/thaw-test"), PathBuf::from)
}

fn config(data: &Path) -> BuildConfig {
    let mut cfg = BuildConfig::new(&repo().join("runtimes"), &cache_dir(), data);
    if let Ok(m) = std::env::var("THAW_DEBIAN_MIRROR") {
        cfg.mirror = m;
    }
    cfg
}

/// The envd binary of this workspace (built by `cargo test --workspace`).
fn envd() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let envd = dir.join("envd");
    if !envd.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "envd"])
            .status()
            .unwrap();
        assert!(status.success(), "building envd failed");
    }
    envd
}

fn build_quiet(name: &str, data: &Path) -> (Template, Vec<BuildEvent>) {
    let mut events = Vec::new();
    let t = build(name, &config(data), &mut |e| events.push(e.clone()))
        .unwrap_or_else(|e| panic!("building {name}: {e}"));
    (t, events)
}

/// A runsc sandbox of a built template, envd dialing the test.
struct Sandbox {
    child: Child,
    id: String,
    state: PathBuf,
    _dir: tempfile::TempDir,
    listener: tokio::net::UnixListener,
}

impl Sandbox {
    fn start(t: &Template) -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        std::fs::create_dir(&host).unwrap();
        let listener = tokio::net::UnixListener::bind(host.join("host.sock")).unwrap();
        let envd = envd();
        let bundle = dir.path().join("bundle");
        std::fs::create_dir(&bundle).unwrap();
        let config = json!({
            "ociVersion": "1.0.0",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": ["/opt/thaw/bin/envd", "--dial", "/thaw-host/host.sock", "--connections", "1",
                         "--run-dir", "/run/thaw", "--drop-caches", "false"],
                "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "RUST_LOG=envd=warn"],
                "cwd": "/",
                "capabilities": {
                    "bounding": ["CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL"],
                    "effective": ["CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL"],
                    "permitted": ["CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL"],
                },
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 65536, "soft": 65536}],
            },
            "root": {"path": t.rootfs, "readonly": true},
            "hostname": "thaw-test",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]},
                {"destination": "/opt/thaw/bin", "type": "bind", "source": envd.parent().unwrap(), "options": ["rbind", "ro"]},
                {"destination": "/thaw-host", "type": "bind", "source": host, "options": ["rbind", "rw"]},
            ],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]},
        });
        std::fs::write(bundle.join("config.json"), config.to_string()).unwrap();
        let state = dir.path().join("state");
        let id = format!("thaw-test-{}-{}", t.name, std::process::id());
        let child = Command::new("runsc")
            .arg(format!("--root={}", state.display()))
            .args([
                "--platform=ptrace",
                "--network=none",
                "--host-uds=open",
                "--overlay2=root:memory",
                "--ignore-cgroups",
            ])
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Sandbox {
            child,
            id,
            state,
            _dir: dir,
            listener,
        }
    }

    /// Accepts envd's connection and speaks HTTP/1.1 on it.
    async fn client(&self) -> SendRequest<Full<Bytes>> {
        let (stream, _) = tokio::time::timeout(T, self.listener.accept())
            .await
            .expect("envd never dialed")
            .unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Command::new("runsc")
            .arg(format!("--root={}", self.state.display()))
            .args(["kill", &self.id, "KILL"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("runsc")
            .arg(format!("--root={}", self.state.display()))
            .args(["delete", "-force", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

async fn call(
    c: &mut SendRequest<Full<Bytes>>,
    method: Method,
    path: &str,
    body: Value,
) -> (StatusCode, Bytes) {
    c.ready().await.unwrap();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "envd")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = tokio::time::timeout(T, c.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status();
    let bytes = tokio::time::timeout(T, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (status, bytes)
}

/// A job's result: stdout, stderr, exit code, rich outputs.
#[derive(Debug)]
struct Job {
    out: String,
    err: String,
    code: Option<i64>,
    outputs: Vec<Value>,
}

fn b64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

/// Starts `count` warm runners as the template's START says (its user,
/// env and workdir), each on its own socket, and waits until they listen.
async fn start_runners(c: &mut SendRequest<Full<Bytes>>, t: &Template, count: usize) {
    let argv = match t.summary.start.clone().expect("START") {
        RecipeCommand::Exec(v) => v,
        RecipeCommand::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s],
    };
    for i in 0..count {
        let mut env = serde_json::to_value(&t.summary.env).unwrap();
        env["THAW_RUNNER_SOCKET"] = json!(format!("/tmp/r{i}.sock"));
        // Every runner starts from the same generator state, as every
        // restore of one snapshot does; jobs must still differ.
        env["THAW_RUNNER_SEED_AT_IMPORT"] = json!("0");
        // `envd exec-runner` takes its socket as a flag too.
        let (status, body) = call(
            c,
            Method::POST,
            "/processes",
            json!({"cmd": argv[0], "args": argv[1..], "env": env, "user": t.summary.user, "cwd": t.summary.workdir,
                   "background": true, "tag": format!("r{i}")}),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    let deadline = Instant::now() + T;
    for i in 0..count {
        loop {
            let (status, _) = call(
                c,
                Method::POST,
                "/files/stat",
                json!({"path": format!("/tmp/r{i}.sock")}),
            )
            .await;
            if status == StatusCode::OK {
                break;
            }
            assert!(Instant::now() < deadline, "runner {i} never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn job(c: &mut SendRequest<Full<Bytes>>, i: usize, body: Value) -> Job {
    let mut body = body;
    body["runner"] = json!(format!("r{i}"));
    body["socket"] = json!(format!("/tmp/r{i}.sock"));
    let (status, bytes) = call(c, Method::POST, "/run", body).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let mut j = Job {
        out: String::new(),
        err: String::new(),
        code: None,
        outputs: Vec::new(),
    };
    let mut exits = 0;
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let ev: Value = serde_json::from_slice(line).unwrap();
        match ev["type"].as_str() {
            Some("stdout") => j.out.push_str(&String::from_utf8_lossy(&b64(&ev["data"]))),
            Some("stderr") => j.err.push_str(&String::from_utf8_lossy(&b64(&ev["data"]))),
            Some("output") => j.outputs.push(ev),
            Some("exit") => {
                exits += 1;
                j.code = ev["code"].as_i64();
            }
            _ => {}
        }
    }
    assert_eq!(exits, 1, "one exit per job");
    j
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_builds_caches_and_runs_jobs_like_python3_dash_c() {
    let data = tempfile::tempdir().unwrap();
    let (t, _) = build_quiet("python", data.path());
    assert!(t.rootfs.join("usr/bin/python3").exists());
    assert!(t.rootfs.join("opt/thaw/runner.py").exists());
    assert!(data.path().join("templates/python/template.json").exists());
    // Unchanged recipe: from the cache, fast.
    let started = Instant::now();
    let (again, events) = build_quiet("python", data.path());
    assert_eq!(again, t);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, BuildEvent::Cached { .. })),
        "{events:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cached build took {:?}",
        started.elapsed()
    );

    let sb = Sandbox::start(&t);
    let mut c = sb.client().await;
    start_runners(&mut c, &t, 7).await;
    let j = job(&mut c, 0, json!({"code": "print(1)"})).await;
    assert_eq!((j.out.as_str(), j.code), ("1\n", Some(0)));
    let j = job(
        &mut c,
        1,
        json!({"code": "import sys; print(sys.stdin.read().upper(), end='')", "stdin": "aGVsbG8K"}),
    )
    .await;
    assert_eq!(j.out, "HELLO\n");
    let j = job(
        &mut c,
        2,
        json!({"code": "import sys; print(sys.argv)", "args": ["a", "b"]}),
    )
    .await;
    assert_eq!(j.out, "['-c', 'a', 'b']\n");
    let j = job(&mut c, 3, json!({"code": "import sys; sys.exit(3)"})).await;
    assert_eq!(j.code, Some(3));
    let j = job(&mut c, 4, json!({"code": "1/0"})).await;
    assert_eq!(j.code, Some(1));
    assert!(j.err.contains("ZeroDivisionError"), "{}", j.err);
    let started = Instant::now();
    let j = job(
        &mut c,
        5,
        json!({"code": "import subprocess; subprocess.Popen(['sleep', '30']); print('parent')"}),
    )
    .await;
    assert_eq!((j.out.as_str(), j.code), ("parent\n", Some(0)));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited for the child"
    );
    // USER, HOME, ENV and WORKDIR of the recipe reach the job.
    let j = job(&mut c, 6, json!({"code": "import os, getpass; print(getpass.getuser(), os.environ['HOME'], os.environ['LANG'], os.getcwd())"})).await;
    assert_eq!(j.out, "sandbox /home/sandbox C.UTF-8 /home/sandbox\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_bash_build_and_run_jobs() {
    let data = tempfile::tempdir().unwrap();
    let (node, _) = build_quiet("node", data.path());
    let sb = Sandbox::start(&node);
    let mut c = sb.client().await;
    start_runners(&mut c, &node, 3).await;
    let j = job(&mut c, 0, json!({"code": "console.log(1 + 1)"})).await;
    assert_eq!((j.out.as_str(), j.code), ("2\n", Some(0)));
    let j = job(&mut c, 1, json!({"code": "console.log(process.argv.slice(1).join(' ')); process.exit(4)", "args": ["x", "y"]})).await;
    assert_eq!((j.out.as_str(), j.code), ("x y\n", Some(4)));
    let j = job(
        &mut c,
        2,
        json!({"code": "console.log(require('os').userInfo().username, process.cwd())"}),
    )
    .await;
    assert_eq!(j.out, "sandbox /home/sandbox\n");
    drop(sb);

    let (bash, _) = build_quiet("bash", data.path());
    let sb = Sandbox::start(&bash);
    let mut c = sb.client().await;
    start_runners(&mut c, &bash, 2).await;
    let j = job(
        &mut c,
        0,
        json!({"code": "echo \"$1 $(whoami) $PWD $LANG\"; exit 5", "args": ["one"]}),
    )
    .await;
    assert_eq!(
        (j.out.as_str(), j.code),
        ("one sandbox /home/sandbox C.UTF-8\n", Some(5))
    );
    let j = job(
        &mut c,
        1,
        json!({"code": "tr a-z A-Z", "stdin": "cGlwZWQK"}),
    )
    .await;
    assert_eq!(j.out, "PIPED\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_data_returns_figures_as_png() {
    let data = tempfile::tempdir().unwrap();
    let (t, _) = build_quiet("python-data", data.path());
    let sb = Sandbox::start(&t);
    let mut c = sb.client().await;
    start_runners(&mut c, &t, 4).await;
    let code = "import sys, time\nt = time.time()\nimport numpy as np, pandas as pd, matplotlib.pyplot as plt\nassert time.time() - t < 0.5, 'imports were not warm'\ndf = pd.DataFrame({'x': np.arange(5)})\nplt.plot(df['x'], df['x'] ** 2)\nprint(int(df['x'].sum()))";
    let j = job(&mut c, 0, json!({"code": code})).await;
    assert_eq!((j.out.as_str(), j.code), ("10\n", Some(0)), "{}", j.err);
    assert_eq!(j.outputs.len(), 1, "{:?}", j.outputs);
    assert_eq!(j.outputs[0]["mime_type"], "image/png");
    assert!(b64(&j.outputs[0]["data"]).starts_with(b"\x89PNG\r\n\x1a\n"));
    // Two restores of one snapshot (seeded alike at import) draw different
    // numbers: numpy.random is re-seeded per job.
    let draws = [
        job(
            &mut c,
            2,
            json!({"code": "import numpy; print(numpy.random.rand())"}),
        )
        .await
        .out,
        job(
            &mut c,
            3,
            json!({"code": "import numpy; print(numpy.random.rand())"}),
        )
        .await
        .out,
    ];
    assert_ne!(draws[0], draws[1], "numpy.random repeats across restores");
    // A saved figure comes back once, even if it stays open.
    let j = job(&mut c, 1, json!({"code": "import matplotlib.pyplot as plt\nplt.bar([1, 2], [3, 4])\nplt.savefig('/tmp/f.png')"})).await;
    assert_eq!(j.code, Some(0), "{}", j.err);
    assert_eq!(j.outputs.len(), 1);
}
