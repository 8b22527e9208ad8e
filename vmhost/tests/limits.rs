//! Limits and isolation on real runsc: a memory bomb, a fork bomb, an
//! infinite loop and a disk filler are each stopped and reported as what
//! they are; a sandbox sees no host file and no network but loopback.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::time::{Duration, Instant};

use common::TestHost;
use http::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_is_reported_as_out_of_memory() {
    let th = TestHost::start().await;
    th.build("python").await;
    let sb = th
        .create(json!({"template": "python", "limits": {"memory_bytes": 256u64 << 20}}))
        .await;
    let id = sb["sandbox_id"].as_str().unwrap();
    let j = th
        .run(
            id,
            json!({"code": "x = []\nwhile True:\n    x.append(bytearray(16 << 20))"}),
        )
        .await;
    assert_eq!(j.error.as_deref(), Some("oom_killed"), "{j:?}");
    let gone = th.wait_destroyed(id).await;
    assert_eq!(gone["exit_reason"], "oom_killed");
    // Its neighbour never noticed.
    let other = th.create(json!({"template": "python"})).await;
    let j = th
        .run(
            other["sandbox_id"].as_str().unwrap(),
            json!({"code": "print('fine')"}),
        )
        .await;
    assert_eq!(j.out, "fine\n");
    th.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_is_contained() {
    let th = TestHost::start().await;
    th.build("bash").await;
    let bystander = th.create(json!({"template": "bash"})).await;
    let by_id = bystander["sandbox_id"].as_str().unwrap().to_string();
    let tasks_before = common::sandbox_processes(th.run.path());
    let sb = th.create(json!({"template": "bash"})).await;
    let id = sb["sandbox_id"].as_str().unwrap().to_string();
    let started = Instant::now();
    // The classic: every function call forks two more, forever.
    let j = th
        .run(
            &id,
            json!({"code": "b() { b | b & }; b; sleep 5; echo survived", "timeout_ms": 20000}),
        )
        .await;
    eprintln!("the fork bomb's job ended with {j:?}");
    // Contained: either the processes inside hit the process limit (the
    // job goes on and ends), or the sandbox is stopped for its limits and
    // says which. Either way, within its bounds and quickly.
    match j.error.as_deref() {
        // It ended with its exit (a code, or envd's kill at the timeout).
        None => {}
        Some(reason) => {
            assert!(["pids_limit", "oom_killed"].contains(&reason), "{j:?}");
            let gone = th.wait_destroyed(&id).await;
            assert_eq!(gone["exit_reason"], reason);
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    // Whatever is left of it goes with a destroy; the host is as before.
    let (_, _) = th
        .call(Method::DELETE, &format!("/sandboxes/{id}"), Value::Null)
        .await;
    let _ = th.host.wait_destroyed(&id, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::sandbox_processes(th.run.path()) > tasks_before {
        assert!(
            Instant::now() < deadline,
            "the fork bomb's processes outlived its sandbox"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The bystander still answers.
    let j = th.exec(&by_id, "/bin/echo", &["still", "here"]).await;
    assert_eq!(j.out, "still here\n");
    th.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_is_killed_at_its_timeout() {
    let th = TestHost::start().await;
    th.build("python").await;
    let sb = th
        .create(json!({"template": "python", "timeout_ms": 2000}))
        .await;
    let id = sb["sandbox_id"].as_str().unwrap();
    let started = Instant::now();
    let j = th.run(id, json!({"code": "while True:\n    pass"})).await;
    let took = started.elapsed();
    assert_eq!(j.error.as_deref(), Some("timed_out"), "{j:?}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(30),
        "{took:?}"
    );
    assert_eq!(th.wait_destroyed(id).await["exit_reason"], "timed_out");
    // A paused sandbox's clock stops: pausing past the timeout and resuming
    // leaves it alive.
    let sb = th
        .create(json!({"template": "python", "timeout_ms": 1500}))
        .await;
    let id = sb["sandbox_id"].as_str().unwrap();
    let (status, _) = th
        .call(Method::POST, &format!("/sandboxes/{id}/pause"), Value::Null)
        .await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(th.get(id).await["state"], "paused");
    let (status, _) = th
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/resume"),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let j = th.run(id, json!({"code": "print('alive')"})).await;
    assert_eq!(j.out, "alive\n");
    th.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_filler_stops_at_the_disk_limit() {
    let th = TestHost::start().await;
    th.build("python").await;
    let sb = th.create(json!({"template": "python"})).await;
    let id = sb["sandbox_id"].as_str().unwrap();
    let disk = sb["limits"]["disk_bytes"].as_u64().unwrap();
    let j = th
        .run(
            id,
            json!({"code": "import errno\nf = open('/tmp/fill', 'wb')\nn = 0\ntry:\n    while True:\n        f.write(b'x' * (1 << 20)); f.flush(); n += 1\nexcept OSError as e:\n    print(errno.errorcode[e.errno], n)"}),
        )
        .await;
    assert_eq!(j.code, Some(0), "{j:?}");
    let mut words = j.out.split_whitespace();
    assert_eq!(words.next(), Some("ENOSPC"), "{}", j.out);
    let written: u64 = words.next().unwrap().parse().unwrap();
    assert!(
        written << 20 <= disk && written << 20 >= disk - (2 << 20),
        "{written} MiB of {disk}"
    );
    // The sandbox is fine afterwards: it can free the space and go on.
    let j = th
        .exec(id, "/bin/sh", &["-c", "rm /tmp/fill && echo freed"])
        .await;
    assert_eq!(j.out, "freed\n");
    assert_eq!(th.get(id).await["state"], "running");
    th.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_sees_no_host_file_and_no_network() {
    let th = TestHost::start().await;
    th.build("python").await;
    let marker = format!("thaw-marker-{}", std::process::id());
    std::fs::write(format!("/tmp/{marker}"), "host secret").unwrap();
    std::fs::write(format!("/root/{marker}"), "host secret").unwrap();
    let sb = th.create(json!({"template": "python"})).await;
    let id = sb["sandbox_id"].as_str().unwrap();
    let code = format!(
        "import os, socket\nprint(os.path.exists('/tmp/{marker}'), os.path.exists('/root/{marker}'))\nprint(sorted(n for _, n in socket.if_nameindex()))\ns = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('1.1.1.1', 80)); print('connected')\nexcept OSError as e:\n    print('no route')"
    );
    let j = th.run(id, json!({"code": code})).await;
    assert_eq!(j.out, "False False\n['lo']\nno route\n", "{}", j.err);
    // The files API cannot reach them either, nor escape with '..'.
    for path in [
        format!("/tmp/{marker}"),
        format!("/root/{marker}"),
        format!("/../../tmp/{marker}"),
    ] {
        let (status, _) = th
            .raw(
                Method::GET,
                &format!("/sandboxes/{id}/files?path={path}"),
                "",
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let _ = std::fs::remove_file(format!("/tmp/{marker}"));
    let _ = std::fs::remove_file(format!("/root/{marker}"));
    th.stop().await;
}
