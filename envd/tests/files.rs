//! Files through a real envd: streamed round trips, refusals, listing,
//! stat, mkdir, remove, move, and acting as another user.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use bytes::Bytes;
use common::Envd;
use http::{Method, StatusCode};
use serde_json::json;

fn q(path: &std::path::Path) -> String {
    format!("/files?path={}", path.display())
}

#[tokio::test]
async fn ten_mib_binary_round_trip_creates_parents() {
    let envd = Envd::start();
    let c = &envd.client;
    let data: Vec<u8> = (0..10 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    let path = envd.dir.path().join("a/b/c/blob.bin");
    let (status, body) = c
        .raw(Method::PUT, &q(&path), Bytes::from(data.clone()))
        .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["size_bytes"], 10 << 20);
    let (status, back) = c.raw(Method::GET, &q(&path), Bytes::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(back[..] == data[..], "round trip differs");
    // No temporary upload file is left beside it.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("blob.bin")]);
    // Overwrite with an empty file.
    let (status, _) = c.raw(Method::PUT, &q(&path), Bytes::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
}

#[tokio::test]
async fn refusals_have_the_right_status() {
    let envd = Envd::start();
    let c = &envd.client;
    for (path, status, code) in [
        ("/dev/zero", StatusCode::BAD_REQUEST, "not_a_regular_file"),
        (
            "/dev/urandom",
            StatusCode::BAD_REQUEST,
            "not_a_regular_file",
        ),
        ("/no/such/file", StatusCode::NOT_FOUND, "not_found"),
        ("/", StatusCode::BAD_REQUEST, "is_a_directory"),
    ] {
        let (got, v) = c.get(&format!("/files?path={path}")).await;
        assert_eq!(
            (got, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}: {v}"
        );
    }
    // A FIFO is refused without blocking.
    let fifo = envd.dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let (got, v) = c.get(&q(&fifo)).await;
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("not_a_regular_file"))
    );
    let (got, v) = c.get("/files").await;
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_query"))
    );
    let (got, _) = c.get("/files?path=").await;
    assert_eq!(got, StatusCode::BAD_REQUEST);
    // Writing over a directory is refused and changes nothing.
    let (got, _) = c
        .raw(Method::PUT, &q(envd.dir.path()), Bytes::from_static(b"x"))
        .await;
    assert_eq!(got, StatusCode::BAD_REQUEST);
    // Percent-encoded odd names work (path traversal is just a path here:
    // envd serves the whole sandbox, limited by the user's permissions).
    let odd = envd.dir.path().join("sp ace");
    let (got, _) = c
        .raw(
            Method::PUT,
            &format!("/files?path={}/sp%20ace", envd.dir.path().display()),
            Bytes::from_static(b"1"),
        )
        .await;
    assert_eq!(got, StatusCode::OK);
    assert_eq!(std::fs::read(&odd).unwrap(), b"1");
}

#[tokio::test]
async fn list_stat_mkdir_remove_move() {
    let envd = Envd::start();
    let c = &envd.client;
    let root = envd.dir.path().join("tree");
    let (status, v) = c
        .post("/files/mkdir", json!({"path": root.join("x/y")}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, _) = c
        .post("/files/mkdir", json!({"path": root.join("x/y")}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = c
        .post(
            "/files/mkdir",
            json!({"path": root.join("p/q"), "recursive": false}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    std::fs::write(root.join("x/y/f.txt"), "hello").unwrap();
    std::os::unix::fs::symlink("x/y/f.txt", root.join("link")).unwrap();

    let (status, v) = c.post("/files/list", json!({"path": root})).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<_> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["link", "x"]);
    let (_, v) = c
        .post("/files/list", json!({"path": root, "depth": 3}))
        .await;
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 4, "{v}");
    let f = entries.iter().find(|e| e["name"] == "f.txt").unwrap();
    assert_eq!(
        (f["type"].as_str(), f["size_bytes"].as_u64()),
        (Some("file"), Some(5))
    );
    let (status, v) = c
        .post("/files/list", json!({"path": root, "depth": 0}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_depth"))
    );

    let (_, v) = c
        .post("/files/stat", json!({"path": root.join("link")}))
        .await;
    assert_eq!(v["type"], "symlink");
    assert_eq!(v["symlink_target"], "x/y/f.txt");
    let (status, _) = c
        .post("/files/stat", json!({"path": root.join("missing")}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Move: refuses to overwrite unless asked.
    std::fs::write(root.join("other.txt"), "other").unwrap();
    let (status, v) = c
        .post(
            "/files/move",
            json!({"from": root.join("x/y/f.txt"), "to": root.join("other.txt")}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("already_exists"))
    );
    let (status, _) = c.post("/files/move", json!({"from": root.join("x/y/f.txt"), "to": root.join("other.txt"), "overwrite": true})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        std::fs::read_to_string(root.join("other.txt")).unwrap(),
        "hello"
    );
    let (status, _) = c
        .post(
            "/files/move",
            json!({"from": root.join("nope"), "to": root.join("n2")}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Remove: a non-empty directory needs `recursive`.
    let (status, v) = c
        .post("/files/remove", json!({"path": root.join("x")}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("directory_not_empty"))
    );
    let (status, _) = c
        .post(
            "/files/remove",
            json!({"path": root.join("x"), "recursive": true}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(!root.join("x").exists());
    let (status, _) = c
        .post("/files/remove", json!({"path": root.join("x")}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = c.post("/files/remove", json!({"path": "/"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn acts_as_the_requests_user() {
    let envd = Envd::start();
    let c = &envd.client;
    assert!(
        nix::unistd::geteuid().is_root(),
        "acting as another user needs root: run the test command (scripts/test.sh) as root"
    );
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let shared = envd.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::set_permissions(envd.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // Written as nobody: owned by nobody, parents too.
    let file = shared.join("sub/mine.txt");
    let (status, body) = c
        .raw(
            Method::PUT,
            &format!("{}&user=nobody", q(&file)),
            Bytes::from_static(b"hi"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (nobody.uid.as_raw(), nobody.gid.as_raw())
    );
    assert_eq!(
        std::fs::metadata(shared.join("sub")).unwrap().uid(),
        nobody.uid.as_raw()
    );

    // A root-only file: 403 for nobody, readable for root.
    let secret = envd.dir.path().join("secret");
    std::fs::write(&secret, "s").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (status, v) = c.get(&format!("{}&user=nobody", q(&secret))).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("permission_denied"))
    );
    let (status, _) = c.raw(Method::GET, &q(&secret), Bytes::new()).await;
    assert_eq!(status, StatusCode::OK);
    // Nobody cannot write into a root-owned directory.
    let (status, _) = c
        .raw(
            Method::PUT,
            &format!("{}&user=nobody", q(&envd.dir.path().join("x"))),
            Bytes::from_static(b"x"),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = c
        .post("/files/remove", json!({"path": secret, "user": "nobody"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(secret.exists());
    // The worker threads went back to root afterwards.
    let (status, _) = c.raw(Method::GET, &q(&secret), Bytes::new()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = c.get(&format!("{}&user=nobody-at-all", q(&secret))).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unknown_user"))
    );
}
