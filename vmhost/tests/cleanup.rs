//! Nothing outlives a sandbox: a destroy leaves no process, mount, cgroup,
//! socket or file, and a vmhost killed with SIGKILL and started again
//! removes what it left.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestHost;
use http::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_leaves_nothing_behind() {
    let th = TestHost::start().await;
    th.build("python").await;
    let before = (
        common::sandbox_processes(th.run.path()),
        common::mount_count(),
        common::cgroups_under(&th.cgroup_parent),
        common::files_under(&th.run.path().join("sandboxes")),
    );
    assert_eq!((before.0, before.2, before.3), (0, 0, 0), "{before:?}");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let sb = th.create(json!({"template": "python"})).await;
        ids.push(sb["sandbox_id"].as_str().unwrap().to_string());
    }
    // One of them paused, one mid-job: destroy works on both.
    let (status, _) = th
        .call(
            Method::POST,
            &format!("/sandboxes/{}/pause", ids[0]),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = th
        .call(
            Method::POST,
            &format!("/sandboxes/{}/processes", ids[1]),
            json!({"cmd": "/bin/sleep", "args": ["300"], "background": true}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(common::sandbox_processes(th.run.path()) >= 6);
    assert!(common::cgroups_under(&th.cgroup_parent) >= 3);
    for id in &ids {
        let started = Instant::now();
        let (status, v) = th
            .call(Method::DELETE, &format!("/sandboxes/{id}"), Value::Null)
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        // The request does not wait for the removal.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    for id in &ids {
        assert_eq!(th.wait_destroyed(id).await["exit_reason"], "destroyed");
    }
    let after = (
        common::sandbox_processes(th.run.path()),
        common::mount_count(),
        common::cgroups_under(&th.cgroup_parent),
        common::files_under(&th.run.path().join("sandboxes")),
    );
    assert_eq!(after, before);
    th.stop().await;
}

/// `vmhost serve` as its own process.
fn serve(data: &std::path::Path, run: &std::path::Path, port: u16, cgroup: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vmhost"))
        .arg("serve")
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--run-dir={}", run.display()))
        .arg(format!("--cache-dir={}", common::cache_dir().display()))
        .arg(format!(
            "--runtimes-dir={}",
            common::repo().join("runtimes").display()
        ))
        .arg(format!("--envd={}", common::envd().display()))
        .arg(format!("--cgroup-parent={cgroup}"))
        .env("RUST_LOG", "vmhost=warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

/// Whatever the test leaves if it fails halfway: vmhost processes and
/// their sandboxes.
struct Leftovers {
    children: Vec<Child>,
    sandboxes: std::path::PathBuf,
    cgroup: String,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        common::remove_leftovers(&self.sandboxes, &self.cgroup);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmhost_killed_with_sigkill_cleans_up_at_its_next_start() {
    let data = tempfile::tempdir().unwrap();
    let run = tempfile::Builder::new()
        .prefix("vk")
        .tempdir_in("/tmp")
        .unwrap();
    let cgroup = format!("thaw-test-kill-{}", std::process::id());
    let mut left = Leftovers {
        children: Vec::new(),
        sandboxes: run.path().join("sandboxes"),
        cgroup: cgroup.clone(),
    };
    let port = common::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    left.children
        .push(serve(data.path(), run.path(), port, &cgroup));
    common::wait_healthy(addr).await;
    let (status, events) = common::raw(
        addr,
        Method::POST,
        "/templates/python/build",
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&events).contains("\"type\":\"result\""));
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, body) = common::raw(
            addr,
            Method::POST,
            "/sandboxes",
            bytes::Bytes::from(r#"{"template":"python"}"#),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        ids.push(
            common::parse(&body)["sandbox_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let (status, _) = common::raw(
        addr,
        Method::POST,
        &format!("/sandboxes/{}/pause", ids[0]),
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for mut first in left.children.drain(..) {
        first.kill().unwrap();
        let _ = first.wait();
    }
    // The orphans are still there: runsc processes, cgroups, directories.
    assert!(common::sandbox_processes(run.path()) >= 4);
    assert_eq!(common::cgroups_under(&cgroup), 2);
    assert!(common::files_under(&run.path().join("sandboxes")) > 0);

    left.children
        .push(serve(data.path(), run.path(), port, &cgroup));
    common::wait_healthy(addr).await;
    assert_eq!(common::sandbox_processes(run.path()), 0);
    assert_eq!(common::cgroups_under(&cgroup), 0);
    assert_eq!(common::files_under(&run.path().join("sandboxes")), 0);
    let (_, metrics) = common::raw(addr, Method::GET, "/metrics", bytes::Bytes::new()).await;
    assert!(String::from_utf8_lossy(&metrics).contains("thaw_vmhost_orphans_removed_total 2"));
    // It serves as before, from the snapshot the first run baked.
    let (status, body) = common::raw(
        addr,
        Method::POST,
        "/sandboxes",
        bytes::Bytes::from(r#"{"template":"python"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body:?}");
    let id = common::parse(&body)["sandbox_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, out) = common::raw(
        addr,
        Method::POST,
        &format!("/sandboxes/{id}/run"),
        bytes::Bytes::from(r#"{"code":"print(7)"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&out).contains("Nwo="), "{out:?}"); // "7\n"
                                                                        // SIGTERM drains: every sandbox is destroyed before it exits.
    let mut second = left.children.pop().unwrap();
    let pid = rustix::process::Pid::from_raw(i32::try_from(second.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = second.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(common::sandbox_processes(run.path()), 0);
    assert_eq!(common::cgroups_under(&cgroup), 0);
}
