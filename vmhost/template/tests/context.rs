//! COPY sources: nothing outside the build context is reachable, by `..`,
//! by an absolute path, or through a symlink.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

use std::os::unix::fs::symlink;
use std::path::Path;

use template::context::{Context, ContextError};

fn fixture() -> (tempfile::TempDir, Context) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("runtimes");
    std::fs::create_dir_all(root.join("python/lib")).unwrap();
    std::fs::create_dir_all(root.join("shared")).unwrap();
    std::fs::write(root.join("python/runner.py"), "print(1)").unwrap();
    std::fs::write(root.join("python/lib/a.py"), "a").unwrap();
    std::fs::write(root.join("shared/x.txt"), "x").unwrap();
    std::fs::write(dir.path().join("secret"), "outside").unwrap();
    symlink("../shared/x.txt", root.join("python/ok-link")).unwrap();
    symlink(dir.path().join("secret"), root.join("python/leak")).unwrap();
    symlink("/etc", root.join("python/etc")).unwrap();
    let ctx = Context::new(&root, &root.join("python")).unwrap();
    (dir, ctx)
}

#[test]
fn sources_inside_the_context_resolve() {
    let (_d, ctx) = fixture();
    assert!(ctx
        .resolve("runner.py")
        .unwrap()
        .ends_with("python/runner.py"));
    assert!(ctx
        .resolve("./lib/../runner.py")
        .unwrap()
        .ends_with("python/runner.py"));
    assert!(ctx
        .resolve("../shared/x.txt")
        .unwrap()
        .ends_with("shared/x.txt"));
    assert!(ctx.resolve("ok-link").unwrap().ends_with("shared/x.txt"));
    let files = ctx.files_under(&ctx.resolve("lib").unwrap()).unwrap();
    assert_eq!(files.len(), 1);
}

#[test]
fn escapes_are_refused() {
    let (_d, ctx) = fixture();
    assert!(matches!(
        ctx.resolve("/etc/passwd"),
        Err(ContextError::Absolute(_))
    ));
    assert!(matches!(
        ctx.resolve("../../secret"),
        Err(ContextError::Escapes(_))
    ));
    assert!(matches!(
        ctx.resolve("../../../../../../etc/passwd"),
        Err(ContextError::Escapes(_))
    ));
    assert!(matches!(
        ctx.resolve("lib/../../../secret"),
        Err(ContextError::Escapes(_))
    ));
    assert!(matches!(
        ctx.resolve("leak"),
        Err(ContextError::SymlinkEscapes { .. })
    ));
    assert!(matches!(
        ctx.resolve("etc/passwd"),
        Err(ContextError::SymlinkEscapes { .. })
    ));
    assert!(matches!(
        ctx.resolve("missing.py"),
        Err(ContextError::Missing { .. })
    ));
    // A copied directory holding a symlink that leads out is refused too.
    let python = ctx.resolve(".").unwrap();
    assert!(matches!(
        ctx.files_under(&python),
        Err(ContextError::SymlinkEscapes { .. })
    ));
}

/// A tar holding `entries` (name, kind, data or link target), names written
/// raw so hostile ones (`..`, absolute) can be made.
fn tar_with(entries: &[(&str, tar::EntryType, &[u8])], gz: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data) in entries {
        let mut h = tar::Header::new_old();
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        if kind.is_symlink() || *kind == tar::EntryType::Link {
            h.set_link_name(std::str::from_utf8(data).unwrap()).unwrap();
            h.set_size(0);
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        } else {
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
    }
    let bytes = b.into_inner().unwrap();
    if gz {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&bytes).unwrap();
        e.finish().unwrap()
    } else {
        bytes
    }
}

#[test]
fn uploaded_archives_unpack_into_a_context() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("ctx.tar.gz");
    std::fs::write(
        &archive,
        tar_with(
            &[
                ("app/", tar::EntryType::Directory, b""),
                ("app/main.py", tar::EntryType::Regular, b"print(1)"),
                ("app/link.py", tar::EntryType::Symlink, b"main.py"),
            ],
            true,
        ),
    )
    .unwrap();
    let ctx = Context::from_archive(&archive, &dir.path().join("out")).unwrap();
    assert_eq!(
        std::fs::read(ctx.resolve("app/main.py").unwrap()).unwrap(),
        b"print(1)"
    );
    assert!(ctx.resolve("app/link.py").unwrap().ends_with("app/main.py"));
    assert!(matches!(
        ctx.resolve("../ctx.tar.gz"),
        Err(ContextError::Escapes(_))
    ));

    // The same as a zip.
    let zpath = dir.path().join("ctx.zip");
    {
        use std::io::Write;
        let mut z = zip::ZipWriter::new(std::fs::File::create(&zpath).unwrap());
        z.start_file("lib/x.txt", zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(b"x").unwrap();
        z.finish().unwrap();
    }
    let ctx = Context::from_archive(&zpath, &dir.path().join("zout")).unwrap();
    assert_eq!(
        std::fs::read(ctx.resolve("lib/x.txt").unwrap()).unwrap(),
        b"x"
    );
}

#[test]
fn hostile_archive_entries_are_refused_before_anything_lands_outside() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dotdot",
            tar_with(&[("../evil", tar::EntryType::Regular, b"x")], false),
        ),
        (
            "nested dotdot",
            tar_with(&[("a/../../evil", tar::EntryType::Regular, b"x")], true),
        ),
        (
            "absolute",
            tar_with(&[("/tmp/thaw-evil", tar::EntryType::Regular, b"x")], false),
        ),
        (
            "symlink out",
            tar_with(&[("leak", tar::EntryType::Symlink, b"../../etc")], false),
        ),
        (
            "absolute symlink",
            tar_with(&[("leak", tar::EntryType::Symlink, b"/etc/passwd")], false),
        ),
        (
            "hard link",
            tar_with(
                &[
                    ("a", tar::EntryType::Regular, b"x"),
                    ("b", tar::EntryType::Link, b"/etc/passwd"),
                ],
                false,
            ),
        ),
        (
            "device",
            tar_with(&[("dev", tar::EntryType::Char, b"")], false),
        ),
    ];
    for (what, bytes) in cases {
        let archive = dir.path().join(format!("{what}.tar"));
        std::fs::write(&archive, bytes).unwrap();
        let out = dir.path().join(format!("out-{what}"));
        let err = Context::from_archive(&archive, &out).unwrap_err();
        assert!(
            matches!(err, ContextError::ArchiveEntry { .. }),
            "{what}: {err}"
        );
    }
    assert!(!dir.path().join("evil").exists());
    assert!(!Path::new("/tmp/thaw-evil").exists());
    let zpath = dir.path().join("evil.zip");
    {
        use std::io::Write;
        let mut z = zip::ZipWriter::new(std::fs::File::create(&zpath).unwrap());
        z.start_file("../zip-evil", zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(b"x").unwrap();
        z.finish().unwrap();
    }
    let err = Context::from_archive(&zpath, &dir.path().join("zout")).unwrap_err();
    assert!(matches!(err, ContextError::ArchiveEntry { .. }), "{err}");
    assert!(!dir.path().join("zip-evil").exists());
}
