//! One conformance suite (`common/mod.rs`), two stores: every area runs
//! against a fresh [`MemoryStore`] and a fresh [`RedisStore`] (the Redis at
//! `REDIS_URL`, under a random key prefix deleted at the end), and the
//! whole suite runs once more on one shared store of each kind, so the
//! areas are also checked side by side.
//!
//! [`RedisStore`]: pool_manager::store::redis::RedisStore

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

mod common;

use common::RedisFixture;
use pool_manager::store::memory::MemoryStore;

/// A test per area and store: `area!(name)` runs `common::name` on memory
/// and on Redis.
macro_rules! area {
    ($($name:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    common::$name(&MemoryStore::new()).await;
                }
            )*
            #[tokio::test]
            async fn whole_suite_on_one_store() {
                common::run_suite(&MemoryStore::new()).await;
            }
        }
        mod redis {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let fx = RedisFixture::new(stringify!($name)).await;
                    common::$name(fx.store.as_ref()).await;
                }
            )*
            #[tokio::test]
            async fn whole_suite_on_one_store() {
                let fx = RedisFixture::new("suite").await;
                common::run_suite(fx.store.as_ref()).await;
            }
        }
    };
}

area!(
    fifo_and_empty,
    dead_hosts_are_skipped_and_dropped,
    renew,
    release,
    reap,
    park,
    evict_dead_hosts,
    hosts,
    ready_on_host,
    counts,
    locks,
    adds_are_idempotent,
);

#[tokio::test]
async fn redis_keys_are_deleted_with_the_fixture() {
    let url = common::redis_url();
    let prefix;
    {
        let fx = RedisFixture::new("cleanup").await;
        prefix = fx.store.prefix().to_owned();
        common::fifo_and_empty(fx.store.as_ref()).await;
        assert!(key_count(&url, &prefix) > 0);
    }
    assert_eq!(key_count(&url, &prefix), 0);
}

fn key_count(url: &str, prefix: &str) -> usize {
    let client = ::redis::Client::open(url).unwrap();
    let mut conn = client.get_connection().unwrap();
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut conn)
        .unwrap();
    keys.len()
}
