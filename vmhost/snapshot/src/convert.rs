//! Converting a raw memory image (Firecracker's full snapshot memory file,
//! or a sparse diff file where only dirty pages were written) into the
//! compact format: holes are skipped without being read (`SEEK_DATA` /
//! `SEEK_HOLE`), and zero pages are detected at memory speed and not stored.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::unistd::{lseek, Whence};

use crate::format::{FormatError, Layout, PAGE_SIZE};
use crate::writer::Writer;

/// Bytes read from the raw image at a time.
const READ_BLOCK: usize = 8 << 20;

/// What a raw image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawKind {
    /// A full image: every page absent from the output is zero.
    Full,
    /// A diff: holes are unchanged pages; zero pages in data are recorded
    /// as explicit zero extents, since they override the base.
    Diff,
}

/// Figures of one conversion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Size of the raw image.
    pub raw_bytes: u64,
    /// Bytes actually read (holes are not).
    pub read_bytes: u64,
    /// Non-zero pages stored.
    pub data_pages: u64,
    /// Zero pages seen in data.
    pub zero_pages: u64,
    /// Size of the output file.
    pub stored_bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Whether a page is all zero. ORs the page as 128-bit words with no early
/// exit, which the compiler vectorises: zero detection runs at memory speed.
pub fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns and align_to only reinterprets
    // the aligned middle of the slice; the unaligned ends are checked bytewise.
    let (head, words, tail) = unsafe { page.align_to::<u128>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words.iter().fold(0u128, |acc, w| acc | w) == 0
}

/// The data segments of a (possibly sparse) file: `(start, end)` pairs.
pub fn data_segments(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let end = i64::try_from(len).unwrap_or(i64::MAX);
    while pos < end {
        let start = match lseek(file.as_raw_fd(), pos, Whence::SeekData) {
            Ok(s) => s,
            // No data after `pos`.
            Err(nix::errno::Errno::ENXIO) => break,
            // A filesystem without SEEK_DATA: all of it is data.
            Err(nix::errno::Errno::EINVAL) if pos == 0 => {
                out.push((0, len));
                return Ok(out);
            }
            Err(e) => return Err(e.into()),
        };
        let stop =
            lseek(file.as_raw_fd(), start, Whence::SeekHole).map_err(std::io::Error::from)?;
        out.push((start.unsigned_abs(), stop.min(end).unsigned_abs()));
        pos = stop;
    }
    Ok(out)
}

/// Converts the raw image at `raw` into a memory file at `out` (replacing it
/// atomically), tagging every page with `generation`.
pub fn convert(
    raw: &Path,
    out: &Path,
    kind: RawKind,
    generation: u32,
) -> Result<(Layout, ConvertStats), FormatError> {
    let started = Instant::now();
    let io = |op: &'static str| {
        let path = raw.to_path_buf();
        move |source| FormatError::Io { op, path, source }
    };
    let file = File::open(raw).map_err(io("open"))?;
    let raw_bytes = file.metadata().map_err(io("stat"))?.len();
    let page = PAGE_SIZE as u64;
    let guest_size = raw_bytes.div_ceil(page) * page;
    if guest_size == 0 {
        return Err(FormatError::Invalid {
            path: raw.to_path_buf(),
            what: "empty memory image".into(),
        });
    }
    let mut w = Writer::create(out, guest_size)?;
    let mut stats = ConvertStats {
        raw_bytes,
        ..ConvertStats::default()
    };
    let mut buf = vec![0u8; READ_BLOCK];
    for (seg_start, seg_end) in data_segments(&file, raw_bytes).map_err(io("seek in"))? {
        // Segments are page aligned on every filesystem thaw uses; round
        // outwards to be safe.
        let mut pos = seg_start / page * page;
        let seg_end = seg_end.div_ceil(page) * page;
        while pos < seg_end {
            let want =
                usize::try_from((seg_end - pos).min(READ_BLOCK as u64)).unwrap_or(READ_BLOCK);
            let chunk = &mut buf[..want];
            let got = read_full_at(&file, chunk, pos).map_err(io("read"))?;
            // Past the end of the file: the last partial page is zero-filled.
            chunk[got..].fill(0);
            stats.read_bytes += got as u64;
            for (i, p) in chunk.chunks_exact(PAGE_SIZE).enumerate() {
                let guest_page = pos / page + i as u64;
                if is_zero(p) {
                    stats.zero_pages += 1;
                    if kind == RawKind::Diff {
                        w.append_zero(guest_page, generation);
                    }
                } else {
                    stats.data_pages += 1;
                    w.append_page(guest_page, p, generation)?;
                }
            }
            pos += want as u64;
        }
    }
    let layout = w.commit()?;
    stats.stored_bytes = std::fs::metadata(out).map_err(io("stat output of"))?.len();
    stats.elapsed = started.elapsed();
    Ok((layout, stats))
}

/// Reads as much of `buf` as the file has at `offset`.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        p[PAGE_SIZE - 1] = 1;
        assert!(!is_zero(&p));
        p[PAGE_SIZE - 1] = 0;
        p[3] = 9;
        assert!(!is_zero(&p));
        assert!(is_zero(&p[4..]));
    }
}
