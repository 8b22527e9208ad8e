//! Acting as a user on the filesystem from one thread: the thread's
//! filesystem uid and gid and its supplementary groups are switched for the
//! length of one operation, so the kernel checks permissions (403) and new
//! files belong to that user, without forking.
//!
//! Linux keeps credentials per thread; glibc's `setgroups` broadcasts to all
//! threads for POSIX semantics, so the raw system call is used to change
//! only the calling thread. Always run inside `spawn_blocking`.

use nix::unistd::{Gid, Uid};

use crate::user::Identity;

/// Runs `f` with the calling thread's filesystem identity switched to `who`
/// (when envd is root and `who` is someone else), restoring it afterwards,
/// even if `f` panics.
pub fn run_as<T>(who: &Identity, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
    if !nix::unistd::geteuid().is_root() || who.is_root() {
        if !nix::unistd::geteuid().is_root() && who.uid != nix::unistd::geteuid().as_raw() {
            return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        }
        return f();
    }
    let _guard = Switched::to(who)?;
    f()
}

/// Restores root's filesystem identity on drop.
struct Switched {
    saved_groups: Vec<libc::gid_t>,
}

fn thread_setgroups(groups: &[libc::gid_t]) -> std::io::Result<()> {
    // SAFETY: the raw setgroups system call reads `len` gids from the
    // pointer, which points at a live slice of exactly that length. Unlike
    // glibc's wrapper it changes only the calling thread's credentials.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Switched {
    fn to(who: &Identity) -> std::io::Result<Switched> {
        let saved_groups: Vec<libc::gid_t> = nix::unistd::getgroups()
            .map_err(std::io::Error::from)?
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        thread_setgroups(&who.groups)?;
        // setfsuid/setfsgid cannot fail for root; they return the old value.
        nix::unistd::setfsgid(Gid::from_raw(who.gid));
        nix::unistd::setfsuid(Uid::from_raw(who.uid));
        Ok(Switched { saved_groups })
    }
}

impl Drop for Switched {
    fn drop(&mut self) {
        // fsuid first: it brings back the capabilities setgroups needs.
        nix::unistd::setfsuid(Uid::from_raw(0));
        nix::unistd::setfsgid(Gid::from_raw(0));
        if let Err(e) = thread_setgroups(&self.saved_groups) {
            tracing::error!(error = %e, "restoring a worker thread's groups failed");
        }
    }
}
