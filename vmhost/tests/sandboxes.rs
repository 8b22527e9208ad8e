//! Sandboxes on real runsc through the real API: every runtime's template
//! built and baked, restored and running code; pause and resume; snapshot
//! and restore; identity and randomness of restores; state errors.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Job, TestHost};
use http::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runtime_is_baked_restored_and_runs_code() {
    let th = TestHost::start().await;
    for name in ["python", "node", "bash", "python-data"] {
        let events = th.build(name).await;
        let phases: Vec<&str> = events
            .iter()
            .filter(|e| e["type"] == "bake")
            .filter_map(|e| e["phase"].as_str())
            .collect();
        assert_eq!(
            phases,
            [
                "boot",
                "booted",
                "start",
                "ready",
                "ready_ok",
                "checkpoint",
                "done"
            ],
            "{name}: {events:?}"
        );
        assert!(events.iter().any(|e| e["type"] == "started"), "{events:?}");
    }
    // A second build of an unchanged template is the cached snapshot.
    let again = th.build("python").await;
    assert!(again.iter().any(|e| e["phase"] == "cached"), "{again:?}");

    let (status, list) = th.call(Method::GET, "/templates", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    let built: HashSet<&str> = list["templates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| !t["snapshot"].is_null())
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(
        built,
        HashSet::from(["python", "node", "bash", "python-data"])
    );

    let cases = [
        (
            "python",
            json!({"code": "import sys; print(sum(range(10)), sys.argv[1:])", "args": ["a"]}),
            "45 ['a']\n",
        ),
        (
            "node",
            json!({"code": "console.log([1,2,3].map(x => x * 2).join(','))"}),
            "2,4,6\n",
        ),
        (
            "bash",
            json!({"code": "echo \"$1-$(whoami)\"", "args": ["x"]}),
            "x-sandbox\n",
        ),
        (
            "python-data",
            json!({"code": "import numpy as np, pandas as pd; print(int(np.arange(5).sum()), len(pd.DataFrame({'a': [1, 2]})))"}),
            "10 2\n",
        ),
    ];
    for (name, job, want) in cases {
        let sb = th
            .create(json!({"template": name, "env": {"GREETING": "hi"}}))
            .await;
        let id = sb["sandbox_id"].as_str().unwrap();
        assert!(id.starts_with("sb_"), "{sb}");
        assert_eq!(sb["state"], "running");
        assert_eq!(sb["runner_ready"], true);
        assert!(sb["timings"]["total_ms"].as_u64().unwrap() < 30_000, "{sb}");
        let j = th.run(id, job).await;
        assert_eq!(
            (j.out.as_str(), j.code),
            (want, Some(0)),
            "{name}: {}",
            j.err
        );
        // One job per warm runner.
        let (status, body) = th
            .call(
                Method::POST,
                &format!("/sandboxes/{id}/run"),
                json!({"code": "1"}),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["code"], "runner_spent");
        // The request's environment reaches processes.
        let j = th.exec(id, "/bin/sh", &["-c", "echo $GREETING"]).await;
        assert_eq!(j.out, "hi\n");
    }
    // A matplotlib figure comes back as a PNG output.
    let sb = th.create(json!({"template": "python-data"})).await;
    let id = sb["sandbox_id"].as_str().unwrap();
    let j = th
        .run(
            id,
            json!({"code": "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"}),
        )
        .await;
    assert_eq!(j.code, Some(0), "{}", j.err);
    assert_eq!(j.outputs.len(), 1, "{:?}", j.outputs);
    assert_eq!(j.outputs[0]["mime_type"], "image/png");
    th.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_every_state_error() {
    let th = TestHost::start().await;
    th.build("python").await;
    let sb = th.create(json!({"template": "python"})).await;
    let id = sb["sandbox_id"].as_str().unwrap().to_string();

    let (status, v) = th
        .call(Method::POST, &format!("/sandboxes/{id}/pause"), Value::Null)
        .await;
    assert_eq!(
        (status, v["state"].as_str()),
        (StatusCode::OK, Some("paused")),
        "{v}"
    );
    assert!(v["usage"]["memory_bytes"].as_u64().unwrap() > 0, "{v}");
    // A paused sandbox refuses work and a second pause, at once.
    for (method, path) in [
        (Method::POST, format!("/sandboxes/{id}/pause")),
        (Method::POST, format!("/sandboxes/{id}/processes")),
        (Method::POST, format!("/sandboxes/{id}/run")),
        (
            Method::GET,
            format!("/sandboxes/{id}/files?path=/etc/hostname"),
        ),
    ] {
        let (status, v) = th.call(method, &path, json!({"cmd": "/bin/true"})).await;
        assert_eq!(status, StatusCode::CONFLICT, "{path}: {v}");
        assert_eq!(v["error"]["code"], "sandbox_paused", "{path}: {v}");
    }
    let (status, v) = th
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/resume"),
            Value::Null,
        )
        .await;
    assert_eq!(
        (status, v["state"].as_str()),
        (StatusCode::OK, Some("running")),
        "{v}"
    );
    let (status, v) = th
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/resume"),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    // It still works after the thaw: the warm runner answers.
    let j = th.run(&id, json!({"code": "print('thawed')"})).await;
    assert_eq!(j.out, "thawed\n");

    // Destroy answers at once; then everything is a 409, GET tells why.
    let (status, v) = th
        .call(Method::DELETE, &format!("/sandboxes/{id}"), Value::Null)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let gone = th.wait_destroyed(&id).await;
    assert_eq!(gone["exit_reason"], "destroyed");
    for path in ["pause", "resume", "snapshot", "run"] {
        let (status, v) = th
            .call(Method::POST, &format!("/sandboxes/{id}/{path}"), json!({}))
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{path}: {v}");
        assert_eq!(v["error"]["code"], "sandbox_destroyed");
    }
    let (status, v) = th
        .call(Method::GET, &format!("/sandboxes/{id}"), Value::Null)
        .await;
    assert_eq!(
        (status, v["state"].as_str()),
        (StatusCode::OK, Some("destroyed"))
    );

    // Unknown things are 404s.
    let (status, v) = th
        .call(Method::POST, "/sandboxes/sb_nope/pause", Value::Null)
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("sandbox_not_found"))
    );
    let (status, v) = th
        .call(Method::POST, "/sandboxes", json!({"template": "cobol"}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("template_not_found"))
    );
    let (status, v) = th
        .call(Method::POST, "/sandboxes", json!({"template": "node"}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("template_not_built")),
        "{v}"
    );
    let (status, v) = th
        .call(
            Method::POST,
            "/sandboxes/restore",
            json!({"snapshot_id": "snap_../../etc"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    let (status, _) = th
        .call(Method::POST, "/templates/..%2Fetc/build", Value::Null)
        .await;
    assert!(status == StatusCode::BAD_REQUEST || status == StatusCode::NOT_FOUND);

    // Malformed bodies name the field; impossible limits are 422.
    let (status, v) = th
        .call(Method::POST, "/sandboxes", json!({"templte": "python"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("templte"),
        "{v}"
    );
    let (status, v) = th.raw(Method::POST, "/sandboxes", "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v:?}");
    let (status, _) = th
        .raw(Method::POST, "/sandboxes", vec![0xff, 0xfe, b'{'])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, v) = th
        .raw(Method::POST, "/sandboxes", vec![b' '; 2 << 20])
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v:?}");
    let (status, v) = th
        .call(
            Method::POST,
            "/sandboxes",
            json!({"template": "python", "limits": {"memory_bytes": 1u64 << 50}}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("limits_exceed_host"))
    );
    let (status, v) = th
        .call(
            Method::POST,
            "/sandboxes",
            json!({"template": "python", "limits": {"cpu_millis": 64000}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (status, v) = th
        .call(
            Method::POST,
            "/sandboxes",
            json!({"template": "python", "limits": {"pids": 8}}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("limit_fixed_by_snapshot")
        ),
        "{v}"
    );
    let (status, v) = th.call(Method::GET, "/nowhere", Value::Null).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("route_not_found"))
    );

    // None of that disturbed the host.
    let sb = th.create(json!({"template": "python"})).await;
    let j = th
        .run(
            sb["sandbox_id"].as_str().unwrap(),
            json!({"code": "print(2)"}),
        )
        .await;
    assert_eq!(j.out, "2\n");
    let (status, v) = th.call(Method::GET, "/host", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["sandboxes"]["running"], 1, "{v}");
    assert_eq!(v["driver"]["driver"], "gvisor");
    let (status, text) = th.raw(Method::GET, "/metrics", "").await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("thaw_vmhost_operation_duration_seconds_count{op=\"pause\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("thaw_vmhost_sandboxes{state=\"running\"} 1"),
        "{text}"
    );
    th.stop().await;
}

/// A process inside that keeps a variable: it executes every line it reads.
const KEEPER: &str =
    "import sys\nns = {}\nfor line in sys.stdin:\n    exec(line, ns)\n    sys.stdout.flush()\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_restore_keep_state_and_restores_differ() {
    let th = TestHost::start().await;
    th.build("python").await;
    let sb = th
        .create(json!({"template": "python", "metadata": {"owner": "t"}}))
        .await;
    let id = sb["sandbox_id"].as_str().unwrap().to_string();
    let (status, v) = th
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/processes"),
            json!({"cmd": "/usr/bin/python3", "args": ["-u", "-c", KEEPER], "background": true,
                   "tag": "keeper", "keep_stdin_open": true}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let (status, v) = th
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/processes/keeper/input"),
            json!({"data": base64_of("x = 41\n")}),
        )
        .await;
    assert!(status.is_success(), "{v}");
    let (status, v) = th
        .raw(
            Method::PUT,
            &format!("/sandboxes/{id}/files?path=/home/sandbox/note.txt"),
            "kept",
        )
        .await;
    assert!(status.is_success(), "{v:?}");
    // Paused sandboxes can be snapshotted too.
    let (status, _) = th
        .call(Method::POST, &format!("/sandboxes/{id}/pause"), Value::Null)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, snap) = th
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/snapshot"),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    let snap_id = snap["snapshot_id"].as_str().unwrap().to_string();
    assert!(snap_id.starts_with("snap_"));
    assert!(snap["size_bytes"].as_u64().unwrap() > 0);
    let gone = th.get(&id).await;
    assert_eq!(
        (gone["state"].as_str(), gone["exit_reason"].as_str()),
        (Some("destroyed"), Some("snapshotted"))
    );

    let (status, restored) = th
        .call(
            Method::POST,
            "/sandboxes/restore",
            json!({"snapshot_id": snap_id}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{restored}");
    let rid = restored["sandbox_id"].as_str().unwrap().to_string();
    assert_ne!(rid, id);
    assert_eq!(restored["metadata"], json!({}));
    // The file and the variable are still there.
    let (status, body) = th
        .raw(
            Method::GET,
            &format!("/sandboxes/{rid}/files?path=/home/sandbox/note.txt"),
            "",
        )
        .await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"kept"[..]));
    let (status, v) = th
        .call(
            Method::POST,
            &format!("/sandboxes/{rid}/processes/keeper/input"),
            json!({"data": base64_of("print(x + 1)\n"), "eof": true}),
        )
        .await;
    assert!(status.is_success(), "{v}");
    let (status, v) = th
        .call(
            Method::GET,
            &format!("/sandboxes/{rid}/processes/keeper/stream"),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let j = Job::from_events(v.as_array().cloned().unwrap());
    assert_eq!(j.out, "42\n", "{}", j.err);
    // The restore has its own identity.
    let (_, body) = th
        .raw(
            Method::GET,
            &format!("/sandboxes/{rid}/files?path=/run/thaw/sandbox_id"),
            "",
        )
        .await;
    assert_eq!(String::from_utf8_lossy(&body), rid);
    let (status, list) = th.call(Method::GET, "/snapshots", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["snapshots"][0]["snapshot_id"], snap_id);
    let (status, _) = th
        .call(
            Method::DELETE,
            &format!("/snapshots/{snap_id}"),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // Two restores of one template snapshot differ where snapshots leak.
    let code = "import random, uuid, os\nprint(random.random(), uuid.uuid4(), os.urandom(8).hex())";
    let mut seen = Vec::new();
    for _ in 0..2 {
        let sb = th.create(json!({"template": "python"})).await;
        let sid = sb["sandbox_id"].as_str().unwrap().to_string();
        let j = th.run(&sid, json!({"code": code})).await;
        assert_eq!(j.code, Some(0), "{}", j.err);
        let (_, body) = th
            .raw(
                Method::GET,
                &format!("/sandboxes/{sid}/files?path=/run/thaw/sandbox_id"),
                "",
            )
            .await;
        assert_eq!(String::from_utf8_lossy(&body), sid);
        seen.push(j.out);
    }
    let a: Vec<&str> = seen[0].split_whitespace().collect();
    let b: Vec<&str> = seen[1].split_whitespace().collect();
    assert_eq!((a.len(), b.len()), (3, 3), "{seen:?}");
    for i in 0..3 {
        assert_ne!(a[i], b[i], "value {i} repeats across restores: {seen:?}");
    }
    th.stop().await;
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_a_busy_sandbox_are_refused_not_queued() {
    let th = TestHost::start().await;
    th.build("python").await;
    let sb = th.create(json!({"template": "python"})).await;
    let id = sb["sandbox_id"].as_str().unwrap().to_string();
    // While a snapshot (≈ 0.3 s) is under way, a pause is refused with a
    // 409 at once instead of waiting behind it.
    let addr = th.addr;
    let snap_path = format!("/sandboxes/{id}/snapshot");
    let snap = tokio::spawn(async move {
        common::raw(addr, Method::POST, &snap_path, bytes::Bytes::new()).await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while th.host.view(&id).unwrap().state != vmhost::host::SandboxState::Snapshotting {
        assert!(
            std::time::Instant::now() < deadline,
            "never saw the snapshot under way"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let started = std::time::Instant::now();
    let (p_status, p) = th
        .call(Method::POST, &format!("/sandboxes/{id}/pause"), Value::Null)
        .await;
    let took = started.elapsed();
    assert_eq!(
        (p_status, p["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("sandbox_busy")),
        "{p}"
    );
    assert!(
        p["error"]["message"]
            .as_str()
            .unwrap()
            .contains("snapshotting"),
        "{p}"
    );
    assert!(took < Duration::from_secs(1), "the refusal waited {took:?}");
    let (s_status, s) = snap.await.unwrap();
    assert_eq!(s_status, StatusCode::CREATED, "{s:?}");
    th.stop().await;
}

const ECHO: &str = "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1', 8765))\ns.listen()\nwhile True:\n    c, _ = s.accept()\n    while True:\n        d = c.recv(65536)\n        if not d:\n            break\n        c.sendall(d)\n    c.close()\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_are_listed_and_reached_through_a_tunnel() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let th = TestHost::start().await;
    th.build("python").await;
    let sb = th.create(json!({"template": "python"})).await;
    let id = sb["sandbox_id"].as_str().unwrap().to_string();
    let (status, v) = th
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/processes"),
            json!({"cmd": "/usr/bin/python3", "args": ["-c", ECHO], "background": true, "tag": "echo"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, v) = th
            .call(Method::GET, &format!("/sandboxes/{id}/ports"), Value::Null)
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        if v.to_string().contains("8765") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "port never listed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut conn = tokio::net::TcpStream::connect(th.addr).await.unwrap();
    conn.write_all(
        format!("GET /sandboxes/{id}/ports/8765/tunnel HTTP/1.1\r\nHost: vmhost\r\nConnection: upgrade\r\nUpgrade: tcp\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(
            conn.read(&mut b).await.unwrap(),
            1,
            "closed during the handshake"
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for msg in ["ping\n", "a longer line through the tunnel\n"] {
        conn.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    // Nothing listens on another port: envd's error comes back as it is.
    let (status, v) = th
        .call(
            Method::GET,
            &format!("/sandboxes/{id}/ports/8766/tunnel"),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    th.stop().await;
}
