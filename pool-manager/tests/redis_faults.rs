//! The Redis store across outages of a private `redis-server` (started on a
//! free loopback port, killed at the end even if the test fails):
//!
//! - hung (SIGSTOP): calls return `Unavailable` within the call timeout;
//!   scripts sent before the hang run when it ends, and a lease whose reply
//!   was lost that way is held by nobody until it is reaped: its sandbox is
//!   never handed out;
//! - killed: every call returns `Unavailable` at once (well within 3 s);
//! - started again on the same port: the same store serves again, without
//!   being recreated.
//!
//! Across all of it, no sandbox is handed out twice.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{host, random_prefix, sb, T0};
use pool_manager::store::redis::RedisStore;
use pool_manager::store::{Store, StoreError};

/// What the tests allow a call during an outage (the store's call timeout
/// is 2 s).
const BOUND: Duration = Duration::from_secs(3);
const TTL: Duration = Duration::from_secs(60);
const TEMPLATE: &str = "faults";

/// A private redis-server; killed on drop.
struct RedisServer {
    child: Option<Child>,
    port: u16,
}

impl RedisServer {
    fn start(port: u16) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/setup.sh installs it)");
        let server = RedisServer {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.answers() {
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {pid}");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sandboxes added and handed out, across the outages.
#[derive(Default)]
struct Ledger {
    added: u64,
    handed_out: HashSet<String>,
    lease_ids: HashSet<String>,
}

impl Ledger {
    async fn add(&mut self, store: &RedisStore, n: u64) {
        for _ in 0..n {
            self.added += 1;
            let id = format!("sb_{}", self.added);
            store.add_ready(&sb(&id, "host_f", TEMPLATE)).await.unwrap();
        }
    }

    /// Leases until the queue is empty; returns how many.
    async fn drain(&mut self, store: &RedisStore) -> usize {
        let mut n = 0;
        while let Some(l) = store.lease(TEMPLATE, "gw", TTL, T0).await.unwrap() {
            assert!(
                self.handed_out.insert(l.sandbox.sandbox_id.clone()),
                "{} handed out twice",
                l.sandbox.sandbox_id
            );
            self.lease_ids.insert(l.lease_id);
            n += 1;
        }
        n
    }
}

/// Runs `f` and checks it failed as unavailable within [`BOUND`].
async fn assert_unavailable<T: std::fmt::Debug>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) {
    let t = Instant::now();
    let r = f.await;
    let took = t.elapsed();
    assert!(
        matches!(r, Err(StoreError::Unavailable(_))),
        "{what}: expected Unavailable, got {r:?}"
    );
    assert!(took < BOUND, "{what} took {took:?}");
}

/// Every method of the store, all at once (a hung Redis makes each wait
/// for the timeout), each expected to fail in bounded time. They touch a
/// template, host and sandbox of their own, so whatever a hung Redis runs
/// later leaves the test's ledger alone.
async fn every_call_is_unavailable(store: &RedisStore) {
    let s = sb("sb_probe", "host_probe", "probe");
    let h = host("host_probe");
    let t = Instant::now();
    tokio::join!(
        assert_unavailable("ping", store.ping()),
        assert_unavailable("add_ready", store.add_ready(&s)),
        assert_unavailable("lease", store.lease("probe", "gw", TTL, T0)),
        assert_unavailable("renew", store.renew("lease_x", "gw", TTL, T0)),
        assert_unavailable("release", store.release("lease_x", "gw")),
        assert_unavailable("park", store.park("o", &s)),
        assert_unavailable(
            "lease_parked",
            store.lease_parked("o", "sb_probe", "gw", TTL, T0)
        ),
        assert_unavailable("reap_expired", store.reap_expired(0, 10)),
        assert_unavailable("heartbeat", store.heartbeat(&h, TTL, T0)),
        assert_unavailable("hosts", store.hosts(T0)),
        assert_unavailable("evict_dead_hosts", store.evict_dead_hosts(0)),
        assert_unavailable("ready_on_host", store.ready_on_host("host_probe")),
        assert_unavailable("set_target", store.set_target("probe", 1)),
        assert_unavailable("counts", store.counts()),
        assert_unavailable("try_lock", store.try_lock("l", "o", TTL, T0)),
        assert_unavailable("unlock", store.unlock("l", "o")),
    );
    assert!(
        t.elapsed() < BOUND,
        "all calls together took {:?}",
        t.elapsed()
    );
}

/// Waits until the store answers again; panics after 10 s.
async fn wait_until_served(store: &RedisStore) -> Duration {
    let t = Instant::now();
    loop {
        if store.ping().await.is_ok() {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the store did not recover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_give_unavailable_in_bounded_time_and_the_store_recovers() {
    let port = free_port();
    let mut server = RedisServer::start(port);
    let store = Arc::new(
        RedisStore::connect(&server.url(), &random_prefix("faults"))
            .await
            .unwrap(),
    );
    let mut ledger = Ledger::default();
    store
        .heartbeat(&host("host_f"), Duration::from_secs(3600), T0)
        .await
        .unwrap();
    ledger.add(&store, 40).await;
    for _ in 0..10 {
        let l = store.lease(TEMPLATE, "gw", TTL, T0).await.unwrap().unwrap();
        assert!(ledger.handed_out.insert(l.sandbox.sandbox_id));
        ledger.lease_ids.insert(l.lease_id);
    }

    // Hung: every call times out, 16 leases at once among them.
    server.signal("STOP");
    let t = Instant::now();
    let hung: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.lease(TEMPLATE, "gw", TTL, T0).await })
        })
        .collect();
    for h in hung {
        let r = h.await.unwrap();
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    }
    assert!(t.elapsed() < BOUND, "hung leases took {:?}", t.elapsed());
    every_call_is_unavailable(&store).await;
    server.signal("CONT");
    let recovered = wait_until_served(&store).await;
    println!("hung redis resumed: served again after {recovered:?}");

    // The scripts sent during the hang ran when it ended: their leases
    // (replies lost) hold sandboxes nobody was given. Every sandbox is
    // either handed out, held by such an orphan, or still ready.
    let drained = ledger.drain(&store).await;
    let all = store.reap_expired(T0 + 2 * 60_000, 1_000).await.unwrap();
    let orphans: Vec<_> = all
        .iter()
        .filter(|l| l.sandbox.template == TEMPLATE && !ledger.lease_ids.contains(&l.lease_id))
        .collect();
    for o in &orphans {
        assert!(
            !ledger.handed_out.contains(&o.sandbox.sandbox_id),
            "{} was handed out and also leased to nobody",
            o.sandbox.sandbox_id
        );
    }
    assert_eq!(ledger.handed_out.len() + orphans.len(), 40);
    println!(
        "after the hang: {drained} leased, {} orphan leases reaped",
        orphans.len()
    );

    // Killed: every call fails at once, also many at the same time.
    server.kill();
    every_call_is_unavailable(&store).await;
    let t = Instant::now();
    let down: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.lease(TEMPLATE, "gw", TTL, T0).await })
        })
        .collect();
    for h in down {
        assert!(matches!(h.await.unwrap(), Err(StoreError::Unavailable(_))));
    }
    assert!(t.elapsed() < BOUND);

    // Back on the same port, empty (no persistence): the same store serves
    // again once the pool re-registers and refills.
    let server = RedisServer::start(port);
    let recovered = wait_until_served(&store).await;
    println!("restarted redis: served again after {recovered:?}");
    assert!(store
        .lease(TEMPLATE, "gw", TTL, T0)
        .await
        .unwrap()
        .is_none());
    store
        .heartbeat(&host("host_f"), Duration::from_secs(3600), T0)
        .await
        .unwrap();
    ledger.add(&store, 30).await;
    assert_eq!(ledger.drain(&store).await, 30);
    assert_eq!(store.counts().await.unwrap()[TEMPLATE].leased, 30);
    drop(server);
}

#[tokio::test]
async fn connect_to_nothing_fails_in_bounded_time() {
    // A port nothing listens on: refused at once.
    let port = free_port();
    let t = Instant::now();
    let r = RedisStore::connect(&format!("redis://127.0.0.1:{port}"), "thaw-test:").await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert!(t.elapsed() < BOUND);
    // A lazy store on it answers every call with Unavailable.
    let store = RedisStore::lazy(
        &format!("redis://127.0.0.1:{port}"),
        "thaw-test:",
        Default::default(),
    )
    .unwrap();
    every_call_is_unavailable(&store).await;
    // Bad configuration is refused before any I/O.
    assert!(RedisStore::lazy("redis://127.0.0.1:6379", "", Default::default()).is_err());
    assert!(RedisStore::lazy("not a url", "p:", Default::default()).is_err());
}
