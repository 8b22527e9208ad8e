//! The snapshot engine, measured beside its floors on a 1 GiB guest:
//! - time until a working set (64 MiB, 256 MiB) is resident: eager read of
//!   the whole raw file, on-demand userfaultfd faults, on-demand plus
//!   recorded-working-set prefetch, and memcpy of the same bytes;
//! - stored size against the non-zero pages of a mostly-free guest;
//! - conversion and merge throughput.
//!
//! `cargo run --release -p bench --bin snapshot` (as root: userfaultfd).

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bench::{Report, Row, Summary};
use snapshot::convert::{convert, RawKind};
use snapshot::format::{MemoryFile, WsRun, PAGE_SIZE};
use snapshot::harness::Guest;
use snapshot::merge::{merge, relayout};
use snapshot::server::{serve, RestoreStats, ServeOptions};

const GUEST: usize = 1 << 30;
const PAGES: u64 = (GUEST / PAGE_SIZE) as u64;
const RUNS: usize = 3;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// A guest image with `percent`% of its pages holding data, in clusters.
fn write_image(path: &Path, percent: u64, seed: u64) -> Result<u64> {
    let f = std::fs::File::create(path)?;
    let mut rng = Rng(seed);
    let block = 16 << 20;
    let mut buf = vec![0u8; block];
    let mut data_pages = 0u64;
    let mut run_left = 0u64;
    let mut run_data = false;
    for chunk in 0..GUEST / block {
        for page in buf.chunks_exact_mut(PAGE_SIZE) {
            if run_left == 0 {
                run_left = 1 + rng.next() % 32;
                run_data = rng.next() % 100 < percent;
            }
            run_left -= 1;
            if run_data {
                data_pages += 1;
                for w in page.chunks_exact_mut(8) {
                    w.copy_from_slice(&(rng.next() | 1).to_le_bytes());
                }
            } else {
                page.fill(0);
            }
        }
        f.write_all_at(&buf, (chunk * block) as u64)?;
    }
    f.sync_all()?;
    Ok(data_pages)
}

/// A working set of `bytes`: runs of 1..64 data pages in a random order.
fn working_set(file: &MemoryFile, bytes: usize, seed: u64) -> Vec<u64> {
    let want = bytes / PAGE_SIZE;
    let mut rng = Rng(seed);
    let mut seen = vec![false; usize::try_from(PAGES).unwrap_or(0)];
    let mut out = Vec::with_capacity(want);
    while out.len() < want {
        let start = rng.next() % PAGES;
        let len = 1 + rng.next() % 64;
        for p in start..(start + len).min(PAGES) {
            let i = usize::try_from(p).unwrap_or(0);
            if out.len() < want && !seen[i] && matches!(file.page(p), Ok(Some(_))) {
                seen[i] = true;
                out.push(p);
            }
        }
    }
    out
}

/// One restore: a page server on a thread, a guest touching `ws` in order.
fn restore(
    file: &Path,
    ws: &[u64],
    opts: ServeOptions,
    dir: &Path,
) -> Result<(Duration, RestoreStats)> {
    let socket = dir.join("uffd.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    let mem = Arc::new(MemoryFile::open(file)?);
    let server = std::thread::spawn(move || -> Result<RestoreStats> {
        let (conn, _) = listener.accept()?;
        Ok(serve(mem, conn, &opts)?)
    });
    let t = Instant::now();
    let guest = Guest::connect(&socket, GUEST, 1)?;
    guest.touch(ws)?;
    let elapsed = t.elapsed();
    guest.finish()?;
    let stats = server
        .join()
        .map_err(|_| anyhow::anyhow!("page server panicked"))??;
    Ok((elapsed, stats))
}

/// Reads the whole raw image into fresh memory (the eager baseline).
fn eager_read(raw: &Path) -> Result<Duration> {
    let f = std::fs::File::open(raw)?;
    let t = Instant::now();
    let mut mem = vec![0u8; GUEST];
    for (i, chunk) in mem.chunks_mut(2 << 20).enumerate() {
        f.read_exact_at(chunk, (i * (2 << 20)) as u64)?;
    }
    let elapsed = t.elapsed();
    std::hint::black_box(&mem);
    Ok(elapsed)
}

/// memcpy of `bytes` into memory mapped just before (every page faulted
/// in by the copy): what populating that much memory costs on this
/// machine, whatever fills it.
fn memcpy_fresh(bytes: usize) -> Result<Duration> {
    let src = vec![7u8; bytes];
    let len = std::num::NonZeroUsize::new(bytes).context("empty copy")?;
    // SAFETY: a fresh private anonymous mapping at an address the kernel
    // picks; only this function uses it and unmaps it.
    let dst = unsafe {
        nix::sys::mman::mmap_anonymous(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
            nix::sys::mman::MapFlags::MAP_PRIVATE,
        )
    }?;
    let t = Instant::now();
    // SAFETY: `dst` is a writable mapping of `bytes` bytes and `src` a
    // distinct buffer of the same size.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_ptr().cast::<u8>(), bytes) };
    let elapsed = t.elapsed();
    // SAFETY: unmapping the mapping made above; nothing refers to it.
    unsafe { nix::sys::mman::munmap(dst, bytes) }?;
    Ok(elapsed)
}

/// memcpy of `bytes` between two pre-faulted buffers (the floor).
fn memcpy(bytes: usize) -> Duration {
    let src = vec![7u8; bytes];
    let mut dst = vec![1u8; bytes];
    let t = Instant::now();
    dst.copy_from_slice(&src);
    let elapsed = t.elapsed();
    std::hint::black_box(&dst);
    elapsed
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    #[allow(clippy::cast_precision_loss)] // byte counts far below 2^52.
    let b = bytes as f64;
    b / 1e9 / d.as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn scratch_dir() -> Result<(tempfile::TempDir, &'static str)> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        Ok((tempfile::tempdir_in(shm)?, "tmpfs"))
    } else {
        Ok((tempfile::tempdir()?, "disk"))
    }
}

fn main() -> Result<()> {
    let (dir, fs_kind) = scratch_dir()?;
    let d = dir.path();
    let mut report = Report::new(
        "snapshot",
        "snapshot engine on a 1 GiB guest: working set resident via eager read, on-demand uffd faults, and recorded-working-set prefetch, beside memcpy; stored size; conversion and merge throughput",
    );
    report.parameters(serde_json::json!({
        "guest_bytes": GUEST, "runs": RUNS, "files_on": fs_kind,
        "working_sets_mib": [64, 256], "image_data_percent": 40,
        "mostly_free_data_percent": 10,
    }));

    // The restore image: 40% of pages hold data.
    let raw = d.join("guest.raw");
    write_image(&raw, 40, 1)?;
    let base = d.join("guest.thaw");
    convert(&raw, &base, RawKind::Full, 1)?;
    let base_file = MemoryFile::open(&base)?;

    for ws_mib in [64usize, 256] {
        let ws_bytes = ws_mib << 20;
        let ws = working_set(&base_file, ws_bytes, 7 + ws_mib as u64);
        let mut demand = Vec::new();
        let mut prefetch = Vec::new();
        let mut eager = Vec::new();
        let mut copy = Vec::new();
        let mut fresh = Vec::new();
        let mut demand_stats = None;
        let mut prefetch_stats = None;
        let mut recorded: Vec<WsRun> = Vec::new();
        for run in 0..RUNS {
            // The baseline: one page per fault, as a plain handler serves.
            let opts = ServeOptions {
                record_for: (run == 0).then_some(Duration::from_secs(600)),
                fault_around: 1,
                ..ServeOptions::default()
            };
            let (t, s) = restore(&base, &ws, opts, d)?;
            if run == 0 {
                recorded = s.recorded.clone();
            }
            demand.push(t);
            demand_stats = Some(s);
        }
        let with_ws = d.join(format!("guest-ws{ws_mib}.thaw"));
        relayout(&base_file, &recorded, &with_ws)?;
        for _ in 0..RUNS {
            let opts = ServeOptions {
                prefetch: true,
                ..ServeOptions::default()
            };
            let (t, s) = restore(&with_ws, &ws, opts, d)?;
            prefetch.push(t);
            prefetch_stats = Some(s);
            eager.push(eager_read(&raw)?);
            copy.push(memcpy(ws_bytes));
            fresh.push(memcpy_fresh(ws_bytes)?);
        }
        let demand_s = Summary::of(&demand).context("samples")?;
        let prefetch_s = Summary::of(&prefetch).context("samples")?;
        let (dm, pm, em, cm) = (
            median(demand),
            median(prefetch),
            median(eager),
            median(copy),
        );
        let fm = median(fresh);
        let speedup = dm.as_secs_f64() / pm.as_secs_f64();
        let of_memcpy = cm.as_secs_f64() / pm.as_secs_f64();
        let ds = demand_stats.context("stats")?;
        let ps = prefetch_stats.context("stats")?;
        report
            .row(
                Row::new(format!("{ws_mib} MiB working set resident, prefetch"), "ms p50", ms(pm))
                    .baseline("on-demand faults only", ms(dm))
                    .goal(format!(">= 10x faster than on-demand (measured {speedup:.1}x)"), speedup >= 10.0)
                    .summaries(Some(prefetch_s), Some(demand_s)),
            )
            .row(
                Row::new(format!("{ws_mib} MiB working set resident, prefetch"), "ms p50", ms(pm))
                    .baseline("memcpy of the same bytes", ms(cm))
                    .goal(
                        format!(">= 30% of memcpy speed (measured {:.0}%)", of_memcpy * 100.0),
                        of_memcpy >= 0.30,
                    ),
            )
            .row(
                Row::new(format!("{ws_mib} MiB working set resident, prefetch"), "ms p50", ms(pm))
                    .baseline("memcpy into freshly mapped memory", ms(fm)),
            )
            .row(
                Row::new(format!("{ws_mib} MiB working set resident, prefetch"), "ms p50", ms(pm))
                    .baseline("eager read of the whole 1 GiB raw file", ms(em)),
            )
            .note(format!(
                "{ws_mib} MiB: on demand {} faults ({} zero), first fault after {} us; prefetch {} pages prefetched, {} demand faults, working set installed after {} us, first fault after {} us",
                ds.demand_faults, ds.zero_faults, ds.first_fault_us.unwrap_or(0),
                ps.pages_prefetched, ps.demand_faults, ps.working_set_us.unwrap_or(0), ps.first_fault_us.unwrap_or(0),
            ));
    }
    drop(base_file);

    // A mostly-free guest (10% data): stored size and conversion speed.
    let free_raw = d.join("free.raw");
    let free_pages = write_image(&free_raw, 10, 3)?;
    let free = d.join("free.thaw");
    let mut conv = Vec::new();
    let mut stored = 0;
    for _ in 0..RUNS {
        let (_, s) = convert(&free_raw, &free, RawKind::Full, 1)?;
        stored = s.stored_bytes;
        conv.push(s.elapsed);
    }
    let nonzero = free_pages * PAGE_SIZE as u64;
    #[allow(clippy::cast_precision_loss)] // byte counts far below 2^52.
    let ratio = stored as f64 / nonzero as f64;
    #[allow(clippy::cast_precision_loss)]
    let raw_mib = GUEST as f64 / f64::from(1u32 << 20);
    #[allow(clippy::cast_precision_loss)]
    let stored_mib = stored as f64 / f64::from(1u32 << 20);
    #[allow(clippy::cast_precision_loss)]
    let nonzero_mib = nonzero as f64 / f64::from(1u32 << 20);
    let conv_gbps = gbps(GUEST as u64, median(conv));
    report
        .row(
            Row::new("stored size, mostly-free guest", "MiB", stored_mib)
                .baseline("its non-zero pages", nonzero_mib)
                .goal(
                    format!("<= 1.05x the non-zero pages (measured {ratio:.3}x)"),
                    ratio <= 1.05,
                ),
        )
        .row(
            Row::new("stored size, mostly-free guest", "MiB", stored_mib)
                .baseline("raw memory file", raw_mib),
        )
        .row(
            Row::new(
                "conversion of a 1 GiB raw file (10% data)",
                "GB/s",
                conv_gbps,
            )
            .goal(">= 1 GB/s", conv_gbps >= 1.0),
        );

    // Merge: a 64 MiB diff onto the mostly-free base.
    let mut rng = Rng(5);
    let diff_raw = d.join("diff.raw");
    {
        let f = std::fs::File::create(&diff_raw)?;
        f.set_len(GUEST as u64)?;
        let mut page = vec![0u8; PAGE_SIZE];
        for _ in 0..(64 << 20) / PAGE_SIZE {
            for w in page.chunks_exact_mut(8) {
                w.copy_from_slice(&(rng.next() | 1).to_le_bytes());
            }
            f.write_all_at(&page, (rng.next() % PAGES) * PAGE_SIZE as u64)?;
        }
    }
    let diff = d.join("diff.thaw");
    convert(&diff_raw, &diff, RawKind::Diff, 2)?;
    let mut merges = Vec::new();
    let mut moved = 0;
    let mut how = String::new();
    for i in 0..RUNS {
        let out: PathBuf = d.join(format!("merged{i}.thaw"));
        let (_, s) = merge(&MemoryFile::open(&free)?, &MemoryFile::open(&diff)?, &out)?;
        moved = s.carried_bytes + s.diff_bytes;
        how = format!("reflink: {}, compacted: {}", s.reflinked, s.compacted);
        merges.push(s.elapsed);
        std::fs::remove_file(out)?;
    }
    let merge_gbps = gbps(moved, median(merges.clone()));
    report.row(
        Row::new(
            "merge of a 64 MiB diff onto a 1 GiB guest",
            "GB/s",
            merge_gbps,
        )
        .goal(">= 1 GB/s", merge_gbps >= 1.0),
    );
    report.note(format!(
        "merge: {:.1} ms p50 for {} MiB carried + written, fsync included ({how}); files on {fs_kind}; the raw file is in the page cache for every eager read",
        ms(median(merges)),
        moved >> 20
    ));
    report.finish()?;
    Ok(())
}
