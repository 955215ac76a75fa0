//! Errors as the OpenAI API returns them: a status code and
//! `{"error":{"message","type","param","code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use lutra_runtime::Error;
use serde_json::json;

/// An error answer of the server.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when there is one (`"temperature"`, `"messages[1].role"`).
    pub param: Option<String>,
    /// A machine-readable code (`"context_length_exceeded"`), when there is one.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 about the request as a whole.
    pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 400 about one field of the request.
    pub(crate) fn field(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.into()),
            ..ApiError::invalid(message)
        }
    }

    pub(crate) fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// 401: the API key is missing or wrong.
    pub(crate) fn unauthorized() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "invalid or missing API key: send the header `Authorization: Bearer KEY` with the key given to --api-key".into(),
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 404 for a path the server does not have.
    pub(crate) fn not_found(path: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no endpoint {path}"),
            param: None,
            code: None,
        }
    }

    /// 500: generation failed inside the engine.
    pub(crate) fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// The OpenAI error type for the status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body, `{"error": {...}}`.
    pub(crate) fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<Error> for ApiError {
    /// Errors of `Engine::submit` and the tokenizer: the request's fault (400) unless the server is
    /// full or stopping (503).
    fn from(e: Error) -> ApiError {
        match e {
            Error::PromptTooLong { .. } | Error::ContextOverflow { .. } => {
                ApiError::invalid(e.to_string()).with_code("context_length_exceeded")
            }
            Error::QueueFull { .. } => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: e.to_string(),
                param: None,
                code: Some("queue_full"),
            },
            Error::ShuttingDown => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: e.to_string(),
                param: None,
                code: Some("shutting_down"),
            },
            Error::InvalidOption(_) | Error::Tokenizer(_) | Error::Template(_) => {
                ApiError::invalid(e.to_string())
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_openai_shape() {
        let e = ApiError::field("temperature", "temperature must be at least 0");
        let body = e.body();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "temperature");
        assert_eq!(body["error"]["message"], "temperature must be at least 0");
        assert!(body["error"]["code"].is_null());
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn runtime_errors_map_to_statuses() {
        let too_long: ApiError = Error::PromptTooLong {
            prompt_tokens: 100,
            context: 64,
        }
        .into();
        assert_eq!(too_long.status, StatusCode::BAD_REQUEST);
        assert_eq!(too_long.code, Some("context_length_exceeded"));
        let full: ApiError = Error::QueueFull { queue: 3 }.into();
        assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(full.body()["error"]["type"], "unavailable_error");
        let stopping: ApiError = Error::ShuttingDown.into();
        assert_eq!(stopping.status, StatusCode::SERVICE_UNAVAILABLE);
        let bad: ApiError = Error::InvalidOption("x".into()).into();
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            ApiError::unauthorized().body()["error"]["type"],
            "authentication_error"
        );
    }
}
