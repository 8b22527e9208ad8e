//! Writing a memory file crash-safely: into a temporary file beside the
//! target, then fsync, rename over the target, fsync the directory. A crash
//! at any point leaves the old file (or no file) at the target, never a
//! half-written one; an abandoned temporary is removed on drop.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::{Extent, ExtentKind, FormatError, Layout, WsRun, MAX_EXTENT_PAGES, PAGE_SIZE};

/// Bytes of page data gathered before one write.
const WRITE_BUFFER: usize = 8 << 20;

/// A memory file being written.
#[derive(Debug)]
pub struct Writer {
    target: PathBuf,
    tmp: PathBuf,
    file: File,
    guest_size: u64,
    /// Next free data offset.
    end: u64,
    buf: Vec<u8>,
    buf_start: u64,
    extents: Vec<Extent>,
    /// The extent being grown by `append_page`.
    open: Option<(Extent, crc32fast::Hasher)>,
    working_set: Vec<WsRun>,
    committed: bool,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FormatError {
    let path = path.to_path_buf();
    move |source| FormatError::Io { op, path, source }
}

impl Writer {
    /// Starts a file that will replace `target` on commit.
    pub fn create(target: &Path, guest_size: u64) -> Result<Writer, FormatError> {
        let dir = target.parent().unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map_or_else(|| "memory".into(), |n| n.to_string_lossy().into_owned());
        let tmp = dir.join(format!(
            ".{name}.tmp-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        Ok(Writer {
            target: target.to_path_buf(),
            tmp,
            file,
            guest_size,
            end: PAGE_SIZE as u64,
            buf: Vec::with_capacity(WRITE_BUFFER),
            buf_start: PAGE_SIZE as u64,
            extents: Vec::new(),
            open: None,
            working_set: Vec::new(),
            committed: false,
        })
    }

    /// The temporary file (for copying data into it directly).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The temporary file's path.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Next free data offset.
    pub fn data_end(&self) -> u64 {
        self.end
    }

    /// Declares that `len` bytes at the current end were written directly
    /// (by `copy_file_range` or a clone); later data goes after them.
    pub fn skip_data(&mut self, len: u64) -> Result<(), FormatError> {
        self.flush()?;
        self.end += len;
        self.buf_start = self.end;
        Ok(())
    }

    /// Adds an extent whose bytes are already in the file.
    pub fn push_extent(&mut self, e: Extent) -> Result<(), FormatError> {
        self.close_open();
        self.extents.push(e);
        Ok(())
    }

    /// Appends one guest page's bytes, growing the current extent when the
    /// page follows it.
    pub fn append_page(
        &mut self,
        page: u64,
        bytes: &[u8],
        generation: u32,
    ) -> Result<(), FormatError> {
        debug_assert_eq!(bytes.len(), PAGE_SIZE);
        let extends = self.open.as_ref().is_some_and(|(e, _)| {
            e.kind == ExtentKind::Data
                && e.end() == page
                && e.pages < MAX_EXTENT_PAGES
                && e.generation == generation
                && e.file_offset + e.len_bytes() == self.end
        });
        if !extends {
            self.close_open();
            self.open = Some((
                Extent {
                    guest_page: page,
                    file_offset: self.end,
                    pages: 0,
                    generation,
                    crc: 0,
                    kind: ExtentKind::Data,
                },
                crc32fast::Hasher::new(),
            ));
        }
        if let Some((e, h)) = self.open.as_mut() {
            e.pages += 1;
            h.update(bytes);
        }
        self.buf.extend_from_slice(bytes);
        self.end += PAGE_SIZE as u64;
        if self.buf.len() >= WRITE_BUFFER {
            self.flush()?;
        }
        Ok(())
    }

    /// Appends an explicit zero page (diff layers only).
    pub fn append_zero(&mut self, page: u64, generation: u32) {
        let extends = self.open.as_ref().is_some_and(|(e, _)| {
            e.kind == ExtentKind::Zero
                && e.end() == page
                && e.pages < MAX_EXTENT_PAGES
                && e.generation == generation
        });
        if !extends {
            self.close_open();
            self.open = Some((
                Extent {
                    guest_page: page,
                    file_offset: 0,
                    pages: 0,
                    generation,
                    crc: 0,
                    kind: ExtentKind::Zero,
                },
                crc32fast::Hasher::new(),
            ));
        }
        if let Some((e, _)) = self.open.as_mut() {
            e.pages += 1;
        }
    }

    /// Sets the recorded working set.
    pub fn set_working_set(&mut self, ws: Vec<WsRun>) {
        self.working_set = ws;
    }

    fn close_open(&mut self) {
        if let Some((mut e, h)) = self.open.take() {
            if e.kind == ExtentKind::Data {
                e.crc = h.finalize();
            }
            self.extents.push(e);
        }
    }

    fn flush(&mut self) -> Result<(), FormatError> {
        if !self.buf.is_empty() {
            self.file
                .write_all_at(&self.buf, self.buf_start)
                .map_err(io("write", &self.tmp))?;
            self.buf_start += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes the map and header, syncs, and renames over the target.
    pub fn commit(mut self) -> Result<Layout, FormatError> {
        self.close_open();
        self.flush()?;
        self.extents.sort_by_key(|e| e.guest_page);
        let layout = Layout {
            guest_size: self.guest_size,
            data_offset: PAGE_SIZE as u64,
            data_len: self.end - PAGE_SIZE as u64,
            extents: std::mem::take(&mut self.extents),
            working_set: std::mem::take(&mut self.working_set),
        };
        let map_offset = self.end;
        let (header, map) = layout.encode(map_offset);
        self.file
            .write_all_at(&map, map_offset)
            .map_err(io("write map of", &self.tmp))?;
        self.file
            .set_len(map_offset + map.len() as u64)
            .map_err(io("truncate", &self.tmp))?;
        self.file
            .write_all_at(&header, 0)
            .map_err(io("write header of", &self.tmp))?;
        self.file.sync_all().map_err(io("fsync", &self.tmp))?;
        std::fs::rename(&self.tmp, &self.target).map_err(io("rename", &self.target))?;
        self.committed = true;
        if let Some(dir) = self.target.parent() {
            if let Ok(d) = File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            }) {
                // The rename is durable once the directory is synced.
                d.sync_all()
                    .map_err(io("fsync directory of", &self.target))?;
            }
        }
        Ok(layout)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
