//! Fuzzing the memory-file parser (proptest, a bounded run in every test
//! run): damaged files from a small corpus must be refused with an error or
//! parse into a map whose every page can be asked for, never panic and
//! never index outside the file.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use snapshot::format::{FormatError, MemoryFile};

fn corpus(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(name)
}

#[test]
fn corpus_files_are_judged_as_labelled() {
    let valid = MemoryFile::open(&corpus("valid.thaw")).unwrap();
    valid.verify().unwrap();
    assert_eq!(valid.layout.guest_size, 16 * 4096);
    assert!(valid.page(2).unwrap().is_some());
    assert!(valid.page(3).unwrap().is_none());
    assert!(matches!(
        MemoryFile::open(&corpus("truncated.thaw")),
        Err(FormatError::Truncated { .. })
    ));
    assert!(matches!(
        MemoryFile::open(&corpus("newer-version.thaw")),
        Err(FormatError::NewerVersion { major: 2, .. })
    ));
    assert!(matches!(
        MemoryFile::open(&corpus("extent-outside.thaw")),
        Err(FormatError::Invalid { .. })
    ));
}

/// Opens damaged bytes and, if they parse, asks for every page.
fn exercise(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.thaw");
    std::fs::write(&p, bytes).unwrap();
    if let Ok(f) = MemoryFile::open(&p) {
        for page in 0..f.layout.guest_pages().min(4096) {
            if let Ok(Some(data)) = f.page(page) {
                assert_eq!(data.len(), 4096);
            }
        }
        let _ = f.verify();
    }
}

fn seeds() -> Vec<Vec<u8>> {
    [
        "valid.thaw",
        "truncated.thaw",
        "newer-version.thaw",
        "extent-outside.thaw",
    ]
    .iter()
    .map(|n| std::fs::read(corpus(n)).unwrap())
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn flipped_bytes_never_panic(seed in 0usize..4, flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut bytes = seeds()[seed].clone();
        for (at, v) in flips {
            if !bytes.is_empty() {
                let i = at % bytes.len();
                bytes[i] ^= v | 1;
            }
        }
        exercise(&bytes);
    }

    #[test]
    fn header_fields_overwritten_never_panic(field in 0usize..7, value in any::<u64>(), fix_crc in any::<bool>()) {
        let mut bytes = seeds()[0].clone();
        let at = 16 + field * 8;
        bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
        if fix_crc {
            // Make the header checksum match, so validation must catch it.
            let crc = crc32fast::hash(&bytes[..56]);
            bytes[56..60].copy_from_slice(&crc.to_le_bytes());
        }
        exercise(&bytes);
    }

    #[test]
    fn truncations_never_panic(len in 0usize..20_000) {
        let bytes = seeds()[0].clone();
        exercise(&bytes[..len.min(bytes.len())]);
    }
}
