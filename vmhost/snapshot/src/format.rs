//! The memory-file format: only non-zero guest pages are stored, behind a
//! map that says where each run of pages lives.
//!
//! ```text
//! offset 0      header, 64 bytes (little endian)
//!               0  magic  "THAWMEM\0"          8
//!               8  version major u16, minor u16
//!              12  page_size u32
//!              16  guest_size u64               bytes of guest memory
//!              24  extent_count u32
//!              28  ws_run_count u32              working-set runs
//!              32  map_offset u64                where the map starts
//!              40  data_offset u64               = page_size
//!              48  data_len u64
//!              56  header_crc u32                crc32 of bytes 0..56
//!              60  map_crc u32                   crc32 of the whole map
//! data_offset   page data, extent after extent (the working set first, in
//!               touch order, when one was recorded)
//! map_offset    extent_count × 32 bytes, sorted by guest page, disjoint:
//!                 guest_page u64, file_offset u64, pages u32,
//!                 generation u32, crc u32 (of the extent's data), kind u32
//!                 (0 = data, 1 = zero: an explicit zero run in a diff)
//!               ws_run_count × 16 bytes: guest_page u64, pages u64
//! ```
//!
//! A page no extent covers is a zero page: what a balloon leaves behind
//! takes no space. A diff layer uses `kind = 1` for pages that became zero,
//! since there "not covered" means "unchanged". Every field is checked on
//! open: a corrupt, truncated or newer-major file is refused, never
//! half-read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

/// First eight bytes of every memory file.
pub const MAGIC: [u8; 8] = *b"THAWMEM\0";
/// Major version this code writes and reads; a newer major is refused.
pub const VERSION_MAJOR: u16 = 1;
/// Minor version this code writes (older readers ignore what it adds).
pub const VERSION_MINOR: u16 = 0;
/// Size of the header.
pub const HEADER_LEN: usize = 64;
/// Size of one map entry.
pub const EXTENT_LEN: usize = 32;
/// Size of one working-set run.
pub const WS_RUN_LEN: usize = 16;
/// The only page size served (4 KiB; huge pages are not supported).
pub const PAGE_SIZE: usize = 4096;
/// Most pages one extent holds: its checksum covers at most 256 KiB, so a
/// demand fault verifies little before it is served.
pub const MAX_EXTENT_PAGES: u32 = 64;
/// Largest guest a memory file may describe (1 TiB).
pub const MAX_GUEST_BYTES: u64 = 1 << 40;

const _: () = assert!(HEADER_LEN == 64 && EXTENT_LEN == 32 && WS_RUN_LEN == 16);
const _: () = assert!(PAGE_SIZE.is_power_of_two());

/// A page index in guest memory (guest offset / page size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestPage(pub u64);

/// What an extent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Page data stored in the file.
    Data,
    /// Pages that are zero (only meaningful in a diff layer).
    Zero,
}

/// One run of guest pages and where its bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First guest page.
    pub guest_page: u64,
    /// File offset of the first page's bytes (0 for zero extents).
    pub file_offset: u64,
    /// Number of pages, 1..=MAX_EXTENT_PAGES.
    pub pages: u32,
    /// Snapshot generation that wrote these pages.
    pub generation: u32,
    /// crc32 of the extent's bytes (0 for zero extents).
    pub crc: u32,
    /// Data or zero.
    pub kind: ExtentKind,
}

impl Extent {
    /// One past the last guest page.
    pub fn end(&self) -> u64 {
        self.guest_page + u64::from(self.pages)
    }

    /// Bytes of data.
    pub fn len_bytes(&self) -> u64 {
        u64::from(self.pages) * PAGE_SIZE as u64
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.guest_page.to_le_bytes());
        out.extend_from_slice(&self.file_offset.to_le_bytes());
        out.extend_from_slice(&self.pages.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
        let kind: u32 = match self.kind {
            ExtentKind::Data => 0,
            ExtentKind::Zero => 1,
        };
        out.extend_from_slice(&kind.to_le_bytes());
    }
}

/// A run of pages of the working set, in the order they were touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WsRun {
    /// First guest page.
    pub guest_page: u64,
    /// Number of pages.
    pub pages: u64,
}

/// Why a memory file was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading or writing failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a thaw memory file.
    #[error("{0}: not a thaw memory file (bad magic)")]
    BadMagic(PathBuf),
    /// Written by a newer, incompatible version.
    #[error(
        "{path}: format version {major}.{minor} is newer than this thaw reads ({VERSION_MAJOR}.x)"
    )]
    NewerVersion {
        /// The file.
        path: PathBuf,
        /// Its major version.
        major: u16,
        /// Its minor version.
        minor: u16,
    },
    /// The file is shorter than its header says.
    #[error("{path}: truncated ({what})")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What does not fit.
        what: String,
    },
    /// A checksum does not match.
    #[error("{path}: checksum mismatch in {what}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Which part.
        what: String,
    },
    /// A field is out of range or inconsistent.
    #[error("{path}: invalid {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// The parsed, validated header and map of a memory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of guest memory described.
    pub guest_size: u64,
    /// Where page data starts.
    pub data_offset: u64,
    /// Bytes of the data area.
    pub data_len: u64,
    /// Extents, sorted by guest page, disjoint.
    pub extents: Vec<Extent>,
    /// Recorded working set, in touch order.
    pub working_set: Vec<WsRun>,
}

impl Layout {
    /// Guest pages described.
    pub fn guest_pages(&self) -> u64 {
        self.guest_size / PAGE_SIZE as u64
    }

    /// Index of the extent covering `page`, if any.
    pub fn find(&self, page: u64) -> Option<usize> {
        let i = self.extents.partition_point(|e| e.end() <= page);
        (i < self.extents.len() && self.extents[i].guest_page <= page).then_some(i)
    }

    /// Bytes of page data the extents refer to.
    pub fn referenced_bytes(&self) -> u64 {
        self.extents
            .iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .map(Extent::len_bytes)
            .sum()
    }

    /// Encodes the header for a file whose map starts at `map_offset`.
    pub fn encode(&self, map_offset: u64) -> (Vec<u8>, Vec<u8>) {
        let mut map = Vec::with_capacity(
            self.extents.len() * EXTENT_LEN + self.working_set.len() * WS_RUN_LEN,
        );
        for e in &self.extents {
            e.encode(&mut map);
        }
        for r in &self.working_set {
            map.extend_from_slice(&r.guest_page.to_le_bytes());
            map.extend_from_slice(&r.pages.to_le_bytes());
        }
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
        h.extend_from_slice(&VERSION_MINOR.to_le_bytes());
        h.extend_from_slice(&u32::try_from(PAGE_SIZE).unwrap_or(4096).to_le_bytes());
        h.extend_from_slice(&self.guest_size.to_le_bytes());
        h.extend_from_slice(
            &u32::try_from(self.extents.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        h.extend_from_slice(
            &u32::try_from(self.working_set.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        h.extend_from_slice(&map_offset.to_le_bytes());
        h.extend_from_slice(&self.data_offset.to_le_bytes());
        h.extend_from_slice(&self.data_len.to_le_bytes());
        let header_crc = crc32fast::hash(&h);
        h.extend_from_slice(&header_crc.to_le_bytes());
        h.extend_from_slice(&crc32fast::hash(&map).to_le_bytes());
        (h, map)
    }

    /// Parses and validates a header and map from `read_at` over a file of
    /// `file_len` bytes. Every offset is checked before it is used.
    pub fn decode(
        path: &Path,
        file_len: u64,
        read_at: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<Layout, FormatError> {
        let p = || path.to_path_buf();
        let invalid = |what: String| FormatError::Invalid { path: p(), what };
        if file_len < HEADER_LEN as u64 {
            return Err(FormatError::Truncated {
                path: p(),
                what: format!("{file_len} bytes, shorter than the header"),
            });
        }
        let mut h = [0u8; HEADER_LEN];
        read_at(0, &mut h).map_err(|source| FormatError::Io {
            op: "read header of",
            path: p(),
            source,
        })?;
        if h[..8] != MAGIC {
            return Err(FormatError::BadMagic(p()));
        }
        let (major, minor) = (le_u16(&h, 8), le_u16(&h, 10));
        if major != VERSION_MAJOR {
            return Err(FormatError::NewerVersion {
                path: p(),
                major,
                minor,
            });
        }
        if crc32fast::hash(&h[..56]) != le_u32(&h, 56) {
            return Err(FormatError::Checksum {
                path: p(),
                what: "header".into(),
            });
        }
        let page_size = le_u32(&h, 12);
        if page_size as usize != PAGE_SIZE {
            return Err(invalid(format!("page size {page_size} (only {PAGE_SIZE})")));
        }
        let guest_size = le_u64(&h, 16);
        if guest_size == 0 || guest_size % PAGE_SIZE as u64 != 0 || guest_size > MAX_GUEST_BYTES {
            return Err(invalid(format!("guest size {guest_size}")));
        }
        let extent_count = u64::from(le_u32(&h, 24));
        let ws_count = u64::from(le_u32(&h, 28));
        let map_offset = le_u64(&h, 32);
        let data_offset = le_u64(&h, 40);
        let data_len = le_u64(&h, 48);
        let guest_pages = guest_size / PAGE_SIZE as u64;
        if extent_count > guest_pages || ws_count > guest_pages {
            return Err(invalid(format!(
                "map counts ({extent_count} extents, {ws_count} runs) for {guest_pages} pages"
            )));
        }
        let data_end = data_offset
            .checked_add(data_len)
            .ok_or_else(|| invalid("data area".into()))?;
        if data_offset < HEADER_LEN as u64 || data_offset % PAGE_SIZE as u64 != 0 {
            return Err(invalid(format!("data offset {data_offset}")));
        }
        if data_end > file_len || map_offset < data_end {
            return Err(FormatError::Truncated {
                path: p(),
                what: format!("data area ends at {data_end}, map at {map_offset}, file {file_len}"),
            });
        }
        let map_len = extent_count * EXTENT_LEN as u64 + ws_count * WS_RUN_LEN as u64;
        let map_end = map_offset
            .checked_add(map_len)
            .ok_or_else(|| invalid("map offset".into()))?;
        if map_end > file_len {
            return Err(FormatError::Truncated {
                path: p(),
                what: format!("map ends at {map_end}, file has {file_len} bytes"),
            });
        }
        let mut map = vec![0u8; usize::try_from(map_len).map_err(|_| invalid("map size".into()))?];
        read_at(map_offset, &mut map).map_err(|source| FormatError::Io {
            op: "read map of",
            path: p(),
            source,
        })?;
        if crc32fast::hash(&map) != le_u32(&h, 60) {
            return Err(FormatError::Checksum {
                path: p(),
                what: "map".into(),
            });
        }
        let mut extents = Vec::with_capacity(usize::try_from(extent_count).unwrap_or(0));
        let mut prev_end = 0u64;
        for (i, e) in map
            .chunks_exact(EXTENT_LEN)
            .take(extents.capacity())
            .enumerate()
        {
            let kind = match le_u32(e, 28) {
                0 => ExtentKind::Data,
                1 => ExtentKind::Zero,
                k => return Err(invalid(format!("extent {i}: kind {k}"))),
            };
            let x = Extent {
                guest_page: le_u64(e, 0),
                file_offset: le_u64(e, 8),
                pages: le_u32(e, 16),
                generation: le_u32(e, 20),
                crc: le_u32(e, 24),
                kind,
            };
            if x.pages == 0 || x.pages > MAX_EXTENT_PAGES {
                return Err(invalid(format!("extent {i}: {} pages", x.pages)));
            }
            if x.guest_page < prev_end || x.end() > guest_pages {
                return Err(invalid(format!(
                    "extent {i}: pages {}..{} overlap or lie outside the guest",
                    x.guest_page,
                    x.end()
                )));
            }
            if kind == ExtentKind::Data
                && (x.file_offset < data_offset
                    || x.file_offset % PAGE_SIZE as u64 != 0
                    || x.file_offset
                        .checked_add(x.len_bytes())
                        .is_none_or(|end| end > data_end))
            {
                return Err(invalid(format!(
                    "extent {i}: data at {} outside the data area",
                    x.file_offset
                )));
            }
            prev_end = x.end();
            extents.push(x);
        }
        let ws_start = usize::try_from(extent_count).unwrap_or(0) * EXTENT_LEN;
        let mut working_set = Vec::new();
        for (i, r) in map[ws_start..].chunks_exact(WS_RUN_LEN).enumerate() {
            let run = WsRun {
                guest_page: le_u64(r, 0),
                pages: le_u64(r, 8),
            };
            if run.pages == 0
                || run
                    .guest_page
                    .checked_add(run.pages)
                    .is_none_or(|e| e > guest_pages)
            {
                return Err(invalid(format!("working-set run {i}")));
            }
            working_set.push(run);
        }
        Ok(Layout {
            guest_size,
            data_offset,
            data_len,
            extents,
            working_set,
        })
    }
}

/// Extent verification states.
const UNVERIFIED: u8 = 0;
const VERIFIED: u8 = 1;
const CORRUPT: u8 = 2;

/// An open, validated memory file, mapped for reading.
#[derive(Debug)]
pub struct MemoryFile {
    /// Its path.
    pub path: PathBuf,
    /// The validated layout.
    pub layout: Layout,
    file: File,
    map: Option<memmap2::Mmap>,
    verified: Vec<AtomicU8>,
}

impl MemoryFile {
    /// Opens and validates a memory file.
    pub fn open(path: &Path) -> Result<MemoryFile, FormatError> {
        let io = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| FormatError::Io { op, path, source }
        };
        let file = File::open(path).map_err(io("open"))?;
        let len = file.metadata().map_err(io("stat"))?.len();
        let layout = Layout::decode(path, len, &mut |off, buf| file.read_exact_at(buf, off))?;
        let map = if len > 0 {
            // SAFETY: the file is mapped read-only and private; thaw never
            // writes a memory file in place (every change is a new file
            // renamed over the old one), so the mapping's contents do not
            // change under the reader.
            Some(unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(io("map"))?)
        } else {
            None
        };
        let verified = (0..layout.extents.len())
            .map(|_| AtomicU8::new(UNVERIFIED))
            .collect();
        Ok(MemoryFile {
            path: path.to_path_buf(),
            layout,
            file,
            map,
            verified,
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The bytes of extent `i` (data extents only), checked against its
    /// checksum the first time.
    pub fn extent_bytes(&self, i: usize) -> Result<&[u8], FormatError> {
        let e = self.layout.extents[i];
        let map = self.map.as_ref().ok_or_else(|| FormatError::Invalid {
            path: self.path.clone(),
            what: "empty file".into(),
        })?;
        let start = usize::try_from(e.file_offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(usize::try_from(e.len_bytes()).unwrap_or(usize::MAX));
        let bytes = map.get(start..end).ok_or_else(|| FormatError::Truncated {
            path: self.path.clone(),
            what: format!("extent {i}"),
        })?;
        match self.verified[i].load(Ordering::Acquire) {
            VERIFIED => Ok(bytes),
            CORRUPT => Err(self.corrupt(i)),
            _ => {
                if crc32fast::hash(bytes) == e.crc {
                    self.verified[i].store(VERIFIED, Ordering::Release);
                    Ok(bytes)
                } else {
                    self.verified[i].store(CORRUPT, Ordering::Release);
                    Err(self.corrupt(i))
                }
            }
        }
    }

    fn corrupt(&self, i: usize) -> FormatError {
        FormatError::Checksum {
            path: self.path.clone(),
            what: format!(
                "extent {i} (guest pages {}..{})",
                self.layout.extents[i].guest_page,
                self.layout.extents[i].end()
            ),
        }
    }

    /// Checks every extent's checksum.
    pub fn verify(&self) -> Result<(), FormatError> {
        for (i, e) in self.layout.extents.iter().enumerate() {
            if e.kind == ExtentKind::Data {
                self.extent_bytes(i)?;
            }
        }
        Ok(())
    }

    /// The contents of one guest page: `None` for a zero page.
    pub fn page(&self, page: u64) -> Result<Option<&[u8]>, FormatError> {
        let Some(i) = self.layout.find(page) else {
            return Ok(None);
        };
        let e = self.layout.extents[i];
        if e.kind == ExtentKind::Zero {
            return Ok(None);
        }
        let bytes = self.extent_bytes(i)?;
        let off = usize::try_from(page - e.guest_page).unwrap_or(0) * PAGE_SIZE;
        Ok(Some(&bytes[off..off + PAGE_SIZE]))
    }

    /// Writes the whole guest image (zeros included) to `out`, for checks.
    pub fn expand(&self) -> Result<Vec<u8>, FormatError> {
        let mut out = vec![0u8; usize::try_from(self.layout.guest_size).unwrap_or(0)];
        for (i, e) in self.layout.extents.iter().enumerate() {
            if e.kind == ExtentKind::Data {
                let b = self.extent_bytes(i)?;
                let at = usize::try_from(e.guest_page).unwrap_or(0) * PAGE_SIZE;
                out[at..at + b.len()].copy_from_slice(b);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            guest_size: 16 * PAGE_SIZE as u64,
            data_offset: PAGE_SIZE as u64,
            data_len: 2 * PAGE_SIZE as u64,
            extents: vec![
                Extent {
                    guest_page: 1,
                    file_offset: PAGE_SIZE as u64,
                    pages: 2,
                    generation: 1,
                    crc: 7,
                    kind: ExtentKind::Data,
                },
                Extent {
                    guest_page: 5,
                    file_offset: 0,
                    pages: 1,
                    generation: 2,
                    crc: 0,
                    kind: ExtentKind::Zero,
                },
            ],
            working_set: vec![WsRun {
                guest_page: 2,
                pages: 3,
            }],
        }
    }

    fn file_of(l: &Layout) -> Vec<u8> {
        let map_offset = l.data_offset + l.data_len;
        let (h, map) = l.encode(map_offset);
        let mut f = h;
        f.resize(usize::try_from(map_offset).unwrap(), 0);
        f.extend_from_slice(&map);
        f
    }

    fn decode(bytes: &[u8]) -> Result<Layout, FormatError> {
        Layout::decode(Path::new("t"), bytes.len() as u64, &mut |off, buf| {
            let off = usize::try_from(off).unwrap();
            buf.copy_from_slice(
                bytes
                    .get(off..off + buf.len())
                    .ok_or(std::io::ErrorKind::UnexpectedEof)?,
            );
            Ok(())
        })
    }

    #[test]
    fn header_and_map_round_trip() {
        let l = layout();
        assert_eq!(decode(&file_of(&l)).unwrap(), l);
        assert_eq!(l.find(0), None);
        assert_eq!(l.find(1), Some(0));
        assert_eq!(l.find(2), Some(0));
        assert_eq!(l.find(3), None);
        assert_eq!(l.find(5), Some(1));
    }

    #[test]
    fn refuses_bad_files_with_clear_errors() {
        let good = file_of(&layout());
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(matches!(decode(&bad_magic), Err(FormatError::BadMagic(_))));
        let mut newer = good.clone();
        newer[8] = 2;
        assert!(matches!(
            decode(&newer),
            Err(FormatError::NewerVersion { major: 2, .. })
        ));
        assert!(matches!(
            decode(&good[..40]),
            Err(FormatError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(FormatError::Truncated { .. })
        ));
        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 1;
        assert!(matches!(
            decode(&flipped),
            Err(FormatError::Checksum { .. })
        ));
        let mut l = layout();
        l.extents[0].file_offset = 1 << 40;
        assert!(matches!(
            decode(&file_of(&l)),
            Err(FormatError::Invalid { .. })
        ));
        let mut l = layout();
        l.extents[1].guest_page = 2;
        assert!(matches!(
            decode(&file_of(&l)),
            Err(FormatError::Invalid { .. })
        ));
    }
}
