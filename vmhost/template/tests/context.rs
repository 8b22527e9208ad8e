//! COPY sources: nothing outside the build context is reachable, by `..`,
//! by an absolute path, or through a symlink.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

use std::os::unix::fs::symlink;

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
