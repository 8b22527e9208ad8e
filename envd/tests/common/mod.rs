//! Test harness: envd started as a real process on a temporary Unix socket,
//! and a small HTTP client over that socket (HTTP/1.1, one connection per
//! request, plus HTTP/2 where a test asks for it).

#![allow(dead_code)] // each test file uses a different part of this module

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::UnixStream;

/// A running envd and its temporary directory.
pub struct Envd {
    child: Child,
    /// The temporary directory (socket, run dir, scratch files).
    pub dir: tempfile::TempDir,
    /// The client bound to its socket.
    pub client: Client,
}

impl Envd {
    /// Starts envd listening on `<tmp>/envd.sock`.
    pub fn start() -> Envd {
        Envd::start_with(&[])
    }

    /// Starts envd with extra flags.
    pub fn start_with(extra: &[&str]) -> Envd {
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("envd.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_envd"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .args(["--drop-caches", "false"])
            .args(extra)
            .env("RUST_LOG", "envd=info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn envd");
        // The socket file appears at bind, a moment before listen: wait
        // until a connection is accepted, not just for the file.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "envd did not listen on its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Envd {
            child,
            client: Client { sock },
            dir,
        }
    }

    /// envd's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// envd's resident memory, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client over a Unix socket.
#[derive(Clone)]
pub struct Client {
    /// The socket.
    pub sock: PathBuf,
}

/// The events of one finished process stream.
#[derive(Debug)]
pub struct Run {
    /// Every event, in order.
    pub events: Vec<Value>,
    /// Concatenated stdout.
    pub stdout: Vec<u8>,
    /// Concatenated stderr.
    pub stderr: Vec<u8>,
    /// The exit event.
    pub exit: Value,
}

impl Run {
    /// stdout as text.
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Decodes a base64 `data` field.
pub fn b64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("data is a string"))
        .expect("valid base64")
}

/// Encodes bytes as base64.
pub fn enc(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

impl Client {
    /// Sends one request on a fresh HTTP/1.1 connection.
    pub async fn send(&self, method: Method, path: &str, body: Bytes) -> http::Response<Incoming> {
        let stream = UnixStream::connect(&self.sock).await.expect("connect envd");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn.with_upgrades());
        let req = Request::builder()
            .method(method)
            .uri(format!("http://envd{path}"))
            .header("host", "envd")
            .body(Full::new(body))
            .expect("request");
        sender.send_request(req).await.expect("send request")
    }

    /// A JSON request; the status and the JSON (or `null`) answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let (status, bytes) = self.raw(method, path, body).await;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
        };
        (status, value)
    }

    /// Any request; the status and the whole body.
    pub async fn raw(&self, method: Method, path: &str, body: Bytes) -> (StatusCode, Bytes) {
        let resp = self.send(method, path, body).await;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, bytes)
    }

    /// `GET`, JSON answer.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    /// `POST`, JSON both ways.
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    /// Starts a foreground process and reads its stream to the end.
    pub async fn run(&self, body: Value) -> Run {
        let resp = self
            .send(Method::POST, "/processes", Bytes::from(body.to_string()))
            .await;
        assert_eq!(resp.status(), StatusCode::OK, "start failed");
        let mut s = EventStream::new(resp.into_body());
        s.collect_run(Duration::from_secs(60)).await
    }

    /// Opens an event stream (a foreground start or a reconnect).
    pub async fn stream(&self, method: Method, path: &str, body: Option<Value>) -> EventStream {
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let resp = self.send(method, path, body).await;
        assert_eq!(resp.status(), StatusCode::OK, "stream {path} refused");
        EventStream::new(resp.into_body())
    }
}

/// NDJSON events read one at a time as they arrive.
pub struct EventStream {
    body: Incoming,
    buf: BytesMut,
    done: bool,
    seen_start: bool,
}

impl EventStream {
    /// Wraps a response body.
    pub fn new(body: Incoming) -> EventStream {
        EventStream {
            body,
            buf: BytesMut::new(),
            done: false,
            seen_start: false,
        }
    }

    /// The next event, or `None` at the end of the stream. Panics after
    /// `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(i + 1);
                let ev: Value = serde_json::from_slice(&line[..i]).expect("event is JSON");
                if ev["type"] == "start" {
                    assert!(!self.seen_start, "two start events");
                    self.seen_start = true;
                } else {
                    assert!(self.seen_start, "an event before start: {ev}");
                }
                return Some(ev);
            }
            if self.done {
                assert!(self.buf.is_empty(), "stream ended mid-line");
                return None;
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .expect("timed out waiting for an event");
            match frame {
                None => self.done = true,
                Some(f) => {
                    if let Ok(data) = f.expect("body frame").into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// Reads events until stdout contains `needle`; returns stdout so far.
    pub async fn until_stdout(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = self.next(left).await.unwrap_or_else(|| {
                panic!(
                    "stream ended before {needle:?}; got {:?}",
                    String::from_utf8_lossy(&out)
                )
            });
            if ev["type"] == "stdout" {
                out.extend(b64(&ev["data"]));
                if String::from_utf8_lossy(&out).contains(needle) {
                    return String::from_utf8_lossy(&out).into_owned();
                }
            }
        }
    }

    /// Reads to the end; checks that the stream starts with `start` and
    /// ends with exactly one `exit`.
    pub async fn collect_run(&mut self, timeout: Duration) -> Run {
        let mut events = Vec::new();
        while let Some(ev) = self.next(timeout).await {
            events.push(ev);
        }
        assert!(!events.is_empty(), "empty stream");
        assert!(self.seen_start, "no start event");
        let exit = events.last().cloned().expect("events");
        assert_eq!(exit["type"], "exit", "last event: {exit:?}");
        assert_eq!(
            events.iter().filter(|e| e["type"] == "exit").count(),
            1,
            "exactly one exit"
        );
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        for e in &events {
            match e["type"].as_str() {
                Some("stdout") => stdout.extend(b64(&e["data"])),
                Some("stderr") => stderr.extend(b64(&e["data"])),
                _ => {}
            }
        }
        Run {
            events,
            stdout,
            stderr,
            exit,
        }
    }
}

/// An HTTP/2 connection over a Unix socket.
pub async fn h2_sender(sock: &Path) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = UnixStream::connect(sock).await.expect("connect envd");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// Waits until `f` is true or `timeout` passes; returns whether it became true.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}
