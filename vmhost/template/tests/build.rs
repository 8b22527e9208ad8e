//! The builder on small recipes of its own (real debootstrap base, real
//! runsc steps): USER, WORKDIR, ENV and COPY ownership in the image, RUN
//! confined to the tree, an uploaded archive as the context, and a failing
//! step reported with its number, exit status and output.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use template::builder::{build, BuildConfig, BuildError, BuildEvent};

fn cache_dir() -> PathBuf {
    std::env::var_os("THAW_TEST_CACHE_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/thaw-test"), PathBuf::from)
}

fn config(runtimes: &Path, data: &Path) -> BuildConfig {
    let mut cfg = BuildConfig::new(runtimes, &cache_dir(), data);
    if let Ok(m) = std::env::var("THAW_DEBIAN_MIRROR") {
        cfg.mirror = m;
    }
    cfg
}

#[test]
fn steps_shape_the_image_and_stay_inside_it() {
    let dir = tempfile::tempdir().unwrap();
    let rt = dir.path().join("runtimes");
    std::fs::create_dir_all(rt.join("probe")).unwrap();
    std::fs::write(rt.join("probe/a.txt"), "from the context\n").unwrap();
    // A unique marker proves where a RUN step's writes land.
    let marker = format!("thaw-build-marker-{}", std::process::id());
    std::fs::write(
        rt.join("probe/recipe"),
        format!(
            "FROM debian:bookworm\n\
             RUN touch /{marker} && echo host-side-check\n\
             USER tester\n\
             WORKDIR /home/tester/work\n\
             ENV GREETING=hello\n\
             COPY a.txt ./\n\
             RUN test -O /home/tester/work/a.txt && test \"$GREETING\" = hello && test \"$(whoami)\" = tester && test \"$PWD\" = /home/tester/work\n\
             RUN test ! -e /.thaw-context\n\
             START sleep 1000\n"
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let mut events = Vec::new();
    let t = build("probe", &config(&rt, &data), &mut |e| {
        events.push(e.clone())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !Path::new("/").join(&marker).exists(),
        "a RUN step wrote to the host"
    );
    assert!(
        t.rootfs.join(&marker).exists(),
        "the RUN step's file is in the image"
    );
    let copied = std::fs::metadata(t.rootfs.join("home/tester/work/a.txt")).unwrap();
    assert_ne!(copied.uid(), 0, "COPY after USER belongs to the user");
    assert!(
        !t.rootfs.join(".thaw-context").exists(),
        "the context mount point is not left in the image"
    );
    assert_eq!(t.summary.user.as_deref(), Some("tester"));
    assert_eq!(t.summary.env["GREETING"], "hello");
    // Progress: every step announced n/N, output lines, a finish.
    let steps: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            BuildEvent::Step { n, total, .. } => Some((*n, *total)),
            _ => None,
        })
        .collect();
    if !events
        .iter()
        .any(|e| matches!(e, BuildEvent::Cached { .. }))
    {
        assert_eq!(steps, (1..=9).map(|n| (n, 9)).collect::<Vec<_>>());
        assert!(events
            .iter()
            .any(|e| matches!(e, BuildEvent::Output { line, .. } if line == "host-side-check")));
    }
    assert!(matches!(events.last(), Some(BuildEvent::Finished { .. })));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("templates/probe/template.json")).unwrap())
            .unwrap();
    assert_eq!(meta["summary"]["user"], "tester");
}

#[test]
fn a_failing_step_names_itself_its_status_and_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let rt = dir.path().join("runtimes");
    std::fs::create_dir_all(rt.join("broken")).unwrap();
    let nonce = std::process::id();
    std::fs::write(
        rt.join("broken/recipe"),
        format!("FROM debian:bookworm\nRUN echo step-two-{nonce}\nRUN echo about to fail; exit 7\nRUN echo never\n"),
    )
    .unwrap();
    let err = build(
        "broken",
        &config(&rt, &dir.path().join("data")),
        &mut |_| {},
    )
    .unwrap_err();
    match &err {
        BuildError::StepFailed {
            n,
            code,
            tail,
            text,
        } => {
            assert_eq!(*n, 3);
            assert_eq!(*code, Some(7));
            assert!(tail.contains("about to fail"), "{tail}");
            assert!(text.contains("exit 7"));
        }
        other => panic!("{other}"),
    }
    let shown = err.to_string();
    assert!(
        shown.contains("step 3") && shown.contains("about to fail"),
        "{shown}"
    );
}

#[test]
fn an_uploaded_archive_is_the_copy_context() {
    let dir = tempfile::tempdir().unwrap();
    let rt = dir.path().join("runtimes");
    std::fs::create_dir_all(rt.join("upload")).unwrap();
    std::fs::write(
        rt.join("upload/recipe"),
        "FROM debian:bookworm\nCOPY app/main.py /srv/\nRUN test \"$(cat /srv/main.py)\" = 'print(42)'\n",
    )
    .unwrap();
    let archive = dir.path().join("ctx.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&archive).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(9);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "app/main.py", &b"print(42)"[..])
            .unwrap();
        b.finish().unwrap();
    }
    let mut cfg = config(&rt, &dir.path().join("data"));
    cfg.context_archive = Some(archive);
    let t = build("upload", &cfg, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        std::fs::read_to_string(t.rootfs.join("srv/main.py")).unwrap(),
        "print(42)"
    );
}
