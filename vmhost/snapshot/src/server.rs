//! The userfaultfd page server: serves a restored guest's memory from a
//! memory file, page by page on demand and in bulk ahead of the guest.
//!
//! - Demand faults: `UFFDIO_COPY` of one page from the mapped file, or
//!   `UFFDIO_ZEROPAGE` for a page the file does not store (zero pages never
//!   touch the disk). `EEXIST` (the page arrived meanwhile, e.g. from the
//!   prefetcher) is counted as served and the faulting thread woken;
//!   `EAGAIN` (the mapping is changing) defers the fault until the pending
//!   non-cooperative event has been read.
//! - Events: `REMOVE` (balloon deflation, `MADV_DONTNEED`) marks the range
//!   removed, so later faults there get zero pages and the prefetcher skips
//!   it; `UNMAP` forgets the range; `REMAP` moves a region; `FORK` is
//!   ignored (its descriptor is closed). Events are handled before faults.
//! - Prefetch: with a recorded working set, a second thread installs it in
//!   touch order with `UFFDIO_COPY` runs of up to 4 MiB from the (working
//!   set first) file, then optionally everything else; demand faults keep
//!   being served meanwhile.
//! - Recording: without a working set, the pages faulted in during the
//!   first moments are recorded in order, to be stored with the snapshot.
//! - The peer dying: the server ends when the handshake socket closes
//!   (Firecracker holds it for its whole life) and returns its figures.
//!   If the server dies instead, the peer sees the socket close; its
//!   faulting threads are released once it closes its userfaultfd.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::Serialize;
use userfaultfd::{Event, EventBuffer, Uffd};

use crate::format::{ExtentKind, FormatError, MemoryFile, WsRun, PAGE_SIZE};
use crate::handshake::{self, GuestRegionUffdMapping, HandshakeError};

/// Largest single `UFFDIO_COPY` of the prefetcher.
const MAX_BATCH: usize = 4 << 20;

/// How a restore is served.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Install the file's recorded working set ahead of the guest.
    pub prefetch: bool,
    /// After the working set, install every other stored page too.
    pub prefetch_all: bool,
    /// Record the pages faulted in during this long after the first fault
    /// (only when prefetch is off). While recording, faults are served one
    /// page at a time, so the record holds exactly the pages touched.
    pub record_for: Option<Duration>,
    /// Threads installing the working set (0 means the default, 2).
    pub prefetch_threads: usize,
    /// Pages installed per demand fault (the faulting page and the ones
    /// after it in the same extent); 0 means the default, 16.
    pub fault_around: u32,
}

/// Figures of one restore.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreStats {
    /// Page faults served on demand with data.
    pub demand_faults: u64,
    /// Page faults served with a zero page.
    pub zero_faults: u64,
    /// Faults that found the page already there (`EEXIST`).
    pub already_present: u64,
    /// Faults deferred because the mapping was changing (`EAGAIN`).
    pub deferred: u64,
    /// Pages installed by the prefetcher.
    pub pages_prefetched: u64,
    /// Bytes copied into the guest (demand and prefetch).
    pub bytes_copied: u64,
    /// Pages removed by `REMOVE` events.
    pub removed_pages: u64,
    /// Non-cooperative events read (remove, unmap, remap, fork).
    pub events: u64,
    /// From the handshake to the first fault, microseconds.
    pub first_fault_us: Option<u64>,
    /// From the handshake until the working set was installed.
    pub working_set_us: Option<u64>,
    /// From the handshake until the prefetcher finished.
    pub prefetch_us: Option<u64>,
    /// The recorded working set, in touch order.
    pub recorded: Vec<WsRun>,
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The handshake failed.
    #[error("uffd handshake")]
    Handshake(#[from] HandshakeError),
    /// A region does not fit the memory file or uses huge pages.
    #[error("region {index}: {what}")]
    BadRegion {
        /// Which region.
        index: usize,
        /// What is wrong.
        what: String,
    },
    /// The memory file is corrupt where a page was needed; no wrong bytes
    /// are served, the restore fails.
    #[error("memory file")]
    Format(#[from] FormatError),
    /// A userfaultfd operation failed.
    #[error("userfaultfd {op}")]
    Uffd {
        /// Which operation.
        op: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A userfaultfd error, reduced to what the server acts on. (The crate
/// uses an older nix; errnos are compared as integers.)
#[derive(Debug)]
enum UffdFailure {
    /// EEXIST: the page is already there.
    Exists,
    /// EAGAIN or a partial copy of this many bytes: try again.
    Again(usize),
    /// ENOENT/ESRCH: the range or the process is gone.
    Gone,
    /// Anything else.
    Other(String),
}

fn classify(e: userfaultfd::Error) -> UffdFailure {
    let errno = match &e {
        userfaultfd::Error::CopyFailed(n) | userfaultfd::Error::ZeropageFailed(n) => {
            Some(*n as i32)
        }
        userfaultfd::Error::SystemError(n) => Some(*n as i32),
        userfaultfd::Error::PartiallyCopied(n) => return UffdFailure::Again(*n),
        _ => None,
    };
    match errno {
        Some(libc::EEXIST) => UffdFailure::Exists,
        Some(libc::EAGAIN) => UffdFailure::Again(0),
        Some(libc::ENOENT | libc::ESRCH) => UffdFailure::Gone,
        _ => UffdFailure::Other(e.to_string()),
    }
}

/// A guest region as the server tracks it.
#[derive(Debug, Clone, Copy)]
struct Region {
    base: u64,
    size: u64,
    /// Guest byte offset of the region's start in the memory file.
    offset: u64,
}

/// Bitmap of guest pages, shared between the handler and the prefetcher.
#[derive(Debug)]
struct PageSet(Vec<AtomicU64>);

impl PageSet {
    fn new(pages: u64) -> PageSet {
        PageSet((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    fn set(&self, p: u64) -> bool {
        let Some(w) = self.0.get(usize::try_from(p / 64).unwrap_or(usize::MAX)) else {
            return false;
        };
        let bit = 1u64 << (p % 64);
        w.fetch_or(bit, Ordering::AcqRel) & bit == 0
    }
    fn get(&self, p: u64) -> bool {
        self.0
            .get(usize::try_from(p / 64).unwrap_or(usize::MAX))
            .is_some_and(|w| w.load(Ordering::Acquire) & (1u64 << (p % 64)) != 0)
    }
}

/// Shared state of one restore.
struct Restore {
    file: Arc<MemoryFile>,
    uffd: Uffd,
    regions: Mutex<Vec<Region>>,
    removed: PageSet,
    started: Instant,
    stop: AtomicBool,
    pages_prefetched: AtomicU64,
    bytes_copied: AtomicU64,
    /// Pages per demand fault.
    fault_around: u32,
}

impl Restore {
    /// The host address of guest page `p` in the current regions.
    fn host_addr(&self, p: u64) -> Option<u64> {
        let g = p * PAGE_SIZE as u64;
        let regions = self
            .regions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        regions
            .iter()
            .find(|r| g >= r.offset && g < r.offset + r.size)
            .map(|r| r.base + (g - r.offset))
    }

    /// The guest page behind host address `addr`.
    fn guest_page(&self, addr: u64) -> Option<u64> {
        let regions = self
            .regions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        regions
            .iter()
            .find(|r| addr >= r.base && addr < r.base + r.size)
            .map(|r| (r.offset + (addr - r.base)) / PAGE_SIZE as u64)
    }

    /// Where the bytes of page `p` are: `None` for a zero page.
    fn source(&self, p: u64) -> Result<Option<*const u8>, FormatError> {
        let l = &self.file.layout;
        let Some(i) = l.find(p) else { return Ok(None) };
        let e = l.extents[i];
        if e.kind == ExtentKind::Zero {
            return Ok(None);
        }
        let bytes = self.file.extent_bytes(i)?;
        let at = usize::try_from(p - e.guest_page).unwrap_or(0) * PAGE_SIZE;
        Ok(Some(bytes[at..].as_ptr()))
    }
}

/// Outcome of installing one page on demand.
enum Served {
    Done,
    Retry,
}

/// Serves one restore on an accepted connection: handshake, then faults and
/// events until the peer closes the socket.
pub fn serve(
    file: Arc<MemoryFile>,
    conn: UnixStream,
    opts: &ServeOptions,
) -> Result<RestoreStats, ServeError> {
    let (mappings, uffd_fd) = handshake::recv(&conn)?;
    let started = Instant::now();
    let regions = check_regions(&file, &mappings)?;
    set_nonblocking(&uffd_fd).map_err(|source| ServeError::Uffd {
        op: "set non-blocking",
        source,
    })?;
    // SAFETY: `uffd_fd` is the userfaultfd the peer sent; ownership moves
    // into the Uffd, which closes it on drop.
    let uffd = unsafe { Uffd::from_raw_fd(uffd_fd.into_raw_fd()) };
    let pages = file.layout.guest_pages();
    let recording = !opts.prefetch && opts.record_for.is_some();
    let restore = Arc::new(Restore {
        file,
        uffd,
        regions: Mutex::new(regions),
        removed: PageSet::new(pages),
        started,
        stop: AtomicBool::new(false),
        pages_prefetched: AtomicU64::new(0),
        bytes_copied: AtomicU64::new(0),
        fault_around: if recording {
            1
        } else if opts.fault_around == 0 {
            FAULT_AROUND_PAGES
        } else {
            opts.fault_around
        },
    });
    let ws = restore.file.layout.working_set.clone();
    let prefetcher = (opts.prefetch && (!ws.is_empty() || opts.prefetch_all)).then(|| {
        let r = restore.clone();
        let all = opts.prefetch_all;
        let threads = if opts.prefetch_threads == 0 {
            2
        } else {
            opts.prefetch_threads
        };
        std::thread::Builder::new()
            .name("uffd-prefetch".into())
            .spawn(move || prefetch(&r, &ws, all, threads))
    });
    let prefetcher = match prefetcher {
        Some(Ok(h)) => Some(h),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "prefetch thread did not start; serving on demand only");
            None
        }
        None => None,
    };
    let record = if opts.prefetch { None } else { opts.record_for };
    let result = handle(&restore, &conn, record);
    restore.stop.store(true, Ordering::Release);
    let (ws_us, pf_us) = match prefetcher.map(std::thread::JoinHandle::join) {
        Some(Ok(times)) => times,
        _ => (None, None),
    };
    let mut stats = result?;
    stats.working_set_us = ws_us;
    stats.prefetch_us = pf_us;
    stats.pages_prefetched = restore.pages_prefetched.load(Ordering::Relaxed);
    stats.bytes_copied += restore.bytes_copied.load(Ordering::Relaxed);
    Ok(stats)
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

fn check_regions(
    file: &MemoryFile,
    mappings: &[GuestRegionUffdMapping],
) -> Result<Vec<Region>, ServeError> {
    let mut out = Vec::new();
    for (index, m) in mappings.iter().enumerate() {
        let bad = |what: String| ServeError::BadRegion { index, what };
        if m.page_bytes() != PAGE_SIZE as u64 {
            return Err(bad(format!(
                "page size {} (only 4 KiB pages are served)",
                m.page_bytes()
            )));
        }
        let page = PAGE_SIZE as u64;
        if m.size == 0
            || m.size % page != 0
            || m.offset % page != 0
            || m.base_host_virt_addr % page != 0
        {
            return Err(bad("size, offset and address must be page aligned".into()));
        }
        if m.offset
            .checked_add(m.size)
            .is_none_or(|end| end > file.layout.guest_size)
        {
            return Err(bad(format!(
                "offset {} + size {} is beyond the {}-byte memory file",
                m.offset, m.size, file.layout.guest_size
            )));
        }
        out.push(Region {
            base: m.base_host_virt_addr,
            size: m.size,
            offset: m.offset,
        });
    }
    Ok(out)
}

/// The fault and event loop.
fn handle(
    r: &Restore,
    conn: &UnixStream,
    record_for: Option<Duration>,
) -> Result<RestoreStats, ServeError> {
    let mut stats = RestoreStats::default();
    let mut buf = EventBuffer::new(64);
    let mut deferred: Vec<u64> = Vec::new();
    let mut first_fault: Option<Instant> = None;
    let recorded = PageSet::new(r.file.layout.guest_pages());
    let mut order: Vec<u64> = Vec::new();
    loop {
        let (uffd_ready, peer_gone) = {
            let mut fds = [
                PollFd::new(r.uffd.as_fd(), PollFlags::POLLIN),
                PollFd::new(conn.as_fd(), PollFlags::POLLIN),
            ];
            let timeout = if deferred.is_empty() { 100u16 } else { 1 };
            match poll(&mut fds, PollTimeout::from(timeout)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    return Err(ServeError::Uffd {
                        op: "poll",
                        source: e.into(),
                    })
                }
            }
            let ready = |f: &PollFd| f.revents().unwrap_or(PollFlags::empty());
            let u = ready(&fds[0]);
            let c = ready(&fds[1]);
            if u.intersects(PollFlags::POLLERR | PollFlags::POLLHUP) {
                // The guest's address space is gone.
                break;
            }
            (
                u.contains(PollFlags::POLLIN),
                c.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR),
            )
        };
        if uffd_ready {
            let events: Vec<Event> = match r.uffd.read_events(&mut buf) {
                Ok(it) => it.filter_map(Result::ok).collect(),
                Err(e) => match classify(e) {
                    UffdFailure::Again(_) => Vec::new(),
                    other => {
                        return Err(ServeError::Uffd {
                            op: "read",
                            source: std::io::Error::other(format!("{other:?}")),
                        })
                    }
                },
            };
            // Non-cooperative events first: a fault in the same batch may
            // concern a range an event just removed.
            let mut faults = Vec::new();
            for ev in events {
                match ev {
                    Event::Pagefault { addr, .. } => faults.push(addr as u64),
                    other => {
                        stats.events += 1;
                        on_event(r, other, &mut stats);
                    }
                }
            }
            for addr in faults {
                let now = Instant::now();
                if first_fault.is_none() {
                    first_fault = Some(now);
                    stats.first_fault_us = Some(duration_us(now - r.started));
                }
                if let (Some(window), Some(first)) = (record_for, first_fault) {
                    if now - first <= window {
                        if let Some(p) = r.guest_page(addr) {
                            if recorded.set(p) {
                                order.push(p);
                            }
                        }
                    }
                }
                match serve_fault(r, addr, &mut stats)? {
                    Served::Done => {}
                    Served::Retry => {
                        stats.deferred += 1;
                        deferred.push(addr);
                    }
                }
            }
        }
        if !deferred.is_empty() {
            let retry = std::mem::take(&mut deferred);
            for addr in retry {
                if let Served::Retry = serve_fault(r, addr, &mut stats)? {
                    deferred.push(addr);
                }
            }
        }
        if peer_gone && !uffd_ready {
            break;
        }
    }
    stats.recorded = runs_of(&order);
    Ok(stats)
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Compresses a touch order into runs of consecutive pages.
pub fn runs_of(order: &[u64]) -> Vec<WsRun> {
    let mut runs: Vec<WsRun> = Vec::new();
    for &p in order {
        match runs.last_mut() {
            Some(r) if r.guest_page + r.pages == p => r.pages += 1,
            _ => runs.push(WsRun {
                guest_page: p,
                pages: 1,
            }),
        }
    }
    runs
}

fn on_event(r: &Restore, ev: Event, stats: &mut RestoreStats) {
    match ev {
        Event::Remove { start, end } => {
            let (start, end) = (start as u64, end as u64);
            let mut a = start;
            while a < end {
                if let Some(p) = r.guest_page(a) {
                    if r.removed.set(p) {
                        stats.removed_pages += 1;
                    }
                }
                a += PAGE_SIZE as u64;
            }
        }
        Event::Unmap { start, end } => {
            let (start, end) = (start as u64, end as u64);
            let mut regions = r
                .regions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Forget unmapped regions (a partial unmap keeps the region; no
            // fault can come from the unmapped part).
            regions.retain(|g| !(start <= g.base && g.base + g.size <= end));
        }
        Event::Remap { from, to, len } => {
            let (from, to) = (from as u64, to as u64);
            let mut regions = r
                .regions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(g) = regions
                .iter_mut()
                .find(|g| g.base == from && g.size == len as u64)
            {
                g.base = to;
            } else {
                tracing::warn!(
                    from,
                    to,
                    len,
                    "partial remap of a guest region; not followed"
                );
            }
        }
        Event::Fork { uffd } => {
            tracing::warn!("the guest process forked; its child is not served");
            drop(uffd);
        }
        Event::Pagefault { .. } => {}
    }
}

fn serve_fault(r: &Restore, addr: u64, stats: &mut RestoreStats) -> Result<Served, ServeError> {
    let page_addr = addr & !(PAGE_SIZE as u64 - 1);
    let Some(p) = r.guest_page(page_addr) else {
        // Not in any region (an unmapped range): wake, nothing to serve.
        let _ = r.uffd.wake(page_addr as *mut libc::c_void, PAGE_SIZE);
        return Ok(Served::Done);
    };
    let dst = page_addr as *mut libc::c_void;
    let src = if r.removed.get(p) { None } else { r.source(p)? };
    // Fault-around: a guest that touches one page usually touches its
    // neighbours next, and one bulk copy costs about what one page does.
    let len = match src {
        Some(_) => fault_around(r, p, page_addr),
        None => PAGE_SIZE,
    };
    let result = match src {
        // SAFETY: `dst` is a page-aligned address inside a region the peer
        // registered with this userfaultfd; the kernel validates the range
        // and fails the ioctl rather than touching anything else.
        None => unsafe { r.uffd.zeropage(dst, PAGE_SIZE, true) }.map(|_| 0),
        // SAFETY: `src..src+len` lies inside the memory file's read-only
        // mapping (pages of one verified extent, see `fault_around`), which
        // outlives this call; `dst` is validated by the kernel as above.
        Some(src) => unsafe { r.uffd.copy(src.cast(), dst, len, true) },
    };
    match result {
        Ok(n) => {
            if src.is_some() {
                stats.demand_faults += 1;
                stats.bytes_copied += n as u64;
            } else {
                stats.zero_faults += 1;
            }
            Ok(Served::Done)
        }
        Err(e) => match classify(e) {
            UffdFailure::Exists => {
                stats.already_present += 1;
                let _ = r.uffd.wake(dst, PAGE_SIZE);
                Ok(Served::Done)
            }
            // A fault-around copy stopped at a page already present: the
            // faulting page itself was installed.
            UffdFailure::Again(n) if n > 0 => {
                stats.demand_faults += 1;
                stats.bytes_copied += n as u64;
                Ok(Served::Done)
            }
            UffdFailure::Again(_) => Ok(Served::Retry),
            // The range went away under us (unmapped, or the guest exited).
            UffdFailure::Gone => Ok(Served::Done),
            UffdFailure::Other(why) => Err(ServeError::Uffd {
                op: "copy",
                source: std::io::Error::other(why),
            }),
        },
    }
}

/// Pages served together on a demand fault by default.
const FAULT_AROUND_PAGES: u32 = 16;

/// How many bytes from `page` on can be copied in one go: the following
/// pages of the same data extent (contiguous in the file), inside the same
/// region, not removed, up to `FAULT_AROUND_PAGES`.
fn fault_around(r: &Restore, page: u64, page_addr: u64) -> usize {
    let l = &r.file.layout;
    let Some(i) = l.find(page) else {
        return PAGE_SIZE;
    };
    let extent_end = l.extents[i].end();
    let mut pages = 1u64;
    while pages < u64::from(r.fault_around) && page + pages < extent_end {
        let next = page + pages;
        if r.removed.get(next) || r.host_addr(next) != Some(page_addr + pages * PAGE_SIZE as u64) {
            break;
        }
        pages += 1;
    }
    usize::try_from(pages).unwrap_or(1) * PAGE_SIZE
}

/// A run the prefetcher installs with one ioctl.
#[derive(Debug, Clone, Copy)]
struct Batch {
    /// Guest host address.
    dst: u64,
    /// Address of the bytes in the file mapping; `None` for zero pages.
    src: Option<usize>,
    len: usize,
}

/// Plans the ioctls that install `pages` in order: runs contiguous in the
/// guest and in the file, up to `MAX_BATCH` each; removed pages are skipped.
fn plan(r: &Restore, pages: impl Iterator<Item = u64>) -> Vec<Batch> {
    let mut out: Vec<Batch> = Vec::new();
    for p in pages {
        if r.removed.get(p) {
            continue;
        }
        let (Some(dst), Ok(src)) = (r.host_addr(p), r.source(p)) else {
            continue;
        };
        let src = src.map(|s| s as usize);
        if let Some(b) = out.last_mut() {
            let contiguous = b.dst + b.len as u64 == dst
                && b.len < MAX_BATCH
                && match (b.src, src) {
                    (None, None) => true,
                    (Some(s), Some(t)) => s + b.len == t,
                    _ => false,
                };
            if contiguous {
                b.len += PAGE_SIZE;
                continue;
            }
        }
        out.push(Batch {
            dst,
            src,
            len: PAGE_SIZE,
        });
    }
    out
}

/// Installs `batches` from `threads` threads, taking them in order.
fn install_all(r: &Restore, batches: &[Batch], threads: usize) -> bool {
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let work = || loop {
        let i = usize::try_from(next.fetch_add(1, Ordering::Relaxed)).unwrap_or(usize::MAX);
        let Some(b) = batches.get(i) else { return };
        if !install(r, b) {
            failed.store(true, Ordering::Relaxed);
            return;
        }
    };
    std::thread::scope(|s| {
        for _ in 1..threads.max(1) {
            s.spawn(work);
        }
        work();
    });
    !failed.load(Ordering::Relaxed)
}

/// Installs `ws` (then, with `all`, every other stored page); returns the
/// times until the working set and until everything was in.
fn prefetch(r: &Restore, ws: &[WsRun], all: bool, threads: usize) -> (Option<u64>, Option<u64>) {
    let batches = plan(
        r,
        ws.iter()
            .flat_map(|run| run.guest_page..run.guest_page + run.pages),
    );
    let mut ok = install_all(r, &batches, threads);
    let ws_us = ok.then(|| duration_us(r.started.elapsed()));
    if ok && all {
        let data = r
            .file
            .layout
            .extents
            .iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .flat_map(|e| e.guest_page..e.end());
        let rest = plan(r, data);
        ok = install_all(r, &rest, threads);
    }
    (ws_us, ok.then(|| duration_us(r.started.elapsed())))
}

/// Installs `b` with as few ioctls as the kernel allows: a copy stops at
/// the first page already present (the guest faulted it in meanwhile) and
/// reports how far it got (`EAGAIN` with a count); `EEXIST` means the very
/// first page is present. Either way the rest of the run is retried in
/// bulk from past that page, never page by page.
fn install(r: &Restore, b: &Batch) -> bool {
    let mut done = 0usize;
    while done < b.len {
        if r.stop.load(Ordering::Relaxed) {
            return false;
        }
        let dst = (b.dst + done as u64) as *mut libc::c_void;
        let len = b.len - done;
        let res = match b.src {
            // SAFETY: `dst..dst+len` lies in a region the peer registered;
            // the kernel validates it and fails rather than touch anything
            // else.
            None => unsafe { r.uffd.zeropage(dst, len, true) },
            // SAFETY: `src+done..src+len` is inside the memory file's
            // read-only mapping (built from contiguous pages of verified
            // extents), which outlives this call.
            Some(s) => unsafe {
                r.uffd
                    .copy((s + done) as *const libc::c_void, dst, len, true)
            },
        };
        let n = match res {
            Ok(n) => n,
            Err(e) => match classify(e) {
                UffdFailure::Again(n) => n,
                UffdFailure::Exists => {
                    // The first page is there already: skip it.
                    done += PAGE_SIZE;
                    continue;
                }
                other => {
                    tracing::debug!(error = ?other, "prefetch stopped");
                    return false;
                }
            },
        };
        if b.src.is_some() {
            r.bytes_copied.fetch_add(n as u64, Ordering::Relaxed);
        }
        r.pages_prefetched
            .fetch_add((n / PAGE_SIZE) as u64, Ordering::Relaxed);
        done += n;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touch_order_compresses_into_runs() {
        assert_eq!(
            runs_of(&[5, 6, 7, 1, 2, 9]),
            vec![
                WsRun {
                    guest_page: 5,
                    pages: 3
                },
                WsRun {
                    guest_page: 1,
                    pages: 2
                },
                WsRun {
                    guest_page: 9,
                    pages: 1
                }
            ]
        );
    }
}
