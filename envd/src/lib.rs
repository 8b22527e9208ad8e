//! envd, the guest agent of every thaw sandbox.
//!
//! It serves, inside the sandbox, the HTTP API the host drives: health,
//! init, snapshot prepare, processes with optional PTY, files, ports and
//! tunnels, metrics. It is reached on a listening socket or by dialing out
//! to a host Unix socket (`transport`). The API is documented route by route
//! in envd/README.md; every stream is newline-delimited JSON.

pub mod config;
pub mod error;
pub mod exec_runner;
pub mod files;
pub mod fsid;
pub mod init;
pub mod json;
pub mod metrics;
pub mod ports;
pub mod process;
pub mod run;
pub mod snapshot;
pub mod state;
pub mod transport;
pub mod user;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::error::ApiError;
use crate::state::AppState;

/// envd's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The whole API as a router (tests drive it without a socket).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/version", get(version))
        .route("/init", post(init::init))
        .route("/snapshot/prepare", post(snapshot::prepare))
        .route(
            "/processes",
            post(process::api::start).get(process::api::list),
        )
        .route(
            "/processes/{selector}",
            get(process::api::get).delete(process::api::kill),
        )
        .route("/processes/{selector}/stream", get(process::api::stream))
        .route("/processes/{selector}/input", post(process::api::input))
        .route("/processes/{selector}/signal", post(process::api::signal))
        .route("/processes/{selector}/resize", post(process::api::resize))
        .route("/files", get(files::read).put(files::write))
        .route("/files/list", post(files::list))
        .route("/files/stat", post(files::stat))
        .route("/files/mkdir", post(files::mkdir))
        .route("/files/remove", post(files::remove))
        .route("/files/move", post(files::rename))
        .route("/ports", get(ports::list))
        .route("/ports/{port}/tunnel", get(tunnel))
        .route("/metrics", get(metrics::metrics))
        .route("/run", post(run::run))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn tunnel(
    state: State<AppState>,
    port: Result<axum::extract::Path<u16>, axum::extract::rejection::PathRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    let port = port.map_err(|_| ApiError::bad_request("invalid_port", "port: must be 1-65535"))?;
    ports::tunnel(state, port, req).await
}

/// `GET /health`.
async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let session = state.session();
    Json(serde_json::json!({
        "status": "ok",
        "version": VERSION,
        "sandbox_id": session.sandbox_id,
        "quiesced": state.quiesce.is_quiesced(),
        "port_scanner": if state.scanner.is_running() { "running" } else { "stopped" },
        "uptime_ms": u64::try_from(state.started.elapsed().as_millis()).unwrap_or(u64::MAX),
    }))
}

/// `GET /version`.
async fn version() -> impl IntoResponse {
    Json(serde_json::json!({ "name": "envd", "version": VERSION }))
}

/// Unknown routes: 404 in the error shape; `CONNECT host:port` is a tunnel.
async fn fallback(State(state): State<AppState>, req: Request) -> Response {
    if req.method() == Method::CONNECT {
        return ports::connect(state, req)
            .await
            .unwrap_or_else(IntoResponse::into_response);
    }
    ApiError::not_found(
        "route_not_found",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
    .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
    .into_response()
}
