//! The HTTP edge of errors: every failure is a status and
//! `{"error": {"code", "message"}}` (plus `request_id`), and a JSON body
//! extractor whose rejections take the same shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::HostError;

/// Largest JSON body of the control API.
pub const MAX_JSON_BODY_BYTES: usize = 1 << 20;

impl IntoResponse for HostError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, "request failed");
        }
        let mut resp = (
            status,
            axum::Json(json!({"error": {"code": self.code(), "message": self.to_string()}})),
        )
            .into_response();
        if status == http::StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            );
        }
        resp
    }
}

/// A JSON request body: a missing or empty body reads as `{}`; every
/// rejection is a 400 (413 when too large) naming what serde stopped at.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = Response;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let body = axum::body::to_bytes(req.into_body(), MAX_JSON_BODY_BYTES)
            .await
            .map_err(|_| {
                (
                    http::StatusCode::PAYLOAD_TOO_LARGE,
                    axum::Json(json!({"error": {"code": "body_too_large",
                        "message": format!("the request body is over {MAX_JSON_BODY_BYTES} bytes")}})),
                )
                    .into_response()
            })?;
        parse(&body)
            .map(ApiJson)
            .map_err(IntoResponse::into_response)
    }
}

/// Parses a JSON body; an empty one is `{}`.
pub fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, HostError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| HostError::BadRequest(format!("invalid request body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[allow(dead_code)]
        template: Option<String>,
    }

    #[test]
    fn bad_bodies_name_what_is_wrong() {
        let e = parse::<Body>(&Bytes::from_static(b"{\"templte\": 1}")).unwrap_err();
        assert!(e.to_string().contains("templte"), "{e}");
        assert_eq!(e.code(), "bad_request");
        assert!(parse::<Body>(&Bytes::from_static(b"  ")).is_ok());
        assert!(parse::<Body>(&Bytes::from_static(b"{\"template\": 3}"))
            .unwrap_err()
            .to_string()
            .contains("invalid type"));
    }
}
