//! The pool-manager daemon's HTTP API: counts and targets, leases (for
//! callers that do not hold a store of their own), metrics and health.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::hosts::Hosts;
use crate::pool::Pool;
use crate::refill::Refiller;
use crate::store::{Store, StoreError};

/// What the routes share.
#[derive(Debug)]
pub struct ApiState<S: Store, H: Hosts> {
    /// The pool.
    pub pool: Arc<Pool<S, H>>,
    /// The refiller (for pending counts).
    pub refiller: Arc<Refiller<S, H>>,
}

/// An API failure: a status and `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.0,
            Json(json!({"error": {"code": self.1, "message": self.2}})),
        )
            .into_response();
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            );
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let (status, code) = match &e {
            StoreError::LeaseNotHeld(_) => (StatusCode::NOT_FOUND, "lease_not_held"),
            StoreError::HostDead { .. } => (StatusCode::CONFLICT, "host_dead"),
            StoreError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
        };
        ApiError(status, code, e.to_string())
    }
}

fn bad(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// Parses a JSON body, naming what is wrong.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid request body: {e}")))
}

/// The router.
pub fn router<S: Store, H: Hosts>(state: Arc<ApiState<S, H>>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics::<S, H>))
        .route("/pool", get(pool::<S, H>))
        .route("/pool/targets/{template}", put(set_target::<S, H>))
        .route("/leases", post(lease::<S, H>))
        .route("/leases/{id}/renew", post(renew::<S, H>))
        .route("/leases/{id}/release", post(release::<S, H>))
        .with_state(state)
}

async fn metrics<S: Store, H: Hosts>(State(st): State<Arc<ApiState<S, H>>>) -> Response {
    if let Err(e) = st.pool.refresh_gauges().await {
        tracing::warn!(error = %e, "refreshing pool gauges");
    }
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.pool.metrics.render(),
    )
        .into_response()
}

async fn pool<S: Store, H: Hosts>(
    State(st): State<Arc<ApiState<S, H>>>,
) -> Result<Response, ApiError> {
    let counts = st.pool.store.counts().await?;
    let hosts = st.pool.store.hosts(crate::now_ms()).await?;
    Ok(
        Json(json!({"templates": counts, "hosts": hosts, "pending": st.refiller.pending()}))
            .into_response(),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetBody {
    target: u64,
}

async fn set_target<S: Store, H: Hosts>(
    State(st): State<Arc<ApiState<S, H>>>,
    Path(template): Path<String>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let b: TargetBody = body(&raw)?;
    if template.is_empty() || template.len() > 64 || template.contains('/') {
        return Err(bad(format!(
            "template: {template:?} is not a template name"
        )));
    }
    if b.target > 10_000 {
        return Err(bad("target: at most 10000".into()));
    }
    st.pool.store.set_target(&template, b.target).await?;
    let counts = st.pool.store.counts().await?;
    Ok(Json(json!({"template": template, "counts": counts.get(&template)})).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseBody {
    template: String,
    holder: String,
    #[serde(default = "default_ttl")]
    ttl_ms: u64,
    /// Wait up to this long for a ready sandbox.
    #[serde(default)]
    wait_ms: u64,
}

fn default_ttl() -> u64 {
    60_000
}

async fn lease<S: Store, H: Hosts>(
    State(st): State<Arc<ApiState<S, H>>>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let b: LeaseBody = body(&raw)?;
    if b.ttl_ms == 0 || b.ttl_ms > 24 * 3_600_000 || b.wait_ms > 60_000 {
        return Err(bad("ttl_ms: 1..=86400000; wait_ms: at most 60000".into()));
    }
    let got = st
        .pool
        .lease_wait(
            &b.template,
            &b.holder,
            Duration::from_millis(b.ttl_ms),
            Duration::from_millis(b.wait_ms),
        )
        .await?;
    match got {
        Some(l) => Ok((StatusCode::CREATED, Json(l)).into_response()),
        None => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_ready_sandbox",
            format!("no warm {} sandbox is ready now; retry shortly", b.template),
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewBody {
    holder: String,
    #[serde(default = "default_ttl")]
    ttl_ms: u64,
}

async fn renew<S: Store, H: Hosts>(
    State(st): State<Arc<ApiState<S, H>>>,
    Path(id): Path<String>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let b: RenewBody = body(&raw)?;
    let l = st
        .pool
        .renew(&id, &b.holder, Duration::from_millis(b.ttl_ms))
        .await?;
    Ok(Json(l).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    holder: String,
    /// Keep the sandbox for this owner instead of destroying it.
    #[serde(default)]
    park_for: Option<String>,
}

async fn release<S: Store, H: Hosts>(
    State(st): State<Arc<ApiState<S, H>>>,
    Path(id): Path<String>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let b: ReleaseBody = body(&raw)?;
    let sb = match b.park_for {
        Some(owner) => st.pool.park(&id, &b.holder, &owner).await?,
        None => st.pool.release(&id, &b.holder).await?,
    };
    Ok(Json(sb).into_response())
}
