//! The vmhost binary: `vmhost serve` runs the host agent (config →
//! tracing → core → router → graceful drain); `vmhost template build`
//! builds template root filesystems from the recipes of runtimes/.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use template::builder::{build, describe, BuildConfig};
use template::sandbox::Runsc;

/// thaw's host agent (one per machine).
#[derive(Debug, Parser)]
#[command(name = "vmhost", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    /// Run the host agent: sandboxes, templates and snapshots of this
    /// machine behind an HTTP API. Leftovers of a previous run (processes,
    /// cgroups, sockets) are removed at start.
    #[command(after_long_help = API_HELP)]
    Serve(vmhost::config::ServeArgs),
    /// Templates: root filesystems built from runtimes/ recipes.
    Template {
        #[command(subcommand)]
        command: TemplateCmd,
    },
}

#[derive(Debug, Subcommand)]
enum TemplateCmd {
    /// Build templates (cached: an unchanged recipe takes well under a
    /// second), printing each step, its output and its time.
    Build {
        /// Runtimes to build (folders of --runtimes-dir).
        names: Vec<String>,
        /// Build every runtime that has a recipe.
        #[arg(long)]
        all: bool,
        /// Print progress as JSON lines instead of text.
        #[arg(long)]
        json: bool,
        /// The folder of runtimes.
        #[arg(long, env = "THAW_RUNTIMES_DIR", default_value = "runtimes")]
        runtimes_dir: PathBuf,
        /// Cache of bases and built layers.
        #[arg(long, env = "THAW_CACHE_DIR", default_value = "/var/cache/thaw")]
        cache_dir: PathBuf,
        /// State directory (templates' metadata).
        #[arg(long, env = "THAW_DATA_DIR", default_value = "/var/lib/thaw")]
        data_dir: PathBuf,
        /// The runsc binary.
        #[arg(long, env = "THAW_RUNSC", default_value = "runsc")]
        runsc: PathBuf,
        /// runsc platform (ptrace here; systrap on newer releases).
        #[arg(long, env = "THAW_RUNSC_PLATFORM", default_value = "ptrace")]
        platform: String,
        /// An uploaded tar, tar.gz or zip archive that COPY reads from
        /// instead of the runtime's folder.
        #[arg(long)]
        context_archive: Option<PathBuf>,
        /// Debian mirror for the base.
        #[arg(
            long,
            env = "THAW_DEBIAN_MIRROR",
            default_value = "http://deb.debian.org/debian"
        )]
        mirror: String,
    },
}

const API_HELP: &str = "\
The API (JSON; errors are {\"error\": {\"code\", \"message\"}}):
  POST /templates/{name}/build[?force=true]  build + bake a template (NDJSON progress)
  GET  /templates                            templates and their snapshots
  POST /sandboxes {\"template\", \"limits\", \"env\", \"metadata\", \"timeout_ms\"}
  POST /sandboxes/restore {\"snapshot_id\", ...}
  GET  /sandboxes, GET /sandboxes/{id}, DELETE /sandboxes/{id}
  POST /sandboxes/{id}/pause | /resume | /snapshot
  POST /sandboxes/{id}/run {\"code\", \"args\", \"env\", \"stdin\", \"timeout_ms\"}
  ANY  /sandboxes/{id}/processes..., /files..., /ports..., /metrics  (envd's API)
  GET  /sandboxes/{id}/ports/{port}/tunnel   (Upgrade: tcp)
  GET  /snapshots, DELETE /snapshots/{id}, GET /host, GET /metrics, GET /healthz
See vmhost/README.md.";

fn main() -> ExitCode {
    let command = match Cli::parse().command {
        Top::Serve(args) => return serve(args),
        Top::Template { command } => command,
    };
    let TemplateCmd::Build {
        names,
        all,
        json,
        runtimes_dir,
        cache_dir,
        data_dir,
        runsc,
        platform,
        context_archive,
        mirror,
    } = command;
    let mut names = names;
    if all {
        match std::fs::read_dir(&runtimes_dir) {
            Ok(rd) => {
                let mut found: Vec<String> = rd
                    .filter_map(Result::ok)
                    .filter(|e| e.path().join("recipe").is_file())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                found.sort();
                names.extend(found);
            }
            Err(e) => {
                eprintln!("vmhost: cannot read {}: {e}", runtimes_dir.display());
                return ExitCode::FAILURE;
            }
        }
    }
    if names.is_empty() {
        eprintln!("vmhost: name the templates to build, or --all");
        return ExitCode::from(2);
    }
    let cfg = BuildConfig {
        runsc: Runsc {
            binary: runsc,
            platform,
            state_dir: cache_dir.join("runsc-state"),
        },
        runtimes_dir,
        cache_dir,
        data_dir,
        mirror,
        context_archive,
    };
    for name in names {
        let mut print = |e: &template::builder::BuildEvent| {
            if json {
                println!("{}", serde_json::to_string(e).unwrap_or_default());
            } else if let Some(line) = describe(e) {
                println!("{line}");
            }
        };
        if let Err(e) = build(&name, &cfg, &mut print) {
            eprintln!("vmhost: building {name}: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn serve(args: vmhost::config::ServeArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("vmhost=info")),
        )
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmhost: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmhost: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: vmhost::config::ServeArgs) -> Result<(), String> {
    let driver = args.driver().map_err(|e| e.to_string())?;
    let host = vmhost::host::Host::new(args.host_config(), driver)
        .await
        .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("listen on {}: {e}", args.listen))?;
    tracing::info!(listen = %args.listen, "vmhost serving");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let heartbeats = if args.register {
        Some(tokio::spawn(
            register(args.clone(), host.clone(), stop_rx).await?,
        ))
    } else {
        None
    };
    let app = vmhost::api::router(host.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| format!("serving: {e}"))?;
    let _ = stop_tx.send(true);
    if let Some(h) = heartbeats {
        let _ = h.await;
    }
    tracing::info!("draining: destroying every sandbox");
    host.shutdown().await;
    Ok(())
}

/// Connects to the registry and returns the heartbeat loop to spawn.
async fn register(
    args: vmhost::config::ServeArgs,
    host: std::sync::Arc<vmhost::host::Host>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<impl std::future::Future<Output = ()>, String> {
    use pool_manager::store::redis::RedisStore;
    let store = std::sync::Arc::new(
        RedisStore::connect(&args.redis_url, &args.redis_prefix)
            .await
            .map_err(|e| format!("registering at {}: {e}", args.redis_url))?,
    );
    let host_id = args.host_id();
    let url = args.advertise_url();
    let max = args.max_sandboxes as u64;
    let interval = std::time::Duration::from_millis(args.heartbeat_ms.max(50));
    tracing::info!(host_id = %host_id, url = %url, "registering with the pool");
    Ok(pool_manager::registry::heartbeat_loop(
        store,
        move || {
            let cap = vmhost::hostinfo::capacity();
            let live: usize = host.counts().values().sum();
            let info = pool_manager::store::HostInfo {
                host_id: host_id.clone(),
                url: url.clone(),
                max_sandboxes: max,
                sandboxes: live as u64,
                memory_bytes: cap.memory_bytes,
                memory_available_bytes: cap.memory_available_bytes,
            };
            async move { info }
        },
        interval,
        interval * 3,
        stop,
    ))
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
