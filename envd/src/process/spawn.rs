//! Starting a child: its identity (uid, gid, groups), its own session and
//! process group, its stdio (pipes or a pseudo-terminal). The only place that
//! runs code between `fork` and `exec`.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use tokio::net::unix::pipe;

use super::pty::{self, PtyMaster, PtySize};
use crate::user::Identity;

/// Everything needed to start one child.
#[derive(Debug)]
pub struct SpawnSpec {
    /// Program name or path (a bare name is looked up on the child's `PATH`).
    pub program: String,
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// The child's complete environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Who it runs as.
    pub identity: Identity,
    /// A pseudo-terminal of this size instead of pipes.
    pub pty: Option<PtySize>,
    /// Whether stdin is a pipe (otherwise `/dev/null`); ignored with a PTY.
    pub stdin_piped: bool,
}

/// A started child's handles.
#[derive(Debug)]
pub struct Spawned {
    /// Process id (also its process group and session id).
    pub pid: u32,
    /// The write end of its stdin pipe.
    pub stdin: Option<pipe::Sender>,
    /// The read end of its stdout pipe.
    pub stdout: Option<pipe::Receiver>,
    /// The read end of its stderr pipe.
    pub stderr: Option<pipe::Receiver>,
    /// The terminal's master end, with a PTY.
    pub pty: Option<PtyMaster>,
}

/// Starts the child. Must be called with the process table locked, so the
/// reaper cannot collect the child before it is registered (see `table`).
pub fn spawn(spec: &SpawnSpec) -> std::io::Result<Spawned> {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd);

    let mut master = None;
    if let Some(size) = spec.pty {
        let pair = pty::open(size)?;
        let slave: OwnedFd = pair.slave;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        master = Some(pair.master);
    } else {
        cmd.stdin(if spec.stdin_piped {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    }

    let with_tty = spec.pty.is_some();
    let switch_user = spec.identity.uid != nix::unistd::geteuid().as_raw()
        || spec.identity.gid != nix::unistd::getegid().as_raw();
    if !with_tty && !switch_user {
        // The hot path: no code between fork and exec is needed, so std can
        // use posix_spawn (a vfork, not a copy of envd's page tables); the
        // child leads a new process group, which is what kills reach.
        cmd.process_group(0);
        return finish(cmd, master);
    }
    // Allocated before fork: the closure below must not allocate.
    let groups: Vec<libc::gid_t> = spec.identity.groups.clone();
    let (uid, gid) = (spec.identity.uid, spec.identity.gid);
    let pre_exec = move || -> std::io::Result<()> {
        // SAFETY: setsid takes no pointers; it makes the child the leader
        // of a new session and process group, so a kill reaches its group.
        if unsafe { libc::setsid() } == -1 {
            return Err(std::io::Error::last_os_error());
        }
        if with_tty {
            // SAFETY: fd 0 is the pty slave (set up by Command before this
            // closure runs); TIOCSCTTY with argument 0 takes no pointer and
            // makes it the controlling terminal of the new session.
            if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } == -1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if switch_user {
            // SAFETY: `groups` is a live Vec owned by this closure; the
            // pointer and length describe exactly its initialised elements.
            if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: plain integer argument; group before user, so the
            // process still has the privilege to change it.
            if unsafe { libc::setgid(gid) } == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: plain integer argument; drops root last.
            if unsafe { libc::setuid(uid) } == -1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe system calls
    // (setsid, ioctl, setgroups, setgid, setuid) on data allocated before
    // the fork; it takes no locks and allocates nothing.
    unsafe {
        cmd.pre_exec(pre_exec);
    }

    finish(cmd, master)
}

/// Spawns the configured command and wraps its descriptors.
fn finish(mut cmd: Command, master: Option<OwnedFd>) -> std::io::Result<Spawned> {
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let stdin = child
        .stdin
        .take()
        .map(|s| pipe::Sender::from_owned_fd(OwnedFd::from(s)))
        .transpose()?;
    let stdout = child
        .stdout
        .take()
        .map(|s| pipe::Receiver::from_owned_fd(OwnedFd::from(s)))
        .transpose()?;
    let stderr = child
        .stderr
        .take()
        .map(|s| pipe::Receiver::from_owned_fd(OwnedFd::from(s)))
        .transpose()?;
    // `child` is dropped without waiting: the reaper collects every child
    // with waitpid(-1), orphans included (envd is PID 1 or a subreaper).
    drop(child);
    // The parent's copies of the slave end close with `cmd`, so the master
    // reads end-of-file once the child and its descendants close theirs.
    drop(cmd);
    let pty = master.map(PtyMaster::new).transpose()?;
    Ok(Spawned {
        pid,
        stdin,
        stdout,
        stderr,
        pty,
    })
}
