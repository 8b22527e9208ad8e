//! The envd binary: config → tracing → state → router → transports →
//! drain on SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use envd::config::Config;
use envd::state::{AppState, StateConfig};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "exec-runner")
    {
        let args = envd::exec_runner::ExecRunnerArgs::parse_from(std::env::args_os().skip(1));
        let err = envd::exec_runner::exec_runner(args);
        eprintln!(
            "envd exec-runner: {err}: {}",
            std::error::Error::source(&err).map_or_else(String::new, ToString::to_string)
        );
        return ExitCode::from(127);
    }
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if config.listen.is_none() && config.dial.is_none() {
        eprintln!("envd: give --listen ADDR or --dial PATH (see envd --help)");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("envd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("envd: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> std::io::Result<()> {
    // Orphans of the processes envd starts are reparented to envd (PID 1
    // inside a sandbox gets them anyway), and the reaper collects them.
    if std::process::id() != 1 {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e, "cannot become a subreaper; orphans go to init");
        }
    }
    let state = AppState::new(StateConfig {
        run_dir: config.run_dir.clone(),
        drop_caches: config.drop_caches,
        output_buffer_bytes: config.output_buffer_bytes,
        disk_path: config.disk_path.clone(),
        runner_socket: config.runner_socket.clone(),
    });
    state.scanner.start();
    tokio::spawn(envd::process::run_reaper(state.processes.clone()));
    let app = envd::router(state.clone());
    let shutdown = CancellationToken::new();

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = config.listen.clone() {
        tasks.spawn(envd::transport::listen(
            addr,
            app.clone(),
            state.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(path) = config.dial.clone() {
        let (app, state, shutdown) = (app.clone(), state.clone(), shutdown.clone());
        tasks.spawn(async move {
            envd::transport::dial(path, config.connections, app, state, shutdown).await;
            Ok(())
        });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        _ = term.recv() => Ok(()),
        r = tokio::signal::ctrl_c() => r,
        Some(r) = tasks.join_next() => match r {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        },
    };
    tracing::info!("shutting down");
    shutdown.cancel();
    state.processes.kill_all();
    result
}
