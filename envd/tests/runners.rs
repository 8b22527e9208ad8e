//! Warm runners through a real envd: the Python and Node.js runners of
//! runtimes/ and `envd exec-runner` for bash, each compared with running the
//! interpreter directly (`python3 -c`, `node -e`, `bash -c`).

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{b64, enc, Envd, Run};
use http::{Method, StatusCode};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

fn runtimes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtimes")
}

/// Starts a runner (the START process) and waits for its socket.
async fn start_runner(envd: &Envd, cmd: &str, args: &[&str], env: Value, tag: &str) -> PathBuf {
    let sock = envd.dir.path().join(format!("{tag}.sock"));
    let mut env = env;
    env["THAW_RUNNER_SOCKET"] = json!(sock);
    let (status, v) = envd
        .client
        .post("/processes", json!({"cmd": cmd, "args": args, "env": env, "background": true, "tag": tag, "cwd": "/"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let deadline = Instant::now() + T;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "runner {tag} never listened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sock
}

async fn run_job(envd: &Envd, sock: &Path, tag: &str, job: Value) -> Run {
    let mut body = job;
    body["runner"] = json!(tag);
    body["socket"] = json!(sock);
    let resp = envd
        .client
        .send(Method::POST, "/run", Bytes::from(body.to_string()))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut s = common::EventStream::new(resp.into_body());
    s.collect_run(T).await
}

/// An interpreter, its runner, and the flag that runs code directly.
struct Interp {
    program: &'static str,
    runner: &'static str,
    flag: &'static str,
}

const PYTHON: Interp = Interp {
    program: "/usr/bin/python3",
    runner: "python/runner.py",
    flag: "-c",
};
const NODE: Interp = Interp {
    program: "node",
    runner: "node/runner.js",
    flag: "-e",
};

/// Runs `code` through a fresh warm runner and through the interpreter
/// directly (`python3 -c`, `node -e`), and checks both agree on stdout and
/// exit status.
async fn agrees(
    envd: &Envd,
    interp: &Interp,
    n: usize,
    code: &str,
    args: &[&str],
    stdin: &[u8],
) -> Run {
    let tag = format!("{}{n}", interp.flag.trim_start_matches('-'));
    let runner = runtimes().join(interp.runner);
    let sock = start_runner(
        envd,
        interp.program,
        &[runner.to_str().unwrap()],
        json!({}),
        &tag,
    )
    .await;
    let r = run_job(
        envd,
        &sock,
        &tag,
        json!({"code": code, "args": args, "stdin": enc(stdin), "cwd": "/"}),
    )
    .await;
    let direct = {
        use std::io::Write;
        let mut child = Command::new(interp.program)
            .arg(interp.flag)
            .arg(code)
            .args(args)
            .current_dir("/")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    };
    assert_eq!(
        r.out(),
        String::from_utf8_lossy(&direct.stdout),
        "stdout of {code:?}"
    );
    assert_eq!(
        r.exit["code"].as_i64(),
        direct.status.code().map(i64::from),
        "status of {code:?}"
    );
    r
}

async fn python_agrees(envd: &Envd, n: usize, code: &str, args: &[&str], stdin: &[u8]) -> Run {
    agrees(envd, &PYTHON, n, code, args, stdin).await
}

async fn node_agrees(envd: &Envd, n: usize, code: &str, args: &[&str], stdin: &[u8]) -> Run {
    agrees(envd, &NODE, n, code, args, stdin).await
}

#[tokio::test]
async fn python_runner_has_python3_dash_c_semantics() {
    let envd = Envd::start();
    let r = python_agrees(&envd, 1, "print(1)", &[], b"").await;
    assert_eq!(r.out(), "1\n");
    python_agrees(
        &envd,
        2,
        "import sys; print(sys.stdin.read().upper(), end='')",
        &[],
        b"hello\nworld\n",
    )
    .await;
    let r = python_agrees(&envd, 3, "import sys; print(sys.argv)", &["a", "b c"], b"").await;
    assert_eq!(r.out(), "['-c', 'a', 'b c']\n");
    python_agrees(&envd, 4, "import sys; sys.exit(3)", &[], b"").await;
    let r = python_agrees(&envd, 5, "print('before'); 1/0", &[], b"").await;
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.starts_with("Traceback (most recent call last):"),
        "{err}"
    );
    assert!(err.contains("ZeroDivisionError: division by zero"), "{err}");
    assert!(err.contains("File \"<string>\", line 1"), "{err}");
    assert!(
        !err.contains("runner.py"),
        "the runner's own frame leaked: {err}"
    );
    let r = python_agrees(&envd, 6, "import sys; sys.exit('bye')", &[], b"").await;
    assert_eq!(String::from_utf8_lossy(&r.stderr), "bye\n");
    python_agrees(&envd, 7, "print(__name__)", &[], b"").await;
    python_agrees(&envd, 8, "raise SystemExit(0)", &[], b"").await;
    python_agrees(&envd, 9, "def f():\n    return 42\nprint(f())", &[], b"").await;
}

#[tokio::test]
async fn python_runner_applies_env_and_cwd_and_ends_despite_a_lingering_child() {
    let envd = Envd::start();
    let runner = runtimes().join("python/runner.py");
    let sock = start_runner(
        &envd,
        "/usr/bin/python3",
        &[runner.to_str().unwrap()],
        json!({}),
        "r",
    )
    .await;
    let dir = envd.dir.path().to_str().unwrap().to_owned();
    let started = Instant::now();
    let r = run_job(
        &envd,
        &sock,
        "r",
        json!({"code": "import os, subprocess\nsubprocess.Popen(['sleep', '5'])\nprint(os.environ['THAW_X'], os.getcwd())",
               "env": {"THAW_X": "x"}, "cwd": dir}),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "waited for the child: {:?}",
        started.elapsed()
    );
    assert_eq!(r.out(), format!("x {dir}\n"));
    assert_eq!(r.exit["code"], 0);
    // A runner serves one job.
    let (status, v) = envd
        .client
        .post(
            "/run",
            json!({"code": "print(2)", "runner": "r", "socket": sock}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("runner_exited"))
    );
    let (status, v) = envd
        .client
        .post("/run", json!({"code": "print(2)", "runner": "nobody-here"}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("runner_not_ready"))
    );
}

#[tokio::test]
async fn restored_runners_reseed_their_generators() {
    let envd = Envd::start();
    let runner = runtimes().join("python/runner.py");
    let code = "import random; print(random.random())";
    let mut seen = Vec::new();
    for tag in ["a", "b"] {
        // Seeded with 0 at import: what every restore of one snapshot has.
        let sock = start_runner(
            &envd,
            "/usr/bin/python3",
            &[runner.to_str().unwrap()],
            json!({"THAW_RUNNER_SEED_AT_IMPORT": "0"}),
            tag,
        )
        .await;
        seen.push(
            run_job(&envd, &sock, tag, json!({"code": code}))
                .await
                .out(),
        );
    }
    let replayed = {
        let out = Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import random; random.seed(0); print(random.random())",
            ])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert_ne!(seen[0], seen[1], "two restores drew the same numbers");
    assert_ne!(seen[0], replayed, "the job saw the import-time sequence");
}

#[tokio::test]
async fn rich_outputs_come_back_as_output_events_and_timeouts_are_reported() {
    let envd = Envd::start();
    let runner = runtimes().join("python/runner.py");
    let sock = start_runner(
        &envd,
        "/usr/bin/python3",
        &[runner.to_str().unwrap()],
        json!({}),
        "rich",
    )
    .await;
    let code = "import sys, json, base64\nc = sys.modules['thaw_runner_conn']\nc.sendall((json.dumps({'type': 'output', 'mime_type': 'image/png', 'data': base64.b64encode(b'PNG!').decode()}) + '\\n').encode())\nprint('done')";
    let r = run_job(&envd, &sock, "rich", json!({"code": code})).await;
    let outputs: Vec<&Value> = r.events.iter().filter(|e| e["type"] == "output").collect();
    assert_eq!(outputs.len(), 1, "{:?}", r.events);
    assert_eq!(outputs[0]["mime_type"], "image/png");
    assert_eq!(b64(&outputs[0]["data"]), b"PNG!");
    assert_eq!(r.out(), "done\n");

    let sock = start_runner(
        &envd,
        "/usr/bin/python3",
        &[runner.to_str().unwrap()],
        json!({}),
        "slow",
    )
    .await;
    let r = run_job(
        &envd,
        &sock,
        "slow",
        json!({"code": "while True: pass", "timeout_ms": 300}),
    )
    .await;
    assert_eq!(r.exit["timed_out"], true);
    assert_eq!(r.exit["signal"], 9);
}

#[tokio::test]
async fn node_runner_has_node_dash_e_semantics() {
    let envd = Envd::start();
    let r = node_agrees(&envd, 1, "console.log(1 + 1)", &[], b"").await;
    assert_eq!(r.out(), "2\n");
    let r = node_agrees(
        &envd,
        2,
        "console.log(JSON.stringify(process.argv.slice(1)))",
        &["a", "b"],
        b"",
    )
    .await;
    assert_eq!(r.out(), "[\"a\",\"b\"]\n");
    node_agrees(&envd, 3, "process.exit(3)", &[], b"").await;
    let r = node_agrees(
        &envd,
        4,
        "console.log('x'); throw new Error('boom')",
        &[],
        b"",
    )
    .await;
    assert!(String::from_utf8_lossy(&r.stderr).contains("Error: boom"));
    node_agrees(&envd, 5, "let s = ''; process.stdin.on('data', d => s += d); process.stdin.on('end', () => console.log(s.toUpperCase()))", &[], b"abc").await;
    node_agrees(
        &envd,
        6,
        "console.log(require('os').EOL === '\\n')",
        &[],
        b"",
    )
    .await;
    node_agrees(
        &envd,
        7,
        "setTimeout(() => console.log('later'), 50)",
        &[],
        b"",
    )
    .await;
    node_agrees(&envd, 8, "Promise.reject(new Error('async'))", &[], b"").await;
}

#[tokio::test]
async fn exec_runner_runs_bash_jobs() {
    let envd = Envd::start();
    let bin = env!("CARGO_BIN_EXE_envd");
    let sock = envd.dir.path().join("bash.sock");
    let (status, _) = envd
        .client
        .post(
            "/processes",
            json!({"cmd": bin, "args": ["exec-runner", "--socket", sock, "--", "/bin/bash", "-c", "{code}", "bash"],
                   "background": true, "tag": "bash", "cwd": "/"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let deadline = Instant::now() + T;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "exec-runner never listened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = run_job(
        &envd,
        &sock,
        "bash",
        json!({"code": "echo \"$1 $THAW_X $(pwd)\"; cat; exit 4", "args": ["one"], "env": {"THAW_X": "x"},
               "cwd": "/tmp", "stdin": enc(b"piped\n")}),
    )
    .await;
    assert_eq!(r.out(), "one x /tmp\npiped\n");
    assert_eq!(r.exit["code"], 4);
    // No socket left behind for a second job.
    assert!(!sock.exists());
}
