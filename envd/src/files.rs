//! The `/files` routes: read and write files as streams, list, stat, mkdir,
//! remove, move; every operation as the request's user (see `fsid`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::fsid;
use crate::json::ApiJson;
use crate::state::AppState;
use crate::user::Identity;

/// Chunk size of file streams.
const CHUNK: usize = 256 << 10;
/// Chunks in flight between the disk thread and the connection.
const CHUNKS_IN_FLIGHT: usize = 64;
/// Deepest listing `/files/list` walks.
const MAX_DEPTH: u32 = 32;
/// Most entries one listing returns.
const MAX_ENTRIES: usize = 100_000;

/// `?path=…&user=…`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    /// The file.
    pub path: String,
    /// Act as this user (default: `/init`'s, else envd's own).
    pub user: Option<String>,
}

/// Who acts and where, resolved for one request.
struct Target {
    who: Identity,
    path: PathBuf,
}

fn resolve(state: &AppState, path: &str, user: Option<&str>) -> Result<Target, ApiError> {
    if path.is_empty() || path.contains('\0') {
        return Err(ApiError::bad_request(
            "invalid_path",
            "path: must be a non-empty path without NUL bytes",
        ));
    }
    let session = state.session();
    let who = match user.or(session.user.as_deref()) {
        Some(u) => Identity::lookup(u)?,
        None => Identity::current(),
    };
    let p = Path::new(path);
    let path = if p.is_absolute() {
        p.to_path_buf()
    } else {
        session
            .workdir
            .clone()
            .unwrap_or_else(|| who.home.clone())
            .join(p)
    };
    Ok(Target { who, path })
}

fn query(q: Result<Query<PathQuery>, QueryRejection>) -> Result<PathQuery, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request("invalid_query", format!("query: {}", e.body_text())))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("file worker failed: {e}")))?
}

/// `GET /files?path=`: the file's bytes as a stream. Only regular files:
/// devices, pipes and sockets are refused (reading `/dev/zero` never ends).
pub async fn read(
    State(state): State<AppState>,
    q: Result<Query<PathQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let Target { who, path } = resolve(&state, &q.path, q.user.as_deref())?;
    let (file, size) = {
        let path = path.clone();
        blocking(move || {
            let file = fsid::run_as(&who, || {
                OpenOptions::new()
                    .read(true)
                    // A FIFO would block the open; non-blocking lets fstat
                    // see it and refuse it.
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&path)
            })
            .map_err(|e| ApiError::io("open", &path, &e))?;
            let meta = file
                .metadata()
                .map_err(|e| ApiError::io("stat", &path, &e))?;
            if meta.is_dir() {
                return Err(ApiError::bad_request(
                    "is_a_directory",
                    format!(
                        "{} is a directory; list it with POST /files/list",
                        path.display()
                    ),
                ));
            }
            if !meta.is_file() {
                return Err(ApiError::bad_request(
                    "not_a_regular_file",
                    format!(
                        "{} is not a regular file (a device, pipe or socket) and cannot be read",
                        path.display()
                    ),
                ));
            }
            Ok((file, meta.len()))
        })
        .await?
    };
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || pump_file(file, &tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(format!("building response: {e}")))
}

fn pump_file(mut file: File, tx: &mpsc::Sender<std::io::Result<Bytes>>) {
    loop {
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
}

/// What `PUT /files` wrote.
#[derive(Debug, Serialize)]
pub struct WriteResponse {
    /// The file.
    pub path: PathBuf,
    /// Its size.
    pub size_bytes: u64,
}

/// `PUT /files?path=`: the body becomes the file (parents created, owned by
/// the request's user). Written to a temporary name beside it and renamed
/// at the end, so a failed upload leaves the old file intact.
pub async fn write(
    State(state): State<AppState>,
    q: Result<Query<PathQuery>, QueryRejection>,
    req: Request,
) -> Result<(StatusCode, Json<WriteResponse>), ApiError> {
    let q = query(q)?;
    let Target { who, path } = resolve(&state, &q.path, q.user.as_deref())?;
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Err(ApiError::bad_request(
            "invalid_path",
            "path: must name a file",
        ));
    };
    let parent = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let tmp = parent.join(format!(".{name}.thaw-upload-{:08x}", rand::random::<u32>()));
    let (tx, mut rx) = mpsc::channel::<Bytes>(CHUNKS_IN_FLIGHT);
    let writer = {
        let (who, path, parent, tmp) = (who.clone(), path.clone(), parent.clone(), tmp.clone());
        tokio::task::spawn_blocking(move || -> Result<u64, ApiError> {
            if path.is_dir() {
                return Err(ApiError::bad_request(
                    "is_a_directory",
                    format!("{} is a directory", path.display()),
                ));
            }
            let mut file = fsid::run_as(&who, || {
                std::fs::create_dir_all(&parent)?;
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&tmp)
            })
            .map_err(|e| ApiError::io("create", &path, &e))?;
            let mut size = 0u64;
            // Body frames are often small; gather what has arrived into one
            // buffer so each write system call moves up to a CHUNK.
            let mut pending: Vec<u8> = Vec::with_capacity(CHUNK);
            while let Some(chunk) = rx.blocking_recv() {
                pending.extend_from_slice(&chunk);
                while pending.len() < CHUNK {
                    match rx.try_recv() {
                        Ok(more) => pending.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                if let Err(e) = file.write_all(&pending) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(ApiError::io("write", &path, &e));
                }
                size += pending.len() as u64;
                pending.clear();
            }
            Ok(size)
        })
    };
    let mut body = req.into_body().into_data_stream();
    let mut body_error = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => {
                if tx.send(c).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Err(e) => {
                body_error = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| ApiError::internal(format!("file worker failed: {e}")))?;
    let cleanup = |tmp: PathBuf| async move {
        let _ = tokio::fs::remove_file(tmp).await;
    };
    if let Some(e) = body_error {
        cleanup(tmp).await;
        return Err(ApiError::bad_request(
            "body_interrupted",
            format!("the upload ended early: {e}"),
        ));
    }
    let size_bytes = match written {
        Ok(n) => n,
        Err(e) => {
            cleanup(tmp).await;
            return Err(e);
        }
    };
    let renamed = {
        let (tmp2, path2) = (tmp.clone(), path.clone());
        blocking(move || {
            fsid::run_as(&who, || std::fs::rename(&tmp2, &path2))
                .map_err(|e| ApiError::io("rename into", &path2, &e))
        })
        .await
    };
    if let Err(e) = renamed {
        cleanup(tmp).await;
        return Err(e);
    }
    Ok((StatusCode::OK, Json(WriteResponse { path, size_bytes })))
}

/// One entry of a listing or a stat.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// Base name.
    pub name: String,
    /// Full path.
    pub path: PathBuf,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Size.
    pub size_bytes: u64,
    /// Permission bits, octal (`"644"`).
    pub mode: String,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Last modification, RFC 3339.
    pub modified: String,
    /// Where a symlink points.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<PathBuf>,
}

fn entry(path: &Path, meta: &std::fs::Metadata) -> Entry {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    };
    let modified = time::OffsetDateTime::from_unix_timestamp(meta.mtime())
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    Entry {
        name: path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        path: path.to_path_buf(),
        kind,
        size_bytes: meta.len(),
        mode: format!("{:o}", meta.permissions().mode() & 0o7777),
        uid: meta.uid(),
        gid: meta.gid(),
        modified,
        symlink_target: ft
            .is_symlink()
            .then(|| std::fs::read_link(path).ok())
            .flatten(),
    }
}

/// `POST /files/list`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListRequest {
    /// The directory.
    pub path: String,
    /// Levels to descend (1 = the directory's own entries).
    #[serde(default = "one")]
    pub depth: u32,
    /// Act as this user.
    pub user: Option<String>,
}

fn one() -> u32 {
    1
}

/// `POST /files/list`: entries to `depth` levels, not following symlinks.
pub async fn list(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ListRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if req.depth == 0 || req.depth > MAX_DEPTH {
        return Err(ApiError::bad_request(
            "invalid_depth",
            format!("depth: must be 1..={MAX_DEPTH}"),
        ));
    }
    let Target { who, path } = resolve(&state, &req.path, req.user.as_deref())?;
    let depth = req.depth;
    let entries = blocking(move || {
        fsid::run_as(&who, || {
            let mut out = Vec::new();
            walk(&path, depth, &mut out)?;
            Ok(out)
        })
        .map_err(|e| ApiError::io("list", &path, &e))
    })
    .await?;
    Ok(Json(serde_json::json!({ "entries": entries })))
}

fn walk(dir: &Path, depth: u32, out: &mut Vec<Entry>) -> std::io::Result<()> {
    let mut children: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    children.sort_by_key(std::fs::DirEntry::file_name);
    for child in children {
        if out.len() >= MAX_ENTRIES {
            return Ok(());
        }
        let path = child.path();
        let meta = std::fs::symlink_metadata(&path)?;
        let is_dir = meta.is_dir();
        out.push(entry(&path, &meta));
        if is_dir && depth > 1 {
            // An unreadable subdirectory is listed but not descended into.
            let _ = walk(&path, depth - 1, out);
        }
    }
    Ok(())
}

/// `POST /files/stat` and `/files/mkdir` and `/files/remove`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRequest {
    /// The path.
    pub path: String,
    /// Act as this user.
    pub user: Option<String>,
    /// mkdir: create missing parents (default true); remove: a whole tree.
    pub recursive: Option<bool>,
}

/// `POST /files/stat`: the path itself (a symlink is described, not followed).
pub async fn stat(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<PathRequest>,
) -> Result<Json<Entry>, ApiError> {
    let Target { who, path } = resolve(&state, &req.path, req.user.as_deref())?;
    blocking(move || {
        let meta = fsid::run_as(&who, || std::fs::symlink_metadata(&path))
            .map_err(|e| ApiError::io("stat", &path, &e))?;
        Ok(Json(entry(&path, &meta)))
    })
    .await
}

/// `POST /files/mkdir`: 201 when created, 200 when it already was a directory.
pub async fn mkdir(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<PathRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let Target { who, path } = resolve(&state, &req.path, req.user.as_deref())?;
    let parents = req.recursive.unwrap_or(true);
    blocking(move || {
        if path.is_dir() {
            return Ok((
                StatusCode::OK,
                Json(serde_json::json!({"path": path, "created": false})),
            ));
        }
        fsid::run_as(&who, || {
            if parents {
                std::fs::create_dir_all(&path)
            } else {
                std::fs::create_dir(&path)
            }
        })
        .map_err(|e| ApiError::io("mkdir", &path, &e))?;
        Ok((
            StatusCode::CREATED,
            Json(serde_json::json!({"path": path, "created": true})),
        ))
    })
    .await
}

/// `POST /files/remove`: a file, a symlink, an empty directory, or with
/// `recursive` a whole tree.
pub async fn remove(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<PathRequest>,
) -> Result<StatusCode, ApiError> {
    let Target { who, path } = resolve(&state, &req.path, req.user.as_deref())?;
    if path == Path::new("/") {
        return Err(ApiError::bad_request(
            "invalid_path",
            "path: refusing to remove /",
        ));
    }
    let recursive = req.recursive.unwrap_or(false);
    blocking(move || {
        fsid::run_as(&who, || {
            let meta = std::fs::symlink_metadata(&path)?;
            if !meta.is_dir() {
                std::fs::remove_file(&path)
            } else if recursive {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_dir(&path)
            }
        })
        .map_err(|e| ApiError::io("remove", &path, &e))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /files/move`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// Source.
    pub from: String,
    /// Destination.
    pub to: String,
    /// Replace an existing destination.
    #[serde(default)]
    pub overwrite: bool,
    /// Act as this user.
    pub user: Option<String>,
}

/// `POST /files/move`: a rename (same filesystem); 409 if the destination
/// exists and `overwrite` is not set.
pub async fn rename(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let from = resolve(&state, &req.from, req.user.as_deref())?;
    let to = resolve(&state, &req.to, req.user.as_deref())?;
    let overwrite = req.overwrite;
    blocking(move || {
        fsid::run_as(&from.who, || {
            std::fs::symlink_metadata(&from.path)?;
            if !overwrite && std::fs::symlink_metadata(&to.path).is_ok() {
                return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
            }
            if let Some(parent) = to.path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(&from.path, &to.path)
        })
        .map_err(|e| ApiError::io("move", &from.path, &e))?;
        Ok(Json(serde_json::json!({"from": from.path, "to": to.path})))
    })
    .await
}
