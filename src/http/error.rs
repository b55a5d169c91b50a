//! `ApiError`: every HTTP error is JSON `{"error": "<snake_case>", "message": "…"}` with the right
//! status. Store errors map by kind: not found → 404, unique violation → 409, unavailable → 503.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::auth::TokenError;
use crate::store::StoreError;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: &str) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(code: &'static str, message: &str) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn forbidden(code: &'static str, message: &str) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, code, message)
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
        e.retry_after = Some(1);
        e
    }

    pub fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }

    /// 429 with `Retry-After`.
    pub fn throttled(t: crate::limits::Throttled) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "too many requests ({}); retry after {} s",
                t.scope,
                t.retry_after_s()
            ),
        );
        e.retry_after = Some(t.retry_after_s());
        e
    }

    pub fn from_token(e: TokenError) -> ApiError {
        ApiError::unauthorized(e.code(), &e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound => ApiError::not_found("resource"),
            StoreError::Conflict(what) => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{what} already exists"),
            ),
            StoreError::Unavailable(m) => {
                log::warn!("database unavailable: {m}");
                ApiError::unavailable("the database is unavailable")
            }
            other => {
                log::error!("store error: {other}");
                ApiError::internal()
            }
        }
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(_: actix_web::error::BlockingError) -> ApiError {
        ApiError::unavailable("the server is overloaded")
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut b = HttpResponse::build(self.status);
        if let Some(s) = self.retry_after {
            b.insert_header(("Retry-After", s.to_string()));
        }
        b.json(json!({ "error": self.code, "message": self.message }))
    }
}

/// Body errors of `web::Json`: 413 too large, 400 malformed JSON, 422 wrong types, 415 not JSON.
pub fn json_error(
    err: actix_web::error::JsonPayloadError,
    _: &actix_web::HttpRequest,
) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as J;
    let e = match &err {
        J::OverflowKnownLength { .. } | J::Overflow { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body too large",
        ),
        J::ContentType => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send application/json",
        ),
        J::Deserialize(d) if d.is_data() => {
            ApiError::unprocessable("invalid_fields", without_values(&d.to_string()))
        }
        J::Deserialize(d) => ApiError::bad_request("malformed_json", &d.to_string()),
        _ => ApiError::bad_request("bad_request", &err.to_string()),
    };
    e.into()
}

/// serde names the value it could not take: `invalid type: integer `7319462805`, expected a
/// string`. That value may be a password or token sent with the wrong type, and the message is
/// both returned and logged (actix's logger prints error responses at debug), so keep its kind
/// and drop the value. Field names, line and column stay: they are what a client needs.
fn without_values(msg: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: ", "unknown variant "] {
        let Some(rest) = msg.strip_prefix(prefix) else {
            continue;
        };
        // The value may itself contain ", expected "; the type's expectation never does.
        let Some(exp) = rest.rfind(", expected ") else {
            continue;
        };
        let kind = rest[..exp]
            .split(['`', '"'])
            .next()
            .unwrap_or("")
            .trim_end();
        let prefix = prefix.trim_end();
        let sep = if kind.is_empty() { "" } else { " " };
        return format!("{prefix}{sep}{kind}{}", &rest[exp..]);
    }
    msg.to_string()
}

/// Query-string errors: 400 with the reason.
pub fn query_error(
    err: actix_web::error::QueryPayloadError,
    _: &actix_web::HttpRequest,
) -> actix_web::Error {
    ApiError::bad_request("invalid_query", &err.to_string()).into()
}

/// Path errors (for example a non-UTF-8 segment): 404, as nothing can live there.
pub fn path_error(_: actix_web::error::PathError, _: &actix_web::HttpRequest) -> actix_web::Error {
    ApiError::not_found("resource").into()
}

#[cfg(test)]
mod tests {
    use super::without_values;

    fn serde_message<T: serde::de::DeserializeOwned + std::fmt::Debug>(json: &str) -> String {
        serde_json::from_str::<T>(json).unwrap_err().to_string()
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Login {
        password: String,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    enum Plan {
        Free,
    }

    #[test]
    fn a_value_of_the_wrong_type_is_not_repeated() {
        let m = without_values(&serde_message::<Login>(r#"{"password": 7319462805}"#));
        assert_eq!(
            m,
            "invalid type: integer, expected a string at line 1 column 23"
        );
        let m = without_values(&serde_message::<u64>(r#""hunter2, expected x""#));
        assert!(!m.contains("hunter2"), "{m}");
        assert!(m.starts_with("invalid type: string, expected"), "{m}");
        let m = without_values(&serde_message::<Plan>(r#""s3cret""#));
        assert!(!m.contains("s3cret"), "{m}");
        assert!(m.starts_with("unknown variant, expected"), "{m}");
    }

    #[test]
    fn messages_without_values_are_kept() {
        for json in [r#"{}"#, r#"{"password": "x", "other": 1}"#] {
            let m = serde_message::<Login>(json);
            assert_eq!(without_values(&m), m);
        }
    }
}
