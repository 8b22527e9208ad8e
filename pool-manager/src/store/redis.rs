//! The Redis [`Store`]: the pool's state shared by many gateways and hosts.
//!
//! Every operation is one Lua script (`lua/*.lua`, sent as EVALSHA and
//! loaded again by itself after a Redis restart), so each is atomic: Rust
//! never reads a value and writes on the strength of it. Keys, each under
//! the store's prefix `{p}`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{p}ready:{template}` | list | ready sandbox ids; LPUSH to add, RPOP to lease (FIFO) |
//! | `{p}sb:{sandbox_id}` | hash | every pooled sandbox: `host`, `tpl`, `state` (ready, parked, leased), `owner` |
//! | `{p}host_ready:{host}`, `{p}host_parked:{host}` | set | the ready / parked sandbox ids of a host |
//! | `{p}sb_hosts` | set | hosts that hold ready or parked sandboxes |
//! | `{p}parked:{owner}` | set | an owner's parked sandbox ids |
//! | `{p}lease:{lease_id}` | hash | `sb`, `host`, `tpl`, `holder`, `exp` |
//! | `{p}lease_expiry` | zset | lease ids scored by `expires_at_ms` |
//! | `{p}leased` | hash | template → leased count |
//! | `{p}hosts`, `{p}host_expiry` | hash, zset | host id → [`HostInfo`] JSON; host id scored by the end of its heartbeat |
//! | `{p}targets`, `{p}templates` | hash, set | template → target; templates seen in a ready queue |
//! | `{p}lock:{name}` | hash | `owner`, `exp` |
//!
//! Times are the caller's Unix milliseconds, as the [`Store`] contract says
//! (locks too: a lock is not a Redis key TTL, so tests drive every clock);
//! they are exact up to 2^53 ms. The scripts build key names from the prefix,
//! so the store needs one Redis server (not a Cluster). The semantics the
//! memory store's module doc spells out where the [`Store`] contract is
//! silent (when a lease or a host lapses, idempotent adds, release without
//! a clock, parked sandboxes of dead hosts) hold here too; the conformance
//! suite checks both stores against them.
//!
//! Failure: every call has a bounded time (`RedisStoreOptions::op_timeout`,
//! 2 s by default) for connecting, the script and its reply; past it, or
//! on any connection error, the call returns [`StoreError::Unavailable`].
//! All callers share one pipelined connection (see `Link`); a connection
//! that broke or hung is dropped and the next call connects anew, so the
//! store recovers by itself when Redis is back (and reloads its scripts).
//! A lost reply never hands a sandbox out twice: a script either
//! ran whole or not at all, and if its reply was lost after it ran (the
//! connection broke, the call timed out), the lease it made is held by a
//! caller who never learned its id; nobody renews it, so it lapses and
//! `reap_expired` returns it to be destroyed. Adding a sandbox that is
//! already pooled changes nothing, so an add retried after a lost reply
//! cannot put it in the pool twice (unless it left the pool in between).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{
    AsyncConnectionConfig, Client, Cmd, FromRedisValue, RedisError, Script, ScriptInvocation,
};

use super::{HostInfo, Lease, PoolSandbox, Store, StoreError, TemplateCounts};

/// Tuning of a [`RedisStore`].
#[derive(Debug, Clone, Copy)]
pub struct RedisStoreOptions {
    /// Longest any one call may take, connecting included, before it
    /// returns [`StoreError::Unavailable`].
    pub op_timeout: Duration,
}

impl Default for RedisStoreOptions {
    fn default() -> Self {
        RedisStoreOptions {
            op_timeout: Duration::from_secs(2),
        }
    }
}

/// The scripts, hashed once.
struct Scripts {
    add_ready: Script,
    lease: Script,
    renew: Script,
    release: Script,
    park: Script,
    lease_parked: Script,
    reap: Script,
    heartbeat: Script,
    hosts: Script,
    evict: Script,
    ready_on_host: Script,
    set_target: Script,
    counts: Script,
    try_lock: Script,
    unlock: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            add_ready: Script::new(include_str!("lua/add_ready.lua")),
            lease: Script::new(include_str!("lua/lease.lua")),
            renew: Script::new(include_str!("lua/renew.lua")),
            release: Script::new(include_str!("lua/release.lua")),
            park: Script::new(include_str!("lua/park.lua")),
            lease_parked: Script::new(include_str!("lua/lease_parked.lua")),
            reap: Script::new(include_str!("lua/reap.lua")),
            heartbeat: Script::new(include_str!("lua/heartbeat.lua")),
            hosts: Script::new(include_str!("lua/hosts.lua")),
            evict: Script::new(include_str!("lua/evict.lua")),
            ready_on_host: Script::new(include_str!("lua/ready_on_host.lua")),
            set_target: Script::new(include_str!("lua/set_target.lua")),
            counts: Script::new(include_str!("lua/counts.lua")),
            try_lock: Script::new(include_str!("lua/try_lock.lua")),
            unlock: Script::new(include_str!("lua/unlock.lua")),
        }
    }
}

/// One connection every caller shares, replaced when it breaks.
///
/// A multiplexed connection pipelines the requests of all callers on one
/// socket, so Redis reads many per system call. Measured here with 32
/// callers running a three-command script: ≈ 53,000 calls/s on one shared
/// connection against ≈ 9,000 through a pool that lends each caller a
/// connection of its own and PINGs it on every checkout (deadpool-redis).
struct Link {
    client: Client,
    config: AsyncConnectionConfig,
    /// The connection in use and its generation number (from 1).
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// Held while connecting, so callers that find no connection make one
    /// attempt between them rather than one each.
    connecting: tokio::sync::Mutex<()>,
    generations: AtomicU64,
}

impl Link {
    fn cached(&self) -> Option<(u64, MultiplexedConnection)> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The shared connection, connecting first if there is none.
    async fn get(&self) -> Result<(u64, MultiplexedConnection), RedisError> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let _gate = self.connecting.lock().await;
        // Whoever held the gate before may have connected already.
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    /// Stops handing out connection `generation` (broken or hung); the next
    /// call connects anew. A newer connection is left alone.
    fn discard(&self, generation: u64) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
        }
    }
}

/// What one call sends.
enum Request<'a, 'b> {
    Script(&'a ScriptInvocation<'b>),
    Command(&'a Cmd),
}

/// The pool's state in Redis. See the module doc.
pub struct RedisStore {
    link: Link,
    prefix: String,
    op_timeout: Duration,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("op_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(what.to_string())
}

fn expiry(now_ms: u64, ttl: Duration) -> u64 {
    now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}

fn new_lease_id() -> String {
    format!("lease_{:032x}", rand::random::<u128>())
}

/// Parses a script's reply, calling a malformed one `Unavailable`.
fn parse<T: FromRedisValue>(v: &::redis::Value) -> Result<T, StoreError> {
    T::from_redis_value(v).map_err(|e| unavailable(format!("unexpected reply from Redis: {e}")))
}

fn bad_reply(what: &str) -> StoreError {
    unavailable(format!("unexpected reply from Redis to {what}"))
}

impl RedisStore {
    /// A store on the Redis at `url` (`redis://127.0.0.1:6379`) whose keys
    /// all start with `prefix` (`thaw:`; must not be empty), with the
    /// default options. Fails with [`StoreError::Unavailable`] unless Redis
    /// answers a PING within the call timeout, so a wrong URL shows at
    /// start; after that the store reconnects by itself.
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        RedisStore::connect_with(url, prefix, RedisStoreOptions::default()).await
    }

    /// As [`RedisStore::connect`], with explicit options.
    pub async fn connect_with(
        url: &str,
        prefix: &str,
        options: RedisStoreOptions,
    ) -> Result<RedisStore, StoreError> {
        let store = RedisStore::lazy(url, prefix, options)?;
        store.ping().await?;
        Ok(store)
    }

    /// As [`RedisStore::connect_with`], without waiting for Redis: an
    /// unreachable Redis shows as [`StoreError::Unavailable`] from the calls.
    pub fn lazy(
        url: &str,
        prefix: &str,
        options: RedisStoreOptions,
    ) -> Result<RedisStore, StoreError> {
        if prefix.is_empty() {
            return Err(unavailable("the Redis key prefix must not be empty"));
        }
        let client =
            Client::open(url).map_err(|e| unavailable(format!("invalid Redis URL {url}: {e}")))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(options.op_timeout)
            .set_response_timeout(options.op_timeout);
        Ok(RedisStore {
            link: Link {
                client,
                config,
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                generations: AtomicU64::new(0),
            },
            prefix: prefix.to_owned(),
            op_timeout: options.op_timeout,
            scripts: Scripts::new(),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Checks that Redis answers within the call timeout.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let reply = self.send(Request::Command(&::redis::cmd("PING"))).await?;
        match parse::<String>(&reply)?.as_str() {
            "PONG" => Ok(()),
            _ => Err(bad_reply("PING")),
        }
    }

    /// Deletes every key under this store's prefix and returns how many
    /// (tests, benchmarks, decommissioning a pool). Not atomic: run it on a
    /// pool nobody uses.
    pub async fn delete_all(&self) -> Result<u64, StoreError> {
        let pattern = format!("{}*", escape_glob(&self.prefix));
        let mut deleted = 0u64;
        let mut cursor = 0u64;
        loop {
            let mut scan = ::redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) =
                parse(&self.send(Request::Command(&scan)).await?)?;
            if !keys.is_empty() {
                let mut del = ::redis::cmd("DEL");
                del.arg(&keys);
                deleted += parse::<u64>(&self.send(Request::Command(&del)).await?)?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// Sends one request on the shared connection within the call timeout.
    /// A connection that fails below Redis's own replies (I/O, protocol) or
    /// does not answer in time is discarded, so the next call reconnects.
    async fn send(&self, request: Request<'_, '_>) -> Result<::redis::Value, StoreError> {
        // The generation the call used, 0 before it has one; an atomic so
        // the future stays `Send`.
        let used = AtomicU64::new(0);
        let attempt = async {
            let (generation, mut conn) = self.link.get().await.map_err(|e| (false, e))?;
            used.store(generation, Ordering::Relaxed);
            match request {
                Request::Script(inv) => inv.invoke_async(&mut conn).await,
                Request::Command(cmd) => cmd.query_async(&mut conn).await,
            }
            .map_err(|e| (true, e))
        };
        match tokio::time::timeout(self.op_timeout, attempt).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err((sent, e))) => {
                // A reply error (a script's `error`, BUSY, ...) leaves the
                // connection sound; anything else may not.
                if sent && e.code().is_none() {
                    self.link.discard(used.load(Ordering::Relaxed));
                }
                Err(unavailable(format!("Redis: {e}")))
            }
            Err(_) => {
                let generation = used.load(Ordering::Relaxed);
                if generation != 0 {
                    self.link.discard(generation);
                }
                Err(unavailable(format!(
                    "Redis did not answer within {} ms",
                    self.op_timeout.as_millis()
                )))
            }
        }
    }

    /// Runs a script.
    async fn run(&self, inv: &mut ScriptInvocation<'_>) -> Result<::redis::Value, StoreError> {
        self.send(Request::Script(inv)).await
    }

    /// A script invocation whose first argument is the prefix.
    fn script<'a>(&self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.arg(&self.prefix);
        inv
    }
}

/// Escapes `*?[]\` for a Redis MATCH pattern.
fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Groups a flat array of strings into rows of `n`.
fn rows(v: &::redis::Value, n: usize, what: &str) -> Result<Vec<Vec<String>>, StoreError> {
    let flat: Vec<String> = parse(v)?;
    if flat.len() % n != 0 {
        return Err(bad_reply(what));
    }
    Ok(flat.chunks(n).map(<[String]>::to_vec).collect())
}

fn take3(row: Vec<String>) -> Option<(String, String, String)> {
    let mut it = row.into_iter();
    Some((it.next()?, it.next()?, it.next()?))
}

impl Store for RedisStore {
    async fn add_ready(&self, sb: &PoolSandbox) -> Result<(), StoreError> {
        let mut inv = self.script(&self.scripts.add_ready);
        inv.arg(&sb.sandbox_id).arg(&sb.host_id).arg(&sb.template);
        self.run(&mut inv).await.map(drop)
    }

    async fn lease(
        &self,
        template: &str,
        holder: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<Option<Lease>, StoreError> {
        let lease_id = new_lease_id();
        let expires_at_ms = expiry(now_ms, ttl);
        let mut inv = self.script(&self.scripts.lease);
        inv.arg(template)
            .arg(holder)
            .arg(now_ms)
            .arg(expires_at_ms)
            .arg(&lease_id);
        let reply: Option<(String, String)> = parse(&self.run(&mut inv).await?)?;
        Ok(reply.map(|(sandbox_id, host_id)| Lease {
            lease_id,
            sandbox: PoolSandbox {
                sandbox_id,
                host_id,
                template: template.to_owned(),
            },
            holder: holder.to_owned(),
            expires_at_ms,
        }))
    }

    async fn renew(
        &self,
        lease_id: &str,
        holder: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<Lease, StoreError> {
        let expires_at_ms = expiry(now_ms, ttl);
        let mut inv = self.script(&self.scripts.renew);
        inv.arg(lease_id).arg(holder).arg(now_ms).arg(expires_at_ms);
        let reply: Vec<String> = parse(&self.run(&mut inv).await?)?;
        match reply.as_slice() {
            [status, sandbox_id, host_id, template] if status == "ok" => Ok(Lease {
                lease_id: lease_id.to_owned(),
                sandbox: PoolSandbox {
                    sandbox_id: sandbox_id.clone(),
                    host_id: host_id.clone(),
                    template: template.clone(),
                },
                holder: holder.to_owned(),
                expires_at_ms,
            }),
            [status] if status == "not_held" => Err(StoreError::LeaseNotHeld(lease_id.to_owned())),
            [status, host_id] if status == "host_dead" => Err(StoreError::HostDead {
                lease_id: lease_id.to_owned(),
                host_id: host_id.clone(),
            }),
            _ => Err(bad_reply("renew")),
        }
    }

    async fn release(&self, lease_id: &str, holder: &str) -> Result<PoolSandbox, StoreError> {
        let mut inv = self.script(&self.scripts.release);
        inv.arg(lease_id).arg(holder);
        let reply: Option<(String, String, String)> = parse(&self.run(&mut inv).await?)?;
        match reply {
            Some((sandbox_id, host_id, template)) => Ok(PoolSandbox {
                sandbox_id,
                host_id,
                template,
            }),
            None => Err(StoreError::LeaseNotHeld(lease_id.to_owned())),
        }
    }

    async fn park(&self, owner: &str, sb: &PoolSandbox) -> Result<(), StoreError> {
        let mut inv = self.script(&self.scripts.park);
        inv.arg(owner)
            .arg(&sb.sandbox_id)
            .arg(&sb.host_id)
            .arg(&sb.template);
        self.run(&mut inv).await.map(drop)
    }

    async fn lease_parked(
        &self,
        owner: &str,
        sandbox_id: &str,
        holder: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<Option<Lease>, StoreError> {
        let lease_id = new_lease_id();
        let expires_at_ms = expiry(now_ms, ttl);
        let mut inv = self.script(&self.scripts.lease_parked);
        inv.arg(owner)
            .arg(sandbox_id)
            .arg(holder)
            .arg(now_ms)
            .arg(expires_at_ms)
            .arg(&lease_id);
        let reply: Option<(String, String)> = parse(&self.run(&mut inv).await?)?;
        Ok(reply.map(|(host_id, template)| Lease {
            lease_id,
            sandbox: PoolSandbox {
                sandbox_id: sandbox_id.to_owned(),
                host_id,
                template,
            },
            holder: holder.to_owned(),
            expires_at_ms,
        }))
    }

    async fn reap_expired(&self, now_ms: u64, max: usize) -> Result<Vec<Lease>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        // Redis reads LIMIT's count as a signed 64-bit integer.
        let max = u64::try_from(max).unwrap_or(u64::MAX).min(u64::MAX >> 1);
        let mut inv = self.script(&self.scripts.reap);
        inv.arg(now_ms).arg(max);
        let reply = self.run(&mut inv).await?;
        rows(&reply, 6, "reap_expired")?
            .into_iter()
            .map(|row| match <[String; 6]>::try_from(row) {
                Ok([lease_id, sandbox_id, host_id, template, holder, exp]) => Ok(Lease {
                    lease_id,
                    sandbox: PoolSandbox {
                        sandbox_id,
                        host_id,
                        template,
                    },
                    holder,
                    expires_at_ms: exp.parse().map_err(|_| bad_reply("reap_expired"))?,
                }),
                Err(_) => Err(bad_reply("reap_expired")),
            })
            .collect()
    }

    async fn heartbeat(
        &self,
        host: &HostInfo,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let json =
            serde_json::to_string(host).map_err(|e| unavailable(format!("encoding host: {e}")))?;
        let mut inv = self.script(&self.scripts.heartbeat);
        inv.arg(&host.host_id).arg(json).arg(expiry(now_ms, ttl));
        self.run(&mut inv).await.map(drop)
    }

    async fn hosts(&self, now_ms: u64) -> Result<Vec<HostInfo>, StoreError> {
        let mut inv = self.script(&self.scripts.hosts);
        inv.arg(now_ms);
        let jsons: Vec<String> = parse(&self.run(&mut inv).await?)?;
        let mut hosts = jsons
            .iter()
            .map(|j| serde_json::from_str::<HostInfo>(j).map_err(|_| bad_reply("hosts")))
            .collect::<Result<Vec<_>, _>>()?;
        hosts.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        Ok(hosts)
    }

    async fn evict_dead_hosts(&self, now_ms: u64) -> Result<Vec<PoolSandbox>, StoreError> {
        let mut inv = self.script(&self.scripts.evict);
        inv.arg(now_ms);
        let reply = self.run(&mut inv).await?;
        rows(&reply, 3, "evict_dead_hosts")?
            .into_iter()
            .map(|row| {
                take3(row)
                    .map(|(sandbox_id, host_id, template)| PoolSandbox {
                        sandbox_id,
                        host_id,
                        template,
                    })
                    .ok_or_else(|| bad_reply("evict_dead_hosts"))
            })
            .collect()
    }

    async fn ready_on_host(&self, host_id: &str) -> Result<Vec<PoolSandbox>, StoreError> {
        let mut inv = self.script(&self.scripts.ready_on_host);
        inv.arg(host_id);
        let reply = self.run(&mut inv).await?;
        let mut out = rows(&reply, 2, "ready_on_host")?
            .into_iter()
            .map(|row| {
                let mut it = row.into_iter();
                match (it.next(), it.next()) {
                    (Some(sandbox_id), Some(template)) => Ok(PoolSandbox {
                        sandbox_id,
                        host_id: host_id.to_owned(),
                        template,
                    }),
                    _ => Err(bad_reply("ready_on_host")),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        Ok(out)
    }

    async fn set_target(&self, template: &str, target: u64) -> Result<(), StoreError> {
        let mut inv = self.script(&self.scripts.set_target);
        inv.arg(template).arg(target);
        self.run(&mut inv).await.map(drop)
    }

    async fn counts(&self) -> Result<BTreeMap<String, TemplateCounts>, StoreError> {
        let inv = &mut self.script(&self.scripts.counts);
        let reply = self.run(inv).await?;
        let flat: Vec<::redis::Value> = parse(&reply)?;
        if flat.len() % 4 != 0 {
            return Err(bad_reply("counts"));
        }
        flat.chunks(4)
            .map(|c| {
                Ok((
                    parse::<String>(&c[0])?,
                    TemplateCounts {
                        ready: parse(&c[1])?,
                        leased: parse(&c[2])?,
                        target: parse(&c[3])?,
                    },
                ))
            })
            .collect()
    }

    async fn try_lock(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut inv = self.script(&self.scripts.try_lock);
        inv.arg(name)
            .arg(owner)
            .arg(now_ms)
            .arg(expiry(now_ms, ttl));
        let held: i64 = parse(&self.run(&mut inv).await?)?;
        Ok(held == 1)
    }

    async fn unlock(&self, name: &str, owner: &str) -> Result<(), StoreError> {
        let mut inv = self.script(&self.scripts.unlock);
        inv.arg(name).arg(owner);
        self.run(&mut inv).await.map(drop)
    }
}
