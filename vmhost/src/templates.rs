//! Templates: a runtime recipe built into a root filesystem (crate
//! `template`), then baked into a snapshot: boot → envd dials in → START
//! (the warm runner) → READY → `/snapshot/prepare` → checkpoint. Every
//! sandbox of the template is a restore of that snapshot.
//!
//! Progress is a stream of JSON events: the builder's own (`started`,
//! `step`, `output`, `step_done`, `cached`, `finished`), then `bake`
//! events, then exactly one terminal `result` or `error`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::driver::{Boot, Driver, Limits};
use crate::error::HostError;
use crate::host::{new_id, Host, InitArgs, SnapshotOrigin, StartArgs};
use crate::snapshots::{self, SnapshotMeta};

/// Whether `name` can name a template (a runtime folder).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !name.starts_with('-')
}

/// A template as `GET /templates` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateView {
    /// Name.
    pub name: String,
    /// Whether runtimes/ has its recipe (so it can be built).
    pub has_recipe: bool,
    /// Its snapshot, once built.
    pub snapshot: Option<SnapshotMeta>,
    /// Whether the snapshot was taken with another envd or driver version
    /// than this vmhost's (it still restores; a rebuild refreshes it).
    pub stale: bool,
}

/// The part of a snapshot key that is not the template: envd and driver.
fn runtime_key(host: &Host) -> String {
    use sha2::Digest as _;
    let (_, envd_hash) = host.envd();
    let described = serde_json::to_string(&host.driver().describe()).unwrap_or_default();
    let d = sha2::Sha256::digest(described.as_bytes());
    format!("{envd_hash}-{}", hex::encode(&d[..4]))
}

/// Every template: runtimes with a recipe and templates with a snapshot.
pub fn list(host: &Host) -> Vec<TemplateView> {
    let cfg = host.config();
    let mut names: Vec<String> = Vec::new();
    for dir in [&cfg.build.runtimes_dir, &cfg.data_dir.join("templates")] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            names.extend(
                rd.filter_map(Result::ok)
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| valid_name(n)),
            );
        }
    }
    names.sort();
    names.dedup();
    let rk = runtime_key(host);
    names
        .into_iter()
        .filter_map(|name| {
            let has_recipe = cfg.build.runtimes_dir.join(&name).join("recipe").is_file();
            let snapshot = snapshots::load(&snapshots::template_dir(&cfg.data_dir, &name)).ok();
            if !has_recipe && snapshot.is_none() {
                return None;
            }
            let stale = snapshot.as_ref().is_some_and(|m| !m.key.ends_with(&rk));
            Some(TemplateView {
                name,
                has_recipe,
                snapshot,
                stale,
            })
        })
        .collect()
}

/// Sends one progress event; a client that went away does not stop the
/// build (it finishes and is cached for the next request).
async fn emit(tx: &mpsc::Sender<Value>, v: Value) {
    let _ = tx.send(v).await;
}

/// Builds template `name` (root filesystem, then the snapshot) with
/// progress on `tx`. An unchanged template with a current snapshot is
/// done at once unless `force`.
pub async fn build(
    host: &Arc<Host>,
    name: &str,
    force: bool,
    tx: mpsc::Sender<Value>,
) -> Result<SnapshotMeta, HostError> {
    if !valid_name(name) {
        return Err(HostError::BadRequest(format!(
            "name: {name:?} is not a template name (lowercase letters, digits, - and _)"
        )));
    }
    let cfg = host.config().clone();
    if !cfg.build.runtimes_dir.join(name).join("recipe").is_file() {
        return Err(HostError::TemplateNotFound(name.to_string()));
    }
    let _one_at_a_time = host.builds().lock().await;
    let started = Instant::now();

    // 1. The root filesystem (blocking: debootstrap and runsc steps).
    let (etx, mut erx) = mpsc::unbounded_channel::<Value>();
    let build_cfg = cfg.build.clone();
    let owned = name.to_string();
    let builder = tokio::task::spawn_blocking(move || {
        template::builder::build(&owned, &build_cfg, &mut |e| {
            let _ = etx.send(serde_json::to_value(e).unwrap_or(Value::Null));
        })
        .map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            msg
        })
    });
    while let Some(ev) = erx.recv().await {
        emit(&tx, ev).await;
    }
    let tpl = builder
        .await
        .map_err(|e| HostError::Internal(format!("build task: {e}")))?
        .map_err(HostError::BuildFailed)?;

    // 2. A current snapshot is kept.
    let key = format!("{}-{}", tpl.hash, runtime_key(host));
    let dir = snapshots::template_dir(&cfg.data_dir, name);
    if !force {
        if let Ok(meta) = snapshots::load(&dir) {
            if meta.key == key && dir.join(snapshots::IMAGE).is_dir() {
                emit(
                    &tx,
                    json!({"type": "bake", "phase": "cached", "template": name}),
                )
                .await;
                return Ok(meta);
            }
        }
    }

    // 3. Bake: boot, START, READY, snapshot.
    let s = &tpl.summary;
    let d = cfg.default_limits;
    let limits = Limits {
        memory_bytes: s.limits.memory_bytes.unwrap_or(d.memory_bytes),
        cpu_millis: s.limits.cpu_millis.unwrap_or(d.cpu_millis),
        pids: s.limits.pids.unwrap_or(d.pids),
        disk_bytes: s.limits.disk_bytes.unwrap_or(d.disk_bytes),
        timeout_ms: s.limits.timeout_ms.unwrap_or(d.timeout_ms),
    };
    let (envd_dir, _) = host.envd();
    let origin = SnapshotOrigin {
        template_hash: tpl.hash.clone(),
        key: key.clone(),
        rootfs: tpl.rootfs.clone(),
        envd_dir: envd_dir.to_path_buf(),
        user: s.user.clone(),
        workdir: s.workdir.clone(),
        env: s.env.clone(),
    };
    emit(
        &tx,
        json!({"type": "bake", "phase": "boot", "template": name}),
    )
    .await;
    let t_boot = Instant::now();
    let sb = host
        .start(StartArgs {
            template: name.to_string(),
            snapshot_id: None,
            // The bake itself may take long (READY); no wall-time limit.
            limits: Limits {
                timeout_ms: 0,
                ..limits
            },
            metadata: BTreeMap::from([("purpose".to_string(), "bake".to_string())]),
            boot: Boot::Cold {
                rootfs: tpl.rootfs.clone(),
            },
            envd_dir: envd_dir.to_path_buf(),
            init: InitArgs {
                env: s.env.clone(),
                user: s.user.clone(),
                workdir: s.workdir.clone(),
            },
            runner_ready: false,
            origin,
        })
        .await?;
    emit(
        &tx,
        json!({"type": "bake", "phase": "booted", "sandbox_id": sb.id(), "elapsed_ms": ms(t_boot.elapsed())}),
    )
    .await;
    let baked = bake(host, &sb, &tpl, &tx).await;
    if let Err(e) = baked {
        host.destroy_in_background(&sb, crate::driver::ExitReason::Failed);
        return Err(e);
    }

    // 4. Snapshot into a fresh directory, then swap it in (a restore
    // reading the old image keeps its files: they are removed later).
    emit(&tx, json!({"type": "bake", "phase": "checkpoint"})).await;
    let fresh = dir.with_file_name(format!("snapshot.new-{}", std::process::id()));
    let snap_id = new_id("snap");
    let mut meta = host.snapshot_into(&sb, &fresh, &snap_id).await?;
    meta.limits = limits;
    snapshots::store(&fresh, &meta)?;
    let old = dir.with_file_name(format!("snapshot.old-{}", new_id("x")));
    if dir.exists() {
        std::fs::rename(&dir, &old)
            .map_err(|e| HostError::Internal(format!("move the old snapshot aside: {e}")))?;
    }
    std::fs::rename(&fresh, &dir)
        .map_err(|e| HostError::Internal(format!("put the new snapshot in place: {e}")))?;
    if old.exists() {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let _ = std::fs::remove_dir_all(old);
        });
    }
    host.metrics
        .op_duration
        .with_label_values(&["bake"])
        .observe(started.elapsed().as_secs_f64());
    emit(
        &tx,
        json!({"type": "bake", "phase": "done", "size_bytes": meta.size_bytes, "checkpoint_ms": meta.checkpoint_ms,
               "elapsed_ms": ms(started.elapsed())}),
    )
    .await;
    Ok(meta)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn argv(c: &template::recipe::Command) -> Vec<String> {
    match c {
        template::recipe::Command::Exec(v) => v.clone(),
        template::recipe::Command::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
    }
}

/// Starts the warm runner and waits for READY.
async fn bake(
    host: &Arc<Host>,
    sb: &Arc<crate::host::Sandbox>,
    tpl: &template::builder::Template,
    tx: &mpsc::Sender<Value>,
) -> Result<(), HostError> {
    let s = &tpl.summary;
    let Some(start) = &s.start else {
        return Ok(());
    };
    let argv_start = argv(start);
    let Some((cmd, args)) = argv_start.split_first() else {
        return Err(HostError::BuildFailed("START is empty".into()));
    };
    emit(
        tx,
        json!({"type": "bake", "phase": "start", "command": argv_start}),
    )
    .await;
    let (status, body) = host
        .envd_json(
            sb,
            http::Method::POST,
            "/processes",
            &json!({"cmd": cmd, "args": args, "env": s.env, "user": s.user, "cwd": s.workdir,
                    "background": true, "tag": "runner"}),
            Duration::from_secs(30),
        )
        .await?;
    if !status.is_success() {
        return Err(HostError::BuildFailed(format!(
            "START failed: {status} {}",
            String::from_utf8_lossy(&body)
        )));
    }
    if let Some((ready, timeout_ms)) = &s.ready {
        let argv_ready = argv(ready);
        let Some((cmd, args)) = argv_ready.split_first() else {
            return Err(HostError::BuildFailed("READY is empty".into()));
        };
        emit(tx, json!({"type": "bake", "phase": "ready", "command": argv_ready, "timeout_ms": timeout_ms})).await;
        let deadline = Instant::now() + Duration::from_millis(*timeout_ms);
        let t0 = Instant::now();
        let mut attempts = 0u32;
        let last = loop {
            attempts += 1;
            let (status, body) = host
                .envd_json(
                    sb,
                    http::Method::POST,
                    "/processes",
                    &json!({"cmd": cmd, "args": args, "env": s.env, "user": s.user, "cwd": s.workdir,
                            "timeout_ms": 10_000}),
                    Duration::from_secs(30),
                )
                .await?;
            let code = exit_code(&body);
            if status.is_success() && code == Some(0) {
                break None;
            }
            if Instant::now() > deadline {
                break Some(format!(
                    "READY did not succeed within {timeout_ms} ms ({attempts} tries; last: {status}, exit {code:?})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if let Some(msg) = last {
            return Err(HostError::BuildFailed(msg));
        }
        emit(
            tx,
            json!({"type": "bake", "phase": "ready_ok", "attempts": attempts, "elapsed_ms": ms(t0.elapsed())}),
        )
        .await;
    }
    host.set_runner_ready(sb, true);
    Ok(())
}

/// The exit code in an NDJSON process stream.
fn exit_code(body: &[u8]) -> Option<i64> {
    body.split(|&b| b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .find(|v| v["type"] == "exit")
        .and_then(|v| v["code"].as_i64())
}

/// The template snapshot directory of `name` (for tests and benches).
pub fn snapshot_dir(host: &Host, name: &str) -> PathBuf {
    snapshots::template_dir(&host.config().data_dir, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_folder_names_only() {
        assert!(valid_name("python-data"));
        assert!(valid_name("node"));
        assert!(!valid_name("../etc"));
        assert!(!valid_name("Python"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
        assert!(!valid_name("a/b"));
    }

    #[test]
    fn exit_codes_are_read_from_process_streams() {
        let body = b"{\"type\":\"start\",\"pid\":3}\n{\"type\":\"exit\",\"code\":0}\n";
        assert_eq!(exit_code(body), Some(0));
        assert_eq!(exit_code(b"{\"type\":\"stdout\"}\n"), None);
    }
}
