//! Single-generation merges: a diff layer applied to its base produces a new
//! file, so every restore reads exactly one file.
//!
//! The base's data area is carried over whole (a reflink clone where the
//! filesystem has one, else an in-kernel `copy_file_range`), so extents the
//! diff leaves alone keep their offsets and are not rewritten; only the
//! diff's pages and the map are written. Pages the diff replaced stay in the
//! file as garbage until garbage outweighs live data, then the merge
//! compacts (copies only live extents). Also here: re-laying a file out with
//! its working set first, for sequential prefetch reads.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::format::{Extent, ExtentKind, FormatError, Layout, MemoryFile, WsRun, PAGE_SIZE};
use crate::writer::Writer;

/// Figures of one merge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Bytes of the diff's pages written.
    pub diff_bytes: u64,
    /// Bytes of the base carried over (cloned or copied in the kernel).
    pub carried_bytes: u64,
    /// Whether the carry-over was a reflink clone.
    pub reflinked: bool,
    /// Whether the merge compacted the file.
    pub compacted: bool,
    /// Live data bytes in the result.
    pub live_bytes: u64,
    /// Data bytes in the result no extent refers to.
    pub garbage_bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FormatError {
    let path = path.to_path_buf();
    move |source| FormatError::Io { op, path, source }
}

/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off` inside
/// the kernel.
fn copy_range(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut off_in = i64::try_from(src_off + done).map_err(std::io::Error::other)?;
        let mut off_out = i64::try_from(dst_off + done).map_err(std::io::Error::other)?;
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        // SAFETY: both descriptors are open files owned by the caller; the
        // offset pointers point at live i64 locals for the whole call.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        done += n.unsigned_abs() as u64;
    }
    Ok(())
}

/// Clones `src`'s whole contents into `dst` (a reflink), where supported.
fn reflink(src: &File, dst: &File) -> bool {
    // SAFETY: FICLONE takes the source descriptor as its integer argument;
    // both descriptors are open for the whole call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    rc == 0
}

/// Subtracts sorted, disjoint `cover` ranges from `[start, end)`.
fn uncovered(start: u64, end: u64, cover: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = start;
    let first = cover.partition_point(|&(_, e)| e <= start);
    for &(cs, ce) in &cover[first..] {
        if cs >= end {
            break;
        }
        if cs > pos {
            out.push((pos, cs));
        }
        pos = pos.max(ce);
        if pos >= end {
            break;
        }
    }
    if pos < end {
        out.push((pos, end));
    }
    out
}

/// Merges `diff` onto `base` into a new single-generation file at `out`
/// (which may be `base`'s own path: the old file stays intact until the
/// rename).
pub fn merge(
    base: &MemoryFile,
    diff: &MemoryFile,
    out: &Path,
) -> Result<(Layout, MergeStats), FormatError> {
    let started = Instant::now();
    let b = &base.layout;
    if b.guest_size != diff.layout.guest_size {
        return Err(FormatError::Invalid {
            path: diff.path.clone(),
            what: format!(
                "guest size {} (the base has {})",
                diff.layout.guest_size, b.guest_size
            ),
        });
    }
    let cover: Vec<(u64, u64)> = diff
        .layout
        .extents
        .iter()
        .map(|e| (e.guest_page, e.end()))
        .collect();
    // Live base bytes after the diff.
    let mut live = 0u64;
    for e in b.extents.iter().filter(|e| e.kind == ExtentKind::Data) {
        for (s, t) in uncovered(e.guest_page, e.end(), &cover) {
            live += (t - s) * PAGE_SIZE as u64;
        }
    }
    let compact = b.data_len > 0 && live * 2 < b.data_len;
    let mut stats = MergeStats {
        compacted: compact,
        ..MergeStats::default()
    };
    let mut w = Writer::create(out, b.guest_size)?;
    let base_end = b.data_offset + b.data_len;
    if compact {
        // Rewrite only the live pages of the base.
        for (i, e) in b.extents.iter().enumerate() {
            if e.kind != ExtentKind::Data {
                continue;
            }
            let bytes = base.extent_bytes(i)?;
            for (s, t) in uncovered(e.guest_page, e.end(), &cover) {
                for p in s..t {
                    let at = usize::try_from(p - e.guest_page).unwrap_or(0) * PAGE_SIZE;
                    w.append_page(p, &bytes[at..at + PAGE_SIZE], e.generation)?;
                }
                stats.carried_bytes += (t - s) * PAGE_SIZE as u64;
            }
        }
    } else {
        stats.reflinked = reflink(base.file(), w.file());
        if !stats.reflinked {
            copy_range(
                base.file(),
                b.data_offset,
                w.file(),
                b.data_offset,
                b.data_len,
            )
            .map_err(io("copy base data into", w.tmp_path()))?;
        }
        w.skip_data(b.data_len)?;
        stats.carried_bytes = b.data_len;
        debug_assert_eq!(w.data_end(), base_end);
        for (i, e) in b.extents.iter().enumerate() {
            if e.kind != ExtentKind::Data {
                continue;
            }
            let pieces = uncovered(e.guest_page, e.end(), &cover);
            if pieces == [(e.guest_page, e.end())] {
                w.push_extent(*e)?;
                continue;
            }
            let bytes = base.extent_bytes(i)?;
            for (s, t) in pieces {
                let from = usize::try_from(s - e.guest_page).unwrap_or(0) * PAGE_SIZE;
                let to = usize::try_from(t - e.guest_page).unwrap_or(0) * PAGE_SIZE;
                w.push_extent(Extent {
                    guest_page: s,
                    file_offset: e.file_offset + from as u64,
                    pages: u32::try_from(t - s).unwrap_or(0),
                    generation: e.generation,
                    crc: crc32fast::hash(&bytes[from..to]),
                    kind: ExtentKind::Data,
                })?;
            }
        }
    }
    for (i, e) in diff.layout.extents.iter().enumerate() {
        if e.kind != ExtentKind::Data {
            continue;
        }
        let bytes = diff.extent_bytes(i)?;
        for (k, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
            w.append_page(e.guest_page + k as u64, page, e.generation)?;
        }
        stats.diff_bytes += e.len_bytes();
    }
    w.set_working_set(b.working_set.clone());
    let layout = w.commit()?;
    stats.live_bytes = layout.referenced_bytes();
    stats.garbage_bytes = layout.data_len - stats.live_bytes;
    stats.elapsed = started.elapsed();
    Ok((layout, stats))
}

/// Rewrites `file` into `out` with its data laid out working set first (in
/// touch order), then every other page in guest order, and `ws` recorded in
/// the map: a prefetch then reads the working set with sequential reads.
pub fn relayout(file: &MemoryFile, ws: &[WsRun], out: &Path) -> Result<Layout, FormatError> {
    let l = &file.layout;
    let pages = usize::try_from(l.guest_pages()).unwrap_or(0);
    let mut placed = vec![false; pages];
    let mut w = Writer::create(out, l.guest_size)?;
    let mut put = |w: &mut Writer, p: u64| -> Result<(), FormatError> {
        let idx = usize::try_from(p).unwrap_or(usize::MAX);
        if idx >= pages || placed[idx] {
            return Ok(());
        }
        placed[idx] = true;
        if let Some(i) = l.find(p) {
            let e = l.extents[i];
            if e.kind == ExtentKind::Data {
                let bytes = file.extent_bytes(i)?;
                let at = usize::try_from(p - e.guest_page).unwrap_or(0) * PAGE_SIZE;
                w.append_page(p, &bytes[at..at + PAGE_SIZE], e.generation)?;
            }
        }
        Ok(())
    };
    for run in ws {
        for p in run.guest_page..run.guest_page.saturating_add(run.pages) {
            put(&mut w, p)?;
        }
    }
    for e in &l.extents {
        for p in e.guest_page..e.end() {
            put(&mut w, p)?;
        }
    }
    w.set_working_set(ws.to_vec());
    w.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncovered_ranges() {
        assert_eq!(uncovered(0, 10, &[]), vec![(0, 10)]);
        assert_eq!(
            uncovered(0, 10, &[(2, 4), (6, 7)]),
            vec![(0, 2), (4, 6), (7, 10)]
        );
        assert_eq!(uncovered(3, 5, &[(0, 4), (4, 9)]), vec![]);
        assert_eq!(
            uncovered(3, 8, &[(0, 1), (5, 6), (20, 30)]),
            vec![(3, 5), (6, 8)]
        );
    }
}
