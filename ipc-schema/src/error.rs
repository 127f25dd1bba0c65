//! The errors a caller can get, the same on all three doors.

use serde::{Deserialize, Serialize};

/// What went wrong, as a closed set every client can match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed or out-of-range input; the message says which field.
    InvalidRequest,
    /// No such context (or not the caller's: another app's ids are not found, not forbidden).
    NotFound,
    /// The caller may not do this (e.g. an unknown API key).
    PermissionDenied,
    /// The context would exceed the model's window, the per-context limit or the KV budget.
    ContextWindowExceeded,
    /// The app's quota is spent; retry after `retry_after_ms`.
    QuotaExceeded,
    /// The queue is full; retry after `retry_after_ms`.
    Busy,
    /// Background work is not allowed now (e.g. an energy budget).
    BackgroundBlocked,
    /// The model is not loaded (starting up, or failed to load).
    ModelUnavailable,
    /// The request was cancelled by the caller (or its connection closed).
    Cancelled,
    /// A fault of the daemon; details are in its log.
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::InvalidRequest,
        ErrorCode::NotFound,
        ErrorCode::PermissionDenied,
        ErrorCode::ContextWindowExceeded,
        ErrorCode::QuotaExceeded,
        ErrorCode::Busy,
        ErrorCode::BackgroundBlocked,
        ErrorCode::ModelUnavailable,
        ErrorCode::Cancelled,
        ErrorCode::Internal,
    ];

    /// The name in CamelCase, as in D-Bus error names and DESIGN.md.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "InvalidRequest",
            ErrorCode::NotFound => "NotFound",
            ErrorCode::PermissionDenied => "PermissionDenied",
            ErrorCode::ContextWindowExceeded => "ContextWindowExceeded",
            ErrorCode::QuotaExceeded => "QuotaExceeded",
            ErrorCode::Busy => "Busy",
            ErrorCode::BackgroundBlocked => "BackgroundBlocked",
            ErrorCode::ModelUnavailable => "ModelUnavailable",
            ErrorCode::Cancelled => "Cancelled",
            ErrorCode::Internal => "Internal",
        }
    }

    /// HTTP status on the OpenAI door (499: client closed request, as nginx uses it).
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::ContextWindowExceeded => 400,
            ErrorCode::QuotaExceeded => 429,
            ErrorCode::Busy => 503,
            ErrorCode::BackgroundBlocked => 403,
            ErrorCode::ModelUnavailable => 503,
            ErrorCode::Cancelled => 499,
            ErrorCode::Internal => 500,
        }
    }

    /// D-Bus error name, `org.llmsd.Error.<Name>`.
    pub fn dbus_name(self) -> String {
        format!("org.llmsd.Error.{}", self.name())
    }

    /// The code of a D-Bus error name, if it is one of ours.
    pub fn from_dbus_name(name: &str) -> Option<ErrorCode> {
        let short = name.strip_prefix("org.llmsd.Error.")?;
        Self::ALL.into_iter().find(|c| c.name() == short)
    }

    /// OpenAI's error `type` for this code.
    pub fn openai_type(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest | ErrorCode::ContextWindowExceeded => "invalid_request_error",
            ErrorCode::NotFound => "not_found_error",
            ErrorCode::PermissionDenied | ErrorCode::BackgroundBlocked => "permission_error",
            ErrorCode::QuotaExceeded => "rate_limit_error",
            ErrorCode::Busy | ErrorCode::ModelUnavailable => "server_overloaded",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "server_error",
        }
    }

    /// Whether a retry later may succeed (the error then carries `retry_after_ms`).
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::QuotaExceeded | ErrorCode::Busy)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An error as it crosses a door: code, human-readable message, and when to retry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::NotFound, format!("no such context: {what}"))
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn cancelled() -> Self {
        Self::new(ErrorCode::Cancelled, "the request was cancelled")
    }

    pub fn busy(retry_after_ms: u64, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Busy,
            message: message.into(),
            retry_after_ms: Some(retry_after_ms),
        }
    }

    pub fn quota(retry_after_ms: u64, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::QuotaExceeded,
            message: message.into(),
            retry_after_ms: Some(retry_after_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_follow_the_design() {
        let want = [400, 404, 403, 400, 429, 503, 403, 503, 499, 500];
        let got: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.http_status()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn dbus_names_round_trip() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_dbus_name(&c.dbus_name()), Some(c));
        }
        assert_eq!(
            ErrorCode::from_dbus_name("org.freedesktop.DBus.Error.Failed"),
            None
        );
    }

    #[test]
    fn error_json_form() {
        let e = ApiError::busy(250, "queue full");
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"code":"busy","message":"queue full","retry_after_ms":250})
        );
        let back: ApiError = serde_json::from_value(j).unwrap();
        assert_eq!(back, e);
        let plain = serde_json::to_value(ApiError::not_found("ctx-1")).unwrap();
        assert!(plain.get("retry_after_ms").is_none());
    }
}
