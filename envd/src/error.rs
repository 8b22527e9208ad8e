//! The one error type at envd's HTTP edge: a stable `code`, a status, and a
//! message for a person. Every failure of every route becomes one of these.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A failure answered to the host as a status and
/// `{"error":{"code":"…","message":"…"}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// HTTP status of the response.
    pub status: StatusCode,
    /// Stable snake_case code a program can match on.
    pub code: &'static str,
    /// A sentence for a person.
    pub message: String,
}

impl ApiError {
    /// An error with any status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400: the request is malformed; the message names the field.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404: the named thing does not exist.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 409: the thing exists but is in the wrong state.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    /// 500: a failure of envd itself or of the system under it.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// Maps an I/O error on `path` while doing `op` to the status a client
    /// expects: missing → 404, permission → 403, exists → 409, else 500.
    pub fn io(op: &str, path: &std::path::Path, err: &std::io::Error) -> ApiError {
        use std::io::ErrorKind;
        let message = format!("{op} {}: {err}", path.display());
        match err.kind() {
            ErrorKind::NotFound => ApiError::not_found("not_found", message),
            ErrorKind::PermissionDenied => {
                ApiError::new(StatusCode::FORBIDDEN, "permission_denied", message)
            }
            ErrorKind::AlreadyExists => ApiError::conflict("already_exists", message),
            ErrorKind::InvalidInput => ApiError::bad_request("invalid_path", message),
            _ => match err.raw_os_error() {
                Some(libc::ENOTDIR) => ApiError::bad_request("not_a_directory", message),
                Some(libc::EISDIR) => ApiError::bad_request("is_a_directory", message),
                Some(libc::ENOTEMPTY) => ApiError::conflict("directory_not_empty", message),
                Some(libc::ENOSPC) => {
                    ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "no_space", message)
                }
                Some(libc::EXDEV) => ApiError::conflict("cross_device", message),
                _ => ApiError::internal(message),
            },
        }
    }
}

/// The JSON body of every error response.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    /// The error as one JSON document, the body of its response and the
    /// payload of an `error` stream event.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        } else {
            tracing::debug!(code = self.code, message = %self.message, "request refused");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_statuses() {
        let p = std::path::Path::new("/x");
        let nf = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(ApiError::io("read", p, &nf).status, StatusCode::NOT_FOUND);
        let pd = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(ApiError::io("read", p, &pd).status, StatusCode::FORBIDDEN);
        let ne = std::io::Error::from_raw_os_error(libc::ENOTEMPTY);
        assert_eq!(ApiError::io("remove", p, &ne).code, "directory_not_empty");
    }

    #[test]
    fn body_has_code_and_message() {
        let e = ApiError::bad_request("invalid_json", "cmd: expected a string");
        assert_eq!(
            e.to_json(),
            serde_json::json!({"error": {"code": "invalid_json", "message": "cmd: expected a string"}})
        );
    }
}
