//! Restores over real userfaultfd: the harness plays Firecracker (anonymous
//! memory, registration, the handshake over the socket) and checks every
//! byte it reads against the image.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{data_pages, image, write_raw, write_sparse_diff, Rng, Server};
use snapshot::convert::{convert, RawKind};
use snapshot::format::{MemoryFile, PAGE_SIZE};
use snapshot::harness::{Guest, HarnessError};
use snapshot::merge::{merge, relayout};
use snapshot::server::{ServeError, ServeOptions};

const PAGES: usize = 4096; // 16 MiB guests

struct Fixture {
    dir: tempfile::TempDir,
    img: Vec<u8>,
    file: std::path::PathBuf,
}

fn fixture(data_percent: u64, seed: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let img = image(PAGES, data_percent, seed);
    write_raw(&dir.path().join("mem.raw"), &img);
    let file = dir.path().join("mem.thaw");
    convert(&dir.path().join("mem.raw"), &file, RawKind::Full, 1).unwrap();
    Fixture { dir, img, file }
}

fn expect_page(guest: &Guest, img: &[u8], p: u64) {
    let at = usize::try_from(p).unwrap() * PAGE_SIZE;
    let got = guest.page(p).unwrap();
    assert!(got[..] == img[at..at + PAGE_SIZE], "page {p} differs");
}

#[test]
fn demand_faults_serve_every_byte_and_zero_pages() {
    let f = fixture(30, 1);
    let one_page = ServeOptions {
        fault_around: 1,
        ..ServeOptions::default()
    };
    let server = Server::start(f.dir.path(), &f.file, one_page);
    let guest = Guest::connect(&server.socket, f.img.len(), 3).unwrap();
    let all: Vec<u64> = (0..PAGES as u64).collect();
    let order = Rng(3).shuffle(&all);
    guest.touch(&order).unwrap();
    for p in 0..PAGES as u64 {
        expect_page(&guest, &f.img, p);
    }
    guest.finish().unwrap();
    let stats = server.join().unwrap();
    let data = data_pages(&f.img).len() as u64;
    assert_eq!(stats.demand_faults, data);
    assert_eq!(stats.zero_faults, PAGES as u64 - data);
    assert_eq!(stats.bytes_copied, data * PAGE_SIZE as u64);
    assert!(stats.first_fault_us.is_some());
}

#[test]
fn concurrent_faults_from_several_threads() {
    let f = fixture(50, 2);
    let one_page = ServeOptions {
        fault_around: 1,
        ..ServeOptions::default()
    };
    let server = Server::start(f.dir.path(), &f.file, one_page);
    let guest = Guest::connect(&server.socket, f.img.len(), 1).unwrap();
    let all: Vec<u64> = (0..PAGES as u64).collect();
    // Eight "vCPUs", overlapping: every page is touched by two threads.
    let mut twice = all.clone();
    twice.extend(Rng(9).shuffle(&all));
    guest.touch_parallel(&twice, 8).unwrap();
    for p in 0..PAGES as u64 {
        expect_page(&guest, &f.img, p);
    }
    guest.finish().unwrap();
    let stats = server.join().unwrap();
    assert!(stats.demand_faults + stats.zero_faults + stats.already_present >= PAGES as u64);
    assert_eq!(stats.demand_faults, data_pages(&f.img).len() as u64);
}

#[test]
fn removed_pages_read_as_zero_afterwards() {
    let f = fixture(100, 4);
    let server = Server::start(f.dir.path(), &f.file, ServeOptions::default());
    let guest = Guest::connect(&server.socket, f.img.len(), 2).unwrap();
    let first: Vec<u64> = (0..64).collect();
    guest.touch(&first).unwrap();
    expect_page(&guest, &f.img, 10);
    // A balloon takes pages back: some already served, some never touched.
    guest.remove(8, 16).unwrap();
    guest.remove(1000, 32).unwrap();
    for p in (8..24).chain(1000..1032) {
        assert!(
            guest.page(p).unwrap().iter().all(|&b| b == 0),
            "page {p} not zero after remove"
        );
    }
    expect_page(&guest, &f.img, 7);
    expect_page(&guest, &f.img, 24);
    expect_page(&guest, &f.img, 2000);
    guest.finish().unwrap();
    let stats = server.join().unwrap();
    assert_eq!(stats.removed_pages, 48);
    assert!(stats.events >= 2);
    assert!(stats.zero_faults >= 48, "{stats:?}");
}

#[test]
fn unmapping_a_region_is_followed_and_the_rest_keeps_serving() {
    let f = fixture(70, 11);
    let server = Server::start(f.dir.path(), &f.file, ServeOptions::default());
    // Two regions of 2048 pages; the second goes away.
    let guest = Guest::connect(&server.socket, f.img.len(), 2).unwrap();
    guest.touch(&[0, 2048, 3000]).unwrap();
    guest.unmap(2048, 2048).unwrap();
    for p in [1u64, 500, 2047] {
        expect_page(&guest, &f.img, p);
    }
    guest.finish().unwrap();
    let stats = server.join().unwrap();
    assert!(stats.events >= 1, "{stats:?}");
}

#[test]
fn recorded_working_set_is_prefetched_on_the_next_restore() {
    let f = fixture(60, 5);
    let all: Vec<u64> = (0..PAGES as u64).collect();
    let mut rng = Rng(21);
    let ws: Vec<u64> = rng.shuffle(&all)[..800].to_vec();

    // First restore: no working set yet; record what the guest touches.
    let server = Server::start(
        f.dir.path(),
        &f.file,
        ServeOptions {
            record_for: Some(Duration::from_secs(30)),
            ..ServeOptions::default()
        },
    );
    let guest = Guest::connect(&server.socket, f.img.len(), 1).unwrap();
    guest.touch(&ws).unwrap();
    guest.finish().unwrap();
    let first = server.join().unwrap();
    let recorded_pages: u64 = first.recorded.iter().map(|r| r.pages).sum();
    assert_eq!(recorded_pages, 800);
    assert_eq!(
        first.recorded[0].guest_page, ws[0],
        "recorded in touch order"
    );
    let with_ws = f.dir.path().join("mem-ws.thaw");
    relayout(
        &MemoryFile::open(&f.file).unwrap(),
        &first.recorded,
        &with_ws,
    )
    .unwrap();
    let laid = MemoryFile::open(&with_ws).unwrap();
    laid.verify().unwrap();
    assert!(laid.expand().unwrap() == f.img);
    // The working set's data comes first in the file, in touch order.
    let first_data = ws
        .iter()
        .find(|&&p| laid.page(p).unwrap().is_some())
        .unwrap();
    let e = laid.layout.extents[laid.layout.find(*first_data).unwrap()];
    assert_eq!(e.file_offset, laid.layout.data_offset);

    // Second restore: the working set is installed ahead of the guest.
    let server = Server::start(
        f.dir.path(),
        &with_ws,
        ServeOptions {
            prefetch: true,
            ..ServeOptions::default()
        },
    );
    let guest = Guest::connect(&server.socket, f.img.len(), 2).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    guest.touch(&ws).unwrap();
    for &p in &ws {
        expect_page(&guest, &f.img, p);
    }
    // Pages outside the working set still come on demand.
    let others: Vec<u64> = all
        .iter()
        .copied()
        .filter(|p| !ws.contains(p))
        .take(100)
        .collect();
    for &p in &others {
        expect_page(&guest, &f.img, p);
    }
    guest.finish().unwrap();
    let second = server.join().unwrap();
    assert!(second.working_set_us.is_some());
    assert!(second.pages_prefetched >= 800, "{second:?}");
    // The working set was resident before the guest asked: faults inside it
    // are rare (only pages the prefetcher had not reached yet).
    let ws_data = ws
        .iter()
        .filter(|&&p| laid.page(p).unwrap().is_some())
        .count() as u64;
    let others_data = others
        .iter()
        .filter(|&&p| laid.page(p).unwrap().is_some())
        .count() as u64;
    assert!(
        second.demand_faults <= others_data + ws_data / 20,
        "{second:?}"
    );
}

#[test]
fn prefetch_all_leaves_nothing_to_fault() {
    let f = fixture(40, 6);
    let server = Server::start(
        f.dir.path(),
        &f.file,
        ServeOptions {
            prefetch: true,
            prefetch_all: true,
            ..ServeOptions::default()
        },
    );
    let guest = Guest::connect(&server.socket, f.img.len(), 1).unwrap();
    // Ample time for ~7 MiB on a loaded machine (it takes ~20 ms idle).
    std::thread::sleep(Duration::from_millis(2000));
    for p in data_pages(&f.img) {
        expect_page(&guest, &f.img, p);
    }
    guest.finish().unwrap();
    let stats = server.join().unwrap();
    assert!(stats.prefetch_us.is_some(), "{stats:?}");
    assert_eq!(stats.pages_prefetched, data_pages(&f.img).len() as u64);
    assert_eq!(stats.demand_faults, 0, "{stats:?}");
}

#[test]
fn a_merged_diff_restores_with_the_diff_applied() {
    let f = fixture(50, 7);
    let mut rng = Rng(8);
    let mut expected = f.img.clone();
    let diff: Vec<(u64, Vec<u8>)> = (0..200)
        .map(|i| {
            let p = (i * 17) % PAGES as u64;
            let mut b = vec![0u8; PAGE_SIZE];
            if i % 4 != 0 {
                rng.fill(&mut b);
            }
            (p, b)
        })
        .collect();
    for (p, b) in &diff {
        let at = usize::try_from(*p).unwrap() * PAGE_SIZE;
        expected[at..at + PAGE_SIZE].copy_from_slice(b);
    }
    write_sparse_diff(&f.dir.path().join("d.raw"), f.img.len(), &diff);
    let d = f.dir.path().join("d.thaw");
    convert(&f.dir.path().join("d.raw"), &d, RawKind::Diff, 2).unwrap();
    let merged = f.dir.path().join("merged.thaw");
    merge(
        &MemoryFile::open(&f.file).unwrap(),
        &MemoryFile::open(&d).unwrap(),
        &merged,
    )
    .unwrap();
    let server = Server::start(f.dir.path(), &merged, ServeOptions::default());
    let guest = Guest::connect(&server.socket, f.img.len(), 2).unwrap();
    for p in 0..PAGES as u64 {
        expect_page(&guest, &expected, p);
    }
    guest.finish().unwrap();
    server.join().unwrap();
}

#[test]
fn a_corrupt_page_fails_the_restore_instead_of_serving_wrong_bytes() {
    let f = fixture(100, 8);
    let mut bytes = std::fs::read(&f.file).unwrap();
    let mem = MemoryFile::open(&f.file).unwrap();
    let victim = mem.layout.extents[3];
    bytes[usize::try_from(victim.file_offset).unwrap() + 5] ^= 0xff;
    std::fs::write(&f.file, &bytes).unwrap();
    let server = Server::start(f.dir.path(), &f.file, ServeOptions::default());
    let guest = Guest::connect(&server.socket, f.img.len(), 1).unwrap();
    guest.touch(&[0, 1]).unwrap();
    let started = Instant::now();
    let err = guest.touch(&[victim.guest_page]).unwrap_err();
    assert!(matches!(err, HarnessError::PageServerDied), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let served = server.join();
    assert!(matches!(served, Err(ServeError::Format(_))), "{served:?}");
}

#[test]
fn bad_handshakes_are_refused() {
    let f = fixture(10, 9);
    // A region larger than the memory file.
    let server = Server::start(f.dir.path(), &f.file, ServeOptions::default());
    let guest = Guest::connect(&server.socket, f.img.len() * 2, 1);
    let served = server.join();
    assert!(
        matches!(served, Err(ServeError::BadRegion { .. })),
        "{served:?}"
    );
    drop(guest);
}

#[test]
fn a_page_server_that_dies_mid_restore_is_a_clear_failure_not_a_hang() {
    let f = fixture(100, 10);
    let socket = f.dir.path().join("srv.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_thaw-snapshot"))
        .arg("serve")
        .arg(&f.file)
        .arg("--socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + snapshot::harness::STARTUP;
    while !socket.exists() {
        assert!(Instant::now() < deadline, "page server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let guest = Guest::connect(&socket, f.img.len(), 1).unwrap();
    let half: Vec<u64> = (0..PAGES as u64 / 2).collect();
    guest.touch(&half).unwrap();
    expect_page(&guest, &f.img, 100);
    child.kill().unwrap();
    child.wait().unwrap();
    let rest: Vec<u64> = (PAGES as u64 / 2..PAGES as u64).collect();
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| tx.send(guest.touch(&rest)).unwrap());
        let result = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the guest hung after the page server died");
        assert!(
            matches!(result, Err(HarnessError::PageServerDied)),
            "{result:?}"
        );
    });
    assert!(started.elapsed() < Duration::from_secs(20));
}
