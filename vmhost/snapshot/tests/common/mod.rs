//! Shared fixtures: deterministic guest images with a known share of zero
//! pages, and a page server running on a thread.

#![allow(dead_code)] // each test file uses a different part

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapshot::format::{MemoryFile, PAGE_SIZE};
use snapshot::server::{serve, RestoreStats, ServeError, ServeOptions};

/// A small, fast pseudo-random generator (xorshift), so images are
/// reproducible without a dependency.
pub struct Rng(pub u64);

impl Rng {
    /// Next value.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Fills a page with non-zero pseudo-random bytes.
    pub fn fill(&mut self, page: &mut [u8]) {
        for w in page.chunks_exact_mut(8) {
            w.copy_from_slice(&(self.next() | 1).to_le_bytes());
        }
    }

    /// A shuffled copy of `v`.
    pub fn shuffle<T: Clone>(&mut self, v: &[T]) -> Vec<T> {
        let mut out = v.to_vec();
        for i in (1..out.len()).rev() {
            let j = usize::try_from(self.next() % (i as u64 + 1)).unwrap();
            out.swap(i, j);
        }
        out
    }
}

/// A guest image: `pages` pages, about `data_percent`% of them non-zero
/// (in clusters, as real memory is).
pub fn image(pages: usize, data_percent: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut img = vec![0u8; pages * PAGE_SIZE];
    let mut p = 0;
    while p < pages {
        let run = usize::try_from(1 + rng.next() % 16).unwrap();
        let data = rng.next() % 100 < data_percent;
        for q in p..(p + run).min(pages) {
            if data {
                rng.fill(&mut img[q * PAGE_SIZE..(q + 1) * PAGE_SIZE]);
            }
        }
        p += run;
    }
    img
}

/// Writes `img` as a raw (non-sparse) memory image.
pub fn write_raw(path: &Path, img: &[u8]) {
    std::fs::write(path, img).unwrap();
}

/// Writes a sparse diff image: `guest_bytes` long, only `pages` written.
pub fn write_sparse_diff(path: &Path, guest_bytes: usize, pages: &[(u64, Vec<u8>)]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(guest_bytes as u64).unwrap();
    for (p, bytes) in pages {
        f.write_all_at(bytes, p * PAGE_SIZE as u64).unwrap();
    }
}

/// Non-zero pages of an image.
pub fn data_pages(img: &[u8]) -> Vec<u64> {
    img.chunks_exact(PAGE_SIZE)
        .enumerate()
        .filter(|(_, p)| p.iter().any(|&b| b != 0))
        .map(|(i, _)| i as u64)
        .collect()
}

/// A page server on a thread, serving one restore.
pub struct Server {
    /// Its socket.
    pub socket: PathBuf,
    handle: std::thread::JoinHandle<Result<RestoreStats, ServeError>>,
}

impl Server {
    /// Binds `<dir>/uffd.sock` and serves `file` on a thread.
    pub fn start(dir: &Path, file: &Path, opts: ServeOptions) -> Server {
        let socket = dir.join(format!("uffd-{}.sock", rand_suffix()));
        let listener = UnixListener::bind(&socket).unwrap();
        let mem = Arc::new(MemoryFile::open(file).unwrap());
        let handle = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            serve(mem, conn, &opts)
        });
        Server { socket, handle }
    }

    /// Waits for the restore to end (after the guest finished).
    pub fn join(self) -> Result<RestoreStats, ServeError> {
        self.handle.join().expect("server thread panicked")
    }
}

fn rand_suffix() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
