//! Processes: the table of everything envd started, the reaper that collects
//! every child (orphans included), and each process's supervisor, which turns
//! its output and exit into events.

pub mod api;
pub mod output;
pub mod pty;
pub mod spawn;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use self::output::{Event, ExitInfo, Output};
use self::pty::PtyMaster;
use self::spawn::{SpawnSpec, Spawned};

/// How long after a process exits its pipes are still drained. A child it
/// left behind may hold them open; the exit is reported after this at most.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(100);
/// Exited processes kept for `GET /processes` and reconnects.
const KEEP_EXITED: usize = 256;
/// Read size for output pipes.
const READ_CHUNK: usize = 64 << 10;

/// One process envd started.
#[derive(Debug)]
pub struct Process {
    /// Process id (and process group id).
    pub pid: u32,
    /// Tag: given by the client or `proc-` + 8 hex digits.
    pub tag: String,
    /// Program.
    pub cmd: String,
    /// Arguments.
    pub args: Vec<String>,
    /// The user it runs as.
    pub user: String,
    /// Whether it was started in the background.
    pub background: bool,
    /// Start time, RFC 3339.
    pub started_at: String,
    started: Instant,
    /// The terminal's master end, with a PTY.
    pub pty: Option<PtyMaster>,
    /// The write end of stdin, while it is open.
    pub stdin: tokio::sync::Mutex<Option<pipe::Sender>>,
    /// Its events.
    pub output: Output,
    exit: Mutex<Option<ExitInfo>>,
    /// Set when a run's deadline killed it (reported as `timed_out`).
    deadline_kill: std::sync::atomic::AtomicBool,
}

/// A process as listed by `GET /processes`.
#[derive(Debug, Serialize)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: u32,
    /// Tag.
    pub tag: String,
    /// Program.
    pub cmd: String,
    /// Arguments.
    pub args: Vec<String>,
    /// User.
    pub user: String,
    /// Whether it has a PTY.
    pub pty: bool,
    /// Whether it was started in the background.
    pub background: bool,
    /// Whether it is still running.
    pub running: bool,
    /// How it ended, once it has.
    pub exit: Option<ExitInfo>,
    /// Start time, RFC 3339.
    pub started_at: String,
    /// Output bytes dropped from the replay buffer (the oldest go first).
    pub dropped_bytes: u64,
}

impl Process {
    /// How it ended, once it has.
    pub fn exit(&self) -> Option<ExitInfo> {
        self.exit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether it is still running.
    pub fn running(&self) -> bool {
        self.exit().is_none()
    }

    /// Sends `signal` to its whole process group.
    pub fn signal_group(&self, signal: Signal) -> nix::Result<()> {
        let pgid = Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX));
        match nix::sys::signal::killpg(pgid, signal) {
            // The group is already gone: nothing left to signal.
            Err(nix::errno::Errno::ESRCH) => Ok(()),
            other => other,
        }
    }

    /// Kills the whole group because a deadline passed; its exit is then
    /// reported with `timed_out: true`.
    pub fn kill_for_deadline(&self) {
        self.deadline_kill
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.signal_group(Signal::SIGKILL);
    }

    /// Its listing.
    pub fn info(&self) -> ProcessInfo {
        let exit = self.exit();
        ProcessInfo {
            pid: self.pid,
            tag: self.tag.clone(),
            cmd: self.cmd.clone(),
            args: self.args.clone(),
            user: self.user.clone(),
            pty: self.pty.is_some(),
            background: self.background,
            running: exit.is_none(),
            exit,
            started_at: self.started_at.clone(),
            dropped_bytes: self.output.dropped_bytes(),
        }
    }
}

/// What a new process is, besides how to spawn it.
#[derive(Debug)]
pub struct NewProcess {
    /// How to start it.
    pub spec: SpawnSpec,
    /// Its tag.
    pub tag: String,
    /// Started in the background?
    pub background: bool,
    /// Bytes to write to stdin first.
    pub stdin_data: Option<Vec<u8>>,
    /// Keep stdin open after `stdin_data` (for `/input`).
    pub keep_stdin_open: bool,
    /// Kill the group after this long.
    pub timeout: Option<Duration>,
    /// Subscribe before any output exists (a foreground stream).
    pub subscribe: bool,
}

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The tag belongs to a running process.
    #[error("tag {0:?} is in use by a running process")]
    TagInUse(String),
    /// fork/exec failed.
    #[error("starting {program:?}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Default)]
struct Table {
    procs: HashMap<u32, Arc<Process>>,
    waiters: HashMap<u32, oneshot::Sender<WaitStatus>>,
    exited: VecDeque<u32>,
}

/// Every process envd started, and the reaper.
#[derive(Debug)]
pub struct Processes {
    table: Mutex<Table>,
    output_cap: usize,
}

impl Processes {
    /// An empty table; each process keeps `output_cap` bytes for replay.
    pub fn new(output_cap: usize) -> Arc<Processes> {
        Arc::new(Processes {
            table: Mutex::new(Table::default()),
            output_cap,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Looks a process up: all digits is a pid, anything else a tag.
    pub fn find(&self, selector: &str) -> Option<Arc<Process>> {
        let t = self.lock();
        if !selector.is_empty() && selector.bytes().all(|b| b.is_ascii_digit()) {
            let pid: u32 = selector.parse().ok()?;
            return t.procs.get(&pid).cloned();
        }
        // A tag may be reused once its process exited: prefer the running one.
        let mut found: Option<&Arc<Process>> = None;
        for p in t.procs.values().filter(|p| p.tag == selector) {
            match found {
                Some(f) if f.running() && !p.running() => {}
                Some(f) if f.running() == p.running() && f.started > p.started => {}
                _ => found = Some(p),
            }
        }
        found.cloned()
    }

    /// Every process, oldest first.
    pub fn list(&self) -> Vec<Arc<Process>> {
        let mut v: Vec<_> = self.lock().procs.values().cloned().collect();
        v.sort_by_key(|p| p.started);
        v
    }

    /// Starts a process and its supervisor. With `subscribe`, the returned
    /// subscription sees every event from the first byte on.
    pub fn start(
        self: &Arc<Self>,
        new: NewProcess,
    ) -> Result<(Arc<Process>, Option<output::Subscription>), StartError> {
        let (spawned, wait_rx) = {
            let mut t = self.lock();
            if t.procs.values().any(|p| p.tag == new.tag && p.running()) {
                return Err(StartError::TagInUse(new.tag));
            }
            // Spawned under the table lock: the reaper takes the same lock,
            // so it cannot collect this child before its waiter exists.
            let spawned = spawn::spawn(&new.spec).map_err(|source| StartError::Spawn {
                program: new.spec.program.clone(),
                source,
            })?;
            let (tx, rx) = oneshot::channel();
            t.waiters.insert(spawned.pid, tx);
            (spawned, rx)
        };
        let Spawned {
            pid,
            stdin,
            stdout,
            stderr,
            pty,
        } = spawned;
        let proc = Arc::new(Process {
            pid,
            tag: new.tag,
            cmd: new.spec.program,
            args: new.spec.args,
            user: new.spec.identity.name,
            background: new.background,
            started_at: now_rfc3339(),
            started: Instant::now(),
            pty,
            stdin: tokio::sync::Mutex::new(None),
            output: Output::new(self.output_cap),
            exit: Mutex::new(None),
            deadline_kill: std::sync::atomic::AtomicBool::new(false),
        });
        self.lock().procs.insert(pid, proc.clone());
        let subscription = new.subscribe.then(|| proc.output.subscribe(false));

        let mut readers = Vec::new();
        if proc.pty.is_some() {
            readers.push(tokio::spawn(read_pty(proc.clone())));
        }
        if let Some(out) = stdout {
            readers.push(tokio::spawn(read_pipe(proc.clone(), out, false)));
        }
        if let Some(err) = stderr {
            readers.push(tokio::spawn(read_pipe(proc.clone(), err, true)));
        }
        if let Some(sender) = stdin {
            let proc2 = proc.clone();
            let data = new.stdin_data;
            let keep_open = new.keep_stdin_open;
            tokio::spawn(async move {
                let mut guard = proc2.stdin.lock().await;
                let mut sender = sender;
                if let Some(data) = data {
                    use tokio::io::AsyncWriteExt;
                    // The process may exit without reading its stdin; that
                    // is its business, not an error of envd's.
                    if sender.write_all(&data).await.is_err() {
                        return;
                    }
                }
                if keep_open {
                    *guard = Some(sender);
                }
            });
        } else if let (Some(data), Some(_)) = (new.stdin_data, proc.pty.as_ref()) {
            let proc2 = proc.clone();
            tokio::spawn(async move {
                if let Some(m) = proc2.pty.as_ref() {
                    let _ = m.write_all(&data).await;
                }
            });
        }
        tokio::spawn(supervise(
            self.clone(),
            proc.clone(),
            wait_rx,
            readers,
            new.timeout,
        ));
        Ok((proc, subscription))
    }

    /// Collects every child that has exited and hands each status to its
    /// process's supervisor. Orphans (not in the table) are just reaped.
    pub fn reap(&self) {
        let mut t = self.lock();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    let pid = pid.as_raw().unsigned_abs();
                    if let Some(tx) = t.waiters.remove(&pid) {
                        let _ = tx.send(status);
                    } else {
                        tracing::debug!(pid, "reaped an orphan");
                    }
                }
            }
        }
    }

    fn retire(&self, pid: u32) {
        let mut t = self.lock();
        t.exited.push_back(pid);
        while t.exited.len() > KEEP_EXITED {
            if let Some(old) = t.exited.pop_front() {
                if t.procs.get(&old).is_some_and(|p| !p.running()) {
                    t.procs.remove(&old);
                }
            }
        }
    }

    /// Kills every running process group (envd shutting down).
    pub fn kill_all(&self) {
        for p in self.list() {
            if p.running() {
                let _ = p.signal_group(Signal::SIGKILL);
            }
        }
    }
}

/// Runs the reaper: on every SIGCHLD, and once a second in case one was
/// coalesced away.
pub async fn run_reaper(processes: Arc<Processes>) {
    let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGCHLD; reaping once a second");
            None
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        match sigchld.as_mut() {
            Some(s) => {
                tokio::select! {
                    _ = s.recv() => {}
                    _ = tick.tick() => {}
                }
            }
            None => {
                tick.tick().await;
            }
        }
        processes.reap();
    }
}

async fn read_pipe(proc: Arc<Process>, mut pipe: pipe::Receiver, stderr: bool) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let data = Bytes::copy_from_slice(&buf[..n]);
                let event = if stderr {
                    Event::Stderr { data }
                } else {
                    Event::Stdout { data }
                };
                proc.output.publish(event).await;
            }
        }
    }
}

async fn read_pty(proc: Arc<Process>) {
    let Some(master) = proc.pty.as_ref() else {
        return;
    };
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match master.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let data = Bytes::copy_from_slice(&buf[..n]);
                proc.output.publish(Event::Stdout { data }).await;
            }
        }
    }
}

async fn supervise(
    processes: Arc<Processes>,
    proc: Arc<Process>,
    wait_rx: oneshot::Receiver<WaitStatus>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    timeout: Option<Duration>,
) {
    let mut timed_out = false;
    let mut wait_rx = wait_rx;
    let status = match timeout {
        Some(limit) => {
            tokio::select! {
                s = &mut wait_rx => s,
                () = tokio::time::sleep(limit) => {
                    timed_out = true;
                    let _ = proc.signal_group(Signal::SIGKILL);
                    wait_rx.await
                }
            }
        }
        None => wait_rx.await,
    };
    let duration_ms = u64::try_from(proc.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    // Drain what the process wrote before it exited, but do not wait for a
    // child it left behind holding the pipes open.
    let deadline = tokio::time::Instant::now() + DRAIN_AFTER_EXIT;
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout_at(deadline, r).await.is_err() {
            abort.abort();
        }
    }
    let (code, signal) = match status {
        Ok(WaitStatus::Exited(_, code)) => (Some(code), None),
        Ok(WaitStatus::Signaled(_, sig, _)) => (None, Some(sig as i32)),
        // The waiter vanished (envd shutting down) or an odd status.
        _ => (None, None),
    };
    let info = ExitInfo {
        code,
        signal,
        duration_ms,
        timed_out: timed_out || proc.deadline_kill.load(std::sync::atomic::Ordering::SeqCst),
    };
    *proc
        .exit
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(info.clone());
    // Stdin of an exited process is useless; close it.
    proc.stdin.lock().await.take();
    proc.output.finish(Event::Exit(info)).await;
    processes.retire(proc.pid);
}

/// The current time as RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A fresh tag: `proc-` and 8 hex digits.
pub fn new_tag() -> String {
    format!("proc-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_have_the_documented_shape() {
        let t = new_tag();
        assert_eq!(t.len(), 13);
        assert!(t.starts_with("proc-"));
        assert!(t[5..].bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
