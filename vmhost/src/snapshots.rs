//! Stored snapshots: a checkpoint image directory and its metadata
//! (`snapshot.json`). Template snapshots live beside the template's build
//! metadata (`<data>/templates/<name>/snapshot/`), user snapshots under
//! `<data>/snapshots/<snap_id>/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::driver::Limits;
use crate::error::HostError;

/// The metadata of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// `snap_…`.
    pub snapshot_id: String,
    /// The template the snapshotted sandbox came from.
    pub template: String,
    /// The template's content hash.
    pub template_hash: String,
    /// What the image depends on: template hash, envd, driver version.
    pub key: String,
    /// The driver that wrote it.
    pub driver: String,
    /// The root filesystem it runs on.
    pub rootfs: PathBuf,
    /// The envd directory it was taken with (bind-mounted again on restore).
    pub envd_dir: PathBuf,
    /// Default user of processes.
    pub user: Option<String>,
    /// Default working directory.
    pub workdir: Option<PathBuf>,
    /// Environment of processes.
    pub env: BTreeMap<String, String>,
    /// Limits of the snapshotted sandbox (the defaults of restores).
    pub limits: Limits,
    /// Whether a warm runner waits for a job in it.
    pub runner_ready: bool,
    /// The sandbox it was taken from.
    pub source_sandbox: Option<String>,
    /// User metadata of that sandbox.
    pub metadata: BTreeMap<String, String>,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// How long the checkpoint took.
    pub checkpoint_ms: u64,
    /// RFC 3339.
    pub created_at: String,
}

/// The metadata file in a snapshot directory.
pub const META: &str = "snapshot.json";
/// The image directory in a snapshot directory.
pub const IMAGE: &str = "image";

/// Reads the snapshot in `dir`.
pub fn load(dir: &Path) -> Result<SnapshotMeta, HostError> {
    let path = dir.join(META);
    let bytes = std::fs::read(&path)
        .map_err(|e| HostError::Internal(format!("read {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| HostError::Internal(format!("parse {}: {e}", path.display())))
}

/// Writes the metadata of the snapshot in `dir` (temp file, fsync,
/// rename: a crash leaves the old file or the new one).
pub fn store(dir: &Path, meta: &SnapshotMeta) -> Result<(), HostError> {
    let tmp = dir.join(format!("{META}.tmp"));
    let body = serde_json::to_vec_pretty(meta)
        .map_err(|e| HostError::Internal(format!("encode snapshot metadata: {e}")))?;
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(META))
    };
    write().map_err(|e| HostError::Internal(format!("write {}: {e}", dir.display())))
}

/// Checks that `id` looks like a snapshot id (so it can name a directory).
pub fn valid_id(id: &str) -> bool {
    id.strip_prefix("snap_").is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 64 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// The directory of user snapshot `id` under `data_dir`.
pub fn user_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("snapshots").join(id)
}

/// The directory of template `name`'s snapshot under `data_dir`.
pub fn template_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("templates").join(name).join("snapshot")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_escape_the_snapshots_directory() {
        assert!(valid_id("snap_abc123"));
        assert!(!valid_id("snap_"));
        assert!(!valid_id("snap_../x"));
        assert!(!valid_id("../snap_a"));
        assert!(!valid_id("sb_abc"));
    }

    #[test]
    fn metadata_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SnapshotMeta {
            snapshot_id: "snap_1".into(),
            template: "python".into(),
            template_hash: "h".into(),
            key: "k".into(),
            driver: "gvisor".into(),
            rootfs: "/r".into(),
            envd_dir: "/e".into(),
            user: Some("sandbox".into()),
            workdir: None,
            env: BTreeMap::from([("A".into(), "1".into())]),
            limits: Limits::default(),
            runner_ready: true,
            source_sandbox: None,
            metadata: BTreeMap::new(),
            size_bytes: 3,
            checkpoint_ms: 4,
            created_at: "2026-12-01T00:00:00Z".into(),
        };
        store(dir.path(), &meta).unwrap();
        assert_eq!(load(dir.path()).unwrap(), meta);
    }
}
