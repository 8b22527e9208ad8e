//! The `/processes` routes: start (foreground stream or background), list,
//! reconnect to a stream, input, signal, resize, kill.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use nix::sys::signal::Signal;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::output::{Event, Subscription};
use super::pty::PtySize;
use super::spawn::SpawnSpec;
use super::{new_tag, NewProcess, Process, StartError};
use crate::error::ApiError;
use crate::json::{b64, ApiJson};
use crate::state::AppState;
use crate::user::Identity;

/// `POST /processes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Program name or path.
    pub cmd: String,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment, over the one set by `/init`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: `/init`'s, else the user's home).
    pub cwd: Option<PathBuf>,
    /// User (default: `/init`'s, else envd's own).
    pub user: Option<String>,
    /// Bytes for stdin, base64.
    #[serde(default, deserialize_with = "b64::option::deserialize")]
    pub stdin: Option<Vec<u8>>,
    /// Keep stdin open for `/input` (default: only for background processes).
    pub keep_stdin_open: Option<bool>,
    /// Run on a pseudo-terminal of this size.
    pub pty: Option<PtySize>,
    /// Answer 202 at once instead of streaming.
    #[serde(default)]
    pub background: bool,
    /// A name to find it by (default `proc-` + 8 hex digits).
    pub tag: Option<String>,
    /// Kill the process group after this many milliseconds.
    pub timeout_ms: Option<u64>,
}

/// `POST /processes/{selector}/input`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputRequest {
    /// Bytes, base64.
    #[serde(default, with = "b64")]
    pub data: Vec<u8>,
    /// Close stdin after the bytes.
    #[serde(default)]
    pub eof: bool,
}

/// A signal by name (`SIGTERM`, `TERM`) or number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SignalSpec {
    /// `15`.
    Number(i32),
    /// `"SIGTERM"` or `"TERM"`.
    Name(String),
}

impl SignalSpec {
    fn resolve(&self) -> Result<Signal, ApiError> {
        let bad = || {
            ApiError::bad_request(
                "invalid_signal",
                format!("signal: {self:?} is not a signal name or number"),
            )
        };
        match self {
            SignalSpec::Number(n) => Signal::try_from(*n).map_err(|_| bad()),
            SignalSpec::Name(name) => {
                let upper = name.to_ascii_uppercase();
                let full = if upper.starts_with("SIG") {
                    upper
                } else {
                    format!("SIG{upper}")
                };
                Signal::from_str(&full).map_err(|_| bad())
            }
        }
    }
}

/// `POST /processes/{selector}/signal`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// Which signal; it reaches the whole process group.
    pub signal: SignalSpec,
}

fn validate_tag(tag: &str) -> Result<(), ApiError> {
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !tag.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_tag",
            "tag: 1-64 characters of [A-Za-z0-9_.-], not all digits (digits select a pid)",
        ))
    }
}

/// The default `PATH` of processes envd starts.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `POST /processes`.
pub async fn start(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<StartRequest>,
) -> Result<Response, ApiError> {
    if req.cmd.is_empty() || req.cmd.contains('\0') {
        return Err(ApiError::bad_request(
            "invalid_cmd",
            "cmd: must be a non-empty program name or path",
        ));
    }
    if let Some(pty) = req.pty {
        if pty.cols == 0 || pty.rows == 0 {
            return Err(ApiError::bad_request(
                "invalid_pty",
                "pty: cols and rows must be above 0",
            ));
        }
    }
    let tag = match req.tag {
        Some(t) => {
            validate_tag(&t)?;
            t
        }
        None => new_tag(),
    };
    let session = state.session();
    let identity = match req.user.as_deref().or(session.user.as_deref()) {
        Some(name) => Identity::lookup(name)?,
        None => Identity::current(),
    };
    let cwd = req
        .cwd
        .clone()
        .or_else(|| session.workdir.clone())
        .unwrap_or_else(|| identity.home.clone());
    if !cwd.is_dir() {
        return Err(ApiError::bad_request(
            "invalid_cwd",
            format!("cwd: {} is not a directory", cwd.display()),
        ));
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    env.insert("HOME".into(), identity.home.display().to_string());
    env.insert("USER".into(), identity.name.clone());
    env.insert("LOGNAME".into(), identity.name.clone());
    env.insert("SHELL".into(), identity.shell.display().to_string());
    if req.pty.is_some() {
        env.insert("TERM".into(), "xterm-256color".into());
    }
    env.extend(session.env.clone());
    env.extend(req.env);
    if env
        .keys()
        .any(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        || env.values().any(|v| v.contains('\0'))
    {
        return Err(ApiError::bad_request(
            "invalid_env",
            "env: names must be non-empty without '=' and no value may hold a NUL byte",
        ));
    }
    let keep_stdin_open = req.keep_stdin_open.unwrap_or(req.background);
    let new = NewProcess {
        spec: SpawnSpec {
            program: req.cmd,
            args: req.args,
            env: env.into_iter().collect(),
            cwd,
            identity,
            pty: req.pty,
            stdin_piped: req.stdin.is_some() || keep_stdin_open,
        },
        tag,
        background: req.background,
        stdin_data: req.stdin,
        keep_stdin_open,
        timeout: req.timeout_ms.map(Duration::from_millis),
        subscribe: !req.background,
    };
    let (proc, sub) = state.processes.start(new).map_err(|e| match e {
        StartError::TagInUse(_) => ApiError::conflict("tag_in_use", e.to_string()),
        StartError::Spawn { program, source } => {
            let message = format!("cmd: cannot start {program:?}: {source}");
            match source.kind() {
                std::io::ErrorKind::NotFound => ApiError::bad_request("command_not_found", message),
                std::io::ErrorKind::PermissionDenied => {
                    ApiError::new(StatusCode::FORBIDDEN, "permission_denied", message)
                }
                _ => ApiError::internal(message),
            }
        }
    })?;
    tracing::debug!(pid = proc.pid, tag = %proc.tag, background = proc.background, "started");
    match sub {
        None => Ok((
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({"pid": proc.pid, "tag": proc.tag})),
        )
            .into_response()),
        Some(sub) => Ok(ndjson(event_stream(proc, sub, true))),
    }
}

/// An NDJSON streaming response.
pub fn ndjson(stream: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Kills a foreground process whose stream was dropped before its exit
/// event was sent: a foreground process lives as long as its caller listens.
struct KillOnDrop {
    proc: Arc<Process>,
    armed: bool,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.armed && self.proc.running() {
            tracing::debug!(
                pid = self.proc.pid,
                "stream dropped; killing its process group"
            );
            let _ = self.proc.signal_group(Signal::SIGKILL);
        }
    }
}

/// `start`, the replay, then live events up to and including the exit.
fn event_stream(
    proc: Arc<Process>,
    sub: Subscription,
    kill_on_drop: bool,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let start = Event::Start {
        pid: proc.pid,
        tag: proc.tag.clone(),
    };
    let guard = KillOnDrop {
        proc,
        armed: kill_on_drop,
    };
    let head = futures::stream::iter(
        std::iter::once(start)
            .chain(sub.replay)
            .chain(sub.exit)
            .collect::<Vec<_>>(),
    );
    let live = futures::stream::unfold((sub.live, guard), |(rx, mut guard)| async move {
        let mut rx = rx?;
        let event = rx.recv().await?;
        if matches!(event, Event::Exit(_)) {
            guard.armed = false;
        }
        Some((event, (Some(rx), guard)))
    });
    head.chain(live).map(|e| Ok(e.to_line()))
}

fn find(state: &AppState, selector: &str) -> Result<Arc<Process>, ApiError> {
    state.processes.find(selector).ok_or_else(|| {
        ApiError::not_found(
            "process_not_found",
            format!("no process with pid or tag {selector:?}"),
        )
    })
}

/// `GET /processes`.
pub async fn list(State(state): State<AppState>) -> impl IntoResponse {
    let procs: Vec<_> = state.processes.list().iter().map(|p| p.info()).collect();
    axum::Json(serde_json::json!({ "processes": procs }))
}

/// `GET /processes/{selector}`.
pub async fn get(
    State(state): State<AppState>,
    Path(selector): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(find(&state, &selector)?.info()))
}

/// `GET /processes/{selector}/stream`.
pub async fn stream(
    State(state): State<AppState>,
    Path(selector): Path<String>,
) -> Result<Response, ApiError> {
    let proc = find(&state, &selector)?;
    // Subscribing copies the ring and registers under one lock: no event is
    // missed between the replay and the live part, and a process that has
    // already exited yields its stored exit at once.
    let sub = proc.output.subscribe(true);
    Ok(ndjson(event_stream(proc, sub, false)))
}

/// `POST /processes/{selector}/input`.
pub async fn input(
    State(state): State<AppState>,
    Path(selector): Path<String>,
    ApiJson(req): ApiJson<InputRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let proc = find(&state, &selector)?;
    if !proc.running() {
        return Err(ApiError::conflict("not_running", "the process has exited"));
    }
    if let Some(master) = proc.pty.as_ref() {
        master
            .write_all(&req.data)
            .await
            .map_err(|e| ApiError::conflict("input_closed", format!("terminal input: {e}")))?;
        return Ok(StatusCode::NO_CONTENT);
    }
    let mut stdin = proc.stdin.lock().await;
    let Some(sender) = stdin.as_mut() else {
        return Err(ApiError::conflict(
            "stdin_closed",
            "stdin is closed (start with keep_stdin_open or background to send input)",
        ));
    };
    if let Err(e) = sender.write_all(&req.data).await {
        stdin.take();
        return Err(ApiError::conflict(
            "stdin_closed",
            format!("the process closed its stdin: {e}"),
        ));
    }
    if req.eof {
        stdin.take();
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /processes/{selector}/signal`.
pub async fn signal(
    State(state): State<AppState>,
    Path(selector): Path<String>,
    ApiJson(req): ApiJson<SignalRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let proc = find(&state, &selector)?;
    let sig = req.signal.resolve()?;
    if !proc.running() {
        return Err(ApiError::conflict("not_running", "the process has exited"));
    }
    proc.signal_group(sig)
        .map_err(|e| ApiError::internal(format!("signal {sig}: {e}")))?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /processes/{selector}/resize`.
pub async fn resize(
    State(state): State<AppState>,
    Path(selector): Path<String>,
    ApiJson(size): ApiJson<PtySize>,
) -> Result<impl IntoResponse, ApiError> {
    let proc = find(&state, &selector)?;
    let Some(master) = proc.pty.as_ref() else {
        return Err(ApiError::conflict(
            "no_pty",
            "the process was not started with a pty",
        ));
    };
    if size.cols == 0 || size.rows == 0 {
        return Err(ApiError::bad_request(
            "invalid_pty",
            "cols and rows must be above 0",
        ));
    }
    master
        .resize(size)
        .map_err(|e| ApiError::internal(format!("resize: {e}")))?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /processes/{selector}`: SIGKILL to the whole process group.
pub async fn kill(
    State(state): State<AppState>,
    Path(selector): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let proc = find(&state, &selector)?;
    let was_running = proc.running();
    proc.signal_group(Signal::SIGKILL)
        .map_err(|e| ApiError::internal(format!("kill: {e}")))?;
    Ok(axum::Json(serde_json::json!({
        "pid": proc.pid,
        "tag": proc.tag,
        "was_running": was_running,
    })))
}
