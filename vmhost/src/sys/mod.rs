//! Host operating-system helpers that any driver may use: cgroup v1 files
//! and the process table. Safe code only (rustix wraps the syscalls).

pub mod cgroup;
pub mod procs;
