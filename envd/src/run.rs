//! `POST /run`: hands one job to the sandbox's warm runner (the template's
//! START process) and streams the job's output (docs/runner-protocol.md).
//!
//! The runner is a process envd started (tag `runner` by default), so envd
//! already holds its stdin/stdout/stderr and reaps it. A job is one JSON
//! line on the runner's socket; the job's output is the runner's own output
//! from that moment on, rich outputs come back on the socket connection, and
//! the runner's exit is the job's exit. A runner serves exactly one job.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::ApiError;
use crate::json::{b64, ApiJson};
use crate::process::api::ndjson;
use crate::process::output::Event;
use crate::process::Process;
use crate::state::AppState;

/// Where runners listen unless a request or `--runner-socket` says otherwise.
pub const DEFAULT_RUNNER_SOCKET: &str = "/run/thaw-runner/runner.sock";
/// Largest rich-output line a runner may send (a big PNG, base64).
const MAX_OUTPUT_LINE: usize = 64 << 20;

/// `POST /run`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The code.
    pub code: String,
    /// Arguments after the code (`sys.argv[1:]`, `process.argv.slice(1)`, `$1…`).
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment merged over the runner's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of the job.
    pub cwd: Option<String>,
    /// The job's stdin, base64 (end of file after it).
    #[serde(default, deserialize_with = "b64::option::deserialize")]
    pub stdin: Option<Vec<u8>>,
    /// Tag of the runner process (default `runner`).
    pub runner: Option<String>,
    /// The runner's socket (default `--runner-socket`).
    pub socket: Option<PathBuf>,
    /// Kill the job after this many milliseconds (`timed_out` in its exit).
    pub timeout_ms: Option<u64>,
}

/// The line written to the runner.
#[derive(Debug, Serialize)]
struct Job<'a> {
    code: &'a str,
    args: &'a [String],
    env: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cwd: Option<&'a str>,
}

/// A rich output line from the runner.
#[derive(Debug, Deserialize)]
struct RunnerOutput {
    #[serde(rename = "type")]
    kind: String,
    mime_type: String,
    data: String,
}

/// Kills the runner if the caller goes away before the job's exit.
struct AbandonGuard {
    proc: Arc<Process>,
    armed: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if self.armed && self.proc.running() {
            tracing::debug!(
                pid = self.proc.pid,
                "run stream dropped; killing the runner"
            );
            let _ = self.proc.signal_group(nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// `POST /run`.
pub async fn run(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<RunRequest>,
) -> Result<Response, ApiError> {
    let tag = req.runner.clone().unwrap_or_else(|| "runner".into());
    let proc = state.processes.find(&tag).ok_or_else(|| {
        ApiError::conflict(
            "runner_not_ready",
            format!("no runner process with tag {tag:?}: start the template's START process first"),
        )
    })?;
    if !proc.running() {
        return Err(ApiError::conflict(
            "runner_exited",
            format!("the runner {tag:?} has exited (a runner serves one job)"),
        ));
    }
    let socket = req
        .socket
        .clone()
        .unwrap_or_else(|| state.config.runner_socket.clone());
    // Live events only: what the runner printed before the job is not part
    // of it. Subscribing before the job is sent means nothing is missed.
    let sub = proc.output.subscribe(false);
    let mut conn = connect_runner(&socket).await.map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::BAD_GATEWAY,
            "runner_unreachable",
            format!(
                "the runner's socket {} does not answer: {e}",
                socket.display()
            ),
        )
    })?;
    // The sandbox's environment (from `/init`) under the job's own: a
    // runner started before the snapshot has not seen it.
    let mut env = state
        .session
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .env
        .clone();
    env.extend(req.env.clone());
    let mut line = serde_json::to_vec(&Job {
        code: &req.code,
        args: &req.args,
        env: &env,
        cwd: req.cwd.as_deref(),
    })
    .map_err(|e| ApiError::internal(format!("encoding the job: {e}")))?;
    line.push(b'\n');
    conn.write_all(&line).await.map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::BAD_GATEWAY,
            "runner_unreachable",
            format!("writing the job to the runner: {e}"),
        )
    })?;
    // The job's stdin, then end of file, so a job that reads stdin ends.
    {
        let mut stdin = proc.stdin.lock().await;
        if let Some(mut pipe) = stdin.take() {
            if let Some(data) = req.stdin.as_deref() {
                // A job that never reads its stdin may exit first: not an error.
                let _ = pipe.write_all(data).await;
            }
        }
    }
    if let Some(ms) = req.timeout_ms {
        let p = proc.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if p.running() {
                p.kill_for_deadline();
            }
        });
    }
    let start = Event::Start {
        pid: proc.pid,
        tag: proc.tag.clone(),
    };
    let guard = AbandonGuard {
        proc: proc.clone(),
        armed: true,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    let _ = tx.send(start).await;
    tokio::spawn(forward(sub.live, sub.exit, conn, tx));
    let stream = futures::stream::unfold((rx, guard), |(mut rx, mut guard)| async move {
        let ev = rx.recv().await?;
        if matches!(ev, Event::Exit(_)) {
            guard.armed = false;
        }
        Some((Ok(ev.to_line()), (rx, guard)))
    });
    Ok(ndjson(stream))
}

/// How long `/run` keeps trying a runner socket that is not listening yet.
const CONNECT_PATIENCE: Duration = Duration::from_secs(2);

/// Connects to the runner. A socket file appears at `bind`, a moment before
/// the runner calls `listen`; a connect in between is refused. So refused
/// and missing sockets are retried briefly (a READY check that saw the file
/// may have raced the runner's `listen`).
async fn connect_runner(socket: &std::path::Path) -> std::io::Result<UnixStream> {
    let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE;
    loop {
        match UnixStream::connect(socket).await {
            Ok(c) => return Ok(c),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Forwards the runner's events and the rich outputs from its socket, in
/// order of arrival, ending with the exit (after the socket's last lines).
async fn forward(
    live: Option<tokio::sync::mpsc::Receiver<Event>>,
    exit: Option<Event>,
    conn: UnixStream,
    tx: tokio::sync::mpsc::Sender<Event>,
) {
    if let Some(exit) = exit {
        let _ = tx.send(exit).await;
        return;
    }
    let Some(mut live) = live else { return };
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    let mut socket_open = true;
    loop {
        tokio::select! {
            ev = live.recv() => {
                let Some(ev) = ev else { return };
                if matches!(ev, Event::Exit(_)) {
                    // Outputs the runner wrote before exiting come first.
                    let drain = async {
                        while socket_open {
                            socket_open = read_output(&mut reader, &mut line, &tx).await;
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_millis(100), drain).await;
                    let _ = tx.send(ev).await;
                    return;
                }
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            open = read_output(&mut reader, &mut line, &tx), if socket_open => {
                socket_open = open;
            }
        }
    }
}

/// Reads one line from the runner's connection and forwards it as an
/// `output` event. Returns whether the connection is still open. Partial
/// lines stay in `line` if the read is interrupted (read_until appends).
async fn read_output(
    reader: &mut BufReader<UnixStream>,
    line: &mut Vec<u8>,
    tx: &tokio::sync::mpsc::Sender<Event>,
) -> bool {
    match reader.read_until(b'\n', line).await {
        Ok(0) | Err(_) => false,
        Ok(_) if !line.ends_with(b"\n") && line.len() < MAX_OUTPUT_LINE => true,
        Ok(_) => {
            if line.len() <= MAX_OUTPUT_LINE {
                match serde_json::from_slice::<RunnerOutput>(line) {
                    Ok(o) if o.kind == "output" => {
                        let _ = tx
                            .send(Event::Output {
                                mime_type: o.mime_type,
                                data: o.data,
                            })
                            .await;
                    }
                    _ => tracing::debug!("ignored a malformed line from the runner"),
                }
            } else {
                tracing::warn!("dropped a runner output over {MAX_OUTPUT_LINE} bytes");
            }
            line.clear();
            true
        }
    }
}
