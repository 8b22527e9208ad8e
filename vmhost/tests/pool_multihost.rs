//! The pool across hosts, on one machine, with real processes: Redis, two
//! `vmhost serve --register` processes and the `pool-manager` daemon.
//! A vmhost killed with SIGKILL leaves the pool and the target is restored
//! on the survivor; a killed daemon does not stop leasing, and a standby
//! daemon takes over refilling.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use pool_manager::store::redis::RedisStore;
use pool_manager::store::Store;
use serde_json::{json, Value};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A binary of this workspace (built by `cargo test --workspace`).
fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--bin", name])
            .status()
            .unwrap();
        assert!(status.success(), "building {name} failed");
    }
    path
}

struct Vmhost {
    child: Option<Child>,
    port: u16,
    data: tempfile::TempDir,
    run: tempfile::TempDir,
    cgroup: String,
    host_id: String,
}

impl Vmhost {
    fn spawn(prefix: &str, name: &str) -> Vmhost {
        let data = tempfile::tempdir().unwrap();
        let run = tempfile::Builder::new()
            .prefix("vp")
            .tempdir_in("/tmp")
            .unwrap();
        let mut v = Vmhost {
            child: None,
            port: common::free_port(),
            data,
            run,
            cgroup: format!("thaw-test-pool-{}-{name}", std::process::id()),
            host_id: format!("host_{name}"),
        };
        v.start(prefix);
        v
    }

    fn start(&mut self, prefix: &str) {
        let child = Command::new(env!("CARGO_BIN_EXE_vmhost"))
            .arg("serve")
            .arg(format!("--listen=127.0.0.1:{}", self.port))
            .arg(format!("--data-dir={}", self.data.path().display()))
            .arg(format!("--run-dir={}", self.run.path().display()))
            .arg(format!("--cache-dir={}", common::cache_dir().display()))
            .arg(format!(
                "--runtimes-dir={}",
                common::repo().join("runtimes").display()
            ))
            .arg(format!("--envd={}", common::envd().display()))
            .arg(format!("--cgroup-parent={}", self.cgroup))
            .arg("--register")
            .arg(format!("--redis-url={}", redis_url()))
            .arg(format!("--redis-prefix={prefix}"))
            .arg(format!("--host-id={}", self.host_id))
            .arg("--heartbeat-ms=200")
            .arg("--max-sandboxes=8")
            .env("RUST_LOG", "vmhost=warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn addr(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn sandbox_processes(&self) -> usize {
        common::sandbox_processes(self.run.path())
    }
}

impl Drop for Vmhost {
    fn drop(&mut self) {
        self.kill();
        common::remove_leftovers(&self.run.path().join("sandboxes"), &self.cgroup);
    }
}

struct Daemon(Child);

impl Daemon {
    fn spawn(prefix: &str, port: u16, target: &str) -> Daemon {
        Daemon(
            Command::new(workspace_bin("pool-manager"))
                .arg(format!("--listen=127.0.0.1:{port}"))
                .arg(format!("--redis-url={}", redis_url()))
                .arg(format!("--redis-prefix={prefix}"))
                .arg(format!("--target={target}"))
                .arg("--interval-ms=50")
                .arg("--lock-ttl-ms=1000")
                .env("RUST_LOG", "pool_manager=warn")
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn call(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (status, bytes) = common::raw(addr, method, path, bytes::Bytes::from(text)).await;
    (status, common::parse(&bytes))
}

/// Waits until `check` holds for the ready sandboxes per host.
async fn wait_ready<S: Store>(
    store: &S,
    hosts: &[&str],
    what: &str,
    check: impl Fn(&[usize]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut n = Vec::new();
        for h in hosts {
            n.push(store.ready_on_host(h).await.map(|v| v.len()).unwrap_or(0));
        }
        if check(&n) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: ready per host {n:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_die_daemons_die_and_the_pool_carries_on() {
    let prefix = format!("thaw-test-{}-{}:", std::process::id(), rand_suffix());
    let store = Arc::new(RedisStore::connect(&redis_url(), &prefix).await.unwrap());
    let mut a = Vmhost::spawn(&prefix, "a");
    let b = Vmhost::spawn(&prefix, "b");
    for v in [&a, &b] {
        common::wait_healthy(v.addr()).await;
        let (status, events) = common::raw(
            v.addr(),
            Method::POST,
            "/templates/python/build",
            bytes::Bytes::new(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(String::from_utf8_lossy(&events).contains("\"type\":\"result\""));
    }
    let port = common::free_port();
    let daemon_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let daemon = Daemon::spawn(&prefix, port, "python=4");
    common::wait_healthy(daemon_addr).await;
    let (a_id, b_id) = (a.host_id.clone(), b.host_id.clone());
    let ids = [a_id.as_str(), b_id.as_str()];
    // The target is met, spread over both hosts.
    wait_ready(&*store, &ids, "target met on both", |n| {
        n.iter().sum::<usize>() == 4 && n.iter().all(|&x| x > 0)
    })
    .await;

    // A lease through the daemon gives a paused sandbox that runs code.
    let (status, lease) = call(
        daemon_addr,
        Method::POST,
        "/leases",
        json!({"template": "python", "holder": "t1", "ttl_ms": 30000}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{lease}");
    let sb = &lease["sandbox"];
    let host = if sb["host_id"] == a.host_id {
        a.addr()
    } else {
        b.addr()
    };
    let sid = sb["sandbox_id"].as_str().unwrap();
    let (status, v) = call(
        host,
        Method::POST,
        &format!("/sandboxes/{sid}/resume"),
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, out) = call(
        host,
        Method::POST,
        &format!("/sandboxes/{sid}/run"),
        json!({"code": "print(6 * 7)"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(out.to_string().contains("NDIK"), "{out}"); // "42\n"
    let lease_id = lease["lease_id"].as_str().unwrap();
    let (status, v) = call(
        daemon_addr,
        Method::POST,
        &format!("/leases/{lease_id}/release"),
        json!({"holder": "t1"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    // The used sandbox is destroyed on its host, and the pool refills.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = call(host, Method::GET, &format!("/sandboxes/{sid}"), Value::Null).await;
        if v["state"] == "destroyed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the released sandbox lives on: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_ready(&*store, &ids, "refilled after a lease", |n| {
        n.iter().sum::<usize>() == 4
    })
    .await;

    // SIGKILL host a: its sandboxes leave the pool, the target is restored
    // on b, and every lease from now on comes from b.
    a.kill();
    wait_ready(&*store, &ids, "target restored on the survivor", |n| {
        n[0] == 0 && n[1] == 4
    })
    .await;
    for _ in 0..3 {
        let l = store
            .lease(
                "python",
                "t2",
                Duration::from_secs(30),
                pool_manager::now_ms(),
            )
            .await
            .unwrap()
            .expect("a ready sandbox on the survivor");
        assert_eq!(l.sandbox.host_id, b.host_id);
        store.release(&l.lease_id, "t2").await.unwrap();
        let (status, _) = call(
            b.addr(),
            Method::DELETE,
            &format!("/sandboxes/{}", l.sandbox.sandbox_id),
            Value::Null,
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    wait_ready(&*store, &ids, "refilled on the survivor", |n| n[1] == 4).await;
    // Nothing of a leaks once it starts again: it removes its orphans.
    assert!(a.sandbox_processes() > 0);
    a.start(&prefix);
    common::wait_healthy(a.addr()).await;
    // (A restarted host may get new warm sandboxes; the old ones are gone.)
    let (_, metrics) = common::raw(a.addr(), Method::GET, "/metrics", bytes::Bytes::new()).await;
    assert!(
        String::from_utf8_lossy(&metrics).contains("thaw_vmhost_orphans_removed_total"),
        "{metrics:?}"
    );
    assert!(!String::from_utf8_lossy(&metrics).contains("thaw_vmhost_orphans_removed_total 0"));

    // SIGKILL the daemon: leasing from ready sandboxes keeps working.
    drop(daemon);
    let l = store
        .lease(
            "python",
            "t3",
            Duration::from_secs(30),
            pool_manager::now_ms(),
        )
        .await
        .unwrap()
        .expect("ready sandboxes outlive the daemon");
    store.release(&l.lease_id, "t3").await.unwrap();
    // A standby daemon takes over the refilling once the lock lapses.
    let port2 = common::free_port();
    let standby = Daemon::spawn(&prefix, port2, "python=4");
    common::wait_healthy(format!("127.0.0.1:{port2}").parse().unwrap()).await;
    wait_ready(&*store, &ids, "the standby refills", |n| {
        n.iter().sum::<usize>() == 4
    })
    .await;
    drop(standby);
    // Leave nothing in Redis either.
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "redis-cli --scan --pattern '{prefix}*' | xargs -r redis-cli del > /dev/null"
        ))
        .status();
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        .into()
}
