//! A stand-in for Firecracker's side of a UFFD restore, for tests and
//! benchmarks on machines without KVM: it maps anonymous memory, registers
//! it with a userfaultfd, sends the regions and the descriptor over the page
//! server's socket exactly as Firecracker does, then touches pages the way a
//! guest would.
//!
//! If the page server dies mid-restore, the socket closes: a monitor thread
//! notices, closes this side's userfaultfd (which releases every thread
//! blocked in a fault) and the touching call returns
//! [`HarnessError::PageServerDied`] instead of hanging.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::mman::{madvise, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};
use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};

use crate::format::PAGE_SIZE;
use crate::handshake::{self, GuestRegionUffdMapping, HandshakeError};

/// Why the harness failed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Mapping or registering memory failed.
    #[error("{op}")]
    Setup {
        /// What was being done.
        op: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed.
    #[error("handshake")]
    Handshake(#[from] HandshakeError),
    /// The page server closed its socket before the guest was done.
    #[error("the page server died mid-restore")]
    PageServerDied,
}

fn setup(op: &'static str) -> impl FnOnce(nix::Error) -> HarnessError {
    move |e| HarnessError::Setup {
        op,
        source: e.into(),
    }
}

/// Connects, retrying briefly while the socket exists but is not listening
/// yet (a listener's file appears at bind, just before listen).
fn connect_patiently(socket: &Path) -> std::io::Result<UnixStream> {
    let deadline = std::time::Instant::now() + STARTUP;
    loop {
        match UnixStream::connect(socket) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// Guest memory served by a page server.
pub struct Guest {
    base: usize,
    size: usize,
    uffd: Arc<Mutex<Option<Uffd>>>,
    conn: Option<UnixStream>,
    died: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
    monitor: Option<std::thread::JoinHandle<()>>,
}

impl Guest {
    /// Maps `size` bytes, registers them, connects to the page server at
    /// `socket` and hands it `regions` equal regions.
    pub fn connect(socket: &Path, size: usize, regions: usize) -> Result<Guest, HarnessError> {
        let len = std::num::NonZeroUsize::new(size).ok_or(HarnessError::Setup {
            op: "map guest memory",
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: a fresh private anonymous mapping at an address the kernel
        // picks; nothing else refers to it.
        let mem = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .map_err(setup("map guest memory"))?;
        let base = mem.as_ptr() as usize;
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(true)
            .require_features(
                FeatureFlags::EVENT_REMOVE | FeatureFlags::EVENT_UNMAP | FeatureFlags::EVENT_REMAP,
            )
            .create()
            .map_err(|e| HarnessError::Setup {
                op: "create userfaultfd",
                source: std::io::Error::other(e.to_string()),
            })?;
        uffd.register(mem.as_ptr(), size)
            .map_err(|e| HarnessError::Setup {
                op: "register guest memory",
                source: std::io::Error::other(e.to_string()),
            })?;
        let conn = connect_patiently(socket).map_err(|source| HarnessError::Setup {
            op: "connect to the page server",
            source,
        })?;
        let n = regions.max(1);
        let per = (size / n) / PAGE_SIZE * PAGE_SIZE;
        let mappings: Vec<GuestRegionUffdMapping> = (0..n)
            .map(|i| {
                let start = i * per;
                let len = if i == n - 1 { size - start } else { per };
                GuestRegionUffdMapping {
                    base_host_virt_addr: (base + start) as u64,
                    size: len as u64,
                    offset: start as u64,
                    page_size: Some(PAGE_SIZE as u64),
                    page_size_kib: Some(PAGE_SIZE as u64),
                }
            })
            .collect();
        handshake::send(&conn, &mappings, uffd.as_raw_fd())?;
        let uffd = Arc::new(Mutex::new(Some(uffd)));
        let died = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicBool::new(false));
        let watch = conn.try_clone().map_err(|source| HarnessError::Setup {
            op: "clone the socket",
            source,
        })?;
        let monitor = {
            let (uffd, died, finished) = (uffd.clone(), died.clone(), finished.clone());
            std::thread::spawn(move || {
                while !finished.load(Ordering::Acquire) {
                    let mut fds = [PollFd::new(watch.as_fd(), PollFlags::POLLIN)];
                    if poll(&mut fds, PollTimeout::from(20u16)).unwrap_or(0) > 0 {
                        if finished.load(Ordering::Acquire) {
                            return;
                        }
                        died.store(true, Ordering::Release);
                        // Closing our userfaultfd releases every thread
                        // blocked in a fault (they then see plain zero pages,
                        // which `touch` reports as a failure).
                        uffd.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .take();
                        return;
                    }
                }
            })
        };
        Ok(Guest {
            base,
            size,
            uffd,
            conn: Some(conn),
            died,
            finished,
            monitor: Some(monitor),
        })
    }

    /// Guest memory size.
    pub fn size(&self) -> usize {
        self.size
    }

    fn check(&self) -> Result<(), HarnessError> {
        if self.died.load(Ordering::Acquire) {
            Err(HarnessError::PageServerDied)
        } else {
            Ok(())
        }
    }

    /// Reads one byte of each page, in order, as a guest would.
    pub fn touch(&self, pages: &[u64]) -> Result<u64, HarnessError> {
        let mut sum = 0u64;
        for &p in pages {
            let at = usize::try_from(p)
                .unwrap_or(usize::MAX)
                .saturating_mul(PAGE_SIZE);
            if at >= self.size {
                continue;
            }
            // SAFETY: `at` is inside the live mapping of `size` bytes; a
            // volatile read makes the access (and its fault) really happen.
            sum += u64::from(unsafe { std::ptr::read_volatile((self.base + at) as *const u8) });
            if self.died.load(Ordering::Relaxed) {
                break;
            }
        }
        self.check()?;
        Ok(sum)
    }

    /// Touches `pages` from `threads` threads at once (vCPUs faulting
    /// concurrently), each taking every `threads`-th page.
    pub fn touch_parallel(&self, pages: &[u64], threads: usize) -> Result<(), HarnessError> {
        let threads = threads.max(1);
        std::thread::scope(|s| {
            for t in 0..threads {
                let mine: Vec<u64> = pages.iter().copied().skip(t).step_by(threads).collect();
                s.spawn(move || self.touch(&mine));
            }
        });
        self.check()
    }

    /// A copy of one page (faulting it in if needed).
    pub fn page(&self, p: u64) -> Result<Vec<u8>, HarnessError> {
        let at = usize::try_from(p)
            .unwrap_or(usize::MAX)
            .saturating_mul(PAGE_SIZE);
        assert!(at + PAGE_SIZE <= self.size, "page {p} outside the guest");
        let mut out = vec![0u8; PAGE_SIZE];
        // SAFETY: the source is PAGE_SIZE bytes inside the live mapping
        // (checked above) and the destination a fresh buffer of that size;
        // they cannot overlap. Reading may fault the page in, as a guest's
        // read would.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.base + at) as *const u8,
                out.as_mut_ptr(),
                PAGE_SIZE,
            );
        }
        self.check()?;
        Ok(out)
    }

    /// Gives pages back as a balloon would (`MADV_DONTNEED`): the page
    /// server gets a REMOVE event, and the pages read as zero afterwards.
    pub fn remove(&self, first_page: u64, pages: u64) -> Result<(), HarnessError> {
        let (ptr, len) = self.range(first_page, pages)?;
        // SAFETY: the range is inside our own anonymous mapping; dropping
        // its pages only makes later reads fault again.
        unsafe { madvise(ptr, len, MmapAdvise::MADV_DONTNEED) }.map_err(setup("madvise"))?;
        self.check()
    }

    /// The address and length of a page range, checked to lie inside.
    fn range(
        &self,
        first_page: u64,
        pages: u64,
    ) -> Result<(NonNull<libc::c_void>, usize), HarnessError> {
        let bad = || HarnessError::Setup {
            op: "page range",
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        };
        let at = usize::try_from(first_page)
            .map_err(|_| bad())?
            .checked_mul(PAGE_SIZE)
            .ok_or_else(bad)?;
        let len = usize::try_from(pages)
            .map_err(|_| bad())?
            .checked_mul(PAGE_SIZE)
            .ok_or_else(bad)?;
        if at.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(bad());
        }
        let ptr = NonNull::new((self.base + at) as *mut libc::c_void).ok_or_else(bad)?;
        Ok((ptr, len))
    }

    /// Unmaps pages as a VMM tearing down part of guest memory would: the
    /// page server gets an UNMAP event. The pages must not be touched
    /// afterwards.
    pub fn unmap(&self, first_page: u64, pages: u64) -> Result<(), HarnessError> {
        let (ptr, len) = self.range(first_page, pages)?;
        // SAFETY: the range is inside our own mapping and callers promise
        // not to touch it again; `drop` unmapping it a second time is
        // harmless.
        unsafe { munmap(ptr, len) }.map_err(setup("munmap"))?;
        self.check()
    }

    /// Ends the restore: closes the socket, so the page server returns.
    pub fn finish(mut self) -> Result<(), HarnessError> {
        self.finished.store(true, Ordering::Release);
        self.check()?;
        self.conn.take();
        Ok(())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.finished.store(true, Ordering::Release);
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
        self.conn.take();
        self.uffd
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(ptr) = NonNull::new(self.base as *mut libc::c_void) {
            // SAFETY: the mapping was created in `connect` with this size and
            // no reference into it outlives `self`.
            let _ = unsafe { munmap(ptr, self.size) };
        }
    }
}

/// How long tests wait for a page server to come up.
pub const STARTUP: Duration = Duration::from_secs(10);
