//! The pool store's hot path, each store beside its floor:
//! - `RedisStore`: lease and release latency (p50/p99) and leases per
//!   second at 1 and 32 concurrent callers, against `redis-benchmark`'s
//!   PING on the same Redis in the same run (one round trip, the least any
//!   Redis call costs; a lease+release is two, and the sustained cycle
//!   re-adds the sandbox, three);
//! - `MemoryStore`: the same figures, against a bare `Mutex<VecDeque>` pop
//!   and push (the lock and the queue alone).
//!
//! Each caller loops: lease, release, add the sandbox back (the refill).
//! "Leases/s" is that whole cycle's rate, so it is what a pool sustains.
//!
//! Needs Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`, which
//! `scripts/setup.sh` starts) and `redis-benchmark`:
//! `cargo run --release -p bench --bin pool`.

use std::collections::VecDeque;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::{Report, Row, Summary};
use pool_manager::store::memory::MemoryStore;
use pool_manager::store::redis::RedisStore;
use pool_manager::store::{HostInfo, PoolSandbox, Store};

const TEMPLATE: &str = "python";
const HOST: &str = "host_bench";
const TTL: Duration = Duration::from_secs(60);
/// Sandboxes in the pool per caller, so no caller finds it empty.
const READY_PER_CALLER: usize = 4;

/// One configuration's run. The latencies are there for a timed run.
struct Run {
    /// Lease calls.
    lease: Option<Summary>,
    /// Release calls.
    release: Option<Summary>,
    /// Lease then release, back to back.
    cycle: Option<Summary>,
    /// Whole cycles (lease, release, re-add) per second.
    leases_per_s: f64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn per_s(n: usize, elapsed: Duration) -> f64 {
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52.
    let n = n as f64;
    n / elapsed.as_secs_f64()
}

async fn fill<S: Store>(store: &S, n: usize) -> Result<()> {
    let host = HostInfo {
        host_id: HOST.to_owned(),
        url: "http://127.0.0.1:7070".to_owned(),
        max_sandboxes: 1 << 20,
        sandboxes: 0,
        memory_bytes: 1 << 34,
        memory_available_bytes: 1 << 34,
    };
    store
        .heartbeat(&host, Duration::from_secs(3600), now_ms())
        .await?;
    for i in 0..n {
        let sb = PoolSandbox {
            sandbox_id: format!("sb_bench_{i:08}"),
            host_id: HOST.to_owned(),
            template: TEMPLATE.to_owned(),
        };
        store.add_ready(&sb).await?;
    }
    Ok(())
}

/// `callers` tasks each run `cycles` lease/release/re-add cycles, timing
/// each call (`timed`) or only the whole run.
async fn run<S: Store>(store: Arc<S>, callers: usize, cycles: usize, timed: bool) -> Result<Run> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let store = store.clone();
            tokio::spawn(async move {
                let holder = format!("gw_{c}");
                let cap = if timed { cycles } else { 0 };
                let (mut lease_t, mut release_t, mut cycle_t) = (
                    Vec::with_capacity(cap),
                    Vec::with_capacity(cap),
                    Vec::with_capacity(cap),
                );
                let now = now_ms();
                for _ in 0..cycles {
                    let t0 = timed.then(Instant::now);
                    let Some(lease) = store.lease(TEMPLATE, &holder, TTL, now).await? else {
                        bail!("the pool ran dry");
                    };
                    let t1 = timed.then(Instant::now);
                    let sb = store.release(&lease.lease_id, &holder).await?;
                    if let (Some(t0), Some(t1)) = (t0, t1) {
                        let t2 = Instant::now();
                        lease_t.push(t1 - t0);
                        release_t.push(t2 - t1);
                        cycle_t.push(t2 - t0);
                    }
                    store.add_ready(&sb).await?;
                }
                Ok((lease_t, release_t, cycle_t))
            })
        })
        .collect();
    let (mut lease_t, mut release_t, mut cycle_t) = (Vec::new(), Vec::new(), Vec::new());
    for t in tasks {
        let (l, r, c) = t.await??;
        lease_t.extend(l);
        release_t.extend(r);
        cycle_t.extend(c);
    }
    let elapsed = started.elapsed();
    Ok(Run {
        lease: Summary::of(&lease_t),
        release: Summary::of(&release_t),
        cycle: Summary::of(&cycle_t),
        leases_per_s: per_s(callers * cycles, elapsed),
    })
}

/// The floor under the memory store: a pop and a push on a bare mutex and
/// queue, each its own critical section as a lease and an add are.
fn mutex_floor(cycles: usize) -> f64 {
    let queue: Mutex<VecDeque<u64>> = Mutex::new((0..4).collect());
    let started = Instant::now();
    for _ in 0..cycles {
        let item = queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front();
        if let Some(item) = item {
            queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push_back(std::hint::black_box(item));
        }
    }
    per_s(cycles, started.elapsed())
}

/// `redis-benchmark`'s PING (multibulk) on the same Redis.
struct Ping {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn redis_benchmark(host: &str, port: u16, clients: usize) -> Result<Ping> {
    let out = Command::new("redis-benchmark")
        .args(["-h", host, "-p", &port.to_string()])
        .args([
            "-n",
            "100000",
            "-c",
            &clients.to_string(),
            "-t",
            "ping_mbulk",
            "--csv",
        ])
        .output()
        .context("running redis-benchmark (apt-get install redis-tools)")?;
    if !out.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",
    // "p95_latency_ms","p99_latency_ms","max_latency_ms"
    let line = text
        .lines()
        .find(|l| l.starts_with("\"PING"))
        .with_context(|| format!("no PING line in redis-benchmark's output: {text}"))?;
    let f: Vec<f64> = line
        .split(',')
        .skip(1)
        .map(|c| c.trim_matches('"').parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {line}"))?;
    if f.len() < 6 {
        bail!("short redis-benchmark line: {line}");
    }
    Ok(Ping {
        rps: f[0],
        p50_ms: f[3],
        p99_ms: f[5],
    })
}

/// Host and port of a `redis://host:port[/db]` URL.
fn host_port(url: &str) -> Result<(String, u16)> {
    let rest = url
        .strip_prefix("redis://")
        .with_context(|| format!("REDIS_URL {url}: expected redis://host:port"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    match authority.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_owned(), p.parse().context("REDIS_URL port")?)),
        None => Ok((authority.to_owned(), 6379)),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let (host, port) = host_port(&url)?;
    let prefix = format!("thaw-bench:{}:{}:", std::process::id(), now_ms());
    let redis = Arc::new(
        RedisStore::connect(&url, &prefix)
            .await
            .with_context(|| format!("Redis at {url}"))?,
    );
    let result = measure(redis.clone(), &host, port).await;
    redis.delete_all().await?;
    let mut report = result?;
    report.finish()?;
    Ok(())
}

async fn measure(redis: Arc<RedisStore>, host: &str, port: u16) -> Result<Report> {
    const REDIS_1: usize = 20_000;
    const REDIS_32: usize = 3_000;
    const MEM_1: usize = 2_000_000;
    const MEM_32: usize = 100_000;

    fill(redis.as_ref(), 32 * READY_PER_CALLER).await?;
    run(redis.clone(), 1, 2_000, true).await?; // warm-up: connection, scripts
    let ping1 = redis_benchmark(host, port, 1)?;
    let r1 = run(redis.clone(), 1, REDIS_1, true).await?;
    let ping32 = redis_benchmark(host, port, 32)?;
    let r32 = run(redis.clone(), 32, REDIS_32, true).await?;

    let memory = Arc::new(MemoryStore::new());
    fill(memory.as_ref(), 32 * READY_PER_CALLER).await?;
    run(memory.clone(), 1, 100_000, false).await?;
    let floor = mutex_floor(MEM_1);
    let m1_rate = run(memory.clone(), 1, MEM_1, false).await?;
    let m1 = run(memory.clone(), 1, MEM_1 / 4, true).await?;
    let m32 = run(memory.clone(), 32, MEM_32, true).await?;
    let timed = |r: &Run| -> Result<(Summary, Summary, Summary)> {
        Ok((
            r.lease.clone().context("untimed run")?,
            r.release.clone().context("untimed run")?,
            r.cycle.clone().context("untimed run")?,
        ))
    };
    let (r1_lease, r1_release, r1_cycle) = timed(&r1)?;
    let (r32_lease, _, r32_cycle) = timed(&r32)?;
    let (_, _, m1_cycle) = timed(&m1)?;
    let (_, _, m32_cycle) = timed(&m32)?;

    let mut report = Report::new(
        "pool",
        "pool store hot path: lease and release latency and leases/s (lease, release, re-add cycles) at 1 and 32 concurrent callers, RedisStore against redis-benchmark PING on the same Redis, MemoryStore against a bare Mutex<VecDeque>",
    );
    let ms = |x: f64| format!("{x:.3} ms");
    report
        .parameters(serde_json::json!({
            "redis_cycles_1_caller": REDIS_1,
            "redis_cycles_per_caller_32": REDIS_32,
            "memory_cycles_1_caller": MEM_1,
            "memory_cycles_per_caller_32": MEM_32,
            "ready_sandboxes": 32 * READY_PER_CALLER,
            "runtime": "tokio multi_thread, 2 workers",
            "redis_benchmark": "-n 100000 -t ping_mbulk, -c 1 and -c 32",
            "lease_ttl_ms": 60_000,
        }))
        .row(
            Row::new("redis lease, 1 caller", "ms p50", r1_lease.p50_ms)
                .baseline("PING p50, 1 client", ping1.p50_ms)
                .summaries(Some(r1_lease.clone()), None),
        )
        .row(
            Row::new("redis lease, 1 caller", "ms p99", r1_lease.p99_ms)
                .baseline("PING p99, 1 client", ping1.p99_ms)
                .goal(format!("<= 1 ms (measured {})", ms(r1_lease.p99_ms)), r1_lease.p99_ms <= 1.0),
        )
        .row(
            Row::new("redis release, 1 caller", "ms p99", r1_release.p99_ms)
                .baseline("PING p99, 1 client", ping1.p99_ms)
                .summaries(Some(r1_release.clone()), None),
        )
        .row(
            Row::new("redis lease+release, 1 caller", "ms p99", r1_cycle.p99_ms)
                .baseline("PING p99, 1 client", ping1.p99_ms)
                .summaries(Some(r1_cycle.clone()), None),
        )
        .row(
            Row::new("redis leases/s, 1 caller", "1/s", r1.leases_per_s)
                .baseline("PINGs/s, 1 client", ping1.rps),
        )
        .row(
            Row::new("redis lease, 32 callers", "ms p99", r32_lease.p99_ms)
                .baseline("PING p99, 32 clients", ping32.p99_ms)
                .summaries(Some(r32_lease.clone()), None),
        )
        .row(
            Row::new("redis leases/s, 32 callers", "1/s", r32.leases_per_s)
                .baseline("PINGs/s, 32 clients", ping32.rps)
                .goal(
                    format!(">= 10k/s (measured {:.0})", r32.leases_per_s),
                    r32.leases_per_s >= 10_000.0,
                )
                .summaries(Some(r32_cycle.clone()), None),
        )
        .row(
            Row::new("memory leases/s, 1 caller", "1/s", m1_rate.leases_per_s)
                .baseline("Mutex<VecDeque> pop+push/s", floor)
                .goal(
                    format!(">= 1M/s (measured {:.2}M)", m1_rate.leases_per_s / 1e6),
                    m1_rate.leases_per_s >= 1e6,
                ),
        )
        .row(
            Row::new("memory lease+release, 1 caller", "ms p99", m1_cycle.p99_ms)
                .summaries(Some(m1_cycle.clone()), None),
        )
        .row(
            Row::new("memory leases/s, 32 callers", "1/s", m32.leases_per_s)
                .baseline("Mutex<VecDeque> pop+push/s, 1 caller", floor)
                .summaries(Some(m32_cycle.clone()), None),
        )
        .note(format!(
            "redis at 1 caller: lease p50 {} p99 {}, release p50 {} p99 {}; PING p50 {} p99 {} (one round trip)",
            ms(r1_lease.p50_ms),
            ms(r1_lease.p99_ms),
            ms(r1_release.p50_ms),
            ms(r1_release.p99_ms),
            ms(ping1.p50_ms),
            ms(ping1.p99_ms)
        ))
        .note(format!(
            "redis at 32 callers: lease p50 {} p99 {}; a leases/s cycle is 3 Redis calls (lease, release, re-add): {:.0} calls/s against {:.0} PINGs/s",
            ms(r32_lease.p50_ms),
            ms(r32_lease.p99_ms),
            3.0 * r32.leases_per_s,
            ping32.rps
        ))
        .note(format!(
            "memory at 1 caller, timed per call: lease+release p50 {} p99 {} ({:.2}M leases/s with the clock reads); 32 callers share one mutex on 2 worker threads",
            ms(m1_cycle.p50_ms),
            ms(m1_cycle.p99_ms),
            m1.leases_per_s / 1e6
        ));
    Ok(report)
}
