//! envd's hot paths over a Unix socket, each beside its floor:
//! - running `/bin/true` through envd (POST /processes, stream to `exit`)
//!   against spawning `/bin/true` directly;
//! - a 64 MiB file round trip (PUT then GET) against pushing 64 MiB
//!   through `cat` and a pipe.
//!
//! Needs the release envd beside this binary:
//! `cargo build --release -p envd && cargo run --release -p bench --bin envd-bench`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::{Report, Row, Summary};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

const EXEC_RUNS: usize = 400;
const EXEC_WARMUP: usize = 30;
const FILE_BYTES: usize = 64 << 20;
const FILE_RUNS: usize = 7;

struct Envd {
    child: std::process::Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn envd_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this benchmark")?;
    let bin = exe
        .parent()
        .context("benchmark has no directory")?
        .join("envd");
    if !bin.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release -p envd`",
            bin.display()
        );
    }
    Ok(bin)
}

fn start_envd() -> Result<Envd> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("envd.sock");
    let child = Command::new(envd_binary()?)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .args(["--drop-caches", "false"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting envd")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    // The file appears at bind, a moment before listen: wait for a connect.
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if Instant::now() > deadline {
            bail!("envd did not listen on {}", sock.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(Envd {
        child,
        sock,
        _dir: dir,
    })
}

/// One kept-alive HTTP/1.1 connection, as the host keeps to envd.
async fn connect(sock: &Path) -> Result<SendRequest<Full<Bytes>>> {
    let stream = UnixStream::connect(sock).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn request(
    s: &mut SendRequest<Full<Bytes>>,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<(StatusCode, Bytes)> {
    s.ready().await?;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "envd")
        .body(Full::new(body))?;
    let resp = s.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
}

async fn exec_via_envd(s: &mut SendRequest<Full<Bytes>>) -> Result<Duration> {
    let body = Bytes::from_static(br#"{"cmd":"/bin/true"}"#);
    let t = Instant::now();
    let (status, events) = request(s, Method::POST, "/processes", body).await?;
    let elapsed = t.elapsed();
    if status != StatusCode::OK || !events.windows(14).any(|w| w == br#"{"type":"exit""#) {
        bail!("exec failed: {status} {}", String::from_utf8_lossy(&events));
    }
    Ok(elapsed)
}

fn exec_direct() -> Result<Duration> {
    let t = Instant::now();
    let status = Command::new("/bin/true").status()?;
    let elapsed = t.elapsed();
    if !status.success() {
        bail!("/bin/true failed");
    }
    Ok(elapsed)
}

async fn file_round_trip(
    s: &mut SendRequest<Full<Bytes>>,
    path: &Path,
    data: &Bytes,
) -> Result<Duration> {
    let uri = format!("/files?path={}", path.display());
    let t = Instant::now();
    let (status, body) = request(s, Method::PUT, &uri, data.clone()).await?;
    if status != StatusCode::OK {
        bail!("PUT failed: {status} {}", String::from_utf8_lossy(&body));
    }
    let (status, back) = request(s, Method::GET, &uri, Bytes::new()).await?;
    let elapsed = t.elapsed();
    if status != StatusCode::OK || back != *data {
        bail!("GET failed: {status}, {} bytes", back.len());
    }
    Ok(elapsed)
}

fn cat_round_trip(data: &Bytes) -> Result<Duration> {
    use std::io::{Read, Write};
    let t = Instant::now();
    let mut cat = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = cat.stdin.take().context("cat stdin")?;
    let mut stdout = cat.stdout.take().context("cat stdout")?;
    let input = data.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let mut back = Vec::with_capacity(data.len());
    stdout.read_to_end(&mut back)?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    cat.wait()?;
    let elapsed = t.elapsed();
    if back.len() != data.len() {
        bail!("cat returned {} bytes", back.len());
    }
    Ok(elapsed)
}

/// MiB per second for `bytes` moved in `ms` milliseconds.
fn mib_per_s(bytes: usize, ms: f64) -> f64 {
    #[allow(clippy::cast_precision_loss)] // 64 MiB is far below 2^52.
    let mib = bytes as f64 / f64::from(1u32 << 20);
    mib / (ms / 1e3)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let envd = start_envd()?;
    let mut conn = connect(&envd.sock).await?;

    for _ in 0..EXEC_WARMUP {
        exec_via_envd(&mut conn).await?;
        exec_direct()?;
    }
    // Interleaved, so both see the same machine noise.
    let mut via = Vec::with_capacity(EXEC_RUNS);
    let mut direct = Vec::with_capacity(EXEC_RUNS);
    for _ in 0..EXEC_RUNS {
        via.push(exec_via_envd(&mut conn).await?);
        direct.push(exec_direct()?);
    }
    let via_s = Summary::of(&via).context("no samples")?;
    let direct_s = Summary::of(&direct).context("no samples")?;
    let overhead = via_s.p50_ms - direct_s.p50_ms;

    let data = Bytes::from(
        (0..FILE_BYTES)
            .map(|i| u8::try_from(i % 251).unwrap_or(0))
            .collect::<Vec<u8>>(),
    );
    // A sandbox's writes land in an in-memory overlay: measure on tmpfs
    // where there is one, so the disk is not what is compared with a pipe.
    let shm = Path::new("/dev/shm");
    let scratch = if shm.is_dir() {
        tempfile::tempdir_in(shm)?
    } else {
        tempfile::tempdir()?
    };
    let target = scratch.path().join("round-trip.bin");
    file_round_trip(&mut conn, &target, &data).await?;
    cat_round_trip(&data)?;
    let mut envd_rt = Vec::new();
    let mut cat_rt = Vec::new();
    for _ in 0..FILE_RUNS {
        envd_rt.push(file_round_trip(&mut conn, &target, &data).await?);
        cat_rt.push(cat_round_trip(&data)?);
    }
    let envd_file = Summary::of(&envd_rt).context("no samples")?;
    let cat_file = Summary::of(&cat_rt).context("no samples")?;
    let envd_mib_s = mib_per_s(FILE_BYTES, envd_file.p50_ms);
    let cat_mib_s = mib_per_s(FILE_BYTES, cat_file.p50_ms);
    let ratio = envd_mib_s / cat_mib_s;

    let mut report = Report::new(
        "envd",
        "envd over a Unix socket (one kept-alive HTTP/1.1 connection): exec of /bin/true against spawning it directly, and a 64 MiB file PUT+GET against 64 MiB through cat and a pipe",
    );
    report
        .parameters(serde_json::json!({
            "exec_runs": EXEC_RUNS, "exec_warmup": EXEC_WARMUP,
            "file_bytes": FILE_BYTES, "file_runs": FILE_RUNS,
            "transport": "unix socket, HTTP/1.1 keep-alive",
            "file_dir": scratch.path(),
        }))
        .row(
            Row::new("exec /bin/true via envd", "ms p50", via_s.p50_ms)
                .baseline("spawn /bin/true directly", direct_s.p50_ms)
                .goal(
                    format!("overhead <= 1 ms at p50 (measured {overhead:.3} ms)"),
                    overhead <= 1.0,
                )
                .summaries(Some(via_s.clone()), Some(direct_s.clone())),
        )
        .row(
            Row::new("64 MiB file PUT+GET via envd", "MiB/s", envd_mib_s)
                .baseline("64 MiB through cat and a pipe", cat_mib_s)
                .goal(
                    format!(">= 50% of the pipe (measured {:.0}%)", ratio * 100.0),
                    ratio >= 0.5,
                )
                .summaries(Some(envd_file), Some(cat_file)),
        )
        .note(format!(
            "exec overhead over the floor at p50: {overhead:.3} ms; p90 via envd {:.3} ms vs {:.3} ms direct",
            via_s.p90_ms, direct_s.p90_ms
        ))
        .note("throughput = 64 MiB / round-trip wall time (median); the envd round trip is an upload then a download, the pipe's runs both at once");
    report.finish()?;
    Ok(())
}
