//! Errors of the HTTP door in OpenAI's shape, and the request-body extractor that turns bad
//! JSON and oversized bodies into them (axum's own rejections are plain text).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use llmsd_ipc::{ApiError, ErrorCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::AppState;

/// An error as the HTTP door returns it:
/// `{"error":{"message","type","param","code"}}` with a status (and `Retry-After`).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's error `type` (`invalid_request_error`, ...).
    pub kind: &'static str,
    /// The request field at fault, when known.
    pub param: Option<&'static str>,
    pub code: Option<String>,
    /// Seconds until a retry may succeed (`Retry-After`).
    pub retry_after_s: Option<u64>,
}

impl HttpError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// 400 about one request field.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::bad_request(message)
        }
    }

    /// 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            code: Some("invalid_request".into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn unauthorized(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: Some(code.into()),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: Some("not_found".into()),
            ..Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
        }
    }

    pub fn with_code(mut self, code: &str) -> Self {
        self.code = Some(code.into());
        self
    }

    /// The JSON body (also sent as an SSE event when a stream fails midway).
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// OpenAI's name for a code where it has one, else llmsd's (snake_case) name.
fn openai_code(code: ErrorCode) -> String {
    match code {
        ErrorCode::ContextWindowExceeded => "context_length_exceeded".into(),
        other => match serde_json::to_value(other) {
            Ok(Value::String(s)) => s,
            _ => other.name().to_string(),
        },
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        let status =
            StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self {
            status,
            message: e.message,
            kind: e.code.openai_type(),
            param: None,
            code: Some(openai_code(e.code)),
            retry_after_s: e.retry_after_ms.map(|ms| ms.div_ceil(1000).max(1)),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "HTTP request failed");
        } else {
            tracing::debug!(status = %self.status, message = %self.message, "HTTP request refused");
        }
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// The raw request body, limited to `HttpOptions::max_body_bytes` (413 beyond it).
pub struct Body(pub Bytes);

impl FromRequest<AppState> for Body {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, HttpError> {
        let read = Bytes::from_request(req, state);
        let Ok(read) = tokio::time::timeout(super::REQUEST_READ_TIMEOUT, read).await else {
            return Err(HttpError {
                code: Some("request_timeout".into()),
                ..HttpError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    format!(
                        "the request body did not arrive within {} s",
                        super::REQUEST_READ_TIMEOUT.as_secs()
                    ),
                )
            });
        };
        match read {
            Ok(b) => Ok(Body(b)),
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(HttpError {
                code: Some("request_too_large".into()),
                ..HttpError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    format!(
                        "the request body exceeds the limit of {} bytes",
                        state.max_body_bytes
                    ),
                )
            }),
            Err(r) => Err(HttpError::bad_request(format!(
                "could not read the request body: {}",
                r.body_text()
            ))),
        }
    }
}

impl Body {
    /// The body as JSON of type `T` (400 with serde's message when it is not).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.0).map_err(|e| {
            let what = if e.is_syntax() || e.is_eof() {
                "could not parse the JSON body"
            } else {
                "invalid request body"
            };
            HttpError::bad_request(format!("{what}: {e}"))
        })
    }

    /// Like [`Body::json`], but an empty body is `T::default()`.
    pub fn json_or_default<T: DeserializeOwned + Default>(&self) -> Result<T, HttpError> {
        if self.0.iter().all(u8::is_ascii_whitespace) {
            Ok(T::default())
        } else {
            self.json()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_errors_map_to_openai_errors() {
        let r = HttpError::from(ApiError::busy(1500, "queue full")).into_response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let e = HttpError::from(ApiError::quota(10, "spent"));
        assert_eq!((e.status.as_u16(), e.retry_after_s), (429, Some(1)));
        assert_eq!(e.kind, "rate_limit_error");
        let e = HttpError::from(ApiError::new(ErrorCode::ContextWindowExceeded, "long"));
        assert_eq!(e.status, 400);
        assert_eq!(e.code.as_deref(), Some("context_length_exceeded"));
        let e = HttpError::from(ApiError::not_found("ctx-9"));
        assert_eq!(
            e.body(),
            json!({"error": {"message": "no such context: ctx-9", "type": "not_found_error",
                             "param": null, "code": "not_found"}})
        );
        let r = HttpError::from(ApiError::internal("boom")).into_response();
        assert_eq!(r.status(), 500);
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }
}
