//! vmhost's HTTP API (JSON; NDJSON streams for output and build progress).
//!
//! `router(host)` is separate from `main` so tests drive it without a
//! socket. Layers, outermost first: request id (set, then propagated),
//! tracing span per request.

pub mod error;
mod proxy;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use self::error::ApiJson;
use crate::driver::Driver;
use crate::error::HostError;
use crate::host::{CreateRequest, Host};
use crate::snapshots;

/// The router of the whole API.
pub fn router(host: Arc<Host>) -> Router {
    let header = http::HeaderName::from_static("x-request-id");
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/host", get(host_info))
        .route("/sandboxes", post(create).get(list))
        .route("/sandboxes/restore", post(restore))
        .route("/sandboxes/{id}", get(show).delete(destroy))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/snapshot", post(snapshot))
        .route("/sandboxes/{id}/run", post(proxy::run))
        .route("/sandboxes/{id}/processes", any(proxy::forward))
        .route("/sandboxes/{id}/processes/{*rest}", any(proxy::forward))
        .route("/sandboxes/{id}/files", any(proxy::forward))
        .route("/sandboxes/{id}/files/{*rest}", any(proxy::forward))
        .route("/sandboxes/{id}/ports", any(proxy::forward))
        .route("/sandboxes/{id}/ports/{port}/tunnel", get(proxy::tunnel))
        .route("/sandboxes/{id}/metrics", any(proxy::forward))
        .route("/snapshots", get(list_snapshots))
        .route("/snapshots/{id}", delete(delete_snapshot))
        .route("/templates", get(templates))
        .route("/templates/{name}/build", post(build_template))
        .fallback(not_found)
        .with_state(host)
        .layer(PropagateRequestIdLayer::new(header.clone()))
        .layer(TraceLayer::new_for_http())
        .layer(SetRequestIdLayer::new(header, MakeRequestUuid))
}

async fn not_found(req: axum::extract::Request) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"code": "route_not_found",
            "message": format!("no route {} {}", req.method(), req.uri().path())}})),
    )
        .into_response()
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(h): State<Arc<Host>>) -> Response {
    h.metrics.sandboxes.reset();
    for (state, n) in h.counts() {
        h.metrics
            .sandboxes
            .with_label_values(&[state])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        h.metrics.render(),
    )
        .into_response()
}

async fn host_info(State(h): State<Arc<Host>>) -> Json<Value> {
    let cap = crate::hostinfo::capacity();
    let live = h.list();
    let committed: u64 = live.iter().map(|s| s.limits.memory_bytes).sum();
    let used: u64 = live
        .iter()
        .filter_map(|s| s.usage.map(|u| u.memory_bytes))
        .sum();
    Json(json!({
        "driver": h.driver().describe(),
        "cpus": cap.cpus,
        "load_millis": cap.load_millis,
        "memory_bytes": cap.memory_bytes,
        "memory_available_bytes": cap.memory_available_bytes,
        "sandboxes": h.counts(),
        "max_sandboxes": h.config().max_sandboxes,
        "sandbox_memory_limit_bytes": committed,
        "sandbox_memory_used_bytes": used,
    }))
}

async fn create(
    State(h): State<Arc<Host>>,
    ApiJson(req): ApiJson<CreateRequest>,
) -> Result<Response, HostError> {
    if req.snapshot_id.is_some() {
        return Err(HostError::BadRequest(
            "snapshot_id: use POST /sandboxes/restore to restore a snapshot".into(),
        ));
    }
    let v = h.create(req).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn restore(
    State(h): State<Arc<Host>>,
    ApiJson(req): ApiJson<CreateRequest>,
) -> Result<Response, HostError> {
    if req.template.is_some() {
        return Err(HostError::BadRequest(
            "template: a restore takes its template from the snapshot".into(),
        ));
    }
    let v = h.restore(req).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn list(State(h): State<Arc<Host>>) -> Json<Value> {
    Json(json!({"sandboxes": h.list()}))
}

async fn show(State(h): State<Arc<Host>>, Path(id): Path<String>) -> Result<Response, HostError> {
    Ok(Json(h.view(&id)?).into_response())
}

async fn destroy(
    State(h): State<Arc<Host>>,
    Path(id): Path<String>,
) -> Result<Response, HostError> {
    let v = h.destroy(&id)?;
    Ok((StatusCode::ACCEPTED, Json(v)).into_response())
}

async fn pause(State(h): State<Arc<Host>>, Path(id): Path<String>) -> Result<Response, HostError> {
    Ok(Json(h.pause(&id).await?).into_response())
}

async fn resume(State(h): State<Arc<Host>>, Path(id): Path<String>) -> Result<Response, HostError> {
    Ok(Json(h.resume(&id).await?).into_response())
}

async fn snapshot(
    State(h): State<Arc<Host>>,
    Path(id): Path<String>,
) -> Result<Response, HostError> {
    let meta = h.snapshot(&id).await?;
    Ok((StatusCode::CREATED, Json(meta)).into_response())
}

async fn list_snapshots(State(h): State<Arc<Host>>) -> Json<Value> {
    let dir = h.config().data_dir.join("snapshots");
    let mut all: Vec<snapshots::SnapshotMeta> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| snapshots::load(&e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    all.sort_by(|a, b| a.created_at.cmp(&b.created_at));
    Json(json!({"snapshots": all}))
}

async fn delete_snapshot(
    State(h): State<Arc<Host>>,
    Path(id): Path<String>,
) -> Result<Response, HostError> {
    let dir = snapshots::user_dir(&h.config().data_dir, &id);
    if !snapshots::valid_id(&id) || !dir.join(snapshots::META).is_file() {
        return Err(HostError::SnapshotNotFound(id));
    }
    std::fs::remove_dir_all(&dir)
        .map_err(|e| HostError::Internal(format!("remove {}: {e}", dir.display())))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn templates(State(h): State<Arc<Host>>) -> Json<Value> {
    Json(json!({"templates": crate::templates::list(&h)}))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildQuery {
    /// Bake a new snapshot even if the current one is up to date.
    #[serde(default)]
    force: bool,
}

/// `POST /templates/{name}/build`: progress as NDJSON, ending with one
/// `result` or `error` event. The build goes on if the client leaves.
async fn build_template(
    State(h): State<Arc<Host>>,
    Path(name): Path<String>,
    query: Result<Query<BuildQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HostError> {
    let Query(q) = query.map_err(|e| HostError::BadRequest(format!("query: {e}")))?;
    if !crate::templates::valid_name(&name) {
        return Err(HostError::BadRequest(format!(
            "name: {name:?} is not a template name"
        )));
    }
    if !h
        .config()
        .build
        .runtimes_dir
        .join(&name)
        .join("recipe")
        .is_file()
    {
        return Err(HostError::TemplateNotFound(name));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(256);
    let host = h.clone();
    tokio::spawn(async move {
        let done = crate::templates::build(&host, &name, q.force, tx.clone()).await;
        let last = match done {
            Ok(meta) => json!({"type": "result", "template": name, "snapshot": meta}),
            Err(e) => {
                json!({"type": "error", "error": {"code": e.code(), "message": e.to_string()}})
            }
        };
        let _ = tx.send(last).await;
    });
    let lines = tokio_stream::wrappers::ReceiverStream::new(rx).map(|v| {
        let mut line = serde_json::to_vec(&v).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line))
    });
    Ok((
        [(http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

use tokio_stream::StreamExt as _;
