//! Many callers at once, against memory and against a real Redis: 32 tasks
//! lease (at least 100,000 leases a run) while producers refill the queue,
//! a reaper whose clock runs a lease-TTL ahead races every release, and
//! every lease is checked as it is made: no sandbox is ever handed out
//! twice, none of a dead host's, and every lease ends exactly once (its
//! holder's release or the reaper, never both).

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{host, sb, RedisFixture, T0};
use pool_manager::store::memory::MemoryStore;
use pool_manager::store::{Store, StoreError};

/// Leases a run makes, at least.
const LEASES: u64 = 100_000;
/// Concurrent leasing tasks.
const LEASERS: usize = 32;
/// Concurrent producers (enough that the leasers seldom find the queue
/// empty: each add is a round trip).
const PRODUCERS: usize = 16;
/// Producers keep at most this many sandboxes ready ahead of the leases.
const AHEAD: u64 = 2_000;
/// Every this-many-th sandbox is put on a dead host.
const DEAD_EVERY: u64 = 10;
const TEMPLATE: &str = "conc";
const LEASE_TTL: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Shared {
    /// Sandbox ids handed out so far.
    handed_out: Mutex<HashSet<String>>,
    /// Lease ids ended by their holder's release.
    released: Mutex<HashSet<String>>,
    /// Lease ids the reaper took.
    reaped: Mutex<HashSet<String>>,
    /// Lease ids made, with whether the holder meant to release it.
    made: Mutex<Vec<String>>,
    leases: AtomicU64,
    /// Sandboxes added, and of those on the live host.
    produced: AtomicU64,
    produced_live: AtomicU64,
    done: AtomicBool,
}

async fn producer<S: Store>(store: Arc<S>, shared: Arc<Shared>, index: usize) {
    let mut n = 0u64;
    while !shared.done.load(Ordering::Relaxed) {
        // Only live sandboxes count: a dead host's are dropped, not leased.
        let ahead = shared
            .produced_live
            .load(Ordering::Relaxed)
            .saturating_sub(shared.leases.load(Ordering::Relaxed));
        if ahead >= AHEAD {
            tokio::task::yield_now().await;
            continue;
        }
        n += 1;
        let dead = n % DEAD_EVERY == 0;
        let host_id = if dead { "host_dead" } else { "host_live" };
        store
            .add_ready(&sb(&format!("sb_{index}_{n}"), host_id, TEMPLATE))
            .await
            .unwrap();
        shared.produced.fetch_add(1, Ordering::Relaxed);
        if !dead {
            shared.produced_live.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn leaser<S: Store>(store: Arc<S>, shared: Arc<Shared>, index: usize) {
    let holder = format!("gw_{index}");
    let mut mine = 0u64;
    while shared.leases.load(Ordering::Relaxed) < LEASES {
        let Some(lease) = store.lease(TEMPLATE, &holder, LEASE_TTL, T0).await.unwrap() else {
            // Empty for now: give the producers the store for a moment.
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        shared.leases.fetch_add(1, Ordering::Relaxed);
        assert_eq!(lease.holder, holder);
        assert_eq!(
            lease.sandbox.host_id, "host_live",
            "a dead host's sandbox was leased"
        );
        assert!(
            shared
                .handed_out
                .lock()
                .unwrap()
                .insert(lease.sandbox.sandbox_id.clone()),
            "{} was handed out twice",
            lease.sandbox.sandbox_id
        );
        shared.made.lock().unwrap().push(lease.lease_id.clone());
        mine += 1;
        // One lease in four is abandoned, as by a crashed gateway; the
        // others are released, racing the reaper.
        if mine % 4 == 0 {
            continue;
        }
        match store.release(&lease.lease_id, &holder).await {
            Ok(back) => {
                assert_eq!(back, lease.sandbox);
                assert!(shared.released.lock().unwrap().insert(lease.lease_id));
            }
            // The reaper was first; it must say so (checked at the end).
            Err(StoreError::LeaseNotHeld(_)) => {}
            Err(e) => panic!("release: {e}"),
        }
    }
}

async fn reaper<S: Store>(store: Arc<S>, shared: Arc<Shared>) {
    // A clock one TTL ahead: every lease has lapsed for this reaper.
    let now = T0 + u64::try_from(LEASE_TTL.as_millis()).unwrap();
    loop {
        let finished = shared.done.load(Ordering::Relaxed);
        let got = store.reap_expired(now, 16).await.unwrap();
        for l in &got {
            assert!(
                shared.reaped.lock().unwrap().insert(l.lease_id.clone()),
                "lease {} reaped twice",
                l.lease_id
            );
        }
        if got.is_empty() && finished {
            return;
        }
        // A background reaper's pace: at most 16 a millisecond, so the
        // holders' releases and the reaper both win some of the races.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn hammer<S: Store>(store: Arc<S>, what: &str) {
    let started = Instant::now();
    store
        .heartbeat(&host("host_live"), Duration::from_secs(3600), T0)
        .await
        .unwrap();
    store
        .heartbeat(&host("host_dead"), Duration::from_secs(1), T0 - 1_000)
        .await
        .unwrap();
    let shared = Arc::new(Shared::default());
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|i| tokio::spawn(producer(store.clone(), shared.clone(), i)))
        .collect();
    let reaper = tokio::spawn(reaper(store.clone(), shared.clone()));
    let leasers: Vec<_> = (0..LEASERS)
        .map(|i| tokio::spawn(leaser(store.clone(), shared.clone(), i)))
        .collect();
    for t in leasers {
        t.await.unwrap();
    }
    shared.done.store(true, Ordering::Relaxed);
    for t in producers {
        t.await.unwrap();
    }
    reaper.await.unwrap();
    let elapsed = started.elapsed();

    let made = shared.made.lock().unwrap().clone();
    let released = shared.released.lock().unwrap().clone();
    let reaped = shared.reaped.lock().unwrap().clone();
    let leases = shared.leases.load(Ordering::Relaxed);
    assert!(leases >= LEASES);
    assert_eq!(made.len() as u64, leases);
    assert_eq!(shared.handed_out.lock().unwrap().len() as u64, leases);
    // Every lease ended exactly once.
    assert!(
        released.is_disjoint(&reaped),
        "a lease was both released and reaped"
    );
    assert_eq!(released.len() + reaped.len(), made.len());
    assert!(made
        .iter()
        .all(|l| released.contains(l) || reaped.contains(l)));
    // Nothing is leased any more; what was produced and not leased is
    // ready (or was a dead host's and dropped on the way).
    let counts = store.counts().await.unwrap();
    let c = counts.get(TEMPLATE).copied().unwrap_or_default();
    assert_eq!(c.leased, 0);
    let produced = shared.produced.load(Ordering::Relaxed);
    let produced_live = shared.produced_live.load(Ordering::Relaxed);
    assert!(c.ready <= produced - leases);
    assert!(c.ready >= produced_live - leases);
    println!(
        "{what}: {leases} leases ({} released, {} reaped), {produced} produced, {} ready left, in {:.2} s ({:.0} leases/s)",
        released.len(),
        reaped.len(),
        c.ready,
        elapsed.as_secs_f64(),
        leases as f64 / elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_never_hands_a_sandbox_out_twice() {
    hammer(Arc::new(MemoryStore::new()), "memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_never_hands_a_sandbox_out_twice() {
    let fx = RedisFixture::new("concurrency").await;
    hammer(fx.store.clone(), "redis").await;
}
