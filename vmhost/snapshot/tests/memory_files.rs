//! Memory files on disk: conversion (full and sparse), single-generation
//! merges, compaction, refusal of damaged files, and a merge killed midway.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{data_pages, image, write_raw, write_sparse_diff, Rng};
use snapshot::convert::{convert, RawKind};
use snapshot::format::{ExtentKind, FormatError, MemoryFile, PAGE_SIZE};
use snapshot::merge::merge;

#[test]
fn full_conversion_stores_only_nonzero_pages_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(4096, 20, 1);
    let raw = dir.path().join("mem.raw");
    let out = dir.path().join("mem.thaw");
    write_raw(&raw, &img);
    let (layout, stats) = convert(&raw, &out, RawKind::Full, 1).unwrap();
    let nonzero = data_pages(&img).len() as u64;
    assert_eq!(stats.data_pages, nonzero);
    assert_eq!(stats.data_pages + stats.zero_pages, 4096);
    assert_eq!(layout.referenced_bytes(), nonzero * PAGE_SIZE as u64);
    let limit = nonzero * PAGE_SIZE as u64 * 105 / 100;
    assert!(
        stats.stored_bytes <= limit,
        "stored {} > {limit}",
        stats.stored_bytes
    );
    assert!(layout.extents.iter().all(|e| e.kind == ExtentKind::Data));
    let f = MemoryFile::open(&out).unwrap();
    f.verify().unwrap();
    assert!(f.expand().unwrap() == img, "round trip differs");
    assert_eq!(
        f.page(0).unwrap().is_none(),
        img[..PAGE_SIZE].iter().all(|&b| b == 0)
    );
}

#[test]
fn sparse_images_are_read_without_their_holes() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let guest = 64 << 20;
    let pages: Vec<(u64, Vec<u8>)> = [3u64, 4, 5, 900, 12_000, 16_383]
        .iter()
        .map(|&p| {
            let mut b = vec![0u8; PAGE_SIZE];
            rng.fill(&mut b);
            (p, b)
        })
        .collect();
    let raw = dir.path().join("sparse.raw");
    write_sparse_diff(&raw, guest, &pages);
    let (_, stats) = convert(&raw, &dir.path().join("sparse.thaw"), RawKind::Full, 1).unwrap();
    assert_eq!(stats.raw_bytes, guest as u64);
    assert_eq!(stats.data_pages, 6);
    // Only the data segments were read (filesystem blocks may round up).
    assert!(
        stats.read_bytes < 1 << 20,
        "read {} of a {guest}-byte image",
        stats.read_bytes
    );
    let f = MemoryFile::open(&dir.path().join("sparse.thaw")).unwrap();
    for (p, bytes) in &pages {
        assert_eq!(f.page(*p).unwrap().unwrap(), &bytes[..]);
    }
    assert!(f.page(6).unwrap().is_none());
}

/// Applies a diff to an image in memory: the expected merge result.
fn apply(img: &mut [u8], diff: &[(u64, Vec<u8>)]) {
    for (p, bytes) in diff {
        let at = usize::try_from(*p).unwrap() * PAGE_SIZE;
        img[at..at + PAGE_SIZE].copy_from_slice(bytes);
    }
}

fn random_diff(rng: &mut Rng, pages: u64, count: usize) -> Vec<(u64, Vec<u8>)> {
    (0..count)
        .map(|_| {
            let p = rng.next() % pages;
            let mut b = vec![0u8; PAGE_SIZE];
            // One page in five becomes zero: it must override the base.
            if rng.next() % 5 != 0 {
                rng.fill(&mut b);
            }
            (p, b)
        })
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect()
}

#[test]
fn diffs_merge_into_one_generation_and_compact_when_garbage_grows() {
    let dir = tempfile::tempdir().unwrap();
    let pages = 2048u64;
    let mut expected = image(usize::try_from(pages).unwrap(), 40, 3);
    let raw = dir.path().join("base.raw");
    write_raw(&raw, &expected);
    let snap = dir.path().join("snap.thaw");
    convert(&raw, &snap, RawKind::Full, 1).unwrap();
    let mut rng = Rng(11);
    let mut compacted = false;
    for generation in 2..=12u32 {
        let diff = random_diff(&mut rng, pages, 300);
        let diff_raw = dir.path().join("diff.raw");
        write_sparse_diff(&diff_raw, expected.len(), &diff);
        let diff_file = dir.path().join("diff.thaw");
        let (dl, _) = convert(&diff_raw, &diff_file, RawKind::Diff, generation).unwrap();
        assert!(
            dl.extents.iter().any(|e| e.kind == ExtentKind::Zero),
            "diff keeps zero pages"
        );
        apply(&mut expected, &diff);
        let base = MemoryFile::open(&snap).unwrap();
        let diff = MemoryFile::open(&diff_file).unwrap();
        // Merged over the base's own path: every restore reads one file.
        let (layout, stats) = merge(&base, &diff, &snap).unwrap();
        compacted |= stats.compacted;
        assert_eq!(stats.live_bytes + stats.garbage_bytes, layout.data_len);
        let merged = MemoryFile::open(&snap).unwrap();
        merged.verify().unwrap();
        assert!(
            merged.expand().unwrap() == expected,
            "generation {generation} differs"
        );
        assert!(merged
            .layout
            .extents
            .iter()
            .all(|e| e.kind == ExtentKind::Data));
        assert!(merged
            .layout
            .extents
            .iter()
            .any(|e| e.generation == generation));
        // Garbage never outweighs live data for long.
        assert!(stats.garbage_bytes <= stats.live_bytes * 2, "{stats:?}");
    }
    assert!(compacted, "repeated merges never compacted");
    // No temporary file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn merge_refuses_a_diff_of_another_guest_size() {
    let dir = tempfile::tempdir().unwrap();
    write_raw(&dir.path().join("a.raw"), &image(64, 50, 1));
    write_raw(&dir.path().join("b.raw"), &image(128, 50, 2));
    convert(
        &dir.path().join("a.raw"),
        &dir.path().join("a.thaw"),
        RawKind::Full,
        1,
    )
    .unwrap();
    convert(
        &dir.path().join("b.raw"),
        &dir.path().join("b.thaw"),
        RawKind::Diff,
        2,
    )
    .unwrap();
    let a = MemoryFile::open(&dir.path().join("a.thaw")).unwrap();
    let b = MemoryFile::open(&dir.path().join("b.thaw")).unwrap();
    assert!(matches!(
        merge(&a, &b, &dir.path().join("c.thaw")),
        Err(FormatError::Invalid { .. })
    ));
    assert!(!dir.path().join("c.thaw").exists());
}

#[test]
fn damaged_files_are_refused_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(256, 60, 5);
    write_raw(&dir.path().join("m.raw"), &img);
    let good = dir.path().join("m.thaw");
    convert(&dir.path().join("m.raw"), &good, RawKind::Full, 1).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    // A flipped bit in page data: the file opens (the map is intact), but
    // the damaged extent is refused, never served.
    let mut flipped = bytes.clone();
    flipped[PAGE_SIZE + 100] ^= 0x40;
    let p = dir.path().join("flipped.thaw");
    std::fs::write(&p, &flipped).unwrap();
    let f = MemoryFile::open(&p).unwrap();
    assert!(matches!(f.verify(), Err(FormatError::Checksum { .. })));
    let first = f.layout.extents[0].guest_page;
    assert!(matches!(f.page(first), Err(FormatError::Checksum { .. })));

    for (name, damaged) in [
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("header-only", bytes[..64].to_vec()),
        ("empty", Vec::new()),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, &damaged).unwrap();
        let err = MemoryFile::open(&p).unwrap_err();
        assert!(
            matches!(err, FormatError::Truncated { .. }),
            "{name}: {err}"
        );
    }
    let mut newer = bytes.clone();
    newer[8] = 9;
    std::fs::write(dir.path().join("newer"), &newer).unwrap();
    let err = MemoryFile::open(&dir.path().join("newer")).unwrap_err();
    assert!(err.to_string().contains("newer"), "{err}");
    let mut junk = bytes;
    junk[..8].copy_from_slice(b"NOTTHAW!");
    std::fs::write(dir.path().join("junk"), &junk).unwrap();
    assert!(matches!(
        MemoryFile::open(&dir.path().join("junk")),
        Err(FormatError::BadMagic(_))
    ));
}

#[test]
fn a_killed_merge_leaves_the_old_snapshot_intact() {
    let dir = tempfile::tempdir().unwrap();
    // A base with 192 MiB of data, so the merge (copy + fsync) takes a
    // while on any disk.
    let pages = 48 * 1024;
    let img = image(pages, 100, 9);
    write_raw(&dir.path().join("base.raw"), &img);
    let snap = dir.path().join("snap.thaw");
    convert(&dir.path().join("base.raw"), &snap, RawKind::Full, 1).unwrap();
    std::fs::remove_file(dir.path().join("base.raw")).unwrap();
    let mut rng = Rng(5);
    let diff = random_diff(&mut rng, pages as u64, 2000);
    write_sparse_diff(&dir.path().join("d.raw"), img.len(), &diff);
    convert(
        &dir.path().join("d.raw"),
        &dir.path().join("d.thaw"),
        RawKind::Diff,
        2,
    )
    .unwrap();
    let before = std::fs::read(&snap).unwrap();

    let mut killed_midway = 0;
    for delay_ms in [2u64, 10, 30, 80, 150, 300] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_thaw-snapshot"))
            .arg("merge")
            .arg(&snap)
            .arg(dir.path().join("d.thaw"))
            .arg(&snap)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let tmp_present = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".tmp-"));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.success() {
            // It finished before the kill: the merge is complete and valid.
            let merged = MemoryFile::open(&snap).unwrap();
            merged.verify().unwrap();
            std::fs::write(&snap, &before).unwrap();
            continue;
        }
        if tmp_present {
            killed_midway += 1;
        }
        // Killed: the snapshot is exactly what it was.
        assert!(
            std::fs::read(&snap).unwrap() == before,
            "killed after {delay_ms} ms: snapshot changed"
        );
        MemoryFile::open(&snap).unwrap().verify().unwrap();
        // Clear the temporary file the killed process left.
        for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
            if e.file_name().to_string_lossy().contains(".tmp-") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }
    assert!(killed_midway > 0, "no kill landed during a merge");
}
