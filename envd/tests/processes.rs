//! Processes through a real envd: exit codes, stdin, signals, PTY, background
//! processes and reconnects, kill of a whole group, orphans, timeouts, floods.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::time::{Duration, Instant};

use common::{enc, Envd};
use http::{Method, StatusCode};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn exit_codes_stdout_stderr_and_stdin() {
    let envd = Envd::start();
    let c = &envd.client;
    let r = c
        .run(json!({"cmd": "sh", "args": ["-c", "echo out; echo err >&2; exit 3"]}))
        .await;
    assert_eq!(r.out(), "out\n");
    assert_eq!(r.stderr, b"err\n");
    assert_eq!(r.exit["code"], 3);
    assert_eq!(r.exit["signal"], serde_json::Value::Null);
    assert_eq!(r.exit["timed_out"], false);
    assert!(r.events[0]["pid"].as_u64().unwrap() > 0);

    // stdin bytes, then end of file: binary-safe both ways.
    let input: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let r = c.run(json!({"cmd": "cat", "stdin": enc(&input)})).await;
    assert_eq!(r.stdout, input);
    assert_eq!(r.exit["code"], 0);

    // No stdin given: the process reads end of file at once.
    let r = c.run(json!({"cmd": "cat"})).await;
    assert!(r.stdout.is_empty());
    assert_eq!(r.exit["code"], 0);

    // args, env and cwd reach the process.
    let dir = envd.dir.path().to_str().unwrap();
    let r = c
        .run(
            json!({"cmd": "sh", "args": ["-c", "echo \"$1 $THAW_X $(pwd)\"", "sh", "arg1"],
                    "env": {"THAW_X": "x=y"}, "cwd": dir}),
        )
        .await;
    assert_eq!(r.out(), format!("arg1 x=y {dir}\n"));
}

#[tokio::test]
async fn bad_requests_are_clear_errors_and_envd_keeps_serving() {
    let envd = Envd::start();
    let c = &envd.client;
    let cases = [
        (
            json!({"cmd": "nonexistent-program-thaw"}),
            "command_not_found",
        ),
        (json!({"cmd": ""}), "invalid_cmd"),
        (json!({"cmd": "true", "tag": "123"}), "invalid_tag"),
        (json!({"cmd": "true", "tag": "a/b"}), "invalid_tag"),
        (
            json!({"cmd": "true", "user": "no-such-user-thaw"}),
            "unknown_user",
        ),
        (json!({"cmd": "true", "cwd": "/no/such/dir"}), "invalid_cwd"),
        (
            json!({"cmd": "true", "stdin": "not base64!"}),
            "invalid_json",
        ),
        (json!({"cmd": ["true"]}), "invalid_json"),
        (json!({"cmd": "true", "timeout_ms": "soon"}), "invalid_json"),
        (
            json!({"cmd": "true", "pty": {"cols": 0, "rows": 10}}),
            "invalid_pty",
        ),
    ];
    for (body, code) in cases {
        let (status, v) = c.post("/processes", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["code"], code, "{body}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().len() > 5);
    }
    let (status, v) = c
        .raw(
            Method::POST,
            "/processes",
            bytes::Bytes::from_static(b"{\"cmd\": \xff\xfe"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v:?}");
    for sel in ["999999", "no-such-tag"] {
        let (status, v) = c.get(&format!("/processes/{sel}/stream")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(v["error"]["code"], "process_not_found");
        let (status, _) = c
            .call(Method::DELETE, &format!("/processes/{sel}"), None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let (status, v) = c.get("/no/such/route").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("route_not_found"))
    );
    let (status, v) = c.call(Method::DELETE, "/health", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{v}");
    let (status, v) = c.get("/health").await;
    assert_eq!((status, v["status"].as_str()), (StatusCode::OK, Some("ok")));
}

#[tokio::test]
async fn signals_reach_the_process_and_are_reported() {
    let envd = Envd::start();
    let c = &envd.client;
    let (status, v) = c
        .post(
            "/processes",
            json!({"cmd": "sleep", "args": ["30"], "background": true, "tag": "sleeper"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["tag"], "sleeper");
    // The tag is taken while it runs.
    let (status, v) = c
        .post(
            "/processes",
            json!({"cmd": "true", "background": true, "tag": "sleeper"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (status, v) = c
        .post("/processes/sleeper/signal", json!({"signal": "SIGNOPE"}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_signal"))
    );
    let mut s = c
        .stream(Method::GET, "/processes/sleeper/stream", None)
        .await;
    let (status, _) = c
        .post("/processes/sleeper/signal", json!({"signal": "TERM"}))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let r = s.collect_run(T).await;
    assert_eq!(r.exit["signal"], 15);
    assert_eq!(r.exit["code"], serde_json::Value::Null);
    let (status, v) = c
        .post("/processes/sleeper/signal", json!({"signal": 9}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("not_running"))
    );
}

#[tokio::test]
async fn pty_has_a_terminal_and_resizes() {
    let envd = Envd::start();
    let c = &envd.client;
    let r = c
        .run(
            json!({"cmd": "sh", "args": ["-c", "tty; stty size"], "pty": {"cols": 91, "rows": 33}}),
        )
        .await;
    let out = r.out();
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("33 91"), "{out:?}");
    assert_eq!(r.exit["code"], 0);

    // An interactive shell: resize, then ask it for the size.
    let (status, v) = c
        .post("/processes", json!({"cmd": "sh", "pty": {"cols": 80, "rows": 24}, "background": true, "tag": "term"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let mut s = c.stream(Method::GET, "/processes/term/stream", None).await;
    let (status, _) = c
        .post("/processes/term/resize", json!({"cols": 120, "rows": 40}))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = c
        .post(
            "/processes/term/input",
            json!({"data": enc(b"stty size\n")}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    s.until_stdout("40 120", T).await;
    let (status, _) = c
        .post("/processes/term/input", json!({"data": enc(b"exit 7\n")}))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let r = s.collect_run(T).await;
    assert_eq!(r.exit["code"], 7);
    // Resizing a process without a terminal is a 409.
    let (status, _) = c
        .post(
            "/processes",
            json!({"cmd": "sleep", "args": ["5"], "background": true, "tag": "nopty"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, v) = c
        .post("/processes/nopty/resize", json!({"cols": 1, "rows": 1}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("no_pty"))
    );
}

#[tokio::test]
async fn background_reconnect_replays_then_goes_live_then_kill() {
    let envd = Envd::start();
    let c = &envd.client;
    let (status, v) = c
        .post("/processes", json!({"cmd": "sh", "args": ["-c", "echo one; read line; echo \"got $line\"; sleep 30"], "background": true}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let tag = v["tag"].as_str().unwrap().to_owned();
    assert!(tag.starts_with("proc-") && tag.len() == 13, "{tag}");
    let pid = v["pid"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Reconnect by tag: output since start, then live output.
    let mut s = c
        .stream(Method::GET, &format!("/processes/{tag}/stream"), None)
        .await;
    let first = s.next(T).await.unwrap();
    assert_eq!(
        (first["type"].as_str(), first["pid"].as_u64()),
        (Some("start"), Some(pid))
    );
    s.until_stdout("one\n", T).await;
    let (status, _) = c
        .post(
            &format!("/processes/{pid}/input"),
            json!({"data": enc(b"two\n")}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    s.until_stdout("got two", T).await;

    // A second reconnect (by pid) replays everything so far.
    let mut s2 = c
        .stream(Method::GET, &format!("/processes/{pid}/stream"), None)
        .await;
    s2.until_stdout("one\ngot two\n", T).await;

    let (_, list) = c.get("/processes").await;
    let me = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["tag"] == tag.as_str())
        .unwrap()
        .clone();
    assert_eq!(me["running"], true);
    assert_eq!(me["background"], true);

    let (status, v) = c
        .call(Method::DELETE, &format!("/processes/{tag}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["was_running"], true);
    for s in [&mut s, &mut s2] {
        let r = s.collect_run(T).await;
        assert_eq!(r.exit["signal"], 9);
    }
    let (_, me) = c.get(&format!("/processes/{tag}")).await;
    assert_eq!(me["running"], false);
    assert_eq!(me["exit"]["signal"], 9);
}

#[tokio::test]
async fn reconnect_after_exit_gets_the_stored_exit_at_once() {
    let envd = Envd::start();
    let c = &envd.client;
    let (status, v) = c
        .post("/processes", json!({"cmd": "sh", "args": ["-c", "echo done; exit 4"], "background": true, "tag": "quick"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let pid = v["pid"].as_u64().unwrap();
    assert!(
        common::eventually(T, || !std::path::Path::new(&format!("/proc/{pid}"))
            .exists())
        .await,
        "process was not reaped"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut s = c.stream(Method::GET, "/processes/quick/stream", None).await;
    let r = s.collect_run(Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(r.out(), "done\n");
    assert_eq!(r.exit["code"], 4);
    // Input to an exited process is a 409.
    let (status, _) = c.post("/processes/quick/input", json!({"data": ""})).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

fn group_members(pgid: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which is in parentheses).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields[0] != "Z" && fields[2].parse::<u64>() == Ok(pgid) {
            out.push(pid);
        }
    }
    out
}

#[tokio::test]
async fn kill_reaches_the_whole_process_group() {
    let envd = Envd::start();
    let c = &envd.client;
    let (_, v) = c
        .post("/processes", json!({"cmd": "sh", "args": ["-c", "sleep 60 & sleep 60 & wait"], "background": true, "tag": "family"}))
        .await;
    let pid = v["pid"].as_u64().unwrap();
    assert!(
        common::eventually(T, || group_members(pid).len() >= 3).await,
        "children did not start"
    );
    let (status, _) = c.call(Method::DELETE, "/processes/family", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        common::eventually(T, || group_members(pid).is_empty()).await,
        "group survived: {:?}",
        group_members(pid)
    );
}

#[tokio::test]
async fn foreground_ends_when_the_process_exits_despite_an_orphan_holding_stdout() {
    let envd = Envd::start();
    let c = &envd.client;
    let started = Instant::now();
    let r = c
        .run(json!({"cmd": "sh", "args": ["-c", "sleep 4 & echo $!"]}))
        .await;
    // Well under the orphan's 4 s, with room for a loaded machine.
    assert!(
        started.elapsed() < Duration::from_millis(3000),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(r.exit["code"], 0);
    let orphan: u64 = r.out().trim().parse().unwrap();
    // envd (a subreaper here, PID 1 in a sandbox) reaps the orphan: no zombie.
    assert!(
        common::eventually(T, || !std::path::Path::new(&format!("/proc/{orphan}"))
            .exists())
        .await,
        "orphan {orphan} left as a zombie"
    );
}

#[tokio::test]
async fn timeout_kills_and_is_reported() {
    let envd = Envd::start();
    let r = envd
        .client
        .run(json!({"cmd": "sh", "args": ["-c", "while :; do :; done"], "timeout_ms": 300}))
        .await;
    assert_eq!(r.exit["timed_out"], true);
    assert_eq!(r.exit["signal"], 9);
    assert!(r.exit["duration_ms"].as_u64().unwrap() >= 300);
}

#[tokio::test]
async fn dropping_a_foreground_stream_kills_its_process() {
    let envd = Envd::start();
    let c = &envd.client;
    let mut s = c
        .stream(
            Method::POST,
            "/processes",
            Some(json!({"cmd": "sleep", "args": ["60"], "tag": "fg"})),
        )
        .await;
    let start = s.next(T).await.unwrap();
    let pid = start["pid"].as_u64().unwrap();
    drop(s);
    assert!(
        common::eventually(T, || !std::path::Path::new(&format!("/proc/{pid}"))
            .exists())
        .await,
        "foreground process outlived its stream"
    );
    let (_, v) = c.get("/processes/fg").await;
    assert_eq!(v["exit"]["signal"], 9);
}

#[tokio::test]
async fn output_flood_keeps_envd_memory_bounded() {
    let envd = Envd::start();
    let c = &envd.client;
    let before = envd.rss_bytes();
    // Nobody listens: the replay ring keeps the newest 1 MiB.
    let (status, _) = c
        .post("/processes", json!({"cmd": "sh", "args": ["-c", "head -c 100000000 /dev/zero"], "background": true, "tag": "flood"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let mut s = c.stream(Method::GET, "/processes/flood/stream", None).await;
    // A slow reader: backpressure holds the writer instead of buffering.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mid = envd.rss_bytes();
    let mut total = 0usize;
    while let Some(ev) = s.next(Duration::from_secs(120)).await {
        if ev["type"] == "stdout" {
            total += common::b64(&ev["data"]).len();
        }
    }
    let after = envd.rss_bytes();
    eprintln!("envd rss: before {before}, during {mid}, after {after}; streamed {total} bytes");
    assert!(total > 1 << 20, "saw {total} bytes");
    assert!(mid < before + (64 << 20), "rss grew to {mid}");
    assert!(after < before + (64 << 20), "rss grew to {after}");
    let (_, v) = c.get("/processes/flood").await;
    assert!(v["dropped_bytes"].as_u64().unwrap() > 0, "{v}");
}

#[tokio::test]
async fn runs_as_another_user_with_its_groups_and_home() {
    let envd = Envd::start();
    let c = &envd.client;
    assert!(
        nix::unistd::geteuid().is_root(),
        "switching users needs root: run the test command (scripts/test.sh) as root"
    );
    let r = c
        .run(json!({"cmd": "sh", "args": ["-c", "id -u; id -g; id -G; echo $HOME $USER"], "user": "nobody", "cwd": "/"}))
        .await;
    let lines: Vec<String> = r.out().lines().map(str::to_owned).collect();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(lines[0], nobody.uid.to_string());
    assert_eq!(lines[1], nobody.gid.to_string());
    // Root's supplementary groups are gone.
    assert!(!lines[2].split(' ').any(|g| g == "0"), "{lines:?}");
    assert_eq!(lines[3], format!("{} nobody", nobody.dir.display()));
    // And it really lacks root's powers.
    let r = c
        .run(json!({"cmd": "cat", "args": ["/etc/shadow"], "user": "nobody", "cwd": "/"}))
        .await;
    assert_ne!(r.exit["code"], 0);
}
