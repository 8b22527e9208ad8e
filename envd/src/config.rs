//! envd's configuration: every flag and its `THAW_ENVD_*` variable, in one
//! place.

use std::path::PathBuf;

use clap::Parser;

use crate::transport::ListenAddr;

/// envd, thaw's guest agent: serves processes, files, ports and metrics of
/// this sandbox to the host over HTTP/1.1 and HTTP/2 (API: envd/README.md).
///
/// Inside a sandbox envd dials out to the host (`--dial`); for tests and
/// direct use it listens (`--listen`). Give at least one.
///
/// `envd exec-runner [--socket PATH] -- PROG ARG…` is the warm runner of
/// runtimes that cannot listen themselves (see `envd exec-runner --help`).
#[derive(Debug, Clone, Parser)]
#[command(name = "envd", version, about, long_about)]
pub struct Config {
    /// Listen here: `HOST:PORT` or `unix:/path/to.sock`.
    #[arg(long, env = "THAW_ENVD_LISTEN")]
    pub listen: Option<ListenAddr>,

    /// Dial the host's Unix socket at this path and serve HTTP on each
    /// connection (re-dialed with a short backoff when they drop).
    #[arg(long, env = "THAW_ENVD_DIAL")]
    pub dial: Option<PathBuf>,

    /// Connections kept dialed to the host.
    #[arg(long, env = "THAW_ENVD_CONNECTIONS", default_value_t = 4)]
    pub connections: usize,

    /// Directory of the sandbox's identity files, replaced by every `/init`.
    #[arg(long, env = "THAW_ENVD_RUN_DIR", default_value = "/run/thaw")]
    pub run_dir: PathBuf,

    /// Whether `/snapshot/prepare` drops the kernel's page cache (turn off
    /// when envd runs on a shared host, as in tests).
    #[arg(long, env = "THAW_ENVD_DROP_CACHES", default_value_t = true, action = clap::ArgAction::Set)]
    pub drop_caches: bool,

    /// Bytes of output each process keeps for a reconnecting client (the
    /// oldest are dropped first).
    #[arg(long, env = "THAW_ENVD_OUTPUT_BUFFER_BYTES", default_value_t = 1 << 20)]
    pub output_buffer_bytes: usize,

    /// Filesystem whose size `/metrics` reports as the disk.
    #[arg(long, env = "THAW_ENVD_DISK_PATH", default_value = "/")]
    pub disk_path: PathBuf,

    /// The warm runner's Unix socket, where `POST /run` hands jobs.
    #[arg(long, env = "THAW_RUNNER_SOCKET", default_value = crate::run::DEFAULT_RUNNER_SOCKET)]
    pub runner_socket: PathBuf,
}
