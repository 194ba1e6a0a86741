//! Errors that end a request at the proxy, classified once and rendered as
//! OpenAI-shaped JSON (`{"error":{"message","type","param","code"}}`).
//!
//! Every way a request can fail inside Sluice is a [`ProxyError`] variant;
//! [`ProxyError::status`] and [`ProxyError::code`] are the single mapping from
//! cause to HTTP status and machine-readable code. Errors the upstream itself
//! returns are never rewritten: they pass through as the upstream sent them.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{ProxyBody, full};
use crate::headers::InvalidTenant;

/// A request that Sluice answers itself instead of forwarding.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The body is not valid JSON, or a field has the wrong type.
    #[error("{0}")]
    InvalidRequest(String),
    /// A trusted `X-Tenant` is not a tenant name (`--trust-tenant-header`).
    #[error(transparent)]
    InvalidTenant(#[from] InvalidTenant),
    /// The body is larger than `--max-body`.
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// The configured limit in bytes.
        limit: u64,
    },
    /// A path Sluice serves itself (admin listener) does not exist.
    #[error("no route for {0}")]
    NotFound(String),
    /// The method is not allowed on a route Sluice serves itself.
    #[error("method not allowed; this route takes {allow}")]
    MethodNotAllowed {
        /// The methods the route takes (the `Allow` header).
        allow: &'static str,
    },
    /// `GET /stats?reset=1`: a GET never changes anything.
    #[error(
        "GET /stats no longer resets the statistics: POST /stats/reset does, and answers with the statistics from before the reset"
    )]
    ResetNeedsPost,
    /// An admin route needs the bearer token (`--admin-token`) and the
    /// request had none, or another.
    #[error("{}", if *.presented {
        "the bearer token is not the admin token"
    } else {
        "this admin route needs `Authorization: Bearer <token>` (the proxy runs with --admin-token)"
    })]
    Unauthorized {
        /// Whether a token was presented (and was wrong).
        presented: bool,
    },
    /// The admin listener does not answer to this `Host` (DNS rebinding).
    #[error(
        "the admin listener does not answer to host {0:?}: use an IP address, localhost, or a name given to --admin-allowed-host"
    )]
    HostNotAllowed(String),
    /// A change on an admin listener that others can reach, with no token set.
    #[error(
        "{0} changes the proxy and the admin listener is not on a loopback address: set --admin-token (or bind --admin-listen to 127.0.0.1)"
    )]
    AdminTokenRequired(&'static str),
    /// The upstream refused the connection or could not be reached.
    #[error("upstream {upstream} is unreachable: {cause}")]
    UpstreamUnreachable {
        /// The upstream's address.
        upstream: String,
        /// What the connector reported.
        cause: String,
    },
    /// The upstream is known to be down; a probe is watching for its return.
    #[error("upstream {upstream} is down; retry after {}s", retry_after.as_secs())]
    UpstreamDown {
        /// The upstream's address.
        upstream: String,
        /// When a retry may succeed.
        retry_after: Duration,
    },
    /// The upstream did not answer within `--upstream-timeout`.
    #[error("upstream did not respond within {}", crate::units::format_duration(*.0))]
    UpstreamTimeout(Duration),
    /// The upstream answered with something that is not valid HTTP, or closed early.
    #[error("upstream sent an invalid response: {0}")]
    UpstreamBadResponse(String),
    /// The admission queue is full (`--max-queue`).
    #[error("admission queue is full ({max_queue} requests waiting); retry later")]
    QueueFull {
        /// The configured queue bound.
        max_queue: usize,
        /// Suggested back-off.
        retry_after: Duration,
    },
    /// The request waited in the admission queue longer than `--queue-timeout`.
    #[error("request waited {} in the admission queue without being admitted (--queue-timeout)", crate::units::format_duration(*.0))]
    QueueTimeout(Duration),
    /// The tenant is over its `--rate-limit`.
    /// The tenant is not named: it may be a key's digest, or whatever a
    /// client claimed, and the message goes to the log and the client.
    #[error("rate limit exceeded for this tenant; retry after {}ms", retry_after.as_millis())]
    RateLimited {
        /// When the limiter will next allow a request.
        retry_after: Duration,
    },
    /// The admission policy refused the request.
    #[error("rejected by admission policy: {0}")]
    PolicyRejected(String),
    /// The proxy is shutting down and admits nothing new.
    #[error("the proxy is shutting down")]
    ShuttingDown,
    /// The request bodies being read and parsed hold all of `--body-memory`.
    #[error(
        "too many large request bodies at once: the bodies being read hold the whole --body-memory budget of {budget} bytes; retry shortly"
    )]
    BodyMemoryFull {
        /// `--body-memory`.
        budget: u64,
    },
    /// Every client connection the listener may serve has a request in progress.
    #[error(
        "too many connections: this proxy serves at most {limit} at once and each has a request in progress (--max-connections); retry shortly"
    )]
    TooManyConnections {
        /// `--max-connections`.
        limit: usize,
    },
    /// A bug or an unexpected internal failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_) | Self::InvalidTenant(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } | Self::ResetNeedsPost => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::HostNotAllowed(_) | Self::AdminTokenRequired(_) => StatusCode::FORBIDDEN,
            Self::UpstreamUnreachable { .. } | Self::UpstreamBadResponse(_) => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamDown { .. }
            | Self::QueueTimeout(_)
            | Self::ShuttingDown
            | Self::TooManyConnections { .. }
            | Self::BodyMemoryFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::QueueFull { .. } | Self::RateLimited { .. } | Self::PolicyRejected(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Machine-readable code, also the `outcome` label of the error metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidTenant(_) => "invalid_tenant",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed { .. } | Self::ResetNeedsPost => "method_not_allowed",
            Self::Unauthorized { .. } => "unauthorized",
            Self::HostNotAllowed(_) => "host_not_allowed",
            Self::AdminTokenRequired(_) => "admin_token_required",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::UpstreamDown { .. } => "upstream_down",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::UpstreamBadResponse(_) => "upstream_bad_response",
            Self::QueueFull { .. } => "queue_full",
            Self::QueueTimeout(_) => "queue_timeout",
            Self::RateLimited { .. } => "rate_limited",
            Self::PolicyRejected(_) => "policy_rejected",
            Self::ShuttingDown => "shutting_down",
            Self::TooManyConnections { .. } => "too_many_connections",
            Self::BodyMemoryFull { .. } => "body_memory_full",
            Self::Internal(_) => "internal_error",
        }
    }

    /// The OpenAI `type` field.
    fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => "invalid_request_error",
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "invalid_request_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::INTERNAL_SERVER_ERROR => "server_error",
            _ => "upstream_error",
        }
    }

    /// The OpenAI `param` field: what in the request was wrong, when known.
    fn param(&self) -> Option<&'static str> {
        match self {
            Self::InvalidTenant(_) => Some("x-tenant"),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::UpstreamDown { retry_after, .. }
            | Self::QueueFull { retry_after, .. }
            | Self::RateLimited { retry_after, .. } => Some(*retry_after),
            Self::QueueTimeout(_)
            | Self::PolicyRejected(_)
            | Self::ShuttingDown
            | Self::TooManyConnections { .. }
            | Self::BodyMemoryFull { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The JSON error body, as OpenAI's API shapes it.
    pub fn body_json(&self) -> serde_json::Value {
        let mut body = openai_error(&self.to_string(), self.kind(), self.code());
        if let Some(param) = self.param() {
            body["error"]["param"] = param.into();
        }
        body
    }

    /// Renders the error as a complete HTTP response.
    pub fn into_response(self) -> Response<ProxyBody> {
        let body = Bytes::from(self.body_json().to_string());
        let mut response = Response::new(full(body));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(after) = self.retry_after() {
            // Retry-After is whole seconds; round up so clients never retry early.
            let secs = after.as_millis().div_ceil(1000).max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
        }
        match self {
            Self::MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            Self::ResetNeedsPost => {
                headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            // RFC 6750 §3: the scheme, and `invalid_token` when one was presented.
            Self::Unauthorized { presented } => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(if presented {
                        r#"Bearer realm="sluice-admin", error="invalid_token""#
                    } else {
                        r#"Bearer realm="sluice-admin""#
                    }),
                );
            }
            _ => {}
        }
        response
    }
}

/// `{"error":{"message","type","param":null,"code"}}`.
pub fn openai_error(message: &str, kind: &str, code: &str) -> serde_json::Value {
    serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn render(err: ProxyError) -> (StatusCode, http::HeaderMap, serde_json::Value) {
        let response = err.into_response();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).unwrap(),
        )
    }

    #[tokio::test]
    async fn invalid_request_is_400_with_openai_shape() {
        let (status, headers, body) = render(ProxyError::InvalidRequest(
            "`max_tokens` must be an integer".into(),
        ))
        .await;
        assert_eq!(status, 400);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(body["error"]["message"], "`max_tokens` must be an integer");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_request");
        assert!(body["error"]["param"].is_null());
        assert!(headers.get(header::RETRY_AFTER).is_none());
    }

    #[tokio::test]
    async fn an_invalid_tenant_is_400_naming_the_header_not_its_value() {
        let (status, _, body) = render(InvalidTenant { len: 61_440 }.into()).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_tenant");
        assert_eq!(body["error"]["param"], "x-tenant");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("61440 bytes"), "{message}");
    }

    #[tokio::test]
    async fn statuses_follow_the_cause() {
        let cases = [
            (ProxyError::BodyTooLarge { limit: 10 }, 413),
            (
                ProxyError::UpstreamUnreachable {
                    upstream: "u".into(),
                    cause: "refused".into(),
                },
                502,
            ),
            (ProxyError::UpstreamTimeout(Duration::from_secs(3)), 504),
            (ProxyError::UpstreamBadResponse("x".into()), 502),
            (ProxyError::QueueTimeout(Duration::from_secs(3)), 503),
            (ProxyError::PolicyRejected("full".into()), 429),
            (ProxyError::Unauthorized { presented: false }, 401),
            (ProxyError::HostNotAllowed("evil.example".into()), 403),
            (ProxyError::AdminTokenRequired("PUT /admin/policy"), 403),
            (ProxyError::ResetNeedsPost, 405),
        ];
        for (err, status) in cases {
            assert_eq!(err.status(), status, "{err:?}");
        }
    }

    #[tokio::test]
    async fn admin_refusals_carry_their_headers() {
        let (status, headers, body) = render(ProxyError::Unauthorized { presented: true }).await;
        assert_eq!(status, 401);
        assert_eq!(
            headers[header::WWW_AUTHENTICATE],
            r#"Bearer realm="sluice-admin", error="invalid_token""#
        );
        assert_eq!(body["error"]["code"], "unauthorized");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let (_, headers, _) = render(ProxyError::Unauthorized { presented: false }).await;
        assert_eq!(
            headers[header::WWW_AUTHENTICATE],
            r#"Bearer realm="sluice-admin""#
        );
        let (status, headers, body) = render(ProxyError::ResetNeedsPost).await;
        assert_eq!(status, 405);
        assert_eq!(headers[header::ALLOW], "POST");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("POST /stats/reset"), "{message}");
        let (_, headers, _) = render(ProxyError::MethodNotAllowed { allow: "GET, PUT" }).await;
        assert_eq!(headers[header::ALLOW], "GET, PUT");
    }

    #[tokio::test]
    async fn retry_after_rounds_up_to_whole_seconds() {
        let (status, headers, body) = render(ProxyError::RateLimited {
            retry_after: Duration::from_millis(1200),
        })
        .await;
        assert_eq!(status, 429);
        assert_eq!(headers[header::RETRY_AFTER], "2");
        assert_eq!(body["error"]["type"], "rate_limit_error");
        let (status, headers, _) = render(ProxyError::UpstreamDown {
            upstream: "u".into(),
            retry_after: Duration::from_secs(1),
        })
        .await;
        assert_eq!(status, 503);
        assert_eq!(headers[header::RETRY_AFTER], "1");
    }
}
