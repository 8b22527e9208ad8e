//! Sandbox lifecycle through a real envd: init and re-init, snapshot prepare,
//! dial-out against a host that drops and comes back, tunnels, metrics,
//! HTTP/2.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::{enc, Envd};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn init_applies_env_user_workdir_and_replaces_identity() {
    let envd = Envd::start();
    let c = &envd.client;
    let run = envd.dir.path().join("run");
    let work = envd.dir.path().join("work");
    let (status, v) = c
        .post(
            "/init",
            json!({
                "env": {"GREETING": "hi", "OLD_ONLY": "1"},
                "workdir": work, "sandbox_id": "sb_first", "template_id": "tpl_python",
                "metadata": {"owner": "a"}, "entropy": enc(&[7u8; 64]),
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["entropy_bytes"], 64);
    assert_eq!(v["clock"], "not_sent");
    assert!(work.is_dir(), "workdir created");
    let r = c
        .run(json!({"cmd": "sh", "args": ["-c", "echo $GREETING $OLD_ONLY; pwd"]}))
        .await;
    assert_eq!(r.out(), format!("hi 1\n{}\n", work.display()));
    assert_eq!(
        std::fs::read_to_string(run.join("sandbox_id")).unwrap(),
        "sb_first"
    );
    let (_, h) = c.get("/health").await;
    assert_eq!(h["sandbox_id"], "sb_first");

    // A second init (as after a restore): nothing of the first survives.
    std::fs::write(run.join("left-behind"), "x").unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let (status, v) = c
        .post(
            "/init",
            json!({"env": {"GREETING": "hello"}, "sandbox_id": "sb_second", "clock_ms": now_ms}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(
        ["set", "not_permitted"].contains(&v["clock"].as_str().unwrap()),
        "{v}"
    );
    let r = c
        .run(json!({"cmd": "sh", "args": ["-c", "echo \"$GREETING ${OLD_ONLY:-gone}\""]}))
        .await;
    assert_eq!(r.out(), "hello gone\n");
    assert_eq!(
        std::fs::read_to_string(run.join("sandbox_id")).unwrap(),
        "sb_second"
    );
    assert!(!run.join("template_id").exists());
    assert!(!run.join("left-behind").exists());
    assert_eq!(
        std::fs::read_to_string(run.join("env")).unwrap(),
        "GREETING=hello\n"
    );

    // Default user from init.
    if nix::unistd::geteuid().is_root() {
        let (status, _) = c
            .post("/init", json!({"user": "nobody", "workdir": "/"}))
            .await;
        assert_eq!(status, StatusCode::OK);
        let r = c.run(json!({"cmd": "id", "args": ["-un"]})).await;
        assert_eq!(r.out(), "nobody\n");
    }
    for (body, code) in [
        (json!({"user": "no-such-user-thaw"}), "unknown_user"),
        (json!({"workdir": "relative"}), "invalid_workdir"),
        (json!({"entropy": "%%%"}), "invalid_json"),
        (json!({"sandbox_id": "a/b"}), "invalid_id"),
        (json!({"env": ["A=1"]}), "invalid_json"),
    ] {
        let (status, v) = c.post("/init", body.clone()).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{body}"
        );
    }
}

#[tokio::test]
async fn metrics_report_cpu_memory_disk() {
    let envd = Envd::start();
    let (status, v) = envd.client.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let total = v["mem_total_bytes"].as_u64().unwrap();
    let avail = v["mem_available_bytes"].as_u64().unwrap();
    assert!(total > 0 && avail <= total);
    assert_eq!(v["mem_used_bytes"].as_u64().unwrap(), total - avail);
    assert!(v["disk_total_bytes"].as_u64().unwrap() >= v["disk_used_bytes"].as_u64().unwrap());
    assert!(v["cpu_count"].as_u64().unwrap() >= 1);
    let pct = v["cpu_used_pct"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&pct), "{pct}");
    let (_, version) = envd.client.get("/version").await;
    assert_eq!(version["name"], "envd");
}

/// An echo server on loopback; returns its port.
async fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn ports_are_listed_and_tunnels_carry_bytes() {
    let envd = Envd::start();
    let c = &envd.client;
    let port = echo_server().await;
    let (_, v) = c.get("/ports").await;
    assert!(
        v["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == port),
        "{v}"
    );

    // Upgrade: tcp over HTTP/1.1.
    let stream = UnixStream::connect(&c.sock).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = Request::get(format!("http://envd/ports/{port}/tunnel"))
        .header("host", "envd")
        .header("connection", "upgrade")
        .header("upgrade", "tcp")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"ping through the tunnel").await.unwrap();
    let mut buf = [0u8; 23];
    tokio::time::timeout(T, io.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping through the tunnel");

    // CONNECT over HTTP/1.1.
    let stream = UnixStream::connect(&c.sock).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = Request::connect(format!("127.0.0.1:{port}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"connect").await.unwrap();
    let mut buf = [0u8; 7];
    tokio::time::timeout(T, io.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"connect");

    // CONNECT over HTTP/2 (a stream of the connection becomes the tunnel).
    let mut h2 = common::h2_sender(&c.sock).await;
    let req = Request::connect(format!("127.0.0.1:{port}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"over h2").await.unwrap();
    let mut buf = [0u8; 7];
    tokio::time::timeout(T, io.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"over h2");

    // Refusals: nothing listening, no upgrade header, bad port, foreign host.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (status, v) = c
        .call(Method::GET, &format!("/ports/{closed}/tunnel"), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let resp = {
        let stream = UnixStream::connect(&c.sock).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        let req = Request::get(format!("http://envd/ports/{closed}/tunnel"))
            .header("host", "envd")
            .header("connection", "upgrade")
            .header("upgrade", "tcp")
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.send_request(req).await.unwrap()
    };
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let (status, v) = c.get("/ports/notaport/tunnel").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_port"))
    );
    let stream = UnixStream::connect(&c.sock).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let resp = sender
        .send_request(
            Request::connect("example.com:80")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn http2_serves_requests_and_streams() {
    let envd = Envd::start();
    let mut h2 = common::h2_sender(&envd.client.sock).await;
    let resp = h2
        .send_request(
            Request::get("http://envd/health")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = json!({"cmd": "sh", "args": ["-c", "echo over h2"]}).to_string();
    let resp = h2
        .send_request(
            Request::post("http://envd/processes")
                .body(Full::new(Bytes::from(body)))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut s = common::EventStream::new(resp.into_body());
    let r = s.collect_run(T).await;
    assert_eq!(r.out(), "over h2\n");
    let bad = h2
        .send_request(
            Request::post("http://envd/processes")
                .body(Full::new(Bytes::from_static(b"{")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let v: Value =
        serde_json::from_slice(&bad.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["code"], "invalid_json");
}

/// The host side of dial-out: a Unix listener whose accepted connections are
/// HTTP clients of envd.
struct Host {
    listener: UnixListener,
}

impl Host {
    fn bind(path: &Path) -> Host {
        let _ = std::fs::remove_file(path);
        Host {
            listener: UnixListener::bind(path).unwrap(),
        }
    }

    /// Accepts one connection from envd and makes it an HTTP/1.1 client.
    async fn accept(
        &self,
    ) -> (
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        tokio::task::JoinHandle<()>,
    ) {
        let (stream, _) = tokio::time::timeout(T, self.listener.accept())
            .await
            .expect("envd did not dial")
            .unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let done = tokio::spawn(async move {
            let _ = conn.await;
        });
        (sender, done)
    }
}

async fn call(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: Method,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://envd{path}"))
        .header("host", "envd")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn start_dialing(dir: &Path, sock: &Path, connections: usize) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_envd"))
        .arg("--dial")
        .arg(sock)
        .args(["--connections", &connections.to_string()])
        .arg("--run-dir")
        .arg(dir.join("run"))
        .args(["--drop-caches", "false"])
        .env("RUST_LOG", "envd=info")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn dial_out_survives_a_host_that_drops_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("host.sock");
    // envd starts before the host listens: it keeps retrying.
    let _envd = KillOnDrop(start_dialing(dir.path(), &sock, 2));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let host = Host::bind(&sock);
    let (mut a, _) = host.accept().await;
    let (mut b, _) = host.accept().await;
    let (status, v) = call(&mut a, Method::GET, "/health", Value::Null).await;
    assert_eq!((status, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (status, _) = call(&mut b, Method::GET, "/version", Value::Null).await;
    assert_eq!(status, StatusCode::OK);

    // The host goes away (listener and connections), then comes back.
    drop((a, b, host));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let host = Host::bind(&sock);
    let (mut a, _) = host.accept().await;
    let (status, v) = call(
        &mut a,
        Method::POST,
        "/processes",
        json!({"cmd": "echo", "args": ["back"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn snapshot_prepare_closes_every_connection_until_the_host_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("host.sock");
    let host = Host::bind(&sock);
    let _envd = KillOnDrop(start_dialing(dir.path(), &sock, 3));
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(host.accept().await);
    }
    let (mut first, first_done) = conns.remove(0);
    // A background process keeps running across the prepare.
    let (status, _) = call(
        &mut first,
        Method::POST,
        "/processes",
        json!({"cmd": "sleep", "args": ["30"], "background": true, "tag": "keep"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, v) = call(&mut first, Method::POST, "/snapshot/prepare", Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["caches_dropped"], false);
    assert_eq!(v["running_processes"], 1);
    assert!(v["mem_total_bytes"].as_u64().unwrap() > 0);
    assert!(v["envd_rss_bytes"].as_u64().unwrap() > 0);

    // Every connection, the one that carried the answer included, closes.
    for done in std::iter::once(first_done).chain(conns.into_iter().map(|(_, d)| d)) {
        tokio::time::timeout(T, done)
            .await
            .expect("connection stayed open")
            .unwrap();
    }
    // While the host socket still listens, envd does not hold a connection:
    // probes connect and close at once.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Ok((mut s, _))) =
            tokio::time::timeout(Duration::from_millis(50), host.listener.accept()).await
        {
            let mut buf = [0u8; 1];
            let n = tokio::time::timeout(T, s.read(&mut buf))
                .await
                .expect("probe stayed open")
                .unwrap_or(0);
            assert_eq!(n, 0, "envd sent a request on a probe");
        }
    }
    drop(first);

    // The host takes its checkpoint with its socket gone, then restores with
    // a new socket: envd dials again.
    drop(host);
    std::fs::remove_file(&sock).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let host = Host::bind(&sock);
    let (mut c, _) = host.accept().await;
    let (_, h) = call(&mut c, Method::GET, "/health", Value::Null).await;
    assert_eq!(h["quiesced"], true);
    assert_eq!(h["port_scanner"], "stopped");
    let (status, v) = call(
        &mut c,
        Method::POST,
        "/init",
        json!({"sandbox_id": "sb_restored"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["resumed"], true);
    let (_, h) = call(&mut c, Method::GET, "/health", Value::Null).await;
    assert_eq!(
        (h["quiesced"].as_bool(), h["port_scanner"].as_str()),
        (Some(false), Some("running"))
    );
    let (_, p) = call(&mut c, Method::GET, "/processes/keep", Value::Null).await;
    assert_eq!(p["running"], true, "{p}");
    // Prepare is idempotent.
    let (status, _) = call(&mut c, Method::POST, "/snapshot/prepare", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
}
