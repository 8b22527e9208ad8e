//! The conformance suite every [`Store`] passes, one async function per area,
//! generic over the store, plus the Redis fixture the store tests share: a
//! random key prefix per test, every key under it deleted when the fixture
//! is dropped (also when the test fails).
//!
//! Times are made up (`T0` and offsets from it): the store takes the
//! caller's clock, so nothing here sleeps.

// Each test crate uses a different part of this module.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use pool_manager::store::redis::{RedisStore, RedisStoreOptions};
use pool_manager::store::{HostInfo, Lease, PoolSandbox, Store, StoreError, TemplateCounts};

/// A made-up "now", Unix milliseconds.
pub const T0: u64 = 1_700_000_000_000;
/// Hosts sent a heartbeat at `T0` live this long.
pub const HOST_TTL: Duration = Duration::from_secs(30);
/// Leases in the suite last this long unless a test says otherwise.
pub const LEASE_TTL: Duration = Duration::from_secs(60);

/// The Redis the tests use: `REDIS_URL`, or the local default.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix no other test uses.
pub fn random_prefix(what: &str) -> String {
    format!("thaw-test:{what}:{:016x}:", rand::random::<u64>())
}

/// A [`RedisStore`] under a random prefix whose keys are deleted on drop.
pub struct RedisFixture {
    /// The store (shared, for tests that hand it to tasks).
    pub store: Arc<RedisStore>,
    url: String,
}

impl RedisFixture {
    /// Connects to [`redis_url`] under a fresh prefix.
    pub async fn new(what: &str) -> RedisFixture {
        RedisFixture::with_url(&redis_url(), what, RedisStoreOptions::default()).await
    }

    /// Connects to `url` under a fresh prefix, with `options`.
    pub async fn with_url(url: &str, what: &str, options: RedisStoreOptions) -> RedisFixture {
        let store = RedisStore::connect_with(url, &random_prefix(what), options)
            .await
            .unwrap_or_else(|e| panic!("Redis at {url} (scripts/setup.sh starts one): {e}"));
        RedisFixture {
            store: Arc::new(store),
            url: url.to_owned(),
        }
    }
}

impl Drop for RedisFixture {
    fn drop(&mut self) {
        // Synchronous on purpose: Drop cannot await, and this must also run
        // while a failed test unwinds. A Redis that is down keeps the keys.
        let _ = delete_prefix(&self.url, self.store.prefix());
    }
}

/// Deletes every key under `prefix` over a plain blocking connection.
pub fn delete_prefix(url: &str, prefix: &str) -> redis::RedisResult<()> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut conn)?;
    if !keys.is_empty() {
        redis::cmd("DEL").arg(&keys).exec(&mut conn)?;
    }
    Ok(())
}

/// A sandbox of `template` on `host`.
pub fn sb(id: &str, host: &str, template: &str) -> PoolSandbox {
    PoolSandbox {
        sandbox_id: id.to_owned(),
        host_id: host.to_owned(),
        template: template.to_owned(),
    }
}

/// A host record.
pub fn host(id: &str) -> HostInfo {
    HostInfo {
        host_id: id.to_owned(),
        url: format!("http://127.0.0.1:7070/{id}"),
        max_sandboxes: 64,
        sandboxes: 3,
        memory_bytes: 16 << 30,
        memory_available_bytes: 8 << 30,
    }
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap()
}

fn ids(sbs: &[PoolSandbox]) -> BTreeSet<String> {
    sbs.iter().map(|s| s.sandbox_id.clone()).collect()
}

fn counts_of(ready: u64, leased: u64, target: u64) -> TemplateCounts {
    TemplateCounts {
        ready,
        leased,
        target,
    }
}

async fn lease_one<S: Store>(store: &S, template: &str, holder: &str, now: u64) -> Lease {
    store
        .lease(template, holder, LEASE_TTL, now)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no {template} sandbox to lease"))
}

fn assert_not_held<T: std::fmt::Debug>(r: Result<T, StoreError>, lease_id: &str) {
    match r {
        Err(StoreError::LeaseNotHeld(id)) => assert_eq!(id, lease_id),
        other => panic!("expected LeaseNotHeld({lease_id}), got {other:?}"),
    }
}

/// Every area, in turn.
pub async fn run_suite<S: Store>(store: &S) {
    fifo_and_empty(store).await;
    dead_hosts_are_skipped_and_dropped(store).await;
    renew(store).await;
    release(store).await;
    reap(store).await;
    park(store).await;
    evict_dead_hosts(store).await;
    hosts(store).await;
    ready_on_host(store).await;
    counts(store).await;
    locks(store).await;
    adds_are_idempotent(store).await;
}

/// Leases come out oldest first, per template; an empty or unknown
/// template gives `None`. Template names are this function's own, so it
/// can share a store with the other areas.
pub async fn fifo_and_empty<S: Store>(store: &S) {
    store
        .heartbeat(&host("host_f1"), HOST_TTL, T0)
        .await
        .unwrap();
    assert!(store
        .lease("fifo", "gw", LEASE_TTL, T0)
        .await
        .unwrap()
        .is_none());
    for id in ["sb_f1", "sb_f2", "sb_f3"] {
        store.add_ready(&sb(id, "host_f1", "fifo")).await.unwrap();
    }
    store
        .add_ready(&sb("sb_fo", "host_f1", "fifo_other"))
        .await
        .unwrap();

    let mut lease_ids = BTreeSet::new();
    for (i, want) in ["sb_f1", "sb_f2", "sb_f3"].into_iter().enumerate() {
        let now = T0 + 10 * i as u64;
        let l = lease_one(store, "fifo", "gw", now).await;
        assert_eq!(l.sandbox, sb(want, "host_f1", "fifo"));
        assert_eq!(l.holder, "gw");
        assert_eq!(l.expires_at_ms, now + ms(LEASE_TTL));
        assert!(l.lease_id.starts_with("lease_"), "{}", l.lease_id);
        assert!(lease_ids.insert(l.lease_id), "lease ids are unique");
    }
    assert!(store
        .lease("fifo", "gw", LEASE_TTL, T0)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .lease("fifo_nothing", "gw", LEASE_TTL, T0)
        .await
        .unwrap()
        .is_none());
    // The other template's queue was not touched.
    let l = lease_one(store, "fifo_other", "gw", T0).await;
    assert_eq!(l.sandbox.sandbox_id, "sb_fo");

    // Interleaved adds and leases keep the order.
    store
        .add_ready(&sb("sb_f4", "host_f1", "fifo"))
        .await
        .unwrap();
    store
        .add_ready(&sb("sb_f5", "host_f1", "fifo"))
        .await
        .unwrap();
    assert_eq!(
        lease_one(store, "fifo", "gw", T0).await.sandbox.sandbox_id,
        "sb_f4"
    );
    store
        .add_ready(&sb("sb_f6", "host_f1", "fifo"))
        .await
        .unwrap();
    assert_eq!(
        lease_one(store, "fifo", "gw", T0).await.sandbox.sandbox_id,
        "sb_f5"
    );
    assert_eq!(
        lease_one(store, "fifo", "gw", T0).await.sandbox.sandbox_id,
        "sb_f6"
    );
}

/// Ready sandboxes of a dead or never-registered host are skipped by a
/// lease and leave the pool.
pub async fn dead_hosts_are_skipped_and_dropped<S: Store>(store: &S) {
    store
        .heartbeat(&host("host_d_live"), HOST_TTL, T0)
        .await
        .unwrap();
    // Its heartbeat ends exactly at T0: dead at T0.
    store
        .heartbeat(&host("host_d_dead"), Duration::from_secs(5), T0 - 5_000)
        .await
        .unwrap();
    store
        .add_ready(&sb("sb_d1", "host_d_dead", "dead"))
        .await
        .unwrap();
    store
        .add_ready(&sb("sb_d2", "host_d_unknown", "dead"))
        .await
        .unwrap();
    store
        .add_ready(&sb("sb_d3", "host_d_live", "dead"))
        .await
        .unwrap();
    store
        .add_ready(&sb("sb_d4", "host_d_dead", "dead"))
        .await
        .unwrap();
    assert_eq!(store.counts().await.unwrap()["dead"].ready, 4);

    let l = lease_one(store, "dead", "gw", T0).await;
    assert_eq!(l.sandbox, sb("sb_d3", "host_d_live", "dead"));
    assert_eq!(store.counts().await.unwrap()["dead"], counts_of(1, 1, 0));
    assert!(store
        .lease("dead", "gw", LEASE_TTL, T0)
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.counts().await.unwrap()["dead"], counts_of(0, 1, 0));
    assert!(store.ready_on_host("host_d_dead").await.unwrap().is_empty());

    // Dropped means gone: the same sandbox may be added again later.
    store
        .add_ready(&sb("sb_d1", "host_d_live", "dead"))
        .await
        .unwrap();
    assert_eq!(
        lease_one(store, "dead", "gw", T0).await.sandbox.sandbox_id,
        "sb_d1"
    );
    // A host is alive until its heartbeat's end, not at it.
    store
        .add_ready(&sb("sb_d5", "host_d_live", "dead"))
        .await
        .unwrap();
    let end = T0 + ms(HOST_TTL);
    assert!(store
        .lease("dead", "gw", LEASE_TTL, end)
        .await
        .unwrap()
        .is_none());
    store.release(&l.lease_id, "gw").await.unwrap();
}

/// Renew extends a lease its holder holds; anyone else, a lapsed lease or
/// an unknown id get `LeaseNotHeld`; a dead host gives `HostDead`.
pub async fn renew<S: Store>(store: &S) {
    store
        .heartbeat(&host("host_r"), HOST_TTL, T0)
        .await
        .unwrap();
    for id in ["sb_r1", "sb_r2"] {
        store.add_ready(&sb(id, "host_r", "renew")).await.unwrap();
    }
    let l = lease_one(store, "renew", "gw_a", T0).await;

    assert_not_held(
        store.renew(&l.lease_id, "gw_b", LEASE_TTL, T0 + 1).await,
        &l.lease_id,
    );
    for bogus in [
        "lease_nope",
        "",
        "lease_00000000000000000000000000000000",
        "sb_r1",
    ] {
        assert_not_held(store.renew(bogus, "gw_a", LEASE_TTL, T0 + 1).await, bogus);
    }

    let ttl = Duration::from_secs(10);
    let r = store
        .renew(&l.lease_id, "gw_a", ttl, T0 + 1_000)
        .await
        .unwrap();
    assert_eq!(r.lease_id, l.lease_id);
    assert_eq!(r.sandbox, l.sandbox);
    assert_eq!(r.holder, "gw_a");
    assert_eq!(r.expires_at_ms, T0 + 11_000);
    // A renewal may shorten as well as extend: it is `now + ttl`.
    let r = store
        .renew(&l.lease_id, "gw_a", ttl, T0 + 2_000)
        .await
        .unwrap();
    assert_eq!(r.expires_at_ms, T0 + 12_000);

    // At its end the lease is over; later too.
    assert_not_held(
        store.renew(&l.lease_id, "gw_a", ttl, T0 + 12_000).await,
        &l.lease_id,
    );
    assert_not_held(
        store.renew(&l.lease_id, "gw_a", ttl, T0 + 99_000).await,
        &l.lease_id,
    );

    // A lease that outlives its host's heartbeat: HostDead, and the lease
    // is still there for its holder to release.
    let l2 = lease_one(store, "renew", "gw_a", T0).await;
    let after_host = T0 + ms(HOST_TTL) + 1;
    match store.renew(&l2.lease_id, "gw_a", ttl, after_host).await {
        Err(StoreError::HostDead { lease_id, host_id }) => {
            assert_eq!(lease_id, l2.lease_id);
            assert_eq!(host_id, "host_r");
        }
        other => panic!("expected HostDead, got {other:?}"),
    }
    // The wrong holder learns nothing about the host.
    assert_not_held(
        store.renew(&l2.lease_id, "gw_b", ttl, after_host).await,
        &l2.lease_id,
    );
    assert_eq!(
        store.release(&l2.lease_id, "gw_a").await.unwrap(),
        sb("sb_r2", "host_r", "renew")
    );
    store.reap_expired(T0 + 99_000, 100).await.unwrap();
}

/// Release returns the sandbox to the holder alone, once.
pub async fn release<S: Store>(store: &S) {
    store
        .heartbeat(&host("host_l"), HOST_TTL, T0)
        .await
        .unwrap();
    store
        .add_ready(&sb("sb_l1", "host_l", "release"))
        .await
        .unwrap();
    let l = lease_one(store, "release", "gw_a", T0).await;
    assert_eq!(store.counts().await.unwrap()["release"], counts_of(0, 1, 0));

    assert_not_held(store.release(&l.lease_id, "gw_b").await, &l.lease_id);
    assert_not_held(store.release("lease_nope", "gw_a").await, "lease_nope");
    // The failed releases changed nothing.
    assert!(store
        .renew(&l.lease_id, "gw_a", LEASE_TTL, T0 + 1)
        .await
        .is_ok());

    let back = store.release(&l.lease_id, "gw_a").await.unwrap();
    assert_eq!(back, sb("sb_l1", "host_l", "release"));
    assert!(!store.counts().await.unwrap().contains_key("release"));
    assert_not_held(store.release(&l.lease_id, "gw_a").await, &l.lease_id);
    assert_not_held(
        store.renew(&l.lease_id, "gw_a", LEASE_TTL, T0 + 2).await,
        &l.lease_id,
    );
    assert!(store
        .reap_expired(u64::MAX >> 12, 100)
        .await
        .unwrap()
        .iter()
        .all(|x| x.lease_id != l.lease_id));

    // A released sandbox left the pool: it can come back as a new one.
    store.add_ready(&back).await.unwrap();
    let again = lease_one(store, "release", "gw_b", T0).await;
    assert_eq!(again.sandbox, back);
    assert_ne!(again.lease_id, l.lease_id);

    // Release does not read the clock: a lapsed lease no reaper took yet is
    // still its holder's to release, and then the reaper does not see it.
    let lapsed = again.expires_at_ms + 1;
    assert_eq!(store.release(&again.lease_id, "gw_b").await.unwrap(), back);
    assert!(store.reap_expired(lapsed, 100).await.unwrap().is_empty());
}

/// Reap returns exactly the lapsed leases, soonest first, each once.
pub async fn reap<S: Store>(store: &S) {
    store
        .heartbeat(&host("host_p"), Duration::from_secs(3600), T0)
        .await
        .unwrap();
    assert!(store.reap_expired(T0, 100).await.unwrap().is_empty());
    for id in ["sb_p1", "sb_p2", "sb_p3", "sb_p4", "sb_p5"] {
        store.add_ready(&sb(id, "host_p", "reap")).await.unwrap();
    }
    let mut leases = Vec::new();
    for (holder, ttl_s) in [
        ("gw_a", 30),
        ("gw_b", 10),
        ("gw_c", 20),
        ("gw_d", 40),
        ("gw_e", 15),
    ] {
        leases.push(
            store
                .lease("reap", holder, Duration::from_secs(ttl_s), T0)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let (a, b, c, d, e) = (&leases[0], &leases[1], &leases[2], &leases[3], &leases[4]);
    // a is renewed past d.
    store
        .renew(&a.lease_id, "gw_a", Duration::from_secs(50), T0 + 5_000)
        .await
        .unwrap();
    assert!(store
        .reap_expired(T0 + 9_999, 100)
        .await
        .unwrap()
        .is_empty());
    assert!(store.reap_expired(T0 + 10_000, 0).await.unwrap().is_empty());
    // At its end exactly, a lease has lapsed.
    assert_eq!(
        store.reap_expired(T0 + 10_000, 100).await.unwrap(),
        vec![b.clone()]
    );
    assert!(store
        .reap_expired(T0 + 10_000, 100)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.counts().await.unwrap()["reap"].leased, 4);

    // `max` bounds each call; the soonest go first.
    assert_eq!(
        store.reap_expired(T0 + 25_000, 1).await.unwrap(),
        vec![e.clone()]
    );
    assert_eq!(
        store.reap_expired(T0 + 25_000, 10).await.unwrap(),
        vec![c.clone()]
    );
    assert!(store
        .reap_expired(T0 + 25_000, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.counts().await.unwrap()["reap"].leased, 2);

    // A reaped lease is gone for its holder too.
    assert_not_held(
        store.renew(&b.lease_id, "gw_b", LEASE_TTL, T0).await,
        &b.lease_id,
    );
    assert_not_held(store.release(&c.lease_id, "gw_c").await, &c.lease_id);

    let mut renewed_a = a.clone();
    renewed_a.expires_at_ms = T0 + 55_000;
    let got = store.reap_expired(T0 + 60_000, 10).await.unwrap();
    assert_eq!(got, vec![d.clone(), renewed_a]);
    assert!(!store.counts().await.unwrap().contains_key("reap"));
    assert!(store
        .reap_expired(u64::MAX >> 12, usize::MAX)
        .await
        .unwrap()
        .is_empty());
    // The reaped sandboxes left the pool: adding them again works.
    store.add_ready(&b.sandbox).await.unwrap();
    assert_eq!(store.counts().await.unwrap()["reap"].ready, 1);
    assert_eq!(lease_one(store, "reap", "gw", T0).await.sandbox, b.sandbox);
}

/// Parked sandboxes go to their owner alone, never to a plain lease.
pub async fn park<S: Store>(store: &S) {
    store
        .heartbeat(&host("host_k"), HOST_TTL, T0)
        .await
        .unwrap();
    let s1 = sb("sb_k1", "host_k", "park");
    let s2 = sb("sb_k2", "host_k", "park");
    store.park("owner_1", &s1).await.unwrap();
    store.park("owner_2", &s2).await.unwrap();
    assert!(store
        .lease("park", "gw", LEASE_TTL, T0)
        .await
        .unwrap()
        .is_none());
    assert!(!store.counts().await.unwrap().contains_key("park"));
    assert!(store.ready_on_host("host_k").await.unwrap().is_empty());

    let none = |owner: &'static str, id: &'static str| async move {
        store
            .lease_parked(owner, id, "gw", LEASE_TTL, T0)
            .await
            .unwrap()
    };
    assert!(none("owner_2", "sb_k1").await.is_none());
    assert!(none("owner_1", "sb_k2").await.is_none());
    assert!(none("owner_1", "sb_nope").await.is_none());
    assert!(none("owner_nope", "sb_k1").await.is_none());

    let l = store
        .lease_parked("owner_1", "sb_k1", "gw_a", LEASE_TTL, T0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.sandbox, s1);
    assert_eq!(l.holder, "gw_a");
    assert_eq!(l.expires_at_ms, T0 + ms(LEASE_TTL));
    assert_eq!(store.counts().await.unwrap()["park"], counts_of(0, 1, 0));
    // It is leased now, no longer parked.
    assert!(none("owner_1", "sb_k1").await.is_none());
    assert_not_held(store.release(&l.lease_id, "gw_b").await, &l.lease_id);
    let back = store.release(&l.lease_id, "gw_a").await.unwrap();
    assert_eq!(back, s1);
    // Parked again after use, as a session does.
    store.park("owner_1", &back).await.unwrap();
    let l = store
        .lease_parked("owner_1", "sb_k1", "gw_b", LEASE_TTL, T0 + 1)
        .await
        .unwrap()
        .unwrap();
    store.release(&l.lease_id, "gw_b").await.unwrap();

    // A parked sandbox whose host died is not leased, and it stays parked
    // for the eviction to report.
    store
        .heartbeat(&host("host_k_dead"), Duration::from_secs(1), T0)
        .await
        .unwrap();
    let s3 = sb("sb_k3", "host_k_dead", "park");
    store.park("owner_1", &s3).await.unwrap();
    let later = T0 + 1_000;
    assert!(store
        .lease_parked("owner_1", "sb_k3", "gw", LEASE_TTL, later)
        .await
        .unwrap()
        .is_none());
    let evicted = store.evict_dead_hosts(later).await.unwrap();
    assert!(evicted.contains(&s3), "{evicted:?}");
    assert!(store
        .lease_parked("owner_1", "sb_k3", "gw", LEASE_TTL, T0)
        .await
        .unwrap()
        .is_none());
    // owner_2's sandbox is still parked.
    let l = store
        .lease_parked("owner_2", "sb_k2", "gw", LEASE_TTL, T0)
        .await
        .unwrap()
        .unwrap();
    store.release(&l.lease_id, "gw").await.unwrap();
}

/// Eviction forgets dead hosts and removes the ready and parked sandboxes of
/// every host not alive, and nothing else.
pub async fn evict_dead_hosts<S: Store>(store: &S) {
    // Other areas may have left hosts alive in a shared store: this one
    // works far in the future, where only its own hosts live.
    let t = T0 + 10_000_000;
    let long = Duration::from_secs(3600);
    store
        .heartbeat(&host("host_e_live"), long, t)
        .await
        .unwrap();
    store
        .heartbeat(&host("host_e_dead"), Duration::from_secs(10), t)
        .await
        .unwrap();
    let live_ready = sb("sb_e1", "host_e_live", "evict");
    let live_parked = sb("sb_e2", "host_e_live", "evict");
    let dead_ready = sb("sb_e3", "host_e_dead", "evict");
    let dead_ready_b = sb("sb_e4", "host_e_dead", "evict_b");
    let dead_parked = sb("sb_e5", "host_e_dead", "evict");
    let dead_leased = sb("sb_e6", "host_e_dead", "evict_c");
    let unknown_ready = sb("sb_e7", "host_e_unknown", "evict");
    let unknown_parked = sb("sb_e8", "host_e_unknown", "evict");
    store.add_ready(&dead_leased).await.unwrap();
    let leased = lease_one(store, "evict_c", "gw", t).await;
    for s in [&dead_ready, &live_ready, &dead_ready_b, &unknown_ready] {
        store.add_ready(s).await.unwrap();
    }
    store.park("owner", &live_parked).await.unwrap();
    store.park("owner", &dead_parked).await.unwrap();
    store.park("owner_x", &unknown_parked).await.unwrap();

    // In a store shared with the other areas, their sandboxes (all on hosts
    // dead by now) are evicted too: look at this area's own.
    let evict = |now: u64| async move {
        let all = store.evict_dead_hosts(now).await.unwrap();
        all.into_iter()
            .filter(|s| s.sandbox_id.starts_with("sb_e"))
            .collect::<Vec<_>>()
    };
    // Nothing is dead yet but the never-registered host.
    let now = t + 5_000;
    assert_eq!(
        ids(&evict(now).await),
        ids(&[unknown_ready.clone(), unknown_parked.clone()])
    );
    let now = t + 10_000;
    let before = store.hosts(t).await.unwrap();
    assert!(before.iter().any(|h| h.host_id == "host_e_dead"));
    let evicted = evict(now).await;
    assert_eq!(evicted.len(), 3, "{evicted:?}");
    assert_eq!(
        ids(&evicted),
        ids(&[
            dead_ready.clone(),
            dead_ready_b.clone(),
            dead_parked.clone()
        ])
    );
    // The evicted come back whole.
    assert!(evicted.contains(&dead_ready_b));
    assert!(evict(now).await.is_empty());

    // The dead host is forgotten: even a clock before its death no longer
    // lists it.
    let after: Vec<String> = store
        .hosts(t)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.host_id)
        .collect();
    assert!(!after.contains(&"host_e_dead".to_owned()), "{after:?}");
    assert!(after.contains(&"host_e_live".to_owned()));

    let c = store.counts().await.unwrap();
    assert_eq!(c["evict"], counts_of(1, 0, 0));
    assert!(!c.contains_key("evict_b"));
    assert_eq!(c["evict_c"], counts_of(0, 1, 0));
    assert_eq!(
        store.ready_on_host("host_e_live").await.unwrap(),
        vec![live_ready.clone()]
    );
    assert!(store.ready_on_host("host_e_dead").await.unwrap().is_empty());
    let l = lease_one(store, "evict", "gw", now).await;
    assert_eq!(l.sandbox, live_ready);
    let p = store
        .lease_parked("owner", "sb_e2", "gw", LEASE_TTL, now)
        .await
        .unwrap()
        .unwrap();
    assert!(store
        .lease_parked("owner", "sb_e5", "gw", LEASE_TTL, now)
        .await
        .unwrap()
        .is_none());

    // The lease on the dead host survives eviction; its renewal says why
    // it cannot go on (the host is no longer registered at all).
    match store.renew(&leased.lease_id, "gw", LEASE_TTL, now).await {
        Err(StoreError::HostDead { host_id, .. }) => assert_eq!(host_id, "host_e_dead"),
        other => panic!("expected HostDead, got {other:?}"),
    }
    assert_eq!(
        store.release(&leased.lease_id, "gw").await.unwrap(),
        dead_leased
    );
    store.release(&l.lease_id, "gw").await.unwrap();
    store.release(&p.lease_id, "gw").await.unwrap();

    // A re-registered host's sandboxes are fine again.
    store
        .heartbeat(&host("host_e_dead"), long, now)
        .await
        .unwrap();
    store.add_ready(&dead_ready).await.unwrap();
    assert!(evict(now).await.is_empty());
    assert_eq!(
        lease_one(store, "evict", "gw", now).await.sandbox,
        dead_ready
    );
}

/// Heartbeats register, refresh and age hosts.
pub async fn hosts<S: Store>(store: &S) {
    // Far from every other area's clock.
    let t = T0 + 100_000_000;
    assert!(store.hosts(t).await.unwrap().is_empty());
    let mut h2 = host("host_h2");
    store
        .heartbeat(&h2, Duration::from_secs(10), t)
        .await
        .unwrap();
    store
        .heartbeat(&host("host_h1"), Duration::from_secs(20), t)
        .await
        .unwrap();
    assert_eq!(
        store.hosts(t).await.unwrap(),
        vec![host("host_h1"), h2.clone()]
    );

    h2.sandboxes = 7;
    h2.memory_available_bytes = 1 << 30;
    store
        .heartbeat(&h2, Duration::from_secs(30), t + 5_000)
        .await
        .unwrap();
    assert_eq!(
        store.hosts(t + 19_999).await.unwrap(),
        vec![host("host_h1"), h2.clone()]
    );
    // Alive until the heartbeat's end, not at it.
    assert_eq!(store.hosts(t + 20_000).await.unwrap(), vec![h2.clone()]);
    assert!(store.hosts(t + 35_000).await.unwrap().is_empty());
    // Dead hosts are not forgotten until evicted: a later heartbeat revives.
    store
        .heartbeat(&host("host_h1"), Duration::from_secs(20), t + 40_000)
        .await
        .unwrap();
    assert_eq!(
        store.hosts(t + 40_000).await.unwrap(),
        vec![host("host_h1")]
    );
    store.evict_dead_hosts(t + 100_000).await.unwrap();
    assert!(store.hosts(t).await.unwrap().is_empty());
}

/// `ready_on_host` lists the ready sandboxes of one host, any template,
/// and neither the leased nor the parked ones.
pub async fn ready_on_host<S: Store>(store: &S) {
    store
        .heartbeat(&host("host_o1"), HOST_TTL, T0)
        .await
        .unwrap();
    store
        .heartbeat(&host("host_o2"), HOST_TTL, T0)
        .await
        .unwrap();
    assert!(store.ready_on_host("host_o1").await.unwrap().is_empty());
    let a = sb("sb_o1", "host_o1", "on_a");
    let b = sb("sb_o2", "host_o1", "on_b");
    let c = sb("sb_o3", "host_o2", "on_a");
    let d = sb("sb_o4", "host_o1", "on_a");
    for s in [&a, &b, &c, &d] {
        store.add_ready(s).await.unwrap();
    }
    store
        .park("owner", &sb("sb_o5", "host_o1", "on_a"))
        .await
        .unwrap();
    let l = lease_one(store, "on_a", "gw", T0).await;
    assert_eq!(l.sandbox, a);
    let mut got = store.ready_on_host("host_o1").await.unwrap();
    got.sort_by(|x, y| x.sandbox_id.cmp(&y.sandbox_id));
    assert_eq!(got, vec![b.clone(), d.clone()]);
    assert_eq!(
        store.ready_on_host("host_o2").await.unwrap(),
        vec![c.clone()]
    );
    assert!(store.ready_on_host("host_nope").await.unwrap().is_empty());
    store.release(&l.lease_id, "gw").await.unwrap();
}

/// Counts list every template with a target, a ready or a leased sandbox.
pub async fn counts<S: Store>(store: &S) {
    let mine = |m: BTreeMap<String, TemplateCounts>| -> BTreeMap<String, TemplateCounts> {
        m.into_iter()
            .filter(|(k, _)| k.starts_with("cnt_"))
            .collect()
    };
    assert!(mine(store.counts().await.unwrap()).is_empty());
    store
        .heartbeat(&host("host_c"), HOST_TTL, T0)
        .await
        .unwrap();
    store.set_target("cnt_a", 3).await.unwrap();
    store.set_target("cnt_b", 2).await.unwrap();
    store.set_target("cnt_b", 5).await.unwrap();
    for id in ["sb_c1", "sb_c2", "sb_c3"] {
        store.add_ready(&sb(id, "host_c", "cnt_a")).await.unwrap();
    }
    store
        .add_ready(&sb("sb_c4", "host_c", "cnt_c"))
        .await
        .unwrap();
    let l1 = lease_one(store, "cnt_a", "gw", T0).await;
    let l2 = lease_one(store, "cnt_c", "gw", T0).await;
    let want = BTreeMap::from([
        ("cnt_a".to_owned(), counts_of(2, 1, 3)),
        ("cnt_b".to_owned(), counts_of(0, 0, 5)),
        ("cnt_c".to_owned(), counts_of(0, 1, 0)),
    ]);
    assert_eq!(mine(store.counts().await.unwrap()), want);

    // A zero target is no target.
    store.set_target("cnt_b", 0).await.unwrap();
    store.release(&l2.lease_id, "gw").await.unwrap();
    let want = BTreeMap::from([("cnt_a".to_owned(), counts_of(2, 1, 3))]);
    assert_eq!(mine(store.counts().await.unwrap()), want);
    store.set_target("cnt_a", 0).await.unwrap();
    lease_one(store, "cnt_a", "gw", T0).await;
    lease_one(store, "cnt_a", "gw", T0).await;
    let want = BTreeMap::from([("cnt_a".to_owned(), counts_of(0, 3, 0))]);
    assert_eq!(mine(store.counts().await.unwrap()), want);
    let reaped = store.reap_expired(l1.expires_at_ms, 100).await.unwrap();
    assert!(
        reaped
            .iter()
            .filter(|r| r.sandbox.template == "cnt_a")
            .count()
            == 3
    );
    assert!(mine(store.counts().await.unwrap()).is_empty());
}

/// A named lock has one owner at a time until it lapses; its owner renews
/// it; anyone else's unlock does nothing.
pub async fn locks<S: Store>(store: &S) {
    let ttl = Duration::from_secs(10);
    assert!(store.try_lock("refill", "a", ttl, T0).await.unwrap());
    assert!(!store.try_lock("refill", "b", ttl, T0 + 1).await.unwrap());
    // Another name is another lock.
    assert!(store.try_lock("other", "b", ttl, T0 + 1).await.unwrap());
    // The owner keeps it: held until T0 + 5 s + 10 s now.
    assert!(store
        .try_lock("refill", "a", ttl, T0 + 5_000)
        .await
        .unwrap());
    assert!(!store
        .try_lock("refill", "b", ttl, T0 + 12_000)
        .await
        .unwrap());
    assert!(!store
        .try_lock("refill", "b", ttl, T0 + 14_999)
        .await
        .unwrap());
    // Lapsed at its end: b takes it.
    assert!(store
        .try_lock("refill", "b", ttl, T0 + 15_000)
        .await
        .unwrap());
    assert!(!store
        .try_lock("refill", "a", ttl, T0 + 15_001)
        .await
        .unwrap());

    // a no longer owns it: a's unlock changes nothing.
    store.unlock("refill", "a").await.unwrap();
    assert!(!store
        .try_lock("refill", "a", ttl, T0 + 15_002)
        .await
        .unwrap());
    store.unlock("refill", "b").await.unwrap();
    assert!(store
        .try_lock("refill", "a", ttl, T0 + 15_003)
        .await
        .unwrap());
    // Unlocking what nobody holds is fine.
    store.unlock("never", "a").await.unwrap();
    store.unlock("refill", "a").await.unwrap();
    store.unlock("other", "b").await.unwrap();
    assert!(store.try_lock("other", "c", ttl, T0 + 2).await.unwrap());
    store.unlock("other", "c").await.unwrap();
}

/// Adding a sandbox that is already pooled (ready, parked or leased)
/// changes nothing, so a retried add never makes a second copy.
pub async fn adds_are_idempotent<S: Store>(store: &S) {
    store
        .heartbeat(&host("host_i"), HOST_TTL, T0)
        .await
        .unwrap();
    let s = sb("sb_i1", "host_i", "idem");
    store.add_ready(&s).await.unwrap();
    store.add_ready(&s).await.unwrap();
    store.park("owner", &s).await.unwrap();
    assert_eq!(store.counts().await.unwrap()["idem"], counts_of(1, 0, 0));
    let l = lease_one(store, "idem", "gw", T0).await;
    store.add_ready(&s).await.unwrap();
    store.park("owner", &s).await.unwrap();
    assert!(store
        .lease("idem", "gw", LEASE_TTL, T0)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .lease_parked("owner", "sb_i1", "gw", LEASE_TTL, T0)
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.counts().await.unwrap()["idem"], counts_of(0, 1, 0));

    let back = store.release(&l.lease_id, "gw").await.unwrap();
    store.park("owner", &back).await.unwrap();
    store.add_ready(&back).await.unwrap();
    assert!(store
        .lease("idem", "gw", LEASE_TTL, T0)
        .await
        .unwrap()
        .is_none());
    let l = store
        .lease_parked("owner", "sb_i1", "gw", LEASE_TTL, T0)
        .await
        .unwrap()
        .unwrap();
    store.release(&l.lease_id, "gw").await.unwrap();
    assert!(!store.counts().await.unwrap().contains_key("idem"));
}
