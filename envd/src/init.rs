//! `POST /init`: the sandbox's identity, environment, default user and
//! working directory; after a restore also fresh entropy and the clock.
//!
//! Every call replaces the whole session: nothing of a previous identity
//! survives, neither in memory nor in the files under the run directory.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::json::{b64, ApiJson};
use crate::state::{AppState, Session};
use crate::user::Identity;

/// `POST /init`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitRequest {
    /// Environment variables for every later process (replacing earlier ones).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Default user of processes and file operations.
    pub user: Option<String>,
    /// Default working directory (created if missing).
    pub workdir: Option<PathBuf>,
    /// The sandbox's id.
    pub sandbox_id: Option<String>,
    /// The template's id.
    pub template_id: Option<String>,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Bytes mixed into the kernel's entropy pool, base64.
    #[serde(default, deserialize_with = "b64::option::deserialize")]
    pub entropy: Option<Vec<u8>>,
    /// The host's wall clock, milliseconds since the Unix epoch.
    pub clock_ms: Option<u64>,
}

/// What `/init` did.
#[derive(Debug, Serialize)]
pub struct InitResponse {
    /// The sandbox id now in force.
    pub sandbox_id: Option<String>,
    /// Bytes of entropy written to the kernel.
    pub entropy_bytes: usize,
    /// `set`, `not_permitted`, or `not_sent`.
    pub clock: &'static str,
    /// Whether background work stopped by a prepare was restarted.
    pub resumed: bool,
}

/// `POST /init`.
pub async fn init(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<InitRequest>,
) -> Result<Json<InitResponse>, ApiError> {
    if let Some(user) = req.user.as_deref() {
        Identity::lookup(user)?;
    }
    for id in [&req.sandbox_id, &req.template_id].into_iter().flatten() {
        if id.is_empty() || id.len() > 128 || id.contains(['/', '\0']) {
            return Err(ApiError::bad_request(
                "invalid_id",
                "sandbox_id/template_id: 1-128 characters, no '/'",
            ));
        }
    }
    if let Some(dir) = req.workdir.as_deref() {
        if !dir.is_absolute() {
            return Err(ApiError::bad_request(
                "invalid_workdir",
                "workdir: must be an absolute path",
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| ApiError::io("create workdir", dir, &e))?;
    }
    let entropy_bytes = match req.entropy.as_deref() {
        Some(bytes) if !bytes.is_empty() => {
            seed_entropy(bytes).map_err(|e| ApiError::internal(format!("seeding entropy: {e}")))?;
            bytes.len()
        }
        _ => 0,
    };
    let clock = match req.clock_ms {
        None => "not_sent",
        Some(ms) => set_clock(ms),
    };
    let session = Session {
        env: req.env,
        user: req.user,
        workdir: req.workdir,
        sandbox_id: req.sandbox_id,
        template_id: req.template_id,
        metadata: req.metadata,
    };
    write_identity(&state.config.run_dir, &session).map_err(|e| {
        ApiError::internal(format!("writing {}: {e}", state.config.run_dir.display()))
    })?;
    let sandbox_id = session.sandbox_id.clone();
    *state
        .session
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = session;
    let resumed = state
        .quiesce
        .quiesced
        .swap(false, std::sync::atomic::Ordering::SeqCst);
    state.scanner.start();
    tracing::info!(sandbox_id = ?sandbox_id, resumed, "initialised");
    Ok(Json(InitResponse {
        sandbox_id,
        entropy_bytes,
        clock,
        resumed,
    }))
}

/// Replaces everything under `run_dir` with the session's identity files:
/// `sandbox_id`, `template_id`, `metadata.json`, `env`.
fn write_identity(run_dir: &Path, session: &Session) -> std::io::Result<()> {
    std::fs::create_dir_all(run_dir)?;
    for entry in std::fs::read_dir(run_dir)? {
        let path = entry?.path();
        if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    if let Some(id) = &session.sandbox_id {
        std::fs::write(run_dir.join("sandbox_id"), id)?;
    }
    if let Some(id) = &session.template_id {
        std::fs::write(run_dir.join("template_id"), id)?;
    }
    let metadata = serde_json::to_vec_pretty(&session.metadata).map_err(std::io::Error::other)?;
    std::fs::write(run_dir.join("metadata.json"), metadata)?;
    let mut env = std::fs::File::create(run_dir.join("env"))?;
    for (k, v) in &session.env {
        writeln!(env, "{k}={v}")?;
    }
    Ok(())
}

/// Mixes bytes into the kernel's entropy pool. A write to /dev/urandom
/// stirs the pool without crediting it, which is all a restored sandbox
/// needs: its pool no longer repeats the snapshot's.
fn seed_entropy(bytes: &[u8]) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?
        .write_all(bytes)
}

fn set_clock(ms: u64) -> &'static str {
    let ts = nix::sys::time::TimeSpec::new(
        i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        i64::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    );
    match nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts) {
        Ok(()) => "set",
        Err(e) => {
            tracing::debug!(error = %e, "clock not set");
            "not_permitted"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_files_replace_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("stale-dir")).unwrap();
        std::fs::write(dir.path().join("stale"), "old").unwrap();
        let mut s = Session {
            sandbox_id: Some("sb_new".into()),
            ..Session::default()
        };
        s.env.insert("A".into(), "1".into());
        write_identity(dir.path(), &s).unwrap();
        assert!(!dir.path().join("stale").exists());
        assert!(!dir.path().join("stale-dir").exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("sandbox_id")).unwrap(),
            "sb_new"
        );
        assert!(!dir.path().join("template_id").exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("env")).unwrap(),
            "A=1\n"
        );
    }
}
