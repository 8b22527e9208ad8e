//! The pool-manager daemon (distributed mode): the refiller (one active
//! across every daemon, by a Redis lock), the lease API and metrics.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pool_manager::api::{router, ApiState};
use pool_manager::hosts::HttpHosts;
use pool_manager::metrics::Metrics;
use pool_manager::pool::Pool;
use pool_manager::refill::{RefillConfig, Refiller};
use pool_manager::store::redis::RedisStore;
use pool_manager::store::Store;

/// thaw's pool manager: keeps warm, paused sandboxes per template across
/// every vmhost registered in Redis and leases each to one caller.
/// Several may run; one refills at a time and another takes over when it
/// dies.
#[derive(Debug, Parser)]
#[command(name = "pool-manager", version, about, long_about)]
struct Config {
    /// Address of the API (`GET /pool`, `PUT /pool/targets/{template}`,
    /// `POST /leases`, `/metrics`, `/healthz`).
    #[arg(long, env = "THAW_POOL_LISTEN", default_value = "127.0.0.1:7080")]
    listen: SocketAddr,
    /// The shared Redis.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Prefix of every Redis key (one per thaw installation).
    #[arg(long, env = "THAW_REDIS_PREFIX", default_value = "thaw:")]
    redis_prefix: String,
    /// Targets for templates that have none yet, `template=count`
    /// (repeatable or comma-separated); a target set through the API is
    /// kept across restarts. The defaults follow what one host sustains:
    /// ≈ 3 restores a second with two at a time (bench/results/sandboxes.json),
    /// so a target of 4 refills in about a second and a half.
    #[arg(
        long,
        env = "THAW_POOL_TARGETS",
        value_delimiter = ',',
        default_value = "python=4,node=2,bash=2,python-data=2"
    )]
    target: Vec<String>,
    /// Time between refill passes, in milliseconds.
    #[arg(long, env = "THAW_POOL_INTERVAL_MS", default_value_t = 100)]
    interval_ms: u64,
    /// How long the refiller lock lasts unless renewed, in milliseconds: a
    /// standby daemon takes over this long after the refiller dies.
    #[arg(long, env = "THAW_POOL_LOCK_TTL_MS", default_value_t = 3000)]
    lock_ttl_ms: u64,
    /// Sandboxes made at once on one host (each restore costs ≈ 0.2 s CPU).
    #[arg(long, env = "THAW_POOL_PER_HOST_PARALLEL", default_value_t = 2)]
    per_host_parallel: u64,
}

fn main() -> ExitCode {
    let cfg = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("pool_manager=info")),
        )
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pool-manager: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pool-manager: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> Result<(), String> {
    let store = Arc::new(
        RedisStore::connect(&cfg.redis_url, &cfg.redis_prefix)
            .await
            .map_err(|e| format!("redis at {}: {e}", cfg.redis_url))?,
    );
    let existing = store.counts().await.map_err(|e| e.to_string())?;
    for t in &cfg.target {
        let Some((name, n)) = t.split_once('=') else {
            return Err(format!("--target {t:?}: write template=count"));
        };
        let n: u64 = n
            .trim()
            .parse()
            .map_err(|_| format!("--target {t:?}: the count is not a number"))?;
        if existing.get(name.trim()).is_some_and(|c| c.target > 0) {
            continue;
        }
        store
            .set_target(name.trim(), n)
            .await
            .map_err(|e| e.to_string())?;
    }
    let metrics = Metrics::new();
    let hosts = Arc::new(HttpHosts::default());
    let pool = Pool::new(store.clone(), hosts.clone(), metrics.clone());
    let refiller = Refiller::new(
        store,
        hosts,
        RefillConfig {
            interval: Duration::from_millis(cfg.interval_ms),
            lock_ttl: Duration::from_millis(cfg.lock_ttl_ms),
            per_host_parallel: cfg.per_host_parallel,
            ..RefillConfig::default()
        },
        metrics,
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let refilling = tokio::spawn(refiller.clone().run(stop_rx));
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("listen on {}: {e}", cfg.listen))?;
    tracing::info!(listen = %cfg.listen, "pool-manager serving");
    let app = router(Arc::new(ApiState { pool, refiller }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| format!("serving: {e}"))?;
    let _ = stop_tx.send(true);
    let _ = refilling.await;
    Ok(())
}
