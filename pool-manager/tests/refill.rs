//! The refiller's decisions, on the in-memory store with fake hosts (the
//! end-to-end run with real vmhosts, Redis and daemons is
//! vmhost/tests/pool_multihost.rs): placement by free room, host limits,
//! back-off from a failing host, reaping lapsed leases, evicting dead
//! hosts, one refiller at a time.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pool_manager::hosts::{Hosts, HostsError};
use pool_manager::metrics::Metrics;
use pool_manager::now_ms;
use pool_manager::refill::{RefillConfig, Refiller};
use pool_manager::store::memory::MemoryStore;
use pool_manager::store::{HostInfo, Store};

/// Hosts that make sandboxes at once, or fail on demand.
#[derive(Debug, Default)]
struct FakeHosts {
    made: Mutex<Vec<(String, String)>>,
    destroyed: Mutex<Vec<String>>,
    failing: Mutex<HashSet<String>>,
    /// (host, template) pairs that fail: a host without that template.
    missing: Mutex<HashSet<(String, String)>>,
    attempts: Mutex<Vec<String>>,
    counter: Mutex<u64>,
}

impl Hosts for FakeHosts {
    async fn create_paused(&self, host: &HostInfo, template: &str) -> Result<String, HostsError> {
        self.attempts.lock().unwrap().push(host.host_id.clone());
        let missing = self
            .missing
            .lock()
            .unwrap()
            .contains(&(host.host_id.clone(), template.to_string()));
        if missing || self.failing.lock().unwrap().contains(&host.host_id) {
            return Err(HostsError::Unreachable {
                host_id: host.host_id.clone(),
                message: "down".into(),
            });
        }
        let mut n = self.counter.lock().unwrap();
        *n += 1;
        let id = format!("sb_{}_{n}", host.host_id);
        self.made
            .lock()
            .unwrap()
            .push((host.host_id.clone(), template.to_string()));
        Ok(id)
    }

    async fn destroy(&self, _host: &HostInfo, sandbox_id: &str) -> Result<(), HostsError> {
        self.destroyed.lock().unwrap().push(sandbox_id.to_string());
        Ok(())
    }
}

fn host(id: &str, max: u64, used: u64) -> HostInfo {
    HostInfo {
        host_id: id.into(),
        url: format!("http://{id}"),
        max_sandboxes: max,
        sandboxes: used,
        memory_bytes: 1 << 34,
        memory_available_bytes: 1 << 33,
    }
}

fn refiller(
    store: &Arc<MemoryStore>,
    hosts: &Arc<FakeHosts>,
    owner: &str,
) -> Arc<Refiller<MemoryStore, FakeHosts>> {
    Refiller::new(
        store.clone(),
        hosts.clone(),
        RefillConfig {
            owner: owner.into(),
            per_host_parallel: 100,
            backoff: Duration::from_secs(60),
            ..RefillConfig::default()
        },
        Metrics::new(),
    )
}

/// Lets the spawned creations finish.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn ready_by_host(store: &MemoryStore, ids: &[&str]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for id in ids {
        m.insert(
            (*id).to_string(),
            store.ready_on_host(id).await.unwrap().len(),
        );
    }
    m
}

#[tokio::test]
async fn targets_are_met_on_the_hosts_with_room_and_never_beyond_their_limits() {
    let store = Arc::new(MemoryStore::new());
    let hosts = Arc::new(FakeHosts::default());
    let now = now_ms();
    store
        .heartbeat(&host("host_big", 10, 0), Duration::from_secs(60), now)
        .await
        .unwrap();
    store
        .heartbeat(&host("host_small", 2, 1), Duration::from_secs(60), now)
        .await
        .unwrap();
    store.set_target("python", 8).await.unwrap();
    store.set_target("node", 3).await.unwrap();
    let r = refiller(&store, &hosts, "r1");
    let pass = r.pass().await.unwrap();
    assert!(pass.leader);
    settle().await;
    let counts = store.counts().await.unwrap();
    assert_eq!(counts["python"].ready + counts["node"].ready, 11);
    let by_host = ready_by_host(&store, &["host_big", "host_small"]).await;
    // host_small had room for one more; host_big takes the rest.
    assert_eq!(by_host["host_small"], 1, "{by_host:?}");
    assert_eq!(by_host["host_big"], 10, "{by_host:?}");
    // A second pass with the target met starts nothing.
    let pass = r.pass().await.unwrap();
    assert!(pass.started.is_empty(), "{pass:?}");
    // A third target nobody has room for stays unmet rather than overfill.
    store.set_target("bash", 5).await.unwrap();
    store
        .heartbeat(&host("host_big", 10, 10), Duration::from_secs(60), now_ms())
        .await
        .unwrap();
    store
        .heartbeat(&host("host_small", 2, 2), Duration::from_secs(60), now_ms())
        .await
        .unwrap();
    let pass = r.pass().await.unwrap();
    assert!(pass.started.is_empty(), "{pass:?}");
}

#[tokio::test]
async fn a_failing_host_is_backed_off_and_the_other_takes_over() {
    let store = Arc::new(MemoryStore::new());
    let hosts = Arc::new(FakeHosts::default());
    let now = now_ms();
    store
        .heartbeat(&host("host_a", 50, 0), Duration::from_secs(60), now)
        .await
        .unwrap();
    store
        .heartbeat(&host("host_b", 10, 0), Duration::from_secs(60), now)
        .await
        .unwrap();
    hosts.failing.lock().unwrap().insert("host_a".into());
    store.set_target("python", 4).await.unwrap();
    let r = refiller(&store, &hosts, "r1");
    // host_a has the most room and fails; then it is backed off.
    for _ in 0..5 {
        r.pass().await.unwrap();
        settle().await;
    }
    let by_host = ready_by_host(&store, &["host_a", "host_b"]).await;
    assert_eq!(by_host["host_a"], 0);
    assert_eq!(by_host["host_b"], 4, "{by_host:?}");
    // Tried in the first pass only (before its failures were known), then
    // left alone for the back-off.
    let attempts_on_a = hosts
        .attempts
        .lock()
        .unwrap()
        .iter()
        .filter(|h| *h == "host_a")
        .count();
    assert_eq!(attempts_on_a, 4);
}

#[tokio::test]
async fn lapsed_leases_are_reaped_and_dead_hosts_evicted() {
    let store = Arc::new(MemoryStore::new());
    let hosts = Arc::new(FakeHosts::default());
    let now = now_ms();
    store
        .heartbeat(&host("host_a", 10, 0), Duration::from_secs(60), now)
        .await
        .unwrap();
    store
        .heartbeat(&host("host_b", 10, 0), Duration::from_millis(50), now)
        .await
        .unwrap();
    store.set_target("python", 4).await.unwrap();
    let r = refiller(&store, &hosts, "r1");
    r.pass().await.unwrap();
    settle().await;
    assert_eq!(store.counts().await.unwrap()["python"].ready, 4);
    // A holder that crashed: its lease lapses and is taken back.
    let l = store
        .lease(
            "python",
            "crashed-gateway",
            Duration::from_millis(10),
            now_ms(),
        )
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    // host_b's heartbeat has lapsed too.
    store
        .heartbeat(&host("host_a", 10, 4), Duration::from_secs(60), now_ms())
        .await
        .unwrap();
    let pass = r.pass().await.unwrap();
    settle().await;
    assert_eq!(pass.reaped, 1, "{pass:?}");
    if l.sandbox.host_id == "host_a" {
        assert!(hosts
            .destroyed
            .lock()
            .unwrap()
            .contains(&l.sandbox.sandbox_id));
    }
    // Everything ready is on the live host now, at the target.
    let by_host = ready_by_host(&store, &["host_a", "host_b"]).await;
    assert_eq!(by_host["host_b"], 0, "{by_host:?}");
    r.pass().await.unwrap();
    settle().await;
    assert_eq!(ready_by_host(&store, &["host_a"]).await["host_a"], 4);
}

#[tokio::test]
async fn only_one_refiller_acts_and_another_takes_over_when_it_stops() {
    let store = Arc::new(MemoryStore::new());
    let hosts = Arc::new(FakeHosts::default());
    store
        .heartbeat(&host("host_a", 10, 0), Duration::from_secs(60), now_ms())
        .await
        .unwrap();
    store.set_target("python", 1).await.unwrap();
    let first = refiller(&store, &hosts, "r1");
    let second = Refiller::new(
        store.clone(),
        hosts.clone(),
        RefillConfig {
            owner: "r2".into(),
            ..RefillConfig::default()
        },
        Metrics::new(),
    );
    assert!(first.pass().await.unwrap().leader);
    assert!(!second.pass().await.unwrap().leader);
    // The first stops (its lock is given up, as on shutdown).
    store
        .unlock(pool_manager::refill::LOCK, "r1")
        .await
        .unwrap();
    assert!(second.pass().await.unwrap().leader);
    assert!(!first.pass().await.unwrap().leader);
}

#[tokio::test]
async fn a_host_missing_one_template_still_takes_the_others() {
    let store = Arc::new(MemoryStore::new());
    let hosts = Arc::new(FakeHosts::default());
    store
        .heartbeat(&host("host_a", 20, 0), Duration::from_secs(60), now_ms())
        .await
        .unwrap();
    hosts
        .missing
        .lock()
        .unwrap()
        .insert(("host_a".into(), "node".into()));
    store.set_target("node", 2).await.unwrap();
    store.set_target("python", 3).await.unwrap();
    let r = refiller(&store, &hosts, "r1");
    for _ in 0..3 {
        r.pass().await.unwrap();
        settle().await;
    }
    let counts = store.counts().await.unwrap();
    assert_eq!((counts["python"].ready, counts["node"].ready), (3, 0));
}
