//! Everything that can go wrong in vmhost's core, each mapped to one HTTP
//! status and one stable snake_case code in one place ([`HostError::status`]
//! and [`HostError::code`]).

use http::StatusCode;

/// A failure the core reports to its caller.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The request is malformed; names the field.
    #[error("{0}")]
    BadRequest(String),
    /// No sandbox has this id.
    #[error("no sandbox {0}")]
    SandboxNotFound(String),
    /// No template of this name.
    #[error("no template {0}")]
    TemplateNotFound(String),
    /// No snapshot has this id.
    #[error("no snapshot {0}")]
    SnapshotNotFound(String),
    /// The template exists but has no snapshot yet.
    #[error("template {0} is not built yet: POST /templates/{0}/build first")]
    TemplateNotBuilt(String),
    /// Another operation on the sandbox is under way.
    #[error("sandbox {id} is {state}: try again when it is done")]
    Busy {
        /// The sandbox.
        id: String,
        /// What it is doing.
        state: &'static str,
    },
    /// The sandbox is in a state where this cannot be done.
    #[error("sandbox {id} is {state}: cannot {op}")]
    WrongState {
        /// The sandbox.
        id: String,
        /// Its state.
        state: &'static str,
        /// The refused operation.
        op: &'static str,
    },
    /// The sandbox's warm runner has already run its one job.
    #[error("sandbox {0} already ran its job (a warm runner takes one job; create a new sandbox)")]
    RunnerSpent(String),
    /// The limits asked for exceed what this host has.
    #[error("{0}")]
    LimitsExceedHost(String),
    /// A limit that a restore cannot change (it lives in the snapshot).
    #[error("{0}")]
    LimitFixed(String),
    /// No room for another sandbox now.
    #[error("{0}")]
    NoCapacity(String),
    /// The sandbox failed to start, resume or snapshot.
    #[error("{0}")]
    SandboxFailed(String),
    /// envd did not answer.
    #[error("the sandbox's agent did not answer: {0}")]
    Envd(String),
    /// A template build failed.
    #[error("{0}")]
    BuildFailed(String),
    /// A bug or an unexpected host failure.
    #[error("{0}")]
    Internal(String),
}

impl HostError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            HostError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HostError::SandboxNotFound(_)
            | HostError::TemplateNotFound(_)
            | HostError::SnapshotNotFound(_) => StatusCode::NOT_FOUND,
            HostError::TemplateNotBuilt(_)
            | HostError::Busy { .. }
            | HostError::WrongState { .. }
            | HostError::RunnerSpent(_) => StatusCode::CONFLICT,
            HostError::LimitsExceedHost(_) | HostError::LimitFixed(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            HostError::NoCapacity(_) => StatusCode::SERVICE_UNAVAILABLE,
            HostError::SandboxFailed(_) | HostError::Envd(_) => StatusCode::BAD_GATEWAY,
            HostError::BuildFailed(_) | HostError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            HostError::BadRequest(_) => "bad_request",
            HostError::SandboxNotFound(_) => "sandbox_not_found",
            HostError::TemplateNotFound(_) => "template_not_found",
            HostError::SnapshotNotFound(_) => "snapshot_not_found",
            HostError::TemplateNotBuilt(_) => "template_not_built",
            HostError::Busy { .. } => "sandbox_busy",
            HostError::WrongState { state, .. } => match *state {
                "destroyed" | "destroying" => "sandbox_destroyed",
                "paused" => "sandbox_paused",
                _ => "sandbox_wrong_state",
            },
            HostError::RunnerSpent(_) => "runner_spent",
            HostError::LimitsExceedHost(_) => "limits_exceed_host",
            HostError::LimitFixed(_) => "limit_fixed_by_snapshot",
            HostError::NoCapacity(_) => "no_capacity",
            HostError::SandboxFailed(_) => "sandbox_failed",
            HostError::Envd(_) => "envd_unavailable",
            HostError::BuildFailed(_) => "build_failed",
            HostError::Internal(_) => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_error_is_a_409_with_a_telling_code() {
        let e = HostError::WrongState {
            id: "sb_1".into(),
            state: "destroyed",
            op: "pause",
        };
        assert_eq!(
            (e.status(), e.code()),
            (StatusCode::CONFLICT, "sandbox_destroyed")
        );
        assert_eq!(e.to_string(), "sandbox sb_1 is destroyed: cannot pause");
        let e = HostError::Busy {
            id: "sb_1".into(),
            state: "pausing",
        };
        assert_eq!(
            (e.status(), e.code()),
            (StatusCode::CONFLICT, "sandbox_busy")
        );
        assert_eq!(
            HostError::NoCapacity("full".into()).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
