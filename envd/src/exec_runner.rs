//! `envd exec-runner`: the warm runner of runtimes that cannot listen on a
//! socket themselves (bash). It listens on the runner socket, takes one job
//! (docs/runner-protocol.md), and `execve`s the program with the job's code
//! in place of the `{code}` argument and the job's args appended, its env
//! merged and its cwd applied: no fork, the job is this very process.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use clap::Parser;
use serde::Deserialize;

/// Largest job line accepted.
const MAX_JOB_BYTES: u64 = 64 << 20;

/// envd exec-runner: take one job on the runner socket and exec PROG with
/// it, e.g. `envd exec-runner -- /bin/bash -c {code} bash` runs
/// `bash -c CODE bash ARGS…`.
#[derive(Debug, Parser)]
#[command(name = "envd exec-runner", version, about, long_about)]
pub struct ExecRunnerArgs {
    /// The socket to listen on.
    #[arg(long, env = "THAW_RUNNER_SOCKET", default_value = crate::run::DEFAULT_RUNNER_SOCKET)]
    pub socket: PathBuf,
    /// The program and its arguments; `{code}` is replaced by the job's code.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// One job, as envd writes it.
#[derive(Debug, Deserialize)]
struct Job {
    code: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
}

/// Why the exec runner stopped without running a job.
#[derive(Debug, thiserror::Error)]
pub enum ExecRunnerError {
    /// The socket failed.
    #[error("runner socket {path}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The job line is not valid.
    #[error("the job is not valid JSON")]
    Job(#[source] serde_json::Error),
    /// exec failed.
    #[error("exec {program}")]
    Exec {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Waits for one job and execs it; returns only on failure.
pub fn exec_runner(args: ExecRunnerArgs) -> ExecRunnerError {
    let sock_err = |source| ExecRunnerError::Socket {
        path: args.socket.clone(),
        source,
    };
    let _ = std::fs::remove_file(&args.socket);
    let listener = match UnixListener::bind(&args.socket) {
        Ok(l) => l,
        Err(e) => return sock_err(e),
    };
    let conn = match listener.accept() {
        Ok((c, _)) => c,
        Err(e) => return sock_err(e),
    };
    let mut line = Vec::new();
    let mut reader = std::io::BufReader::new(std::io::Read::take(&conn, MAX_JOB_BYTES));
    if let Err(e) = reader.read_until(b'\n', &mut line) {
        return sock_err(e);
    }
    let job: Job = match serde_json::from_slice(&line) {
        Ok(j) => j,
        Err(e) => return ExecRunnerError::Job(e),
    };
    // The listener and connection are close-on-exec; remove the socket so
    // nobody else dials a runner that has taken its job.
    drop(listener);
    let _ = std::fs::remove_file(&args.socket);
    let Some((program, rest)) = args.command.split_first() else {
        return ExecRunnerError::Exec {
            program: String::new(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        };
    };
    let mut cmd = Command::new(program);
    cmd.args(rest.iter().map(|a| {
        if a == "{code}" {
            job.code.as_str()
        } else {
            a.as_str()
        }
    }))
    .args(&job.args)
    .envs(&job.env);
    if let Some(cwd) = &job.cwd {
        cmd.current_dir(cwd);
    }
    ExecRunnerError::Exec {
        program: program.clone(),
        source: cmd.exec(),
    }
}
